//! `chaos`: the fault suite's load (`comfyq_tests::fault_load`: short jobs at
//! a fixed rate, mixed priorities, two tenants, webhooks on) against a stack
//! whose services run as OS processes of their own (2 ingresses, 2
//! schedulers, `--runners` runners each with its simulator, 2 notifiers,
//! restarted a second after they die), while `comfyq_tests::chaos` kills a
//! random service process every `--every` and/or kills or freezes a NATS
//! node (`--faults services,nats`; NATS faults want `--cluster 3`). It ends
//! with the fault suite's checks and reports what broke, the faults, the
//! longest submit stall and the recovery times.

use std::time::Duration;

use anyhow::bail;
use comfy_sim::SimConfig;
use comfyq_tests::chaos::{self, ChaosPlan};
use comfyq_tests::fault_load::{self, FaultLoad};
use comfyq_tests::service_process::ProcessLauncher;
use comfyq_tests::{ClusterOptions, RunnerTweak, StackOptions, TestStack};
use serde_json::json;

use crate::Options;
use crate::report::Report;

/// How long every accepted job may take to finish after the load stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Which faults `--faults` selects.
fn selected(o: &Options) -> anyhow::Result<(bool, bool)> {
    let (mut services, mut nats) = (false, false);
    for part in o.faults.split(',').map(str::trim) {
        match part {
            "services" => services = true,
            "nats" => nats = true,
            other => bail!("--faults: unknown fault {other:?} (services, nats)"),
        }
    }
    Ok((services, nats))
}

