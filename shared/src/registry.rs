//! The runner registry: what each runner can run and how loaded it is, as
//! two entries with one wire format every service shares.
//!
//! - [`RunnerCapabilities`] (bucket `<prefix>_capabilities`): node types,
//!   model files, labels, ComfyUI version. Large, and written only when it
//!   changes (and every [`crate::provision::CAPABILITIES_REFRESH`]).
//! - [`RunnerLoad`] (bucket `<prefix>_runners`, age limit `runner_ttl`):
//!   slots, busy, ready, dispatch preferences. Tiny, refreshed every
//!   `runner_ttl / 3` as the runner's heartbeat, and rewritten when
//!   readiness changes or the runner fills up or frees its last slot.
//!
//! [`Fleet`] joins them: a runner is live while its load entry is fresh.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::capability::Offer;
use crate::ids::{PoolName, RunnerId};

/// Version of both entries; bumped on incompatible change.
pub const REGISTRY_VERSION: u32 = 1;

/// What a runner can run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunnerCapabilities {
    pub v: u32,
    pub runner: RunnerId,
    pub pool: PoolName,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub comfyui_version: Option<String>,
    /// ComfyUI node types; empty when ComfyUI could not list them (then
    /// assumed to have any).
    #[serde(default)]
    pub node_types: Vec<String>,
    /// Files per model folder; a folder not listed is not checked.
    #[serde(default)]
    pub models: BTreeMap<String, Vec<String>>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl RunnerCapabilities {
    pub fn offer(&self) -> Offer {
        Offer::new(&self.node_types, &self.models, &self.labels)
    }
}

/// How loaded a runner is, and how it takes work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunnerLoad {
    pub v: u32,
    pub runner: RunnerId,
    pub pool: PoolName,
    pub slots: usize,
    /// Jobs it holds, as of its last write: exact when it is full (a runner
    /// writes when it fills up and when it frees a slot from full),
    /// otherwise as of its last heartbeat.
    pub busy: usize,
    pub ready: bool,
    /// A burst runner: it pulls only while this many dispatch messages wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_min_pending: Option<usize>,
    /// Its rank under the `prioritized` policy (0 is served first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram_free: Option<u64>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl RunnerLoad {
    /// Whether it has a slot free (by its last write).
    pub fn has_free_slot(&self) -> bool {
        self.ready && self.busy < self.slots
    }
}

/// A runner whose load entry is fresh, with its capabilities if known.
#[derive(Clone, Debug)]
pub struct LiveRunner {
    pub key: String,
    pub load: RunnerLoad,
    pub capabilities: Option<Arc<RunnerCapabilities>>,
    /// What it can run; without a capability entry, anything.
    pub offer: Arc<Offer>,
    /// When its load entry was last written (server time).
    pub seen_at: OffsetDateTime,
}

/// The fleet as two watches see it. Not synchronized: one owner applies
/// entries (or a caller wraps it in a mutex it never holds across awaits).
#[derive(Debug, Default)]
pub struct Fleet {
    loads: HashMap<String, (RunnerLoad, OffsetDateTime)>,
    capabilities: HashMap<String, (Arc<RunnerCapabilities>, Arc<Offer>)>,
}

/// The offer of a runner whose capabilities are not known yet.
fn anything() -> Arc<Offer> {
    static ANYTHING: std::sync::OnceLock<Arc<Offer>> = std::sync::OnceLock::new();
    ANYTHING.get_or_init(|| Arc::new(Offer::default())).clone()
}

impl Fleet {
    /// Applies an entry of the load bucket; returns whether it was readable.
    pub fn apply_load(&mut self, entry: &kv::Entry) -> bool {
        if entry.operation != kv::Operation::Put {
            self.loads.remove(&entry.key);
            return true;
        }
        match serde_json::from_slice::<RunnerLoad>(&entry.value) {
            Ok(load) => {
                self.loads.insert(entry.key.clone(), (load, entry.created));
                true
            }
            Err(error) => {
                tracing::warn!(key = %entry.key, %error, "unreadable runner load entry");
                false
            }
        }
    }

    /// Applies an entry of the capabilities bucket.
    pub fn apply_capabilities(&mut self, entry: &kv::Entry) -> bool {
        if entry.operation != kv::Operation::Put {
            self.capabilities.remove(&entry.key);
            return true;
        }
        match serde_json::from_slice::<RunnerCapabilities>(&entry.value) {
            Ok(capabilities) => {
                let offer = Arc::new(capabilities.offer());
                self.capabilities
                    .insert(entry.key.clone(), (Arc::new(capabilities), offer));
                true
            }
            Err(error) => {
                tracing::warn!(key = %entry.key, %error, "unreadable runner capabilities");
                false
            }
        }
    }

    /// Runners whose load entry was written within `ttl` of `now` (the
    /// bucket's age limit removes entries without telling watchers, so
    /// staleness is judged here), sorted by key.
    pub fn live(&self, ttl: Duration, now: OffsetDateTime) -> Vec<LiveRunner> {
        let mut live: Vec<LiveRunner> = self
            .loads
            .iter()
            .filter(|(_, (_, written))| (now - *written).unsigned_abs() <= ttl)
            .map(|(key, (load, written))| {
                let known = self.capabilities.get(key);
                LiveRunner {
                    key: key.clone(),
                    load: load.clone(),
                    capabilities: known.map(|(c, _)| c.clone()),
                    offer: known.map_or_else(anything, |(_, o)| o.clone()),
                    seen_at: *written,
                }
            })
            .collect();
        live.sort_by(|a, b| a.key.cmp(&b.key));
        live
    }

    /// Forgets load entries older than `ttl`.
    pub fn expire(&mut self, ttl: Duration, now: OffsetDateTime) {
        self.loads
            .retain(|_, (_, written)| (now - *written).unsigned_abs() <= ttl);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_round_trips_and_tolerates_new_fields() {
        let load = RunnerLoad {
            v: REGISTRY_VERSION,
            runner: RunnerId::new("r1").expect("valid"),
            pool: PoolName::default(),
            slots: 2,
            busy: 2,
            ready: true,
            burst_min_pending: None,
            dispatch_priority: Some(0),
            vram_free: None,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        };
        let mut json = serde_json::to_value(&load).expect("serializes");
        json["added_later"] = serde_json::json!(true);
        let back: RunnerLoad = serde_json::from_value(json).expect("parses");
        assert_eq!(back, load);
        assert!(!back.has_free_slot());
    }
}
