//! ComfyUI's `POST /prompt` validation (`validate_prompt`/`validate_inputs` of
//! its execution.py): same error types, messages, details and `node_errors`
//! bookkeeping. Used by the simulator and by ingress's ComfyUI API.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use crate::pyfmt::{py_repr, py_str, py_type};

/// What validation knows of the node classes (ComfyUI's `/object_info`) and
/// of the input files.
pub trait ValidationEnv {
    /// Whether the class exists.
    fn exists(&self, class: &str) -> bool;
    /// Whether the class is an output node.
    fn is_output(&self, class: &str) -> bool;
    /// The class's `RETURN_TYPES`.
    fn return_types(&self, class: &str) -> Vec<String>;
    /// The class's `INPUT_TYPES()` (`required`, `optional`), lists filled in.
    fn input_types(&self, class: &str) -> Map<String, Value>;
    /// Whether an (optionally annotated, `name [input]`) input file exists.
    fn input_exists(&self, annotated: &str) -> bool;
}

/// Inputs that ComfyUI's core nodes check themselves (`VALIDATE_INPUTS`):
/// the file must exist, whatever the combo list says.
pub const SELF_VALIDATED_INPUTS: [(&str, &str); 2] =
    [("LoadImage", "image"), ("LoadAudio", "audio")];

/// The class's inputs in [`SELF_VALIDATED_INPUTS`].
pub fn self_validated_inputs(class: &str) -> Vec<&'static str> {
    SELF_VALIDATED_INPUTS
        .iter()
        .filter(|(c, _)| *c == class)
        .map(|(_, input)| *input)
        .collect()
}

/// A prompt that can run (maybe only some of its outputs).
#[derive(Debug)]
pub struct Valid {
    pub outputs: Vec<String>,
    pub node_errors: Map<String, Value>,
}

/// A rejected prompt: the 400 body parts.
#[derive(Debug)]
pub struct Invalid {
    pub error: Value,
    pub node_errors: Map<String, Value>,
}

fn err(kind: &str, message: &str, details: &str) -> Value {
    json!({"type": kind, "message": message, "details": details, "extra_info": {}})
}

/// Node ids sorted like small Python ints when numeric, else as strings.
pub fn id_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        _ => a.cmp(b),
    }
}

/// A Python exception raised while validating.
struct PyErr {
    kind: &'static str,
    message: String,
}

type Verdict = (bool, Vec<Value>);

struct Validator<'a> {
    prompt: &'a mut Map<String, Value>,
    env: &'a dyn ValidationEnv,
    validated: HashMap<String, Verdict>,
    order: Vec<String>,
}

fn key_repr(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        other => py_repr(other),
    }
}

