//! The whole comfyq stack in one process: a real nats-server, the ComfyUI
//! simulator, and the four services started from their libraries, each with
//! its own NATS connection, exactly as separate processes would run.

use std::collections::BTreeMap;
use std::time::Duration;

use comfy_sim::{SimConfig, SimHandle, Simulator};
use comfyq_ingress::IngressConfig;
use comfyq_ingress::config::ApiKey;
use comfyq_notifier::NotifierConfig;
use comfyq_runner::RunnerConfig;
use comfyq_scheduler::SchedulerConfig;
use comfyq_shared::config::{NatsConfig, Secret};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::nats_server::free_port;
use crate::service_process::{ProcessLauncher, ServiceConfig, ServiceProcess};
use crate::{ClusterOptions, NatsCluster, WebhookSink, eventually};

/// The tenant and API key every stack is configured with.
pub const TENANT: &str = "acme";
pub const API_KEY: &str = "test-key-acme-0123456789";
/// A second tenant, for isolation tests.
pub const OTHER_TENANT: &str = "globex";
pub const OTHER_API_KEY: &str = "test-key-globex-0123456789";
/// The webhook signing secret of [`TENANT`] (Standard Webhooks format).
pub const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A change to every runner's configuration, applied last.
#[derive(Clone)]
pub struct RunnerTweak(pub std::sync::Arc<dyn Fn(&mut RunnerConfig) + Send + Sync>);

impl RunnerTweak {
    pub fn new(tweak: impl Fn(&mut RunnerConfig) + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(tweak))
    }
}

impl std::fmt::Debug for RunnerTweak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunnerTweak")
    }
}

/// Changes to the defaults before the stack starts.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// `None`: one JetStream server; `Some`: a local cluster, every stream
    /// replicated on up to 3 nodes, services given every node's URL.
    pub cluster: Option<ClusterOptions>,
    pub sim: SimConfig,
    /// Simulators started (at least one); runner `i` drives simulator `i % sims`.
    pub sims: usize,
    pub runners: usize,
    pub runner_slots: usize,
    /// How long a stopping runner lets held jobs finish before handing
    /// them back.
    pub runner_shutdown_grace: Duration,
    /// Applied to every runner's configuration (managed mode, clean-up…).
    pub runner_tweak: Option<RunnerTweak>,
    /// Schedulers started in-process (0: the test starts its own, e.g.
    /// [`IsolatedScheduler`]s it can kill).
    pub schedulers: usize,
    /// Scheduler settings (its `nats` section is replaced by the stack's).
    pub scheduler: SchedulerConfig,
    /// Notifiers the stack runs itself (tests that kill and restart one
    /// run their own with [`notifier_config`]).
    pub notifiers: usize,
    /// Changes to the ingress configuration (limits, for instance).
    pub configure_ingress: Option<fn(&mut IngressConfig)>,
    /// Ingresses started (at least one), each on a port of its own
    /// ([`TestStack::apis`]).
    pub ingresses: usize,
    /// `Some`: every service runs as an OS process of its own, supervised
    /// ([`crate::service_process`]; [`TestStack::processes`]); `None`: as
    /// tasks of this process.
    pub processes: Option<ProcessLauncher>,
    /// `nats.dispatch_ack_wait` of every service: short in tests, so a dead
    /// runner's job moves on within seconds; the load test's chaos run uses
    /// the production default.
    pub dispatch_ack_wait: Duration,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            cluster: None,
            sim: SimConfig::default(),
            sims: 1,
            runners: 1,
            runner_slots: 1,
            runner_shutdown_grace: Duration::from_secs(5),
            runner_tweak: None,
            schedulers: 1,
            scheduler: SchedulerConfig {
                lease_ttl: Duration::from_secs(2),
                handler_ack_wait: Duration::from_secs(3),
                tick: Duration::from_millis(100),
                ..SchedulerConfig::default()
            },
            notifiers: 1,
            configure_ingress: None,
            ingresses: 1,
            processes: None,
            dispatch_ack_wait: TEST_DISPATCH_ACK_WAIT,
        }
    }
}

