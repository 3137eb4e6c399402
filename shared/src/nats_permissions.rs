//! What each comfyq identity may publish and subscribe to on NATS, built
//! from [`Names`] so the permissions cannot drift from the subjects the
//! code uses. `comfyq nats-config` renders them into a nats-server config.
//!
//! Identities: `admin` (everything in the account: the one that creates and
//! updates streams, buckets and durable consumers, `comfyq provision`), one
//! per service, and `tenant-<t>` for a tenant's own NATS subscribers (its
//! events and previews, live and replayed, nothing else).
//!
//! Each identity gets its own inbox prefix ([`Identity::inbox_prefix`]), the
//! only reply subjects it may subscribe to: no identity reads another's
//! replies (which carry records, media and consumer deliveries).

use std::collections::BTreeSet;

use crate::ids::TenantId;
use crate::names::Names;

/// One NATS user of comfyq's account.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Identity {
    Admin,
    Ingress,
    Scheduler,
    Runner,
    Notifier,
    /// A tenant's own subscriber: its events and previews only.
    Tenant(TenantId),
}

impl Identity {
    /// The four services, in the order they are listed.
    pub const SERVICES: [Identity; 4] = [
        Identity::Ingress,
        Identity::Scheduler,
        Identity::Runner,
        Identity::Notifier,
    ];

    /// The user's name (and the file stem of its seed and settings).
    pub fn user(&self) -> String {
        match self {
            Identity::Admin => "admin".to_owned(),
            Identity::Ingress => "ingress".to_owned(),
            Identity::Scheduler => "scheduler".to_owned(),
            Identity::Runner => "runner".to_owned(),
            Identity::Notifier => "notifier".to_owned(),
            Identity::Tenant(tenant) => format!("tenant-{tenant}"),
        }
    }

    /// The reply-subject prefix this identity's connections must use
    /// (`nats.inbox_prefix`).
    pub fn inbox_prefix(&self) -> String {
        format!("_INBOX_{}", self.user())
    }
}

/// Subjects allowed and denied in one direction (deny wins).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    pub allow: BTreeSet<String>,
    pub deny: BTreeSet<String>,
}

/// A user's publish and subscribe permissions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Rules,
    pub subscribe: Rules,
}

/// The JetStream API subject of `request` (e.g. `STREAM.INFO.X`).
fn api(request: &str) -> String {
    format!("$JS.API.{request}")
}

/// The durable consumers comfyq creates, by stream: only their owner may
/// pull from them, and only the admin may create, change or delete them.
fn durables(names: &Names) -> Vec<(String, String)> {
    vec![
        (names.events_stream(), names.notifier_consumer()),
        (names.jobs_stream(), names.scheduler_cancel_consumer()),
        (names.jobs_stream(), names.scheduler_retry_consumer()),
        (
            names.advisories_stream(),
            names.scheduler_advisories_consumer(),
        ),
        (names.webhooks_stream(), names.notifier_redeliver_consumer()),
        (names.pending_stream(), names.dispatcher_consumer()),
    ]
}

/// Builds one identity's permissions grant by grant.
struct Grants<'a> {
    names: &'a Names,
    permissions: Permissions,
    /// `(stream, durable)` this identity pulls from (not denied to it).
    own_durables: Vec<(String, String)>,
    /// `(stream, durable)` this identity also creates and deletes.
    managed_durables: Vec<(String, String)>,
}

impl<'a> Grants<'a> {
    fn new(names: &'a Names, identity: &Identity) -> Self {
        let mut grants = Self {
            names,
            permissions: Permissions::default(),
            own_durables: Vec::new(),
            managed_durables: Vec::new(),
        };
        grants.subscribe(format!("{}.>", identity.inbox_prefix()));
        grants
    }

    fn publish(&mut self, subject: String) {
        self.permissions.publish.allow.insert(subject);
    }

    fn subscribe(&mut self, subject: String) {
        self.permissions.subscribe.allow.insert(subject);
    }

    /// Stream info (also what binding a KV bucket or object store costs).
    fn info(&mut self, stream: &str) {
        self.publish(api(&format!("STREAM.INFO.{stream}")));
    }

    /// Info and message reads: direct gets (by sequence, last by subject)
    /// and the leader's message get.
    fn read(&mut self, stream: &str) {
        self.info(stream);
        self.publish(api(&format!("DIRECT.GET.{stream}")));
        self.publish(api(&format!("DIRECT.GET.{stream}.>")));
        self.publish(api(&format!("STREAM.MSG.GET.{stream}")));
    }

    /// Ephemeral (ordered) consumers of any filter on `stream`, as
    /// replays, watches and listings create them.
    fn ephemeral_consumers(&mut self, stream: &str) {
        self.publish(api(&format!("CONSUMER.CREATE.{stream}")));
        self.publish(api(&format!("CONSUMER.CREATE.{stream}.>")));
        self.ephemeral_use(stream);
    }