impl Validator<'_> {
    fn record(&mut self, id: &str, verdict: Verdict) {
        if !self.validated.contains_key(id) {
            self.order.push(id.to_owned());
        }
        self.validated.insert(id.to_owned(), verdict);
    }

    fn validate_inputs(&mut self, id: &str) -> Result<Verdict, PyErr> {
        if let Some(v) = self.validated.get(id) {
            return Ok(v.clone());
        }
        let node = self.prompt.get(id).cloned().unwrap_or(Value::Null);
        let class = node
            .get("class_type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let Some(inputs) = node.get("inputs").and_then(Value::as_object).cloned() else {
            return Err(PyErr {
                kind: "KeyError",
                message: "'inputs'".to_owned(),
            });
        };
        let types = self.env.input_types(&class);
        let custom = self_validated_inputs(&class);
        let mut errors = Vec::new();
        let mut valid = true;
        let mut converted: Vec<(String, Value)> = Vec::new();
        for category in ["required", "optional"] {
            let Some(specs) = types.get(category).and_then(Value::as_object) else {
                continue;
            };
            for (x, spec) in specs {
                let input_type = spec.get(0).cloned().unwrap_or(Value::Null);
                let extra = spec.get(1).cloned().unwrap_or_else(|| json!({}));
                let info = json!([input_type, extra]);
                let Some(val) = inputs.get(x) else {
                    if category == "required" {
                        errors.push(json!({"type": "required_input_missing", "message": "Required input is missing", "details": x, "extra_info": {"input_name": x}}));
                    }
                    continue;
                };
                if let Value::Array(link) = val {
                    if link.len() != 2 {
                        errors.push(json!({"type": "bad_linked_input", "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]", "details": x, "extra_info": {"input_name": x, "input_config": info, "received_value": val}}));
                        continue;
                    }
                    let o_id = match &link[0] {
                        Value::String(s) => s.clone(),
                        other => {
                            return Err(PyErr {
                                kind: "KeyError",
                                message: py_repr(other),
                            });
                        }
                    };
                    let Some(o_class) = self
                        .prompt
                        .get(&o_id)
                        .and_then(|n| n.get("class_type"))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                    else {
                        return Err(PyErr {
                            kind: "KeyError",
                            message: key_repr(&link[0]),
                        });
                    };
                    let returns = self.env.return_types(&o_class);
                    let slot = match &link[1] {
                        Value::Number(n) if n.as_i64().is_some() => n.as_i64().unwrap_or(0),
                        other => {
                            return Err(PyErr {
                                kind: "TypeError",
                                message: format!(
                                    "tuple indices must be integers or slices, not {}",
                                    py_type(other)
                                ),
                            });
                        }
                    };
                    let idx = if slot < 0 {
                        returns.len() as i64 + slot
                    } else {
                        slot
                    };
                    let Some(received) = usize::try_from(idx).ok().and_then(|i| returns.get(i))
                    else {
                        return Err(PyErr {
                            kind: "IndexError",
                            message: "tuple index out of range".to_owned(),
                        });
                    };
                    if !types_match(received, &input_type) {
                        let details = format!(
                            "{x}, received_type({received}) mismatch input_type({})",
                            py_str(&input_type)
                        );
                        errors.push(json!({"type": "return_type_mismatch", "message": "Return type mismatch between linked nodes", "details": details, "extra_info": {"input_name": x, "input_config": info, "received_type": received, "linked_node": val}}));
                        continue;
                    }
                    match self.validate_inputs(&o_id) {
                        Ok((false, _)) => valid = false,
                        Ok(_) => {}
                        Err(e) => {
                            valid = false;
                            let reasons = vec![
                                json!({"type": "exception_during_inner_validation", "message": "Exception when validating inner node", "details": e.message, "extra_info": {"input_name": x, "input_config": info, "exception_message": e.message, "exception_type": e.kind, "traceback": [], "linked_node": val}}),
                            ];
                            self.record(&o_id, (false, reasons));
                        }
                    }
                    continue;
                }
                let mut val = val.clone();
                if let Some(inner) = val.as_object().and_then(|o| o.get("__value__")) {
                    val = inner.clone();
                    converted.push((x.clone(), val.clone()));
                }
                let type_name = input_type.as_str().unwrap_or_default();
                match convert(type_name, &val) {
                    Ok(Some(c)) => {
                        val = c;
                        converted.push((x.clone(), val.clone()));
                    }
                    Ok(None) => {}
                    Err(msg) => {
                        let details = format!("{x}, {}, {msg}", py_str(&val));
                        errors.push(json!({"type": "invalid_input_type", "message": format!("Failed to convert an input value to a {type_name} value"), "details": details, "extra_info": {"input_name": x, "input_config": info, "received_value": val, "exception_message": msg}}));
                        continue;
                    }
                }
                if custom.contains(&x.as_str()) {
                    continue;
                }
                if let (Some(min), Some(v)) =
                    (extra.get("min").and_then(Value::as_f64), as_num(&val))
                    && v < min
                {
                    let message = format!(
                        "Value {} smaller than min of {}",
                        py_str(&val),
                        py_str(&extra["min"])
                    );
                    errors.push(json!({"type": "value_smaller_than_min", "message": message, "details": x, "extra_info": {"input_name": x, "input_config": info, "received_value": val}}));
                    continue;
                }
                if let (Some(max), Some(v)) =
                    (extra.get("max").and_then(Value::as_f64), as_num(&val))
                    && v > max
                {
                    let message = format!(
                        "Value {} bigger than max of {}",
                        py_str(&val),
                        py_str(&extra["max"])
                    );
                    errors.push(json!({"type": "value_bigger_than_max", "message": message, "details": x, "extra_info": {"input_name": x, "input_config": info, "received_value": val}}));
                    continue;
                }
                // A combo is a list of options, or (nodes of ComfyUI's v3
                // schema) `"COMBO"` with its list in `options`.
                let options = match &input_type {
                    Value::String(t) if t == "COMBO" => {
                        extra.get("options").and_then(Value::as_array)
                    }
                    other => other.as_array(),
                };
                if let Some(options) = options
                    && !options.iter().any(|o| py_eq(o, &val))
                {
                    let (list_info, config) = if options.len() > 20 {
                        (format!("(list of length {})", options.len()), Value::Null)
                    } else {
                        (py_repr(&Value::Array(options.clone())), info.clone())
                    };
                    let details = format!("{x}: '{}' not in {list_info}", py_str(&val));
                    errors.push(json!({"type": "value_not_in_list", "message": "Value not in list", "details": details, "extra_info": {"input_name": x, "input_config": config, "received_value": val}}));
                    continue;
                }
            }
        }
        for x in &custom {
            let Some(v) = inputs.get(*x) else { continue };
            if v.is_array() {
                continue;
            }
            let name = py_str(v);
            if !self.env.input_exists(&name) {
                let what = if *x == "image" { "image" } else { "audio" };
                errors.push(json!({"type": "custom_validation_failed", "message": "Custom validation failed for node", "details": format!("{x} - Invalid {what} file: {name}"), "extra_info": {"input_name": x}}));
            }
        }
        if let Some(node_inputs) = self
            .prompt
            .get_mut(id)
            .and_then(|n| n.get_mut("inputs"))
            .and_then(Value::as_object_mut)
        {
            for (k, v) in converted {
                node_inputs.insert(k, v);
            }
        }
        let verdict = (errors.is_empty() && valid, errors);
        self.record(id, verdict.clone());
        Ok(verdict)
    }
}

