//! The `comfyq` command line as a library, so the integration tests drive the
//! same code in-process that the binary runs.
//!
//! - [`cli`]: the client subcommands (`submit`, `jobs`, `job`, `watch`,
//!   `cancel`, `retry`, `outputs`, `queue`, `runners`, `dead-letters`), which
//!   talk only to the public REST API.
//! - [`up`]: `comfyq up`, the whole stack in one process tree.
//! - [`nats_auth`]: `comfyq nats-config` (least-privilege NATS users) and
//!   `comfyq provision` (streams and consumers, as the admin).
//! - `nats_process`: the nats-server child of `up`, which dies with it.
//! - `webhook_secret`: the signing secret `up` makes once and keeps.

pub mod cli;
pub mod nats_auth;
mod nats_process;
pub mod up;
mod webhook_secret;
