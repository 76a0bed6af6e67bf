//! Keeps a node in step with the control plane: registers the node, then follows
//! the control plane's `Watch`, applying each new rule-set version (a version is
//! committed through Raft before any node applies it), taking or releasing
//! shards as placement says, and running the moves that name this node as
//! their destination ([`moves`](crate::moves)). Every second it heartbeats
//! (with the progress of its incoming moves) and settles move-outs whose
//! destination went quiet.
//!
//! One task owns the link and the move tasks it starts; it reconnects after any
//! error with a capped backoff and stops (aborting its moves) when its
//! [`ControlLink`] is shut down.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use dynseg_proto::auth::Credentials;
use dynseg_proto::client::{self, Conn};
use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use dynseg_proto::pb::watch_event::Kind;
use dynseg_rules::SegmentDef;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::error::NodeError;
use crate::moves::{self, MoveIn};
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
    /// Snapshot copy speed of each incoming move (0: unthrottled).
    pub move_bytes_per_sec: u64,
    /// On shutdown of a draining node, how long to wait for its moves.
    pub drain_timeout: Duration,
    /// Take shards again at start if the node was drained (Kubernetes: the
    /// preStop hook drains every stopping node; the restarted one rejoins).
    pub rejoin: bool,
}

impl LinkConfig {
    /// Defaults for everything but the addresses.
    pub fn new(control: String, advertise: String) -> LinkConfig {
        LinkConfig {
            control,
            advertise,
            weight: 1,
            move_bytes_per_sec: DEFAULT_MOVE_BYTES_PER_SEC,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            rejoin: false,
        }
    }
}

/// How long a draining node waits for its moves when told to stop.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Snapshot copy speed unless configured: at 16 MiB/s and one move at a time,
/// ingest kept about 80% of its steady rate during a rebalance on a loaded
/// two-core machine (docs/performance.md).
pub const DEFAULT_MOVE_BYTES_PER_SEC: u64 = 16 << 20;
/// How often the node heartbeats and checks its move-outs.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A draining node's stop reads the control plane's topology with this bound,
/// every this often until its moves are done.
const FRESH_READ: Duration = Duration::from_secs(2);
const DRAIN_POLL: Duration = Duration::from_millis(500);
/// Wait before retrying a move attempt that failed here.
const MOVE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// What the control plane has told this node so far.
#[derive(Default)]
struct Known {
    revision: u64,
    rules_version: u64,
    segments: BTreeMap<String, pb::SegmentDef>,
    topology: Option<pb::Topology>,
}

impl Known {
    fn apply(&mut self, event: pb::WatchEvent) {
        self.revision = self.revision.max(event.revision);
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
    topology: watch::Receiver<Option<pb::Topology>>,
    node: Node,
    /// The control member followed, for fresh reads at shutdown.
    control: String,
}

impl ControlLink {
    /// Starts following the control plane for `node`.
    pub fn spawn(node: Node, config: LinkConfig) -> ControlLink {
        let (stop, stopped) = oneshot::channel();
        let (topology_tx, topology) = watch::channel(None);
        let control = config.control.clone();
        let task = tokio::spawn(run(node.clone(), config, stopped, topology_tx));
        ControlLink {
            stop: Some(stop),
            task: Some(task),
            topology,
            node,
            control,
        }
    }

