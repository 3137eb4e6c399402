//! Integration tests of the simulator against the recordings of a real ComfyUI 0.3.64.
#![allow(clippy::unwrap_used, unreachable_pub)]

mod failures;
mod helpers;
mod http;
mod protocol;