#[derive(Debug)]
pub struct TestStack {
    /// One server, or every node of a cluster ([`StackOptions::cluster`]).
    pub nats: NatsCluster,
    pub sim: SimHandle,
    /// Simulators beyond the first (`StackOptions::sims`).
    pub more_sims: Vec<SimHandle>,
    pub webhooks: WebhookSink,
    /// `http://127.0.0.1:<port>` of the (first) ingress.
    pub api: String,
    /// Every ingress's base URL, [`TestStack::api`] first.
    pub apis: Vec<String>,
    /// The services, when they run as processes ([`StackOptions::processes`]).
    pub processes: Vec<ServiceProcess>,
    /// An HTTP client that sends [`API_KEY`].
    pub http: reqwest::Client,
    /// Scheduler settings of this stack (for [`IsolatedScheduler`]s).
    pub scheduler: SchedulerConfig,
    /// [`StackOptions::dispatch_ack_wait`].
    pub dispatch_ack_wait: Duration,
    shutdown: CancellationToken,
    services: Vec<(&'static str, JoinHandle<Result<(), String>>)>,
    /// The processes' configurations and logs.
    _process_dir: Option<tempfile::TempDir>,
}

/// `dispatch_ack_wait` in tests: a dead runner's job moves on within seconds.
pub const TEST_DISPATCH_ACK_WAIT: Duration = Duration::from_secs(3);

/// NATS settings for tests: short deadlines so failures show within seconds.
pub fn nats_config(url: &str) -> NatsConfig {
    NatsConfig {
        url: url.to_owned(),
        dispatch_ack_wait: TEST_DISPATCH_ACK_WAIT,
        ..NatsConfig::default()
    }
}

/// The notifier settings of the stack: the tenant's signing secret, local
/// receivers allowed, fast retries.
pub fn notifier_config(nats: &NatsConfig) -> NotifierConfig {
    NotifierConfig {
        nats: nats.clone(),
        tenant_secrets: [(TENANT.to_owned(), vec![Secret::new(WEBHOOK_SECRET)])].into(),
        allow_private_destinations: true,
        attempt_timeout: Duration::from_secs(2),
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
        ..NotifierConfig::default()
    }
}

pub fn runner_config(
    nats: &NatsConfig,
    comfyui_url: &str,
    name: &str,
    slots: usize,
) -> RunnerConfig {
    RunnerConfig {
        nats: nats.clone(),
        comfyui_url: comfyui_url.to_owned(),
        runner_id: Some(name.to_owned()),
        slots,
        stall_timeout: Duration::from_secs(2),
        reconcile_interval: Duration::from_millis(200),
        // Short-lived pulls: a stopping runner waits for its last one.
        pull_expires: Duration::from_millis(500),
        retry_backoff: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(5),
        comfyui_ready_timeout: Duration::from_secs(30),
        ..RunnerConfig::default()
    }
}

impl TestStack {
    pub async fn start() -> Self {
        Self::start_with(StackOptions::default()).await
    }

