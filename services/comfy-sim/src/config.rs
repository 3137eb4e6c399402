//! Simulator knobs: timing, previews, output sizes, models and injected failures.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Every knob of the simulator. Deserializes from TOML (all fields optional).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Delay of one step of a sampler-like node (KSampler, ImageUpscaleWithModel).
    pub step_delay_ms: u64,
    /// Overrides the step count of sampler-like nodes (KSampler's `steps` input otherwise,
    /// 4 for ImageUpscaleWithModel). PeerSlowProgress always uses its own inputs.
    pub steps: Option<u32>,
    /// Delay of every other executed (not cached) node.
    pub node_delay_ms: u64,
    /// Send preview frames from sampler-like nodes at every step.
    pub previews: bool,
    /// Format of those previews.
    pub preview_format: PreviewFormat,
    /// Time between start (or restart after a crash) and the socket listening.
    pub startup_delay_ms: u64,
    /// Minimum size of every saved output file; files are padded up to it (streamed to
    /// disk with format-legal padding). 0 keeps the natural size.
    pub output_bytes: u64,
    /// Delay before each `/view` answer starts.
    pub slow_view_ms: u64,
    /// Model files per folder, as `/models/<folder>` lists them.
    pub models: BTreeMap<String, Vec<String>>,
    /// `max_upload_size` announced in the feature flags and enforced on uploads.
    pub max_upload_size: u64,
    /// After an injected `crash_mid_prompt`, come back by itself (after `startup_delay_ms`).
    pub restart_on_crash: bool,
    /// Failures applied to the next executed prompts, one per prompt, in order.
    pub failures: Vec<Failure>,
    /// Directory for input/output/temp files (a fresh temporary directory if unset).
    pub data_dir: Option<PathBuf>,
    /// Where that fresh temporary directory goes (the system's temp dir if
    /// unset): the load test puts it on tmpfs, as a simulator stands in for
    /// another machine whose disk is not the queue's cost.
    pub temp_parent: Option<PathBuf>,
}

impl Default for SimConfig {
    fn default() -> Self {
        let mut models = BTreeMap::new();
        for folder in MODEL_FOLDERS {
            models.insert((*folder).to_owned(), Vec::new());
        }
        models.insert("checkpoints".to_owned(), vec!["sim.safetensors".to_owned()]);
        models.insert(
            "upscale_models".to_owned(),
            vec!["tiny_compact_x2.safetensors".to_owned()],
        );
        Self {
            step_delay_ms: 5,
            steps: None,
            node_delay_ms: 0,
            previews: true,
            preview_format: PreviewFormat::Jpeg,
            startup_delay_ms: 0,
            output_bytes: 0,
            slow_view_ms: 0,
            models,
            max_upload_size: 104_857_600,
            restart_on_crash: true,
            failures: Vec::new(),
            data_dir: None,
            temp_parent: None,
        }
    }
}

/// Model folders of ComfyUI 0.3.64, in the order `/models` lists them.
pub const MODEL_FOLDERS: &[&str] = &[
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
];

/// Image format of preview frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PreviewFormat {
    /// Binary format 1.
    Jpeg,
    /// Binary format 2.
    Png,
}

/// A failure injected into one executed prompt. It strikes when the middle node of those
/// that actually run starts (after its `executing` message).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Failure {
    /// The node raises: `execution_error`, history `status_str: "error"`.
    NodeException {
        /// Python exception type, e.g. `ValueError` or `torch.OutOfMemoryError`.
        exception_type: String,
        /// Exception text (ComfyUI appends a newline, and tips for OOM).
        message: String,
    },
    /// The process dies: sockets dropped, HTTP refused, queue/history/cache lost.
    CrashMidPrompt,
    /// The submitting socket stops receiving anything; the prompt completes.
    SilentWs,
    /// The submitting socket is closed; the prompt keeps running.
    DropWs,
}

impl Failure {
    /// A node raising `ValueError("sim induced failure")`.
    pub fn exception() -> Self {
        Self::NodeException {
            exception_type: "ValueError".to_owned(),
            message: "sim induced failure".to_owned(),
        }
    }

    /// A CUDA out-of-memory error as torch reports it.
    pub fn oom() -> Self {
        Self::NodeException {
            exception_type: "torch.OutOfMemoryError".to_owned(),
            message: "Allocation on device ".to_owned(),
        }
    }
}
