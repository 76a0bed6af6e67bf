//! An in-process control-plane cluster on 127.0.0.1 (port 0, temp dirs), with
//! shared fault knobs and polling helpers (deadlines, never sleeps).

#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::print_stderr
)]

pub mod process;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dynseg_control::{ControlConfig, ControlServer, Faults};
use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use tonic::transport::Channel;

pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` until it returns `Some`, or panics with `what` after `DEADLINE`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn segment(id: &str, rule: &str) -> pb::SegmentDef {
    pb::SegmentDef {
        id: id.into(),
        rule: rule.into(),
        ..Default::default()
    }
}

pub fn segments(defs: Vec<pb::SegmentDef>) -> pb::SegmentsRequest {
    pb::SegmentsRequest { segments: defs }
}

pub struct Member {
    pub id: u64,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: ControlConfig,
    pub server: Option<ControlServer>,
}

pub struct Cluster {
    pub members: BTreeMap<u64, Member>,
    pub faults: Faults,
}

impl Cluster {
    /// Starts `n` founding members; `tune` adjusts each member's config.
    pub async fn start(n: u64, seed: u64, tune: impl Fn(&mut ControlConfig)) -> Cluster {
        eprintln!("cluster fault seed: {seed}");
        let faults = Faults::seeded(seed);
        let mut listeners = BTreeMap::new();
        for id in 1..=n {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            listeners.insert(id, listener);
        }
        let peers: BTreeMap<u64, String> = listeners
            .iter()
            .map(|(id, l)| (*id, l.local_addr().unwrap().to_string()))
            .collect();
        let mut members = BTreeMap::new();
        for (id, listener) in listeners {
            let dir = tempfile::tempdir().unwrap();
            let mut config = ControlConfig::new(id, dir.path());
            config.peers = peers.clone();
            config.faults = faults.clone();
            tune(&mut config);
            let addr = listener.local_addr().unwrap();
            let server = ControlServer::start(config.clone(), listener)
                .await
                .unwrap();
            members.insert(
                id,
                Member {
                    id,
                    addr,
                    dir,
                    config,
                    server: Some(server),
                },
            );
        }
        Cluster { members, faults }
    }

    pub async fn client(&self, id: u64) -> ControlClient<Channel> {
        let addr = self.members[&id].addr;
        ControlClient::connect(format!("http://{addr}"))
            .await
            .unwrap()
    }

    pub async fn status(&self, id: u64) -> Option<pb::ControlStatus> {
        self.members[&id].server.as_ref()?;
        let mut client = self.client(id).await;
        Some(
            client
                .get_control_status(pb::ControlStatusRequest {})
                .await
                .ok()?
                .into_inner(),
        )
    }

    pub fn running(&self) -> Vec<u64> {
        self.members
            .values()
            .filter(|m| m.server.is_some())
            .map(|m| m.id)
            .collect()
    }

    /// Waits until the running members among `among` agree on one leader in `among`.
    pub async fn leader_among(&self, among: &[u64]) -> u64 {
        eventually("a leader", || async {
            let mut leaders = Vec::new();
            for &id in among {
                let status = self.status(id).await?;
                leaders.push(status.leader_id);
                if status.leader_id == id && status.role != "leader" {
                    return None;
                }
            }
            let first = *leaders.first()?;
            (first != 0 && among.contains(&first) && leaders.iter().all(|l| *l == first))
                .then_some(first)
        })
        .await
    }

    pub async fn leader(&self) -> u64 {
        let running = self.running();
        self.leader_among(&running).await
    }

    pub async fn stop(&mut self, id: u64) {
        let server = self.members.get_mut(&id).unwrap().server.take().unwrap();
        server.shutdown().await;
    }

    /// Restarts a stopped member on its old address and data dir.
    pub async fn restart(&mut self, id: u64) {
        let member = self.members.get_mut(&id).unwrap();
        let listener = tokio::net::TcpListener::bind(member.addr).await.unwrap();
        let server = ControlServer::start(member.config.clone(), listener)
            .await
            .unwrap();
        member.server = Some(server);
    }

    /// Waits until every running member reports the same revision as `id`'s
    /// linearizable read, and returns it.
    pub async fn converged(&self) -> u64 {
        eventually("members to converge", || async {
            let mut revisions = Vec::new();
            for id in self.running() {
                revisions.push(self.status(id).await?.revision);
            }
            let first = *revisions.first()?;
            revisions.iter().all(|r| *r == first).then_some(first)
        })
        .await
    }

    pub async fn shutdown(mut self) {
        for id in self.running() {
            self.stop(id).await;
        }
    }
}

/// Stale segment list of one member (its local state).
pub async fn local_segments(client: &mut ControlClient<Channel>) -> Vec<(String, String, u64)> {
    client
        .list_segments(pb::ReadOptions { stale: true })
        .await
        .unwrap()
        .into_inner()
        .segments
        .into_iter()
        .map(|s| {
            let def = s.def.unwrap();
            (def.id, def.rule, s.version)
        })
        .collect()
}
