//! A local JetStream cluster of real nats-server processes for tests and the
//! load test: every node on free 127.0.0.1 ports (client, monitoring,
//! routes), a file store under one temporary directory, its configuration
//! generated from `nats/cluster/n1.conf` ([`comfyq_shared::nats_cluster`]).
//!
//! Nodes are ordinary [`NatsServer`]s, so a test kills (`stop`), restarts,
//! freezes and thaws them one by one; [`NatsCluster`] adds what only a
//! cluster has: health of the whole, the meta leader and stream leaders.
//! A single server is a one-node [`NatsCluster`] too ([`NatsCluster::single`]),
//! so the test stack speaks to either the same way.

use std::time::Duration;

use comfyq_shared::nats_cluster::{self, NodeSpec};
use serde_json::Value;
use tempfile::TempDir;
use tokio::time::Instant;

use crate::nats_server::{NatsServer, READY_TIMEOUT, free_port};

/// Attempts at starting the whole cluster (a free port may be taken between
/// choosing it and the node binding it).
const START_ATTEMPTS: usize = 3;

/// How long a started or restarted cluster may take to elect a meta leader
/// and report every node healthy.
pub const HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of [`NatsCluster::start_with`].
#[derive(Clone, Copy, Debug)]
pub struct ClusterOptions {
    pub nodes: usize,
    /// `sync_interval: always` on every node (see [`NodeSpec::sync_always`]).
    pub sync_always: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            sync_always: false,
        }
    }
}

/// A running local cluster. Dropping it kills every node and removes the
/// stores.
#[derive(Debug)]
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    /// Empty for a single server.
    specs: Vec<NodeSpec>,
    http: reqwest::Client,
    // Last field: removed after the nodes are gone.
    _stores: Option<TempDir>,
}

impl NatsCluster {
    /// A single JetStream server (not clustered), as [`NatsServer::start`].
    pub async fn single() -> NatsCluster {
        NatsCluster {
            nodes: vec![NatsServer::start().await],
            specs: Vec::new(),
            http: reqwest::Client::new(),
            _stores: None,
        }
    }

    /// Whether this is a real cluster (routes, replicated streams).
    pub fn is_clustered(&self) -> bool {
        !self.specs.is_empty()
    }

    /// Replicas for streams on this cluster: one per node, at most 3
    /// (JetStream's maximum that still tolerates one node down).
    pub fn replicas(&self) -> usize {
        self.nodes.len().clamp(1, 3)
    }

