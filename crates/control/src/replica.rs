//! One control-plane member's replica: the task that owns the raft `RawNode`, its
//! sled storage and the state machine, and runs the `Ready` loop; and the
//! [`ReplicaHandle`] through which the gRPC services talk to it.
//!
//! Everything that changes the replica goes through one bounded channel into the
//! task. What readers need (the state, the retained history of changes, raft
//! status) is published after every `Ready` as an immutable [`View`] on a
//! `tokio::sync::watch`, so reads and watch streams never wait for the task
//! except to confirm a read index.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, ReadOnlyOption, StateRole, Storage as _};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::ControlConfig;
use crate::error::ControlError;
use crate::logger::raft_logger;
use crate::state::{ClusterState, Command, Revised};
use crate::storage::{self, RaftStorage};
use crate::transport::{Report, Transport};

/// Requests queued for the raft task before callers wait.
const INPUT_QUEUE: usize = 4096;

/// The raft side of a member, as readers see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftStatus {
    /// This member's id.
    pub id: u64,
    /// Leader, follower, candidate or pre-candidate.
    pub role: Role,
    /// The leader this member knows of (0: none).
    pub leader_id: u64,
    /// Current term.
    pub term: u64,
    /// Highest log index known committed.
    pub commit: u64,
    /// Highest log index applied to the state machine.
    pub applied: u64,
    /// Index of the latest state-machine snapshot.
    pub snapshot_index: u64,
    /// Snapshots received from a leader since this process started.
    pub snapshots_installed: u64,
}

/// A member's raft role.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// Replicates the leader's log.
    #[default]
    Follower,
    /// Asking for votes.
    Candidate,
    /// Checking it could win before asking for votes.
    PreCandidate,
    /// Accepts writes.
    Leader,
}

impl Role {
    /// Lower-case name, as the status API reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::PreCandidate => "pre-candidate",
            Role::Leader => "leader",
        }
    }
}

impl From<StateRole> for Role {
    fn from(role: StateRole) -> Role {
        match role {
            StateRole::Follower => Role::Follower,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Leader => Role::Leader,
        }
    }
}

/// What readers see, published after every `Ready`.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// The state machine at `raft.applied`.
    pub state: Arc<ClusterState>,
    /// The latest committed changes, oldest first (at most `watch_history`).
    pub history: Arc<VecDeque<Revised>>,
    /// Raft status.
    pub raft: RaftStatus,
}

/// A change to the raft group's own membership.
#[derive(Clone, Debug)]
pub enum MemberChange {
    /// Add a voter that serves at `address`.
    Add {
        /// Its raft id.
        id: u64,
        /// Its gRPC address.
        address: String,
    },
    /// Remove a voter.
    Remove {
        /// Its raft id.
        id: u64,
    },
}

type WriteReply = oneshot::Sender<Result<Vec<Revised>, ControlError>>;

enum Input {
    Propose {
        command: Command,
        reply: WriteReply,
    },
    ChangeMembers {
        change: MemberChange,
        reply: WriteReply,
    },
    ReadIndex {
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    Step(Box<Message>),
}

/// Talks to a member's raft task. Cheap to clone.
#[derive(Clone)]
pub struct ReplicaHandle {
    inputs: mpsc::Sender<Input>,
    views: watch::Receiver<Arc<View>>,
    timeout: Duration,
}

impl ReplicaHandle {
    /// The latest published view (this member's state, possibly stale).
    pub fn view(&self) -> Arc<View> {
        self.views.borrow().clone()
    }

    /// A receiver that wakes on every new view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<View>> {
        self.views.clone()
    }

