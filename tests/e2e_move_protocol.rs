//! The source end of a shard move against a destination the test plays
//! (SPEC.md section 9), with a real control plane and a real node process:
//!
//! - while the copy runs the shard keeps accepting writes, and they are kept
//!   for the destination;
//! - once fenced it refuses writes (UNAVAILABLE, retryable), and the fence
//!   survives a kill -9 of the node;
//! - a destination that goes quiet gets its attempt aborted by the source
//!   through the control plane, after which the source serves again and the
//!   aborted attempt can no longer commit;
//! - a destination that commits takes the shard: the source stops serving it
//!   and points clients at the new owner;
//! - a real destination that dies between the fence and the commit drops its
//!   pending copy when it restarts, and the retried move completes.

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

mod support;

use std::time::{Duration, Instant};

use dynseg_proto::pb;
use dynseg_proto::pb::node_client::NodeClient;
use support::{Process, args, free_ports, start_control, topology};
use tonic::transport::Channel;

const SHARDS: u32 = 4;
/// Where the test's stand-in destination claims to live (nothing listens).
const GHOST: &str = "127.0.0.1:9";

fn event(user: &str, n: u32) -> pb::Event {
    pb::Event {
        message_id: format!("{user}-{n}"),
        user_id: user.to_owned(),
        r#type: pb::EventType::Track as i32,
        event: "order_completed".into(),
        timestamp_ms: 1_767_225_600_000,
        ..Default::default()
    }
}

async fn node_client(addr: &str) -> NodeClient<Channel> {
    NodeClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20)
}

