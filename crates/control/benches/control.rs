//! Control-plane benchmark on loopback with real processes: committed segment
//! updates per second on a 3-member group (concurrent writers), and the leader
//! failover time after kill -9 (median of several kills).
//!
//! `cargo bench -p dynseg-control --bench control` (release build of the
//! `dynseg-control` binary). Environment: BENCH_SECS (default 5), BENCH_WRITERS
//! (default 16), BENCH_KILLS (default 5), BENCH_IDS (segment ids per writer,
//! default 50: the rule set grows to writers × ids segments).

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

#[path = "../tests/support/process.rs"]
mod process;

use std::path::Path;
use std::time::{Duration, Instant};

use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use process::start_group;
use tonic::transport::Channel;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn client(addr: &str) -> Option<ControlClient<Channel>> {
    ControlClient::connect(format!("http://{addr}")).await.ok()
}

/// Waits until every member knows the same leader.
async fn leader(addrs: &[String]) -> u64 {
    let start = Instant::now();
    loop {
        let mut known = Vec::new();
        for addr in addrs {
            if let Some(mut c) = client(addr).await
                && let Ok(s) = c.get_control_status(pb::ControlStatusRequest {}).await
            {
                known.push(s.get_ref().leader_id);
            }
        }
        if known.len() == addrs.len() && known[0] != 0 && known.iter().all(|l| *l == known[0]) {
            return known[0];
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn put(id: String, i: u64) -> pb::SegmentsRequest {
    pb::SegmentsRequest {
        segments: vec![pb::SegmentDef {
            id,
            rule: format!("count(order_completed) in last {}d >= 2", 1 + i % 365),
            ..Default::default()
        }],
    }
}

#[tokio::main]
async fn main() {
    let bin = Path::new(env!("CARGO_BIN_EXE_dynseg-control"));
    let secs = env("BENCH_SECS", 5);
    let writers = env("BENCH_WRITERS", 16);
    let kills = env("BENCH_KILLS", 5);
    let ids_per_writer = env("BENCH_IDS", 50);
    let dir = tempfile::tempdir().unwrap();
    let (addrs, mut processes) = start_group(bin, 3, dir.path());
    let first = leader(&addrs).await;

    // Throughput: writers spread over all members (followers forward to the leader).
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let addr = addrs[(w % 3) as usize].clone();
        tasks.push(tokio::spawn(async move {
            let mut c = client(&addr).await.unwrap();
            let mut latencies = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let started = Instant::now();
                c.apply_segments(put(format!("w{w}_{}", i % ids_per_writer), i))
                    .await
                    .unwrap();
                latencies.push(started.elapsed());
                i += 1;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    latencies.sort();
    let n = latencies.len();
    println!(
        "3-member group, {writers} writers, {secs} s: {n} committed segment updates, {:.0}/s; latency p50 {:?} p99 {:?}",
        n as f64 / secs as f64,
        latencies[n / 2],
        latencies[n * 99 / 100]
    );

    // Failover: kill -9 the leader, time until a write commits on a survivor.
    let mut failovers = Vec::new();
    let mut current = first;
    for k in 0..kills {
        let killed = (current - 1) as usize;
        processes[killed].kill9();
        let killed_at = Instant::now();
        let survivor = addrs[(killed + 1) % 3].clone();
        loop {
            if let Some(mut c) = client(&survivor).await {
                let mut request = tonic::Request::new(put(format!("failover{k}"), k));
                request.set_timeout(Duration::from_millis(300));
                if c.apply_segments(request).await.is_ok() {
                    break;
                }
            }
            assert!(killed_at.elapsed() < Duration::from_secs(30), "no failover");
        }
        failovers.push(killed_at.elapsed());
        processes[killed].restart(bin);
        current = leader(&addrs).await;
    }
    failovers.sort();
    println!(
        "leader failover after kill -9 ({kills} kills): median {:?}, min {:?}, max {:?}",
        failovers[failovers.len() / 2],
        failovers[0],
        failovers[failovers.len() - 1]
    );
}