    async fn submit<T>(
        &self,
        input: Input,
        reply: oneshot::Receiver<Result<T, ControlError>>,
        late: impl FnOnce() -> ControlError,
    ) -> Result<T, ControlError> {
        self.inputs
            .send(input)
            .await
            .map_err(|_| ControlError::ShuttingDown)?;
        match tokio::time::timeout(self.timeout, reply).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ControlError::ShuttingDown),
            Err(_) => Err(late()),
        }
    }

    /// Proposes a command and waits until it is committed and applied here.
    pub async fn propose(&self, command: Command) -> Result<Vec<Revised>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Input::Propose { command, reply }, rx, || {
            ControlError::Unconfirmed("no commit seen before the request timeout".into())
        })
        .await
    }

    /// Adds or removes a raft member and waits until the change is applied here.
    pub async fn change_members(&self, change: MemberChange) -> Result<Vec<Revised>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Input::ChangeMembers { change, reply }, rx, || {
            ControlError::Unconfirmed("membership change not seen committed in time".into())
        })
        .await
    }

    /// Waits until this member has applied everything committed when the call
    /// began (raft's read index), then returns the view: a linearizable read.
    pub async fn read(&self) -> Result<Arc<View>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Input::ReadIndex { reply }, rx, || {
            ControlError::NoLeader("the leader did not confirm a read index in time".into())
        })
        .await?;
        Ok(self.view())
    }

    /// Hands a raft message from a peer to the task; a full queue loses it
    /// (raft retries), so a flood from a peer cannot block the service.
    pub fn step(&self, message: Message) -> Result<(), ControlError> {
        match self.inputs.try_send(Input::Step(Box::new(message))) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ControlError::ShuttingDown),
        }
    }
}

/// Owns the raft task; dropping it without [`ReplicaTask::shutdown`] aborts it.
pub struct ReplicaTask {
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<()>>,
}

impl ReplicaTask {
    /// Stops the task after its current `Ready`, syncs storage and waits.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
    }
}

impl Drop for ReplicaTask {
    fn drop(&mut self) {
        if let Some(join) = self.join.take() {
            join.abort();
        }
    }
}

/// Opens storage under `config.data_dir`, bootstraps a founding member on first
/// start, and spawns the raft task.
pub fn start(config: &ControlConfig) -> Result<(ReplicaHandle, ReplicaTask), ControlError> {
    let db = storage::open_db(&config.data_dir.join("raft"))?;
    let mut storage = RaftStorage::open(&db)?;
    if !storage.is_initialized() && !config.join {
        bootstrap(&mut storage, config)?;
    }
    let state = match storage.snapshot_data()? {
        Some(data) => serde_json::from_slice(&data)
            .map_err(|e| ControlError::Corrupt(format!("state snapshot: {e}")))?,
        None => ClusterState::default(),
    };
    let applied = storage.snapshot_metadata().index;
    let raft_config = raft::Config {
        id: config.id,
        election_tick: config.election_ticks,
        heartbeat_tick: config.heartbeat_ticks,
        applied,
        check_quorum: true,
        pre_vote: true,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        read_only_option: ReadOnlyOption::Safe,
        ..Default::default()
    };
    raft_config.validate()?;
    let raw = RawNode::new(&raft_config, storage, &raft_logger(config.id))?;
    let (reports_tx, reports) = mpsc::channel(1024);
    let secret = match &config.cluster_secret {
        Some(secret) => Some(secret.parse().map_err(|_| {
            ControlError::InvalidArgument("the cluster secret must be printable ASCII".into())
        })?),
        None => None,
    };
    let tls = config.access.tls().map(dynseg_proto::tls::Tls::client);
    let mut transport = Transport::new(config.id, secret, tls, config.faults.clone(), reports_tx);
    // A joining member knows nobody until its first snapshot: it answers the
    // peers it was started with.
    if state.control_members.is_empty() {
        transport.set_peers(&config.peers);
    } else {
        transport.set_peers(&state.control_members);
    }
    let (inputs_tx, inputs) = mpsc::channel(INPUT_QUEUE);
    let (views_tx, views) = watch::channel(Arc::new(View::default()));
    let (stop_tx, stop) = oneshot::channel();
    let mut replica = Replica {
        id: config.id,
        raw,
        state: Arc::new(state),
        history: Arc::new(VecDeque::new()),
        applied,
        transport,
        views: views_tx,
        pending_writes: HashMap::new(),
        applied_writes: Vec::new(),
        pending_reads: HashMap::new(),
        confirmed_reads: Vec::new(),
        next_seq: 1,
        snapshots_installed: 0,
        snapshot_due: false,
        snapshot_interval: config.snapshot_interval.max(1),
        watch_history: config.watch_history.max(1),
    };
    replica.publish();
    let join = tokio::spawn(replica.run(config.tick, inputs, reports, stop));
    Ok((
        ReplicaHandle {
            inputs: inputs_tx,
            views,
            timeout: config.request_timeout,
        },
        ReplicaTask {
            stop: Some(stop_tx),
            join: Some(join),
        },
    ))
}

