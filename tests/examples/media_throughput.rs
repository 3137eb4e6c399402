//! Put+get throughput of the media layer (JetStream backend) side by side
//! with raw async-nats object store calls on the same server and bucket, in
//! one run, for 1 MiB, 64 MiB and 1 GiB objects; and this process's peak
//! resident memory growth over each.
//!
//! `cargo run --release -p comfyq-tests --example media_throughput [-- SIZES_MIB...]`
//! (default `1 64 1024`; needs `NATS_SERVER_BIN` or `.tools/nats`).

use comfyq_tests::memory::rss_bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::object_store::ObjectMetadata;
use comfyq_shared::config::MediaConfig;
use comfyq_shared::ids::{JobId, TenantId};
use comfyq_shared::media::MediaStore;
use comfyq_shared::names::Names;
use comfyq_tests::NatsServer;
use tokio::io::AsyncReadExt;

/// Samples RSS every 10 ms; `finish` gives the peak growth over the start.
struct Peak {
    before: u64,
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Peak {
    fn start() -> Self {
        let before = rss_bytes();
        let peak = Arc::new(AtomicU64::new(before));
        let sampled = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                sampled.fetch_max(rss_bytes(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Self { before, peak, task }
    }

    fn finish(self) -> u64 {
        self.task.abort();
        self.peak
            .load(Ordering::Relaxed)
            .max(rss_bytes())
            .saturating_sub(self.before)
    }
}

/// `size` bytes of a repeating non-trivial pattern, produced as read.
fn source(size: u64) -> impl tokio::io::AsyncRead + Unpin + Send {
    let block: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let block = bytes::Bytes::from(block);
    let blocks = size.div_ceil(block.len() as u64);
    let stream = futures::stream::iter((0..blocks).map(move |i| {
        let left = size - i * block.len() as u64;
        Ok::<_, std::io::Error>(block.slice(..(left.min(block.len() as u64) as usize)))
    }));
    tokio_util::io::StreamReader::new(stream)
}

async fn drain(mut reader: impl tokio::io::AsyncRead + Unpin) -> u64 {
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = reader.read(&mut buffer).await.expect("read");
        if n == 0 {
            return total;
        }
        total += n as u64;
    }
}

fn mb_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1, 64, 1024]
    } else {
        sizes
    };
    let server = NatsServer::start().await;
    let js = async_nats::jetstream::new(server.client().await);
    let config = MediaConfig {
        max_object_bytes: 4 << 30,
        max_job_bytes: 4 << 30,
        ..MediaConfig::default()
    };
    let names = Names::new("comfyq").expect("names");
    let media = MediaStore::open(
        &config,
        &js,
        names.clone(),
        (Duration::from_secs(3600), 1),
        comfyq_shared::config::Provisioning::CreateOrUpdate,
    )
    .await
    .expect("open");
    let raw = js
        .get_object_store(names.media_bucket())
        .await
        .expect("bucket");
    let tenant = TenantId::new("bench".to_owned()).expect("tenant");

    println!("| size | path | put MB/s | get MB/s | peak RSS growth |");
    println!("| --- | --- | --- | --- | --- |");
    for mib in sizes {
        let size = mib << 20;
        // Raw async-nats: put from a reader, get to the end.
        let peak = Peak::start();
        let name = format!("raw-{mib}");
        let started = Instant::now();
        raw.put(
            ObjectMetadata {
                name: name.clone(),
                ..Default::default()
            },
            &mut source(size),
        )
        .await
        .expect("raw put");
        let put = started.elapsed();
        let started = Instant::now();
        let got = drain(raw.get(&name).await.expect("raw get")).await;
        let get = started.elapsed();
        assert_eq!(got, size);
        let growth = peak.finish();
        raw.delete(&name).await.expect("raw delete");
        println!(
            "| {mib} MiB | async-nats object store | {:.0} | {:.0} | {} MiB |",
            mb_s(size, put),
            mb_s(size, get),
            growth >> 20
        );

        // The media layer: sniffing, limits, SHA-256, record, checked read.
        let peak = Peak::start();
        let key = media.output_key(&tenant, &JobId::new(), "bench.bin");
        let started = Instant::now();
        media
            .put(&key, &mut source(size), 0, None)
            .await
            .expect("put");
        let put = started.elapsed();
        let started = Instant::now();
        let (_, reader) = media.get(&key).await.expect("get");
        let got = drain(reader).await;
        let get = started.elapsed();
        assert_eq!(got, size);
        let growth = peak.finish();
        media.delete(&key).await.expect("delete");
        println!(
            "| {mib} MiB | media layer (nats://) | {:.0} | {:.0} | {} MiB |",
            mb_s(size, put),
            mb_s(size, get),
            growth >> 20
        );
    }
}
