//! `comfyq-runner verify`: can this ComfyUI run that workflow? Lists the
//! node types and models ComfyUI offers, and checks a workflow's node types
//! and the model files its loader inputs name (against `/object_info`'s
//! combo choices, which are the files ComfyUI found on disk).

use std::collections::BTreeMap;
use std::fmt;

use serde_json::Value;

use crate::comfy::{ComfyClient, ComfyError};

/// A workflow node whose class ComfyUI does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingNode {
    pub node_id: String,
    pub class_type: String,
}

/// A model file a workflow names that ComfyUI does not offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingModel {
    pub node_id: String,
    pub class_type: String,
    pub input: String,
    pub file: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct VerifyReport {
    pub comfyui_version: Option<String>,
    pub node_types: usize,
    /// Model files per folder.
    pub models: BTreeMap<String, Vec<String>>,
    /// Whether a workflow was checked.
    pub workflow_checked: bool,
    pub workflow_nodes: usize,
    pub missing_nodes: Vec<MissingNode>,
    pub missing_models: Vec<MissingModel>,
}

impl VerifyReport {
    /// No gap found.
    pub fn ok(&self) -> bool {
        self.missing_nodes.is_empty() && self.missing_models.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("ComfyUI is not reachable: {0}")]
    Unreachable(#[source] ComfyError),
    #[error("the workflow is not usable: {0}")]
    Workflow(String),
}

/// Asks ComfyUI what it has and, given a workflow, what of it is missing.
pub async fn verify(
    comfy: &ComfyClient,
    workflow: Option<&Value>,
) -> Result<VerifyReport, VerifyError> {
    let stats = comfy
        .system_stats()
        .await
        .map_err(VerifyError::Unreachable)?;
    let info = comfy
        .object_info()
        .await
        .map_err(VerifyError::Unreachable)?;
    let mut report = VerifyReport {
        comfyui_version: stats.system.comfyui_version.clone(),
        node_types: info.0.len(),
        ..VerifyReport::default()
    };
    // Older ComfyUIs lack `/models`; the report then just lists none.
    for folder in comfy.model_folders().await.unwrap_or_default() {
        if let Ok(files) = comfy.models(&folder).await {
            report.models.insert(folder, files);
        }
    }
    let Some(workflow) = workflow else {
        return Ok(report);
    };
    let nodes = api_format(workflow)?;
    let model_inputs = info.model_inputs();
    report.workflow_checked = true;
    report.workflow_nodes = nodes.len();
    for (node_id, node) in nodes {
        let Some(class_type) = node.get("class_type").and_then(Value::as_str) else {
            return Err(VerifyError::Workflow(format!(
                "node {node_id} has no class_type"
            )));
        };
        if !info.has_class(class_type) {
            report.missing_nodes.push(MissingNode {
                node_id: node_id.clone(),
                class_type: class_type.to_owned(),
            });
            continue;
        }
        let inputs = node.get("inputs").and_then(Value::as_object);
        for model in model_inputs.iter().filter(|m| m.class_type == class_type) {
            // Links (`["4", 0]`) are resolved at run time: nothing to check.
            let Some(file) = inputs
                .and_then(|inputs| inputs.get(&model.input_name))
                .and_then(Value::as_str)
            else {
                continue;
            };
            if !model.choices.iter().any(|choice| choice == file) {
                report.missing_models.push(MissingModel {
                    node_id: node_id.clone(),
                    class_type: class_type.to_owned(),
                    input: model.input_name.clone(),
                    file: file.to_owned(),
                });
            }
        }
    }
    Ok(report)
}

/// The node map of an API-format workflow, or of a comfyq job body
/// (`{"workflow": {...}}`). The UI's saved format is refused with advice.
fn api_format(workflow: &Value) -> Result<&serde_json::Map<String, Value>, VerifyError> {
    let workflow = match workflow.get("workflow") {
        Some(inner) if inner.is_object() => inner,
        _ => workflow,
    };
    if workflow.get("nodes").is_some_and(Value::is_array) {
        return Err(VerifyError::Workflow(
            "this is ComfyUI's UI format; export it with \"Export (API)\"".to_owned(),
        ));
    }
    workflow
        .as_object()
        .ok_or_else(|| VerifyError::Workflow("expected a JSON object of nodes".to_owned()))
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "ComfyUI {}: {} node types",
            self.comfyui_version
                .as_deref()
                .unwrap_or("(unknown version)"),
            self.node_types
        )?;
        for (folder, files) in &self.models {
            if !files.is_empty() {
                writeln!(f, "  models/{folder}: {}", files.join(", "))?;
            }
        }
        if !self.workflow_checked {
            return Ok(());
        }
        writeln!(f, "workflow: {} nodes", self.workflow_nodes)?;
        for missing in &self.missing_nodes {
            writeln!(
                f,
                "  MISSING node type {} (node {})",
                missing.class_type, missing.node_id
            )?;
        }
        for missing in &self.missing_models {
            writeln!(
                f,
                "  MISSING model {} ({}.{} of node {})",
                missing.file, missing.class_type, missing.input, missing.node_id
            )?;
        }
        if self.ok() {
            writeln!(f, "OK: every node type and model is available")
        } else {
            writeln!(
                f,
                "FAILED: {} node type(s) and {} model(s) missing",
                self.missing_nodes.len(),
                self.missing_models.len()
            )
        }
    }
}