/// Waits until the node serves every shard.
async fn wait_serving_all(node: &mut NodeClient<Channel>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = node
            .status(pb::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if status.shards.len() == SHARDS as usize {
            return;
        }
        assert!(Instant::now() < deadline, "the node never took every shard");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Plays the destination up to the fence: begin, read the snapshot, read the
/// tail, then fence. Returns the shard's epoch and the inputs kept.
async fn copy_and_fence(
    node: &mut NodeClient<Channel>,
    shard: u32,
    attempt: u64,
    write_during_copy: Option<&pb::EventBatch>,
) -> (u64, usize) {
    let started = node
        .begin_move_out(pb::MoveOutRequest { shard, attempt })
        .await
        .unwrap()
        .into_inner();
    let mut chunks = node
        .move_out_snapshot(pb::MoveOutRequest { shard, attempt })
        .await
        .unwrap()
        .into_inner();
    let mut last = false;
    while let Some(chunk) = chunks.message().await.unwrap() {
        last = chunk.last;
    }
    assert!(last, "the snapshot ends with its last chunk");
    if let Some(batch) = write_during_copy {
        // The source still serves while the copy runs.
        node.ingest(batch.clone()).await.unwrap();
    }
    let fenced = node
        .move_out_tail(pb::MoveTailRequest {
            shard,
            attempt,
            from: 0,
            fence: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(fenced.fenced);
    assert_eq!(fenced.end as usize, fenced.records.len());
    (started.epoch, fenced.records.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_source_refuses_writes_until_the_move_commits_or_is_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(2);
    let control_addr = format!("127.0.0.1:{}", ports[0]);
    let node_addr = format!("127.0.0.1:{}", ports[1]);
    let (_control, mut control) =
        start_control(&dir.path().join("control"), &control_addr, SHARDS).await;
    let node_args = args(
        &format!(
            "node --node-id node-0 --listen {node_addr} --control {control_addr} --shard-count {SHARDS} --clock manual=2026-01-01T00:00:00Z --data-dir"
        ),
        &dir.path().join("node"),
    );
    let mut node_process = Process::start(&node_args, "listening on");
    let mut node = node_client(&node_addr).await;
    wait_serving_all(&mut node).await;

    // The stand-in destination registers: the control plane plans moves to it.
    control
        .register_member(pb::RegisterMemberRequest {
            kind: pb::MemberKind::Node as i32,
            id: "ghost".into(),
            address: GHOST.into(),
            weight: 1,
        })
        .await
        .unwrap();
    let t = topology(&mut control).await;
    let first = t
        .moves
        .iter()
        .find(|m| m.to_node == "ghost")
        .unwrap()
        .clone();
    let shard = first.shard;
    let user = (0..)
        .map(|i| format!("user{i}"))
        .find(|u| dynseg_proto::routing::shard_for(u, SHARDS) == shard)
        .unwrap();
    let epoch = t.shards[shard as usize].epoch;
    let batch = |n: u32| pb::EventBatch {
        shard,
        epoch,
        events: vec![event(&user, n)],
    };

    let (began_at, kept) = copy_and_fence(&mut node, shard, first.attempt, Some(&batch(1))).await;
    assert_eq!(began_at, epoch);
    assert_eq!(
        kept, 1,
        "the write during the copy is kept for the destination"
    );
    let refused = node.ingest(batch(2)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    assert!(refused.message().contains("moving"), "{refused}");

    // The fence is durable: a node killed while fenced comes back fenced.
    node_process.kill9();
    node_process.restart_with(&node_args, "listening on");
    let mut node = node_client(&node_addr).await;
    let refused = node.ingest(batch(2)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");

    // The destination stays quiet: the source settles the attempt with the
    // control plane (abort) and serves again.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        match node.ingest(batch(2)).await {
            Ok(reply) => {
                assert_eq!(reply.into_inner().accepted, 1);
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
                assert!(Instant::now() < deadline, "the fence was never settled");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let late = control
        .commit_move(pb::MoveRequest {
            shard,
            attempt: first.attempt,
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), tonic::Code::FailedPrecondition, "{late}");
    let t = topology(&mut control).await;
    assert_eq!(t.shards[shard as usize].node_id, "node-0");
    let retry = t.moves.iter().find(|m| m.shard == shard).unwrap().clone();
    assert!(
        retry.attempt > first.attempt,
        "the move is retried under a new attempt"
    );

    // This time the destination commits: the source lets go of the shard.
    let (_, kept) = copy_and_fence(&mut node, shard, retry.attempt, None).await;
    assert_eq!(kept, 0);
    control
        .commit_move(pb::MoveRequest {
            shard,
            attempt: retry.attempt,
        })
        .await
        .unwrap();
    let t = topology(&mut control).await;
    assert_eq!(t.shards[shard as usize].node_id, "ghost");
    assert_eq!(t.shards[shard as usize].epoch, epoch + 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let moved = loop {
        let status = node.ingest(batch(3)).await.unwrap_err();
        if status.code() == tonic::Code::Aborted {
            break status;
        }
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        assert!(
            Instant::now() < deadline,
            "node-0 never let go of shard {shard}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        moved
            .metadata()
            .get("dynseg-owner")
            .map(|v| v.to_str().unwrap()),
        Some(GHOST),
        "{moved:?}"
    );
}

/// The destination end's one risky window: a complete copy, the source fenced,
/// and the destination dies before committing. Restarted, it finds its copy
/// *pending* while placement names the source: it aborts the attempt and drops
/// the copy; the source settles too and serves again; the move is retried and
/// completes, and what was written before is all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_dying_before_its_commit_leaves_the_source_in_charge() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(3);
    let control_addr = format!("127.0.0.1:{}", ports[0]);
    let (_control, mut control) =
        start_control(&dir.path().join("control"), &control_addr, SHARDS).await;
    let node_args = |i: usize| {
        args(
            &format!(
                "node --node-id node-{i} --listen 127.0.0.1:{} --control {control_addr} --shard-count {SHARDS} --clock manual=2026-01-01T00:00:00Z --data-dir",
                ports[1 + i]
            ),
            &dir.path().join(format!("node{i}")),
        )
    };
    let _node0 = Process::start(&node_args(0), "listening on");
    let mut node0 = node_client(&format!("127.0.0.1:{}", ports[1])).await;
    wait_serving_all(&mut node0).await;
    control
        .apply_segments(pb::SegmentsRequest {
            segments: vec![pb::SegmentDef {
                id: "buyers".into(),
                rule: "count(order_completed) >= 2".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    // Two orders for one user of every shard, so every move carries data.
    let t = topology(&mut control).await;
    let mut users = Vec::new();
    for shard in 0..SHARDS {
        let user = (0..)
            .map(|i| format!("user{i}"))
            .find(|u| dynseg_proto::routing::shard_for(u, SHARDS) == shard)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let batch = pb::EventBatch {
                shard,
                epoch: t.shards[shard as usize].epoch,
                events: vec![event(&user, 1), event(&user, 2)],
            };
            match node0.ingest(batch).await {
                Ok(_) => break,
                // The rules may not have reached the node yet.
                Err(status) => {
                    assert!(Instant::now() < deadline, "ingest refused: {status}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        users.push(user);
    }

    // node-1 joins, copies its first shard, fences node-0, and dies.
    let mut node1 = Process::start_with_env(
        &node_args(1),
        "listening on",
        &[(dynseg_node::moves::FAULT_EXIT_BEFORE_COMMIT, "1")],
    );
    let code = tokio::task::spawn_blocking(move || {
        let code = node1.wait_exit(Duration::from_secs(60));
        (code, node1)
    });
    let (code, mut node1) = code.await.unwrap();
    assert_eq!(
        code,
        Some(86),
        "node-1 did not stop before its first commit"
    );
    let t = topology(&mut control).await;
    assert!(
        t.shards.iter().all(|s| s.node_id == "node-0"),
        "nothing committed: {t:?}"
    );
    let first = t.moves[0].clone();

    node1.restart_with(&node_args(1), "listening on");
    let t = wait_settled(&mut control, 60).await;
    let on_node1: Vec<u32> = t
        .shards
        .iter()
        .filter(|s| s.node_id == "node-1")
        .map(|s| s.shard)
        .collect();
    assert!(
        on_node1.contains(&first.shard),
        "the move was retried and completed: {t:?}"
    );

    let mut node1 = node_client(&format!("127.0.0.1:{}", ports[2])).await;
    for (shard, user) in users.iter().enumerate() {
        let owner = if on_node1.contains(&(shard as u32)) {
            &mut node1
        } else {
            &mut node0
        };
        let found = owner
            .get_user(pb::GetUserRequest {
                user_id: user.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            found.segments,
            vec!["buyers".to_owned()],
            "{user} of shard {shard}"
        );
    }
}

async fn wait_settled(
    control: &mut dynseg_proto::pb::control_client::ControlClient<Channel>,
    secs: u64,
) -> pb::Topology {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let t = topology(control).await;
        if t.moves.is_empty() && t.pending_moves == 0 && t.nodes.len() == 2 {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "the moves never completed: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
