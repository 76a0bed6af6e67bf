//! Three real control processes on 127.0.0.1: kill -9 the leader, a new one is
//! elected and writes resume; the killed member restarts from its data dir and
//! catches up. Prints the measured failover time.

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use support::process::start_group;
use support::{eventually, segment, segments};
use tonic::transport::Channel;

async fn client(addr: &str) -> Option<ControlClient<Channel>> {
    ControlClient::connect(format!("http://{addr}")).await.ok()
}

async fn status(addr: &str) -> Option<pb::ControlStatus> {
    Some(
        client(addr)
            .await?
            .get_control_status(pb::ControlStatusRequest {})
            .await
            .ok()?
            .into_inner(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_process_elects_another_and_writes_resume() {
    let bin = Path::new(env!("CARGO_BIN_EXE_dynseg-control"));
    let dir = tempfile::tempdir().unwrap();
    let (addrs, mut processes) = start_group(bin, 3, dir.path());
    let leader = eventually("a leader", || async {
        let s = status(&addrs[0]).await?;
        (s.leader_id != 0).then_some(s.leader_id)
    })
    .await;
    let mut any = client(&addrs[0]).await.unwrap();
    any.apply_segments(segments(vec![segment("before", "exists(login)")]))
        .await
        .unwrap();

    let killed = (leader - 1) as usize;
    let survivor = &addrs[(killed + 1) % 3];
    processes[killed].kill9();
    let killed_at = Instant::now();
    let revision = eventually("a write after the leader was killed", || async {
        let mut c = client(survivor).await?;
        let mut request = tonic::Request::new(segments(vec![segment("after", "exists(login)")]));
        request.set_timeout(Duration::from_millis(500));
        Some(c.apply_segments(request).await.ok()?.into_inner().revision)
    })
    .await;
    let failover = killed_at.elapsed();
    eprintln!("failover: first write committed {failover:?} after kill -9 of the leader");

    // The killed member comes back from its data dir and catches up.
    processes[killed].restart(bin);
    let back = &addrs[killed];
    let caught_up = eventually("the restarted member to catch up", || async {
        let s = status(back).await?;
        (s.revision >= revision && s.leader_id != 0).then_some(s)
    })
    .await;
    assert_ne!(caught_up.leader_id, leader, "the old leader lost its term");
    let list = client(back)
        .await
        .unwrap()
        .list_segments(pb::ReadOptions { stale: false })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = list
        .segments
        .into_iter()
        .map(|s| s.def.unwrap().id)
        .collect();
    assert_eq!(ids, ["after", "before"]);
}
