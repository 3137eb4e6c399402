//! A ComfyUI API-format workflow, parsed once at the edge (ingress) into a
//! typed value every service reads the same way: node id → node
//! (`class_type`, `inputs`, anything else kept as it came), where an input
//! is a link (`[node_id, output_index]`) or a literal. On the wire it is the
//! same JSON object ComfyUI takes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One node: its type, its inputs, and whatever else the client sent
/// (`_meta`, for instance), kept for ComfyUI.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub class_type: String,
    #[serde(default)]
    pub inputs: Map<String, Value>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// An input of a node, as ComfyUI reads it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Input<'a> {
    /// The output `output` of node `node`.
    Link { node: &'a str, output: u64 },
    /// A value: a number, a string (prompt text, a file name…), …
    Literal(&'a Value),
}

impl<'a> Input<'a> {
    pub fn of(value: &'a Value) -> Self {
        match value.as_array().map(Vec::as_slice) {
            Some([Value::String(node), Value::Number(output)]) if output.as_u64().is_some() => {
                Input::Link {
                    node,
                    output: output.as_u64().unwrap_or_default(),
                }
            }
            _ => Input::Literal(value),
        }
    }
}

/// Node id → node. Ordered by id (as ComfyUI's JSON maps are here).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Workflow(BTreeMap<String, Node>);

/// What is wrong with a workflow, at a JSON pointer below `/workflow`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub pointer: String,
    pub message: String,
}

