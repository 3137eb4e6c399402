//! The comfyq shared crate: what every service agrees on.
//!
//! - [`ids`]: `JobId` (UUID v7), `TenantId`, `PoolName`, `RunnerId`, parsed at the edge.
//! - [`priority`]: `high`, `normal`, `low`.
//! - [`job`]: the job record, its specification, outputs and errors.
//! - [`event`]: job events and their subject kinds.
//! - [`capability`]: what a job needs of a runner and whether a runner offers it.
//! - [`guard`]: SSRF guard: outbound URLs must resolve to public addresses.
//! - [`messages`]: pending jobs, dispatches and commands between services.
//! - [`registry`]: runners' capability and load entries, and the live fleet.
//! - [`names`]: every subject, stream, consumer and bucket name, from one prefix.
//! - [`provision`]: idempotent creation of streams, buckets and consumers
//!   (or, for identities without those rights, checking they exist).
//! - [`nats_permissions`]: what each NATS identity may publish and subscribe to.
//! - [`connection`]: connecting to NATS.
//! - [`consume`]: running a durable pull consumer with one ack per message.
//! - [`dead_letter`]: jobs whose attempts ran out, kept for an operator's requeue.
//! - [`job_store`]: job records as state events, written with compare-and-set.
//! - [`machine`]: the job state machine as a pure function.
//! - [`kv_view`]: an in-memory view of a KV bucket kept by one watch.
//! - [`media`]: inputs and outputs in the JetStream object store.
//! - [`publisher`]: publishing live job events.
//! - [`config`]: layered configuration (file, then `COMFYQ_` environment).
//! - [`telemetry`]: tracing and Prometheus metrics.
//! - [`webhook`]: webhook delivery records and redelivery requests.
//! - [`workflow`]: the ComfyUI API-format workflow, parsed once.
//! - [`shutdown`]: the process-wide cancellation token.
//! - [`service`]: the common `main` of every service binary.

pub mod capability;
pub mod comfy_validation;
pub mod config;
pub mod connection;
pub mod consume;
pub mod dead_letter;
pub mod event;
pub mod guard;
pub mod ids;
pub mod jetstream_store;
pub mod job;
pub mod job_store;
pub mod kv_view;
pub mod machine;
pub mod media;
pub mod messages;
pub mod names;
pub mod nats_cluster;
pub mod nats_permissions;
pub mod priority;
pub mod provision;
pub mod publisher;
pub mod pyfmt;
pub mod registry;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod webhook;
pub mod workflow;

pub use event::{Event, EventBody, EventKind};
pub use ids::{JobId, PoolName, RunnerId, TenantId};
pub use job::{ErrorKind, JobError, JobRecord, JobSpec, JobStatus, OutputFile};
pub use names::Names;
pub use priority::Priority;