fn types_match(received: &str, input: &Value) -> bool {
    let Some(input) = input.as_str() else {
        return true;
    };
    if received == "*" || input == "*" || received == input {
        return true;
    }
    let r: Vec<&str> = received.split(',').collect();
    let i: Vec<&str> = input.split(',').collect();
    r.iter().all(|t| i.contains(t))
}

fn as_num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
}

fn py_eq(a: &Value, b: &Value) -> bool {
    match (as_num(a), as_num(b)) {
        (Some(x), Some(y)) if !a.is_string() && !b.is_string() => x == y,
        _ => a == b,
    }
}

/// `int(val)`, `float(val)`, `str(val)`, `bool(val)` as the input type asks.
fn convert(input_type: &str, val: &Value) -> Result<Option<Value>, String> {
    match input_type {
        "INT" => match val {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(None),
            Value::Number(n) => {
                let f = n.as_f64().unwrap_or(0.0);
                if f.is_finite() {
                    Ok(Some(json!(f.trunc() as i64)))
                } else {
                    Err("cannot convert float infinity to integer".to_owned())
                }
            }
            Value::Bool(b) => Ok(Some(json!(i64::from(*b)))),
            Value::String(s) => s
                .trim()
                .replace('_', "")
                .parse::<i64>()
                .map(|i| Some(json!(i)))
                .map_err(|_| format!("invalid literal for int() with base 10: {}", py_repr(val))),
            other => Err(format!(
                "int() argument must be a string, a bytes-like object or a real number, not '{}'",
                py_type(other)
            )),
        },
        "FLOAT" => match val {
            Value::Number(n) if n.is_f64() => Ok(None),
            Value::Number(n) => Ok(Some(json!(n.as_f64().unwrap_or(0.0)))),
            Value::Bool(b) => Ok(Some(json!(f64::from(u8::from(*b))))),
            Value::String(s) => s
                .trim()
                .parse::<f64>()
                .map(|f| Some(json!(f)))
                .map_err(|_| format!("could not convert string to float: {}", py_repr(val))),
            other => Err(format!(
                "float() argument must be a string or a real number, not '{}'",
                py_type(other)
            )),
        },
        "STRING" => match val {
            Value::String(_) => Ok(None),
            other => Ok(Some(json!(py_str(other)))),
        },
        "BOOLEAN" => match val {
            Value::Bool(_) => Ok(None),
            Value::Null => Ok(Some(json!(false))),
            Value::Number(n) => Ok(Some(json!(n.as_f64().unwrap_or(0.0) != 0.0))),
            Value::String(s) => Ok(Some(json!(!s.is_empty()))),
            Value::Array(a) => Ok(Some(json!(!a.is_empty()))),
            Value::Object(o) => Ok(Some(json!(!o.is_empty()))),
        },
        _ => Ok(None),
    }
}

