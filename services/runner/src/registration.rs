//! The runner's entry in the runners KV bucket: what it can run and how
//! busy it is, refreshed well inside the bucket's TTL so a dead runner
//! disappears on its own.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::kv;
use comfyq_shared::ids::{PoolName, RunnerId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::comfy::ComfyClient;
use crate::managed::ComfyHealth;
use crate::worker::HeldJobs;

/// Model folders listed in the registration (the ones workflows name files from).
const MODEL_FOLDERS: [&str; 8] = [
    "checkpoints",
    "loras",
    "vae",
    "controlnet",
    "upscale_models",
    "clip",
    "unet",
    "diffusion_models",
];

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Registration {
    pub runner: RunnerId,
    pub pool: PoolName,
    pub labels: BTreeMap<String, String>,
    pub slots: usize,
    pub busy: usize,
    /// Set on a burst runner: it pulls only while this many wait unpulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_min_pending: Option<usize>,
    /// Its rank under the `prioritized` policy (0 is served first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_priority: Option<u8>,
    pub comfyui_version: Option<String>,
    pub node_types: Vec<String>,
    pub models: BTreeMap<String, Vec<String>>,
    pub vram_free: Option<u64>,
    pub ready: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl Registration {
    /// Asks ComfyUI what it can run.
    pub async fn discover(
        comfy: &ComfyClient,
        runner: RunnerId,
        pool: PoolName,
        labels: BTreeMap<String, String>,
        slots: usize,
    ) -> Self {
        let mut registration = Self {
            runner,
            pool,
            labels,
            slots,
            busy: 0,
            burst_min_pending: None,
            dispatch_priority: None,
            comfyui_version: None,
            node_types: Vec::new(),
            models: BTreeMap::new(),
            vram_free: None,
            ready: true,
            updated_at: OffsetDateTime::now_utc(),
        };
        registration.discover_capabilities(comfy).await;
        registration.refresh_stats(comfy, true).await;
        registration
    }

    /// Node types and models; a list ComfyUI cannot give now keeps its
    /// last known value.
    async fn discover_capabilities(&mut self, comfy: &ComfyClient) {
        match comfy.object_info().await {
            Ok(info) => self.node_types = info.class_names().map(str::to_owned).collect(),
            Err(error) => tracing::warn!(%error, "cannot list ComfyUI's node types"),
        }
        for folder in MODEL_FOLDERS {
            if let Ok(files) = comfy.models(folder).await {
                self.models.insert(folder.to_owned(), files);
            }
        }
    }

    /// `up` is the supervisor's view (always true when attached): a managed
    /// ComfyUI that died is not ready, whatever its port answers meanwhile.
    async fn refresh_stats(&mut self, comfy: &ComfyClient, up: bool) {
        if !up {
            self.ready = false;
            return;
        }
        match comfy.system_stats().await {
            Ok(stats) => {
                self.ready = true;
                self.comfyui_version = stats.system.comfyui_version.clone();
                self.vram_free = stats.devices.iter().map(|d| d.vram_free).max().flatten();
            }
            Err(_) => self.ready = false,
        }
    }
}

/// How long a change of held jobs waits for more before `busy` is written.
const BUSY_SETTLE: Duration = Duration::from_millis(20);

/// Keeps the registration fresh until `shutdown`, then removes it. A change
/// of `health` is written at once, so the scheduler stops counting a dead
/// ComfyUI's slots within milliseconds, not at the next refresh.
pub async fn maintain(
    kv: kv::Store,
    comfy: ComfyClient,
    mut registration: Registration,
    held: HeldJobs,
    mut health: ComfyHealth,
    every: Duration,
    shutdown: CancellationToken,
) {
    let key = registration.runner.to_string();
    let mut interval = tokio::time::interval(every);
    let mut generation = health.state().generation;
    let mut written_busy = None;
    loop {
        // A change of held jobs only updates `busy` (no ComfyUI round trip).
        let ask_comfyui = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => true,
            _ = health.changed() => true,
            _ = held.changed() => false,
        };
        if !ask_comfyui {
            // Jobs come and go in bursts (one ends, the next is pulled at
            // once): one write for the burst, none if `busy` is back where it
            // was. Every copy goes to each watcher, capabilities included.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(BUSY_SETTLE) => {}
            }
            if written_busy == Some(held.len()) {
                continue;
            }
        }
        registration.busy = held.len();
        if ask_comfyui {
            let state = health.state();
            if state.ready && state.generation != generation {
                // A relaunched ComfyUI may have other custom nodes or models.
                registration.discover_capabilities(&comfy).await;
                generation = state.generation;
            }
            registration.refresh_stats(&comfy, state.ready).await;
        }
        registration.updated_at = OffsetDateTime::now_utc();
        metrics::gauge!("comfyq_runner_busy_slots").set(registration.busy as f64);
        metrics::gauge!("comfyq_runner_ready").set(f64::from(u8::from(registration.ready)));
        if let Ok(value) = serde_json::to_vec(&registration) {
            match kv.put(&key, value.into()).await {
                Ok(_) => written_busy = Some(registration.busy),
                Err(error) => tracing::warn!(%error, "registration not refreshed"),
            }
        }
    }
    let _ = kv.delete(&key).await;
}