    /// Pulling from, reading and deleting consumers of `stream` (the
    /// durables of others are denied in [`Grants::finish`]).
    fn ephemeral_use(&mut self, stream: &str) {
        self.publish(api(&format!("CONSUMER.MSG.NEXT.{stream}.*")));
        self.publish(api(&format!("CONSUMER.INFO.{stream}.*")));
        self.publish(api(&format!("CONSUMER.DELETE.{stream}.*")));
        // Flow control of push-based ordered consumers (KV watches).
        self.publish(format!("$JS.FC.{stream}.>"));
    }

    /// Pulling from and acknowledging one durable consumer.
    fn pull(&mut self, stream: String, durable: String) {
        self.publish(api(&format!("CONSUMER.INFO.{stream}.{durable}")));
        self.publish(api(&format!("CONSUMER.MSG.NEXT.{stream}.{durable}")));
        self.publish(format!("$JS.ACK.{stream}.{durable}.>"));
        self.own_durables.push((stream, durable));
    }

    /// Creating, updating and deleting one durable consumer (and pulling).
    fn manage(&mut self, stream: String, durable: String) {
        self.publish(api(&format!("CONSUMER.CREATE.{stream}.{durable}")));
        self.publish(api(&format!("CONSUMER.CREATE.{stream}.{durable}.>")));
        self.publish(api(&format!("CONSUMER.DELETE.{stream}.{durable}")));
        self.managed_durables
            .push((stream.clone(), durable.clone()));
        self.pull(stream, durable);
    }

    fn delete_messages(&mut self, stream: &str) {
        self.publish(api(&self.names.message_delete_api(stream)));
    }

    fn kv_read(&mut self, bucket: &str) {
        let stream = format!("KV_{bucket}");
        self.read(&stream);
        self.ephemeral_consumers(&stream);
    }

    fn kv_write(&mut self, bucket: &str) {
        self.kv_read(bucket);
        self.publish(format!("$KV.{bucket}.>"));
    }

    /// Reads and writes of the object store (writes purge replaced chunks).
    fn objects(&mut self, bucket: &str) {
        let stream = format!("OBJ_{bucket}");
        self.read(&stream);
        self.ephemeral_consumers(&stream);
        self.publish(format!("$O.{bucket}.>"));
        self.publish(api(&format!("STREAM.PURGE.{stream}")));
    }

    /// Denies every durable this identity does not own: no pull, no info,
    /// no create, update or delete (deny wins over the wildcards above).
    fn finish(mut self) -> Permissions {
        for (stream, durable) in durables(self.names) {
            let is = |(s, d): &(String, String)| *s == stream && *d == durable;
            let owned = self.own_durables.iter().any(is);
            let managed = self.managed_durables.iter().any(is);
            let deny = &mut self.permissions.publish.deny;
            if !managed {
                deny.insert(api(&format!("CONSUMER.CREATE.{stream}.{durable}")));
                deny.insert(api(&format!("CONSUMER.CREATE.{stream}.{durable}.>")));
                deny.insert(api(&format!("CONSUMER.DELETE.{stream}.{durable}")));
            }
            if !owned {
                deny.insert(api(&format!("CONSUMER.MSG.NEXT.{stream}.{durable}")));
                deny.insert(api(&format!("CONSUMER.INFO.{stream}.{durable}")));
                deny.insert(format!("$JS.ACK.{stream}.{durable}.>"));
            }
        }
        self.permissions
    }
}