    /// For a node being drained: waits (up to `timeout`) until it owns no
    /// shard and no move involves it, so that stopping it loses no service.
    /// Returns at once for a node that is not draining. Kubernetes sends
    /// SIGTERM on scale-down; this is what makes that wait for the moves.
    pub async fn wait_drained(&mut self, timeout: Duration) -> bool {
        let me = self.node.config().node_id.clone();
        let done = |topology: &Option<pb::Topology>| {
            let Some(t) = topology else { return true };
            let draining = t.nodes.iter().any(|n| n.id == me && n.draining);
            let involved = t.shards.iter().any(|p| p.node_id == me)
                || t.moves.iter().any(|m| m.from_node == me || m.to_node == me);
            !draining || !involved
        };
        // The watched copy can lag a drain committed just before the stop
        // (a drain command followed at once by SIGTERM): decide on the
        // control plane's current topology, read afresh each round, and on
        // the watched one only when the control plane cannot be read.
        let deadline = tokio::time::Instant::now() + timeout;
        let mut announced = false;
        loop {
            let fresh = tokio::time::timeout(FRESH_READ, self.read_topology()).await;
            let current = match fresh {
                Ok(Ok(topology)) => Some(topology),
                _ => self.topology.borrow().clone(),
            };
            if done(&current) {
                return true;
            }
            if !announced {
                tracing::info!("draining: waiting for this node's shards to move before stopping");
                announced = true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            let _ = tokio::time::timeout(DRAIN_POLL, self.topology.changed()).await;
        }
    }

    /// The control plane's current topology (a linearizable read).
    async fn read_topology(&self) -> Result<pb::Topology, NodeError> {
        let unavailable =
            |e: &dyn std::fmt::Display| NodeError::Unavailable(format!("control plane: {e}"));
        let channel = client::connect(
            &self.control,
            Credentials::member(&self.node.config().access),
        )
        .await
        .map_err(|e| unavailable(&e))?;
        ControlClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .get_topology(pb::ReadOptions { stale: false })
            .await
            .map_err(|e| unavailable(&e))?
            .into_inner()
            .topology
            .ok_or_else(|| unavailable(&"no topology in the answer"))
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

/// How a move task ended: shard, attempt, result.
type MoveOutcome = (u32, u64, Result<(), NodeError>);

/// The moves into this node: the running ones (by shard) and recent failures.
#[derive(Default)]
struct MovesRunning {
    tasks: JoinSet<MoveOutcome>,
    /// By shard: the attempt and the task running it.
    running: BTreeMap<u32, (u64, tokio::task::Id)>,
    failed: BTreeMap<(u32, u64), Instant>,
}

impl MovesRunning {
    /// Starts the moves `topology` sends here. A running move is never cut
    /// short: one whose attempt is no longer current fails at its commit and
    /// cleans up; one that committed must get to serve the shard.
    fn sync(
        &mut self,
        node: &Node,
        control: &ControlClient<Conn>,
        config: &LinkConfig,
        topology: &pb::Topology,
    ) {
        let me = &node.config().node_id;
        let wanted: BTreeMap<u32, &pb::ShardMove> = topology
            .moves
            .iter()
            .filter(|m| m.to_node == *me)
            .map(|m| (m.shard, m))
            .collect();
        self.failed.retain(|_, at| at.elapsed() < MOVE_RETRY_AFTER);
        for (shard, m) in wanted {
            if self.running.contains_key(&shard) || self.failed.contains_key(&(shard, m.attempt)) {
                continue;
            }
            let Some(source) = topology.nodes.iter().find(|n| n.id == m.from_node) else {
                continue;
            };
            let job = MoveIn {
                shard,
                attempt: m.attempt,
                source: source.address.clone(),
                bytes_per_sec: config.move_bytes_per_sec,
            };
            let (node, control, attempt) = (node.clone(), control.clone(), m.attempt);
            tracing::info!(shard, attempt, from = %m.from_node, "moving a shard here");
            let handle = self.tasks.spawn(async move {
                (shard, attempt, moves::run_move_in(node, control, job).await)
            });
            self.running.insert(shard, (attempt, handle.id()));
        }
    }

    /// Records a move task's end, however it ended.
    fn joined(&mut self, joined: Result<(tokio::task::Id, MoveOutcome), tokio::task::JoinError>) {
        match joined {
            Ok((_, (shard, attempt, result))) => self.finished(shard, attempt, result),
            // Panicked: forget it so that it can be started again.
            Err(e) => {
                let id = e.id();
                let Some((&shard, &(attempt, _))) =
                    self.running.iter().find(|(_, (_, task))| *task == id)
                else {
                    return;
                };
                self.finished(
                    shard,
                    attempt,
                    Err(NodeError::Unavailable(format!("move task ended: {e}"))),
                );
            }
        }
    }

    /// Records a finished move.
    fn finished(&mut self, shard: u32, attempt: u64, result: Result<(), NodeError>) {
        if self.running.get(&shard).is_some_and(|(a, _)| *a == attempt) {
            self.running.remove(&shard);
        }
        if let Err(e) = result {
            tracing::warn!(shard, attempt, error = %e, "moving a shard here failed; retrying");
            self.failed.insert((shard, attempt), Instant::now());
        }
    }
}

async fn run(
    node: Node,
    config: LinkConfig,
    mut stopped: oneshot::Receiver<()>,
    topology: watch::Sender<Option<pb::Topology>>,
) {
    let mut backoff = Duration::from_millis(100);
    // Dropped (aborting every move in) when the link stops.
    let mut moves = MovesRunning::default();
    // Once per process: a drain an operator starts later must stick.
    let mut rejoin = config.rejoin;
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            result = follow(&node, &config, &mut rejoin, &mut moves, &topology) => {
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

async fn follow(
    node: &Node,
    config: &LinkConfig,
    rejoin: &mut bool,
    moves: &mut MovesRunning,
    published: &watch::Sender<Option<pb::Topology>>,
) -> Result<(), NodeError> {
    let unavailable =
        |e: &dyn std::fmt::Display| NodeError::Unavailable(format!("control plane: {e}"));
    let channel = client::connect(&config.control, Credentials::member(&node.config().access))
        .await
        .map_err(|e| unavailable(&e))?;
    let mut client = ControlClient::new(channel).max_decoding_message_size(64 << 20);
    client
        .register_member(pb::RegisterMemberRequest {
            kind: pb::MemberKind::Node as i32,
            id: node.config().node_id.clone(),
            address: config.advertise.clone(),
            weight: config.weight,
        })
        .await
        .map_err(|e| unavailable(&e))?;
    if *rejoin {
        client
            .add_node(pb::AddNodeRequest {
                node: node.config().node_id.clone(),
                weight: 0,
            })
            .await
            .map_err(|e| unavailable(&e))?;
        *rejoin = false;
        tracing::info!("rejoined: this node takes shards again");
    }
    // The watch replays history first; placement is acted on only once it is
    // at least as new as this linearizable read, so a reconnecting node never
    // releases (and deletes) a shard on the strength of an old placement.
    let current = client
        .get_topology(pb::ReadOptions { stale: false })
        .await
        .map_err(|e| unavailable(&e))?
        .into_inner()
        .revision;
    let mut stream = client
        .watch(pb::WatchRequest { from_revision: 0 })
        .await
        .map_err(|e| unavailable(&e))?
        .into_inner();
    let mut known = Known::default();
    let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            event = stream.message() => event.map_err(|e| unavailable(&e))?,
            _ = heartbeat.tick() => {
                beat(node, &mut client).await?;
                moves::settle_idle(node, &mut client).await;
                if let Some(topology) = known.topology.as_ref().filter(|_| known.revision >= current) {
                    moves.sync(node, &client, config, topology);
                }
                continue;
            }
            Some(joined) = moves.tasks.join_next_with_id(), if !moves.tasks.is_empty() => {
                moves.joined(joined);
                continue;
            }
        };
        let Some(event) = event else {
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
        sync_rules(node, &mut client, &known).await?;
        // Webhooks follow the definitions whatever the rule version (a node
        // restarting on the current version still needs them).
        let defs: Vec<pb::SegmentDef> = known.segments.values().cloned().collect();
        crate::webhooks::configure(node, crate::webhooks::WebhookConfig::from_defs(&defs));
        if known.revision < current {
            continue;
        }
        sync_shards(node, &mut client, &known).await?;
        if let Some(topology) = &known.topology {
            moves.sync(node, &client, config, topology);
            published.send_replace(Some(topology.clone()));
        }
    }
}

/// Tells the control plane this node is alive, with its moves' progress.
async fn beat(node: &Node, client: &mut ControlClient<Conn>) -> Result<(), NodeError> {
    client
        .heartbeat(pb::HeartbeatRequest {
            node_id: node.config().node_id.clone(),
            moves_in: node.inner.moves_in.report(),
        })
        .await
        .map_err(|e| NodeError::Unavailable(format!("control plane: heartbeat: {e}")))?;
    Ok(())
}

/// Applies the control plane's rule set once the watch shows a version newer
/// than the node's. The rule set is read whole (a linearizable read), not
/// taken from the watch: one write of several segments arrives as several
/// watch events of the same version, and acting on the first of them would
/// apply that version with a part of its segments and never revisit it.
async fn sync_rules(
    node: &Node,
    client: &mut ControlClient<Conn>,
    known: &Known,
) -> Result<(), NodeError> {
    if known.rules_version <= node.rule_version() {
        return Ok(());
    }
    let list = client
        .list_segments(pb::ReadOptions { stale: false })
        .await
        .map_err(|e| NodeError::Unavailable(format!("control plane: list segments: {e}")))?
        .into_inner();
    if list.rules_version <= node.rule_version() {
        return Ok(());
    }
    let version = list.rules_version;
    let defs = list
        .segments
        .into_iter()
        .filter_map(|record| record.def)
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
    let applied = node.apply_rules(version, defs, progress).await;
    let _ = drain.await;
    applied?;
    tracing::info!(version, "applied rule-set version from the control plane");
    Ok(())
}

async fn sync_shards(
    node: &Node,
    client: &mut ControlClient<Conn>,
    known: &Known,
) -> Result<(), NodeError> {
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
        let pending = match serving.get(&placement.shard) {
            Some(_) => node.shard_store(placement.shard)?.pending()?,
            None => 0,
        };
        match (mine, serving.get(&placement.shard)) {
            (true, Some(epoch)) if *epoch == placement.epoch => {
                if pending != 0 {
                    // The move that brought it here committed.
                    node.shard_store(placement.shard)?.set_pending(0)?;
                }
            }
            // A move into this node serves the shard itself once committed
            // (its last inputs are in memory and the log, not in the store).
            (true, _) if node.inner.moves_in.contains(placement.shard) => {}
            (true, _) => node.assign_shard(placement.shard, placement.epoch).await?,
            // A copy that moved here, restarted before it learnt whether its
            // move committed: it did not (placement names another node), and
            // aborting the attempt makes sure it never will.
            (false, Some(_)) if pending != 0 => {
                client
                    .abort_move(pb::MoveRequest {
                        shard: placement.shard,
                        attempt: pending,
                    })
                    .await
                    .map_err(|e| NodeError::Unavailable(format!("control plane: {e}")))?;
                let now = client
                    .get_topology(pb::ReadOptions { stale: false })
                    .await
                    .map_err(|e| NodeError::Unavailable(format!("control plane: {e}")))?
                    .into_inner()
                    .topology
                    .unwrap_or_default();
                let owner = now.shards.get(placement.shard as usize);
                if owner.is_some_and(|p| p.node_id == *me) {
                    node.shard_store(placement.shard)?.set_pending(0)?;
                    continue;
                }
                node.release_shard(placement.shard, None).await?;
                node.store().drop_shard(placement.shard)?;
                tracing::info!(
                    shard = placement.shard,
                    attempt = pending,
                    "dropped the copy of a move that did not commit"
                );
            }
            // Only a newer epoch takes a shard away: its new owner committed
            // it with everything this node held.
            (false, Some(epoch)) if placement.epoch > *epoch => {
                let owner = addresses
                    .get(placement.node_id.as_str())
                    .map(|a| (*a).to_owned());
                node.release_shard(placement.shard, owner).await?;
                node.inner.move_outs.remove(placement.shard);
                node.store().drop_shard(placement.shard)?;
                tracing::info!(shard = placement.shard, to = %placement.node_id, "shard moved away");
            }
            (false, _) => {}
        }
    }
    Ok(())
}
