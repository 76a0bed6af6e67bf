//! Watch streams: resuming across reconnects (to any member) and behind the
//! retained history (a snapshot, then deltas).

#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use dynseg_proto::pb;
use dynseg_proto::pb::watch_event::Kind;
use support::{Cluster, segment, segments};

async fn put(cluster: &Cluster, member: u64, id: &str) -> u64 {
    cluster
        .client(member)
        .await
        .apply_segments(segments(vec![segment(id, "exists(login)")]))
        .await
        .unwrap()
        .into_inner()
        .revision
}

fn put_id(event: &pb::WatchEvent) -> &str {
    match &event.kind {
        Some(Kind::SegmentPut(record)) => &record.def.as_ref().unwrap().id,
        other => panic!("expected a segment put, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_resumes_on_another_member_without_gaps_or_duplicates() {
    let cluster = Cluster::start(3, 5, |_| {}).await;
    cluster.leader().await;
    for id in ["a", "b", "c"] {
        put(&cluster, 1, id).await;
    }
    let mut stream = cluster
        .client(2)
        .await
        .watch(pb::WatchRequest { from_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let second = stream.message().await.unwrap().unwrap();
    assert_eq!((put_id(&first), first.revision), ("a", 1));
    assert_eq!((put_id(&second), second.revision), ("b", 2));
    drop(stream);

    let d = put(&cluster, 2, "d").await;
    let mut resumed = cluster
        .client(3)
        .await
        .watch(pb::WatchRequest {
            from_revision: second.revision,
        })
        .await
        .unwrap()
        .into_inner();
    let next = resumed.message().await.unwrap().unwrap();
    assert_eq!((put_id(&next), next.revision), ("c", 3));
    let next = resumed.message().await.unwrap().unwrap();
    assert_eq!((put_id(&next), next.revision), ("d", d));
    // Live: a later write arrives on the open stream, with the next revision.
    let e = put(&cluster, 1, "e").await;
    let next = resumed.message().await.unwrap().unwrap();
    assert_eq!(
        (put_id(&next), next.revision, next.rules_version),
        ("e", e, 5)
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_behind_the_history_gets_a_snapshot_then_deltas() {
    let cluster = Cluster::start(3, 6, |c| {
        c.watch_history = 4;
        c.snapshot_interval = 5;
    })
    .await;
    cluster.leader().await;
    let mut last = 0;
    for i in 0..10 {
        last = put(&cluster, 1 + i % 3, &format!("s{i}")).await;
    }
    cluster.converged().await;
    let mut stream = cluster
        .client(2)
        .await
        .watch(pb::WatchRequest { from_revision: 2 })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let Some(Kind::Snapshot(snapshot)) = &first.kind else {
        panic!("expected a snapshot, got {first:?}");
    };
    assert_eq!(first.revision, last);
    assert_eq!(snapshot.segments.len(), 10);
    assert_eq!(snapshot.rules_version, 10);
    assert_eq!(snapshot.control_members.as_ref().unwrap().members.len(), 3);
    assert_eq!(snapshot.topology.as_ref().unwrap().shards.len(), 256);
    let after = put(&cluster, 3, "after").await;
    let next = stream.message().await.unwrap().unwrap();
    assert_eq!((put_id(&next), next.revision), ("after", after));

    // Topology changes stream too, with the placement they produced.
    cluster
        .client(1)
        .await
        .register_member(pb::RegisterMemberRequest {
            kind: pb::MemberKind::Node as i32,
            id: "node-a".into(),
            address: "127.0.0.1:7001".into(),
            weight: 1,
        })
        .await
        .unwrap();
    let next = stream.message().await.unwrap().unwrap();
    let Some(Kind::Topology(topology)) = &next.kind else {
        panic!("expected topology, got {next:?}");
    };
    assert!(
        topology
            .shards
            .iter()
            .all(|s| s.node_id == "node-a" && s.epoch == 1)
    );
    cluster.shutdown().await;
}
