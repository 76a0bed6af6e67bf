//! Multi-process crash test: the real `dynseg-node` binary is killed with
//! SIGKILL at random moments while a client ingests, then restarted; the client
//! retries what was not acknowledged (same message ids). At the end, every
//! event is counted exactly once and each shard's change log has no gap and no
//! repeat. A torn write (half a record at the end of the log) is also recovered
//! from. Then new segments are backfilled from the retained events, which must
//! hold every acknowledged event once too (repeats left out).
//!
//! Deterministic plan from a seed (`DYNSEG_SEED`), printed on failure; the kill
//! moments are random within it.

#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::print_stderr,
    missing_docs
)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dynseg_proto::pb::{self, node_client::NodeClient};
use dynseg_proto::shard_for;
use tonic::transport::Channel;

const SHARDS: u32 = 8;
const USERS: usize = 120;
/// Events per user: every user must end in `count >= K` and not in `count >= K+1`.
const K: usize = 6;
const KILLS: usize = 20;
const START: &str = "2026-01-01T00:00:00Z";

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

struct NodeProcess {
    child: Child,
    addr: String,
}

impl Drop for NodeProcess {
    /// A failing test must not leave a node running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(data: &Path) -> NodeProcess {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dynseg-node"))
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "--shard-count",
            &SHARDS.to_string(),
            "--clock",
            &format!("manual={START}"),
        ])
        .args(["--checkpoint-secs", "1"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the node did not start within 60 s");
    NodeProcess { child, addr }
}

async fn connect(addr: &str) -> NodeClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match NodeClient::connect(format!("http://{addr}")).await {
            Ok(client) => return client,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("cannot connect to {addr}: {e}"),
        }
    }
}

fn event(user: usize, n: usize) -> pb::Event {
    let start = dynseg_rules::Timestamp::parse_rfc3339(START).unwrap();
    pb::Event {
        message_id: format!("u{user}-e{n}"),
        user_id: format!("user-{user}"),
        r#type: pb::EventType::Track.into(),
        event: "hit".into(),
        timestamp_ms: start.millis(),
        ..Default::default()
    }
}

