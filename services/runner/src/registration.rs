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
        let node_types = match comfy.object_info().await {
            Ok(info) => info.class_names().map(str::to_owned).collect(),
            Err(error) => {
                tracing::warn!(%error, "cannot list ComfyUI's node types");
                Vec::new()
            }
        };
        let mut models = BTreeMap::new();
        for folder in MODEL_FOLDERS {
            if let Ok(files) = comfy.models(folder).await {
                models.insert(folder.to_owned(), files);
            }
        }
        let mut registration = Self {
            runner,
            pool,
            labels,
            slots,
            busy: 0,
            burst_min_pending: None,
            comfyui_version: None,
            node_types,
            models,
            vram_free: None,
            ready: true,
            updated_at: OffsetDateTime::now_utc(),
        };
        registration.refresh_stats(comfy).await;
        registration
    }

    async fn refresh_stats(&mut self, comfy: &ComfyClient) {
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

/// Keeps the registration fresh until `shutdown`, then removes it.
pub async fn maintain(
    kv: kv::Store,
    comfy: ComfyClient,
    mut registration: Registration,
    held: HeldJobs,
    every: Duration,
    shutdown: CancellationToken,
) {
    let key = registration.runner.to_string();
    let mut interval = tokio::time::interval(every);
    loop {
        // A change of held jobs only updates `busy` (no ComfyUI round trip).
        let periodic = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => true,
            _ = held.changed() => false,
        };
        registration.busy = held.len();
        if periodic {
            registration.refresh_stats(&comfy).await;
        }
        registration.updated_at = OffsetDateTime::now_utc();
        metrics::gauge!("comfyq_runner_busy_slots").set(registration.busy as f64);
        if let Ok(value) = serde_json::to_vec(&registration)
            && let Err(error) = kv.put(&key, value.into()).await
        {
            tracing::warn!(%error, "registration not refreshed");
        }
    }
    let _ = kv.delete(&key).await;
}
