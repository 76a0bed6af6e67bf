//! Durable ingest into one node over loopback: the release `dynseg-node` binary
//! (system clock, 256 shards, fdatasync group commit) runs the nine SPEC
//! segments; a client sends batches of 1000 events for one shard each, spread
//! over DYNSEG_BENCH_USERS users (1,000,000), on several streams with a window of
//! batches in flight; a subscriber counts the changes streamed back.
//!
//! Two phases: first DYNSEG_BENCH_WARM_EVENTS events (3,000,000), during which
//! most users are new to the node (states created, memory faulted in); then
//! DYNSEG_BENCH_EVENTS more from the same users, the node's steady state.
//! Each prints events/s acknowledged, ack latency p50/p99 per batch and CPU.
//! Also: changes streamed live per second (as many as the workload causes),
//! how fast a subscriber catches up on the whole change log from its start
//! (one change per message, then `SubscribeBatches`, each reading changes in
//! place; then `SubscribeBatches` decoded into prost messages),
//! and the node's resident memory per user.
//!
//! `cargo bench -p dynseg-node --bench ingest` (DYNSEG_BENCH_EVENTS: events to
//! send, 5,000,000 by default; DYNSEG_BENCH_STREAMS: client streams, 4).

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dynseg_proto::encoded::{self, ChangeView};
use dynseg_proto::pb::{self, node_client::NodeClient};
use dynseg_proto::shard_for;
use tokio_stream::StreamExt;

// The client shares the node's two cores, and decoding every change it is
// sent allocates: a faster allocator leaves more of them to the node.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SHARDS: u32 = 256;
const BATCH: usize = 1000;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Changes read in place, counted, each shard's sequences checked to rise.
#[derive(Default)]
struct Order {
    count: u64,
    last: std::collections::HashMap<u32, u64>,
}

impl Order {
    fn check(&mut self, change: &[u8]) {
        let view = ChangeView::parse(change).unwrap();
        assert!(!view.user_id.is_empty() && !view.segment.is_empty() && view.at_ms > 0);
        let last = self.last.entry(view.shard).or_default();
        assert!(view.sequence > *last, "shard {} out of order", view.shard);
        *last = view.sequence;
        self.count += 1;
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A batch of 1000 events for users of `shard`, with the SPEC mix.
fn batch(rng: &mut Rng, shard: u32, users: &[String], serial: &mut u64) -> pb::EventBatch {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let events = (0..BATCH)
        .map(|_| {
            *serial += 1;
            let user = users[rng.below(users.len() as u64) as usize].clone();
            let mut e = pb::Event {
                message_id: format!("m{serial}"),
                user_id: user,
                r#type: pb::EventType::Track.into(),
                timestamp_ms: now - rng.below(2000) as i64,
                ..Default::default()
            };
            let value = |v: dynseg_rules::Value| pb::Value::from(&v);
            e.event = match rng.below(1000) {
                0..400 => "page_viewed",
                400..580 => "login",
                580..730 => {
                    let c = if rng.below(5) == 0 { "shoes" } else { "bags" };
                    e.properties.insert("category".into(), value(c.into()));
                    "product_viewed"
                }
                730..810 => "session_started",
                810..850 => "email_opened",
                850..890 => "campaign_sent",
                890..920 => "product_added",
                920..950 => {
                    e.properties.insert(
                        "feature".into(),
                        value(format!("f{}", rng.below(12)).as_str().into()),
                    );
                    "feature_used"
                }
                950..975 => {
                    e.r#type = pb::EventType::Identify.into();
                    let plan = ["trial", "pro", "free"][rng.below(3) as usize];
                    e.traits.insert("plan".into(), value(plan.into()));
                    ""
                }
                975..990 => {
                    e.properties.insert(
                        "revenue".into(),
                        value(dynseg_rules::Value::Number(
                            5.0 + rng.below(30_000) as f64 / 100.0,
                        )),
                    );
                    "order_completed"
                }
                _ => "checkout_completed",
            }
            .to_owned();
            e
        })
        .collect();
    pb::EventBatch {
        shard,
        epoch: 1,
        events,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p) as usize)
        .copied()
        .unwrap_or_default()
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line, in clock ticks
    // (100 per second on Linux).
    (ticks(11) + ticks(12)) / 100.0
}

/// Bytes process `pid` has handed to the kernel to write (`wchar`: the WAL,
/// sled's log and its blobs), whether or not they reached the disk yet.
fn written_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let users_n = env("DYNSEG_BENCH_USERS", 1_000_000);
    let events_n = env("DYNSEG_BENCH_EVENTS", 5_000_000);
    let warm_n = env("DYNSEG_BENCH_WARM_EVENTS", 3_000_000);
    let streams = env("DYNSEG_BENCH_STREAMS", 4);
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dynseg-node"))
        .args([
            "--data-dir",
            dir.path().join("node").to_str().unwrap(),
            "--shard-count",
            &SHARDS.to_string(),
        ])
        // Extra node flags, for trying settings (e.g. `--flush-kib 4096`).
        .args(
            std::env::var("DYNSEG_BENCH_NODE_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(addr) = line.strip_prefix("listening on ") {
            break addr.to_owned();
        }
    };
    let rss_start = rss_bytes(pid);
    let mut client = NodeClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let segments = dynseg_rules::examples::spec_segments()
        .iter()
        .map(pb::SegmentDef::from)
        .collect();
    let mut progress = client
        .apply_rules(pb::ApplyRulesRequest {
            version: 1,
            segments,
        })
        .await
        .unwrap()
        .into_inner();
    while progress.message().await.unwrap().is_some() {}

