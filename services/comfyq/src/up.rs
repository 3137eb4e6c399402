//! `comfyq up`: the whole stack in one process tree, the embedded default a
//! new user starts with.
//!
//! It starts a nats-server (JetStream, a data directory) as a child process
//! (`--cluster N`: N of them forming a JetStream cluster, every stream
//! replicated on 3), then the scheduler, notifier, runner(s) and ingress in this process;
//! `--sim` adds the ComfyUI simulator for the runner to drive,
//! `--comfyui-url` attaches the runner to a real ComfyUI instead. Cancelling
//! its token (Ctrl-C, SIGTERM in the binary) stops the services gracefully,
//! then the server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use comfyq_shared::config::{self, NatsConfig, Validate};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{nats_process, webhook_secret};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Also run the ComfyUI simulator and a runner driving it.
    #[arg(long, conflicts_with = "comfyui_url")]
    pub sim: bool,
    /// Attach a runner to this (real) ComfyUI.
    #[arg(long, value_name = "URL")]
    pub comfyui_url: Option<String>,
    /// Where the REST API listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// The nats-server binary to start.
    #[arg(long, env = "NATS_SERVER_BIN", default_value = "nats-server")]
    pub nats_server: PathBuf,
    /// Client port of the started nats-server (with `--cluster N`, of the
    /// first node; the others take the next ports).
    #[arg(long, default_value_t = 4222)]
    pub nats_port: u16,
    /// Start a JetStream cluster of this many nats-server nodes on this
    /// machine (configured from `nats/cluster/n1.conf`, stores under
    /// `<data-dir>/nats-cluster/`), every stream replicated on 3, the
    /// services given every node's URL: to try failover locally.
    #[arg(long, value_name = "NODES", conflicts_with = "nats_url",
          value_parser = clap::value_parser!(u8).range(3..=5))]
    pub cluster: Option<u8>,
    /// Use this running NATS instead of starting one.
    #[arg(long, value_name = "URL", conflicts_with = "nats_server")]
    pub nats_url: Option<String>,
    /// Where nats-server keeps its data (JetStream store).
    #[arg(long, default_value = ".comfyq")]
    pub data_dir: PathBuf,
    /// Port of the simulator (with --sim).
    #[arg(long, default_value_t = 8188)]
    pub sim_port: u16,
    /// Prompts each runner stages in ComfyUI at once.
    #[arg(long, default_value_t = 1)]
    pub slots: usize,
}