/// The permissions of `identity`. The admin's are everything (`>`): it is
/// confined to comfyq's account, not to comfyq's subjects.
pub fn permissions(names: &Names, identity: &Identity) -> Permissions {
    if *identity == Identity::Admin {
        let mut all = Permissions::default();
        all.publish.allow.insert(">".to_owned());
        all.subscribe.allow.insert(">".to_owned());
        return all;
    }
    let p = names.prefix();
    let events = names.events_stream();
    let mut g = Grants::new(names, identity);
    // Every service binds to everything at start (check-only provisioning).
    if !matches!(identity, Identity::Tenant(_)) {
        for stream in [
            names.jobs_stream(),
            names.dispatch_stream(),
            names.pending_stream(),
            names.advisories_stream(),
            names.webhooks_stream(),
            names.previews_stream(),
            events.clone(),
            format!("OBJ_{}", names.media_bucket()),
        ] {
            g.info(&stream);
        }
        for bucket in [
            names.runners_bucket(),
            names.capabilities_bucket(),
            names.scheduler_bucket(),
            names.idempotency_bucket(),
            names.webhooks_bucket(),
            names.dead_letters_bucket(),
        ] {
            g.info(&format!("KV_{bucket}"));
        }
    }
    match identity {
        Identity::Admin => unreachable!("returned above"),
        Identity::Ingress => {
            // Records and their first states, webhook work, waiting jobs,
            // commands for the scheduler and the notifier.
            g.publish(format!("{p}.events.>"));
            g.publish(format!("{p}.hooks.>"));
            g.publish(format!("{p}.pending.>"));
            g.publish(names.cancel_subject());
            g.publish(names.retry_subject());
            g.publish(names.webhook_redeliver_subject());
            // Reads: records, `?wait`, SSE, listing, queue positions.
            g.read(&events);
            g.ephemeral_consumers(&events);
            g.subscribe(format!("{p}.events.>"));
            g.read(&names.pending_stream());
            g.read(&names.dispatch_stream());
            // The queue view: each pool's dispatch consumer.
            let dispatch = names.dispatch_stream();
            g.publish(api(&format!("CONSUMER.INFO.{dispatch}.*")));
            g.publish(api(&format!("CONSUMER.LIST.{dispatch}")));
            g.publish(api(&format!("CONSUMER.NAMES.{dispatch}")));
            g.kv_write(&names.idempotency_bucket());
            g.kv_read(&names.runners_bucket());
            g.kv_read(&names.capabilities_bucket());
            g.kv_read(&names.webhooks_bucket());
            g.kv_read(&names.dead_letters_bucket());
            g.objects(&names.media_bucket());
        }
        Identity::Scheduler => {
            g.publish(format!("{p}.events.>"));
            g.publish(format!("{p}.hooks.>"));
            g.publish(format!("{p}.dispatch.>"));
            g.publish(format!("{p}.pending.>"));
            g.publish(names.runner_cancel_filter());
            g.subscribe(names.runner_cancel_filter());
            // In-flight counts follow the runners' acks of dispatches.
            g.subscribe(names.dispatch_acks_filter());
            g.read(&events);
            g.ephemeral_consumers(&events);
            g.read(&names.pending_stream());
            g.read(&names.dispatch_stream());
            g.read(&names.advisories_stream());
            // A cancelled waiting job, a handled advisory, an exhausted dispatch.
            g.delete_messages(&names.pending_stream());
            g.delete_messages(&names.advisories_stream());
            g.delete_messages(&names.dispatch_stream());
            // The dispatcher's consumer is made anew for each leadership.
            g.manage(names.pending_stream(), names.dispatcher_consumer());
            g.pull(names.jobs_stream(), names.scheduler_cancel_consumer());
            g.pull(names.jobs_stream(), names.scheduler_retry_consumer());
            g.pull(
                names.advisories_stream(),
                names.scheduler_advisories_consumer(),
            );
            g.kv_write(&names.scheduler_bucket());
            g.kv_write(&names.dead_letters_bucket());
            g.kv_read(&names.runners_bucket());
            g.kv_read(&names.capabilities_bucket());
        }
        Identity::Runner => {
            g.publish(format!("{p}.events.>"));
            g.publish(format!("{p}.hooks.>"));
            g.publish(format!("{p}.previews.>"));
            g.subscribe(names.runner_cancel_filter());
            g.read(&events);
            // Any pool's dispatch consumer (pools are the runners' choice;
            // only the admin creates those consumers).
            let dispatch = names.dispatch_stream();
            g.publish(api(&format!("CONSUMER.INFO.{dispatch}.*")));
            g.publish(api(&format!("CONSUMER.MSG.NEXT.{dispatch}.*")));
            g.publish(format!("$JS.ACK.{dispatch}.>"));
            g.kv_write(&names.runners_bucket());
            g.kv_write(&names.capabilities_bucket());
            g.objects(&names.media_bucket());
        }
        Identity::Notifier => {
            g.read(&events);
            g.pull(events.clone(), names.notifier_consumer());
            g.pull(names.webhooks_stream(), names.notifier_redeliver_consumer());
            g.kv_write(&names.webhooks_bucket());
        }
        Identity::Tenant(tenant) => {
            // Live: core subscriptions to its own subjects only.
            let own_events = names.tenant_events_filter(tenant);
            let own_previews = format!("{p}.previews.{tenant}.>");
            g.subscribe(own_events.clone());
            g.subscribe(own_previews.clone());
            // Replay: consumers it creates itself, only with a filter inside
            // its own subjects (the server refuses a create whose body's
            // filter differs from the one in the subject). No stream info
            // (its subject counts name other tenants' jobs), no direct gets.
            for (stream, filter) in [
                (events.clone(), own_events),
                (names.previews_stream(), own_previews),
            ] {
                g.publish(api(&format!("CONSUMER.CREATE.{stream}.*.{filter}")));
                g.ephemeral_use(&stream);
            }
        }
    }
    g.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use crate::ids::{JobId, PoolName};
    use crate::job::JobStatus;
    use crate::names::subject_matches;
    use crate::priority::Priority;

    fn allowed(rules: &Rules, subject: &str) -> bool {
        rules.allow.iter().any(|f| subject_matches(f, subject))
            && !rules.deny.iter().any(|f| subject_matches(f, subject))
    }

    #[test]
    fn services_may_write_only_their_own_subjects() {
        let names = Names::default();
        let tenant = TenantId::new("acme").expect("valid");
        let pool = PoolName::new("gpu").expect("valid");
        let job = JobId::new();
        let pending = names.pending_subject(&pool, Priority::Normal, &tenant);
        let dispatch = names.dispatch_subject(&pool, Priority::Normal, &tenant);
        let state = names.event_subject(&tenant, &job, EventKind::State(JobStatus::Queued));
        let publish = |identity: Identity, subject: &str| {
            allowed(&permissions(&names, &identity).publish, subject)
        };
        assert!(publish(Identity::Ingress, &pending));
        assert!(!publish(Identity::Runner, &pending));
        assert!(!publish(Identity::Notifier, &pending));
        assert!(publish(Identity::Scheduler, &dispatch));
        assert!(!publish(Identity::Ingress, &dispatch));
        assert!(!publish(Identity::Runner, &dispatch));
        assert!(!publish(Identity::Runner, &names.cancel_subject()));
        assert!(publish(Identity::Runner, &state));
        assert!(!publish(Identity::Notifier, &state));
        for service in Identity::SERVICES {
            for forbidden in [
                "STREAM.CREATE.X",
                "STREAM.UPDATE.COMFYQ_EVENTS",
                "STREAM.DELETE.COMFYQ_EVENTS",
                "STREAM.PURGE.COMFYQ_EVENTS",
                "CONSUMER.CREATE.COMFYQ_EVENTS.notifier.comfyq.hooks.>",
                "CONSUMER.DELETE.COMFYQ_JOBS.scheduler-cancel",
                "CONSUMER.CREATE.COMFYQ_DISPATCH.dispatch-gpu.comfyq.dispatch.gpu.>",
            ] {
                assert!(
                    !publish(service.clone(), &api(forbidden)),
                    "{service:?} {forbidden}"
                );
            }
        }
    }

    #[test]
    fn a_tenant_reads_only_its_own_events_and_previews() {
        let names = Names::default();
        let acme = TenantId::new("acme").expect("valid");
        let globex = TenantId::new("globex").expect("valid");
        let job = JobId::new();
        let rules = permissions(&names, &Identity::Tenant(acme.clone()));
        let done = EventKind::State(JobStatus::Completed);
        assert!(allowed(
            &rules.subscribe,
            &names.event_subject(&acme, &job, done)
        ));
        assert!(!allowed(
            &rules.subscribe,
            &names.event_subject(&globex, &job, done)
        ));
        assert!(allowed(
            &rules.subscribe,
            &names.preview_subject(&acme, &job)
        ));
        assert!(!allowed(
            &rules.subscribe,
            &names.preview_subject(&globex, &job)
        ));
        assert!(!allowed(
            &rules.subscribe,
            &names.hook_subject(&acme, &job, done)
        ));
        assert!(!allowed(&rules.subscribe, "_INBOX.x"));
        assert!(allowed(&rules.subscribe, "_INBOX_tenant-acme.x"));
        let create = |filter: &str| api(&format!("CONSUMER.CREATE.COMFYQ_EVENTS.c1.{filter}"));
        assert!(allowed(&rules.publish, &create("comfyq.events.acme.>")));
        assert!(allowed(
            &rules.publish,
            &create(&format!("comfyq.events.acme.{job}.>"))
        ));
        assert!(!allowed(&rules.publish, &create("comfyq.events.>")));
        assert!(!allowed(&rules.publish, &create("comfyq.events.*.>")));
        assert!(!allowed(&rules.publish, &create("comfyq.events.globex.>")));
        assert!(!allowed(
            &rules.publish,
            &api("CONSUMER.CREATE.COMFYQ_EVENTS.c1")
        ));
        assert!(!allowed(
            &rules.publish,
            &api("CONSUMER.CREATE.COMFYQ_EVENTS")
        ));
        assert!(!allowed(&rules.publish, &api("DIRECT.GET.COMFYQ_EVENTS")));
        assert!(!allowed(&rules.publish, &api("STREAM.INFO.COMFYQ_EVENTS")));
        assert!(!allowed(
            &rules.publish,
            &api("CONSUMER.MSG.NEXT.COMFYQ_EVENTS.notifier")
        ));
        assert!(allowed(
            &rules.publish,
            &api("CONSUMER.MSG.NEXT.COMFYQ_EVENTS.c1")
        ));
    }
}
