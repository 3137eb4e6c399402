//! comfyq integration tests: one test binary, one module per topic.

mod e2e;
mod faults;
mod harness;
mod runner;
mod scheduling;