/// Runs the stack until `shutdown` or until a service fails.
///
/// `api_key`: require this key (tenant `local`) instead of the open development mode.
pub async fn run(
    args: UpArgs,
    api_key: Option<String>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // NATS first: every service needs it.
    let mut nats_server = None;
    let mut nats_cluster = None;
    let nats_url = match (&args.nats_url, args.cluster) {
        (Some(url), _) => url.clone(),
        (None, Some(nodes)) => {
            let cluster = nats_process::LocalCluster::start(
                &args.nats_server,
                args.nats_port,
                nodes,
                &args.data_dir.join("nats-cluster"),
            )
            .await
            .context("starting the NATS cluster")?;
            let urls = cluster.urls();
            nats_cluster = Some(cluster);
            urls
        }
        (None, None) => {
            let server = nats_process::NatsProcess::start(
                &args.nats_server,
                args.nats_port,
                &args.data_dir.join("nats"),
            )
            .await
            .context("starting nats-server")?;
            let url = server.url();
            nats_server = Some(server);
            url
        }
    };
    let mut nats = NatsConfig {
        url: nats_url.clone(),
        ..config::load::<ServiceNats>(None)?.nats
    };
    if let Some(cluster) = &nats_cluster {
        nats.replicas = cluster.len().min(3);
    }
    nats.validate()?;
    if let Some(cluster) = &nats_cluster {
        // Provisioned once before the services: four of them creating the
        // same replicated streams at once keep the meta leader busy.
        let urls: Vec<&str> = nats.url.split(',').collect();
        let client = async_nats::connect(urls)
            .await
            .context("connecting to the NATS cluster")?;
        let js = async_nats::jetstream::new(client);
        comfyq_shared::provision::provision(&js, &nats.names()?, &nats)
            .await
            .context("creating the cluster's streams")?;
        eprintln!(
            "comfyq: NATS cluster of {} nodes at {}, every stream on {} replicas (stores in {})",
            cluster.len(),
            nats.url,
            nats.replicas,
            args.data_dir.join("nats-cluster").display()
        );
    }

    let services = CancellationToken::new();
    let mut tasks = JoinSet::new();

    let mut comfyui_url = args.comfyui_url.clone();
    if args.sim {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.sim_port))
            .await
            .with_context(|| format!("the simulator cannot listen on port {}", args.sim_port))?;
        comfyui_url = Some(format!("http://{}", listener.local_addr()?));
        let token = services.child_token();
        tasks.spawn(async move {
            comfy_sim::Simulator::serve(listener, comfy_sim::SimConfig::default(), token)
                .await
                .map_err(|e| format!("simulator: {e:#}"))
        });
    }

    let scheduler = comfyq_scheduler::SchedulerConfig {
        nats: nats.clone(),
        ..config::load(None)?
    };
    tasks.spawn(service(
        "scheduler",
        comfyq_scheduler::run(scheduler, services.child_token()),
    ));

    let mut notifier = comfyq_notifier::NotifierConfig {
        nats: nats.clone(),
        // Local development posts to local receivers.
        allow_private_destinations: true,
        public_base_url: Some(format!("http://{}", args.http_addr)),
        ..config::load(None)?
    };
    // No webhook goes out unsigned: without configured secrets, the one
    // kept in the data directory signs.
    if notifier.default_secrets.is_empty() {
        let (secret, origin) = webhook_secret::load_or_create(&args.data_dir)?;
        let path = args.data_dir.join(webhook_secret::FILE);
        if origin == webhook_secret::Origin::Created {
            // Shown once, for the receiver to verify with; it stays in the file.
            eprintln!(
                "comfyq: webhooks are signed with {} (kept in {})",
                secret.expose(),
                path.display()
            );
        }
        tracing::info!(file = %path.display(), "webhooks signed with the development secret");
        notifier.default_secrets.push(secret);
    }
    notifier.validate()?;
    tasks.spawn(service(
        "notifier",
        comfyq_notifier::run(notifier, services.child_token()),
    ));

    if let Some(url) = &comfyui_url {
        let runner = comfyq_runner::RunnerConfig {
            nats: nats.clone(),
            comfyui_url: url.clone(),
            slots: args.slots,
            ..config::load(None)?
        };
        runner.validate()?;
        tasks.spawn(service(
            "runner",
            comfyq_runner::run(runner, services.child_token()),
        ));
    }

    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("the API cannot listen on {}", args.http_addr))?;
    let mut ingress: comfyq_ingress::IngressConfig = config::load(None)?;
    ingress.nats = nats.clone();
    ingress.http_addr = args.http_addr.to_string();
    // Local development: webhooks to this machine, like the notifier allows.
    ingress.allow_private_webhooks = true;
    match &api_key {
        Some(key) => ingress.api_keys.push(comfyq_ingress::config::ApiKey {
            tenant: "local".to_owned(),
            key_sha256: None,
            key: Some(config::Secret::new(key.clone())),
        }),
        None if ingress.api_keys.is_empty() => ingress.open_tenant = Some("local".to_owned()),
        None => {}
    }
    ingress.validate()?;
    tasks.spawn(service(
        "ingress",
        comfyq_ingress::serve(ingress, listener, services.child_token()),
    ));

    tracing::info!(
        api = %format!("http://{}", args.http_addr),
        nats = %nats_url,
        comfyui = comfyui_url.as_deref().unwrap_or("none (no runner)"),
        "comfyq is up; Ctrl-C stops it"
    );

    // Run until a signal, or until a service fails.
    let mut failure = None;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        Some(result) = tasks.join_next() => {
            failure = Some(match result {
                Ok(Ok(())) => "a service stopped unexpectedly".to_owned(),
                Ok(Err(error)) => error,
                Err(join) => format!("a service panicked: {join}"),
            });
        }
    }
    services.cancel();
    let drained = tokio::time::timeout(Duration::from_secs(40), async {
        while let Some(result) = tasks.join_next().await {
            if let Ok(Err(error)) = result {
                tracing::warn!(%error, "service stopped with an error");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("services did not stop within 40 s");
    }
    if let Some(server) = nats_server {
        server.stop().await;
    }
    if let Some(cluster) = nats_cluster {
        cluster.stop().await;
    }
    match failure {
        Some(error) => bail!(error),
        None => Ok(()),
    }
}

/// Only the `nats` section, read from the environment (`COMFYQ_NATS__…`).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct ServiceNats {
    nats: NatsConfig,
}

impl Validate for ServiceNats {
    fn validate(&self) -> Result<(), config::ConfigError> {
        Ok(())
    }
}

async fn service<E: std::fmt::Display>(
    name: &'static str,
    future: impl Future<Output = Result<(), E>>,
) -> Result<(), String> {
    future.await.map_err(|e| format!("{name}: {e}"))
}
