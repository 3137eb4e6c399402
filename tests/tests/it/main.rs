//! comfyq integration tests: one test binary, one module per topic.

mod chaos;
mod cli;
mod cluster;
mod comfy_facade;
mod dashboard;
mod e2e;
mod events;
mod faults;
mod harness;
mod media;
mod nats_auth;
mod rest_api;
mod rest_catalogue;
mod rest_fuzz;
mod runner;
mod scheduling;
mod up;
mod webhooks;
