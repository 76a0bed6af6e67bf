//! Live shard moves (SPEC.md sections 4 and 9): the shard keeps serving on its
//! source while the destination copies it, and stops only for the last inputs.
//!
//! ```text
//!  destination (drives)                 source                      control plane
//!  BeginMoveOut(shard, attempt) ───────▶ checkpoint; keep every
//!                                        later input (no more
//!                                        checkpoints: it is the snapshot)
//!  MoveOutSnapshot ◀──────────────────── the checkpoint, in chunks (throttled)
//!  MoveOutTail(from) ◀────────────────── inputs since, replayed here
//!  ...until the tail is short
//!  MoveOutTail(fence) ◀───────────────── fence (durable), final inputs
//!  checkpoint + fsync, then CommitMove(shard, attempt) ─────────────────▶ epoch + 1
//!  serve at epoch + 1                    placement moved: release, delete
//! ```
//!
//! A crash anywhere before the commit leaves the source authoritative. A
//! fenced source that hears nothing from its destination for [`LEASE`] asks
//! the control plane to abort the attempt (an attempt commits or aborts, never
//! both) and serves again only if it still owns the shard. An incomplete copy
//! is marked in the destination's store and deleted if the node restarts.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dynseg_proto::auth::Credentials;
use dynseg_proto::client::{self, Conn};
use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use dynseg_proto::pb::node_client::NodeClient;
use prost::Message;
use tokio::sync::mpsc;
use tonic::{Code, Status};

use crate::error::NodeError;
use crate::record::{Input, Tick, WalRecord};
use crate::runtime::{Command, Node, apply_input, compile, rule_defs};
use crate::shard::{Logged, Shard};
use crate::transfer::{ExportEntries, ExportEntry};

/// How long a source waits on a silent destination before settling the move.
pub const LEASE: Duration = Duration::from_secs(10);
/// Bytes per snapshot chunk.
const CHUNK_BYTES: usize = 1 << 20;
/// A tail read returning fewer inputs than this is short enough to fence.
const SHORT_TAIL: usize = 64;
/// Tail reads before fencing even if the tail never gets short.
const MAX_CATCH_UP_ROUNDS: usize = 50;
/// Environment variable that makes a destination exit right before it commits
/// a move (for the crash tests; never set in production).
pub const FAULT_EXIT_BEFORE_COMMIT: &str = "DYNSEG_FAULT_EXIT_BEFORE_COMMIT";
/// Longest wait for any one answer from the source: a source that stops
/// answering fails the attempt rather than hanging it.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Bounds one call to the source by [`CALL_TIMEOUT`].
async fn timed<T>(what: &str, call: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "{what}: no answer from the source"
            )))
        })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Shards being moved off this node: the attempt, and when the destination
/// was last heard from.
#[derive(Default)]
pub(crate) struct MoveOutSessions {
    sessions: Mutex<BTreeMap<u32, Session>>,
}

struct Session {
    attempt: u64,
    last_seen: Instant,
    /// Snapshot streams open: a destination reading (however slowly) is alive;
    /// one that goes away closes its stream.
    streaming: usize,
}

impl MoveOutSessions {
    /// The destination of `attempt` was heard from now.
    pub(crate) fn touch(&self, shard: u32, attempt: u64) {
        let mut sessions = lock(&self.sessions);
        match sessions.get_mut(&shard) {
            Some(s) if s.attempt == attempt => s.last_seen = Instant::now(),
            _ => {
                sessions.insert(
                    shard,
                    Session {
                        attempt,
                        last_seen: Instant::now(),
                        streaming: 0,
                    },
                );
            }
        }
    }

    /// A snapshot stream of `attempt` opens (`true`) or closes.
    fn streaming(&self, shard: u32, attempt: u64, open: bool) {
        self.touch(shard, attempt);
        if let Some(s) = lock(&self.sessions).get_mut(&shard) {
            s.streaming = if open {
                s.streaming + 1
            } else {
                s.streaming.saturating_sub(1)
            };
        }
    }

    /// The destination gave up: settle at the next look.
    pub(crate) fn expire(&self, shard: u32, attempt: u64) {
        let mut sessions = lock(&self.sessions);
        if let Some(s) = sessions.get_mut(&shard)
            && s.attempt == attempt
        {
            s.streaming = 0;
            s.last_seen = Instant::now()
                .checked_sub(LEASE * 2)
                .unwrap_or_else(Instant::now);
        }
    }

