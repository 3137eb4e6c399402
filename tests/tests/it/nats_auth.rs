//! Least privilege on NATS: a server configured by `comfyq nats-config`,
//! streams created by `comfyq provision` as the admin, and each identity
//! refused what it must not do; then the whole stack on those credentials;
//! and TLS to NATS with certificates made here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use comfyq::nats_auth::{NatsConfigArgs, ProvisionArgs, Written, provision, write_nats_config};
use comfyq_shared::config::{NatsConfig, NatsTlsConfig};
use comfyq_shared::nats_permissions::Identity;
use comfyq_shared::{EventKind, JobId, JobStatus, Names, PoolName, Priority, TenantId};
use comfyq_tests::stack::{self, invert_workflow};
use comfyq_tests::{NatsServer, WebhookSink, eventually};
use futures::StreamExt;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

/// How long a refused request is given to (not) answer.
const REFUSED_WITHIN: Duration = Duration::from_millis(700);

/// A nats-server whose only users are those `comfyq nats-config` wrote.
struct Secured {
    server: NatsServer,
    written: Written,
    dir: TempDir,
}

impl Secured {
    async fn start(tenants: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let written = write_nats_config(&NatsConfigArgs {
            out: dir.path().join("auth"),
            prefix: "comfyq".to_owned(),
            tenants: tenants.iter().map(|t| (*t).to_owned()).collect(),
            account: "COMFYQ".to_owned(),
        })
        .expect("nats-config writes");
        // `include` resolves paths against the including file: inline it.
        let auth = std::fs::read_to_string(&written.auth_conf).expect("auth.conf");
        let server = NatsServer::start_with_config(&auth).await;
        Self {
            server,
            written,
            dir,
        }
    }

    fn seed(&self, identity: &Identity) -> &Path {
        self.written
            .identities
            .iter()
            .find(|(i, _)| i == identity)
            .map(|(_, seed)| seed.as_path())
            .unwrap_or_else(|| panic!("no seed for {identity:?}"))
    }

    /// The stack's test settings as `identity` (check-only but for the admin).
    fn nats(&self, identity: &Identity) -> NatsConfig {
        NatsConfig {
            nkey_seed_file: Some(self.seed(identity).display().to_string()),
            inbox_prefix: Some(identity.inbox_prefix()),
            provision: *identity == Identity::Admin,
            // Dead letters after two attempts, so the stack test reaches one soon.
            dispatch_max_deliver: 2,
            ..stack::nats_config(&self.server.url())
        }
    }

    async fn client(&self, identity: &Identity) -> async_nats::Client {
        comfyq_shared::connection::connect(&self.nats(identity), "test")
            .await
            .unwrap_or_else(|e| panic!("{identity:?} connects: {e}"))
    }

    /// A JetStream context whose refused requests fail fast.
    async fn js(&self, identity: &Identity) -> jetstream::Context {
        jetstream::ContextBuilder::new()
            .timeout(REFUSED_WITHIN)
            .build(self.client(identity).await)
    }

    /// `comfyq provision` as the admin, from a config file like an operator's.
    async fn provision(&self) {
        let config = self.dir.path().join("admin.toml");
        std::fs::write(
            &config,
            format!(
                "[nats]\nurl = \"{}\"\nnkey_seed_file = \"{}\"\ninbox_prefix = \"{}\"\ndispatch_ack_wait = \"3s\"\ndispatch_max_deliver = 2\n",
                self.server.url(),
                self.seed(&Identity::Admin).display(),
                Identity::Admin.inbox_prefix()
            ),
        )
        .expect("admin config");
        provision(&ProvisionArgs {
            config: Some(config),
            pools: vec!["default".to_owned()],
            scheduler_config: None,
            notifier_config: None,
        })
        .await
        .expect("comfyq provision as the admin");
    }

    fn violations(&self) -> Vec<String> {
        std::fs::read_to_string(self.server.log_path())
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("Violation"))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until the server logged a violation naming `subject`.
    async fn assert_violation_logged(&self, subject: &str) {
        eventually(
            Duration::from_secs(5),
            &format!("a permissions violation on {subject} logged"),
            async || {
                self.violations()
                    .iter()
                    .any(|line| line.contains(subject))
                    .then_some(())
            },
        )
        .await;
    }
}

