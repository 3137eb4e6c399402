//! The jobs a run submits: priority and tenant mix, workflow size, input size,
//! optional slow progress node and webhook.

use bytes::Bytes;
use rand::Rng;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub(crate) struct Mix {
    /// (priority, weight).
    pub(crate) priorities: Vec<(String, u32)>,
    pub(crate) tenants: usize,
    /// Extra bytes of workflow JSON (an unused node input, which ComfyUI ignores).
    pub(crate) workflow_bytes: usize,
    /// Bytes of one input image (multipart file part); 0 = none.
    pub(crate) input: Option<Bytes>,
    /// `PeerSlowProgress` steps and step duration, for progress events.
    pub(crate) progress: Option<(u32, u64)>,
    /// Webhook URL every job carries.
    pub(crate) webhook: Option<String>,
}

/// One job to submit.
#[derive(Debug, Clone)]
pub(crate) struct JobPlan {
    pub(crate) tenant: usize,
    pub(crate) priority: String,
    pub(crate) body: Value,
    pub(crate) input: Option<Bytes>,
}

/// The input file's name in the workflow and the multipart body.
pub(crate) const INPUT_NAME: &str = "input.png";

impl Mix {
    pub(crate) fn plan(&self, index: u64) -> JobPlan {
        let mut rng = rand::rng();
        let total: u32 = self.priorities.iter().map(|(_, w)| *w).sum();
        let mut pick = rng.random_range(0..total.max(1));
        let mut priority = "normal".to_owned();
        for (name, weight) in &self.priorities {
            if pick < *weight {
                priority = name.clone();
                break;
            }
            pick -= weight;
        }
        let tenant = rng.random_range(0..self.tenants.max(1));
        let source = if self.input.is_some() {
            json!({"class_type": "LoadImage", "inputs": {"image": INPUT_NAME}})
        } else {
            // A colour per job, so ComfyUI's cache never serves a job.
            json!({"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": index % 16_777_216}})
        };
        let mut workflow = json!({
            "1": source,
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "loadtest"}}
        });
        if let Some((steps, step_ms)) = self.progress {
            workflow["4"] = json!({"class_type": "PeerSlowProgress", "inputs": {"image": ["1", 0], "steps": steps, "step_ms": step_ms, "send_previews": false, "preview_format": "PNG"}});
            workflow["2"]["inputs"]["image"] = json!(["4", 0]);
        }
        if self.workflow_bytes > 0 {
            workflow["2"]["inputs"]["loadtest_padding"] = json!("x".repeat(self.workflow_bytes));
        }
        let mut body = json!({"workflow": workflow, "priority": priority});
        if let Some(url) = &self.webhook {
            body["webhook"] = json!({"url": url});
        }
        JobPlan {
            tenant,
            priority,
            body,
            input: self.input.clone(),
        }
    }
}

/// A PNG of 8×8 pixels followed by `size` bytes of padding after `IEND`
/// (ComfyUI and the simulator read the header only).
pub(crate) fn png_input(size: usize) -> Bytes {
    // A valid 8×8 greyscale PNG (generated once with zlib).
    const PNG_8X8: [u8; 69] = [
        0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44,
        0x52, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x08, 0x08, 0x00, 0x00, 0x00, 0x00, 0xe1,
        0x64, 0xe1, 0x57, 0x00, 0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x60,
        0xa0, 0x0e, 0x00, 0x00, 0x00, 0x48, 0x00, 0x01, 0x2e, 0xb8, 0x3c, 0x7e, 0x00, 0x00, 0x00,
        0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
    ];
    let mut data = Vec::with_capacity(PNG_8X8.len() + size);
    data.extend_from_slice(&PNG_8X8);
    data.resize(PNG_8X8.len() + size, 0);
    Bytes::from(data)
}