    pub async fn start_with(options: StackOptions) -> Self {
        comfyq_shared::telemetry::init_test_tracing();
        let nats = match options.cluster {
            None => NatsCluster::single().await,
            Some(cluster) => NatsCluster::start_with(cluster).await,
        };
        let sim = Simulator::start(options.sim.clone())
            .await
            .expect("simulator starts");
        let mut more_sims = Vec::new();
        for _ in 1..options.sims {
            more_sims.push(
                Simulator::start(options.sim.clone())
                    .await
                    .expect("simulator starts"),
            );
        }
        let webhooks = WebhookSink::start().await;
        let nats_config = NatsConfig {
            replicas: nats.replicas(),
            dispatch_ack_wait: options.dispatch_ack_wait,
            ..nats_config(&nats.url())
        };
        if nats.replicas() > 1 {
            // One provisioning step before the services, as an operator's
            // admin step would: services creating the same replicated
            // streams at once keep the meta leader busy for many seconds.
            let js = async_nats::jetstream::new(nats.client().await);
            let names = nats_config.names().expect("valid prefix");
            comfyq_shared::provision::provision(&js, &names, &nats_config)
                .await
                .expect("provisioning the cluster");
        }
        let shutdown = CancellationToken::new();
        let scheduler = SchedulerConfig {
            nats: nats_config.clone(),
            ..options.scheduler.clone()
        };
        // Every service's configuration, named; started below as tasks or
        // as processes.
        let mut configs: Vec<(String, ServiceConfig)> = Vec::new();
        for index in 0..options.schedulers {
            configs.push((
                format!("scheduler-{index}"),
                ServiceConfig::Scheduler(Box::new(scheduler.clone())),
            ));
        }
        for index in 0..options.notifiers {
            configs.push((
                format!("notifier-{index}"),
                ServiceConfig::Notifier(Box::new(notifier_config(&nats_config))),
            ));
        }
        for index in 0..options.runners {
            let comfyui = match index % options.sims.max(1) {
                0 => sim.base_url(),
                n => more_sims[n - 1].base_url(),
            };
            let mut runner = RunnerConfig {
                shutdown_grace: options.runner_shutdown_grace,
                ..runner_config(
                    &nats_config,
                    &comfyui,
                    &format!("runner-{index}"),
                    options.runner_slots,
                )
            };
            if let Some(tweak) = &options.runner_tweak {
                (tweak.0)(&mut runner);
            }
            configs.push((
                format!("runner-{index}"),
                ServiceConfig::Runner(Box::new(runner)),
            ));
        }
        let mut apis = Vec::new();
        let mut listeners = Vec::new();
        for index in 0..options.ingresses.max(1) {
            let mut ingress = IngressConfig {
                nats: nats_config.clone(),
                // The webhook sink listens on loopback.
                allow_private_webhooks: true,
                api_keys: vec![
                    ApiKey {
                        tenant: TENANT.to_owned(),
                        key_sha256: None,
                        key: Some(Secret::new(API_KEY)),
                    },
                    ApiKey {
                        tenant: OTHER_TENANT.to_owned(),
                        key_sha256: None,
                        key: Some(Secret::new(OTHER_API_KEY)),
                    },
                ],
                ..IngressConfig::default()
            };
            if let Some(configure) = options.configure_ingress {
                configure(&mut ingress);
            }
            if options.processes.is_some() {
                // A fixed port: a restarted ingress answers where it did.
                ingress.http_addr = format!("127.0.0.1:{}", free_port());
            } else {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind ingress");
                ingress.http_addr = listener.local_addr().expect("bound address").to_string();
                listeners.push(listener);
            }
            apis.push(format!("http://{}", ingress.http_addr));
            configs.push((
                format!("ingress-{index}"),
                ServiceConfig::Ingress(Box::new(ingress)),
            ));
        }

        let mut services = Vec::new();
        let mut processes = Vec::new();
        let mut process_dir = None;
        if let Some(launcher) = &options.processes {
            let dir = tempfile::Builder::new()
                .prefix("comfyq-service-processes-")
                .tempdir()
                .expect("a temp dir for the service processes");
            for (name, config) in &configs {
                processes.push(ServiceProcess::start(launcher, name, config, dir.path()));
            }
            process_dir = Some(dir);
        } else {
            let mut listeners = listeners.into_iter();
            for (_, config) in configs {
                services.push(match config {
                    ServiceConfig::Scheduler(config) => spawn(
                        "scheduler",
                        comfyq_scheduler::run(*config, shutdown.child_token()),
                    ),
                    ServiceConfig::Notifier(config) => spawn(
                        "notifier",
                        comfyq_notifier::run(*config, shutdown.child_token()),
                    ),
                    ServiceConfig::Runner(config) => spawn(
                        "runner",
                        comfyq_runner::run(*config, shutdown.child_token()),
                    ),
                    ServiceConfig::Ingress(config) => spawn(
                        "ingress",
                        comfyq_ingress::serve(
                            *config,
                            listeners.next().expect("one listener per ingress"),
                            shutdown.child_token(),
                        ),
                    ),
                });
            }
        }

        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_static("Bearer test-key-acme-0123456789"),
        );
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("HTTP client");
        let stack = Self {
            nats,
            sim,
            more_sims,
            webhooks,
            api: apis[0].clone(),
            apis,
            processes,
            http,
            scheduler,
            dispatch_ack_wait: options.dispatch_ack_wait,
            shutdown,
            services,
            _process_dir: process_dir,
        };
        stack
            .wait_ready(
                options.runners,
                options.schedulers > 0,
                options.notifiers > 0,
            )
            .await;
        stack
    }

