//! The async shell around the shards.
//!
//! ```text
//!  gRPC handlers ──Command──▶ shard task (owns one Shard) ──record──▶ commit thread (WAL)
//!                  ◀─reply──        │ applies in memory at once          │ fdatasync per group
//!                                   ◀────────── durable(lsn) ────────────┘
//!                                   └─ publishes changes (ChangeLog), acks the client
//! ```
//!
//! A shard task applies each input as it arrives and sends its record to the
//! commit thread without waiting; it acknowledges and publishes inputs strictly in
//! order, as their records become durable. Checkpoints happen when nothing is in
//! flight, so a checkpoint's state matches exactly the records before its
//! `replay_from`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dynseg_proto::encoded::decode_event;
use dynseg_proto::pb;
use dynseg_rules::{
    Event, Explanation, Limits, Plan, RuleVersion, SegmentDef, SegmentId, Timestamp, UserId,
    UserState,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::changelog::ChangeLog;
use crate::clock::Clock;
use crate::commit::{CommitThread, Committer, Durable};
use crate::config::NodeConfig;
use crate::error::NodeError;
use crate::moves::{MoveOutSessions, MovesIn};
use crate::record::{Input, Tick, WalRecord};
use crate::shard::{Logged, Shard, ShardConfig};
use crate::store::{ShardStore, Store};
use crate::wal::{Lsn, Wal};

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

/// What a shard task is asked to do.
pub(crate) enum Command {
    Ingest {
        epoch: u64,
        events: Vec<Event>,
        /// The accepted events as the log carries them: an encoded
        /// `EventBatch` (see `record::BatchEncoder`).
        batch: crate::record::EncodedBatch,
        rejected: Vec<pb::RejectedEvent>,
        reply: Reply<pb::IngestResponse>,
    },
    Tick {
        now: Timestamp,
        reply: Option<Reply<()>>,
    },
    Rules {
        plan: Arc<Plan>,
        request: pb::ApplyRulesRequest,
        progress: mpsc::Sender<pb::RuleProgress>,
        reply: Reply<()>,
    },
    GetUser {
        user: UserId,
        reply: Reply<Option<Vec<SegmentId>>>,
    },
    Members {
        segment: String,
        after: String,
        limit: usize,
        reply: Reply<Vec<UserId>>,
    },
    Counts {
        reply: Reply<(BTreeMap<SegmentId, u64>, u64)>,
    },
    Overlap {
        segments: Vec<SegmentId>,
        reply: Reply<(Vec<u64>, u64)>,
    },
    /// Identity merge, step 1 (see [`Shard::merge_out`]).
    MergeOut {
        request: pb::MergeOutRequest,
        reply: Reply<pb::MergeOutResponse>,
    },
    /// Identity merge, step 2 (see [`Shard::merge_in`]); `state` is the
    /// request's, decoded.
    MergeIn {
        request: pb::MergeInRequest,
        state: UserState,
        reply: Reply<pb::MergeInResponse>,
    },
    /// A segment's size as of the last published change, and that change's
    /// sequence: where history is derived from.
    HistoryBase {
        segment: SegmentId,
        reply: Reply<(u64, u64)>,
    },
    Explain {
        user: UserId,
        segment: SegmentId,
        reply: Reply<Option<Explanation>>,
    },
    Preview {
        plan: Arc<Plan>,
        segments: Vec<SegmentId>,
        reply: Reply<(Vec<u64>, u64)>,
    },
    Status {
        reply: Reply<pb::ShardStatus>,
    },
    Checkpoint {
        keep_bytes: usize,
        reply: Reply<Checkpointed>,
    },
    SetEpoch {
        epoch: u64,
        reply: Reply<()>,
    },
    /// Starts a move-out session: checkpoint, then keep every later input.
    BeginMoveOut {
        attempt: u64,
        reply: Reply<MoveOutBegun>,
    },
    /// The inputs kept from `from` on (fencing the shard first if asked).
    MoveOutTail {
        attempt: u64,
        from: usize,
        fence: bool,
        reply: Reply<pb::MoveTailResponse>,
    },
    /// Ends the session and serves writes again (only once the control plane
    /// says the attempt cannot commit).
    EndMoveOut {
        attempt: u64,
        reply: Reply<()>,
    },
    Stop {
        reply: Reply<()>,
    },
}

/// What a shard's checkpoint covers, once written.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Checkpointed {
    /// The first write-ahead log record the checkpoint does not hold.
    replay_from: Lsn,
    /// The last change sequence it holds.
    through: u64,
}

/// What a move-out session starts from.
pub(crate) struct MoveOutBegun {
    pub(crate) epoch: u64,
    pub(crate) rule_version: u64,
}

/// A shard being moved off this node: its checkpoint is the snapshot the
/// destination copies (so no checkpoint is written until the session ends),
/// and every input made durable since is kept for the destination to replay.
struct MoveOut {
    attempt: u64,
    tail: Vec<Vec<u8>>,
    tail_bytes: usize,
    fenced: bool,
    /// The node restarted while fenced: the kept inputs are gone.
    lost: bool,
}

/// Most bytes of inputs one tail read returns.
const TAIL_PAGE_BYTES: usize = 4 << 20;
/// Most bytes of inputs a session keeps: a destination that falls this far
/// behind starts over rather than the source running out of memory.
const TAIL_LIMIT_BYTES: usize = 512 << 20;

/// A running shard, as the rest of the node reaches it.
#[derive(Clone)]
pub(crate) struct ShardHandle {
    pub(crate) tx: mpsc::Sender<Command>,
    pub(crate) log: Arc<ChangeLog>,
    pub(crate) epoch: Arc<AtomicU64>,
}

/// The node's rule set.
#[derive(Clone)]
pub(crate) struct Rules {
    pub(crate) plan: Arc<Plan>,
    pub(crate) defs: Vec<SegmentDef>,
}

pub(crate) struct Inner {
    pub(crate) config: NodeConfig,
    pub(crate) clock: Clock,
    pub(crate) committer: Committer,
    pub(crate) store: Store,
    /// The served shards. A std lock: held only to clone a handle or update the
    /// map, never across an await.
    pub(crate) shards: RwLock<BTreeMap<u32, ShardHandle>>,
    /// Owners of shards released elsewhere, named in redirects.
    pub(crate) owners: RwLock<BTreeMap<u32, String>>,
    pub(crate) rules: RwLock<Rules>,
    /// Shards being moved off this node, for the watchdog that settles them.
    pub(crate) move_outs: MoveOutSessions,
    /// Progress of the shards being copied here.
    pub(crate) moves_in: MovesIn,
    pub(crate) tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// The segments' webhooks, which the webhook dispatcher follows.
    pub(crate) webhooks: watch::Sender<crate::webhooks::WebhookConfig>,
    /// How each webhook delivery is doing.
    pub(crate) webhook_status: crate::webhooks::StatusBoard,
    shutdown: watch::Sender<bool>,
}

/// A running node. Cloning shares it.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

/// Owns what must be stopped in order at shutdown.
pub struct NodeGuard {
    node: Node,
    commit: Option<CommitThread>,
}

/// Compiles the control plane's rule set. Its writes were checked against
/// the proposing member's limits; here the ceiling applies, so whatever the
/// control plane accepted runs on every node.
pub(crate) fn compile(version: u64, defs: &[SegmentDef]) -> Result<Arc<Plan>, NodeError> {
    Ok(Arc::new(Plan::compile(
        defs,
        RuleVersion(version),
        &Limits::ceiling(),
    )?))
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Writers only swap whole values, so a poisoned lock still holds a valid one.
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Runs store work on a blocking thread and returns its result.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| NodeError::Unavailable(format!("store work failed: {e}")))?
}

/// A shard opened from the store under the plan of its stored rule version.
fn open_shard(store: &Store, shard: u32, config: &ShardConfig) -> Result<Shard, NodeError> {
    let shard_store = store.shard(shard)?;
    let version = shard_store.meta()?.rule_version;
    let defs = if version == 0 {
        Vec::new()
    } else {
        store.rules_version(version)?.unwrap_or_default()
    };
    let plan = compile(version, &defs)?;
    Ok(Shard::open(shard, shard_store, plan, config.clone())?)
}

/// The oldest write-ahead log position still needed: the given replay points
/// of served shards, and every stored shard's oldest retained batch left in
/// the log. `None` when nothing is needed from any position.
fn log_needed_from(
    store: &Store,
    replay_from: impl IntoIterator<Item = Lsn>,
) -> Result<Option<Lsn>, NodeError> {
    let mut min = replay_from.into_iter().min();
    for id in store.stored_shards() {
        if let Some(at) = store.shard(id)?.first_logged()? {
            min = Some(min.map_or(at, |m| m.min(at)));
        }
    }
    Ok(min)
}

