//! Test harness for comfyq's integration tests.
//!
//! - [`nats_server`]: [`NatsServer`], a real `nats-server` with JetStream on a
//!   free port and a temporary store; `stop()` / `restart()` for outage tests.
//! - [`webhook_sink`]: [`WebhookSink`], an HTTP server recording every request
//!   and answering from a programmable response queue.
//! - [`stack`]: [`TestStack`](stack::TestStack), the whole stack in-process beside the
//!   ComfyUI simulator and a webhook sink.
//! - [`service_process`]: a service as an OS process of its own under a
//!   restarting supervisor; [`chaos`]: random kills of them and NATS node
//!   faults under load ([`fault_load`]).
//! - [`browser`]: headless Chromium over the DevTools protocol (the
//!   dashboard test).
//! - [`eventually`]: [`eventually()`], [`eventually_true()`] and
//!   [`assert_eventually!`] to poll for a condition with a deadline instead of
//!   sleeping.
//!
//! The `nats-server` binary is found via `NATS_SERVER_BIN`, then
//! `<workspace>/.tools/nats/bin/nats-server` (installed by
//! `bash deploy/dev.sh setup`), then `PATH`.

pub mod browser;
pub mod chaos;
pub mod cluster;
pub mod eventually;
pub mod fault_load;
pub mod memory;
pub mod moto;
pub mod nats_server;
pub mod service_process;
pub mod stack;
pub mod webhook_sink;

pub use cluster::{ClusterOptions, NatsCluster};
pub use eventually::{eventually, eventually_true};
pub use moto::MotoServer;
pub use nats_server::NatsServer;
pub use stack::{IsolatedRunner, IsolatedScheduler, RunnerTweak, StackOptions, TestStack};
pub use webhook_sink::{MockResponse, ReceivedWebhook, WebhookSink};
