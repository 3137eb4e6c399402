//! The runner's two registry entries ([`comfyq_shared::registry`]): its
//! capabilities (written when they change) and its load (refreshed well
//! inside the bucket's TTL, so a dead runner disappears on its own, and
//! rewritten when readiness changes or the runner fills up or frees its
//! last slot, which is when the dispatcher's routing needs to know).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use comfyq_shared::ids::{PoolName, RunnerId};
use comfyq_shared::provision::CAPABILITIES_REFRESH;
use comfyq_shared::registry::{REGISTRY_VERSION, RunnerCapabilities, RunnerLoad};
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

/// Both entries as this runner last wrote (or will write) them.
#[derive(Clone, Debug, PartialEq)]
pub struct Registration {
    pub capabilities: RunnerCapabilities,
    pub load: RunnerLoad,
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
        let now = OffsetDateTime::now_utc();
        let mut registration = Self {
            capabilities: RunnerCapabilities {
                v: REGISTRY_VERSION,
                runner: runner.clone(),
                pool: pool.clone(),
                labels,
                comfyui_version: None,
                node_types: Vec::new(),
                models: BTreeMap::new(),
                updated_at: now,
            },
            load: RunnerLoad {
                v: REGISTRY_VERSION,
                runner,
                pool,
                slots,
                busy: 0,
                ready: true,
                burst_min_pending: None,
                dispatch_priority: None,
                vram_free: None,
                updated_at: now,
            },
        };
        registration.discover_capabilities(comfy).await;
        registration.refresh_stats(comfy, true).await;
        registration
    }

    /// Node types and models; a list ComfyUI cannot give now keeps its
    /// last known value.
    async fn discover_capabilities(&mut self, comfy: &ComfyClient) {
        match comfy.object_info().await {
            Ok(info) => {
                self.capabilities.node_types = info.class_names().map(str::to_owned).collect()
            }
            Err(error) => tracing::warn!(%error, "cannot list ComfyUI's node types"),
        }
        for folder in MODEL_FOLDERS {
            if let Ok(files) = comfy.models(folder).await {
                self.capabilities.models.insert(folder.to_owned(), files);
            }
        }
    }

    /// `up` is the supervisor's view (always true when attached): a managed
    /// ComfyUI that died is not ready, whatever its port answers meanwhile.
    async fn refresh_stats(&mut self, comfy: &ComfyClient, up: bool) {
        if !up {
            self.load.ready = false;
            return;
        }
        match comfy.system_stats().await {
            Ok(stats) => {
                self.load.ready = true;
                self.capabilities.comfyui_version = stats.system.comfyui_version.clone();
                self.load.vram_free = stats.devices.iter().map(|d| d.vram_free).max().flatten();
            }
            Err(_) => self.load.ready = false,
        }
    }

    pub fn offer(&self) -> comfyq_shared::capability::Offer {
        self.capabilities.offer()
    }
}

/// Keeps ComfyUI's `GET /object_info` in the media store for the ComfyUI
/// API's `/object_info` (too large for the capabilities entry): written at
/// start and every [`CAPABILITIES_REFRESH`], well within the media's age
/// limit, until `stop`.
pub async fn publish_object_info(
    comfy: ComfyClient,
    media: comfyq_shared::media::MediaStore,
    runner: RunnerId,
    stop: tokio_util::sync::CancellationToken,
) {
    let key = media.runner_key(&runner, comfyq_shared::media::COMFY_OBJECT_INFO_OBJECT);
    loop {
        let wait = match comfy
            .object_info()
            .await
            .map(|info| serde_json::to_vec(&info))
        {
            Ok(Ok(json)) => match media.put(&key, &mut json.as_slice(), 0, None).await {
                Ok(_) => CAPABILITIES_REFRESH,
                Err(error) => {
                    tracing::warn!(%error, "ComfyUI's object_info not stored");
                    Duration::from_secs(30)
                }
            },
            Ok(Err(error)) => {
                tracing::warn!(%error, "ComfyUI's object_info not encoded");
                CAPABILITIES_REFRESH
            }
            Err(error) => {
                tracing::debug!(%error, "ComfyUI's object_info not read yet");
                Duration::from_secs(30)
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// How long a change of held jobs waits for more before it is looked at.
const BUSY_SETTLE: Duration = Duration::from_millis(20);

/// The two buckets a runner registers in.
#[derive(Clone, Debug)]
pub struct Buckets {
    pub load: kv::Store,
    pub capabilities: kv::Store,
}

/// Keeps the registration fresh until `shutdown`, then removes it. A change
/// of `health` is written at once, so the scheduler stops counting a dead
/// ComfyUI's slots within milliseconds, not at the next refresh.
pub async fn maintain(
    buckets: Buckets,
    comfy: ComfyClient,
    mut registration: Registration,
    held: HeldJobs,
    mut health: ComfyHealth,
    every: Duration,
    shutdown: CancellationToken,
) {
    let key = registration.load.runner.to_string();
    let mut interval = tokio::time::interval(every);
    let mut generation = health.state().generation;
    // What the last load write said of free slots, and when the capability
    // entry was last written (and with what).
    let mut written_full: Option<bool> = None;
    let mut capabilities_written: Option<(Instant, RunnerCapabilities)> = None;
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
            // once): look once the burst settled, and write only when the
            // runner turned full or stopped being full.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(BUSY_SETTLE) => {}
            }
            let full = held.len() >= registration.load.slots;
            if written_full == Some(full) {
                continue;
            }
        }
        registration.load.busy = held.len();
        if ask_comfyui {
            let state = health.state();
            if state.ready && state.generation != generation {
                // A relaunched ComfyUI may have other custom nodes or models.
                registration.discover_capabilities(&comfy).await;
                generation = state.generation;
            }
            registration.refresh_stats(&comfy, state.ready).await;
        }
        let now = OffsetDateTime::now_utc();
        let stale_capabilities = capabilities_written.as_ref().is_none_or(|(at, written)| {
            at.elapsed() >= CAPABILITIES_REFRESH
                || RunnerCapabilities {
                    updated_at: written.updated_at,
                    ..registration.capabilities.clone()
                } != *written
        });
        if stale_capabilities {
            registration.capabilities.updated_at = now;
            if let Ok(value) = serde_json::to_vec(&registration.capabilities) {
                match buckets.capabilities.put(&key, value.into()).await {
                    Ok(_) => {
                        capabilities_written =
                            Some((Instant::now(), registration.capabilities.clone()))
                    }
                    Err(error) => tracing::warn!(%error, "capabilities not registered"),
                }
            }
        }
        registration.load.updated_at = now;
        metrics::gauge!("comfyq_runner_busy_slots").set(registration.load.busy as f64);
        metrics::gauge!("comfyq_runner_ready").set(f64::from(u8::from(registration.load.ready)));
        if let Ok(value) = serde_json::to_vec(&registration.load) {
            match buckets.load.put(&key, value.into()).await {
                Ok(_) => written_full = Some(registration.load.busy >= registration.load.slots),
                Err(error) => tracing::warn!(%error, "registration not refreshed"),
            }
        }
    }
    let _ = buckets.load.delete(&key).await;
    let _ = buckets.capabilities.delete(&key).await;
}
