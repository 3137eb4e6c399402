//! Follow one comfyq job's events over NATS, in Rust (async-nats).
//!
//! `cargo run -p comfyq-tests --example subscribe_job -- nats://127.0.0.1:4222 <tenant> <job-id>`
//!
//! Replays the job's events from the start of the EVENTS stream, then
//! follows live, printing one line per event, until the terminal one.

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use comfyq_shared::event::{Event, EventBody};
use comfyq_shared::{JobId, Names, TenantId};
use futures::StreamExt;

/// Every event of `job`, in order, up to and including the terminal one.
pub(crate) async fn follow_job(
    client: async_nats::Client,
    names: &Names,
    tenant: &TenantId,
    job: &JobId,
) -> Result<Vec<(u64, Event)>, async_nats::Error> {
    let js = jetstream::new(client);
    let stream = js.get_stream(names.events_stream()).await?;
    // An ordered consumer: ephemeral, in order, replays from the start.
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: names.job_events_filter(tenant, job),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut events = Vec::new();
    while let Some(message) = messages.next().await {
        let message = message?;
        let sequence = message.info()?.stream_sequence;
        let event: Event = serde_json::from_slice(&message.payload)?;
        let terminal = matches!(
            event.body,
            EventBody::Completed(_) | EventBody::Failed(_) | EventBody::Cancelled(_)
        );
        events.push((sequence, event));
        if terminal {
            break;
        }
    }
    Ok(events)
}

#[allow(dead_code)] // the integration tests include this file for `follow_job`
#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, tenant, job] = args.as_slice() else {
        eprintln!("usage: subscribe_job <nats-url> <tenant> <job-id>");
        std::process::exit(64);
    };
    let tenant = TenantId::new(tenant.clone())?;
    let job: JobId = job.parse()?;
    let client = async_nats::connect(url.as_str()).await?;
    for (sequence, event) in follow_job(client, &Names::default(), &tenant, &job).await? {
        println!("{sequence} {}", event.type_name());
    }
    Ok(())
}
