//! A ComfyUI 0.3.64 simulator at the protocol level: HTTP routes, WebSocket messages and
//! binary frames, history and `/view`, validation errors and failure modes, with real
//! (and optionally huge) output files. See the crate README for what is simulated.
//!
//! Modules:
//! - [`config`]: the knobs ([`SimConfig`]) and injectable [`Failure`]s.
//! - `server`: process lifecycle (start-up delay, crash, restart) and [`SimHandle`].
//! - `routes`: the HTTP routes (also under `/api/`).
//! - `ws`: the WebSocket endpoint and feature-flag handshake.
//! - `state`: what one process holds in memory (queue, history, cache, sockets).
//! - `queue`: the prompt queue with Python `heapq` ordering.
//! - `executor`: runs prompts, emitting ComfyUI's messages in ComfyUI's order.
//! - `validation`: `validate_prompt` with ComfyUI's error bodies.
//! - `nodes`: the node catalogue (`/object_info`).
//! - [`frames`]: binary WebSocket frames (preview, text, preview with metadata).
//! - `media`: PNG/APNG/WEBP/MP4/FLAC outputs padded to a requested size.
//! - [`storage`]: input/output/temp directories and ComfyUI's path rules.
//! - `pyfmt`, `validation`: Python `repr`/`json.dumps` formatting and ComfyUI's
//!   prompt validation, from `comfyq_shared` (ingress uses them too).

pub mod config;
mod executor;
pub mod frames;
mod media;
mod nodes;
// ComfyUI's validation and Python formatting are shared with ingress.
use comfyq_shared::pyfmt;
mod queue;
mod routes;
mod server;
mod state;
pub mod storage;
use comfyq_shared::comfy_validation as validation;
mod ws;

pub use config::{Failure, PreviewFormat, SimConfig};
pub use server::{ReceivedPrompt, SentSuccess, SimHandle, Simulator};
pub use storage::DirKind;
