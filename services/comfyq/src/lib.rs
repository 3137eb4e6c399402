//! The `comfyq` command line as a library, so the integration tests drive the
//! same code in-process that the binary runs.
//!
//! - [`cli`]: the client subcommands (`submit`, `jobs`, `job`, `watch`,
//!   `cancel`, `retry`, `outputs`, `queue`, `runners`, `dead-letters`), which
//!   talk only to the public REST API.
//!
//! `comfyq up` (the whole stack in one process tree) lives in the binary
//! (`main.rs`, `nats_process.rs`).

pub mod cli;
