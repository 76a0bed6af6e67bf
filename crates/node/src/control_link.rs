//! Keeps a node in step with the control plane: registers the node, then follows
//! the control plane's `Watch`, applying each new rule-set version (a version is
//! committed through Raft before any node applies it) and taking or releasing
//! shards as placement says.
//!
//! One task owns the link; it reconnects after any error with a capped backoff
//! and stops when its [`ControlLink`] is shut down.

use std::collections::BTreeMap;
use std::time::Duration;

use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use dynseg_proto::pb::watch_event::Kind;
use dynseg_rules::SegmentDef;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::NodeError;
use crate::runtime::Node;

/// How this node presents itself to the control plane.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// The control plane member to talk to (`host:port`).
    pub control: String,
    /// The address other processes reach this node's gRPC service at.
    pub advertise: String,
    /// Share of shards relative to other nodes.
    pub weight: u32,
}

/// What the control plane has told this node so far.
#[derive(Default)]
struct Known {
    rules_version: u64,
    segments: BTreeMap<String, pb::SegmentDef>,
    topology: Option<pb::Topology>,
}

impl Known {
    fn apply(&mut self, event: pb::WatchEvent) {
        self.rules_version = event.rules_version;
        match event.kind {
            Some(Kind::Snapshot(snapshot)) => {
                self.segments = snapshot
                    .segments
                    .into_iter()
                    .filter_map(|s| s.def)
                    .map(|d| (d.id.clone(), d))
                    .collect();
                self.topology = snapshot.topology;
            }
            Some(Kind::SegmentPut(record)) => {
                if let Some(def) = record.def {
                    self.segments.insert(def.id.clone(), def);
                }
            }
            Some(Kind::SegmentDeleted(id)) => {
                self.segments.remove(&id);
            }
            Some(Kind::Topology(topology)) => self.topology = Some(topology),
            Some(Kind::ControlMembers(_)) | None => {}
        }
    }
}

/// Owns the link task.
pub struct ControlLink {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ControlLink {
    /// Starts following the control plane for `node`.
    pub fn spawn(node: Node, config: LinkConfig) -> ControlLink {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(node, config, stopped));
        ControlLink {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops following (the node keeps running).
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ControlLink {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn run(node: Node, config: LinkConfig, mut stopped: oneshot::Receiver<()>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            result = follow(&node, &config) => {
                if let Err(e) = result {
                    tracing::warn!(control = %config.control, error = %e, "control link lost; reconnecting");
                }
            }
        }
        tokio::select! {
            _ = &mut stopped => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn url(address: &str) -> String {
    if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    }
}

async fn follow(node: &Node, config: &LinkConfig) -> Result<(), NodeError> {
    let unavailable =
        |e: &dyn std::fmt::Display| NodeError::Unavailable(format!("control plane: {e}"));
    let mut client = ControlClient::connect(url(&config.control))
        .await
        .map_err(|e| unavailable(&e))?
        .max_decoding_message_size(64 << 20);
    client
        .register_member(pb::RegisterMemberRequest {
            kind: pb::MemberKind::Node as i32,
            id: node.config().node_id.clone(),
            address: config.advertise.clone(),
            weight: config.weight,
        })
        .await
        .map_err(|e| unavailable(&e))?;
    let mut stream = client
        .watch(pb::WatchRequest { from_revision: 0 })
        .await
        .map_err(|e| unavailable(&e))?
        .into_inner();
    let mut known = Known::default();
    loop {
        let Some(event) = stream.message().await.map_err(|e| unavailable(&e))? else {
            return Err(unavailable(&"watch stream ended"));
        };
        known.apply(event);
        // Take everything already delivered before acting, so a replay from
        // the start applies the latest rule set once, not every version.
        loop {
            tokio::select! {
                biased;
                next = stream.message() => match next.map_err(|e| unavailable(&e))? {
                    Some(event) => known.apply(event),
                    None => return Err(unavailable(&"watch stream ended")),
                },
                () = std::future::ready(()) => break,
            }
        }
        sync_rules(node, &known).await?;
        sync_shards(node, &known).await?;
    }
}

async fn sync_rules(node: &Node, known: &Known) -> Result<(), NodeError> {
    if known.rules_version <= node.rule_version() {
        return Ok(());
    }
    let defs = known
        .segments
        .values()
        .cloned()
        .map(SegmentDef::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NodeError::Invalid(format!("segment from the control plane: {e}")))?;
    let (progress, mut reports) = mpsc::channel::<pb::RuleProgress>(64);
    let drain = tokio::spawn(async move {
        while let Some(report) = reports.recv().await {
            if report.finished {
                tracing::debug!(
                    shard = report.shard,
                    version = report.version,
                    "rules applied"
                );
            }
        }
    });
    let applied = node.apply_rules(known.rules_version, defs, progress).await;
    let _ = drain.await;
    applied?;
    tracing::info!(
        version = known.rules_version,
        "applied rule-set version from the control plane"
    );
    Ok(())
}

async fn sync_shards(node: &Node, known: &Known) -> Result<(), NodeError> {
    let Some(topology) = &known.topology else {
        return Ok(());
    };
    let me = &node.config().node_id;
    if topology.shard_count != node.config().shard_count {
        return Err(NodeError::Invalid(format!(
            "the cluster has {} shards, this node was started with {}",
            topology.shard_count,
            node.config().shard_count
        )));
    }
    let serving: BTreeMap<u32, u64> = node.serving().into_iter().collect();
    let addresses: BTreeMap<&str, &str> = topology
        .nodes
        .iter()
        .map(|n| (n.id.as_str(), n.address.as_str()))
        .collect();
    for placement in &topology.shards {
        let mine = placement.node_id == *me;
        match (mine, serving.get(&placement.shard)) {
            (true, Some(epoch)) if *epoch == placement.epoch => {}
            (true, _) => node.assign_shard(placement.shard, placement.epoch).await?,
            (false, Some(_)) => {
                let owner = addresses
                    .get(placement.node_id.as_str())
                    .map(|a| (*a).to_owned());
                node.release_shard(placement.shard, owner).await?;
            }
            (false, None) => {}
        }
    }
    Ok(())
}