    /// Starts one more runner (slots `slots`) against the simulator.
    pub async fn add_runner(&mut self, name: &str, slots: usize) {
        let runner = runner_config(&self.nats_config(), &self.sim.base_url(), name, slots);
        self.services.push(spawn(
            "runner",
            comfyq_runner::run(runner, self.shutdown.child_token()),
        ));
    }

    /// An HTTP client that authenticates as another tenant.
    pub fn client_for(api_key: &str) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_str(&format!("Bearer {api_key}"))
                .expect("valid header"),
        );
        reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("HTTP client")
    }

    /// Waits until the API answers and ingress sees all `runners` registered
    /// (it checks submissions against them).
    async fn wait_ready(&self, runners: usize, schedulers: bool, notifiers: bool) {
        for api in &self.apis {
            let url = format!("{api}/readyz");
            eventually(Duration::from_secs(30), "ingress ready", async || {
                self.assert_services_alive();
                let ok = reqwest::get(&url).await.ok()?.status().is_success();
                ok.then_some(())
            })
            .await;
        }
        // The last consumer each service creates: once it exists the service
        // is past provisioning, so a test that restarts NATS right away does
        // not catch a service still starting (which would then exit).
        let names = self.nats_config().names().expect("valid prefix");
        let mut last_consumers = Vec::new();
        if schedulers {
            last_consumers.push((
                names.advisories_stream(),
                names.scheduler_advisories_consumer(),
            ));
        }
        if notifiers {
            last_consumers.push((names.webhooks_stream(), names.notifier_redeliver_consumer()));
        }
        if !last_consumers.is_empty() {
            let js = async_nats::jetstream::new(self.nats.client().await);
            for (stream, consumer) in last_consumers {
                eventually(
                    Duration::from_secs(30),
                    "services provisioned",
                    async || {
                        self.assert_services_alive();
                        let stream = js.get_stream(&stream).await.ok()?;
                        stream
                            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                                &consumer,
                            )
                            .await
                            .ok()
                            .map(|_| ())
                    },
                )
                .await;
            }
        }
        if runners == 0 {
            return;
        }
        let url = format!("{}/v1/runners", self.api);
        eventually(Duration::from_secs(30), "runners registered", async || {
            self.assert_services_alive();
            let list: Value = self.http.get(&url).send().await.ok()?.json().await.ok()?;
            let ready = list["runners"]
                .as_array()?
                .iter()
                .filter(|r| r["ready"] == true)
                .count();
            (ready >= runners).then_some(())
        })
        .await;
    }

    /// Panics with the service's error if one of them stopped.
    /// For processes: panics if one exited without being killed (the
    /// supervisor restarts killed ones).
    pub fn assert_services_alive(&self) {
        for (name, handle) in &self.services {
            assert!(!handle.is_finished(), "service {name} stopped early");
        }
        for process in &self.processes {
            let exits = process.unexpected_exits();
            assert!(
                exits.is_empty(),
                "service process {} exited on its own: {exits:?}\n{}",
                process.name(),
                process.log_tail(30)
            );
        }
    }

    pub fn nats_config(&self) -> NatsConfig {
        NatsConfig {
            replicas: self.nats.replicas(),
            dispatch_ack_wait: self.dispatch_ack_wait,
            ..nats_config(&self.nats.url())
        }
    }

    /// `POST /v1/jobs`; panics unless the answer is 202. Returns the job.
    pub async fn submit(&self, body: Value) -> Value {
        let response = self
            .http
            .post(format!("{}/v1/jobs", self.api))
            .json(&body)
            .send()
            .await
            .expect("POST /v1/jobs");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(
            status,
            reqwest::StatusCode::ACCEPTED,
            "submit answered {status}: {text}"
        );
        serde_json::from_str(&text).expect("job JSON")
    }

    pub async fn job(&self, id: &str) -> Value {
        self.http
            .get(format!("{}/v1/jobs/{id}", self.api))
            .send()
            .await
            .expect("GET job")
            .json()
            .await
            .expect("job JSON")
    }

    /// Polls the job until its status is terminal; returns it.
    pub async fn wait_finished(&self, id: &str, timeout: Duration) -> Value {
        eventually(timeout, &format!("job {id} finished"), async || {
            self.assert_services_alive();
            let job = self.job(id).await;
            let status = job["status"].as_str()?;
            matches!(status, "completed" | "failed" | "cancelled").then_some(job)
        })
        .await
    }

    /// `POST /v1/jobs/{id}/cancel`: the status code and the job it answered with.
    pub async fn cancel(&self, id: &str) -> (reqwest::StatusCode, Value) {
        let response = self
            .http
            .post(format!("{}/v1/jobs/{id}/cancel", self.api))
            .send()
            .await
            .expect("POST cancel");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("cancel answered {status} with non-JSON ({e}): {text}"));
        (status, body)
    }

    /// The state events (`job.accepted` … `job.completed`) of one job of
    /// [`TENANT`] stored in the events stream so far, oldest first, as JSON.
    /// Progress, node and output events are left out.
    pub async fn state_events(&self, id: &str) -> Vec<Value> {
        self.state_events_of(TENANT, id).await
    }

    /// [`TestStack::state_events`] of a job of `tenant`.
    pub async fn state_events_of(&self, tenant: &str, id: &str) -> Vec<Value> {
        let names = self.nats_config().names().expect("valid prefix");
        let tenant = comfyq_shared::TenantId::new(tenant).expect("valid tenant");
        let job: comfyq_shared::JobId = id.parse().expect("valid job id");
        self.replay_state_events(names.job_events_filter(&tenant, &job))
            .await
            .remove(id)
            .unwrap_or_default()
    }

    /// The state events of every job of `tenant`, by job id, oldest first:
    /// one replay for many jobs (the fault suite checks hundreds).
    pub async fn state_events_by_job(&self, tenant: &str) -> BTreeMap<String, Vec<Value>> {
        let names = self.nats_config().names().expect("valid prefix");
        let tenant = comfyq_shared::TenantId::new(tenant).expect("valid tenant");
        self.replay_state_events(names.tenant_events_filter(&tenant))
            .await
    }

    /// Replays the events stream on `filter` (an ephemeral consumer, deleted
    /// afterwards) and keeps the state events, grouped by job id.
    async fn replay_state_events(&self, filter: String) -> BTreeMap<String, Vec<Value>> {
        use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
        use futures::StreamExt;

        let names = self.nats_config().names().expect("valid prefix");
        let js = async_nats::jetstream::new(self.nats.client().await);
        let stream = js
            .get_stream(names.events_stream())
            .await
            .expect("events stream");
        let mut consumer = stream
            .create_consumer(pull::Config {
                filter_subject: filter,
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..pull::Config::default()
            })
            .await
            .expect("events consumer");
        let info = consumer.info().await.expect("consumer info");
        let (pending, consumer_name) = (info.num_pending, info.name.clone());
        let mut events: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut seen = 0;
        while seen < pending {
            let mut batch = consumer
                .fetch()
                .max_messages(500)
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .expect("fetch events");
            let before = seen;
            while let Some(message) = batch.next().await {
                // A fetch can end in a transient error (a cluster node just
                // back from a fault): the next fetch goes on from there.
                let Ok(message) = message else { break };
                seen += 1;
                let event: Value = serde_json::from_slice(&message.payload).expect("event JSON");
                let is_state = event["data"]["status"].is_string()
                    && event["type"].as_str().is_some_and(|t| {
                        t.strip_prefix("job.") == event["data"]["status"].as_str()
                    });
                let job = event["job_id"].as_str().map(str::to_owned);
                if let (true, Some(job)) = (is_state, job) {
                    events.entry(job).or_default().push(event);
                }
            }
            assert!(seen > before, "events stream stopped short of {pending}");
        }
        // Best effort: the inactive threshold removes it otherwise.
        let _ = stream.delete_consumer(&consumer_name).await;
        events
    }

    /// The job records, as the scheduler and runners read and write them.
    pub async fn job_store(&self) -> comfyq_shared::job_store::JobStore {
        let names = self.nats_config().names().expect("valid prefix");
        let client = self.nats.client().await;
        let js = async_nats::jetstream::new(client.clone());
        let events = js
            .get_stream(names.events_stream())
            .await
            .expect("events stream");
        comfyq_shared::job_store::JobStore::new(js, client, events, names)
    }

    /// Jobs waiting for a runner slot: messages on the pending subjects.
    pub async fn pending_backlog(&self) -> u64 {
        use futures::StreamExt;
        let names = self.nats_config().names().expect("valid prefix");
        let js = async_nats::jetstream::new(self.nats.client().await);
        let stream = js
            .get_stream(names.pending_stream())
            .await
            .expect("pending stream");
        let mut subjects = stream
            .info_with_subjects(names.pending_filter())
            .await
            .expect("pending subjects");
        let mut total = 0;
        while let Some(entry) = subjects.next().await {
            total += entry.expect("pending subject count").1 as u64;
        }
        total
    }

    /// Dispatch messages still in the work queue (neither acknowledged nor
    /// terminated by a runner).
    pub async fn dispatch_backlog(&self) -> u64 {
        let names = self.nats_config().names().expect("valid prefix");
        let js = async_nats::jetstream::new(self.nats.client().await);
        let mut stream = js
            .get_stream(names.dispatch_stream())
            .await
            .expect("dispatch stream");
        stream
            .info()
            .await
            .expect("dispatch stream info")
            .state
            .messages
    }

    /// What is stored: the last sequence of the JOBS stream, the
    /// idempotency bucket, the events stream (job records) and the pending
    /// stream,
    /// and the number of media objects. Equal before and after a request
    /// means it queued and stored nothing.
    pub async fn stored_state(&self) -> (Vec<u64>, usize) {
        use futures::StreamExt;
        let names = self.nats_config().names().expect("valid prefix");
        let js = async_nats::jetstream::new(self.nats.client().await);
        let mut sequences = Vec::new();
        for stream in [
            names.jobs_stream(),
            format!("KV_{}", names.idempotency_bucket()),
            names.events_stream(),
            names.pending_stream(),
        ] {
            let mut stream = js.get_stream(&stream).await.expect("stream");
            sequences.push(
                stream
                    .info()
                    .await
                    .expect("stream info")
                    .state
                    .last_sequence,
            );
        }
        let media = js
            .get_object_store(names.media_bucket())
            .await
            .expect("media bucket");
        let objects = media
            .list()
            .await
            .expect("list media")
            // Runners' own objects (their ComfyUI's object_info) are written
            // whenever a runner starts, not by requests.
            .filter(|o| {
                std::future::ready(
                    o.as_ref()
                        .is_ok_and(|o| !o.deleted && !o.name.starts_with("_runners/")),
                )
            })
            .count()
            .await;
        (sequences, objects)
    }

    /// Stops every service and waits for them (graceful shutdown).
    pub async fn stop(mut self) {
        self.stop_services().await;
    }

    /// Stops every service and waits for them, keeping NATS, the simulator
    /// and the webhook sink up for inspection; [`TestStack::stop`] after it
    /// has nothing left to stop.
    pub async fn stop_services(&mut self) {
        self.shutdown.cancel();
        // Concurrently: each runner may wait out its shutdown grace.
        futures::future::join_all(self.processes.iter_mut().map(ServiceProcess::stop)).await;
        for (name, handle) in self.services.drain(..) {
            match tokio::time::timeout(Duration::from_secs(15), handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => panic!("{name} failed: {error}"),
                Ok(Err(join)) => panic!("{name} panicked: {join}"),
                Err(_) => panic!("{name} did not stop within 15 s"),
            }
        }
    }
}