/// The workload: batches of events for one shard each, in a seeded order.
fn batches(rng: &mut Rng) -> Vec<pb::EventBatch> {
    let mut events: Vec<pb::Event> = (0..USERS)
        .flat_map(|u| (0..K).map(move |n| event(u, n)))
        .collect();
    for i in (1..events.len()).rev() {
        events.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut out = Vec::new();
    let mut by_shard: BTreeMap<u32, Vec<pb::Event>> = BTreeMap::new();
    for e in events {
        let shard = shard_for(&e.user_id, SHARDS);
        let pending = by_shard.entry(shard).or_default();
        pending.push(e);
        if pending.len() > rng.below(8) as usize {
            out.push(pb::EventBatch {
                shard,
                epoch: 1,
                events: std::mem::take(pending),
            });
        }
    }
    for (shard, events) in by_shard {
        if !events.is_empty() {
            out.push(pb::EventBatch {
                shard,
                epoch: 1,
                events,
            });
        }
    }
    out
}

/// Applies segments `k` (count(hit) >= K) and `over` (>= K + 1), and at
/// version 2 also `k2` and `over2`, the same counts over a 30-day window: a
/// new aggregate, so they are backfilled from the retained events.
async fn apply_rules(client: &mut NodeClient<Channel>, version: u64) {
    let mut rules = vec![
        ("k", format!("count(hit) >= {K}")),
        ("over", format!("count(hit) >= {}", K + 1)),
    ];
    if version >= 2 {
        rules.extend([
            ("k2", format!("count(hit) in last 30d >= {K}")),
            ("over2", format!("count(hit) in last 30d >= {}", K + 1)),
        ]);
    }
    let segments = rules
        .into_iter()
        .map(|(id, rule)| pb::SegmentDef {
            id: id.into(),
            rule,
            ..Default::default()
        })
        .collect();
    let mut stream = client
        .apply_rules(pb::ApplyRulesRequest { version, segments })
        .await
        .unwrap()
        .into_inner();
    while stream.message().await.unwrap().is_some() {}
}

/// Appends half a record (a header promising more bytes than follow) to the
/// newest log segment: what a crash in the middle of an append leaves.
fn tear_log(data: &Path, rng: &mut Rng) -> u64 {
    let wal = data.join("wal");
    let mut segments: Vec<_> = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    let last = segments.last().unwrap();
    let mut file = std::fs::OpenOptions::new().append(true).open(last).unwrap();
    let promised = 100 + rng.below(1000) as u32;
    let mut torn = promised.to_le_bytes().to_vec();
    torn.extend_from_slice(&[0xab; 4]);
    torn.extend((0..rng.below(promised as u64)).map(|i| i as u8));
    file.write_all(&torn).unwrap();
    torn.len() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_events_survive_kill_9_exactly_once() {
    let seed: u64 = std::env::var("DYNSEG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_129);
    println!("crash test seed {seed} (rerun with DYNSEG_SEED={seed})");
    let mut rng = Rng(seed.max(1));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let plan = batches(&mut rng);

    let mut node = start_node(&data);
    let mut client = connect(&node.addr).await;
    apply_rules(&mut client, 1).await;

    let mut acked = vec![false; plan.len()];
    let mut kills = 0;
    let mut torn_once = false;
    while acked.iter().any(|a| !a) || kills < KILLS {
        // Send every batch not yet acknowledged (and, after a kill, a few that
        // were, to exercise dedupe), while a killer waits a random moment.
        let mut todo: Vec<usize> = (0..plan.len()).filter(|i| !acked[*i]).collect();
        for _ in 0..3 {
            todo.push(rng.below(plan.len() as u64) as usize);
        }
        let kill_after = Duration::from_millis(rng.below(60));
        let killing = kills < KILLS;
        let sender = {
            let mut client = client.clone();
            let batches: Vec<(usize, pb::EventBatch)> =
                todo.iter().map(|i| (*i, plan[*i].clone())).collect();
            tokio::spawn(async move {
                let mut done = Vec::new();
                for (i, batch) in batches {
                    match client.ingest(batch).await {
                        Ok(response) => {
                            let r = response.into_inner();
                            assert!(r.rejected.is_empty(), "{:?}", r.rejected);
                            done.push(i);
                        }
                        Err(_) => break,
                    }
                }
                done
            })
        };
        if killing {
            tokio::time::sleep(kill_after).await;
            node.child.kill().unwrap();
            node.child.wait().unwrap();
            kills += 1;
        }
        for i in sender.await.unwrap() {
            acked[i] = true;
        }
        if killing {
            if !torn_once && kills > KILLS / 2 {
                let bytes = tear_log(&data, &mut rng);
                println!("tore the log: appended {bytes} bytes of a half-written record");
                torn_once = true;
            }
            node = start_node(&data);
            client = connect(&node.addr).await;
        }
    }
    println!(
        "{kills} kills, {} batches, {} events",
        plan.len(),
        USERS * K
    );

    // Exactly once: every user has exactly K counted events.
    for user in 0..USERS {
        let answer = client
            .get_user(pb::GetUserRequest {
                user_id: format!("user-{user}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            answer.segments,
            vec!["k".to_owned()],
            "user-{user} (seed {seed})"
        );
    }
    // The change log: per shard, sequences 1, 2, 3, ... with one entry per user.
    let mut feed = client
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut sequences: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut entered = BTreeSet::new();
    while entered.len() < USERS {
        let change = tokio::time::timeout(Duration::from_secs(20), feed.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let cursor = change.cursor.unwrap();
        sequences
            .entry(cursor.shard)
            .or_default()
            .push(cursor.sequence);
        assert_eq!(change.segment, "k", "seed {seed}");
        assert!(
            entered.insert(change.user_id.clone()),
            "{} entered twice (seed {seed})",
            change.user_id
        );
    }
    for (shard, seqs) in &sequences {
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(
            seqs, &expected,
            "shard {shard} has a gap or a repeat (seed {seed})"
        );
    }

    // Retained events, exactly once: segments added now are backfilled from
    // them, and every user is in `k2` and not in `over2`.
    apply_rules(&mut client, 2).await;
    for user in 0..USERS {
        let mut segments = client
            .get_user(pb::GetUserRequest {
                user_id: format!("user-{user}"),
            })
            .await
            .unwrap()
            .into_inner()
            .segments;
        segments.sort();
        assert_eq!(
            segments,
            vec!["k".to_owned(), "k2".to_owned()],
            "user-{user} after backfill (seed {seed})"
        );
    }
    node.child.kill().unwrap();
    node.child.wait().unwrap();
}
