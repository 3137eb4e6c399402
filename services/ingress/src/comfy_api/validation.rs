//! ComfyUI's validation of `POST /prompt` against the pool's node
//! definitions (the union of its runners' `/object_info`), so an invalid
//! prompt is refused as ComfyUI refuses it, before it becomes a job. The
//! rules are ComfyUI's own ([`comfyq_shared::comfy_validation`]); this
//! module says what the pool knows.

use std::collections::BTreeSet;
use std::sync::Arc;

use comfyq_shared::comfy_validation::{
    Invalid, SELF_VALIDATED_INPUTS, Valid, ValidationEnv, validate_prompt,
};
use serde_json::{Map, Value};

use super::info::Definitions;

/// ComfyUI's suffixes naming the folder of a file input.
const FOLDER_ANNOTATIONS: [&str; 3] = [" [input]", " [output]", " [temp]"];

/// What the pool knows: its node definitions, the input files its
/// ComfyUIs list, and the tenant's uploads the prompt names (copied to the
/// job's inputs, so its runner will have them).
struct PoolNodes<'a> {
    /// Each runner's definitions; the first runner that has a class
    /// describes it.
    runners: &'a [Arc<Definitions>],
    files: BTreeSet<&'a str>,
    uploads: &'a BTreeSet<String>,
}

impl<'a> PoolNodes<'a> {
    fn new(runners: &'a [Arc<Definitions>], uploads: &'a BTreeSet<String>) -> Self {
        let mut files = BTreeSet::new();
        for (class, input) in SELF_VALIDATED_INPUTS {
            for definitions in runners {
                let listed = definitions
                    .get(class)
                    .and_then(|d| d["input"]["required"][input][0].as_array());
                files.extend(listed.into_iter().flatten().filter_map(Value::as_str));
            }
        }
        Self {
            runners,
            files,
            uploads,
        }
    }

    fn definition(&self, class: &str) -> Option<&'a Value> {
        self.runners.iter().find_map(|d| d.get(class))
    }
}

