//! Scaling end to end (SPEC.md sections 4 and 9, "Scaling does not stop
//! ingest"): one control member, two nodes and a gateway, all real `dynseg`
//! processes on 127.0.0.1 with manual clocks. A client ingests at a steady rate
//! the whole time while:
//!
//! 1. a third node joins and shards move to it (its copies are throttled, so
//!    each move takes a while); it is killed with SIGKILL mid-move and
//!    restarted, then the source of another move is killed the same way
//!    (node-2's weight is doubled first if it already has its share);
//! 2. while that source is down, `dynseg cluster status` reports it down and
//!    its shards unavailable, and the placement keeps them on it;
//! 3. `dynseg cluster drain` empties a node; SIGTERM on it waits for its moves;
//!    `dynseg cluster remove` refuses a node that owns shards and then forgets
//!    the drained one.
//!
//! At the end resent events are recognised as repeats, every membership
//! equals the reference evaluator's over the acknowledged events (a lost or
//! doubled event changes counts), and a subscriber that followed from the
//! start saw every change once, in order.
//!
//! `DYNSEG_E2E_USERS` and `DYNSEG_SEED` change the scenario.

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dynseg_cli::traffic::Traffic;
use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use dynseg_proto::pb::gateway_client::GatewayClient;
use dynseg_rules::{Event, Timestamp};
use support::{
    Process, apply_spec_segments, args, assert_memberships, env_number, fold_change, free_ports,
    ingest_until_acked, listed, reference_members, run_cli, start_control, topology,
    wait_for_rules,
};
use tonic::transport::Channel;

const SHARDS: u32 = 24;