    // Users by shard.
    let mut by_shard: Vec<Vec<String>> = vec![Vec::new(); SHARDS as usize];
    for u in 0..users_n {
        let user = format!("user-{u:09}");
        by_shard[shard_for(&user, SHARDS) as usize].push(user);
    }
    let by_shard = Arc::new(by_shard);

    // Subscriber.
    let streamed = Arc::new(AtomicU64::new(0));
    let counter = streamed.clone();
    let mut feed = client
        .subscribe(pb::SubscribeRequest {
            from_now: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(_)) = feed.message().await {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });

    // First every user is new to the node (states created, memory faulted
    // in); then the same users send more, as in a node's steady state.
    let warm = run_phase(&client, &by_shard, streams, warm_n, 1, pid).await;
    let streamed_before = streamed.load(Ordering::Relaxed);
    let steady = run_phase(&client, &by_shard, streams, events_n, 2, pid).await;
    let streamed_during = streamed.load(Ordering::Relaxed) - streamed_before;
    let status = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let users: u64 = status.shards.iter().map(|s| s.users_total).sum();
    // Before catch-up readers add their pages of history.
    let rss_ingested = rss_bytes(pid);
    let logged: u64 = status.shards.iter().map(|s| s.last_sequence).sum();
    // A checkpoint may still be running after the last ack: catch-up is
    // measured once the node is idle (under 10 ms of CPU in 200 ms), so that
    // it measures serving changes alone.
    let settled = Instant::now();
    loop {
        let before = cpu_seconds(&pid.to_string());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let busy = cpu_seconds(&pid.to_string()) - before;
        if busy < 0.01 || settled.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    println!(
        "node idle after ingest: {:.1} s later",
        settled.elapsed().as_secs_f64()
    );

    // Subscribers catching up from the start of every shard's log: how fast
    // the node streams changes when there are many to send. They read each
    // change in place (user, segment, time, cursor) and check that every
    // shard's sequences rise, so that the client's share of the two cores is
    // small and the rate is the node's; the last one decodes every change
    // into prost messages, as a typed client does.
    let mut reader = encoded::node_client::NodeClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let catch_up = Instant::now();
    let mut history = reader
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut order = Order::default();
    while order.count < logged {
        match history.message().await {
            Ok(Some(change)) => order.check(&change.0),
            _ => break,
        }
    }
    let catch_up = catch_up.elapsed();
    let replayed = order.count;

    let batched_cpu = (cpu_seconds(&pid.to_string()), cpu_seconds("self"));
    let batched_catch_up = Instant::now();
    let mut history = reader
        .subscribe_batches(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let (mut order, mut messages) = (Order::default(), 0u64);
    while order.count < logged {
        match history.message().await {
            Ok(Some(batch)) => {
                batch.changes.iter().for_each(|change| order.check(change));
                messages += 1;
            }
            _ => break,
        }
    }
    let batched_catch_up = batched_catch_up.elapsed();
    let batched_cpu = (
        cpu_seconds(&pid.to_string()) - batched_cpu.0,
        cpu_seconds("self") - batched_cpu.1,
    );
    let replayed_batched = order.count;

    let typed_catch_up = Instant::now();
    let mut history = client
        .subscribe_batches(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut replayed_typed = 0u64;
    while replayed_typed < logged {
        match history.message().await {
            Ok(Some(batch)) => replayed_typed += batch.changes.len() as u64,
            _ => break,
        }
    }
    let typed_catch_up = typed_catch_up.elapsed();
    let rss = rss_bytes(pid);
    for (name, phase) in [("first sight of users", &warm), ("users known", &steady)] {
        println!("{name}:");
        phase.print();
    }
    println!(
        "changes streamed:      {streamed_during} while users were known ({:.0}/s)",
        streamed_during as f64 / steady.elapsed.as_secs_f64()
    );
    println!(
        "changes caught up, read in place: {replayed} of {logged} from the start of the log in {:.1} s ({:.0}/s)",
        catch_up.as_secs_f64(),
        replayed as f64 / catch_up.as_secs_f64()
    );
    println!(
        "changes caught up, batched, read in place: {replayed_batched} of {logged} in {messages} messages in {:.1} s ({:.0}/s)",
        batched_catch_up.as_secs_f64(),
        replayed_batched as f64 / batched_catch_up.as_secs_f64()
    );
    println!(
        "  CPU: node {:.1} s, client {:.1} s",
        batched_cpu.0, batched_cpu.1
    );
    println!(
        "changes caught up, batched, decoded into prost messages: {replayed_typed} of {logged} in {:.1} s ({:.0}/s)",
        typed_catch_up.as_secs_f64(),
        replayed_typed as f64 / typed_catch_up.as_secs_f64()
    );
    println!("users:                 {users}");
    for (when, rss) in [("after ingest", rss_ingested), ("after catch-up", rss)] {
        println!(
            "node resident memory {when}: {} MiB ({:.0} bytes per user)",
            rss / (1 << 20),
            (rss.saturating_sub(rss_start)) as f64 / users.max(1) as f64
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// What one phase of ingest measured.
struct Phase {
    acked: u64,
    elapsed: Duration,
    /// Per batch, sorted.
    latencies: Vec<Duration>,
    node_cpu: f64,
    client_cpu: f64,
    node_written: u64,
}

impl Phase {
    fn print(&self) {
        println!(
            "  events acknowledged: {} in {:.1} s: {:.0} events/s",
            self.acked,
            self.elapsed.as_secs_f64(),
            self.acked as f64 / self.elapsed.as_secs_f64()
        );
        println!(
            "  ack latency per batch: p50 {:?}, p99 {:?} ({} batches)",
            percentile(&self.latencies, 0.5),
            percentile(&self.latencies, 0.99),
            self.latencies.len()
        );
        println!(
            "  CPU: node {:.1} s ({:.0} events per node CPU-second), client {:.1} s",
            self.node_cpu,
            self.acked as f64 / self.node_cpu.max(0.001),
            self.client_cpu
        );
        println!(
            "  written by the node: {} MiB ({:.0} bytes per event)",
            self.node_written >> 20,
            self.node_written as f64 / self.acked.max(1) as f64
        );
    }
}

/// Sends `events` on `streams` streams of batches, each with a window of 8 in
/// flight, and waits for every ack. `phase` keeps message ids distinct across
/// phases (a repeat would be deduplicated, not applied).
async fn run_phase(
    client: &NodeClient<tonic::transport::Channel>,
    by_shard: &Arc<Vec<Vec<String>>>,
    streams: u64,
    events: u64,
    phase: u64,
    pid: u32,
) -> Phase {
    let node_cpu_start = cpu_seconds(&pid.to_string());
    let client_cpu_start = cpu_seconds("self");
    let written_start = written_bytes(pid);
    let batches_total = events / BATCH as u64;
    let per_stream = batches_total / streams;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..streams {
        let mut client = client.clone();
        let by_shard = by_shard.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (s + 1) ^ (phase << 32));
            let mut serial = phase * 100_000_000_000_000 + s * 1_000_000_000_000;
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::EventBatch>(8);
            let sent_at = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
            let stamps = sent_at.clone();
            let producer = tokio::task::spawn_blocking(move || {
                for _ in 0..per_stream {
                    let shard = rng.below(u64::from(SHARDS)) as u32;
                    let b = batch(&mut rng, shard, &by_shard[shard as usize], &mut serial);
                    stamps.lock().unwrap().push_back(Instant::now());
                    if tx.blocking_send(b).is_err() {
                        return;
                    }
                }
            });
            let mut responses = client
                .ingest_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let mut latencies = Vec::with_capacity(per_stream as usize);
            let mut acked = 0u64;
            while let Some(response) = responses.next().await {
                let response = response.unwrap();
                acked += u64::from(response.accepted);
                if let Some(sent) = sent_at.lock().unwrap().pop_front() {
                    latencies.push(sent.elapsed());
                }
            }
            producer.await.unwrap();
            (acked, latencies)
        }));
    }
    let mut acked = 0;
    let mut latencies = Vec::new();
    for task in tasks {
        let (a, l) = task.await.unwrap();
        acked += a;
        latencies.extend(l);
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Phase {
        acked,
        elapsed,
        latencies,
        node_cpu: cpu_seconds(&pid.to_string()) - node_cpu_start,
        client_cpu: cpu_seconds("self") - client_cpu_start,
        node_written: written_bytes(pid) - written_start,
    }
}
