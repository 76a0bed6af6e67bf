//! `dynseg bench`: a load generator against a gateway. Connections send batches
//! of generated events (the demo's mix) as fast as acknowledgements allow, or at
//! a target rate; a subscriber measures how long each event-caused change takes
//! from the ingest call to the subscriber. Prints events/s and percentiles,
//! counting from the end of an optional warm-up.

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dynseg_proto::auth::Credentials;
use dynseg_proto::client;
use dynseg_proto::encoded::{self, gateway_client::GatewayClient as EncodedGatewayClient};
use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use dynseg_proto::pb::gateway_client::GatewayClient;
use serde_json::json;
use tokio::task::JoinSet;

use crate::error::CliError;
use crate::output::{self, Output};
use crate::say;
use crate::traffic::Traffic;

/// What to generate.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// The gateway.
    pub addr: String,
    /// What to present to it.
    pub credentials: Credentials,
    /// Distinct users.
    pub users: u64,
    /// Events per second in total (0: as fast as acknowledgements allow).
    pub rate: u64,
    /// How long to send, warm-up included.
    pub duration: Duration,
    /// How long the load runs before anything is counted: a fresh cluster's
    /// first second or so is every user's first events, each entering
    /// segments (several times the steady rate of changes).
    pub warmup: Duration,
    /// Events per batch.
    pub batch: usize,
    /// Concurrent connections, each with one batch in flight.
    pub connections: usize,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The next `count` events of `traffic` at `now_ms`, encoded into one buffer
/// that each event's bytes share.
fn encode_batch(traffic: &mut Traffic, now_ms: i64, count: usize) -> Vec<Bytes> {
    // About 80 bytes an event in this mix (at most about 110): one
    // allocation for the batch, seldom regrown.
    let mut buf = Vec::with_capacity(count * 96);
    let mut ends = Vec::with_capacity(count);
    for _ in 0..count {
        traffic.encode_next(now_ms, &mut buf);
        ends.push(buf.len());
    }
    let all = Bytes::from(buf);
    let mut start = 0;
    ends.into_iter()
        .map(|end| {
            let event = all.slice(start..end);
            start = end;
            event
        })
        .collect()
}