    pub(crate) fn remove(&self, shard: u32) {
        lock(&self.sessions).remove(&shard);
    }

    /// Sessions not heard from for `LEASE`.
    fn idle(&self) -> Vec<(u32, u64)> {
        lock(&self.sessions)
            .iter()
            .filter(|(_, s)| s.streaming == 0 && s.last_seen.elapsed() >= LEASE)
            .map(|(shard, s)| (*shard, s.attempt))
            .collect()
    }
}

/// Progress of the shards being copied to this node, reported in heartbeats.
#[derive(Default)]
pub(crate) struct MovesIn {
    progress: Mutex<BTreeMap<u32, pb::MoveProgress>>,
    /// Moves completed since start: (shards, snapshot bytes).
    moved: Mutex<(u64, u64)>,
}

impl MovesIn {
    fn set(&self, progress: pb::MoveProgress) {
        lock(&self.progress).insert(progress.shard, progress);
    }

    fn remove(&self, shard: u32) {
        lock(&self.progress).remove(&shard);
    }

    /// Moves completed since start: (shards, snapshot bytes).
    pub(crate) fn moved(&self) -> (u64, u64) {
        *lock(&self.moved)
    }

    fn completed(&self, bytes: u64) {
        let mut moved = lock(&self.moved);
        moved.0 += 1;
        moved.1 += bytes;
    }

    /// Whether a move of `shard` into this node is running.
    pub(crate) fn contains(&self, shard: u32) -> bool {
        lock(&self.progress).contains_key(&shard)
    }

    /// Every move in, as heartbeats report it.
    pub(crate) fn report(&self) -> Vec<pb::MoveProgress> {
        lock(&self.progress).values().copied().collect()
    }
}

/// A move's entry in [`MovesIn`], removed when dropped.
struct ProgressEntry {
    node: Node,
    shard: u32,
}

impl ProgressEntry {
    fn new(node: &Node, shard: u32, attempt: u64) -> ProgressEntry {
        node.inner.moves_in.set(pb::MoveProgress {
            shard,
            attempt,
            bytes_done: 0,
            bytes_total: 0,
        });
        ProgressEntry {
            node: node.clone(),
            shard,
        }
    }
}

impl Drop for ProgressEntry {
    fn drop(&mut self) {
        self.node.inner.moves_in.remove(self.shard);
    }
}

// ---- the source end, called by the gRPC handlers ----

/// Starts (or restarts) moving `shard` out under `attempt`.
pub async fn begin_move_out(
    node: &Node,
    shard: u32,
    attempt: u64,
) -> Result<pb::MoveOutStarted, NodeError> {
    let handle = node.handle(shard)?;
    let begun = node
        .ask(&handle, |reply| Command::BeginMoveOut { attempt, reply })
        .await?;
    node.inner.move_outs.touch(shard, attempt);
    let store = node.shard_store(shard)?;
    let (snapshot_bytes, snapshot_entries) = tokio::task::spawn_blocking(move || {
        let (mut bytes, mut entries) = (0u64, 0u64);
        for item in store.dump() {
            let (k, v) = item?;
            bytes += (k.len() + v.len()) as u64;
            entries += 1;
        }
        Ok::<_, NodeError>((bytes, entries))
    })
    .await
    .map_err(|e| NodeError::Unavailable(format!("sizing the snapshot: {e}")))??;
    let defs = if begun.rule_version == 0 {
        Vec::new()
    } else {
        node.store()
            .rules_version(begun.rule_version)?
            .unwrap_or_default()
    };
    Ok(pb::MoveOutStarted {
        epoch: begun.epoch,
        snapshot_bytes,
        snapshot_entries,
        rules: Some(pb::ApplyRulesRequest {
            version: begun.rule_version,
            segments: defs.iter().map(pb::SegmentDef::from).collect(),
        }),
    })
}

/// The session's snapshot (the shard's checkpoint), as a stream of chunks.
pub fn move_out_snapshot(
    node: &Node,
    shard: u32,
    attempt: u64,
) -> Result<mpsc::Receiver<Result<pb::ShardChunk, Status>>, NodeError> {
    let store = node.shard_store(shard)?;
    node.inner.move_outs.streaming(shard, attempt, true);
    let (tx, rx) = mpsc::channel(4);
    let node = node.clone();
    // Ends when the snapshot is sent or the receiver goes away (send fails).
    tokio::task::spawn_blocking(move || {
        send_snapshot(&store, shard, attempt, &tx);
        node.inner.move_outs.streaming(shard, attempt, false);
    });
    Ok(rx)
}

