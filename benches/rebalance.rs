//! Scaling benchmark on loopback with real processes: a control member, two
//! nodes and a gateway take ingest at full speed; after a preload and a steady
//! measurement a third node joins and shards move to it while the load goes on.
//! Reports the move throughput (snapshot MiB/s and users/s over the whole
//! rebalance) and the ingest rate during the moves relative to before them.
//!
//! `cargo bench -p dynseg-cli --bench rebalance` (release build of `dynseg`).
//! Environment: BENCH_USERS (default 200000), BENCH_PRELOAD_SECS (20),
//! BENCH_STEADY_SECS (10), BENCH_CONNECTIONS (8), BENCH_BATCH (500),
//! BENCH_SHARDS (64), BENCH_MAX_MOVES (1), BENCH_MOVE_MIB (16: each node's
//! `--move-mib-per-sec`).

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::print_stderr,
    missing_docs
)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dynseg_cli::traffic::Traffic;
use dynseg_proto::pb;
use dynseg_proto::pb::gateway_client::GatewayClient;
use dynseg_proto::pb::node_client::NodeClient;
use support::{
    Process, apply_spec_segments, args, env_number, free_ports, start_control, topology,
};

/// Acked events at each 100 ms tick, from the start of the load.
struct Samples {
    start: Instant,
    counts: Vec<(Duration, u64)>,
}

impl Samples {
    /// Events per second between two instants (nearest samples).
    fn rate(&self, from: Instant, to: Instant) -> f64 {
        let at = |t: Instant| {
            let offset = t.saturating_duration_since(self.start);
            self.counts
                .iter()
                .min_by_key(|(d, _)| d.abs_diff(offset))
                .copied()
                .unwrap_or_default()
        };
        let ((d0, c0), (d1, c1)) = (at(from), at(to));
        (c1 - c0) as f64 / (d1 - d0).as_secs_f64().max(1e-3)
    }
}

#[tokio::main]
async fn main() {
    let users = env_number("BENCH_USERS", 200_000);
    let preload = Duration::from_secs(env_number("BENCH_PRELOAD_SECS", 20));
    let steady = Duration::from_secs(env_number("BENCH_STEADY_SECS", 10));
    let connections = env_number("BENCH_CONNECTIONS", 8);
    let batch = env_number("BENCH_BATCH", 500) as usize;
    let shards = env_number("BENCH_SHARDS", 64) as u32;
    let max_moves = env_number("BENCH_MAX_MOVES", 1) as u32;
    let move_mib = std::env::var("BENCH_MOVE_MIB").unwrap_or_else(|_| "16".into());
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(5);
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let control_addr = addr(0);
    let (_control, mut control) =
        start_control(&dir.path().join("control"), &control_addr, shards).await;
    control
        .rebalance(pb::RebalanceRequest { max_moves })
        .await
        .unwrap();
    let node_args = |i: usize| {
        args(
            &format!(
                "node --node-id node-{i} --listen {} --control {control_addr} --shard-count {shards} --move-mib-per-sec {move_mib} --data-dir",
                addr(1 + i)
            ),
            &dir.path().join(format!("node{i}")),
        )
    };
    let _nodes: Vec<Process> = (0..2)
        .map(|i| Process::start(&node_args(i), "listening on"))
        .collect();
    let gateway_addr = addr(4);
    let _gateway = Process::start(
        &args(
            &format!("gateway --control {control_addr} --listen"),
            std::path::Path::new(&gateway_addr),
        ),
        "listening on",
    );
    loop {
        let t = topology(&mut control).await;
        if t.nodes.len() == 2
            && t.moves.is_empty()
            && t.pending_moves == 0
            && !t.gateways.is_empty()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    apply_spec_segments(&mut control).await;

    // The load: `connections` clients sending batches as fast as acked.
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for c in 0..connections {
        let (acked, stop) = (acked.clone(), stop.clone());
        let url = format!("http://{gateway_addr}");
        load.push(tokio::spawn(async move {
            let mut client = GatewayClient::connect(url).await.unwrap();
            let mut traffic = Traffic::new(users, 1_000 + c);
            while !stop.load(Ordering::Relaxed) {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as i64;
                let events: Vec<pb::Event> = (0..batch).map(|_| traffic.next_event(now)).collect();
                // Retries (same message ids) ride through moves and restarts.
                if client.ingest(pb::IngestRequest { events }).await.is_ok() {
                    acked.fetch_add(batch as u64, Ordering::Relaxed);
                }
            }
        }));
    }
    let start = Instant::now();
    let sampler = {
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut samples = Samples {
                start,
                counts: Vec::new(),
            };
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                samples
                    .counts
                    .push((start.elapsed(), acked.load(Ordering::Relaxed)));
            }
            samples
        })
    };

    tokio::time::sleep(preload).await;
    let steady_from = Instant::now();
    tokio::time::sleep(steady).await;
    let steady_to = Instant::now();

    // A third node joins; shards move to it under the same load.
    let _third = Process::start(&node_args(2), "listening on");
    let moves_from = Instant::now();
    loop {
        let t = topology(&mut control).await;
        if t.nodes.len() == 3 && t.moves.is_empty() && t.pending_moves == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moves_to = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        let _ = task.await;
    }
    let samples = sampler.await.unwrap();

    let mut third = NodeClient::connect(format!("http://{}", addr(3)))
        .await
        .unwrap();
    let status = third
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let moved_users: u64 = status.shards.iter().map(|s| s.users_total).sum();
    let moved_bytes = status.moved_in_bytes;
    let seconds = (moves_to - moves_from).as_secs_f64();
    let before = samples.rate(steady_from, steady_to);
    let during = samples.rate(moves_from, moves_to);
    println!(
        "rebalance: {} shards ({} users, {:.1} MiB of snapshots) moved to a third node in {seconds:.2} s, {max_moves} at a time, at most {move_mib} MiB/s each",
        status.shards.len(),
        moved_users,
        moved_bytes as f64 / f64::from(1 << 20),
    );
    println!(
        "move throughput: {:.1} MiB/s, {:.0} users/s (whole rebalance, under load)",
        moved_bytes as f64 / f64::from(1 << 20) / seconds,
        moved_users as f64 / seconds
    );
    println!(
        "ingest: {before:.0} events/s before, {during:.0} events/s during the moves: {:.0}% of steady state",
        100.0 * during / before.max(1.0)
    );
    println!(
        "total acked: {} events in {:.1} s ({users} users, {connections} connections, batches of {batch})",
        acked.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    );
}