/// Polls the topology until `done` holds, failing after `secs`.
async fn wait_topology(
    control: &mut ControlClient<Channel>,
    what: &str,
    secs: u64,
    done: impl Fn(&pb::Topology) -> bool,
) -> pb::Topology {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let t = topology(control).await;
        if done(&t) {
            return t;
        }
        assert!(Instant::now() < deadline, "{what}: never happened; {t:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn owned(t: &pb::Topology, node: &str) -> BTreeSet<u32> {
    t.shards
        .iter()
        .filter(|s| s.node_id == node)
        .map(|s| s.shard)
        .collect()
}

fn settled(t: &pb::Topology) -> bool {
    t.pending_moves == 0 && t.moves.is_empty()
}

/// Runs the CLI off the async workers (it may wait on the cluster).
async fn cli(args: &[&str]) -> (i32, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli(&args)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_move_under_load_through_kills_and_a_drain_and_nothing_is_lost() {
    let seed = env_number("DYNSEG_SEED", 4_242);
    let users = env_number("DYNSEG_E2E_USERS", 3_000);
    eprintln!("e2e scaling scenario: seed {seed}, {users} users");
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(5);
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let control_addr = addr(0);

    let (_control, mut control) =
        start_control(&dir.path().join("control"), &control_addr, SHARDS).await;
    // Two moves at a time, so a kill lands while others wait.
    control
        .rebalance(pb::RebalanceRequest { max_moves: 2 })
        .await
        .unwrap();

    let now = Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
    // Node 2's copies are throttled to 1 MiB/s: each move into it takes long
    // enough to be killed in the middle of.
    let node_args = |i: usize| {
        let throttle = if i == 2 { "1" } else { "64" };
        let line = format!(
            "node --node-id node-{i} --listen {} --control {control_addr} --shard-count {SHARDS} --clock manual={now} --move-mib-per-sec {throttle} --data-dir",
            addr(1 + i),
        );
        args(&line, &dir.path().join(format!("node{i}")))
    };
    let mut node0 = Process::start(&node_args(0), "listening on");
    let mut node1 = Process::start(&node_args(1), "listening on");
    let gateway_addr = addr(4);
    let _gateway = Process::start(
        &args(
            &format!("gateway --control {control_addr} --listen"),
            std::path::Path::new(&gateway_addr),
        ),
        "listening on",
    );
    wait_topology(&mut control, "two nodes own every shard", 60, |t| {
        t.nodes.len() == 2 && t.gateways.len() == 1 && settled(t)
    })
    .await;

    let (segments, reference) = apply_spec_segments(&mut control).await;
    let gateway_url = format!("http://{gateway_addr}");
    let mut gateway: GatewayClient<Channel> = GatewayClient::connect(gateway_url.clone())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    wait_for_rules(&mut gateway, &segments[segments.len() - 1]).await;

    // The subscriber follows from the start, forwarding to the test.
    let mut stream = gateway
        .subscribe(pb::GatewaySubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let (changes_tx, mut changes) = tokio::sync::mpsc::unbounded_channel();
    let subscriber = tokio::spawn(async move {
        while let Ok(Some(item)) = stream.message().await {
            if changes_tx.send(item).is_err() {
                return;
            }
        }
    });

    // Steady ingest: a batch of 50 every 20 ms, each retried until acked.
    let acked: Arc<Mutex<Vec<pb::Event>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let ingest = {
        let (acked, stop, url) = (acked.clone(), stop.clone(), gateway_url.clone());
        tokio::spawn(async move {
            let mut client = GatewayClient::connect(url).await.unwrap();
            let mut traffic = Traffic::new(users, seed);
            let mut pace = tokio::time::interval(Duration::from_millis(20));
            while !stop.load(Ordering::SeqCst) {
                pace.tick().await;
                let events: Vec<pb::Event> =
                    (0..50).map(|_| traffic.next_event(now.millis())).collect();
                ingest_until_acked(&mut client, &events, seed).await;
                acked.lock().unwrap().extend(events);
            }
        })
    };
    let acked_count = || acked.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked_count() < 2_000 {
        assert!(Instant::now() < deadline, "ingest never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 1. A third node joins; kill it in the middle of its first moves.
    let mut node2 = Process::start(&node_args(2), "listening on");
    let t = wait_topology(&mut control, "a move into node-2", 30, |t| {
        t.moves.iter().any(|m| m.to_node == "node-2")
    })
    .await;
    let first: Vec<u32> = t
        .moves
        .iter()
        .filter(|m| m.to_node == "node-2")
        .map(|m| m.shard)
        .collect();
    // (A small shard's move may already have committed by the time the
    // topology is read: `first` is the moves still copying.)
    node2.kill9();
    eprintln!("killed node-2 while it copied shards {first:?}");
    node2.restart_with(&node_args(2), "listening on");
    let t = wait_topology(
        &mut control,
        "node-2 completes the interrupted moves",
        60,
        |t| first.iter().all(|s| owned(t, "node-2").contains(s)),
    )
    .await;
    eprintln!(
        "node-2 owns {} shards; {} acked events so far",
        owned(&t, "node-2").len(),
        acked_count()
    );

    // Now kill the source of a move in flight, and keep it down until the
    // control plane reports it. Small shards copy fast: if node-2 already has
    // its share, a double weight gives it more to take.
    if !topology(&mut control)
        .await
        .moves
        .iter()
        .any(|m| m.to_node == "node-2")
    {
        control
            .add_node(pb::AddNodeRequest {
                node: "node-2".into(),
                weight: 2,
            })
            .await
            .unwrap();
        eprintln!("node-2 had its share: its weight is now 2");
    }
    let t = wait_topology(&mut control, "another move into node-2", 60, |t| {
        t.moves.iter().any(|m| m.to_node == "node-2")
    })
    .await;
    let moving = t
        .moves
        .iter()
        .find(|m| m.to_node == "node-2")
        .unwrap()
        .clone();
    let source = if moving.from_node == "node-0" {
        &mut node0
    } else {
        &mut node1
    };
    let source_shards = owned(&t, &moving.from_node);
    source.kill9();
    eprintln!(
        "killed {} while shard {} moved from it",
        moving.from_node, moving.shard
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let (code, out) = cli(&[
            "cluster",
            "status",
            "--addr",
            &control_addr,
            "--output",
            "json",
        ])
        .await;
        assert_eq!(code, 0, "cluster status failed: {out}");
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        let down = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == moving.from_node.as_str() && n["alive"] == false);
        if down {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the dead node was never reported down: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A dead node's shards stay with it; only the move in flight may have
    // completed, if it had fenced the source before the kill (the
    // destination then holds every acknowledged event and commits).
    let t = topology(&mut control).await;
    let still = owned(&t, &moving.from_node);
    let gone: Vec<u32> = source_shards.difference(&still).copied().collect();
    assert!(
        still.is_subset(&source_shards),
        "a dead node gained shards: {still:?}"
    );
    assert!(
        gone.is_empty() || gone == [moving.shard],
        "a dead node's shards left it: {gone:?}"
    );
    if !gone.is_empty() {
        eprintln!(
            "shard {} had been fenced before the kill and committed",
            moving.shard
        );
    }
    assert_eq!(
        status["unavailable_shards"].as_u64().unwrap(),
        still.len() as u64,
        "{status}"
    );
    let restart = if moving.from_node == "node-0" { 0 } else { 1 };
    source.restart_with(&node_args(restart), "listening on");
    let t = wait_topology(
        &mut control,
        "every move into node-2 completes",
        120,
        settled,
    )
    .await;
    assert!(owned(&t, "node-2").contains(&moving.shard));
    eprintln!(
        "scaled out: {:?} shards per node; {} acked events",
        ["node-0", "node-1", "node-2"].map(|n| owned(&t, n).len()),
        acked_count()
    );

    // 3. Drain node-1. A node that owns shards cannot be removed.
    let (code, _) = cli(&["cluster", "remove", "node-1", "--addr", &control_addr]).await;
    assert_eq!(code, 1, "removing a node that owns shards is refused");
    let (code, out) = cli(&["cluster", "drain", &addr(2), "--addr", &control_addr]).await;
    assert_eq!(code, 0, "drain failed: {out}");
    // SIGTERM waits for the drain; the process exits cleanly once it owns nothing.
    let exited = tokio::task::spawn_blocking(move || {
        let clean = node1.terminate();
        (clean, node1)
    });
    let (clean, _node1) = tokio::time::timeout(Duration::from_secs(120), exited)
        .await
        .expect("the draining node never stopped")
        .unwrap();
    assert!(clean, "the draining node did not exit cleanly");
    let t = topology(&mut control).await;
    assert!(
        owned(&t, "node-1").is_empty() && settled(&t),
        "node-1 stopped before its moves finished: {t:?}"
    );
    let (code, out) = cli(&["cluster", "remove", "node-1", "--addr", &control_addr]).await;
    assert_eq!(code, 0, "remove failed: {out}");
    let t = topology(&mut control).await;
    assert!(t.nodes.iter().all(|n| n.id != "node-1"));

    // Stop ingest and compare, a day later so windows slide too.
    stop.store(true, Ordering::SeqCst);
    ingest.await.unwrap();
    let events = std::mem::take(&mut *acked.lock().unwrap());
    // Every shard has moved at least once since the first events; resending
    // them changes nothing (exactly-once effect across moves).
    for chunk in events[..2_000].chunks(500) {
        let reply = gateway
            .ingest(pb::IngestRequest {
                events: chunk.to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            reply.duplicates as usize,
            chunk.len(),
            "resent events were applied again"
        );
    }
    let later = Timestamp(now.millis() + 86_400_000);
    let reply = gateway
        .advance_clock(pb::AdvanceClockRequest {
            target: Some(pb::advance_clock_request::Target::ToMs(later.millis())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.now_ms, later.millis());
    let mut history: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for event in &events {
        let event = Event::try_from(event.clone()).unwrap();
        history
            .entry(event.user.as_str().to_owned())
            .or_default()
            .push(event);
    }
    let expected = reference_members(&reference, &history, later);
    let actual = listed(&mut gateway, &segments).await;
    let wrong: BTreeSet<u32> = expected
        .symmetric_difference(&actual)
        .map(|(user, _)| dynseg_proto::routing::shard_for(user, SHARDS))
        .collect();
    if !wrong.is_empty() {
        eprintln!("memberships differ in shards {wrong:?}");
    }
    assert_memberships(
        &actual,
        &expected,
        &format!("after scaling, {} events (seed {seed})", events.len()),
    );

    let mut from_stream = BTreeSet::new();
    let mut last_sequence = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while from_stream != expected {
        let item = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            changes.recv(),
        )
        .await
        .unwrap_or_else(|_| {
            let missing: Vec<_> = expected.difference(&from_stream).take(5).collect();
            panic!("the change stream stopped short (seed {seed}); missing {missing:?}")
        })
        .expect("the subscription ended");
        fold_change(
            item.change.as_ref().unwrap(),
            &mut from_stream,
            &mut last_sequence,
        );
    }
    subscriber.abort();
    eprintln!(
        "{} events, {} memberships: equal to the reference and to the change stream",
        events.len(),
        expected.len()
    );
}
