//! Client of ComfyUI's own protocol (coded against ComfyUI 0.3.x, not a simulator).
//!
//! - [`protocol`]: serde wire types — WebSocket JSON messages ([`ServerMessage`]),
//!   history entries and their output files ([`HistoryEntry`], [`NodeOutput`],
//!   [`OutputFile`]), `/prompt` answers, `/queue`, `/system_stats`, `/object_info`,
//!   `/features`.
//! - [`frames`]: the binary WebSocket frames (previews, progress text), zero copy.
//! - [`client`]: [`ComfyClient`], the HTTP API (submit, history, upload, view,
//!   interrupt, queue) with errors classified for retry decisions.
//! - [`socket`]: [`ComfySocket`], the `/ws?clientId=` event stream with the feature-flag
//!   handshake.

pub mod client;
pub mod frames;
pub mod protocol;
pub mod socket;

#[cfg(test)]
mod tests;

pub use client::{ClientConfig, ComfyClient, ComfyError, SubmitError, UploadImage, ViewResponse};
pub use frames::{BinaryFrame, FrameError, ImageFormat, PreviewMetadata};
pub use protocol::{
    ExecutionError, ExecutionInterrupted, Features, HistoryEntry, HistoryStatus, NodeErrors,
    NodeOutput, ObjectInfo, OutputFile, PromptAccepted, PromptError, PromptRejection, QueueItem,
    QueueState, ServerMessage, SystemStats, UploadedFile,
};
pub use socket::{
    Backoff, CloseReason, ComfySocket, SocketConfig, SocketError, SocketEvent, connect_with_backoff,
};
