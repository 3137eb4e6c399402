//! Binary WebSocket frames: `u32 BE event` then the event's payload.

use serde_json::Value;

/// Event 1: a preview image; `format` 1 = JPEG, 2 = PNG.
pub fn preview(format: u32, image: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + image.len());
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&format.to_be_bytes());
    out.extend_from_slice(image);
    out
}

/// Event 3: progress text of a node.
pub fn text(node_id: &str, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + node_id.len() + text.len());
    out.extend_from_slice(&3u32.to_be_bytes());
    out.extend_from_slice(&(node_id.len() as u32).to_be_bytes());
    out.extend_from_slice(node_id.as_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// Event 4: a preview image with its JSON metadata.
pub fn preview_with_metadata(metadata: &Value, image: &[u8]) -> Vec<u8> {
    let meta = serde_json::to_vec(metadata).unwrap_or_default();
    let mut out = Vec::with_capacity(8 + meta.len() + image.len());
    out.extend_from_slice(&4u32.to_be_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(image);
    out
}
