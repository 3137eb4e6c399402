//! What the load goes to: a stack this process starts (nats-server as a child
//! process; ingress, scheduler, notifier, runners and simulators in-process,
//! from `comfyq-tests`' harness), or a running one given by URL.

use std::time::Duration;

use anyhow::{Context, bail};
use comfy_sim::{ReceivedPrompt, SimConfig};
use comfyq_ingress::IngressConfig;
use comfyq_ingress::config::ApiKey;
use comfyq_shared::config::Secret;
use comfyq_shared::names::Names;
use comfyq_tests::stack::{API_KEY, OTHER_API_KEY, OTHER_TENANT, TENANT};
use comfyq_tests::{ClusterOptions, RunnerTweak, StackOptions, TestStack};
use futures::StreamExt;

use crate::procstat::{self, ProcStat};

/// Tenants the in-process stack knows beyond the harness's two.
const EXTRA_TENANTS: usize = 6;

fn extra_key(i: usize) -> String {
    format!("loadtest-key-{i}-0123456789")
}

/// One tenant's credentials and HTTP client.
#[derive(Debug, Clone)]
pub(crate) struct Tenant {
    pub(crate) http: reqwest::Client,
}

/// How to start the in-process stack.
#[derive(Debug, Clone)]
pub(crate) struct LocalOptions {
    pub(crate) sims: usize,
    pub(crate) runners: usize,
    pub(crate) slots: usize,
    pub(crate) sim: SimConfig,
    /// Nodes of a local NATS cluster; `None` is one server.
    pub(crate) cluster: Option<usize>,
}

#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) api: String,
    pub(crate) nats_url: Option<String>,
    pub(crate) names: Names,
    pub(crate) tenants: Vec<Tenant>,
    /// The ComfyUI (simulator) the `direct` baseline talks to.
    pub(crate) comfyui_url: Option<String>,
    pub(crate) stack: Option<TestStack>,
    /// The simulators' shared data directory, removed when the target goes.
    _sim_dir: Option<tempfile::TempDir>,
}

fn client(key: &str) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .context("API key is not a valid header value")?,
    );
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(1024)
        .build()?)
}

fn configure_ingress(ingress: &mut IngressConfig) {
    // The load test measures the queue, not the per-tenant limits.
    ingress.rate_limit_per_s = 0;
    ingress.max_active_jobs = 0;
    for i in 0..EXTRA_TENANTS {
        ingress.api_keys.push(ApiKey {
            tenant: format!("lt{i}"),
            key_sha256: None,
            key: Some(Secret::new(extra_key(i))),
        });
    }
}