/// Validates (and, like ComfyUI, normalizes the input values of) a prompt.
pub fn validate_prompt(
    prompt: &mut Map<String, Value>,
    partial: Option<&[String]>,
    env: &dyn ValidationEnv,
) -> Result<Valid, Box<Invalid>> {
    let mut outputs = Vec::new();
    for (id, node) in prompt.iter() {
        let Some(class) = node.get("class_type") else {
            return Err(Box::new(Invalid {
                error: err(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    &format!("Node ID '#{id}'"),
                ),
                node_errors: Map::new(),
            }));
        };
        let class = py_str(class);
        if !env.exists(&class) {
            return Err(Box::new(Invalid {
                error: err(
                    "invalid_prompt",
                    &format!("Cannot execute because node {class} does not exist."),
                    &format!("Node ID '#{id}'"),
                ),
                node_errors: Map::new(),
            }));
        }
        if env.is_output(&class) && partial.is_none_or(|p| p.iter().any(|x| x == id)) {
            outputs.push(id.clone());
        }
    }
    if outputs.is_empty() {
        return Err(Box::new(Invalid {
            error: err("prompt_no_outputs", "Prompt has no outputs", ""),
            node_errors: Map::new(),
        }));
    }
    outputs.sort_by(|a, b| id_order(a, b));

    let mut v = Validator {
        prompt,
        env,
        validated: HashMap::new(),
        order: Vec::new(),
    };
    let mut good = Vec::new();
    let mut failed: Vec<Vec<Value>> = Vec::new();
    let mut node_errors = Map::new();
    for o in &outputs {
        let (ok, reasons) = match v.validate_inputs(o) {
            Ok(verdict) => verdict,
            Err(e) => {
                let reasons = vec![
                    json!({"type": "exception_during_validation", "message": "Exception when validating node", "details": e.message, "extra_info": {"exception_type": e.kind, "traceback": []}}),
                ];
                v.record(o, (false, reasons.clone()));
                (false, reasons)
            }
        };
        if ok {
            good.push(o.clone());
            continue;
        }
        failed.push(reasons);
        for id in &v.order {
            let Some((valid, reasons)) = v.validated.get(id) else {
                continue;
            };
            if *valid || reasons.is_empty() {
                continue;
            }
            let entry = node_errors.entry(id.clone()).or_insert_with(|| {
                let class = v
                    .prompt
                    .get(id)
                    .and_then(|n| n.get("class_type"))
                    .cloned()
                    .unwrap_or(Value::Null);
                json!({"errors": reasons, "dependent_outputs": [], "class_type": class})
            });
            if let Some(deps) = entry
                .get_mut("dependent_outputs")
                .and_then(Value::as_array_mut)
            {
                deps.push(json!(o));
            }
        }
    }
    if good.is_empty() {
        let lines: Vec<String> = failed
            .iter()
            .flatten()
            .map(|e| format!("{}: {}", py_str(&e["message"]), py_str(&e["details"])))
            .collect();
        return Err(Box::new(Invalid {
            error: err(
                "prompt_outputs_failed_validation",
                "Prompt outputs failed validation",
                &lines.join("\n"),
            ),
            node_errors,
        }));
    }
    Ok(Valid {
        outputs: good,
        node_errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A catalogue of four classes, as `/object_info` describes them.
    struct Catalogue(Value);

    impl ValidationEnv for Catalogue {
        fn exists(&self, class: &str) -> bool {
            self.0.get(class).is_some()
        }
        fn is_output(&self, class: &str) -> bool {
            self.0[class]["output_node"] == true
        }
        fn return_types(&self, class: &str) -> Vec<String> {
            self.0[class]["output"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        }
        fn input_types(&self, class: &str) -> Map<String, Value> {
            self.0[class]["input"]
                .as_object()
                .cloned()
                .unwrap_or_default()
        }
        fn input_exists(&self, _annotated: &str) -> bool {
            false
        }
    }

    fn catalogue() -> Catalogue {
        Catalogue(json!({
            "Make": {"output": ["IMAGE"], "input": {"required": {
                "width": ["INT", {"min": 1, "max": 10}], "mode": [["a", "b"], {}]}}},
            "Pass": {"output": ["IMAGE"], "input": {"required": {"image": ["IMAGE", {}]}}},
            "Modern": {"output": ["IMAGE"], "input": {"required": {
                "mode": ["COMBO", {"options": ["x", "y"]}]}}},
            "Save": {"output": [], "output_node": true, "input": {"required": {"images": ["IMAGE", {}]}}},
        }))
    }

    fn invalid(prompt: Value) -> Invalid {
        let mut nodes = prompt.as_object().cloned().unwrap_or_default();
        match validate_prompt(&mut nodes, None, &catalogue()) {
            Ok(valid) => panic!("accepted: {valid:?}"),
            Err(invalid) => *invalid,
        }
    }

    #[test]
    fn a_link_to_a_missing_node_fails_the_inner_node() {
        let refused = invalid(json!({
            "1": {"class_type": "Pass", "inputs": {"image": ["9", 0]}},
            "2": {"class_type": "Save", "inputs": {"images": ["1", 0]}}
        }));
        assert_eq!(refused.error["details"], "");
        let node = &refused.node_errors["1"];
        assert_eq!(node["dependent_outputs"], json!(["2"]));
        let error = &node["errors"][0];
        assert_eq!(error["type"], "exception_during_inner_validation");
        assert_eq!(error["details"], "'9'");
        assert_eq!(error["extra_info"]["exception_type"], "KeyError");
        assert_eq!(error["extra_info"]["linked_node"], json!(["1", 0]));
    }

    #[test]
    fn a_bad_output_index_fails_the_output_node() {
        let refused = invalid(json!({
            "1": {"class_type": "Make", "inputs": {"width": 2, "mode": "a"}},
            "2": {"class_type": "Save", "inputs": {"images": ["1", 3]}}
        }));
        assert_eq!(
            refused.error["details"],
            "Exception when validating node: tuple index out of range"
        );
        let error = &refused.node_errors["2"]["errors"][0];
        assert_eq!(error["type"], "exception_during_validation");
        assert_eq!(error["extra_info"]["exception_type"], "IndexError");
    }

    #[test]
    fn values_are_converted_then_bounded_and_combos_listed() {
        let refused = invalid(json!({
            "1": {"class_type": "Make", "inputs": {"width": 11.5, "mode": "c"}},
            "2": {"class_type": "Modern", "inputs": {"mode": "z"}},
            "3": {"class_type": "Save", "inputs": {"images": ["1", 0]}},
            "4": {"class_type": "Save", "inputs": {"images": ["2", 0]}}
        }));
        // (ComfyUI checks a node's inputs in the order of a Python set.)
        let messages = |id: &str| -> Vec<String> {
            let mut texts: Vec<String> = refused.node_errors[id]["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| format!("{}: {}", py_str(&e["message"]), py_str(&e["details"])))
                .collect();
            texts.sort();
            texts
        };
        assert_eq!(
            messages("1"),
            [
                "Value 11 bigger than max of 10: width",
                "Value not in list: mode: 'c' not in ['a', 'b']"
            ]
        );
        assert_eq!(
            messages("2"),
            ["Value not in list: mode: 'z' not in ['x', 'y']"]
        );
        assert_eq!(refused.node_errors["2"]["dependent_outputs"], json!(["4"]));
    }
}
