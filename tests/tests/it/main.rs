//! comfyq integration tests: one test binary, one module per topic.

mod e2e;
mod events;
mod faults;
mod harness;
mod runner;
mod scheduling;
mod webhooks;
