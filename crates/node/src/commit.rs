//! Group commit: one thread owns the [`Wal`]; appends that arrive while it is
//! syncing are written together (one `write`) and share the next `fdatasync`.
//!
//! Under load, syncs are paced to one per [`SYNC_GAP`]: on this machine's disk
//! an `fdatasync` returns in about 150 µs, so back-to-back syncs made groups
//! of three or four records. Each sync costs CPU (the kernel's flush, a
//! doorbell write to the virtual disk) and wakes every shard task it acks; at
//! 370k events/s that was 6,800 syncs and 25,000 writes a second. Only a
//! group that found other records already queued (writers overlap) and
//! follows the last sync within the gap waits. A lone record is synced at
//! once: a client that sends one event at a time and waits for each ack
//! would otherwise wait out the gap on every call (2,800 calls a second
//! became 930 when every sync was paced).
//!
//! Callers (shard tasks) send a record and get a future that resolves once the
//! record is durable, with its position. They do not wait on it before applying
//! the next input: a shard keeps applying in memory and publishes (acks the
//! client, streams the changes) when the future resolves. Records from one
//! sender are written in the order sent.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::wal::{Lsn, Wal, WalError};

/// Result of a durable append, shared by every caller of a failed sync.
pub type Durable = Result<Lsn, Arc<WalError>>;

enum Command {
    Append {
        payload: bytes::Bytes,
        done: oneshot::Sender<Durable>,
    },
    Truncate {
        before: Lsn,
        done: oneshot::Sender<Result<usize, Arc<WalError>>>,
    },
    Close,
}

/// Handle to the group-commit thread. Dropping every handle stops the thread
/// after it has synced what it was given.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Command>,
}

/// Owns the commit thread; joining it is part of shutdown.
pub struct CommitThread {
    handle: Option<JoinHandle<()>>,
}

/// Most records written before one sync (bounds the latency of a huge group).
const MAX_GROUP: usize = 4096;

/// Least time from one sync's start to the next one's when writers overlap:
/// at most this much is added to an acknowledgement.
pub const SYNC_GAP: Duration = Duration::from_millis(1);

impl Committer {
    /// Starts the commit thread on `wal`.
    pub fn start(wal: Wal) -> (Committer, CommitThread) {
        let (tx, rx) = mpsc::channel(MAX_GROUP);
        let handle = std::thread::Builder::new()
            .name("dynseg-wal".into())
            .spawn(move || run(wal, rx))
            .ok();
        (Committer { tx }, CommitThread { handle })
    }

    /// Queues `payload`; the returned receiver resolves once it is durable.
    pub async fn append(&self, payload: impl Into<bytes::Bytes>) -> oneshot::Receiver<Durable> {
        let payload = payload.into();
        let (done, durable) = oneshot::channel();
        if let Err(mpsc::error::SendError(Command::Append { done, .. })) =
            self.tx.send(Command::Append { payload, done }).await
        {
            let closed = WalError::Io {
                path: Default::default(),
                source: std::io::Error::other("the write-ahead log is shut down"),
            };
            let _ = done.send(Err(Arc::new(closed)));
        }
        durable
    }

    /// Asks the thread to sync what it has and stop; later appends fail.
    pub async fn close(&self) {
        let _ = self.tx.send(Command::Close).await;
    }

    /// Deletes log segments wholly before `before`.
    pub async fn truncate_before(&self, before: Lsn) -> Result<usize, Arc<WalError>> {
        let (done, result) = oneshot::channel();
        if self
            .tx
            .send(Command::Truncate { before, done })
            .await
            .is_err()
        {
            return Ok(0);
        }
        result.await.unwrap_or(Ok(0))
    }
}

impl CommitThread {
    /// Waits for the thread to finish (after every [`Committer`] is dropped).
    pub fn join(mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn run(mut wal: Wal, mut rx: mpsc::Receiver<Command>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    let mut closing = false;
    let mut last_sync: Option<Instant> = None;
    while !closing {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        group.push(first);
        take_waiting(&mut rx, &mut group);
        if let Some(wait) = pace(group.len(), last_sync, Instant::now()) {
            std::thread::sleep(wait);
            take_waiting(&mut rx, &mut group);
        }
        let mut written: Vec<(oneshot::Sender<Durable>, Durable)> = Vec::new();
        for command in group.drain(..) {
            match command {
                Command::Append { payload, done } => {
                    let at = wal.append(&payload).map_err(Arc::new);
                    written.push((done, at));
                }
                Command::Truncate { before, done } => {
                    let _ = done.send(wal.truncate_before(before).map_err(Arc::new));
                }
                Command::Close => closing = true,
            }
        }
        let synced = if written.is_empty() {
            Ok(())
        } else {
            last_sync = Some(Instant::now());
            wal.sync().map_err(Arc::new)
        };
        for (done, at) in written {
            let result = match (&synced, at) {
                (Ok(()), at) => at,
                (Err(e), _) => Err(e.clone()),
            };
            let _ = done.send(result);
        }
    }
    if let Err(e) = wal.sync() {
        tracing::error!(error = %e, "final write-ahead log sync failed");
    }
    // Anything sent after the close is refused, not silently dropped.
    rx.close();
    while let Ok(command) = rx.try_recv() {
        if let Command::Append { done, .. } = command {
            let closed = WalError::Io {
                path: Default::default(),
                source: std::io::Error::other("the write-ahead log is shut down"),
            };
            let _ = done.send(Err(Arc::new(closed)));
        }
    }
}

/// How long a group of `queued` commands waits before its sync, the last
/// sync having started at `last_sync`: the rest of [`SYNC_GAP`] if writers
/// overlap (others were queued with the first), nothing for a lone record.
fn pace(queued: usize, last_sync: Option<Instant>, now: Instant) -> Option<Duration> {
    if queued < 2 {
        return None;
    }
    (last_sync? + SYNC_GAP).checked_duration_since(now)
}

/// Adds the commands already queued to `group`, up to [`MAX_GROUP`].
fn take_waiting(rx: &mut mpsc::Receiver<Command>, group: &mut Vec<Command>) {
    while group.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(more) => group.push(more),
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_overlapping_writers_wait_and_only_for_the_rest_of_the_gap() {
        let synced = Instant::now();
        let soon = synced + SYNC_GAP / 4;
        assert_eq!(pace(1, Some(synced), soon), None, "a lone record");
        assert_eq!(pace(5, None, soon), None, "the first sync");
        assert_eq!(pace(5, Some(synced), soon), Some(SYNC_GAP * 3 / 4));
        assert_eq!(pace(5, Some(synced), synced + SYNC_GAP * 2), None);
    }

    #[tokio::test]
    async fn appends_resolve_once_durable_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), 1 << 20).unwrap();
        let (committer, thread) = Committer::start(wal);
        let mut waits = Vec::new();
        for i in 0..100u32 {
            waits.push(committer.append(i.to_le_bytes().to_vec()).await);
        }
        let mut positions = Vec::new();
        for wait in waits {
            positions.push(wait.await.unwrap().unwrap());
        }
        assert!(positions.windows(2).all(|w| w[0] < w[1]));
        drop(committer);
        thread.join();
        let mut seen = Vec::new();
        Wal::replay(dir.path(), Lsn::default(), |_, p| {
            seen.push(u32::from_le_bytes([p[0], p[1], p[2], p[3]]));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
    }
}
