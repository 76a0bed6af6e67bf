//! Fault tests on in-process clusters: partitions, lossy and slow links. The
//! seed comes from DYNSEG_SEED when set and is printed, so a failure replays.

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

mod support;

use std::time::{Duration, Instant};

use dynseg_proto::pb;
use support::{Cluster, DEADLINE, local_segments, segment, segments};
use tonic::Code;

fn seed(default: u64) -> u64 {
    std::env::var("DYNSEG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_minority_cannot_commit_and_everyone_converges_after_healing() {
    let cluster = Cluster::start(3, seed(11), |c| {
        c.request_timeout = Duration::from_secs(2);
    })
    .await;
    let old = cluster.leader().await;
    let majority: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != old).collect();
    cluster
        .client(old)
        .await
        .apply_segments(segments(vec![segment("before", "exists(login)")]))
        .await
        .unwrap();
    cluster.faults.partition(&[old], &majority);

    // The cut-off leader cannot commit: the write fails and is never applied.
    let err = cluster
        .client(old)
        .await
        .apply_segments(segments(vec![segment("lost", "exists(login)")]))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err:?}"
    );

    // The majority elects a leader of its own and keeps serving.
    let new = cluster.leader_among(&majority).await;
    assert_ne!(new, old);
    for i in 0..5 {
        cluster
            .client(majority[i % 2])
            .await
            .apply_segments(segments(vec![segment(
                &format!("during{i}"),
                "exists(login)",
            )]))
            .await
            .unwrap();
    }
    let mut isolated = cluster.client(old).await;
    assert!(
        !local_segments(&mut isolated)
            .await
            .iter()
            .any(|(id, _, _)| id.starts_with("during"))
    );
    // Linearizable reads on the isolated member fail rather than answer stale.
    let err = isolated
        .list_segments(pb::ReadOptions { stale: false })
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err:?}"
    );

    cluster.faults.heal();
    cluster.converged().await;
    let mut reference = cluster.client(new).await;
    let expected = local_segments(&mut reference).await;
    let ids: Vec<&str> = expected.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "before", "during0", "during1", "during2", "during3", "during4"
        ]
    );
    for id in [1, 2, 3] {
        let mut client = cluster.client(id).await;
        assert_eq!(local_segments(&mut client).await, expected, "member {id}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lossy_slow_links_still_commit_every_acknowledged_write() {
    let seed = seed(23);
    let cluster = Cluster::start(3, seed, |c| {
        c.request_timeout = Duration::from_secs(2);
    })
    .await;
    cluster.leader().await;
    cluster.faults.set_drop(150);
    cluster.faults.set_delay(Duration::from_millis(3));
    let start = Instant::now();
    let mut acknowledged = Vec::new();
    for i in 0..15u64 {
        let id = format!("lossy{i}");
        // Retrying a put is safe: the same definition again is the same segment.
        loop {
            assert!(
                start.elapsed() < DEADLINE,
                "no progress under loss (seed {seed})"
            );
            let target = 1 + (i % 3);
            let result = cluster
                .client(target)
                .await
                .apply_segments(segments(vec![segment(&id, "exists(login)")]))
                .await;
            match result {
                Ok(_) => break,
                Err(e) if matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded) => {}
                Err(e) => panic!("unexpected error {e:?} (seed {seed})"),
            }
        }
        acknowledged.push(id);
    }
    cluster.faults.heal();
    cluster.converged().await;
    let mut first = cluster.client(1).await;
    let reference = local_segments(&mut first).await;
    for id in &acknowledged {
        assert!(
            reference.iter().any(|(got, _, _)| got == id),
            "acknowledged {id} missing (seed {seed})"
        );
    }
    for member in [2, 3] {
        let mut client = cluster.client(member).await;
        assert_eq!(
            local_segments(&mut client).await,
            reference,
            "member {member} (seed {seed})"
        );
    }
    cluster.shutdown().await;
}
