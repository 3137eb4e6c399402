//! comfyq GPU runner: drives one ComfyUI instance.

pub mod comfy;