impl Target {
    /// Starts nats-server, the four services and the simulators in this process.
    pub(crate) async fn start_local(
        options: &LocalOptions,
        tenants: usize,
    ) -> anyhow::Result<Self> {
        // One data directory for all simulators, given to the runners as
        // `comfyui_dir` (managed mode): they point every job's files into
        // `comfyq-<job>-<attempt>/` and delete them after it, as in production.
        // Without it outputs pile up in one folder, and ComfyUI's counter
        // scan of that folder on every save (which the simulator does too)
        // makes each job slower than the last: a soak's latency drifts.
        let sim_dir = match &options.sim.data_dir {
            Some(_) => None,
            None => {
                let mut builder = tempfile::Builder::new();
                builder.prefix("comfyq-loadtest-sims-");
                Some(match &options.sim.temp_parent {
                    Some(parent) => builder.tempdir_in(parent)?,
                    None => builder.tempdir()?,
                })
            }
        };
        let data_dir = options
            .sim
            .data_dir
            .clone()
            .or_else(|| sim_dir.as_ref().map(|dir| dir.path().to_path_buf()));
        // Production's runner defaults for pull requests and heartbeats, not the tests' fast ones.
        let defaults = comfyq_runner::RunnerConfig::default();
        let comfyui_dir = data_dir.clone();
        let tweak = RunnerTweak::new(move |runner| {
            runner.pull_expires = defaults.pull_expires;
            runner.stall_timeout = defaults.stall_timeout;
            runner.reconcile_interval = defaults.reconcile_interval;
            runner.comfyui_dir.clone_from(&comfyui_dir);
        });
        let stack = TestStack::start_with(StackOptions {
            sim: SimConfig {
                data_dir,
                ..options.sim.clone()
            },
            sims: options.sims.max(1),
            runners: options.runners,
            runner_slots: options.slots,
            runner_tweak: Some(tweak),
            configure_ingress: Some(configure_ingress),
            cluster: options
                .cluster
                .filter(|nodes| *nodes > 1)
                .map(|nodes| ClusterOptions {
                    nodes,
                    ..ClusterOptions::default()
                }),
            ..StackOptions::default()
        })
        .await;
        let mut all = vec![
            (TENANT.to_owned(), API_KEY.to_owned()),
            (OTHER_TENANT.to_owned(), OTHER_API_KEY.to_owned()),
        ];
        all.extend((0..EXTRA_TENANTS).map(|i| (format!("lt{i}"), extra_key(i))));
        if tenants > all.len() {
            bail!("at most {} tenants in the in-process stack", all.len());
        }
        let tenants = all
            .into_iter()
            .take(tenants.max(1))
            .map(|(_, key)| {
                Ok(Tenant {
                    http: client(&key)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let target = Self {
            api: stack.api.clone(),
            nats_url: Some(stack.nats.url()),
            names: Names::new("comfyq")?,
            tenants,
            comfyui_url: Some(stack.sim.base_url()),
            stack: Some(stack),
            _sim_dir: sim_dir,
        };
        target.wait_runners(options.runners).await?;
        Ok(target)
    }

    /// A running stack: its API, optionally its NATS and a ComfyUI for `direct`.
    pub(crate) fn remote(
        api: &str,
        nats_url: Option<String>,
        api_key: &str,
        prefix: &str,
        comfyui_url: Option<String>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            api: api.trim_end_matches('/').to_owned(),
            nats_url,
            names: Names::new(prefix)?,
            tenants: vec![Tenant {
                http: client(api_key)?,
            }],
            comfyui_url,
            stack: None,
            _sim_dir: None,
        })
    }

    pub(crate) async fn nats(&self) -> anyhow::Result<Option<async_nats::Client>> {
        match &self.nats_url {
            Some(url) => Ok(Some(connect_nats(url).await?)),
            None => Ok(None),
        }
    }

    /// Waits until `count` runners have registered (the harness waits for one).
    async fn wait_runners(&self, count: usize) -> anyhow::Result<()> {
        let Some(client) = self.nats().await? else {
            return Ok(());
        };
        let js = async_nats::jetstream::new(client);
        let kv = js.get_key_value(self.names.runners_bucket()).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60 + count as u64 / 10);
        loop {
            let mut keys = kv.keys().await?;
            let mut n = 0;
            while let Some(key) = keys.next().await {
                if key.is_ok() {
                    n += 1;
                }
            }
            if n >= count {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("only {n} of {count} runners registered");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every prompt the simulators received (in-process only).
    pub(crate) fn prompts(&self) -> Option<Vec<ReceivedPrompt>> {
        let stack = self.stack.as_ref()?;
        let mut all = stack.sim.prompts_received();
        for sim in &stack.more_sims {
            all.extend(sim.prompts_received());
        }
        Some(all)
    }

    /// This process and nats-server, when the stack is in-process.
    pub(crate) fn processes(&self) -> Vec<ProcStat> {
        let mut out = Vec::new();
        let what = if self.stack.is_some() {
            "loadtest + services + simulators (one process)"
        } else {
            "loadtest client"
        };
        out.extend(procstat::this(what));
        if let Some(stack) = &self.stack {
            let pids = stack.nats.pids();
            for (index, pid) in pids.iter().enumerate() {
                let name = if pids.len() == 1 {
                    "nats-server".to_owned()
                } else {
                    format!("nats-server node {}", index + 1)
                };
                out.extend(procstat::read(&name, *pid));
            }
        }
        out
    }

    pub(crate) async fn stop(self) {
        if let Some(stack) = self.stack {
            stack.stop().await;
        }
    }
}

/// Connects to a NATS URL or a comma-separated list of them (a cluster).
pub(crate) async fn connect_nats(urls: &str) -> anyhow::Result<async_nats::Client> {
    let urls: Vec<&str> = urls.split(',').map(str::trim).collect();
    Ok(async_nats::connect(urls).await?)
}
