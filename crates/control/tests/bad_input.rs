//! Bad input gets a clear error and changes nothing: invalid rules, unknown
//! segments, no reachable leader, and raft messages that are malformed or not
//! from a member.

#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::time::Duration;

use dynseg_proto::pb;
use dynseg_proto::pb::raft_peer_client::RaftPeerClient;
use protobuf::Message as _;
use support::{Cluster, eventually, local_segments, segment, segments};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_rules_and_unknown_segments_are_refused_with_the_right_code() {
    let cluster = Cluster::start(3, 8, |_| {}).await;
    let leader = cluster.leader().await;
    let mut client = cluster.client(leader).await;
    let err = client
        .apply_segments(segments(vec![segment(
            "bad",
            "count(order_completed) in last 0d >= 2",
        )]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("bad: 1:"), "{}", err.message());
    let err = client
        .validate_segments(segments(vec![segment(
            "syntax",
            "count(order_completed) >=",
        )]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("1:"), "{}", err.message());
    let err = client
        .apply_segments(segments(vec![segment("bad id!", "exists(login)")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .get_segment(pb::GetSegmentRequest {
            id: "nope".into(),
            stale: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .delete_segment(pb::DeleteSegmentRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .register_member(pb::RegisterMemberRequest {
            kind: 0,
            id: "n".into(),
            address: "x:1".into(),
            weight: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Nothing above changed the state.
    let status = cluster.status(leader).await.unwrap();
    assert_eq!((status.revision, status.rules_version), (0, 0));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_no_leader_reachable_writes_are_unavailable_and_nothing_is_applied() {
    let mut cluster = Cluster::start(3, 9, |c| {
        c.request_timeout = Duration::from_secs(2);
    })
    .await;
    cluster.leader().await;
    cluster.stop(2).await;
    cluster.stop(3).await;
    // Member 1 alone learns it has no leader (a leader steps down without quorum).
    eventually("member 1 to know it has no leader", || async {
        let status = cluster.status(1).await?;
        (status.leader_id == 0).then_some(())
    })
    .await;
    let mut client = cluster.client(1).await;
    let err = client
        .apply_segments(segments(vec![segment("orphan", "exists(login)")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = client
        .list_segments(pb::ReadOptions { stale: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // A stale read still answers from local state.
    assert!(local_segments(&mut client).await.is_empty());
    cluster.restart(2).await;
    cluster.restart(3).await;
    let leader = cluster.leader().await;
    cluster
        .client(leader)
        .await
        .apply_segments(segments(vec![segment("later", "exists(login)")]))
        .await
        .unwrap();
    cluster.converged().await;
    for id in [1, 2, 3] {
        let mut client = cluster.client(id).await;
        let ids: Vec<String> = local_segments(&mut client)
            .await
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        assert_eq!(ids, ["later"], "member {id}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raft_messages_that_are_malformed_or_not_from_a_member_are_rejected() {
    let cluster = Cluster::start(3, 10, |_| {}).await;
    let leader = cluster.leader().await;
    let target = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let addr = cluster.members[&target].addr;
    let mut peer = RaftPeerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let garbage = pb::RaftBatch {
        from: leader,
        messages: vec![vec![0xff, 0xff, 0xff, 0x0a, 0x80]],
    };
    assert_eq!(
        peer.send(garbage).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let mut forged = raft::eraftpb::Message::default();
    forged.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
    forged.from = 99;
    forged.to = target;
    forged.term = 1_000;
    let stranger = pb::RaftBatch {
        from: 99,
        messages: vec![forged.write_to_bytes().unwrap()],
    };
    assert_eq!(
        peer.send(stranger).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // A member's id on the envelope does not vouch for a message claiming another sender.
    let spoofed = pb::RaftBatch {
        from: leader,
        messages: vec![forged.write_to_bytes().unwrap()],
    };
    assert_eq!(
        peer.send(spoofed).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // The member is unharmed: the term did not jump and writes still commit.
    let status = cluster.status(target).await.unwrap();
    assert!(status.term < 1_000, "{status:?}");
    cluster
        .client(target)
        .await
        .apply_segments(segments(vec![segment("still_fine", "exists(login)")]))
        .await
        .unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_cluster_secret_raft_messages_without_it_are_refused_before_decoding() {
    let secret = "correct-horse-battery-staple";
    let cluster = Cluster::start(3, 12, |c| c.cluster_secret = Some(secret.into())).await;
    // The members themselves present it: the group elects and commits.
    let leader = cluster.leader().await;
    cluster
        .client(leader)
        .await
        .apply_segments(segments(vec![segment("ok", "exists(login)")]))
        .await
        .unwrap();
    let target = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let addr = cluster.members[&target].addr;
    let mut peer = RaftPeerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let batch = || pb::RaftBatch {
        from: leader,
        messages: vec![vec![0xff; 8]],
    };
    assert_eq!(
        peer.send(batch()).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let mut wrong = tonic::Request::new(batch());
    wrong.metadata_mut().insert(
        "x-dynseg-cluster-secret",
        "correct-horse-battery-stapler".parse().unwrap(),
    );
    assert_eq!(
        peer.send(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // With the secret, the same garbage reaches the decoder and is refused there.
    let mut right = tonic::Request::new(batch());
    right
        .metadata_mut()
        .insert("x-dynseg-cluster-secret", secret.parse().unwrap());
    assert_eq!(
        peer.send(right).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_mutual_tls_members_replicate_over_tls_and_callers_need_a_certificate() {
    use dynseg_proto::auth::{Access, Credentials};
    use dynseg_proto::client;
    use dynseg_proto::pb::control_client::ControlClient;
    use dynseg_proto::tls::{Tls, client_trusting};
    let tls = Tls::self_signed(&["localhost", "127.0.0.1"], true).unwrap();
    let cluster = Cluster::start(3, 14, |c| {
        c.access = Access::open().with_tls(Some(tls.clone()));
    })
    .await;
    let addr = |id: u64| cluster.members[&id].addr.to_string();
    // Raft runs over the members' mutual TLS: a leader is elected and a
    // write commits on every member.
    let member = Credentials::none().with_tls(tls.client());
    let connect = |id: u64, credentials: Credentials| {
        let addr = addr(id);
        async move {
            client::connect(&addr, credentials)
                .await
                .map(ControlClient::new)
        }
    };
    let leader = eventually("a leader over mutual TLS", || async {
        let mut leaders = Vec::new();
        for id in [1, 2, 3] {
            let mut client = connect(id, member.clone()).await.ok()?;
            let status = client
                .get_control_status(pb::ControlStatusRequest {})
                .await
                .ok()?
                .into_inner();
            leaders.push(status.leader_id);
        }
        (leaders[0] != 0 && leaders.iter().all(|l| *l == leaders[0])).then_some(leaders[0])
    })
    .await;
    connect(leader, member.clone())
        .await
        .unwrap()
        .apply_segments(segments(vec![segment("over_tls", "exists(login)")]))
        .await
        .unwrap();
    for id in [1, 2, 3] {
        let client = connect(id, member.clone()).await.unwrap();
        eventually("the write everywhere", || async {
            let listed = client
                .clone()
                .list_segments(pb::ReadOptions { stale: true })
                .await
                .ok()?
                .into_inner();
            listed
                .segments
                .iter()
                .any(|s| s.def.as_ref().is_some_and(|d| d.id == "over_tls"))
                .then_some(())
        })
        .await;
    }
    // Trusting the CA without a certificate of one's own: refused at the
    // handshake or on the first call; so is plaintext.
    let anonymous = Credentials::none().with_tls(client_trusting(tls.cert_pem()));
    let refused = match connect(leader, anonymous).await {
        Err(_) => true,
        Ok(mut client) => client
            .list_segments(pb::ReadOptions { stale: true })
            .await
            .is_err(),
    };
    assert!(refused, "a caller without a certificate got through");
    let plaintext = match connect(leader, Credentials::none()).await {
        Err(_) => true,
        Ok(mut client) => tokio::time::timeout(
            Duration::from_secs(5),
            client.list_segments(pb::ReadOptions { stale: true }),
        )
        .await
        .map_or(true, |r| r.is_err()),
    };
    assert!(plaintext, "a plaintext caller got through");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rule_limits_are_the_proposing_members_and_apply_checks_the_ceiling() {
    let cluster = Cluster::start(1, 15, |c| {
        c.rule_limits.set("max_nodes=8").unwrap();
        c.rule_limits.set("max_rule_bytes=32768").unwrap();
    })
    .await;
    let leader = cluster.leader().await;
    let mut client = cluster.client(leader).await;
    // Over this member's policy: refused, with the limit named, nothing written.
    let wide = (0..6)
        .map(|i| format!("exists(e{i})"))
        .collect::<Vec<_>>()
        .join(" or ");
    let refused = client
        .apply_segments(segments(vec![segment("wide", &wide)]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("limit of 8 terms"),
        "{refused:?}"
    );
    let validated = client
        .validate_segments(segments(vec![segment("wide", &wide)]))
        .await
        .unwrap_err();
    assert!(validated.message().contains("limit of 8 terms"));
    assert!(local_segments(&mut client).await.is_empty());
    // Raised over the default (16 KiB of text): a 20 KiB rule is accepted.
    let padded = format!("exists(login) {}", " ".repeat(20 * 1024));
    client
        .apply_segments(segments(vec![segment("padded", &padded)]))
        .await
        .unwrap();
    assert_eq!(local_segments(&mut client).await.len(), 1);
    cluster.shutdown().await;
}