impl Workflow {
    /// Parses and checks an API-format workflow: an object of nodes, each
    /// with a non-empty `class_type` and an `inputs` object, at most
    /// `max_nodes` of them, links to nodes that exist with integer output
    /// indexes, and no cycles. Every problem found is reported, each at its
    /// JSON pointer.
    pub fn parse(value: Value, max_nodes: usize) -> Result<Self, Vec<Problem>> {
        let mut problems: Vec<Problem> = Vec::new();
        let fail = |problems: &mut Vec<Problem>, pointer: String, message: String| {
            problems.push(Problem { pointer, message })
        };
        let Value::Object(nodes) = value else {
            fail(
                &mut problems,
                "/workflow".to_owned(),
                "must be an object of node id → {class_type, inputs}".to_owned(),
            );
            return Err(problems);
        };
        if nodes.is_empty() {
            fail(
                &mut problems,
                "/workflow".to_owned(),
                "has no nodes".to_owned(),
            );
            return Err(problems);
        }
        if nodes.len() > max_nodes {
            fail(
                &mut problems,
                "/workflow".to_owned(),
                format!("has {} nodes; at most {max_nodes} allowed", nodes.len()),
            );
            return Err(problems);
        }
        let mut parsed = BTreeMap::new();
        for (id, node) in &nodes {
            let pointer = format!("/workflow/{}", escape_pointer(id));
            let Value::Object(node) = node else {
                fail(
                    &mut problems,
                    pointer,
                    "must be an object with class_type and inputs".to_owned(),
                );
                continue;
            };
            let mut rest = node.clone();
            let class_type = match rest.remove("class_type") {
                Some(Value::String(s)) if !s.is_empty() => Some(s),
                _ => {
                    fail(
                        &mut problems,
                        format!("{pointer}/class_type"),
                        "must be a non-empty string".to_owned(),
                    );
                    None
                }
            };
            let inputs = match rest.remove("inputs") {
                Some(Value::Object(inputs)) => inputs,
                _ => {
                    fail(
                        &mut problems,
                        format!("{pointer}/inputs"),
                        "must be an object".to_owned(),
                    );
                    continue;
                }
            };
            for (name, value) in &inputs {
                if let Some([Value::String(target), index]) = value.as_array().map(Vec::as_slice) {
                    let input_pointer = format!("{pointer}/inputs/{}", escape_pointer(name));
                    if !nodes.contains_key(target) {
                        fail(
                            &mut problems,
                            input_pointer,
                            format!("links to node {target:?}, which does not exist"),
                        );
                    } else if index.as_u64().is_none() {
                        fail(
                            &mut problems,
                            input_pointer,
                            "link output index must be a non-negative integer".to_owned(),
                        );
                    }
                }
            }
            if let Some(class_type) = class_type {
                parsed.insert(
                    id.clone(),
                    Node {
                        class_type,
                        inputs,
                        rest,
                    },
                );
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let workflow = Workflow(parsed);
        if let Some(node) = workflow.find_cycle() {
            fail(
                &mut problems,
                "/workflow".to_owned(),
                format!("has a cycle through node {node:?}"),
            );
            return Err(problems);
        }
        Ok(workflow)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.0.iter().map(|(id, node)| (id.as_str(), node))
    }

    /// The type of node `id`.
    pub fn class_of(&self, id: &str) -> Option<&str> {
        self.0.get(id).map(|node| node.class_type.as_str())
    }

    /// Every node type it uses.
    pub fn node_types(&self) -> BTreeSet<&str> {
        self.0.values().map(|n| n.class_type.as_str()).collect()
    }

    /// Every node's inputs, as `(node id, node, input name, input)`.
    pub fn inputs(&self) -> impl Iterator<Item = (&str, &Node, &str, Input<'_>)> {
        self.0.iter().flat_map(|(id, node)| {
            node.inputs
                .iter()
                .map(move |(name, value)| (id.as_str(), node, name.as_str(), Input::of(value)))
        })
    }

    /// Every literal string among the inputs: where a loader node names a file.
    pub fn literal_strings(&self) -> HashSet<&str> {
        self.inputs()
            .filter_map(|(_, _, _, input)| match input {
                Input::Literal(Value::String(s)) => Some(s.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Replaces every literal string input found in `references` (input
    /// file names → where they were uploaded); links are left alone.
    pub fn rewrite_literals(&mut self, references: &HashMap<String, String>) {
        for node in self.0.values_mut() {
            for value in node.inputs.values_mut() {
                if let Some(reference) = value.as_str().and_then(|s| references.get(s)) {
                    *value = Value::String(reference.clone());
                }
            }
        }
    }

    /// Points every literal `filename_prefix` into `folder`, so the files
    /// nodes save land there.
    pub fn prefix_outputs(&mut self, folder: &str) {
        for node in self.0.values_mut() {
            if let Some(prefix) = node.inputs.get_mut("filename_prefix")
                && let Some(original) = prefix.as_str()
            {
                *prefix = Value::String(format!("{folder}/{original}"));
            }
        }
    }

    /// The node graph's first cycle, if any (a node on it).
    fn find_cycle(&self) -> Option<&str> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Active,
            Done,
        }
        let edges: HashMap<&str, Vec<&str>> = self
            .0
            .iter()
            .map(|(id, node)| {
                let targets = node
                    .inputs
                    .values()
                    .filter_map(|v| match Input::of(v) {
                        Input::Link { node, .. } => Some(node),
                        Input::Literal(_) => None,
                    })
                    .collect();
                (id.as_str(), targets)
            })
            .collect();
        let mut marks: HashMap<&str, Mark> = HashMap::new();
        for start in self.0.keys().map(String::as_str) {
            if marks.contains_key(start) {
                continue;
            }
            // Iterative depth-first search: workflows can be deep.
            let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
            marks.insert(start, Mark::Active);
            while let Some((node, next)) = stack.pop() {
                let targets = edges.get(node).map(Vec::as_slice).unwrap_or_default();
                if let Some(&target) = targets.get(next) {
                    stack.push((node, next + 1));
                    match marks.get(target) {
                        Some(Mark::Active) => return Some(target),
                        Some(Mark::Done) => {}
                        None => {
                            marks.insert(target, Mark::Active);
                            stack.push((target, 0));
                        }
                    }
                } else {
                    marks.insert(node, Mark::Done);
                }
            }
        }
        None
    }
}

/// RFC 6901 escaping of one reference token.
pub fn escape_pointer(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems(value: Value) -> Vec<Problem> {
        Workflow::parse(value, 100).expect_err("invalid")
    }

    #[test]
    fn shape_links_and_cycles_are_checked_at_their_pointers() {
        assert_eq!(problems(json!({}))[0].pointer, "/workflow");
        assert_eq!(problems(json!([]))[0].pointer, "/workflow");
        let missing = problems(json!({"1": {"class_type": "A", "inputs": {"x": ["9", 0]}}}));
        assert_eq!(missing[0].pointer, "/workflow/1/inputs/x");
        let cycle = problems(json!({
            "1": {"class_type": "A", "inputs": {"x": ["2", 0]}},
            "2": {"class_type": "B", "inputs": {"y": ["1", 0]}}
        }));
        assert!(cycle[0].message.contains("cycle"), "{cycle:?}");
        assert_eq!(
            problems(json!({"a/b": {"inputs": {}}}))[0].pointer,
            "/workflow/a~1b/class_type"
        );
        assert_eq!(
            Workflow::parse(json!({"1": {"class_type": "A", "inputs": {}}, "2": {"class_type": "A", "inputs": {}}}), 1)
                .expect_err("too many")[0]
                .message,
            "has 2 nodes; at most 1 allowed"
        );
    }

    #[test]
    fn it_round_trips_as_comfyuis_json_and_rewrites_literals_not_links() {
        let raw = json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}, "_meta": {"title": "in"}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "out/x"}}
        });
        let mut workflow = Workflow::parse(raw.clone(), 100).expect("valid");
        assert_eq!(serde_json::to_value(&workflow).expect("json"), raw);
        assert_eq!(
            workflow.node_types(),
            BTreeSet::from(["ImageInvert", "LoadImage", "SaveImage"])
        );
        assert_eq!(
            workflow.literal_strings(),
            HashSet::from(["photo.png", "out/x"])
        );
        workflow.rewrite_literals(&HashMap::from([(
            "photo.png".to_owned(),
            "comfyq-j/photo.png".to_owned(),
        )]));
        workflow.prefix_outputs("comfyq-j");
        let value = serde_json::to_value(&workflow).expect("json");
        assert_eq!(value["1"]["inputs"]["image"], "comfyq-j/photo.png");
        assert_eq!(value["2"]["inputs"]["image"], json!(["1", 0]));
        assert_eq!(value["3"]["inputs"]["filename_prefix"], "comfyq-j/out/x");
        assert_eq!(value["1"]["_meta"]["title"], "in");
    }
}