/// Sends the snapshot in chunks of about [`CHUNK_BYTES`].
fn send_snapshot(
    store: &crate::store::ShardStore,
    shard: u32,
    attempt: u64,
    tx: &mpsc::Sender<Result<pb::ShardChunk, Status>>,
) {
    let mut entries = Vec::new();
    let mut bytes = 0;
    let send = |entries: Vec<ExportEntry>, last: bool| {
        tx.blocking_send(Ok(pb::ShardChunk {
            shard,
            epoch: attempt,
            data: ExportEntries { entries }.encode_to_vec(),
            last,
        }))
        .is_ok()
    };
    for item in store.dump() {
        match item {
            Ok((key, value)) => {
                bytes += key.len() + value.len();
                entries.push(ExportEntry { key, value });
            }
            Err(e) => {
                let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
                return;
            }
        }
        if bytes >= CHUNK_BYTES {
            if !send(std::mem::take(&mut entries), false) {
                return;
            }
            bytes = 0;
        }
    }
    send(entries, true);
}

/// Inputs kept since the snapshot; with `fence`, the shard is fenced first,
/// durably, so that no write it accepts can be missing from the destination.
pub async fn move_out_tail(
    node: &Node,
    request: pb::MoveTailRequest,
) -> Result<pb::MoveTailResponse, NodeError> {
    let (shard, attempt) = (request.shard, request.attempt);
    let handle = node.handle(shard)?;
    node.inner.move_outs.touch(shard, attempt);
    let from = usize::try_from(request.from).unwrap_or(usize::MAX);
    let response = node
        .ask(&handle, |reply| Command::MoveOutTail {
            attempt,
            from,
            fence: request.fence,
            reply,
        })
        .await?;
    if request.fence {
        let store = node.shard_store(shard)?;
        if store.fenced()? != attempt {
            store.set_fenced(attempt)?;
            node.sync_store().await?;
        }
    }
    Ok(response)
}

/// The destination gave up on `attempt`: settle it now rather than after the
/// lease.
pub fn end_move_out(node: &Node, shard: u32, attempt: u64) {
    node.inner.move_outs.expire(shard, attempt);
}

/// Settles every move-out whose destination went quiet: an unfenced shard
/// simply ends its session; a fenced one first has its attempt aborted by the
/// control plane, and serves again only if it still owns the shard.
pub(crate) async fn settle_idle(node: &Node, control: &mut ControlClient<Conn>) {
    for (shard, attempt) in node.inner.move_outs.idle() {
        if let Err(e) = settle(node, control, shard, attempt).await {
            tracing::warn!(shard, attempt, error = %e, "settling a move-out failed; retrying");
        }
    }
}

async fn settle(
    node: &Node,
    control: &mut ControlClient<Conn>,
    shard: u32,
    attempt: u64,
) -> Result<(), NodeError> {
    let unavailable = |e: Status| NodeError::Unavailable(format!("control plane: {e}"));
    let Ok(handle) = node.handle(shard) else {
        node.inner.move_outs.remove(shard);
        return Ok(());
    };
    let store = node.shard_store(shard)?;
    let fenced = store.fenced()?;
    if fenced != 0 {
        control
            .abort_move(pb::MoveRequest {
                shard,
                attempt: fenced,
            })
            .await
            .map_err(unavailable)?;
        let topology = control
            .get_topology(pb::ReadOptions { stale: false })
            .await
            .map_err(unavailable)?
            .into_inner()
            .topology
            .unwrap_or_default();
        let owner = topology
            .shards
            .get(shard as usize)
            .map(|p| p.node_id.as_str());
        if owner != Some(node.config().node_id.as_str()) {
            // The move committed before the abort: the control link releases
            // the shard; it must not serve again.
            node.inner.move_outs.remove(shard);
            return Ok(());
        }
        store.set_fenced(0)?;
        node.sync_store().await?;
        tracing::info!(
            shard,
            attempt = fenced,
            "move aborted; serving the shard again"
        );
    }
    let attempt = if fenced != 0 { fenced } else { attempt };
    node.ask(&handle, |reply| Command::EndMoveOut { attempt, reply })
        .await?;
    node.inner.move_outs.remove(shard);
    Ok(())
}