/// Applies one logged input (`record`, whose bytes are `payload`) to a shard
/// in replay.
pub(crate) fn apply_input(
    shard: &mut Shard,
    record: &WalRecord,
    payload: &bytes::Bytes,
) -> Result<Vec<Logged>, NodeError> {
    let now = Timestamp(record.now_ms);
    match &record.input {
        Some(Input::Batch(batch)) => {
            let events: Vec<Event> = batch
                .events
                .iter()
                .filter_map(|e| decode_event(e).ok())
                .collect();
            Ok(shard.apply_batch(now, &events, payload.clone())?.changes)
        }
        Some(Input::Tick(_)) => Ok(shard.tick(now)?),
        Some(Input::Rules(request)) => {
            let defs = rule_defs(request)?;
            let plan = compile(request.version, &defs)?;
            Ok(shard.apply_rules(plan, now, |_, _| {})?)
        }
        Some(Input::MergeOut(request)) => {
            let user = UserId::new(request.user_id.clone());
            Ok(shard.merge_out(now, &user, &request.merge_id)?.changes)
        }
        Some(Input::MergeIn(request)) => {
            let state = UserState::decode(&request.state)
                .map_err(|e| NodeError::Invalid(format!("merged state: {e}")))?;
            let user = UserId::new(request.user_id.clone());
            Ok(shard.merge_in(now, &user, &request.merge_id, &state)?.1)
        }
        Some(Input::MovedIn(_)) | None => Ok(Vec::new()),
    }
}

pub(crate) fn rule_defs(request: &pb::ApplyRulesRequest) -> Result<Vec<SegmentDef>, NodeError> {
    request
        .segments
        .iter()
        .cloned()
        .map(SegmentDef::try_from)
        .collect::<Result<_, _>>()
        .map_err(|e| NodeError::Invalid(e.0))
}

impl Node {
    /// Opens the node's data (recovering from the write-ahead log after a crash),
    /// starts its shard tasks and its checkpoint loop.
    pub async fn start(config: NodeConfig) -> Result<(Node, NodeGuard), NodeError> {
        let started = Instant::now();
        let wal_dir = config.data_dir.join("wal");
        let (mut wal, repair) = Wal::open(&wal_dir, config.wal_segment_bytes)
            .map_err(|e| NodeError::Wal(Arc::new(e)))?;
        let store = Store::open(
            &config.data_dir.join("store"),
            config.store_cache_bytes,
            &wal_dir,
        )?;
        // A manual clock resumes where it was: time never goes back.
        if let Some(ms) = store.clock()? {
            config.clock.advance_to(Timestamp(ms));
        }
        let (version, defs) = store.rules()?.unwrap_or((0, Vec::new()));
        let mut rules = Rules {
            plan: compile(version, &defs)?,
            defs,
        };

        let mut shards: BTreeMap<u32, Shard> = BTreeMap::new();
        let mut wanted: BTreeMap<u32, u64> = config.shards.iter().copied().collect();
        for stored in store.stored_shards() {
            wanted.entry(stored).or_insert(0);
        }
        for (&id, &epoch) in &wanted {
            if store.shard(id)?.incoming()? {
                tracing::info!(
                    shard = id,
                    "dropping an incomplete copy of a shard moving here"
                );
                store.drop_shard(id)?;
                continue;
            }
            let mut shard = open_shard(&store, id, &config.shard)?;
            if epoch > shard.epoch() {
                shard.set_epoch(epoch);
            }
            shards.insert(id, shard);
        }

        // Replay what the checkpoints do not hold.
        let from = shards
            .values()
            .map(Shard::replay_from)
            .min()
            .unwrap_or_default();
        let mut replayed = 0u64;
        Wal::replay(&wal_dir, from, |at, payload| {
            let payload = bytes::Bytes::copy_from_slice(payload);
            let Ok(record) = WalRecord::from_shared(payload.clone()) else {
                tracing::warn!(?at, "skipping an undecodable write-ahead log record");
                return Ok(());
            };
            // The newest rule set seen in the log is the node's, even if the crash
            // came before it was recorded in the store.
            if let Some(Input::Rules(request)) = &record.input
                && request.version > rules.plan.version().0
                && let Ok(defs) = rule_defs(request)
                && let Ok(plan) = compile(request.version, &defs)
            {
                rules = Rules { plan, defs };
            }
            // Changes replay regenerates go to the shard's unsaved change log, so
            // the checkpoint below stores them for subscribers.
            if let Some(shard) = shards.get_mut(&record.shard)
                && at >= shard.replay_from()
            {
                let batch = shard.next_batch();
                if let Err(e) = apply_input(shard, &record, &payload) {
                    tracing::error!(shard = record.shard, error = %e, "replaying a record failed");
                }
                shard.applied_record(at);
                if matches!(record.input, Some(Input::Batch(_))) {
                    shard.batch_logged(batch, at);
                }
                replayed += 1;
            }
            Ok(())
        })
        .map_err(|e| NodeError::Wal(Arc::new(e)))?;
        store.set_rules(rules.plan.version().0, &rules.defs)?;

        // Checkpoint what replay rebuilt, so the log before it can go.
        let now = config.clock.now();
        for shard in shards.values_mut() {
            shard.checkpoint(now)?;
        }
        store.sync()?;
        if let Some(min) = log_needed_from(&store, shards.values().map(Shard::replay_from))? {
            wal.truncate_before(min)
                .map_err(|e| NodeError::Wal(Arc::new(e)))?;
        }

        let (committer, commit_thread) = Committer::start(wal);
        let (shutdown, _) = watch::channel(false);
        let webhooks = crate::webhooks::WebhookConfig::from_defs(&store.webhooks()?);
        let inner = Arc::new(Inner {
            clock: config.clock.clone(),
            committer,
            store,
            shards: RwLock::new(BTreeMap::new()),
            owners: RwLock::new(BTreeMap::new()),
            rules: RwLock::new(rules),
            move_outs: MoveOutSessions::default(),
            moves_in: MovesIn::default(),
            tasks: std::sync::Mutex::new(Vec::new()),
            webhooks: crate::webhooks::channel(webhooks),
            webhook_status: Default::default(),
            shutdown,
            config,
        });
        let node = Node { inner };
        let count = shards.len();
        for (id, shard) in shards {
            let log = Arc::new(ChangeLog::new(shard.store().clone(), shard.last_sequence()));
            node.spawn_shard(id, shard, log);
        }
        node.spawn_checkpoints();
        tracing::info!(
            shards = count,
            replayed_records = replayed,
            torn_bytes = repair.torn_bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "node started"
        );
        let guard = NodeGuard {
            node: node.clone(),
            commit: Some(commit_thread),
        };
        Ok((node, guard))
    }

    /// Brings a shard that is not served yet to the node's rule set (it was
    /// stored, or copied from another node, under another version), logging
    /// the update like any rule input. Returns the changes it made.
    async fn catch_up_rules(&self, shard: &mut Shard) -> Result<Vec<Logged>, NodeError> {
        let rules = read(&self.inner.rules).clone();
        if shard.plan().version() == rules.plan.version() {
            return Ok(Vec::new());
        }
        let now = self.now();
        let record = WalRecord {
            shard: shard.id(),
            now_ms: now.millis(),
            input: Some(Input::Rules(pb::ApplyRulesRequest {
                version: rules.plan.version().0,
                segments: rules.defs.iter().map(pb::SegmentDef::from).collect(),
            })),
        };
        let changes = shard.apply_rules(rules.plan, now, |_, _| {})?;
        let at = self
            .inner
            .committer
            .append(record.to_bytes())
            .await
            .await
            .map_err(|_| NodeError::Unavailable("log stopped".into()))??;
        shard.applied_record(at);
        Ok(changes)
    }

    /// Serves a shard that moved here (opened, caught up and durable), with
    /// the changes of its last inputs, not yet in its stored change log.
    pub(crate) async fn serve_moved(
        &self,
        mut shard: Shard,
        mut unpublished: Vec<Logged>,
    ) -> Result<(), NodeError> {
        let id = shard.id();
        let stored = unpublished.first().map_or(shard.last_sequence(), |first| {
            first.sequence.saturating_sub(1)
        });
        // Rule updates that reached this node during the copy did not reach
        // the copy (nor, if its source refused them while fenced, its inputs).
        unpublished.extend(self.catch_up_rules(&mut shard).await?);
        let log = Arc::new(ChangeLog::new(shard.store().clone(), stored));
        log.publish(&unpublished);
        if !self.spawn_shard(id, shard, log) {
            return Err(NodeError::Invalid(format!(
                "shard {id} is already served here"
            )));
        }
        write(&self.inner.owners).remove(&id);
        Ok(())
    }

