//! In-process 3-member control-plane clusters: replication, linearizable reads on
//! every member, leader loss and return (through a snapshot), group changes.

#![allow(clippy::unwrap_used)]

mod support;

use dynseg_proto::pb;
use support::{Cluster, eventually, local_segments, segment, segments};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn segments_written_anywhere_are_read_back_linearizably_on_every_member() {
    let cluster = Cluster::start(3, 1, |_| {}).await;
    let leader = cluster.leader().await;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    // A write sent to a follower is forwarded to the leader.
    let written = cluster
        .client(follower)
        .await
        .apply_segments(segments(vec![
            segment("repeat_buyers", "count(order_completed) in last 90d >= 2"),
            segment(
                "vip",
                "in_segment(\"repeat_buyers\") and sum(order_completed.revenue) >= 1000",
            ),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(written.rules_version, 1);
    // Linearizable reads right after the ack see the write on every member.
    for id in [1, 2, 3] {
        let mut client = cluster.client(id).await;
        let got = client
            .get_segment(pb::GetSegmentRequest {
                id: "vip".into(),
                stale: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.version, 1, "member {id}");
        let list = client
            .list_segments(pb::ReadOptions { stale: false })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.revision, written.revision, "member {id}");
        assert_eq!(list.segments.len(), 2, "member {id}");
    }
    // A second write is a new rule version, on every member.
    let second = cluster
        .client(leader)
        .await
        .apply_segments(segments(vec![segment(
            "repeat_buyers",
            "count(order_completed) in last 30d >= 2",
        )]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.rules_version, 2);
    for id in [1, 2, 3] {
        let got = cluster
            .client(id)
            .await
            .get_segment(pb::GetSegmentRequest {
                id: "repeat_buyers".into(),
                stale: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.version, 2);
        assert!(got.def.unwrap().rule.contains("30d"));
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_leader_is_replaced_and_catches_up_through_a_snapshot_on_return() {
    let mut cluster = Cluster::start(3, 2, |c| c.snapshot_interval = 8).await;
    let old = cluster.leader().await;
    cluster
        .client(old)
        .await
        .apply_segments(segments(vec![segment("s0", "exists(login)")]))
        .await
        .unwrap();
    cluster.stop(old).await;
    let rest: Vec<u64> = cluster.running();
    let new = cluster.leader_among(&rest).await;
    assert_ne!(new, old);
    // Writes continue, and enough of them that the log is compacted past the
    // point the old leader has.
    let mut last = None;
    for i in 1..=30 {
        let target = rest[i % rest.len()];
        let result = cluster
            .client(target)
            .await
            .apply_segments(segments(vec![segment(&format!("s{i}"), "exists(login)")]))
            .await
            .unwrap()
            .into_inner();
        last = Some(result);
    }
    let last = last.unwrap();
    let leader_status = cluster.status(new).await.unwrap();
    assert!(leader_status.snapshot_index > 8, "{leader_status:?}");
    cluster.restart(old).await;
    let caught_up = eventually("the old leader to catch up", || async {
        let status = cluster.status(old).await?;
        (status.revision == last.revision).then_some(status)
    })
    .await;
    assert!(
        caught_up.snapshots_installed >= 1,
        "it was behind compaction, so it must have received a snapshot: {caught_up:?}"
    );
    let mut old_client = cluster.client(old).await;
    let mut new_client = cluster.client(new).await;
    assert_eq!(
        local_segments(&mut old_client).await,
        local_segments(&mut new_client).await
    );
    assert_eq!(local_segments(&mut old_client).await.len(), 31);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_of_one_grows_to_three_and_shrinks_back() {
    let mut cluster = Cluster::start(1, 3, |_| {}).await;
    cluster.leader().await;
    cluster
        .client(1)
        .await
        .apply_segments(segments(vec![segment("early", "exists(login)")]))
        .await
        .unwrap();
    for id in [2u64, 3] {
        // Start the newcomer empty, trusting the existing member, then add it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut config = dynseg_control::ControlConfig::new(id, dir.path());
        config.join = true;
        config.peers = cluster
            .members
            .values()
            .map(|m| (m.id, m.addr.to_string()))
            .collect();
        let server = dynseg_control::ControlServer::start(config.clone(), listener)
            .await
            .unwrap();
        let status = cluster
            .client(1)
            .await
            .add_control_member(pb::AddControlMemberRequest {
                id,
                address: addr.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(status.members.iter().any(|m| m.id == id));
        cluster.members.insert(
            id,
            support::Member {
                id,
                addr,
                dir,
                config,
                server: Some(server),
            },
        );
    }
    let revision = cluster.converged().await;
    for id in [1, 2, 3] {
        let status = cluster.status(id).await.unwrap();
        assert_eq!(status.members.len(), 3, "member {id}: {status:?}");
        assert_eq!(status.revision, revision);
        let mut client = cluster.client(id).await;
        assert_eq!(local_segments(&mut client).await.len(), 1);
    }
    // The grown group commits with a majority: stop one member, write again.
    let leader = cluster.leader().await;
    let other = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    cluster.stop(other).await;
    cluster
        .client(leader)
        .await
        .apply_segments(segments(vec![segment("late", "exists(login)")]))
        .await
        .unwrap();
    let status = cluster
        .client(leader)
        .await
        .remove_control_member(pb::RemoveControlMemberRequest { id: other })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.members.len(), 2);
    let err = cluster
        .client(leader)
        .await
        .remove_control_member(pb::RemoveControlMemberRequest { id: 42 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    cluster.shutdown().await;
}