impl ValidationEnv for PoolNodes<'_> {
    fn exists(&self, class: &str) -> bool {
        self.definition(class).is_some()
    }

    fn is_output(&self, class: &str) -> bool {
        self.definition(class)
            .and_then(|d| d.get("output_node"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    fn return_types(&self, class: &str) -> Vec<String> {
        let outputs = self
            .definition(class)
            .and_then(|d| d.get("output"))
            .and_then(Value::as_array);
        outputs
            .into_iter()
            .flatten()
            // An output that is a list of options (a combo) connects to
            // anything, and keeps the slots' positions.
            .map(|t| t.as_str().unwrap_or("*").to_owned())
            .collect()
    }

    /// The first runner's inputs of the class, each combo with the options
    /// of every runner (a model one runner has is a valid choice: the job
    /// is routed to a runner that has it).
    fn input_types(&self, class: &str) -> Map<String, Value> {
        let mut inputs = self
            .definition(class)
            .and_then(|d| d.get("input"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let others = self.runners.iter().filter_map(|d| d.get(class)).skip(1);
        for other in others {
            for (category, specs) in inputs.iter_mut() {
                let Some(specs) = specs.as_object_mut() else {
                    continue;
                };
                for (name, spec) in specs.iter_mut() {
                    let theirs = &other["input"][category][name];
                    if let Some(ours) = combo_options_mut(spec)
                        && let Some(theirs) = combo_options(theirs)
                    {
                        for option in theirs {
                            if !ours.contains(option) {
                                ours.push(option.clone());
                            }
                        }
                    }
                }
            }
        }
        inputs
    }

    fn input_exists(&self, annotated: &str) -> bool {
        let name = FOLDER_ANNOTATIONS
            .iter()
            .find_map(|suffix| annotated.strip_suffix(suffix))
            .unwrap_or(annotated);
        self.uploads.contains(name) || self.files.contains(name)
    }
}

/// The options of a combo input's spec: `[[options...], {...}]`, or
/// `["COMBO", {"options": [...]}]`.
fn combo_options(spec: &Value) -> Option<&Vec<Value>> {
    match spec.get(0)? {
        Value::Array(options) => Some(options),
        Value::String(kind) if kind == "COMBO" => spec.get(1)?.get("options")?.as_array(),
        _ => None,
    }
}

fn combo_options_mut(spec: &mut Value) -> Option<&mut Vec<Value>> {
    let is_v3 = spec.get(0).and_then(Value::as_str) == Some("COMBO");
    if is_v3 {
        spec.get_mut(1)?.get_mut("options")?.as_array_mut()
    } else {
        spec.get_mut(0)?.as_array_mut()
    }
}

/// Validates `prompt` as ComfyUI would: the outputs that can run and the
/// errors of those that cannot, or ComfyUI's refusal.
pub(crate) fn validate(
    prompt: &Value,
    partial_targets: Option<&[String]>,
    runners: &[Arc<Definitions>],
    uploads: &BTreeSet<String>,
) -> Result<Valid, Box<Invalid>> {
    // ComfyUI converts input values as it validates; the prompt sent to
    // the runner stays as the client wrote it (its ComfyUI does the same).
    let mut nodes = prompt.as_object().cloned().unwrap_or_default();
    validate_prompt(
        &mut nodes,
        partial_targets,
        &PoolNodes::new(runners, uploads),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_image_is_present_when_uploaded_or_listed_by_a_runner() {
        let definitions: Definitions = [
            (
                "LoadImage".to_owned(),
                json!({"output": ["IMAGE", "MASK"], "output_node": false,
                    "input": {"required": {"image": [["on_runner.png"], {"image_upload": true}]}}}),
            ),
            (
                "SaveImage".to_owned(),
                json!({"output": [], "output_node": true,
                    "input": {"required": {"images": ["IMAGE", {}]}}}),
            ),
        ]
        .into_iter()
        .collect();
        let definitions = [Arc::new(definitions)];
        let uploads: BTreeSet<String> = ["uploaded.png".to_owned()].into_iter().collect();
        let prompt = |image: &str| {
            json!({
                "1": {"class_type": "LoadImage", "inputs": {"image": image}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}
            })
        };
        for present in ["uploaded.png", "uploaded.png [input]", "on_runner.png"] {
            let valid = validate(&prompt(present), None, &definitions, &uploads);
            assert!(valid.is_ok(), "{present}: {valid:?}");
        }
        let refused = validate(&prompt("elsewhere.png"), None, &definitions, &uploads)
            .expect_err("a file nobody has");
        assert_eq!(
            refused.node_errors["1"]["errors"][0]["details"],
            "image - Invalid image file: elsewhere.png"
        );
    }

    #[test]
    fn a_combo_offers_the_options_of_every_runner() {
        let runner = |models: Value| {
            let definitions: Definitions = [
                (
                    "Loader".to_owned(),
                    json!({"output": ["MODEL"], "output_node": false,
                        "input": {"required": {"name": [models, {}]}}}),
                ),
                (
                    "Use".to_owned(),
                    json!({"output": [], "output_node": true,
                        "input": {"required": {"model": ["MODEL", {}]}}}),
                ),
            ]
            .into_iter()
            .collect();
            Arc::new(definitions)
        };
        let runners = [runner(json!(["a.pth"])), runner(json!(["b.pth", "a.pth"]))];
        let prompt = |name: &str| {
            json!({
                "1": {"class_type": "Loader", "inputs": {"name": name}},
                "2": {"class_type": "Use", "inputs": {"model": ["1", 0]}}
            })
        };
        let none = BTreeSet::new();
        assert!(validate(&prompt("b.pth"), None, &runners, &none).is_ok());
        let refused = validate(&prompt("c.pth"), None, &runners, &none).expect_err("no runner");
        assert_eq!(
            refused.node_errors["1"]["errors"][0]["details"],
            "name: 'c.pth' not in ['a.pth', 'b.pth']"
        );
    }
}