    /// Starts the task of `shard`, unless the shard is served already (false).
    fn spawn_shard(&self, id: u32, shard: Shard, log: Arc<ChangeLog>) -> bool {
        // Checked again under the write lock below; this early look keeps a
        // shard that is served already from touching move-out sessions.
        if read(&self.inner.shards).contains_key(&id) {
            return false;
        }
        // A shard fenced for a move before a restart stays fenced until the
        // control plane settles the move; its kept inputs are gone, so the
        // destination has to start over.
        let move_out = match shard.store().fenced() {
            Ok(0) => None,
            Ok(attempt) => {
                self.inner.move_outs.touch(id, attempt);
                Some(MoveOut {
                    attempt,
                    tail: Vec::new(),
                    tail_bytes: 0,
                    fenced: true,
                    lost: true,
                })
            }
            Err(e) => {
                tracing::error!(shard = id, error = %e, "reading the shard's fence failed; treating it as fenced");
                Some(MoveOut {
                    attempt: u64::MAX,
                    tail: Vec::new(),
                    tail_bytes: 0,
                    fenced: true,
                    lost: true,
                })
            }
        };
        let (tx, rx) = mpsc::channel(1024);
        let epoch = Arc::new(AtomicU64::new(shard.epoch()));
        let handle = ShardHandle {
            tx,
            log: log.clone(),
            epoch: epoch.clone(),
        };
        {
            let mut shards = write(&self.inner.shards);
            if shards.contains_key(&id) {
                return false;
            }
            shards.insert(id, handle);
        }
        let task = ShardTask {
            shard,
            log,
            epoch,
            committer: self.inner.committer.clone(),
            clock: self.inner.clock.clone(),
            tick_every: self.inner.config.tick_every,
            inflight: VecDeque::new(),
            checkpoints: Vec::new(),
            last_checkpoint: None,
            move_out,
            failed: None,
        };
        let join = tokio::spawn(task.run(rx, self.inner.shutdown.subscribe()));
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(join);
        true
    }