/// A founding member starts from the same snapshot as every other founder: index
/// 1, the founders as voters, and a state machine that knows their addresses.
fn bootstrap(storage: &mut RaftStorage, config: &ControlConfig) -> Result<(), ControlError> {
    let mut peers = config.peers.clone();
    if peers.is_empty() {
        return Err(ControlError::InvalidArgument(
            "a founding member needs --peers (its own id and address at least)".into(),
        ));
    }
    if !peers.contains_key(&config.id) {
        return Err(ControlError::InvalidArgument(format!(
            "--peers must include this member's id {}",
            config.id
        )));
    }
    if peers.contains_key(&0) {
        return Err(ControlError::InvalidArgument("raft ids start at 1".into()));
    }
    let state = ClusterState {
        control_members: std::mem::take(&mut peers),
        ..ClusterState::default()
    };
    let mut snapshot = Snapshot::default();
    let meta = snapshot.mut_metadata();
    meta.index = 1;
    meta.term = 1;
    meta.mut_conf_state().voters = state.control_members.keys().copied().collect();
    snapshot.data = serde_json::to_vec(&state)
        .map_err(|e| ControlError::Corrupt(format!("state snapshot: {e}")))?
        .into();
    storage.apply_snapshot(&snapshot)?;
    storage.sync()
}

struct Replica {
    id: u64,
    raw: RawNode<RaftStorage>,
    state: Arc<ClusterState>,
    history: Arc<VecDeque<Revised>>,
    applied: u64,
    transport: Transport,
    views: watch::Sender<Arc<View>>,
    /// Our proposals not yet applied, by sequence number (in the entry context).
    pending_writes: HashMap<u64, WriteReply>,
    /// Our proposals applied in this `Ready`, answered once its view is
    /// published: a caller that reads the view after its answer sees its write.
    applied_writes: Vec<(WriteReply, Result<Vec<Revised>, ControlError>)>,
    /// Read-index requests raft has not yet answered, by sequence number.
    pending_reads: HashMap<u64, oneshot::Sender<Result<(), ControlError>>>,
    /// Read indexes confirmed by the leader, waiting for apply to reach them.
    confirmed_reads: Vec<(u64, oneshot::Sender<Result<(), ControlError>>)>,
    next_seq: u64,
    /// Take a snapshot at the next chance, whatever the interval says.
    snapshot_due: bool,
    snapshots_installed: u64,
    snapshot_interval: u64,
    watch_history: usize,
}

/// Context of a proposal: proposer id, then its sequence number.
fn context(id: u64, seq: u64) -> Vec<u8> {
    let mut ctx = Vec::with_capacity(16);
    ctx.extend_from_slice(&id.to_be_bytes());
    ctx.extend_from_slice(&seq.to_be_bytes());
    ctx
}

fn parse_context(ctx: &[u8]) -> Option<(u64, u64)> {
    let id = u64::from_be_bytes(ctx.get(..8)?.try_into().ok()?);
    let seq = u64::from_be_bytes(ctx.get(8..16)?.try_into().ok()?);
    Some((id, seq))
}

