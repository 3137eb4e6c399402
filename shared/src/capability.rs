//! What a job needs of a runner (node types, model files, labels) and
//! whether a runner's registration offers it. The scheduler uses it to hold
//! or reject jobs no live runner can run; a runner uses it to hand back a
//! job it pulled but cannot run.

use std::collections::{BTreeMap, BTreeSet};

use crate::job::JobSpec;
use crate::workflow::{Input, Workflow};

/// Workflow inputs that name a model file, and the model folders (as the
/// runner registers them) the file may be in. ComfyUI's loaders use these
/// input names; a folder the runner did not list is not checked.
const MODEL_INPUTS: &[(&str, &[&str])] = &[
    ("ckpt_name", &["checkpoints"]),
    ("lora_name", &["loras"]),
    ("vae_name", &["vae"]),
    ("control_net_name", &["controlnet"]),
    ("unet_name", &["unet", "diffusion_models"]),
    ("clip_name", &["clip", "text_encoders"]),
    ("clip_name1", &["clip", "text_encoders"]),
    ("clip_name2", &["clip", "text_encoders"]),
    ("clip_name3", &["clip", "text_encoders"]),
];

/// `model_name` is generic; only these loaders use it for an upscale model.
const UPSCALE_LOADERS: &[&str] = &["UpscaleModelLoader"];
const UPSCALE_FOLDERS: &[&str] = &["upscale_models"];

/// A model file the workflow loads.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ModelRef {
    /// Folders it may be in (aliases).
    pub folders: &'static [&'static str],
    pub file: String,
}

/// What a job needs of the runner that runs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub node_types: BTreeSet<String>,
    pub models: BTreeSet<ModelRef>,
    /// Labels the runner must carry with these values.
    pub labels: BTreeMap<String, String>,
}

impl Needs {
    pub fn of(spec: &JobSpec) -> Self {
        Self::of_workflow(&spec.workflow, &spec.runner_labels)
    }

    /// What `workflow` with `labels` required needs.
    pub fn of_workflow(workflow: &Workflow, labels: &BTreeMap<String, String>) -> Self {
        let mut needs = Needs {
            labels: labels.clone(),
            node_types: workflow
                .node_types()
                .into_iter()
                .map(str::to_owned)
                .collect(),
            ..Needs::default()
        };
        for (_, node, name, input) in workflow.inputs() {
            // Only literal file names count, not links.
            let Input::Literal(serde_json::Value::String(file)) = input else {
                continue;
            };
            let folders = MODEL_INPUTS
                .iter()
                .find(|(input, _)| *input == name)
                .map(|(_, folders)| *folders)
                .or_else(|| {
                    (name == "model_name" && UPSCALE_LOADERS.contains(&node.class_type.as_str()))
                        .then_some(UPSCALE_FOLDERS)
                });
            if let Some(folders) = folders {
                needs.models.insert(ModelRef {
                    folders,
                    file: file.clone(),
                });
            }
        }
        needs
    }
}

/// What a runner offers, from its registration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Offer {
    /// Empty when the runner could not list them: then assumed to have any.
    pub node_types: BTreeSet<String>,
    /// Files per model folder; a folder absent here is not checked.
    pub models: BTreeMap<String, BTreeSet<String>>,
    pub labels: BTreeMap<String, String>,
}

impl Offer {
    pub fn new(
        node_types: &[String],
        models: &BTreeMap<String, Vec<String>>,
        labels: &BTreeMap<String, String>,
    ) -> Self {
        Self {
            node_types: node_types.iter().cloned().collect(),
            models: models
                .iter()
                .map(|(folder, files)| (folder.clone(), files.iter().cloned().collect()))
                .collect(),
            labels: labels.clone(),
        }
    }

    /// The first thing `needs` asks for that this runner lacks, if any.
    pub fn missing(&self, needs: &Needs) -> Option<Missing> {
        if let Some((key, value)) = needs
            .labels
            .iter()
            .find(|(k, v)| self.labels.get(*k) != Some(*v))
        {
            return Some(Missing::Label(format!("{key}={value}")));
        }
        if !self.node_types.is_empty()
            && let Some(missing) = needs
                .node_types
                .iter()
                .find(|t| !self.node_types.contains(*t))
        {
            return Some(Missing::NodeType(missing.clone()));
        }
        needs
            .models
            .iter()
            .find(|model| {
                let listed: Vec<&BTreeSet<String>> = model
                    .folders
                    .iter()
                    .filter_map(|f| self.models.get(*f))
                    .collect();
                !listed.is_empty() && !listed.iter().any(|files| files.contains(&model.file))
            })
            .map(|model| Missing::Model(format!("{}/{}", model.folders[0], model.file)))
    }

    pub fn can_run(&self, needs: &Needs) -> bool {
        self.missing(needs).is_none()
    }
}

/// Something a job needs that a runner lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    Label(String),
    NodeType(String),
    Model(String),
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::Label(l) => write!(f, "label {l}"),
            Missing::NodeType(t) => write!(f, "node type {t}"),
            Missing::Model(m) => write!(f, "model {m}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{JobId, PoolName, TenantId};
    use crate::priority::Priority;
    use time::OffsetDateTime;

    fn spec(workflow: serde_json::Value, labels: &[(&str, &str)]) -> JobSpec {
        JobSpec {
            id: JobId::new(),
            tenant: TenantId::new("t").expect("valid"),
            priority: Priority::Normal,
            pool: PoolName::default(),
            workflow: Workflow::parse(workflow, 100).expect("valid workflow"),
            inputs: vec![],
            webhook: None,
            metadata: None,
            inline_outputs: false,
            timeout_s: 60,
            runner_labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            every_progress_event: false,
            comfy: None,
            created_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_workflow_needs_its_loaders_files_and_the_asked_labels() {
        let job = spec(
            serde_json::json!({
                "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
                "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "x2.pth"}},
                "3": {"class_type": "Other", "inputs": {"model_name": "not-a-file", "ckpt_name": ["1", 0]}}
            }),
            &[("gpu", "a100")],
        );
        let needs = Needs::of(&job);
        let files: Vec<&str> = needs.models.iter().map(|m| m.file.as_str()).collect();
        assert_eq!(files, ["sdxl.safetensors", "x2.pth"]);
        assert_eq!(needs.node_types.len(), 3);

        let models = BTreeMap::from([
            (
                "checkpoints".to_owned(),
                vec!["sdxl.safetensors".to_owned()],
            ),
            ("upscale_models".to_owned(), vec!["x2.pth".to_owned()]),
        ]);
        let a100 = BTreeMap::from([("gpu".to_owned(), "a100".to_owned())]);
        assert!(Offer::new(&[], &models, &a100).can_run(&needs));
        let t4 = BTreeMap::from([("gpu".to_owned(), "t4".to_owned())]);
        assert_eq!(
            Offer::new(&[], &models, &t4).missing(&needs),
            Some(Missing::Label("gpu=a100".to_owned()))
        );
        let fewer = BTreeMap::from([("checkpoints".to_owned(), vec![])]);
        assert_eq!(
            Offer::new(&[], &fewer, &a100).missing(&needs),
            Some(Missing::Model("checkpoints/sdxl.safetensors".to_owned()))
        );
        // Folders the runner did not list are not held against it.
        assert!(Offer::new(&[], &BTreeMap::new(), &a100).can_run(&needs));
    }
}