    fn spawn_checkpoints(&self) {
        let node = self.clone();
        let mut shutdown = self.inner.shutdown.subscribe();
        let every = self.inner.config.checkpoint_every;
        let join = tokio::spawn(async move {
            // Shards take turns, spread evenly over each period, and each is
            // synced on its own. Checkpointing every shard at once wrote all
            // their users to sled in one burst (hundreds of MiB at 100k busy
            // users), and the log's syncs, so every acknowledgement, queued
            // behind it: at 250k events/s, ack p99 46 to 51 ms with that burst
            // in the run, 10 to 19 ms without.
            loop {
                let handles = node.handles();
                if handles.is_empty() {
                    // No shard here yet (or any more): wait a period.
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(every) => continue,
                    }
                }
                let gap = every / u32::try_from(handles.len()).unwrap_or(u32::MAX);
                let keep_bytes = node.inner.config.memory_budget / handles.len().max(1);
                let mut replay_points = HashMap::with_capacity(handles.len());
                let mut complete = true;
                for (shard, handle) in &handles {
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(gap) => {}
                    }
                    if node.handle(*shard).is_err() {
                        // Released since the round began: nothing to do here.
                        continue;
                    }
                    match node.checkpoint_shard(handle, keep_bytes).await {
                        Ok(done) => {
                            replay_points.insert(*shard, done.replay_from);
                        }
                        Err(e) => {
                            complete = false;
                            tracing::error!(shard, error = %e, "checkpoint failed");
                        }
                    }
                }
                // A shard whose checkpoint failed may still need the log from
                // where its last one left it: nothing is dropped this round.
                if complete && let Err(e) = node.truncate_log(replay_points).await {
                    tracing::error!(error = %e, "dropping old log segments failed");
                }
            }
        });
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(join);
    }

    /// Checkpoints one shard and makes it durable: the background turns.
    async fn checkpoint_shard(
        &self,
        handle: &ShardHandle,
        keep_bytes: usize,
    ) -> Result<Checkpointed, NodeError> {
        let done = self
            .ask(handle, |reply| Command::Checkpoint { keep_bytes, reply })
            .await?;
        self.make_checkpoints_durable().await?;
        handle.log.checkpointed(done.through);
        Ok(done)
    }

    /// Makes the checkpoints written so far durable: syncs the store, with
    /// a manual clock's time first, so a restart resumes at it.
    async fn make_checkpoints_durable(&self) -> Result<(), NodeError> {
        if self.inner.clock.is_manual() {
            self.inner.store.set_clock(self.now().millis())?;
        }
        self.sync_store().await
    }

    /// Deletes the log segments no served shard needs to replay and no stored
    /// shard retains. `checkpointed` holds shards' replay points from
    /// checkpoints just made durable; a shard served now without one there
    /// (assigned since) counts from its stored checkpoint.
    async fn truncate_log(&self, checkpointed: HashMap<u32, Lsn>) -> Result<(), NodeError> {
        let served: Vec<u32> = self.handles().into_iter().map(|(id, _)| id).collect();
        let store = self.inner.store.clone();
        let needed = blocking(move || {
            let mut replay_points = Vec::with_capacity(served.len());
            for id in served {
                replay_points.push(match checkpointed.get(&id) {
                    Some(at) => *at,
                    None => store.shard(id)?.meta()?.replay_from,
                });
            }
            log_needed_from(&store, replay_points)
        })
        .await?;
        if let Some(min) = needed {
            self.inner.committer.truncate_before(min).await?;
        }
        Ok(())
    }

    pub(crate) fn handle(&self, shard: u32) -> Result<ShardHandle, NodeError> {
        read(&self.inner.shards)
            .get(&shard)
            .cloned()
            .ok_or_else(|| NodeError::NotServing {
                shard,
                owner: read(&self.inner.owners).get(&shard).cloned(),
            })
    }

    /// The shards this node serves, with their epochs, in shard order.
    pub fn serving(&self) -> Vec<(u32, u64)> {
        let mut shards: Vec<(u32, u64)> = read(&self.inner.shards)
            .iter()
            .map(|(id, h)| (*id, h.epoch.load(Ordering::SeqCst)))
            .collect();
        shards.sort_unstable();
        shards
    }

    pub(crate) fn handles(&self) -> Vec<(u32, ShardHandle)> {
        read(&self.inner.shards)
            .iter()
            .map(|(id, h)| (*id, h.clone()))
            .collect()
    }

    pub(crate) async fn ask<T>(
        &self,
        handle: &ShardHandle,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, NodeError> {
        let (reply, answer) = oneshot::channel();
        handle
            .tx
            .send(make(reply))
            .await
            .map_err(|_| NodeError::Unavailable("the shard is stopping".into()))?;
        answer
            .await
            .map_err(|_| NodeError::Unavailable("the shard stopped".into()))?
    }

    /// The node's settings.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// The current time on the node's clock.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// The current rule-set version.
    pub fn rule_version(&self) -> u64 {
        read(&self.inner.rules).plan.version().0
    }

    /// The current compiled rule set.
    pub(crate) fn plan(&self) -> Arc<Plan> {
        read(&self.inner.rules).plan.clone()
    }

    /// Ends every subscription to this node's change logs and waits until they are
    /// gone (shutdown).
    pub async fn close_subscriptions(&self) {
        let handles = self.handles();
        for (_, handle) in &handles {
            handle.log.close();
        }
        for (_, handle) in &handles {
            handle.log.wait_idle().await;
        }
    }

    /// Checkpoints every shard, makes the store durable, and deletes the
    /// write-ahead log the checkpoints cover. Shards also passivate users to stay
    /// in the memory budget.
    pub async fn checkpoint(&self) -> Result<(), NodeError> {
        let handles = self.handles();
        let keep_bytes = self.inner.config.memory_budget / handles.len().max(1);
        let mut replay_points = HashMap::with_capacity(handles.len());
        let mut written = Vec::with_capacity(handles.len());
        for (id, handle) in &handles {
            let done = self
                .ask(handle, |reply| Command::Checkpoint { keep_bytes, reply })
                .await?;
            replay_points.insert(*id, done.replay_from);
            written.push((handle, done.through));
        }
        self.make_checkpoints_durable().await?;
        for (handle, through) in written {
            handle.log.checkpointed(through);
        }
        self.truncate_log(replay_points).await
    }

    /// Moves a manual clock to `to` and returns once every change due by then is
    /// durable and published.
    pub async fn advance_clock(&self, to: Timestamp) -> Result<Timestamp, NodeError> {
        let now = self
            .inner
            .clock
            .advance_to(to)
            .ok_or(NodeError::NotManualClock)?;
        let mut waits = Vec::new();
        for (_, handle) in self.handles() {
            let (reply, answer) = oneshot::channel();
            handle
                .tx
                .send(Command::Tick {
                    now,
                    reply: Some(reply),
                })
                .await
                .map_err(|_| NodeError::Unavailable("a shard is stopping".into()))?;
            waits.push(answer);
        }
        for wait in waits {
            wait.await
                .map_err(|_| NodeError::Unavailable("a shard stopped".into()))??;
        }
        Ok(now)
    }

    /// Applies rule-set `version` on every shard (backfilling new rules from
    /// retained events), sending progress as shards work.
    pub async fn apply_rules(
        &self,
        version: u64,
        defs: Vec<SegmentDef>,
        progress: mpsc::Sender<pb::RuleProgress>,
    ) -> Result<(), NodeError> {
        let current = self.rule_version();
        if version <= current {
            return Err(NodeError::Invalid(format!(
                "rule version {version} is not newer than the current {current}"
            )));
        }
        let plan = compile(version, &defs)?;
        self.inner.store.set_rules(version, &defs)?;
        *write(&self.inner.rules) = Rules {
            plan: plan.clone(),
            defs: defs.clone(),
        };
        let request = pb::ApplyRulesRequest {
            version,
            segments: defs.iter().map(pb::SegmentDef::from).collect(),
        };
        let mut waits = Vec::new();
        for (_, handle) in self.handles() {
            let (reply, answer) = oneshot::channel();
            let command = Command::Rules {
                plan: plan.clone(),
                request: request.clone(),
                progress: progress.clone(),
                reply,
            };
            handle
                .tx
                .send(command)
                .await
                .map_err(|_| NodeError::Unavailable("a shard is stopping".into()))?;
            waits.push(answer);
        }
        for wait in waits {
            wait.await
                .map_err(|_| NodeError::Unavailable("a shard stopped".into()))??;
        }
        Ok(())
    }

    /// The sizes `defs` would have now (each replacing the segment of its id or
    /// added to the current rules), over every shard's users, without applying
    /// anything; also the number of users.
    pub async fn preview(
        &self,
        defs: Vec<SegmentDef>,
    ) -> Result<(Vec<(SegmentId, u64)>, u64), NodeError> {
        let (version, mut merged) = {
            let rules = read(&self.inner.rules);
            (rules.plan.version().0, rules.defs.clone())
        };
        for def in &defs {
            match merged.iter_mut().find(|d| d.id == def.id) {
                Some(current) => *current = def.clone(),
                None => merged.push(def.clone()),
            }
        }
        // Previewed rules have not been through the control plane: the
        // node's own limits apply.
        let plan = Arc::new(Plan::compile(
            &merged,
            RuleVersion(version + 1),
            &self.inner.config.rule_limits,
        )?);
        let segments: Vec<SegmentId> = defs.iter().map(|d| d.id.clone()).collect();
        let mut totals = vec![0u64; segments.len()];
        let mut users = 0;
        for (_, handle) in self.handles() {
            let (counts, shard_users) = self
                .ask(&handle, |reply| Command::Preview {
                    plan: plan.clone(),
                    segments: segments.clone(),
                    reply,
                })
                .await?;
            users += shard_users;
            for (total, count) in totals.iter_mut().zip(counts) {
                *total += count;
            }
        }
        Ok((segments.into_iter().zip(totals).collect(), users))
    }

    /// Starts serving `shard` at `epoch` (opening its stored data, if any).
    pub async fn assign_shard(&self, shard: u32, epoch: u64) -> Result<(), NodeError> {
        if let Ok(handle) = self.handle(shard) {
            self.ask(&handle, |reply| Command::SetEpoch { epoch, reply })
                .await?;
            handle.epoch.store(epoch, Ordering::SeqCst);
            return Ok(());
        }
        // Opening reads the store and the checkpoint writes it: off the async
        // workers, as `sync_store` says.
        let (store, config) = (self.inner.store.clone(), self.inner.config.shard.clone());
        let mut opened = blocking(move || open_shard(&store, shard, &config)).await?;
        opened.set_epoch(epoch.max(opened.epoch()));
        // Its changes are stored by the checkpoint below.
        self.catch_up_rules(&mut opened).await?;
        let now = self.now();
        let opened = blocking(move || {
            opened.checkpoint(now)?;
            Ok::<_, NodeError>(opened)
        })
        .await?;
        self.sync_store().await?;
        write(&self.inner.owners).remove(&shard);
        let log = Arc::new(ChangeLog::new(
            opened.store().clone(),
            opened.last_sequence(),
        ));
        if !self.spawn_shard(shard, opened, log) {
            // Served meanwhile (a move into this node completed): just the epoch.
            let handle = self.handle(shard)?;
            self.ask(&handle, |reply| Command::SetEpoch { epoch, reply })
                .await?;
            handle.epoch.store(epoch, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Stops serving `shard` (checkpointing it first); clients are pointed at
    /// `new_owner`.
    pub async fn release_shard(
        &self,
        shard: u32,
        new_owner: Option<String>,
    ) -> Result<(), NodeError> {
        let handle = self.handle(shard)?;
        self.ask(&handle, |reply| Command::Stop { reply }).await?;
        self.sync_store().await?;
        // The owner is recorded before the shard leaves the map: a client
        // refused in between must already be told where the shard went.
        if let Some(owner) = new_owner {
            write(&self.inner.owners).insert(shard, owner);
        }
        write(&self.inner.shards).remove(&shard);
        handle.log.close();
        handle.log.wait_idle().await;
        Ok(())
    }

    /// Flushes the store and syncs its files, on a blocking thread: under
    /// load that takes tens of milliseconds, and on one of the async workers
    /// (two on a two-core machine) it would halve the node for as long.
    pub(crate) async fn sync_store(&self) -> Result<(), NodeError> {
        let store = self.inner.store.clone();
        blocking(move || Ok::<_, NodeError>(store.sync()?)).await
    }

    /// The store of a shard this node holds data for.
    pub fn shard_store(&self, shard: u32) -> Result<ShardStore, NodeError> {
        Ok(self.inner.store.shard(shard)?)
    }

    /// The node's store (for export/import).
    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }
}

impl NodeGuard {
    /// Stops the node cleanly: shards finish what is in flight and checkpoint, the
    /// store is synced, the log's last group is synced and its thread joined.
    pub async fn shutdown(mut self) {
        let node = &self.node;
        if let Err(e) = node.checkpoint().await {
            tracing::warn!(error = %e, "final checkpoint failed");
        }
        let _ = node.inner.shutdown.send(true);
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *node.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            let _ = task.await;
        }
        if let Err(e) = node.inner.store.sync() {
            tracing::warn!(error = %e, "final store sync failed");
        }
        write(&node.inner.shards).clear();
        node.inner.committer.close().await;
        if let Some(thread) = self.commit.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        tracing::info!("node stopped");
    }
}

/// One input applied in memory whose record is not durable yet.
struct Inflight {
    /// `None`: nothing was logged (a tick that changed nothing); it completes
    /// when everything before it has.
    durable: Option<oneshot::Receiver<Durable>>,
    /// The record's bytes, kept only while the shard is moving out.
    record: Option<bytes::Bytes>,
    changes: Vec<Logged>,
    done: Done,
}

enum Done {
    /// Batches of events logged as one (see [`ShardTask::ingest`]): each
    /// caller's reply and answer, and the batch's sequence among the shard's
    /// retained batches.
    Ingest(Vec<(Reply<pb::IngestResponse>, pb::IngestResponse)>, u64),
    Unit(Option<Reply<()>>),
    /// Called with the outcome once the record is durable (or failed).
    Answer(Box<dyn FnOnce(Result<(), NodeError>) + Send>),
}

impl Done {
    /// An answer of `response` on `reply` once durable.
    fn answer<T: Send + 'static>(reply: Reply<T>, response: T) -> Done {
        Done::Answer(Box::new(move |outcome| {
            let _ = reply.send(outcome.map(|()| response));
        }))
    }
}

/// Whether a shard task goes on after a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Go,
    Stopped,
}

/// Most events of the batches a shard takes together: the node's default
/// limit for one call, so a gathered batch is no larger than one a client
/// may send.
const MAX_GATHERED_EVENTS: usize = 10_000;

/// `first` and the batches of events queued right behind it, to be applied
/// and logged as one: under load a shard finds one or two more batches
/// waiting about half the time, and each batch otherwise costs its own log
/// record, durable wait and turn of the task's loop (docs/performance.md).
/// The first command of another kind, or a batch that would make the
/// gathering larger than [`MAX_GATHERED_EVENTS`], stops it and is left in
/// `taken`.
fn take_waiting_batches(
    first: Command,
    rx: &mut mpsc::Receiver<Command>,
    taken: &mut Option<Command>,
) -> Vec<Command> {
    let events = |command: &Command| match command {
        Command::Ingest { events, .. } => Some(events.len()),
        _ => None,
    };
    let mut total = events(&first).unwrap_or(0);
    let mut batches = vec![first];
    while let Ok(next) = rx.try_recv() {
        match events(&next) {
            Some(n) if total + n <= MAX_GATHERED_EVENTS => {
                total += n;
                batches.push(next);
            }
            _ => {
                *taken = Some(next);
                break;
            }
        }
    }
    batches
}