/// Runs the load and prints what it measured.
pub async fn run(config: BenchConfig, out: Output) -> Result<(), CliError> {
    if config.warmup >= config.duration {
        return Err(CliError::User(format!(
            "the warm-up ({:?}) must be shorter than the duration ({:?})",
            config.warmup, config.duration
        )));
    }
    let connect = || client::connect(&config.addr, config.credentials.clone());
    // What the figures are of: shard batches cost the same whatever their
    // size, so the shard count moves them (SPEC's 256 against 64: about
    // 1.45x the CPU at the same rate). None when the token may not read it.
    let cluster = ControlClient::new(connect().await?)
        .get_topology(pb::ReadOptions { stale: true })
        .await
        .ok()
        .and_then(|reply| reply.into_inner().topology)
        .map(|t| (t.shard_count, t.nodes.len()));
    let mut watcher = GatewayClient::new(connect().await?);
    let mut feed = watcher
        .subscribe(pb::GatewaySubscribeRequest {
            from_now: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let done = Arc::new(AtomicBool::new(false));
    // One moment starts the run, and so ends the warm-up, for the changes
    // (by the node's clock) and the batches (by this process's).
    let started = Instant::now();
    let measured_from_ms = now_ms() + config.warmup.as_millis() as i64;
    let changes_task = {
        let done = done.clone();
        tokio::spawn(async move {
            // Event-caused changes carry the node's processing time: the
            // latency is from then to now, on one machine's clock.
            let mut latencies = Vec::new();
            while !done.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(200), feed.message()).await {
                    Ok(Ok(Some(item))) => {
                        if let Some(change) = item.change
                            && change.cause == pb::ChangeCause::Event as i32
                            && change.at_ms >= measured_from_ms
                        {
                            let ms = (now_ms() - change.at_ms).max(0) as u64;
                            latencies.push(Duration::from_millis(ms));
                        }
                    }
                    Ok(_) => break,
                    Err(_) => {}
                }
            }
            latencies
        })
    };
    let per_connection_rate = config.rate as f64 / config.connections.max(1) as f64;
    let mut senders = JoinSet::new();
    for connection in 0..config.connections.max(1) {
        let config = config.clone();
        senders.spawn(async move {
            let channel = client::connect(&config.addr, config.credentials.clone()).await?;
            // Events are written straight into each batch's buffer and sent
            // as bytes: the same request on the wire as a typed one.
            let mut client = EncodedGatewayClient::new(channel);
            // Seeded by the clock: each run's message ids are new, so the
            // node does not drop a rerun's events as repeats.
            let seed = now_ms() as u64 ^ (connection as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut traffic = Traffic::new(config.users, seed);
            let mut acks = Vec::new();
            let mut sent = 0u64;
            let mut measured = 0u64;
            // Connections take turns, evenly spaced: started together, they
            // would send their batches in bursts of one per connection, and
            // the latency measured would be the burst's queue, not the rate's.
            let phase = connection as f64 / config.connections.max(1) as f64 * config.batch as f64;
            while started.elapsed() < config.duration {
                if per_connection_rate > 0.0 {
                    let due = Duration::from_secs_f64((phase + sent as f64) / per_connection_rate);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                let events = encode_batch(&mut traffic, now_ms(), config.batch);
                let t = Instant::now();
                let reply = client
                    .ingest(encoded::IngestRequest { events })
                    .await?
                    .into_inner();
                sent += u64::from(reply.accepted);
                if t.duration_since(started) >= config.warmup {
                    acks.push(t.elapsed());
                    measured += u64::from(reply.accepted);
                }
            }
            Ok::<_, CliError>((measured, acks))
        });
    }
    let mut sent = 0u64;
    let mut acks = Vec::new();
    while let Some(joined) = senders.join_next().await {
        let (n, mut a) = joined.map_err(|e| CliError::Connection(e.to_string()))??;
        sent += n;
        acks.append(&mut a);
    }
    let elapsed = started.elapsed().saturating_sub(config.warmup);
    // Let the last changes arrive, then stop the subscriber.
    tokio::time::sleep(Duration::from_millis(500)).await;
    done.store(true, Ordering::Relaxed);
    let mut change_latencies = changes_task
        .await
        .map_err(|e| CliError::Connection(e.to_string()))?;
    acks.sort();
    change_latencies.sort();
    let rate = sent as f64 / elapsed.as_secs_f64();
    match out {
        Output::Json => output::json(&json!({
            "events": sent, "seconds": elapsed.as_secs_f64(), "warmup_s": config.warmup.as_secs_f64(), "events_per_s": rate,
            "shards": cluster.map(|(shards, _)| shards), "nodes": cluster.map(|(_, nodes)| nodes),
            "ack_ms": {"p50": percentile(&acks, 0.5).as_secs_f64() * 1e3, "p99": percentile(&acks, 0.99).as_secs_f64() * 1e3},
            "changes": change_latencies.len(),
            "change_ms": {"p50": percentile(&change_latencies, 0.5).as_secs_f64() * 1e3, "p99": percentile(&change_latencies, 0.99).as_secs_f64() * 1e3},
        })),
        Output::Table => {
            say!(
                "{sent} events in {:.1} s: {rate:.0} events/s ({} connections, batches of {}{}{})",
                elapsed.as_secs_f64(),
                config.connections,
                config.batch,
                if config.warmup.is_zero() {
                    String::new()
                } else {
                    format!(", after a warm-up of {:?}", config.warmup)
                },
                match cluster {
                    Some((shards, nodes)) => format!("; {shards} shards on {nodes} node(s)"),
                    None => String::new(),
                }
            );
            say!(
                "ack latency per batch: p50 {:?}, p99 {:?}, max {:?}",
                percentile(&acks, 0.5),
                percentile(&acks, 0.99),
                acks.last().copied().unwrap_or_default()
            );
            say!(
                "change latency (event processed to subscriber), {} changes: p50 {:?}, p99 {:?}",
                change_latencies.len(),
                percentile(&change_latencies, 0.5),
                percentile(&change_latencies, 0.99)
            );
        }
    }
    Ok(())
}
