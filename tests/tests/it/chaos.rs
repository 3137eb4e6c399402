//! comfyq with every service in an OS process of its own (2 ingresses behind
//! the load's round-robin, 2 schedulers, 3 runners each with its simulator,
//! 2 notifiers), a random one killed with `kill -9` every ~2 s under the
//! fault suite's load (50 short jobs/s, mixed priorities, two tenants,
//! webhooks on) and restarted a second later, as a supervisor would. It ends
//! with the fault suite's checks (`fault_load::verify`) and prints the faults,
//! the longest submit stall and the recovery times (`--no-capture`). The
//! short form of `comfyq-loadtest chaos`.

use std::time::Duration;

use comfyq_tests::chaos::{self, ChaosPlan};
use comfyq_tests::fault_load::{FaultLoad, recovery, verify};
use comfyq_tests::service_process::{ProcessLauncher, run_if_asked};
use comfyq_tests::{StackOptions, TestStack};

/// Not a test of its own: a service process of the stack below, which
/// starts this binary again with the service's configuration.
#[test]
#[ignore = "a service process, started by the chaos test"]
fn service_as_a_process() {
    if let Some(code) = run_if_asked() {
        std::process::exit(code);
    }
}

/// The arguments that make this test binary a service process.
fn launcher() -> ProcessLauncher {
    ProcessLauncher::this_executable(&[
        "chaos::service_as_a_process",
        "--exact",
        "--ignored",
        "--nocapture",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_random_service_processes_under_load_loses_nothing() {
    let mut stack = TestStack::start_with(StackOptions {
        processes: Some(launcher()),
        ingresses: 2,
        schedulers: 2,
        notifiers: 2,
        runners: 3,
        sims: 3,
        runner_slots: 8,
        // Tens of ms a job (each simulator runs one prompt at a time, as
        // ComfyUI does): a killed runner often holds one.
        sim: comfy_sim::SimConfig {
            node_delay_ms: 30,
            ..comfy_sim::SimConfig::default()
        },
        // 50 jobs/s of two tenants: beyond the default per-tenant rate.
        configure_ingress: Some(|ingress| ingress.rate_limit_per_s = 0),
        ..StackOptions::default()
    })
    .await;
    let load = FaultLoad::start(&stack, 50);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let plan = ChaosPlan {
        duration: Duration::from_secs(24),
        every: Duration::from_secs(2),
        services: true,
        nats: false,
        seed: rand::random(),
    };
    let mut faults = chaos::run(&mut stack, &plan).await;
    // The last one restarted, and a little load after it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outcome = load.finish().await;
    let verdict = verify(&stack, &outcome, Duration::from_secs(120)).await;
    let instants: Vec<_> = faults.iter().map(|fault| fault.instant).collect();
    let recovered = recovery(&stack, &outcome, &instants);
    for (fault, recovered_in) in faults.iter_mut().zip(&recovered.after_fault) {
        fault.recovered_in_s = recovered_in.map(|d| d.as_secs_f64());
    }
    eprintln!(
        "chaos (seed {}): {} faults {:?}\naccepted {} completed {} lost {} duplicated {} \
         retried jobs {} retried submits {} | longest submit stall {:?} (at {:?}) | \
         longest recovery {:?} | longest completion gap {:?} | longest job {:?} | drained in {:?}",
        plan.seed,
        faults.len(),
        faults
            .iter()
            .map(|f| format!(
                "{:.1}s {} {} -> {:?}",
                f.at_s, f.action, f.target, f.recovered_in_s
            ))
            .collect::<Vec<_>>(),
        verdict.accepted,
        verdict.completed,
        verdict.lost.len(),
        verdict.duplicated.len(),
        verdict.retried,
        outcome.retried,
        outcome.longest_submit_stall,
        outcome.longest_stall_at,
        recovered.after_fault.iter().flatten().max(),
        recovered.longest_completion_gap,
        recovered.longest_job_latency,
        verdict.drained_in,
    );
    // Each kind was killed, and nothing exited that was not.
    for kind in ["ingress", "scheduler", "runner", "notifier"] {
        assert!(
            faults.iter().any(|fault| fault.kind == kind),
            "no {kind} killed: {faults:?}"
        );
    }
    assert!(
        recovered.after_fault.iter().all(Option::is_some),
        "a fault after which no job completed: {:?}",
        recovered.after_fault
    );
    stack.assert_services_alive();
    stack.stop().await;
}