// ---- the destination end, run by the control link ----

/// What a destination needs to run one move.
pub(crate) struct MoveIn {
    pub(crate) shard: u32,
    pub(crate) attempt: u64,
    /// The source's address.
    pub(crate) source: String,
    /// Snapshot copy throttle.
    pub(crate) bytes_per_sec: u64,
}

/// Copies the shard, fences the source, and commits the move; serves the shard
/// once committed. On failure the local copy is deleted and the source told.
pub(crate) async fn run_move_in(
    node: Node,
    mut control: ControlClient<Conn>,
    job: MoveIn,
) -> Result<(), NodeError> {
    let unavailable = |e: &dyn std::fmt::Display| NodeError::Unavailable(format!("{e}"));
    // Reported in heartbeats, and keeps the control link from opening the
    // shard itself, until this task ends (however it ends).
    let progress = ProgressEntry::new(&node, job.shard, job.attempt);
    let credentials = Credentials::member(&node.config().access);
    let endpoint = client::endpoint(&job.source, &credentials)
        .map_err(|e| unavailable(&e))?
        .connect_timeout(CALL_TIMEOUT);
    let channel = client::connect_endpoint(endpoint, credentials)
        .await
        .map_err(|e| unavailable(&e))?;
    let mut source = NodeClient::new(channel).max_decoding_message_size(64 << 20);
    let result = copy_and_commit(&node, &mut control, &mut source, &job).await;
    drop(progress);
    match result {
        Ok(()) => Ok(()),
        Err(Failed { error, committed }) => {
            // A commit that may have applied keeps the copy: the control
            // link serves it if the placement names this node.
            if committed == Some(false) && node.handle(job.shard).is_err() {
                let _ = node.store().drop_shard(job.shard);
            }
            let _ = source
                .end_move_out(pb::MoveOutRequest {
                    shard: job.shard,
                    attempt: job.attempt,
                })
                .await;
            Err(error)
        }
    }
}

/// A move that did not complete: `committed` is `Some(false)` when it
/// certainly did not commit, `None` when that is unknown.
struct Failed {
    error: NodeError,
    committed: Option<bool>,
}

impl From<crate::store::StoreError> for Failed {
    fn from(error: crate::store::StoreError) -> Self {
        NodeError::from(error).into()
    }
}

impl From<std::sync::Arc<crate::wal::WalError>> for Failed {
    fn from(error: std::sync::Arc<crate::wal::WalError>) -> Self {
        NodeError::from(error).into()
    }
}

impl From<NodeError> for Failed {
    fn from(error: NodeError) -> Self {
        Failed {
            error,
            committed: Some(false),
        }
    }
}

