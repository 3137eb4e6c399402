//! The node catalogue: input specs in `/object_info` shape, and what each class outputs.

use std::sync::OnceLock;

use serde_json::{Map, Value, json};

/// Where dynamic combo lists (uploaded files, models) come from when a spec is resolved.
pub(crate) trait ComboSource {
    /// Files of the input directory (names relative to it), sorted.
    fn input_files(&self) -> Vec<String>;
    /// Model files of a folder.
    fn models(&self, folder: &str) -> Vec<String>;
}

fn raw() -> &'static Map<String, Value> {
    static RAW: OnceLock<Map<String, Value>> = OnceLock::new();
    RAW.get_or_init(|| {
        serde_json::from_str(include_str!("catalogue.json"))
            .expect("catalogue.json is valid JSON checked by a unit test")
    })
}

/// Whether the class exists.
pub(crate) fn exists(class: &str) -> bool {
    raw().contains_key(class)
}

/// All class names in catalogue order.
pub(crate) fn classes() -> impl Iterator<Item = &'static String> {
    raw().keys()
}

/// Whether the class is an output node.
pub(crate) fn is_output(class: &str) -> bool {
    raw()
        .get(class)
        .and_then(|c| c.get("output_node"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// RETURN_TYPES of a class.
pub(crate) fn return_types(class: &str) -> Vec<String> {
    raw()
        .get(class)
        .and_then(|c| c.get("output"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

const AUDIO_EXT: &[&str] = &["wav", "mp3", "ogg", "flac", "aiff", "aif", "m4a", "opus"];
const IMAGE_EXT: &[&str] = &["png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff"];

fn ext_of(name: &str) -> String {
    name.rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default()
}

fn resolve_type(t: &Value, src: &dyn ComboSource) -> Value {
    match t.as_str() {
        Some("$input_images") => {
            let files: Vec<String> = src
                .input_files()
                .into_iter()
                .filter(|f| IMAGE_EXT.contains(&ext_of(f).as_str()))
                .collect();
            json!(files)
        }
        Some("$input_audio") => {
            let files: Vec<String> = src
                .input_files()
                .into_iter()
                .filter(|f| AUDIO_EXT.contains(&ext_of(f).as_str()))
                .collect();
            json!(files)
        }
        Some(s) if s.starts_with("$models:") => json!(src.models(&s["$models:".len()..])),
        _ => t.clone(),
    }
}

/// The `INPUT_TYPES()` dict of a class with dynamic lists filled in.
pub(crate) fn input_types(class: &str, src: &dyn ComboSource) -> Map<String, Value> {
    let mut out = Map::new();
    let Some(input) = raw()
        .get(class)
        .and_then(|c| c.get("input"))
        .and_then(Value::as_object)
    else {
        return out;
    };
    for (category, inputs) in input {
        let Some(inputs) = inputs.as_object() else {
            continue;
        };
        let mut resolved = Map::new();
        for (name, spec) in inputs {
            let spec = match spec.as_array() {
                Some(arr) if !arr.is_empty() => {
                    let mut arr = arr.clone();
                    arr[0] = resolve_type(&arr[0], src);
                    Value::Array(arr)
                }
                _ => spec.clone(),
            };
            resolved.insert(name.clone(), spec);
        }
        out.insert(category.clone(), Value::Object(resolved));
    }
    out
}

/// `/object_info/<class>` entry, shaped like ComfyUI's `node_info`.
pub(crate) fn object_info(class: &str, src: &dyn ComboSource) -> Option<Value> {
    let def = raw().get(class)?;
    let input = input_types(class, src);
    let mut order = Map::new();
    for (cat, inputs) in &input {
        if let Some(o) = inputs.as_object() {
            order.insert(cat.clone(), json!(o.keys().collect::<Vec<_>>()));
        }
    }
    let output = def.get("output").cloned().unwrap_or_else(|| json!([]));
    let n = output.as_array().map_or(0, Vec::len);
    let mut info = Map::new();
    info.insert("input".into(), Value::Object(input));
    info.insert("input_order".into(), Value::Object(order));
    info.insert("output".into(), output.clone());
    info.insert("output_is_list".into(), json!(vec![false; n]));
    info.insert(
        "output_name".into(),
        def.get("output_name").cloned().unwrap_or(output),
    );
    info.insert("name".into(), json!(class));
    info.insert(
        "display_name".into(),
        def.get("display_name")
            .cloned()
            .unwrap_or_else(|| json!(class)),
    );
    info.insert(
        "description".into(),
        def.get("description").cloned().unwrap_or_else(|| json!("")),
    );
    info.insert(
        "python_module".into(),
        def.get("python_module")
            .cloned()
            .unwrap_or_else(|| json!("nodes")),
    );
    info.insert(
        "category".into(),
        def.get("category").cloned().unwrap_or_else(|| json!("sd")),
    );
    info.insert("output_node".into(), json!(is_output(class)));
    if let Some(t) = def.get("output_tooltips") {
        info.insert("output_tooltips".into(), t.clone());
    }
    Some(Value::Object(info))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Empty;
    impl ComboSource for Empty {
        fn input_files(&self) -> Vec<String> {
            vec!["a.png".into(), "b.wav".into()]
        }
        fn models(&self, _folder: &str) -> Vec<String> {
            vec!["m.safetensors".into()]
        }
    }

    #[test]
    fn empty_image_matches_the_recorded_object_info() {
        let got = object_info("EmptyImage", &Empty).expect("exists");
        let want: Value = serde_json::from_str(r#"{"input": {"required": {"width": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}], "height": ["INT", {"default": 512, "min": 1, "max": 16384, "step": 1}], "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}], "color": ["INT", {"default": 0, "min": 0, "max": 16777215, "step": 1, "display": "color"}]}}, "input_order": {"required": ["width", "height", "batch_size", "color"]}, "output": ["IMAGE"], "output_is_list": [false], "output_name": ["IMAGE"], "name": "EmptyImage", "display_name": "EmptyImage", "description": "", "python_module": "nodes", "category": "image", "output_node": false}"#).expect("json");
        assert_eq!(got, want);
        assert_eq!(
            serde_json::to_string(&got).expect("ser"),
            serde_json::to_string(&want).expect("ser")
        );
    }

    #[test]
    fn combos_are_resolved() {
        let it = input_types("LoadImage", &Empty);
        assert_eq!(it["required"]["image"][0], json!(["a.png"]));
        let it = input_types("LoadAudio", &Empty);
        assert_eq!(it["required"]["audio"][0], json!(["b.wav"]));
        assert!(classes().count() > 20);
    }
}