pub(crate) async fn chaos(o: &Options) -> anyhow::Result<Report> {
    if o.url.is_some() {
        bail!("chaos starts its own stack (it kills its processes): --url is not supported");
    }
    let (services, nats) = selected(o)?;
    let runners = o.runners.unwrap_or(3);
    let rate = o.rate.unwrap_or(50.0).round().clamp(1.0, 10_000.0) as u32;
    let duration = o.duration.unwrap_or(Duration::from_secs(60));
    let every = o.every.unwrap_or(Duration::from_secs(3));
    let seed = o.seed.unwrap_or_else(rand::random);
    let dispatch_ack_wait = o
        .dispatch_ack_wait
        .unwrap_or(comfyq_shared::config::NatsConfig::default().dispatch_ack_wait);
    if dispatch_ack_wait < Duration::from_secs(2) {
        bail!("--dispatch-ack-wait must be at least 2s (got {dispatch_ack_wait:?})");
    }
    // One data directory for all simulators, on tmpfs, given to the runners
    // as `comfyui_dir`, so each job's files go after it (see `Target::start_local`).
    let sim_dir = tempfile::Builder::new()
        .prefix("comfyq-loadtest-chaos-sims-")
        .tempdir_in(
            Some(std::path::Path::new("/dev/shm"))
                .filter(|shm| !o.sim_disk && shm.is_dir())
                .unwrap_or(&std::env::temp_dir()),
        )?;
    let comfyui_dir = sim_dir.path().to_path_buf();
    let mut stack = TestStack::start_with(StackOptions {
        processes: Some(ProcessLauncher::this_executable(&[])),
        ingresses: 2,
        schedulers: 2,
        notifiers: 2,
        runners,
        sims: o.sims.unwrap_or(runners),
        runner_slots: o.slots.unwrap_or(8),
        sim: SimConfig {
            data_dir: Some(comfyui_dir.clone()),
            node_delay_ms: 30,
            ..SimConfig::default()
        },
        runner_tweak: Some(RunnerTweak::new(move |runner| {
            runner.comfyui_dir = Some(comfyui_dir.clone());
        })),
        cluster: o
            .cluster
            .filter(|nodes| *nodes > 1)
            .map(|nodes| ClusterOptions {
                nodes: usize::from(nodes),
                ..ClusterOptions::default()
            }),
        configure_ingress: Some(|ingress| ingress.rate_limit_per_s = 0),
        dispatch_ack_wait,
        ..StackOptions::default()
    })
    .await;
    let plan = ChaosPlan {
        duration,
        every,
        services,
        nats,
        seed,
    };
    let settings = json!({
        "stack": "service processes (2 ingress, 2 scheduler, 2 notifier, runners each with a simulator)",
        "rate_per_s": rate,
        "duration_s": duration.as_secs_f64(),
        "every_s": every.as_secs_f64(),
        "faults": o.faults,
        "seed": seed,
        "dispatch_ack_wait_s": dispatch_ack_wait.as_secs_f64(),
        "nats_nodes": o.replicas(),
        "runners": runners,
        "slots": o.slots.unwrap_or(8),
        "sim_node_delay_ms": 30,
    });
    let mut report = Report::new("chaos", settings);

    let load = FaultLoad::start(&stack, rate);
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("chaos: faults for {duration:?}, about every {every:?} (seed {seed})");
    let mut faults = chaos::run(&mut stack, &plan).await;
    // The last service restarted, and a little load after it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outcome = load.finish().await;
    eprintln!(
        "chaos: {} faults, {} jobs accepted; waiting for every job",
        faults.len(),
        outcome.accepted.len()
    );
    let verdict = fault_load::examine(&stack, &outcome, DRAIN_TIMEOUT).await;
    let instants: Vec<_> = faults.iter().map(|fault| fault.instant).collect();
    let recovery = fault_load::recovery(&stack, &outcome, &instants);
    for (fault, recovered) in faults.iter_mut().zip(&recovery.after_fault) {
        // NATS faults keep their own figure: until the cluster is healthy.
        if fault.recovered_in_s.is_none() {
            fault.recovered_in_s = recovered.map(|d| d.as_secs_f64());
        }
    }
    let unexpected_exits: Vec<String> = stack
        .processes
        .iter()
        .flat_map(|process| {
            process.unexpected_exits().into_iter().map(|exit| {
                format!(
                    "{} pid {} at {:?}: {}",
                    process.name(),
                    exit.pid,
                    exit.at,
                    exit.status
                )
            })
        })
        .collect();
    let longest_recovery = faults
        .iter()
        .filter_map(|fault| fault.recovered_in_s)
        .fold(0.0, f64::max);

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    report.value("jobs accepted (202)", verdict.accepted as f64, "jobs");
    report.value("jobs completed", verdict.completed as f64, "jobs");
    report.value(
        "LOST (accepted, not completed)",
        verdict.lost.len() as f64,
        "jobs",
    );
    report.value(
        "DUPLICATED (executions beyond attempts)",
        verdict.duplicated.len() as f64,
        "jobs",
    );
    report.value("faults", faults.len() as f64, "faults");
    report.value("jobs retried (attempt > 1)", verdict.retried as f64, "jobs");
    report.value("submissions retried", outcome.retried as f64, "jobs");
    report.value(
        "longest submit stall",
        ms(outcome.longest_submit_stall),
        "ms",
    );
    report.value(
        "longest recovery after a fault",
        longest_recovery * 1000.0,
        "ms",
    );
    report.value(
        "longest time without a completion",
        ms(recovery.longest_completion_gap),
        "ms",
    );
    report.value(
        "longest job (first submit try → webhook)",
        ms(recovery.longest_job_latency),
        "ms",
    );
    report.value(
        "drained in (load end → all terminal)",
        ms(verdict.drained_in),
        "ms",
    );
    report.details = Some(json!({
        "accepted": verdict.accepted,
        "completed": verdict.completed,
        "lost": verdict.lost.len(),
        "duplicated": verdict.duplicated.len(),
        "refused": verdict.refused,
        "faults": faults,
        "longest_submit_stall_ms": ms(outcome.longest_submit_stall),
        "longest_submit_stall_at_s": outcome.longest_stall_at.as_secs_f64(),
        "longest_recovery_ms": longest_recovery * 1000.0,
        "longest_completion_gap_ms": ms(recovery.longest_completion_gap),
        "longest_job_ms": ms(recovery.longest_job_latency),
        "drained_in_ms": ms(verdict.drained_in),
        "evidence": {
            "lost": verdict.lost,
            "stuck": verdict.stuck,
            "queues": verdict.queues,
            "duplicated": verdict.duplicated,
            "webhooks_missing": verdict.webhooks_missing,
            "webhook_ids_split": verdict.webhook_ids_split,
            "not_replayable": verdict.not_replayable,
            "unexpected_exits": unexpected_exits,
            "refusals": outcome.refusals,
            // The services' last words, when something broke.
            "logs": if verdict.is_clean() {
                serde_json::Value::Null
            } else {
                stack
                    .processes
                    .iter()
                    .map(|process| (process.name().to_owned(), process.log_tail(40).into()))
                    .collect::<serde_json::Map<_, _>>()
                    .into()
            },
        },
    }));
    if !verdict.is_clean() {
        report.broken.push(format!(
            "lost {}, duplicated {}, refused {}, webhooks missing {}, webhook ids split {}, not replayable {}",
            verdict.lost.len(),
            verdict.duplicated.len(),
            verdict.refused,
            verdict.webhooks_missing.len(),
            verdict.webhook_ids_split.len(),
            verdict.not_replayable.len()
        ));
    }
    if !unexpected_exits.is_empty() {
        report.note(format!(
            "service processes that exited on their own (restarted): {unexpected_exits:?}"
        ));
    }
    stack.stop().await;
    drop(sim_dir);
    Ok(report)
}