async fn copy_and_commit(
    node: &Node,
    control: &mut ControlClient<Conn>,
    source: &mut NodeClient<Conn>,
    job: &MoveIn,
) -> Result<(), Failed> {
    let (shard, attempt) = (job.shard, job.attempt);
    if node.handle(shard).is_ok() {
        return Err(NodeError::Invalid(format!("shard {shard} is already served here")).into());
    }
    let request = pb::MoveOutRequest { shard, attempt };
    let started = timed("BeginMoveOut", source.begin_move_out(request))
        .await
        .map_err(remote)?
        .into_inner();
    let rules = started.rules.clone().unwrap_or_default();
    let defs = rule_defs(&rules)?;
    let plan = compile(rules.version, &defs)?;
    node.store().put_rules_version(rules.version, &defs)?;

    // The snapshot, into a tree marked incomplete until the end.
    let store = node.shard_store(shard)?;
    store.clear()?;
    store.set_incoming(true)?;
    let mut progress = pb::MoveProgress {
        shard,
        attempt,
        bytes_done: 0,
        bytes_total: started.snapshot_bytes,
    };
    node.inner.moves_in.set(progress);
    let began = Instant::now();
    let mut chunks = timed("MoveOutSnapshot", source.move_out_snapshot(request))
        .await
        .map_err(remote)?
        .into_inner();
    let mut complete = false;
    while let Some(chunk) = timed("MoveOutSnapshot", chunks.message())
        .await
        .map_err(remote)?
    {
        let entries = ExportEntries::decode(chunk.data.as_slice())
            .map_err(|e| NodeError::Invalid(format!("undecodable snapshot chunk: {e}")))?;
        let loader = store.clone();
        let bytes = tokio::task::spawn_blocking(move || {
            let mut bytes = 0u64;
            for entry in &entries.entries {
                bytes += (entry.key.len() + entry.value.len()) as u64;
                loader.load(&entry.key, &entry.value)?;
            }
            Ok::<_, NodeError>(bytes)
        })
        .await
        .map_err(|e| unavailable_join(&e))??;
        progress.bytes_done += bytes;
        node.inner.moves_in.set(progress);
        // Throttle: no faster than bytes_per_sec on average.
        if job.bytes_per_sec > 0 {
            let due =
                Duration::from_secs_f64(progress.bytes_done as f64 / job.bytes_per_sec as f64);
            if let Some(wait) = due.checked_sub(began.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        if chunk.last {
            complete = true;
            break;
        }
    }
    if !complete {
        return Err(NodeError::Unavailable("the snapshot stream ended early".into()).into());
    }
    tracing::debug!(
        shard,
        attempt,
        ms = began.elapsed().as_millis() as u64,
        "snapshot copied"
    );
    store.set_fenced(0)?;
    let mut moved = Shard::open(shard, store.clone(), plan, node.config().shard.clone())?;

    // Catch up while the source serves, until the tail is short. (The
    // changes replay makes go to the copy's change log with the checkpoint.)
    let mut next = 0u64;
    for _ in 0..MAX_CATCH_UP_ROUNDS {
        let tail = read_tail(source, shard, attempt, next, false).await?;
        replay(node, &mut moved, &tail.records)?;
        next += tail.records.len() as u64;
        if tail.records.len() < SHORT_TAIL && next >= tail.end {
            break;
        }
    }

    // Make the copy durable before fencing, so that the fence lasts only for
    // the last few inputs: a marker in this node's log (replay of the shard
    // starts after it), a checkpoint, a sync. The copy stays marked *pending*
    // with its attempt until the move is known to have committed: a node
    // restarting with a pending copy settles it with the control plane.
    let epoch = started.epoch + 1;
    let marker = WalRecord {
        shard,
        now_ms: node.now().millis(),
        input: Some(Input::MovedIn(Tick {})),
    };
    moved.applied_record(append(node, marker.to_bytes()).await?);
    moved.set_epoch(epoch);
    let now = node.now();
    let synced = node.clone();
    let mut moved = tokio::task::spawn_blocking(move || {
        moved.checkpoint(now)?;
        let store = moved.store();
        store.set_epoch(epoch)?;
        store.set_pending(attempt)?;
        store.set_incoming(false)?;
        synced.store().sync()?;
        Ok::<_, NodeError>(moved)
    })
    .await
    .map_err(|e| unavailable_join(&e))??;
    tracing::debug!(
        shard,
        attempt,
        ms = began.elapsed().as_millis() as u64,
        "copy durable"
    );

    // Fence the source and take the rest; each input goes to this node's log
    // too (after the marker), so it is durable here before the commit. Their
    // changes are published when the shard is served.
    let mut unpublished = Vec::new();
    loop {
        let tail = read_tail(source, shard, attempt, next, true).await?;
        unpublished.extend(replay(node, &mut moved, &tail.records)?);
        let mut durable = Vec::with_capacity(tail.records.len());
        for record in &tail.records {
            durable.push(node.inner.committer.append(record.clone()).await);
        }
        for waiting in durable {
            let at = waiting
                .await
                .map_err(|_| NodeError::Unavailable("log stopped".into()))??;
            moved.applied_record(at);
        }
        next += tail.records.len() as u64;
        if tail.fenced && next >= tail.end {
            break;
        }
    }
    tracing::debug!(
        shard,
        attempt,
        ms = began.elapsed().as_millis() as u64,
        "fenced and caught up"
    );
    // Fault hook for tests/e2e_move_protocol.rs: a crash between the fence and
    // the commit, the one window where a complete copy is not yet the owner.
    if std::env::var_os(FAULT_EXIT_BEFORE_COMMIT).is_some() {
        tracing::error!(
            shard,
            attempt,
            "{FAULT_EXIT_BEFORE_COMMIT} is set: exiting before the commit"
        );
        std::process::exit(86);
    }

    if let Err(failed) = commit(node, control, shard, attempt, epoch).await {
        if failed.committed.is_none() {
            // The control link serves the stored copy if the move did commit:
            // the stored copy must then hold everything.
            let now = node.now();
            let synced = node.clone();
            let _ = tokio::task::spawn_blocking(move || {
                moved.checkpoint(now)?;
                synced.store().sync()?;
                Ok::<_, NodeError>(())
            })
            .await;
        }
        return Err(failed);
    }
    tracing::debug!(
        shard,
        attempt,
        ms = began.elapsed().as_millis() as u64,
        "committed"
    );
    let store = moved.store().clone();
    node.serve_moved(moved, unpublished).await?;
    node.inner.moves_in.completed(progress.bytes_done);
    // Durable with the next checkpoint; until then a restart finds the
    // placement naming this node and clears it.
    store.set_pending(0)?;
    tracing::info!(
        shard,
        attempt,
        from = %job.source,
        bytes = progress.bytes_done,
        elapsed_ms = began.elapsed().as_millis() as u64,
        "shard moved here"
    );
    Ok(())
}

async fn read_tail(
    source: &mut NodeClient<Conn>,
    shard: u32,
    attempt: u64,
    from: u64,
    fence: bool,
) -> Result<pb::MoveTailResponse, NodeError> {
    let request = pb::MoveTailRequest {
        shard,
        attempt,
        from,
        fence,
    };
    timed("MoveOutTail", source.move_out_tail(request))
        .await
        .map(tonic::Response::into_inner)
        .map_err(remote)
}

/// An error from the source, as this node reports it.
fn remote(e: Status) -> NodeError {
    match e.code() {
        Code::InvalidArgument | Code::NotFound => NodeError::Invalid(e.message().to_owned()),
        _ => NodeError::Unavailable(e.message().to_owned()),
    }
}

/// Appends a record to this node's log; its position once durable.
async fn append(node: &Node, record: Vec<u8>) -> Result<crate::wal::Lsn, NodeError> {
    Ok(node
        .inner
        .committer
        .append(record)
        .await
        .await
        .map_err(|_| NodeError::Unavailable("log stopped".into()))??)
}

fn unavailable_join(e: &tokio::task::JoinError) -> NodeError {
    NodeError::Unavailable(format!("a blocking task failed: {e}"))
}

/// Applies inputs from the source's log to the copy, exactly as recovery
/// would; returns the changes they made.
fn replay(node: &Node, shard: &mut Shard, records: &[Vec<u8>]) -> Result<Vec<Logged>, NodeError> {
    let mut changes = Vec::new();
    for payload in records {
        let payload = bytes::Bytes::copy_from_slice(payload);
        let record = WalRecord::from_shared(payload.clone())
            .map_err(|e| NodeError::Invalid(format!("undecodable input from the source: {e}")))?;
        if let Some(Input::Rules(request)) = &record.input {
            node.store()
                .put_rules_version(request.version, &rule_defs(request)?)?;
        }
        changes.extend(apply_input(shard, &record, &payload)?);
    }
    Ok(changes)
}

/// Commits the move; when the answer is lost, finds out from the topology
/// whether it committed.
async fn commit(
    node: &Node,
    control: &mut ControlClient<Conn>,
    shard: u32,
    attempt: u64,
    epoch: u64,
) -> Result<(), Failed> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let refused = match control
            .commit_move(pb::MoveRequest { shard, attempt })
            .await
        {
            Ok(_) => return Ok(()),
            Err(status) => status,
        };
        // FAILED_PRECONDITION: the attempt is not in flight (aborted, or this
        // very commit applied before its answer was lost).
        if let Ok(topology) = control.get_topology(pb::ReadOptions { stale: false }).await {
            let topology = topology.into_inner().topology.unwrap_or_default();
            let place = topology.shards.get(shard as usize);
            if place.is_some_and(|p| p.node_id == node.config().node_id && p.epoch == epoch) {
                return Ok(());
            }
            let in_flight = topology
                .moves
                .iter()
                .any(|m| m.shard == shard && m.attempt == attempt);
            if !in_flight {
                return Err(NodeError::Invalid(format!(
                    "move of shard {shard} attempt {attempt} was not committed: {}",
                    refused.message()
                ))
                .into());
            }
        }
        if Instant::now() >= deadline {
            return Err(Failed {
                error: NodeError::Unavailable(format!(
                    "could not learn whether the move of shard {shard} committed: {}",
                    refused.message()
                )),
                committed: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
