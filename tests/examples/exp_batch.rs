#![allow(clippy::unwrap_used)]
use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use std::time::Instant;

#[tokio::main]
async fn main() {
    let client = async_nats::connect("127.0.0.1:14224").await.unwrap();
    let js = jetstream::new(client.clone());
    let _ = js.delete_stream("EXP").await;
    js.create_stream(stream::Config {
        name: "EXP".into(),
        subjects: vec!["ev.>".into()],
        allow_atomic_publish: true,
        allow_message_ttl: true,
        allow_direct: true,
        storage: if std::env::var("MEM").is_ok() {
            stream::StorageType::Memory
        } else {
            stream::StorageType::File
        },
        ..Default::default()
    })
    .await
    .unwrap();
    for round in 0..3 {
        let t = Instant::now();
        for i in 0..200 {
            js.publish(format!("ev.single.{round}.{i}"), "x".into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        println!("single: {:?} per publish", t.elapsed() / 200);
        let t = Instant::now();
        for i in 0..200 {
            let id = format!("b{round}-{i}");
            for k in 1..=3 {
                let mut h = HeaderMap::new();
                h.insert("Nats-Batch-Id", id.as_str());
                h.insert("Nats-Batch-Sequence", k.to_string().as_str());
                if k == 3 {
                    h.insert("Nats-Batch-Commit", "1");
                    js.publish_with_headers(format!("ev.b.{round}.{i}.{k}"), h, "x".into())
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                } else {
                    client
                        .publish_with_headers(format!("ev.b.{round}.{i}.{k}"), h, "x".into())
                        .await
                        .unwrap();
                }
            }
        }
        println!("batch of 3: {:?} per batch", t.elapsed() / 200);
        let t = Instant::now();
        for i in 0..200 {
            let id = format!("f{round}-{i}");
            for k in 1..=3 {
                let mut h = HeaderMap::new();
                h.insert("Nats-Batch-Id", id.as_str());
                h.insert("Nats-Batch-Sequence", k.to_string().as_str());
                if k == 3 {
                    h.insert("Nats-Batch-Commit", "1");
                    js.publish_with_headers(format!("ev.f.{round}.{i}.{k}"), h, "x".into())
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                } else {
                    client
                        .publish_with_headers(format!("ev.f.{round}.{i}.{k}"), h, "x".into())
                        .await
                        .unwrap();
                    client.flush().await.unwrap();
                }
            }
        }
        println!("batch of 3 with flushes: {:?} per batch", t.elapsed() / 200);
    }
}
