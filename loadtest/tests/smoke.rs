//! CI smoke of `comfyq-loadtest`: the `latency` and `throughput` scenarios for
//! 10 s each against the in-process stack, with their baselines. No timing
//! thresholds (CI machines are noisy); a run must work, lose nothing and
//! duplicate nothing.

use std::process::Command;

use serde_json::Value;

fn run(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_comfyq-loadtest"))
        .args(args)
        .arg("--json")
        .output()
        .expect("comfyq-loadtest runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "comfyq-loadtest {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn value(report: &Value, metric: &str) -> f64 {
    report["values"]
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row["metric"] == metric))
        .and_then(|row| row["value"].as_f64())
        .unwrap_or_else(|| panic!("no {metric:?} in {report}"))
}

fn check(report: &Value) {
    assert!(value(report, "jobs accepted (202)") > 0.0, "{report}");
    assert_eq!(
        value(report, "LOST (accepted, not terminal at the end)"),
        0.0,
        "{report}"
    );
    assert_eq!(
        value(report, "duplicate executions (ComfyUI got a job twice)"),
        0.0,
        "{report}"
    );
    assert_eq!(value(report, "jobs failed or cancelled"), 0.0, "{report}");
}

#[test]
fn latency_smoke() {
    // A debug build does not keep up with 100 jobs/s on two busy cores.
    let reports = run(&["latency", "--duration", "10s", "--rate", "20"]);
    let report = &reports[0];
    check(report);
    let rows = report["latencies"].as_array().expect("latency rows");
    for metric in [
        "raw JetStream: publish → work-queue pull",
        "dispatch (accepted → ComfyUI has /prompt)",
        "end to end (submit → completed, SSE)",
        "end to end (submit → outputs in hand)",
        "webhook (completed on NATS → POST received)",
        "direct ComfyUI (POST /prompt, WS, /history, /view)",
    ] {
        assert!(
            rows.iter()
                .any(|row| row["metric"] == metric && row["n"].as_u64() > Some(0)),
            "no {metric:?} in {report}"
        );
    }
}

#[test]
fn throughput_smoke() {
    let reports = run(&["throughput", "--duration", "10s"]);
    let report = &reports[0];
    check(report);
    assert!(value(report, "raw JetStream: pipelined publish → pull → ack") > 0.0);
}