/// A JetStream publish, acknowledged or not.
async fn js_publish(js: &jetstream::Context, subject: String, payload: &'static str) -> bool {
    match js.publish(subject, payload.into()).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    }
}

/// A raw JetStream API request: its answer, or `None` if none came (a
/// refused publish is dropped by the server).
async fn api(client: &async_nats::Client, request: &str, body: Value) -> Option<Value> {
    let subject = format!("$JS.API.{request}");
    let payload = serde_json::to_vec(&body).expect("JSON");
    let answer = tokio::time::timeout(REFUSED_WITHIN, client.request(subject, payload.into()))
        .await
        .ok()?
        .ok()?;
    serde_json::from_slice(&answer.payload).ok()
}

/// Whether a core subscription to `subject` as `who` receives what `admin`
/// publishes there (waiting long for what should come, briefly for what
/// should not: [`receives`] and [`refused`]). `admin` publishes every 50 ms
/// meanwhile: a flush does not wait for the server to have registered the
/// subscription, so one early message could be missed either way.
async fn delivered(
    who: (&Secured, &Identity),
    admin: &async_nats::Client,
    subject: &str,
    wait: Duration,
) -> bool {
    let who = who.0.client(who.1).await;
    let mut subscription = who.subscribe(subject.to_owned()).await.expect("subscribe");
    who.flush().await.expect("flush");
    let probes = async {
        loop {
            admin
                .publish(subject.to_owned(), "probe".into())
                .await
                .expect("admin publishes");
            admin.flush().await.expect("flush");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        message = subscription.next() => message.is_some(),
        () = probes => unreachable!("the probes loop forever"),
        () = tokio::time::sleep(wait) => false,
    }
}

async fn receives(who: (&Secured, &Identity), admin: &async_nats::Client, subject: &str) -> bool {
    delivered(who, admin, subject, Duration::from_secs(10)).await
}

async fn refused(who: (&Secured, &Identity), admin: &async_nats::Client, subject: &str) -> bool {
    !delivered(who, admin, subject, REFUSED_WITHIN).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_auth_each_identity_is_refused_what_it_must_not_do() {
    comfyq_shared::telemetry::init_test_tracing();
    let secured = Secured::start(&["acme", "globex"]).await;
    let names = Names::default();
    let acme = TenantId::new("acme").expect("valid");
    let globex = TenantId::new("globex").expect("valid");
    let pool = PoolName::new("default").expect("valid");

    // Before the admin's step, a check-only service says what to do.
    let runner_js = secured.js(&Identity::Runner).await;
    let error = match comfyq_shared::provision::provision(
        &runner_js,
        &names,
        &secured.nats(&Identity::Runner),
    )
    .await
    {
        Ok(_) => panic!("check-only provisioning found streams nobody created"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("comfyq provision"), "{error}");
    // Nor can a service create a stream itself.
    assert!(
        runner_js
            .create_stream(jetstream::stream::Config {
                name: names.jobs_stream(),
                subjects: names.jobs_stream_subjects(),
                ..Default::default()
            })
            .await
            .is_err(),
        "a runner created a stream"
    );

    secured.provision().await;
    let admin = secured.client(&Identity::Admin).await;
    let admin_js = jetstream::new(admin.clone());
    for service in Identity::SERVICES {
        comfyq_shared::provision::provision(
            &secured.js(&service).await,
            &names,
            &secured.nats(&service),
        )
        .await
        .unwrap_or_else(|e| panic!("{service:?} binds after `comfyq provision`: {e}"));
    }

    // A runner: no submissions, no dispatches, no commands, no stream changes.
    let pending = names.pending_subject(&pool, Priority::Normal, &acme);
    assert!(!js_publish(&runner_js, pending.clone(), "{}").await);
    assert!(
        !js_publish(
            &runner_js,
            names.dispatch_subject(&pool, Priority::High, &acme),
            "{}"
        )
        .await
    );
    assert!(!js_publish(&runner_js, names.cancel_subject(), "{}").await);
    assert!(
        runner_js
            .delete_stream(names.events_stream())
            .await
            .is_err()
    );
    assert!(
        api(
            &secured.client(&Identity::Runner).await,
            &format!("STREAM.PURGE.{}", names.events_stream()),
            json!({})
        )
        .await
        .is_none()
    );
    secured.assert_violation_logged(&pending).await;
    // What it may do, it does: its own events.
    let job = JobId::new();
    let queued = names.event_subject(&acme, &job, EventKind::State(JobStatus::Queued));
    assert!(
        js_publish(&runner_js, queued, "{}").await,
        "a runner writes events"
    );

    // Nothing refused reached a stream; everything else is still there.
    let mut pending_stream = admin_js
        .get_stream(names.pending_stream())
        .await
        .expect("pending stream");
    assert_eq!(pending_stream.info().await.expect("info").state.messages, 0);
    admin_js
        .get_stream(names.events_stream())
        .await
        .expect("the events stream was not deleted");

    // The notifier writes no record; ingress dispatches nothing and cannot
    // take over the notifier's consumer; the scheduler deletes no stream.
    let notifier_js = secured.js(&Identity::Notifier).await;
    let completed = names.event_subject(&acme, &job, EventKind::State(JobStatus::Completed));
    assert!(!js_publish(&notifier_js, completed, "{}").await);
    let ingress = secured.client(&Identity::Ingress).await;
    let ingress_js = jetstream::ContextBuilder::new()
        .timeout(REFUSED_WITHIN)
        .build(ingress.clone());
    assert!(
        !js_publish(
            &ingress_js,
            names.dispatch_subject(&pool, Priority::High, &acme),
            "{}"
        )
        .await
    );
    let takeover = format!(
        "CONSUMER.CREATE.{}.{}.{}",
        names.events_stream(),
        names.notifier_consumer(),
        names.hooks_filter()
    );
    assert!(api(&ingress, &takeover, json!({})).await.is_none());
    let scheduler_js = secured.js(&Identity::Scheduler).await;
    assert!(
        scheduler_js
            .delete_stream(names.dispatch_stream())
            .await
            .is_err()
    );
    assert!(
        !js_publish(&scheduler_js, names.preview_subject(&acme, &job), "x").await,
        "the scheduler publishes no previews"
    );

    // A refused core publish (no reply subject) is logged too: the stack
    // test's "no violations" relies on it.
    let scheduler = secured.client(&Identity::Scheduler).await;
    let preview = names.preview_subject(&globex, &job);
    scheduler
        .publish(preview.clone(), "x".into())
        .await
        .expect("sent");
    scheduler.flush().await.expect("flush");
    secured.assert_violation_logged(&preview).await;

    // No service reads another's replies.
    let runner = secured.client(&Identity::Runner).await;
    assert!(
        refused(
            (&secured, &Identity::Runner),
            &admin,
            "_INBOX_ingress.probe"
        )
        .await
    );
    assert!(
        receives(
            (&secured, &Identity::Runner),
            &admin,
            &names.runner_cancel_subject(&job)
        )
        .await
    );

    // A tenant's subscriber: its own events, live and replayed; nothing else.
    let acme_user = Identity::Tenant(acme.clone());
    let tenant = secured.client(&acme_user).await;
    let other_job = JobId::new();
    for (tenant, job) in [(&acme, job), (&globex, other_job)] {
        let subject = names.event_subject(tenant, &job, EventKind::State(JobStatus::Completed));
        admin_js
            .publish(subject, "{}".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let own = names.event_subject(&acme, &JobId::new(), EventKind::State(JobStatus::Running));
    assert!(
        receives((&secured, &acme_user), &admin, &own).await,
        "its own live events"
    );
    let theirs = names.event_subject(&globex, &other_job, EventKind::State(JobStatus::Running));
    assert!(
        refused((&secured, &acme_user), &admin, &theirs).await,
        "another tenant's events"
    );
    assert!(
        refused(
            (&secured, &acme_user),
            &admin,
            &names.tenant_events_filter(&globex)
        )
        .await
    );
    assert!(refused((&secured, &acme_user), &admin, "comfyq.>").await);
    assert!(
        refused(
            (&secured, &acme_user),
            &admin,
            &names.hook_subject(&acme, &job, EventKind::State(JobStatus::Completed))
        )
        .await
    );
    secured
        .assert_violation_logged(&names.tenant_events_filter(&globex))
        .await;

    // Replay: an ordered consumer of its own, filtered to its events.
    let tenant_js = jetstream::ContextBuilder::new()
        .timeout(REFUSED_WITHIN)
        .build(tenant.clone());
    let replay_name = format!("acme-{}", JobId::new().to_string().replace('-', ""));
    let replay = tenant_js
        .create_consumer_on_stream(
            pull::OrderedConfig {
                name: Some(format!(
                    "acme-{}",
                    JobId::new().to_string().replace('-', "")
                )),
                filter_subject: names.tenant_events_filter(&acme),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            },
            names.events_stream(),
        )
        .await
        .expect("a tenant creates its own replay");
    let mut messages = replay.messages().await.expect("replay messages");
    let first = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .expect("a replayed event in time")
        .expect("stream open")
        .expect("message");
    assert_eq!(
        names.parse_event_subject(&first.subject),
        Some((acme.clone(), job)),
        "{}",
        first.subject
    );
    // Its previews too, live and replayed; not another tenant's.
    assert!(
        receives(
            (&secured, &acme_user),
            &admin,
            &names.preview_subject(&acme, &job)
        )
        .await
    );
    assert!(
        refused(
            (&secured, &acme_user),
            &admin,
            &names.preview_subject(&globex, &other_job)
        )
        .await
    );
    let own_previews = names
        .preview_subject(&acme, &job)
        .replace(&job.to_string(), ">");
    tenant_js
        .create_consumer_on_stream(
            pull::OrderedConfig {
                name: Some(format!("{replay_name}-previews")),
                filter_subject: own_previews,
                ..Default::default()
            },
            names.previews_stream(),
        )
        .await
        .expect("a tenant replays its own previews");
    let other_previews = names
        .preview_subject(&globex, &other_job)
        .replace(&other_job.to_string(), ">");
    assert!(
        tenant_js
            .create_consumer_on_stream(
                pull::OrderedConfig {
                    name: Some("theirs".to_owned()),
                    filter_subject: other_previews,
                    ..Default::default()
                },
                names.previews_stream(),
            )
            .await
            .is_err(),
        "a tenant replays another's previews"
    );
    // A wider filter is refused, however it is asked for.
    for filter in [
        "comfyq.events.>".to_owned(),
        "comfyq.events.*.>".to_owned(),
        names.tenant_events_filter(&globex),
    ] {
        let wide = tenant_js
            .create_consumer_on_stream(
                pull::OrderedConfig {
                    name: Some("wide".to_owned()),
                    filter_subject: filter.clone(),
                    ..Default::default()
                },
                names.events_stream(),
            )
            .await;
        assert!(wide.is_err(), "a tenant consumer on {filter}");
    }
    let events = names.events_stream();
    for (request, body) in [
        // Subject says its own filter, body another: the server refuses.
        (
            format!(
                "CONSUMER.CREATE.{events}.sly.{}",
                names.tenant_events_filter(&acme)
            ),
            json!({"stream_name": events, "config": {"name": "sly", "filter_subject": "comfyq.events.>", "ack_policy": "none"}}),
        ),
        (
            format!(
                "CONSUMER.CREATE.{events}.sly.{}",
                names.tenant_events_filter(&acme)
            ),
            json!({"stream_name": events, "config": {"name": "sly", "filter_subjects": ["comfyq.events.>"], "ack_policy": "none"}}),
        ),
        // No filter in the subject at all.
        (
            format!("CONSUMER.CREATE.{events}"),
            json!({"stream_name": events, "config": {"ack_policy": "none"}}),
        ),
    ] {
        let answer = api(&tenant, &request, body).await;
        assert!(
            answer.as_ref().is_none_or(|a| a.get("error").is_some()),
            "{request} answered {answer:?}"
        );
    }
    // No direct gets, no stream info, no pulling the notifier's work.
    let direct = api(&tenant, &format!("DIRECT.GET.{events}"), json!({"seq": 1})).await;
    assert!(direct.is_none(), "direct get answered {direct:?}");
    let last_of_other = api(
        &tenant,
        &format!(
            "DIRECT.GET.{events}.{}",
            names.event_subject(&globex, &other_job, EventKind::State(JobStatus::Completed))
        ),
        json!({}),
    )
    .await;
    assert!(last_of_other.is_none(), "{last_of_other:?}");
    assert!(
        api(&tenant, &format!("STREAM.INFO.{events}"), json!({}))
            .await
            .is_none()
    );
    let steal = api(
        &tenant,
        &format!("CONSUMER.MSG.NEXT.{events}.{}", names.notifier_consumer()),
        json!({"batch": 1}),
    )
    .await;
    assert!(steal.is_none(), "{steal:?}");

    // Its own events aimed at comfyq's subjects: a push consumer delivering
    // into the commands stream or onto the runners' cancel nudges, a pull
    // whose replies go to the commands stream. The server accepts such a
    // consumer (its deliver subject is not checked against the creator's
    // permissions), but nothing arrives there (see ARCHITECTURE.md, Security).
    let mut nudges = runner
        .subscribe(names.runner_cancel_filter())
        .await
        .expect("subscribe");
    runner.flush().await.expect("flush");
    for (name, deliver_to) in [
        ("inject-jobs", names.cancel_subject()),
        ("inject-nudge", names.runner_cancel_subject(&other_job)),
    ] {
        api(
            &tenant,
            &format!(
                "CONSUMER.CREATE.{events}.{name}.{}",
                names.tenant_events_filter(&acme)
            ),
            json!({"stream_name": events, "config": {
                "name": name, "filter_subject": names.tenant_events_filter(&acme),
                "deliver_subject": deliver_to, "ack_policy": "none", "deliver_policy": "all"
            }}),
        )
        .await;
    }
    tenant
        .publish_with_reply(
            format!("$JS.API.CONSUMER.MSG.NEXT.{events}.{replay_name}"),
            names.retry_subject(),
            serde_json::to_vec(&json!({"batch": 5}))
                .expect("JSON")
                .into(),
        )
        .await
        .expect("sent");
    tenant.flush().await.expect("flush");
    let nudged = tokio::time::timeout(Duration::from_secs(2), nudges.next()).await;
    assert!(
        nudged.is_err(),
        "a tenant's events reached the runners: {nudged:?}"
    );
    let mut jobs = admin_js
        .get_stream(names.jobs_stream())
        .await
        .expect("jobs stream");
    let held = jobs.info().await.expect("info").state.messages;

    assert_eq!(held, 0, "a tenant put its events into the commands stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_auth_the_stack_runs_on_least_privilege_credentials() {
    comfyq_shared::telemetry::init_test_tracing();
    let secured = Secured::start(&[stack::TENANT]).await;
    secured.provision().await;
    let names = Names::default();
    // Slow enough nodes that a running job can be cancelled.
    let sim = comfy_sim::Simulator::start(comfy_sim::SimConfig {
        node_delay_ms: 700,
        ..Default::default()
    })
    .await
    .expect("simulator");
    let webhooks = WebhookSink::start().await;
    let shutdown = CancellationToken::new();
    let mut services = Vec::new();

    let scheduler = comfyq_scheduler::SchedulerConfig {
        nats: secured.nats(&Identity::Scheduler),
        lease_ttl: Duration::from_secs(2),
        handler_ack_wait: Duration::from_secs(3),
        tick: Duration::from_millis(100),
        ..Default::default()
    };
    services.push(tokio::spawn(async_error(
        "scheduler",
        comfyq_scheduler::run(scheduler, shutdown.child_token()),
    )));
    services.push(tokio::spawn(async_error(
        "notifier",
        comfyq_notifier::run(
            stack::notifier_config(&secured.nats(&Identity::Notifier)),
            shutdown.child_token(),
        ),
    )));
    services.push(tokio::spawn(async_error(
        "runner",
        comfyq_runner::run(
            stack::runner_config(
                &secured.nats(&Identity::Runner),
                &sim.base_url(),
                "runner-0",
                1,
            ),
            shutdown.child_token(),
        ),
    )));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api_url = format!("http://{}", listener.local_addr().expect("address"));
    let ingress = comfyq_ingress::IngressConfig {
        nats: secured.nats(&Identity::Ingress),
        allow_private_webhooks: true,
        api_keys: vec![comfyq_ingress::config::ApiKey {
            tenant: stack::TENANT.to_owned(),
            key_sha256: None,
            key: Some(comfyq_shared::config::Secret::new(stack::API_KEY)),
        }],
        ..Default::default()
    };
    services.push(tokio::spawn(async_error(
        "ingress",
        comfyq_ingress::serve(ingress, listener, shutdown.child_token()),
    )));
    let http = comfyq_tests::TestStack::client_for(stack::API_KEY);
    let alive = |services: &Vec<tokio::task::JoinHandle<()>>| {
        assert!(
            services.iter().all(|s| !s.is_finished()),
            "a service stopped; violations: {:#?}",
            secured.violations()
        );
    };
    eventually(Duration::from_secs(30), "a ready runner", async || {
        alive(&services);
        let list: Value = http
            .get(format!("{api_url}/v1/runners"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        list["runners"]
            .as_array()?
            .iter()
            .any(|r| r["ready"] == true)
            .then_some(())
    })
    .await;

    // The tenant's own subscriber follows the job live.
    let tenant = secured
        .client(&Identity::Tenant(
            TenantId::new(stack::TENANT).expect("valid"),
        ))
        .await;
    let tenant_id = TenantId::new(stack::TENANT).expect("valid");
    let mut live = tenant
        .subscribe(names.tenant_events_filter(&tenant_id))
        .await
        .expect("subscribe");
    tenant.flush().await.expect("flush");

    webhooks.respond_with(1, 410, &[]);
    let response = http
        .post(format!("{api_url}/v1/jobs"))
        .header("Idempotency-Key", "least-privilege-1")
        .json(&json!({
            "workflow": invert_workflow(32),
            "webhook": {"url": webhooks.url("/hooks/done")},
        }))
        .send()
        .await
        .expect("POST /v1/jobs");
    assert_eq!(
        response.status(),
        202,
        "{}",
        response.text().await.unwrap_or_default()
    );
    let job: Value = response.json().await.expect("job");
    let id = job["id"].as_str().expect("id").to_owned();
    let status_of = async |id: &str| -> Option<Value> {
        alive(&services);
        http.get(format!("{api_url}/v1/jobs/{id}"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    };
    let ended = |job: &Value| {
        matches!(
            job["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        )
    };
    let finished = eventually(Duration::from_secs(30), "the job completed", async || {
        status_of(&id).await.filter(ended)
    })
    .await;
    assert_eq!(finished["status"], "completed", "{finished:#}");
    // Its events replayed over SSE (an ordered consumer of ingress's).
    let sse = tokio::time::timeout(Duration::from_secs(10), async {
        http.get(format!("{api_url}/v1/jobs/{id}/events"))
            .send()
            .await
            .expect("GET events")
            .text()
            .await
            .expect("SSE body")
    })
    .await
    .expect("the SSE stream ends at the terminal event");
    assert!(sse.contains("job.completed"), "{sse}");
    for path in ["/v1/queue", "/v1/dead-letters", "/v1/runners"] {
        let answer = http
            .get(format!("{api_url}{path}"))
            .send()
            .await
            .expect("GET");
        assert_eq!(answer.status(), 200, "{path}");
    }

    // A job with an input (stored by ingress, read by the runner), its
    // webhook redelivered on request.
    use base64::Engine as _;
    let output_url = finished["outputs"][0]["url"].as_str().expect("output url");
    let png = http
        .get(format!("{api_url}{output_url}"))
        .send()
        .await
        .expect("GET output")
        .bytes()
        .await
        .expect("bytes");
    let with_input: Value = http
        .post(format!("{api_url}/v1/jobs"))
        .json(&json!({
            "workflow": {
                "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
                "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "comfyq/loaded"}}
            },
            "inputs": [{"name": "photo.png", "data": base64::engine::general_purpose::STANDARD.encode(&png)}]
        }))
        .send()
        .await
        .expect("POST /v1/jobs")
        .json()
        .await
        .expect("job");
    let with_input = with_input["id"].as_str().expect("id").to_owned();
    let done = eventually(
        Duration::from_secs(20),
        "the job with an input",
        async || status_of(&with_input).await.filter(ended),
    )
    .await;
    assert_eq!(done["status"], "completed", "{done:#}");
    // The sink answered the first delivery 410: it is dead, redeliverable.
    eventually(Duration::from_secs(15), "a dead delivery", async || {
        let all: Value = http
            .get(format!("{api_url}/v1/jobs/{id}/webhooks"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (all["deliveries"][0]["state"] == "dead").then_some(())
    })
    .await;
    let redeliver = http
        .post(format!("{api_url}/v1/jobs/{id}/webhooks/redeliver"))
        .send()
        .await
        .expect("redeliver");
    assert!(
        redeliver.status().is_success(),
        "redeliver answered {}",
        redeliver.status()
    );
    webhooks.wait_for(2, Duration::from_secs(15)).await;

    // Attempts run out: the advisory, the dead letter, an operator's retry.
    sim.inject(comfy_sim::Failure::oom(), 2);
    let doomed: Value = http
        .post(format!("{api_url}/v1/jobs"))
        .json(&json!({"workflow": invert_workflow(40)}))
        .send()
        .await
        .expect("POST /v1/jobs")
        .json()
        .await
        .expect("job");
    let doomed = doomed["id"].as_str().expect("id").to_owned();
    let failed = eventually(
        Duration::from_secs(30),
        "the job out of attempts",
        async || status_of(&doomed).await.filter(ended),
    )
    .await;
    assert_eq!(failed["status"], "failed", "{failed:#}");
    eventually(Duration::from_secs(15), "its dead letter", async || {
        let page: Value = http
            .get(format!("{api_url}/v1/dead-letters"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        page["dead_letters"]
            .as_array()?
            .iter()
            .any(|letter| letter.to_string().contains(&doomed))
            .then_some(())
    })
    .await;
    let retry = http
        .post(format!("{api_url}/v1/jobs/{doomed}/retry"))
        .send()
        .await
        .expect("retry");
    assert!(
        retry.status().is_success(),
        "retry answered {}",
        retry.status()
    );
    let requeued = eventually(Duration::from_secs(30), "the requeued job", async || {
        status_of(&doomed)
            .await
            .filter(|job| job["status"] == "completed")
    })
    .await;
    assert_eq!(requeued["status"], "completed", "{requeued:#}");

    // A running job cancelled: the command through the scheduler, its
    // nudge to the runner, `cancelled` recorded by the runner.
    let second = http
        .post(format!("{api_url}/v1/jobs"))
        // Another size: ComfyUI would answer the same workflow from its cache.
        .json(&json!({"workflow": invert_workflow(48)}))
        .send()
        .await
        .expect("POST /v1/jobs");
    assert_eq!(second.status(), 202);
    let second: Value = second.json().await.expect("job");
    let second = second["id"].as_str().expect("id").to_owned();
    eventually(
        Duration::from_secs(20),
        "the second job running",
        async || {
            status_of(&second)
                .await
                .filter(|job| job["status"] == "running")
        },
    )
    .await;
    let cancel = http
        .post(format!("{api_url}/v1/jobs/{second}/cancel"))
        .send()
        .await
        .expect("cancel");
    assert!(
        cancel.status().is_success(),
        "cancel answered {}",
        cancel.status()
    );
    let cancelled = eventually(
        Duration::from_secs(20),
        "the second job ended",
        async || status_of(&second).await.filter(ended),
    )
    .await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled:#}");

    // Its output is readable through the API (media written by the runner,
    // read by ingress), the listing shows it, the webhook came.
    let url = finished["outputs"][0]["url"].as_str().expect("output url");
    let output = http
        .get(format!("{api_url}{url}"))
        .send()
        .await
        .expect("GET output");
    assert_eq!(output.status(), 200);
    assert!(!output.bytes().await.expect("bytes").is_empty());
    let listing: Value = http
        .get(format!("{api_url}/v1/jobs"))
        .send()
        .await
        .expect("GET /v1/jobs")
        .json()
        .await
        .expect("listing");
    let listed = listing["jobs"].as_array().expect("jobs");
    assert!(
        listed.iter().any(|job| job["id"] == id.as_str()),
        "{listing:#}"
    );
    let hooks = webhooks.wait_for(1, Duration::from_secs(15)).await;
    assert_eq!(hooks[0].json()["type"], "job.completed");

    let completed = eventually(
        Duration::from_secs(5),
        "the tenant saw it complete",
        async || {
            let message = tokio::time::timeout(Duration::from_millis(200), live.next())
                .await
                .ok()??;
            message.subject.ends_with(".completed").then_some(message)
        },
    )
    .await;
    assert!(completed.subject.contains(&id), "{}", completed.subject);

    shutdown.cancel();
    for service in services {
        let _ = tokio::time::timeout(Duration::from_secs(15), service).await;
    }
    let violations = secured.violations();
    assert!(
        violations.is_empty(),
        "the services needed more than their permissions:\n{}",
        violations.join("\n")
    );
}

/// Runs a service, reporting its error (the test then sees it stopped).
async fn async_error<E: std::fmt::Display>(
    name: &'static str,
    service: impl Future<Output = Result<(), E>>,
) {
    if let Err(error) = service.await {
        eprintln!("service {name} failed: {error}");
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
struct Certificates {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn certificates(dir: &Path) -> Certificates {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        SanType,
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "comfyq test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");

    let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca, &ca_key).expect("signed");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("nats-server", ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf("comfyq", ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write PEM");
        path
    };
    Certificates {
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server-key.pem", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client-key.pem", &client_key),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_tls_connects_with_a_generated_certificate() {
    comfyq_shared::telemetry::init_test_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = certificates(dir.path());
    let server = NatsServer::start_with_config(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 2\n}}\n",
        certs.server_cert.display(),
        certs.server_key.display(),
        certs.ca.display()
    ))
    .await;
    let with_tls = |tls: NatsTlsConfig| NatsConfig {
        tls,
        connect_timeout: Duration::from_secs(2),
        ..stack::nats_config(&server.url())
    };
    let full = NatsTlsConfig {
        required: true,
        ca_file: Some(certs.ca.display().to_string()),
        cert_file: Some(certs.client_cert.display().to_string()),
        key_file: Some(certs.client_key.display().to_string()),
    };
    let client = comfyq_shared::connection::connect(&with_tls(full.clone()), "test")
        .await
        .expect("connects over TLS with the CA and a client certificate");
    // Provisioning and a JetStream round trip over it.
    let js = comfyq_shared::connection::jetstream(client);
    let names = Names::default();
    comfyq_shared::provision::provision(&js, &names, &with_tls(full.clone()))
        .await
        .expect("provisions over TLS");
    js.publish(names.cancel_subject(), "{}".into())
        .await
        .expect("publish")
        .await
        .expect("stored over TLS");

    // Without the client certificate the server refuses; without the CA
    // the client refuses the server; without TLS the server refuses.
    let no_client_cert = NatsTlsConfig {
        cert_file: None,
        key_file: None,
        ..full.clone()
    };
    let no_ca = NatsTlsConfig {
        ca_file: None,
        ..full.clone()
    };
    for (what, tls) in [
        ("no client certificate", no_client_cert),
        ("an unknown CA", no_ca),
        ("no TLS", NatsTlsConfig::default()),
    ] {
        let attempt = tokio::time::timeout(
            Duration::from_secs(10),
            comfyq_shared::connection::connect(&with_tls(tls), "test"),
        )
        .await;
        assert!(!matches!(attempt, Ok(Ok(_))), "connected with {what}");
    }
}