impl Drop for TestStack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A scheduler on its own Tokio runtime, so a test can kill it the way a
/// crash would: every task and its NATS connection stop at once, nothing is
/// released or flushed.
#[derive(Debug)]
pub struct IsolatedScheduler {
    runtime: Option<tokio::runtime::Runtime>,
}

impl IsolatedScheduler {
    pub fn start(config: SchedulerConfig) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("scheduler runtime");
        runtime.spawn(async move {
            if let Err(error) = comfyq_scheduler::run(config, CancellationToken::new()).await {
                eprintln!("isolated scheduler failed: {error}");
            }
        });
        Self {
            runtime: Some(runtime),
        }
    }

    /// Stops it abruptly.
    pub fn kill(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for IsolatedScheduler {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A runner on its own Tokio runtime, so a test can kill it mid-job the way
/// a crash would: heartbeats and its NATS connection stop at once.
#[derive(Debug)]
pub struct IsolatedRunner {
    runtime: Option<tokio::runtime::Runtime>,
}

impl IsolatedRunner {
    pub fn start(config: RunnerConfig) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runner runtime");
        runtime.spawn(async move {
            if let Err(error) = comfyq_runner::run(config, CancellationToken::new()).await {
                eprintln!("isolated runner failed: {error}");
            }
        });
        Self {
            runtime: Some(runtime),
        }
    }

    /// Stops it abruptly.
    pub fn kill(mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for IsolatedRunner {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn spawn<E: std::fmt::Display>(
    name: &'static str,
    service: impl Future<Output = Result<(), E>> + Send + 'static,
) -> (&'static str, JoinHandle<Result<(), String>>) {
    let handle = tokio::spawn(async move {
        let result = service.await.map_err(|e| e.to_string());
        if let Err(error) = &result {
            eprintln!("service {name} failed: {error}");
        }
        result
    });
    (name, handle)
}

/// The smallest useful workflow: an empty image, inverted, saved.
pub fn invert_workflow(width: u32) -> Value {
    serde_json::json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": width, "height": width, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "comfyq/invert"}}
    })
}

/// An empty image through a slow node (`steps` progress steps of `step_ms`
/// each, no previews), saved under `comfyq/<prefix>`. The slow node is the
/// middle one, where the simulator's injected failures strike.
pub fn slow_workflow(steps: u32, step_ms: u64, prefix: &str) -> Value {
    serde_json::json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PeerSlowProgress", "inputs": {"image": ["1", 0], "steps": steps, "step_ms": step_ms, "send_previews": false, "preview_format": "PNG"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": format!("comfyq/{prefix}")}}
    })
}