struct ShardTask {
    shard: Shard,
    log: Arc<ChangeLog>,
    epoch: Arc<AtomicU64>,
    committer: Committer,
    clock: Clock,
    tick_every: Duration,
    inflight: VecDeque<Inflight>,
    checkpoints: Vec<(usize, Reply<Checkpointed>)>,
    /// The last checkpoint written.
    last_checkpoint: Option<Checkpointed>,
    move_out: Option<MoveOut>,
    /// Set once the log failed: the shard refuses further writes.
    failed: Option<String>,
}

impl ShardTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, mut shutdown: watch::Receiver<bool>) {
        // One timer for the task's life, moved only to an earlier deadline: a
        // new `sleep` per loop (a timer-wheel entry made and dropped for
        // every batch) cost more than the loop's own work at full rate. A
        // timer that fires early finds nothing due and is set again.
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut armed: Option<tokio::time::Instant> = None;
        // Likewise one wait for shutdown: a new one per loop joined and left
        // the watch's waiter list (a lock each way) for every batch.
        let stopping = shutdown.changed();
        tokio::pin!(stopping);
        // A command taken from the queue while gathering batches, which is
        // handled next, before anything queued after it.
        let mut taken: Option<Command> = None;
        loop {
            if let Some(command) = taken.take() {
                if self.dispatch(command, &mut rx, &mut taken).await == Flow::Stopped {
                    return;
                }
                continue;
            }
            let fenced = self.move_out.as_ref().is_some_and(|m| m.fenced);
            let next_timer = if self.clock.is_manual() || fenced {
                None
            } else {
                self.shard.next_timer()
            };
            let wait = next_timer.map(|t| {
                let ms = (t.millis() - self.clock.now().millis())
                    .clamp(0, self.tick_every.as_millis() as i64);
                Duration::from_millis(ms as u64)
            });
            if let Some(wait) = wait {
                let deadline = tokio::time::Instant::now() + wait;
                if armed.is_none_or(|at| deadline < at) {
                    timer.as_mut().reset(deadline);
                    armed = Some(deadline);
                }
            }
            self.finish_unlogged();
            let front = self.inflight.front_mut().and_then(|f| f.durable.as_mut());
            let has_front = front.is_some();
            tokio::select! {
                biased;
                durable = async { front.expect("guarded by has_front").await }, if has_front => {
                    self.finish_front(durable);
                }
                command = rx.recv() => match command {
                    Some(command) => {
                        if self.dispatch(command, &mut rx, &mut taken).await == Flow::Stopped {
                            return;
                        }
                    }
                    None => break,
                },
                _ = &mut timer, if wait.is_some() && armed.is_some() => {
                    armed = None;
                    let now = self.clock.now();
                    if self.shard.next_timer().is_some_and(|t| t <= now) {
                        self.tick(now, None).await;
                    }
                }
                _ = &mut stopping => break,
            }
            if !self.checkpoints.is_empty() && self.inflight.is_empty() {
                self.checkpoint_now().await;
            }
        }
        self.drain().await;
        if let Err(e) = self.write_checkpoint().await {
            tracing::error!(shard = self.shard.id(), error = %e, "checkpoint at shutdown failed");
        }
    }

    /// Handles `command`. A batch of events takes with it the batches queued
    /// right behind it (see [`take_waiting_batches`]); a command
    /// of another kind met there is left in `taken`, to be handled next.
    async fn dispatch(
        &mut self,
        command: Command,
        rx: &mut mpsc::Receiver<Command>,
        taken: &mut Option<Command>,
    ) -> Flow {
        match command {
            Command::Stop { reply } => {
                self.drain().await;
                let result = self.write_checkpoint().await.map(|_| ());
                let _ = reply.send(result);
                Flow::Stopped
            }
            command @ Command::Ingest { .. } => {
                let batches = take_waiting_batches(command, rx, taken);
                self.ingest(batches).await;
                Flow::Go
            }
            command => {
                self.handle(command).await;
                Flow::Go
            }
        }
    }

    /// The size of `segment` as of the last published change (the size now,
    /// less what changes still in flight did), and that change's sequence.
    fn history_base(&self, segment: &SegmentId) -> (u64, u64) {
        let size = self.shard.size(segment) as i64;
        let enter = pb::ChangeKind::Enter as i32;
        let in_flight: i64 = self
            .inflight
            .iter()
            .flat_map(|item| &item.changes)
            .filter(|l| l.change.segment == segment.as_str())
            .map(|l| if l.change.kind == enter { 1 } else { -1 })
            .sum();
        ((size - in_flight).max(0) as u64, self.log.last())
    }

    /// Waits for everything in flight, publishing as it becomes durable.
    async fn drain(&mut self) {
        loop {
            self.finish_unlogged();
            let Some(front) = self.inflight.front_mut().and_then(|f| f.durable.as_mut()) else {
                return;
            };
            let durable = front.await;
            self.finish_front(durable);
        }
    }

    /// Completes the entries at the front that logged nothing.
    fn finish_unlogged(&mut self) {
        while self.inflight.front().is_some_and(|f| f.durable.is_none()) {
            if let Some(item) = self.inflight.pop_front() {
                self.log.publish(&item.changes);
                if let Done::Unit(Some(reply)) = item.done {
                    let _ = reply.send(Ok(()));
                }
            }
        }
    }

    fn finish_front(&mut self, durable: Result<Durable, oneshot::error::RecvError>) {
        let Some(item) = self.inflight.pop_front() else {
            return;
        };
        match durable {
            Ok(Ok(lsn)) => {
                self.shard.applied_record(lsn);
                if let (Some(out), Some(record)) = (self.move_out.as_mut(), item.record) {
                    out.tail_bytes += record.len();
                    out.tail.push(record.to_vec());
                    if out.tail_bytes > TAIL_LIMIT_BYTES && !out.fenced {
                        tracing::warn!(
                            shard = self.shard.id(),
                            "move-out tail over its limit; the session ends"
                        );
                        self.move_out = None;
                    }
                }
                self.log.publish(&item.changes);
                match item.done {
                    Done::Ingest(answers, batch) => {
                        self.shard.batch_logged(batch, lsn);
                        for (reply, response) in answers {
                            let _ = reply.send(Ok(response));
                        }
                    }
                    Done::Unit(Some(reply)) => {
                        let _ = reply.send(Ok(()));
                    }
                    Done::Unit(None) => {}
                    Done::Answer(answer) => answer(Ok(())),
                }
            }
            Ok(Err(e)) => {
                self.stop_writes(e.to_string());
                self.fail(item.done, || NodeError::Wal(e.clone()));
            }
            Err(_) => {
                self.failed = Some("the write-ahead log stopped".into());
                self.fail(item.done, || {
                    NodeError::Unavailable("the write-ahead log stopped".into())
                });
            }
        }
    }

    /// Refuses every later write with `reason` (until the node restarts and
    /// replays its log): what is applied in memory can no longer be trusted
    /// to match the log.
    fn stop_writes(&mut self, reason: String) {
        tracing::error!(shard = self.shard.id(), %reason, "the shard stops accepting writes");
        self.failed = Some(reason);
    }

    fn fail(&self, done: Done, error: impl Fn() -> NodeError) {
        match done {
            Done::Ingest(answers, _) => {
                for (reply, _) in answers {
                    let _ = reply.send(Err(error()));
                }
            }
            Done::Unit(Some(reply)) => {
                let _ = reply.send(Err(error()));
            }
            Done::Unit(None) => {}
            Done::Answer(answer) => answer(Err(error())),
        }
    }

    /// Logs `record` (already applied) and queues its completion.
    async fn log_input(&mut self, record: WalRecord, changes: Vec<Logged>, done: Done) {
        self.log_bytes(record.to_bytes().into(), changes, done)
            .await;
    }

    /// The write-ahead log record of `input` applied at `now`, encoded.
    /// Shared, not copied, by the log and the shard's retained events.
    fn record(&self, now: Timestamp, input: Input) -> bytes::Bytes {
        WalRecord {
            shard: self.shard.id(),
            now_ms: now.millis(),
            input: Some(input),
        }
        .to_bytes()
        .into()
    }

    /// Whether the shard takes writes at `epoch`: not after a log failure,
    /// not while fenced for a move, and only at its current epoch.
    fn writable(&self, epoch: u64) -> Result<(), NodeError> {
        if let Some(reason) = &self.failed {
            return Err(NodeError::Unavailable(reason.clone()));
        }
        if self.move_out.as_ref().is_some_and(|m| m.fenced) {
            return Err(NodeError::Moving(self.shard.id()));
        }
        let current = self.shard.epoch();
        if epoch != current {
            return Err(NodeError::WrongEpoch {
                shard: self.shard.id(),
                sent: epoch,
                current,
            });
        }
        Ok(())
    }

    /// Logs an encoded record (already applied) and queues its completion.
    async fn log_bytes(&mut self, record: bytes::Bytes, changes: Vec<Logged>, done: Done) {
        let kept = self.move_out.as_ref().map(|_| record.clone());
        let durable = self.committer.append(record).await;
        self.inflight.push_back(Inflight {
            durable: Some(durable),
            record: kept,
            changes,
            done,
        });
    }

    /// Applies batches of events (`Command::Ingest`, taken together from the
    /// queue: see [`take_waiting_batches`]) as one batch with one
    /// log record, and answers each caller for its own events once that record
    /// is durable. A batch the shard may not take (a stale epoch, a fence) is
    /// refused alone.
    async fn ingest(&mut self, batches: Vec<Command>) {
        let now = self.clock.now();
        let mut events = Vec::new();
        let mut ends = Vec::with_capacity(batches.len());
        let mut encoded: Option<crate::record::EncodedBatch> = None;
        let mut callers = Vec::with_capacity(batches.len());
        for command in batches {
            let Command::Ingest {
                epoch,
                events: part,
                batch,
                rejected,
                reply,
            } = command
            else {
                continue;
            };
            if let Err(e) = self.writable(epoch) {
                let _ = reply.send(Err(e));
                continue;
            }
            let response = pb::IngestResponse {
                shard: self.shard.id(),
                accepted: part.len() as u32,
                duplicates: 0,
                rejected,
            };
            // The first batch's events are taken as they are, not copied:
            // the common case is a batch alone.
            if events.is_empty() {
                events = part;
            } else {
                events.extend(part);
            }
            ends.push(events.len());
            match encoded.as_mut() {
                Some(first) => first.append(&batch),
                None => encoded = Some(batch),
            }
            callers.push((reply, response));
        }
        let Some(encoded) = encoded else {
            return;
        };
        let record = encoded.into_record(self.shard.id(), now.millis());
        let applied = self
            .shard
            .apply_batch_parts(now, &events, &ends, record.clone());
        let (outcome, duplicates) = match applied {
            Ok(applied) => applied,
            Err(e) => {
                // A user's stored state could not be read: the events before
                // it are applied in memory but will never be logged (and a
                // retry of them would be taken for a repeat). The first
                // caller gets the store's error, later writes the reason.
                let reason = format!("reading a user's stored state failed: {e}");
                self.stop_writes(reason.clone());
                let mut first = Some(NodeError::from(e));
                for (reply, _) in callers {
                    let error = first
                        .take()
                        .unwrap_or_else(|| NodeError::Unavailable(reason.clone()));
                    let _ = reply.send(Err(error));
                }
                return;
            }
        };
        for ((_, response), duplicates) in callers.iter_mut().zip(duplicates) {
            response.duplicates = duplicates;
        }
        let done = Done::Ingest(callers, outcome.batch);
        self.log_bytes(record, outcome.changes, done).await;
    }

    async fn tick(&mut self, now: Timestamp, reply: Option<Reply<()>>) {
        match self.shard.tick(now) {
            // A tick that changes no membership needs no record: replaying the
            // next input advances those users the same way.
            Ok(changes) if changes.is_empty() => {
                // Answered once what is already in flight is durable.
                self.inflight.push_back(Inflight {
                    durable: None,
                    record: None,
                    changes,
                    done: Done::Unit(reply),
                });
            }
            Ok(changes) => {
                let record = WalRecord {
                    shard: self.shard.id(),
                    now_ms: now.millis(),
                    input: Some(Input::Tick(Tick {})),
                };
                self.log_input(record, changes, Done::Unit(reply)).await;
            }
            // As for a batch (see `ingest`): users before the one that could
            // not be read moved on in memory, in no log record.
            Err(e) => {
                self.stop_writes(format!("reading a user's stored state failed: {e}"));
                if let Some(reply) = reply {
                    let _ = reply.send(Err(e.into()));
                }
            }
        }
    }

    /// Takes a checkpoint and writes it on a blocking thread. The shard waits
    /// (its inputs queue meanwhile), which keeps its checkpoints in order; other
    /// shards carry on. A failed write gives everything back to the shard, so the
    /// next checkpoint writes it.
    async fn write_checkpoint(&mut self) -> Result<Checkpointed, NodeError> {
        let checkpoint = self.shard.take_checkpoint(self.clock.now());
        let done = Checkpointed {
            replay_from: checkpoint.meta.replay_from,
            through: checkpoint.meta.next_sequence.saturating_sub(1),
        };
        let store = self.shard.store().clone();
        let written = tokio::task::spawn_blocking(move || {
            let result = store.write_checkpoint(&checkpoint);
            (checkpoint, result)
        })
        .await;
        match written {
            Ok((_, Ok(()))) => {
                self.last_checkpoint = Some(done);
                Ok(done)
            }
            Ok((checkpoint, Err(e))) => {
                self.shard.untake_checkpoint(checkpoint);
                Err(e.into())
            }
            Err(e) => Err(NodeError::Unavailable(format!(
                "the checkpoint writer failed: {e}"
            ))),
        }
    }

    async fn checkpoint_now(&mut self) {
        // While moving out, the stored checkpoint is the destination's snapshot:
        // it stays as it is, and so does the log it needs.
        let result = match (&self.move_out, self.last_checkpoint) {
            (Some(_), Some(last)) => Ok(last),
            _ => self.write_checkpoint().await,
        };
        if result.is_ok() {
            let keep_bytes = self
                .checkpoints
                .iter()
                .map(|(k, _)| *k)
                .min()
                .unwrap_or(usize::MAX);
            let bytes = self.shard.memory_bytes();
            if bytes > keep_bytes {
                let users = self.shard.active_users();
                let keep = (users as u128 * keep_bytes as u128 / bytes.max(1) as u128) as usize;
                self.shard.passivate(keep);
            }
        }
        for (_, reply) in self.checkpoints.drain(..) {
            let _ = reply.send(match &result {
                Ok(done) => Ok(*done),
                Err(e) => Err(NodeError::Unavailable(e.to_string())),
            });
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            command @ Command::Ingest { .. } => self.ingest(vec![command]).await,
            Command::MergeOut { request, reply } => {
                if let Err(e) = self.writable(request.epoch) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let now = self.clock.now();
                let user = UserId::new(request.user_id.clone());
                let merge_id = request.merge_id.clone();
                let record = self.record(now, Input::MergeOut(request));
                match self.shard.merge_out(now, &user, &merge_id) {
                    Ok(outcome) => {
                        let response = pb::MergeOutResponse {
                            found: outcome.merged.found,
                            state: outcome.merged.state,
                            rule_version: outcome.merged.rule_version,
                            exits: outcome.changes.len() as u32,
                        };
                        self.log_bytes(record, outcome.changes, Done::answer(reply, response))
                            .await;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Command::MergeIn {
                request,
                state,
                reply,
            } => {
                if let Err(e) = self.writable(request.epoch) {
                    let _ = reply.send(Err(e));
                    return;
                }
                let version = self.shard.plan().version().0;
                if request.rule_version != version {
                    let _ = reply.send(Err(NodeError::Unavailable(format!(
                        "shard {} runs rule version {version}, the merged state is of version {}: retry once they agree",
                        self.shard.id(),
                        request.rule_version
                    ))));
                    return;
                }
                let now = self.clock.now();
                let user = UserId::new(request.user_id.clone());
                let merge_id = request.merge_id.clone();
                let record = self.record(now, Input::MergeIn(request));
                match self.shard.merge_in(now, &user, &merge_id, &state) {
                    Ok((applied, changes)) => {
                        let response = pb::MergeInResponse { applied };
                        self.log_bytes(record, changes, Done::answer(reply, response))
                            .await;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            // A fenced shard's time stands still: the destination ticks it
            // once it serves it.
            Command::Tick { reply, .. } if self.move_out.as_ref().is_some_and(|m| m.fenced) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(()));
                }
            }
            Command::Tick { now, reply } => self.tick(now, reply).await,
            Command::Rules { reply, .. } if self.move_out.as_ref().is_some_and(|m| m.fenced) => {
                let _ = reply.send(Err(NodeError::Moving(self.shard.id())));
            }
            Command::Rules {
                plan,
                request,
                progress,
                reply,
            } => {
                let now = self.clock.now();
                let shard = self.shard.id();
                let version = request.version;
                let backfilled: Vec<String> = plan
                    .migration_from(self.shard.plan())
                    .segments_needing_backfill()
                    .map(|s| s.to_string())
                    .collect();
                let progress_tx = progress.clone();
                let report = move |done: u64, total: u64| {
                    let _ = progress_tx.try_send(pb::RuleProgress {
                        version,
                        shard,
                        users_done: done,
                        users_total: total,
                        finished: false,
                        backfilled_segments: Vec::new(),
                    });
                };
                match self.shard.apply_rules(plan, now, report) {
                    Ok(changes) => {
                        let total = self.shard.user_count();
                        let _ = progress
                            .send(pb::RuleProgress {
                                version,
                                shard,
                                users_done: total,
                                users_total: total,
                                finished: true,
                                backfilled_segments: backfilled,
                            })
                            .await;
                        let record = WalRecord {
                            shard,
                            now_ms: now.millis(),
                            input: Some(Input::Rules(request)),
                        };
                        self.log_input(record, changes, Done::Unit(Some(reply)))
                            .await;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Command::GetUser { user, reply } => {
                let _ = reply.send(self.shard.user_segments(&user).map_err(Into::into));
            }
            Command::Members {
                segment,
                after,
                limit,
                reply,
            } => {
                let _ = reply.send(Ok(self.shard.members_after(&segment, &after, limit)));
            }
            Command::Counts { reply } => {
                let _ = reply.send(Ok((self.shard.counts(), self.shard.user_count())));
            }
            Command::Overlap { segments, reply } => {
                let _ = reply.send(Ok(self.shard.overlap(&segments)));
            }
            Command::HistoryBase { segment, reply } => {
                let _ = reply.send(Ok(self.history_base(&segment)));
            }
            Command::Explain {
                user,
                segment,
                reply,
            } => {
                let now = self.clock.now();
                let explained = self.shard.explain(&user, &segment, now);
                let _ = reply.send(explained.map_err(Into::into));
            }
            Command::Preview {
                plan,
                segments,
                reply,
            } => {
                let counted = self
                    .shard
                    .preview(&plan, &segments, self.clock.now())
                    .map(|counts| (counts, self.shard.user_count()))
                    .map_err(NodeError::from);
                let _ = reply.send(counted);
            }
            Command::Status { reply } => {
                let _ = reply.send(Ok(pb::ShardStatus {
                    shard: self.shard.id(),
                    epoch: self.shard.epoch(),
                    users_active: self.shard.active_users() as u64,
                    users_total: self.shard.user_count(),
                    last_sequence: self.log.last(),
                    serving: self.failed.is_none(),
                }));
            }
            Command::Checkpoint { keep_bytes, reply } => self.checkpoints.push((keep_bytes, reply)),
            Command::SetEpoch { epoch, reply } => {
                self.shard.set_epoch(epoch);
                self.epoch.store(epoch, Ordering::SeqCst);
                let _ = reply.send(self.shard.store().set_epoch(epoch).map_err(Into::into));
            }
            Command::BeginMoveOut { attempt, reply } => {
                let _ = reply.send(self.begin_move_out(attempt).await);
            }
            Command::MoveOutTail {
                attempt,
                from,
                fence,
                reply,
            } => {
                let _ = reply.send(self.move_out_tail(attempt, from, fence).await);
            }
            Command::EndMoveOut { attempt, reply } => {
                if self.move_out.as_ref().is_some_and(|m| m.attempt == attempt) {
                    self.move_out = None;
                }
                let _ = reply.send(Ok(()));
            }
            Command::Stop { .. } => {}
        }
    }

    async fn begin_move_out(&mut self, attempt: u64) -> Result<MoveOutBegun, NodeError> {
        // A fenced shard may have been committed elsewhere (or be about to
        // be): only settling with the control plane unfences it, even for the
        // same attempt.
        if let Some(out) = self.move_out.as_ref().filter(|m| m.fenced) {
            return Err(NodeError::Unavailable(format!(
                "shard {} is fenced for move attempt {}; it must be settled first",
                self.shard.id(),
                out.attempt
            )));
        }
        self.move_out = None;
        self.drain().await;
        self.write_checkpoint().await?;
        self.move_out = Some(MoveOut {
            attempt,
            tail: Vec::new(),
            tail_bytes: 0,
            fenced: false,
            lost: false,
        });
        Ok(MoveOutBegun {
            epoch: self.shard.epoch(),
            rule_version: self.shard.plan().version().0,
        })
    }

    async fn move_out_tail(
        &mut self,
        attempt: u64,
        from: usize,
        fence: bool,
    ) -> Result<pb::MoveTailResponse, NodeError> {
        let current = self.move_out.as_ref().map(|m| (m.attempt, m.lost));
        if current == Some((attempt, true)) {
            return Err(NodeError::Unavailable(format!(
                "shard {}: the source restarted during the move; it starts over",
                self.shard.id()
            )));
        }
        if current != Some((attempt, false)) {
            return Err(NodeError::Invalid(format!(
                "shard {} has no move-out session for attempt {attempt}",
                self.shard.id()
            )));
        }
        if fence {
            if let Some(out) = self.move_out.as_mut() {
                out.fenced = true;
            }
            // Everything accepted before the fence is durable and kept.
            self.drain().await;
        }
        let Some(out) = self.move_out.as_ref() else {
            return Err(NodeError::Unavailable("the move-out session ended".into()));
        };
        let mut records = Vec::new();
        let mut bytes = 0;
        for record in out.tail.iter().skip(from) {
            if bytes > 0 && bytes + record.len() > TAIL_PAGE_BYTES {
                break;
            }
            bytes += record.len();
            records.push(record.clone());
        }
        Ok(pb::MoveTailResponse {
            records,
            end: out.tail.len() as u64,
            fenced: out.fenced,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::service::NodeService;
    use dynseg_proto::BatchRef;

    const START: &str = "2026-01-01T00:00:00Z";

    /// A user id on `shard` of two.
    fn user_on(shard: u32) -> String {
        (0..)
            .map(|n| format!("user{n}"))
            .find(|user| dynseg_proto::shard_for(user, 2) == shard)
            .unwrap()
    }

    /// A user id on `shard` of two other than [`user_on`]'s (a user with no
    /// stored state).
    fn other_on(shard: u32) -> String {
        (0..)
            .map(|n| format!("other{n}"))
            .find(|user| dynseg_proto::shard_for(user, 2) == shard)
            .unwrap()
    }

    /// An encoded `order_completed` of `user` with message id `id` at `at_ms`.
    fn order(id: &str, user: String, at_ms: i64) -> bytes::Bytes {
        dynseg_proto::encoded::encode(&pb::Event {
            message_id: id.into(),
            user_id: user,
            r#type: pb::EventType::Track.into(),
            event: "order_completed".into(),
            timestamp_ms: at_ms,
            ..Default::default()
        })
    }

    /// What the node answers one batch of `events` for `shard` (epoch 1).
    async fn send(
        service: &NodeService,
        shard: u32,
        events: &[bytes::Bytes],
    ) -> pb::ShardBatchResult {
        let batch = [BatchRef {
            shard,
            epoch: 1,
            events,
        }];
        service
            .ingest_batches(&batch)
            .await
            .unwrap()
            .results
            .remove(0)
    }

    /// Ingests `count` events of one user on `shard` in one batch.
    async fn ingest(service: &NodeService, shard: u32, id: &str, count: usize) {
        let at = Timestamp::parse_rfc3339(START).unwrap().millis();
        let events: Vec<_> = (0..count)
            .map(|n| order(&format!("{id}-{n}"), user_on(shard), at))
            .collect();
        let result = send(service, shard, &events).await;
        assert!(result.response.is_some(), "{result:?}");
    }

    fn log_segments(dir: &std::path::Path) -> Vec<u64> {
        let mut found: Vec<u64> = std::fs::read_dir(dir.join("wal"))
            .unwrap()
            .filter_map(|entry| {
                let name = entry.unwrap().file_name().into_string().unwrap();
                name.strip_prefix("wal-")?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()
            })
            .collect();
        found.sort_unstable();
        found
    }

    /// A node of two shards in `dir`, on the manual clock, with log segments
    /// of a record or two.
    fn two_shards(dir: &std::path::Path, checkpoint_every: Duration) -> NodeConfig {
        let mut config = NodeConfig::new(
            dir.to_owned(),
            "127.0.0.1:0".parse().unwrap(),
            Clock::manual(Timestamp::parse_rfc3339(START).unwrap()),
        );
        config.shard_count = 2;
        config.shards = vec![(0, 1), (1, 1)];
        config.checkpoint_every = checkpoint_every;
        config.wal_segment_bytes = 256;
        config
    }

    /// The background rounds reach every shard while ingest goes on: each
    /// shard's stored checkpoint comes to cover its batches.
    #[tokio::test]
    async fn background_rounds_checkpoint_every_shard() {
        let dir = tempfile::tempdir().unwrap();
        let config = two_shards(dir.path(), Duration::from_millis(200));
        let (node, guard) = Node::start(config).await.unwrap();
        let service = NodeService::new(node.clone());
        let replay_from = |shard| node.shard_store(shard).unwrap().meta().unwrap().replay_from;
        let before = [replay_from(0), replay_from(1)];
        ingest(&service, 0, "zero", 2).await;
        ingest(&service, 1, "one", 2).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while replay_from(0) <= before[0] || replay_from(1) <= before[1] {
            assert!(
                Instant::now() < deadline,
                "no checkpoint covered both shards' batches in 20 s: replay points {:?} from {before:?}",
                [replay_from(0), replay_from(1)]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        guard.shutdown().await;
    }

    /// The background checkpoints take shards in turns and drop the log
    /// after a round; a shard served without a checkpoint in that round (one
    /// assigned after it began) must keep the log from its stored replay
    /// point, or a crash would lose its batches since.
    #[tokio::test]
    async fn a_shard_left_out_of_a_round_keeps_the_log_it_needs() {
        let dir = tempfile::tempdir().unwrap();
        let config = two_shards(dir.path(), Duration::from_secs(3600));
        let (node, guard) = Node::start(config).await.unwrap();
        let service = NodeService::new(node.clone());

        // Shard 1's batch, filling the first segment, not checkpointed; then
        // shard 0's, in later segments, checkpointed.
        ingest(&service, 1, "left-out", 8).await;
        for n in 0..4 {
            ingest(&service, 0, &format!("later-{n}"), 1).await;
        }
        let left_out_from = node.shard_store(1).unwrap().meta().unwrap().replay_from;
        let shard0 = node.handle(0).unwrap();
        let done = node.checkpoint_shard(&shard0, usize::MAX).await.unwrap();
        let first_of_shard0 = node.shard_store(0).unwrap().first_logged().unwrap();
        assert!(
            first_of_shard0.is_some_and(|at| at.segment > left_out_from.segment),
            "shard 0's batches ({first_of_shard0:?}) come after the segment shard 1 replays from"
        );

        node.truncate_log(HashMap::from([(0, done.replay_from)]))
            .await
            .unwrap();
        let kept = log_segments(dir.path());
        assert!(
            kept.first()
                .is_some_and(|&first| first <= left_out_from.segment),
            "shard 1 replays from segment {}, the log starts at {kept:?}",
            left_out_from.segment
        );
        guard.shutdown().await;
    }

    /// An ingest command of `n` events (their contents do not matter here).
    fn batch_of(
        n: usize,
    ) -> (
        Command,
        oneshot::Receiver<Result<pb::IngestResponse, NodeError>>,
    ) {
        let (reply, answer) = oneshot::channel();
        let events = (0..n)
            .map(|i| {
                Event::track(
                    format!("m{i}").as_str(),
                    "u",
                    "e",
                    Timestamp::parse_rfc3339(START).unwrap(),
                    Default::default(),
                )
            })
            .collect();
        let command = Command::Ingest {
            epoch: 1,
            events,
            batch: crate::record::BatchEncoder::new(0, 1).finish(),
            rejected: Vec::new(),
            reply,
        };
        (command, answer)
    }

    fn sizes(batches: &[Command]) -> Vec<usize> {
        batches
            .iter()
            .map(|c| match c {
                Command::Ingest { events, .. } => events.len(),
                _ => usize::MAX,
            })
            .collect()
    }

    /// A batch takes the batches queued right behind it, up to the first
    /// command of another kind (left to be handled next, in order) or the
    /// event limit (the batch over it is left too).
    #[test]
    fn a_batch_takes_the_batches_waiting_behind_it_and_no_other_command() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut answers = Vec::new();
        for n in [2, 3] {
            let (command, answer) = batch_of(n);
            tx.try_send(command).ok().unwrap();
            answers.push(answer);
        }
        let (reply, _status) = oneshot::channel();
        tx.try_send(Command::Status { reply }).ok().unwrap();
        let (after, _answer) = batch_of(1);
        tx.try_send(after).ok().unwrap();

        let (first, _answer) = batch_of(1);
        let mut taken = None;
        let batches = take_waiting_batches(first, &mut rx, &mut taken);
        assert_eq!(sizes(&batches), vec![1, 2, 3]);
        assert!(matches!(taken, Some(Command::Status { .. })));
        // The batch behind the other command is still queued, for later.
        assert!(matches!(rx.try_recv(), Ok(Command::Ingest { .. })));

        // The limit: a batch that would take the gathering over it stays.
        let (big, _answer) = batch_of(MAX_GATHERED_EVENTS - 5);
        tx.try_send(big).ok().unwrap();
        let (over, _answer) = batch_of(6);
        tx.try_send(over).ok().unwrap();
        let (first, _answer) = batch_of(5);
        let mut taken = None;
        let batches = take_waiting_batches(first, &mut rx, &mut taken);
        assert_eq!(sizes(&batches), vec![5, MAX_GATHERED_EVENTS - 5]);
        assert!(matches!(&taken, Some(Command::Ingest { events, .. }) if events.len() == 6));
        assert!(rx.try_recv().is_err());
    }

    /// Batches a shard takes together are answered each for its own events:
    /// its repeats (of its own events or of a batch taken with it) and its
    /// refusals; the memberships are those of the batches one by one.
    #[tokio::test]
    async fn batches_taken_together_are_each_answered_for_their_own_events() {
        let dir = tempfile::tempdir().unwrap();
        let config = two_shards(dir.path(), Duration::from_secs(3600));
        let (node, guard) = Node::start(config).await.unwrap();
        let service = NodeService::new(node.clone());
        let user = user_on(0);
        let at = Timestamp::parse_rfc3339(START).unwrap().millis();
        let event = |id: &str| order(id, user.clone(), at);
        let bad = bytes::Bytes::from_static(b"\xff\xff");
        let batches = [
            vec![event("a"), event("b")],
            vec![event("b"), bad.clone(), event("c")],
            vec![event("c"), event("c"), event("d"), bad],
        ];
        // One call submits every batch before the shard's task runs (this
        // test's runtime has one thread): the task finds them all queued.
        let refs: Vec<BatchRef<'_>> = batches
            .iter()
            .map(|events| BatchRef {
                shard: 0,
                epoch: 1,
                events,
            })
            .collect();
        let results = service.ingest_batches(&refs).await.unwrap().results;
        let answered: Vec<(u32, u32, Vec<u32>)> = results
            .iter()
            .map(|r| {
                let response = r.response.as_ref().unwrap();
                let rejected = response.rejected.iter().map(|r| r.index).collect();
                (response.accepted, response.duplicates, rejected)
            })
            .collect();
        assert_eq!(
            answered,
            vec![(2, 0, vec![]), (2, 1, vec![1]), (3, 2, vec![3])]
        );
        guard.shutdown().await;
    }

    /// A user's stored state that cannot be read fails the batch, and the
    /// shard takes no more writes: the events applied before it in memory
    /// are in no log record, and taking more would build on them.
    #[tokio::test]
    async fn a_shard_that_cannot_read_a_users_state_stops_taking_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = two_shards(dir.path(), Duration::from_secs(3600));
        // Every user is let go of at each checkpoint.
        config.memory_budget = 0;
        let (node, guard) = Node::start(config).await.unwrap();
        let service = NodeService::new(node.clone());
        ingest(&service, 0, "first", 2).await;
        node.checkpoint().await.unwrap();
        node.shard_store(0).unwrap().damage_pages().unwrap();
        let at = Timestamp::parse_rfc3339(START).unwrap().millis();
        // The user whose state was let go of, then damaged.
        let failed = send(&service, 0, &[order("second", user_on(0), at)]).await;
        assert!(failed.response.is_none(), "{failed:?}");
        assert_eq!(
            tonic::Code::from(failed.error_code),
            tonic::Code::Internal,
            "{failed:?}"
        );
        // A new user on the same shard: refused too, saying why.
        let refused = send(&service, 0, &[order("third", other_on(0), at)]).await;
        assert!(refused.response.is_none(), "{refused:?}");
        assert_eq!(
            tonic::Code::from(refused.error_code),
            tonic::Code::Unavailable,
            "{refused:?}"
        );
        assert!(refused.error.contains("stored state"), "{refused:?}");
        // The other shard is not concerned.
        ingest(&service, 1, "fourth", 1).await;
        guard.shutdown().await;
    }

    /// The same when time, not a batch, reaches a user whose stored state
    /// cannot be read.
    #[tokio::test]
    async fn a_shard_whose_clock_reaches_an_unreadable_user_stops_taking_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = two_shards(dir.path(), Duration::from_secs(3600));
        config.memory_budget = 0;
        let (node, guard) = Node::start(config).await.unwrap();
        let (progress, _progress) = mpsc::channel(64);
        let rule = SegmentDef::new("recent", "exists(order_completed) in last 1d");
        node.apply_rules(1, vec![rule], progress).await.unwrap();
        let service = NodeService::new(node.clone());
        ingest(&service, 0, "first", 1).await;
        node.checkpoint().await.unwrap();
        node.shard_store(0).unwrap().damage_pages().unwrap();
        // The user's exit is due a day on: its state must be read.
        let later = Timestamp::parse_rfc3339("2026-01-03T00:00:00Z").unwrap();
        assert!(node.advance_clock(later).await.is_err());
        let refused = send(&service, 0, &[order("second", other_on(0), later.millis())]).await;
        assert_eq!(
            tonic::Code::from(refused.error_code),
            tonic::Code::Unavailable,
            "{refused:?}"
        );
        assert!(refused.error.contains("stored state"), "{refused:?}");
        guard.shutdown().await;
    }
}
