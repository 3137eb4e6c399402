//! Faults at random while a load runs: `kill -9` of service processes (a
//! stack with [`StackOptions::processes`](crate::StackOptions::processes),
//! whose supervisors restart them) and NATS node faults (a node killed and
//! restarted, or frozen and thawed; one node at a time, so an R3 cluster
//! keeps its quorum).
//!
//! Service kills go round by kind (ingress, scheduler, runner, notifier, in
//! a shuffled order each round) and hit a random copy of that kind, so a
//! short run still kills each kind. The seed is part of the plan, so a run
//! can be repeated.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::TestStack;

/// The service kinds, in the order of [`crate::service_process::ServiceConfig`].
const SERVICES: [&str; 4] = ["ingress", "scheduler", "runner", "notifier"];

/// How long a killed NATS node stays down before it is restarted.
const NODE_DOWN: Duration = Duration::from_secs(3);

/// How long a frozen NATS node stays frozen.
const NODE_FROZEN: Duration = Duration::from_secs(10);

/// What to break, how often and for how long.
#[derive(Debug, Clone, Copy)]
pub struct ChaosPlan {
    /// Faults start for this long (the last one may end after it).
    pub duration: Duration,
    /// Mean pause between faults (each pause is 0.5–1.5 times this).
    pub every: Duration,
    /// `kill -9` service processes.
    pub services: bool,
    /// Kill or freeze NATS nodes.
    pub nats: bool,
    pub seed: u64,
}

/// One fault injected.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    /// Seconds since the chaos started.
    pub at_s: f64,
    /// `kill -9`, `kill -9 + restart`, `SIGSTOP + SIGCONT`.
    pub action: &'static str,
    /// `ingress-1`, `runner-0`, a NATS node's name…
    pub target: String,
    /// The service kind, or `nats`.
    pub kind: &'static str,
    /// The killed process.
    pub pid: Option<u32>,
    /// NATS faults: from the fault until the cluster was healthy again.
    /// Service kills: from the kill until the first job submitted after it
    /// completed (filled in by the caller, see [`crate::fault_load::recovery`]).
    pub recovered_in_s: Option<f64>,
    #[serde(skip)]
    pub instant: Instant,
}

/// Runs `plan` against `stack` and returns the faults, in order.
///
/// # Panics
///
/// If a NATS node does not come back.
pub async fn run(stack: &mut TestStack, plan: &ChaosPlan) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let started = Instant::now();
    let mut faults = Vec::new();
    let mut kinds: Vec<&'static str> = Vec::new();
    let can_kill = plan.services && !stack.processes.is_empty();
    while started.elapsed() < plan.duration {
        let pause = plan.every.mul_f64(rng.random_range(0.5..1.5));
        tokio::time::sleep(pause).await;
        if started.elapsed() >= plan.duration {
            break;
        }
        let nats_turn = plan.nats && (!can_kill || rng.random_bool(0.25));
        if nats_turn {
            faults.push(nats_fault(stack, &mut rng, started).await);
            continue;
        }
        if !can_kill {
            break;
        }
        if kinds.is_empty() {
            kinds = SERVICES.to_vec();
            kinds.shuffle(&mut rng);
        }
        let Some(kind) = kinds.pop() else { continue };
        let copies: Vec<usize> = (0..stack.processes.len())
            .filter(|&i| stack.processes[i].service() == kind)
            .collect();
        if copies.is_empty() {
            continue;
        }
        let process = &stack.processes[copies[rng.random_range(0..copies.len())]];
        let instant = Instant::now();
        let pid = process.kill().await;
        faults.push(Fault {
            at_s: instant.duration_since(started).as_secs_f64(),
            action: "kill -9",
            target: process.name().to_owned(),
            kind: process.service(),
            pid,
            recovered_in_s: None,
            instant,
        });
    }
    faults
}

/// Kills (and restarts) or freezes (and thaws) a random node; returns when
/// the cluster is healthy again.
async fn nats_fault(stack: &mut TestStack, rng: &mut StdRng, started: Instant) -> Fault {
    let clustered = stack.nats.is_clustered();
    let index = rng.random_range(0..stack.nats.nodes.len());
    let freeze = clustered && rng.random_bool(0.5);
    let instant = Instant::now();
    let node = &mut stack.nats.nodes[index];
    let target = node.name().to_owned();
    let pid = node.pid();
    if freeze {
        node.freeze();
        tokio::time::sleep(NODE_FROZEN).await;
        node.thaw();
    } else {
        node.stop();
        tokio::time::sleep(NODE_DOWN).await;
        node.restart().await;
    }
    if clustered && let Err(error) = stack.nats.wait_healthy().await {
        panic!("the cluster did not recover from a fault of {target}: {error}");
    }
    Fault {
        at_s: instant.duration_since(started).as_secs_f64(),
        action: if freeze {
            "SIGSTOP + SIGCONT"
        } else {
            "kill -9 + restart"
        },
        target,
        kind: "nats",
        pid,
        recovered_in_s: Some(instant.elapsed().as_secs_f64()),
        instant,
    }
}
