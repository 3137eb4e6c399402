//! Property-based fuzzing of the API from its own OpenAPI document with
//! schemathesis (PyPI; `bash deploy/dev.sh setup` installs the pinned version
//! into `.tools/schemathesis`): no 5xx, every response matches the schema.
//! Skipped, saying why, when schemathesis is not installed.

use std::path::PathBuf;
use std::time::Duration;

use comfyq_tests::stack::{self, invert_workflow};
use comfyq_tests::{StackOptions, TestStack};
use serde_json::json;

fn schemathesis() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SCHEMATHESIS_BIN") {
        return Some(path.into());
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let local = workspace.join(".tools/schemathesis/bin/st");
    local.exists().then_some(local)
}

fn no_rate_limit(config: &mut comfyq_ingress::IngressConfig) {
    config.rate_limit_per_s = 0;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_survives_schemathesis() {
    let Some(st) = schemathesis() else {
        eprintln!(
            "SKIPPED the_api_survives_schemathesis: schemathesis not installed \
             (bash deploy/dev.sh setup, or set SCHEMATHESIS_BIN)"
        );
        return;
    };
    let stack = TestStack::start_with(StackOptions {
        configure_ingress: Some(no_rate_limit),
        ..StackOptions::default()
    })
    .await;
    // A finished job, so reads have something to find.
    let job = stack.submit(json!({"workflow": invert_workflow(8)})).await;
    stack
        .wait_finished(job["id"].as_str().expect("id"), Duration::from_secs(30))
        .await;
    let report = tempfile::tempdir().expect("temp dir");
    let output = tokio::process::Command::new(&st)
        .arg("run")
        .arg(format!("{}/openapi.json", stack.api))
        .args([
            "--header",
            &format!("Authorization: Bearer {}", stack::API_KEY),
        ])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .args(["--phases", "examples,fuzzing"])
        .args(["--max-examples", "10", "--max-time", "20", "--seed", "1"])
        .args(["--workers", "2", "--request-timeout", "10"])
        // Live streams never end by themselves.
        .args(["--exclude-path-regex", "/events$|/ws$"])
        .arg("--no-color")
        .current_dir(report.path())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("schemathesis finishes")
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stack.stop().await;
}