    /// Connects a plain client to any node.
    pub async fn client(&self) -> async_nats::Client {
        let urls: Vec<String> = self.urls().split(',').map(str::to_owned).collect();
        async_nats::connect(urls)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.urls()))
    }

    /// Every node's client URL, comma separated (`nats.url`).
    pub fn url(&self) -> String {
        self.urls()
    }

    /// Process ids of the running nodes (for their RSS and CPU time).
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(NatsServer::pid).collect()
    }

    /// Kills every node (SIGKILL), keeping ports and stores.
    pub fn stop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
    }

    /// Restarts every node and waits until the whole is healthy again.
    ///
    /// # Panics
    ///
    /// If a node does not come back or the cluster does not become healthy.
    pub async fn restart(&mut self) {
        if !self.is_clustered() {
            self.nodes[0].restart().await;
            return;
        }
        for node in &mut self.nodes {
            node.stop();
            node.respawn();
        }
        for node in &mut self.nodes {
            if let Err(error) = node.wait_started().await {
                panic!(
                    "{} did not restart: {error}\n{}",
                    node.name(),
                    node.log_tail()
                );
            }
        }
        if let Err(error) = self.wait_healthy().await {
            panic!("the restarted cluster is not healthy: {error}");
        }
    }

    /// Starts a 3-node cluster and waits until it is healthy.
    pub async fn start() -> NatsCluster {
        Self::start_with(ClusterOptions::default()).await
    }

    /// # Panics
    ///
    /// If the nodes do not come up or the cluster does not become healthy
    /// within [`HEALTHY_TIMEOUT`].
    pub async fn start_with(options: ClusterOptions) -> NatsCluster {
        let mut last_error = String::new();
        for attempt in 1..=START_ATTEMPTS {
            match Self::try_start(options).await {
                Ok(cluster) => return cluster,
                Err(error) => {
                    tracing::debug!(attempt, %error, "cluster did not start, retrying");
                    last_error = error;
                }
            }
        }
        panic!(
            "the {}-node nats cluster did not start: {last_error}",
            options.nodes
        )
    }

    async fn try_start(options: ClusterOptions) -> Result<NatsCluster, String> {
        let stores = tempfile::Builder::new()
            .prefix("comfyq-nats-cluster-")
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let ports: Vec<(u16, u16, u16)> = (0..options.nodes)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let prefix = format!("comfyq-test-{}-n", std::process::id());
        let specs =
            nats_cluster::local_cluster(&prefix, &ports, stores.path(), options.sync_always);
        let mut nodes = Vec::with_capacity(specs.len());
        for spec in &specs {
            let dir = tempfile::Builder::new()
                .prefix("comfyq-nats-node-")
                .tempdir_in(stores.path())
                .map_err(|e| format!("cannot create a temp dir: {e}"))?;
            nodes.push(NatsServer::spawn_node(
                &spec.server_name,
                spec.client_port,
                spec.http_port,
                &nats_cluster::render(spec),
                spec.store_dir.clone(),
                dir,
            ));
        }
        for node in &mut nodes {
            node.wait_started()
                .await
                .map_err(|e| format!("{}: {e}\n{}", node.name(), node.log_tail()))?;
        }
        let cluster = NatsCluster {
            nodes,
            specs,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .map_err(|e| e.to_string())?,
            _stores: Some(stores),
        };
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    /// Every node's client URL, comma separated (`nats.url`).
    pub fn urls(&self) -> String {
        if self.specs.is_empty() {
            return self
                .nodes
                .iter()
                .map(NatsServer::url)
                .collect::<Vec<_>>()
                .join(",");
        }
        nats_cluster::client_urls(&self.specs)
    }

    /// The node named `name`.
    ///
    /// # Panics
    ///
    /// If no node has that name.
    pub fn node_mut(&mut self, name: &str) -> &mut NatsServer {
        self.nodes
            .iter_mut()
            .find(|node| node.name() == name)
            .unwrap_or_else(|| panic!("no cluster node named {name}"))
    }

    /// Waits until every running node answers `/healthz` with 200 (JetStream
    /// current: a meta leader is known and its assets are caught up).
    pub async fn wait_healthy(&self) -> Result<(), String> {
        let deadline = Instant::now() + HEALTHY_TIMEOUT.max(READY_TIMEOUT);
        loop {
            let mut unhealthy = Vec::new();
            for node in &self.nodes {
                let (Some(base), Some(_running)) = (node.monitoring_url(), node.pid()) else {
                    continue;
                };
                let healthy = match self.http.get(format!("{base}/healthz")).send().await {
                    Ok(response) => response.status().is_success(),
                    Err(_) => false,
                };
                if !healthy {
                    unhealthy.push(node.name().to_owned());
                }
            }
            if unhealthy.is_empty() && self.meta_leader().await.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "unhealthy after {HEALTHY_TIMEOUT:?}: {unhealthy:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server name of the JetStream meta leader, as a running node sees it.
    pub async fn meta_leader(&self) -> Option<String> {
        for node in &self.nodes {
            let Some(base) = node.monitoring_url() else {
                continue;
            };
            let Ok(response) = self.http.get(format!("{base}/jsz")).send().await else {
                continue;
            };
            let Ok(jsz) = response.json::<Value>().await else {
                continue;
            };
            if let Some(leader) = jsz
                .pointer("/meta_cluster/leader")
                .and_then(Value::as_str)
                .filter(|leader| !leader.is_empty())
            {
                return Some(leader.to_owned());
            }
        }
        None
    }

    /// The server name of `stream`'s leader.
    pub async fn stream_leader(
        &self,
        jetstream: &async_nats::jetstream::Context,
        stream: &str,
    ) -> Option<String> {
        let mut stream = jetstream.get_stream(stream).await.ok()?;
        let info = stream.info().await.ok()?;
        info.cluster.as_ref()?.leader.clone()
    }
}