impl Replica {
    async fn run(
        mut self,
        tick: Duration,
        mut inputs: mpsc::Receiver<Input>,
        mut reports: mpsc::Receiver<Report>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(256);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = ticker.tick() => {
                    self.raw.tick();
                    self.pending_writes.retain(|_, reply| !reply.is_closed());
                    self.pending_reads.retain(|_, reply| !reply.is_closed());
                }
                n = inputs.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        break;
                    }
                    for input in batch.drain(..) {
                        self.handle(input);
                    }
                }
                Some(report) = reports.recv() => match report {
                    Report::Unreachable(peer) => self.raw.report_unreachable(peer),
                    Report::Snapshot(peer, delivered) => self.raw.report_snapshot(
                        peer,
                        if delivered {
                            raft::SnapshotStatus::Finish
                        } else {
                            raft::SnapshotStatus::Failure
                        },
                    ),
                },
            }
            if let Err(e) = self.on_ready() {
                // Storage failed under raft: continuing could break its
                // guarantees, so this member stops and must be restarted.
                tracing::error!(member = self.id, error = %e, "raft storage failed; stopping");
                break;
            }
        }
        if let Err(e) = self.raw.store().sync() {
            tracing::error!(member = self.id, error = %e, "final raft storage sync failed");
        }
        self.transport.shutdown().await;
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Step(message) => {
                if let Err(e) = self.raw.step(*message) {
                    tracing::debug!(member = self.id, error = %e, "raft message not stepped");
                }
            }
            Input::Propose { command, reply } => {
                let data = match serde_json::to_vec(&command) {
                    Ok(data) => data,
                    Err(e) => {
                        let _ = reply.send(Err(ControlError::Corrupt(e.to_string())));
                        return;
                    }
                };
                let seq = self.next_seq();
                match self.raw.propose(context(self.id, seq), data) {
                    Ok(()) => {
                        self.pending_writes.insert(seq, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(self.refused(e)));
                    }
                }
            }
            Input::ChangeMembers { change, reply } => {
                let mut cc = ConfChange::default();
                match &change {
                    MemberChange::Add { id, address } => {
                        if *id == 0 || self.state.control_members.contains_key(id) {
                            let _ = reply.send(Err(ControlError::FailedPrecondition(format!(
                                "member {id} is already in the group (or 0)"
                            ))));
                            return;
                        }
                        cc.set_change_type(ConfChangeType::AddNode);
                        cc.node_id = *id;
                        cc.context = address.clone().into_bytes().into();
                    }
                    MemberChange::Remove { id } => {
                        if !self.state.control_members.contains_key(id) {
                            let _ = reply.send(Err(ControlError::MemberNotFound(format!(
                                "control member {id}"
                            ))));
                            return;
                        }
                        if self.state.control_members.len() == 1 {
                            let _ = reply.send(Err(ControlError::FailedPrecondition(
                                "cannot remove the last control member".into(),
                            )));
                            return;
                        }
                        cc.set_change_type(ConfChangeType::RemoveNode);
                        cc.node_id = *id;
                    }
                }
                let seq = self.next_seq();
                match self.raw.propose_conf_change(context(self.id, seq), cc) {
                    Ok(()) => {
                        self.pending_writes.insert(seq, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(self.refused(e)));
                    }
                }
            }
            Input::ReadIndex { reply } => {
                if self.raw.raft.leader_id == raft::INVALID_ID {
                    let _ = reply.send(Err(ControlError::NoLeader(
                        "this member knows no leader".into(),
                    )));
                    return;
                }
                let seq = self.next_seq();
                self.raw.read_index(context(self.id, seq));
                self.pending_reads.insert(seq, reply);
            }
        }
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    fn refused(&self, e: raft::Error) -> ControlError {
        match e {
            raft::Error::ProposalDropped => {
                ControlError::NoLeader("no leader to take the proposal; nothing was applied".into())
            }
            other => ControlError::Raft(other),
        }
    }

    /// The `Ready` loop, in the order raft-rs documents.
    ///
    /// Storage writes and the sync run inline on this task: the messages that
    /// follow must wait for them anyway, and control-plane writes are small and
    /// few, so a worker thread blocked for a sync costs less than handing every
    /// `Ready` to a blocking pool.
    fn on_ready(&mut self) -> Result<(), ControlError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone())?;
        }
        let committed = ready.take_committed_entries();
        self.apply(committed)?;
        self.raw.mut_store().append(ready.entries())?;
        if let Some(hard_state) = ready.hs() {
            self.raw.mut_store().set_hard_state(hard_state.clone())?;
        }
        if ready.must_sync() {
            self.raw.store().sync()?;
        }
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        for read in ready.take_read_states() {
            if let Some((_, seq)) = parse_context(&read.request_ctx)
                && let Some(reply) = self.pending_reads.remove(&seq)
            {
                self.confirmed_reads.push((read.index, reply));
            }
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.transport.send(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply(committed)?;
        self.raw.advance_apply();
        self.maybe_compact()?;
        self.publish();
        for (reply, result) in self.applied_writes.drain(..) {
            let _ = reply.send(result);
        }
        let applied = self.applied;
        let (done, waiting) = std::mem::take(&mut self.confirmed_reads)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.confirmed_reads = waiting;
        for (_, reply) in done {
            let _ = reply.send(Ok(()));
        }
        Ok(())
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), ControlError> {
        let state: ClusterState = serde_json::from_slice(&snapshot.data)
            .map_err(|e| ControlError::Corrupt(format!("state snapshot from leader: {e}")))?;
        self.raw.mut_store().apply_snapshot(&snapshot)?;
        self.applied = snapshot.get_metadata().index;
        self.transport.set_peers(&state.control_members);
        self.state = Arc::new(state);
        // The changes before the snapshot are gone: watchers behind it resync.
        self.history = Arc::new(VecDeque::new());
        self.snapshots_installed += 1;
        tracing::info!(member = self.id, index = self.applied, "installed snapshot");
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), ControlError> {
        for entry in entries {
            self.applied = entry.index;
            let result = match entry.get_entry_type() {
                // A new leader's empty entry, or a proposal raft replaced with an
                // empty one (a membership change while another is still pending).
                _ if entry.data.is_empty() => Err(ControlError::FailedPrecondition(
                    "raft dropped the proposal (another membership change is pending); retry"
                        .into(),
                )),
                EntryType::EntryNormal => match serde_json::from_slice::<Command>(&entry.data) {
                    Ok(command) => Arc::make_mut(&mut self.state).apply(&command),
                    Err(e) => Err(ControlError::Corrupt(format!(
                        "command at {}: {e}",
                        entry.index
                    ))),
                },
                EntryType::EntryConfChange => self.apply_conf_change(&entry),
                EntryType::EntryConfChangeV2 => Err(ControlError::Corrupt(
                    "joint-consensus changes are not used".into(),
                )),
            };
            if let Ok(revised) = &result {
                let history = Arc::make_mut(&mut self.history);
                history.extend(revised.iter().cloned());
                while history.len() > self.watch_history {
                    history.pop_front();
                }
            }
            if let Some((proposer, seq)) = parse_context(&entry.context)
                && proposer == self.id
                && let Some(reply) = self.pending_writes.remove(&seq)
            {
                self.applied_writes.push((reply, result));
            }
        }
        Ok(())
    }

    fn apply_conf_change(&mut self, entry: &Entry) -> Result<Vec<Revised>, ControlError> {
        let cc = ConfChange::parse_from_bytes(&entry.data)
            .map_err(|e| ControlError::Corrupt(format!("conf change at {}: {e}", entry.index)))?;
        let conf_state = self.raw.apply_conf_change(&cc)?;
        self.raw.mut_store().set_conf_state(conf_state)?;
        let address = match cc.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                Some(String::from_utf8_lossy(&cc.context).into_owned())
            }
            ConfChangeType::RemoveNode => None,
        };
        let revised = Arc::make_mut(&mut self.state).set_control_member(cc.node_id, address);
        // raft-rs ignores a snapshot whose configuration lacks the receiver, so a
        // member just added must be sent one taken after its addition.
        self.snapshot_due = true;
        self.transport.set_peers(&self.state.control_members);
        Ok(revised)
    }

    fn maybe_compact(&mut self) -> Result<(), ControlError> {
        let snapshot_index = self.raw.store().snapshot_metadata().index;
        if !self.snapshot_due && self.applied < snapshot_index + self.snapshot_interval {
            return Ok(());
        }
        self.snapshot_due = false;
        let data = serde_json::to_vec(&*self.state)
            .map_err(|e| ControlError::Corrupt(format!("state snapshot: {e}")))?;
        let conf_state = self.raw.store().initial_state()?.conf_state;
        let applied = self.applied;
        self.raw
            .mut_store()
            .compact_to_snapshot(applied, conf_state, data)?;
        tracing::debug!(
            member = self.id,
            index = applied,
            "log compacted into a snapshot"
        );
        Ok(())
    }

    fn publish(&mut self) {
        let raft = &self.raw.raft;
        let view = View {
            state: self.state.clone(),
            history: self.history.clone(),
            raft: RaftStatus {
                id: self.id,
                role: raft.state.into(),
                leader_id: raft.leader_id,
                term: raft.term,
                commit: raft.raft_log.committed,
                applied: self.applied,
                snapshot_index: self.raw.store().snapshot_metadata().index,
                snapshots_installed: self.snapshots_installed,
            },
        };
        self.views.send_replace(Arc::new(view));
    }
}
