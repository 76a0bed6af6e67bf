//! End to end on a multi-process cluster on 127.0.0.1: 3 control members, 2
//! nodes, 2 gateways (all real `dynseg` processes), manual clocks. A node is
//! killed with SIGKILL mid-ingest and restarted; the client retries the batches
//! that were not acknowledged (same message ids); a subscriber switches to the
//! other gateway with its resume token. At the end every membership equals the
//! reference evaluator's and the change stream adds up to it with no gap and no
//! repeat.
//!
//! `DYNSEG_E2E_USERS`, `DYNSEG_E2E_EVENTS` and `DYNSEG_SEED` change the scenario.

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use dynseg_cli::traffic::Traffic;
use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use dynseg_proto::pb::gateway_client::GatewayClient;
use dynseg_rules::reference::Reference;
use dynseg_rules::{Event, Limits, SegmentDef, Timestamp};
use support::{
    Process, args, assert_memberships, env_number, fold_change, free_ports, ingest_until_acked,
    listed, reference_members, set_shard_count, wait_for_rules,
};
use tonic::transport::Channel;

async fn connect_gateway(addr: &str) -> GatewayClient<Channel> {
    GatewayClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_restarts_and_memberships_stay_exact_across_gateways() {
    let seed = env_number("DYNSEG_SEED", 7_777);
    let users = env_number("DYNSEG_E2E_USERS", 10_000);
    let total_events = env_number("DYNSEG_E2E_EVENTS", 200_000);
    eprintln!("e2e cluster scenario: seed {seed}, {users} users, {total_events} events");
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(7);
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let peers = format!("1={},2={},3={}", addr(0), addr(1), addr(2));

    let _controls: Vec<Process> = (0..3)
        .map(|i| {
            let line = format!(
                "control --id {} --listen {} --peers {peers} --data-dir",
                i + 1,
                addr(i)
            );
            Process::start(
                &args(&line, &dir.path().join(format!("control{i}"))),
                "listening on",
            )
        })
        .collect();
    let mut control = ControlClient::connect(format!("http://{}", addr(0)))
        .await
        .unwrap();
    set_shard_count(&mut control, 16).await;

    let start = Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
    let node_args = |i: usize, clock: Timestamp| {
        let line = format!(
            "node --node-id node-{i} --listen {} --control {} --shard-count 16 --clock manual={clock} --data-dir",
            addr(3 + i),
            addr(i % 3)
        );
        args(&line, &dir.path().join(format!("node{i}")))
    };
    let mut nodes: Vec<Process> = (0..2)
        .map(|i| Process::start(&node_args(i, start), "listening on"))
        .collect();
    let _gateways: Vec<Process> = (0..2)
        .map(|i| {
            let line = format!("gateway --control {} --listen", addr(i));
            Process::start(
                &args(&line, std::path::Path::new(&addr(5 + i))),
                "listening on",
            )
        })
        .collect();

    // Both nodes registered before any data. The second one's shards move to
    // it while they are still empty (ingest retries through those moves;
    // e2e_scaling is the test of moves under load).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let topology = control
            .get_topology(pb::ReadOptions { stale: false })
            .await
            .unwrap()
            .into_inner()
            .topology
            .unwrap();
        if topology.nodes.len() == 2 && topology.gateways.len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nodes and gateways never registered: {topology:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let defs: Vec<SegmentDef> = dynseg_rules::examples::spec_segments();
    let segments: Vec<String> = defs.iter().map(|d| d.id.as_str().to_owned()).collect();
    // Through a gateway, which forwards the admin API to the control plane.
    ControlClient::connect(format!("http://{}", addr(6)))
        .await
        .unwrap()
        .apply_segments(pb::SegmentsRequest {
            segments: defs.iter().map(pb::SegmentDef::from).collect(),
        })
        .await
        .unwrap();
    let reference = Reference::new(&defs, &Limits::default()).unwrap();
    let mut gateway_a = connect_gateway(&addr(5)).await;
    let mut gateway_b = connect_gateway(&addr(6)).await;
    wait_for_rules(&mut gateway_a, &segments[segments.len() - 1]).await;

    // The subscriber follows gateway A, and later resumes on gateway B.
    let mut stream = gateway_a
        .subscribe(pb::GatewaySubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();

    let moves_ms: [i64; 6] = [
        3_600_000,
        86_400_000,
        30 * 60_000,
        3 * 86_400_000,
        45 * 86_400_000,
        60_000,
    ];
    let per_step = (total_events / moves_ms.len() as u64).max(1);
    let mut traffic = Traffic::new(users, seed);
    let mut history: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    let mut from_stream = BTreeSet::new();
    let mut last_sequence = BTreeMap::new();
    let mut last_token = String::new();
    let mut now = start;
    let mut retries = 0;
    for (step, advance) in moves_ms.iter().enumerate() {
        let events: Vec<pb::Event> = (0..per_step)
            .map(|_| traffic.next_event(now.millis()))
            .collect();
        // Mid-ingest: node 1 is killed while batches are in flight, and brought
        // back (at the cluster's time) while the client keeps sending.
        let killer = (step == 2).then(|| {
            let mut node = nodes.pop().unwrap();
            let restart = node_args(1, now);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(150));
                node.kill9();
                node.restart_with(&restart, "listening on");
                node
            })
        });
        for (i, chunk) in events.chunks(500).enumerate() {
            let gateway = if i % 2 == 0 {
                &mut gateway_a
            } else {
                &mut gateway_b
            };
            retries += ingest_until_acked(gateway, chunk, seed).await;
        }
        if let Some(killer) = killer {
            nodes.push(killer.join().unwrap());
        }
        for event in events {
            let event = Event::try_from(event).unwrap();
            history
                .entry(event.user.as_str().to_owned())
                .or_default()
                .push(event);
        }
        let target = now.millis() + advance;
        let reply = gateway_b
            .advance_clock(pb::AdvanceClockRequest {
                target: Some(pb::advance_clock_request::Target::ToMs(target)),
            })
            .await
            .unwrap()
            .into_inner();
        now = Timestamp(reply.now_ms);
        assert_eq!(now.millis(), target);

        let expected = reference_members(&reference, &history, now);
        let actual = listed(&mut gateway_a, &segments).await;
        assert_memberships(
            &actual,
            &expected,
            &format!("step {step} at {now} (seed {seed})"),
        );
        if step == 3 {
            // Reconnect through the other gateway with the last token.
            assert!(!last_token.is_empty());
            stream = gateway_b
                .subscribe(pb::GatewaySubscribeRequest {
                    resume_token: last_token.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while from_stream != expected {
            let item = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), stream.message())
                .await
                .unwrap_or_else(|_| {
                    let missing: Vec<_> = expected.difference(&from_stream).take(5).collect();
                    panic!("step {step}: the change stream stopped short (seed {seed}); missing {missing:?}")
                })
                .unwrap()
                .unwrap();
            fold_change(
                item.change.as_ref().unwrap(),
                &mut from_stream,
                &mut last_sequence,
            );
            last_token = item.resume_token;
        }
        eprintln!("step {step}: {} memberships at {now}", expected.len());
    }
    eprintln!("client retried {retries} batch(es) while node 1 restarted");
}
