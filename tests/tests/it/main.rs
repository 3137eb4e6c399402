//! comfyq integration tests: one test binary, one module per topic.

mod harness;
