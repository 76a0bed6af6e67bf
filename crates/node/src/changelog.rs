//! A shard's change log as subscribers see it: every published change, in
//! sequence order, from the store (checkpointed) and from memory (since the last
//! checkpoint), then live.
//!
//! Changes since the last checkpoint are held once, in `recent`, encoded once
//! when published; followers take what they have not delivered from there
//! (each change a reference-counted slice of its publish's buffer) and wait
//! on a watch of the last published sequence for more. Followers hand on
//! those bytes as they are: serving a change costs no decoding and no
//! encoding, from memory or from the store, however many subscribers there
//! are. A follower tracks the last sequence it delivered, so it reads the
//! store for what a checkpoint moved out of memory and never repeats or skips
//! a change. Nothing holds a change after the checkpoint that stored it:
//! memory is bounded by the changes of one checkpoint interval, however many
//! followers there are.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use dynseg_proto::encoded::ChangeView;
use dynseg_proto::pb;
use prost::Message;
use tokio::sync::{Notify, mpsc, watch};

use crate::shard::Logged;
use crate::store::{ShardStore, StoreError};
use crate::tail_search::partition_point_from_end;

/// Changes handed to a follower together, at most: a page of history, or of
/// what was published since it last looked.
const BATCH: usize = 1024;

/// One shard's published changes.
pub struct ChangeLog {
    store: ShardStore,
    /// Guarded by a std mutex: held only to copy or append, never across an await.
    recent: Mutex<Recent>,
    /// The last published sequence: followers caught up wait on it.
    published: watch::Sender<u64>,
    /// Set when the shard stops being served here: followers end.
    closed: watch::Sender<bool>,
    /// The running followers, each with the last sequence it delivered.
    positions: Mutex<BTreeMap<u64, u64>>,
    next_follower: AtomicU64,
    idle: Notify,
}

/// The segments a follower wants the changes of; none named: every segment.
#[derive(Clone, Debug, Default)]
pub struct SegmentFilter {
    segments: BTreeSet<String>,
}

impl SegmentFilter {
    /// Changes of `segments` only (of all, if there are none).
    pub fn new(segments: impl IntoIterator<Item = String>) -> SegmentFilter {
        SegmentFilter {
            segments: segments.into_iter().collect(),
        }
    }

    /// Whether the encoded `change` passes (it is read only if a segment is
    /// named).
    fn keeps(&self, change: &[u8]) -> Result<bool, StoreError> {
        if self.segments.is_empty() {
            return Ok(true);
        }
        let view = ChangeView::parse(change).map_err(StoreError::corrupt_change)?;
        Ok(self.segments.contains(view.segment))
    }
}

/// Registers a follower while it runs.
struct Following<'a> {
    log: &'a ChangeLog,
    id: u64,
}

impl Following<'_> {
    fn delivered(&self, through: u64) {
        lock(&self.log.positions).insert(self.id, through);
    }
}

impl Drop for Following<'_> {
    fn drop(&mut self) {
        lock(&self.log.positions).remove(&self.id);
        self.log.idle.notify_waiters();
    }
}

/// A published change, encoded as the wire and the store carry it.
#[derive(Clone, Debug)]
struct Held {
    sequence: u64,
    at_ms: i64,
    bytes: Bytes,
}

#[derive(Default)]
struct Recent {
    /// Published since the last checkpoint, in sequence order.
    changes: VecDeque<Held>,
}

impl Recent {
    /// Up to `limit` changes with a sequence above `after`, and the first
    /// sequence held (`u64::MAX`: none).
    fn after(&self, after: u64, limit: usize) -> (Vec<Held>, u64) {
        let first = self.changes.front().map_or(u64::MAX, |c| c.sequence);
        // Followers are nearly caught up: their cursor is in the warm tail.
        let changes = &self.changes;
        let start = partition_point_from_end(changes.len(), |i| changes[i].sequence <= after);
        let page = self.changes.range(start..).take(limit).cloned().collect();
        (page, first)
    }
}

/// A poisoned lock is still consistent here: every critical section only
/// pushes, pops or copies.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ChangeLog {
    /// The log of a shard whose last published sequence is `last`.
    pub fn new(store: ShardStore, last: u64) -> ChangeLog {
        let (published, _) = watch::channel(last);
        let (closed, _) = watch::channel(false);
        ChangeLog {
            store,
            recent: Mutex::new(Recent::default()),
            published,
            closed,
            positions: Mutex::new(BTreeMap::new()),
            next_follower: AtomicU64::new(0),
            idle: Notify::new(),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        lock(&self.recent)
    }

    /// Publishes durable changes: followers see them from now on. They are
    /// encoded here, once, into one buffer that every follower shares.
    pub fn publish(&self, changes: &[Logged]) {
        let Some(last) = changes.last() else {
            return;
        };
        crate::metrics::record_changes(changes.iter().map(|l| &l.change));
        let mut buffer =
            BytesMut::with_capacity(changes.iter().map(|l| l.change.encoded_len()).sum());
        let mut ends = Vec::with_capacity(changes.len());
        for logged in changes {
            logged.change.encode_raw(&mut buffer);
            ends.push(buffer.len());
        }
        let buffer = buffer.freeze();
        let mut start = 0;
        let held = changes.iter().zip(ends).map(|(logged, end)| {
            let bytes = buffer.slice(start..end);
            start = end;
            Held {
                sequence: logged.sequence,
                at_ms: logged.change.at_ms,
                bytes,
            }
        });
        self.recent().changes.extend(held);
        self.published.send_replace(last.sequence);
    }

    /// Changes published but not yet delivered by the slowest follower.
    pub fn backlog(&self) -> usize {
        let last = self.last();
        let slowest = lock(&self.positions).values().copied().min();
        slowest.map_or(0, |s| last.saturating_sub(s) as usize)
    }

    /// The shard checkpointed the changes through sequence `through`: they are
    /// read from the store from now on. (Changes published since the checkpoint
    /// was taken stay in memory until the next one.)
    pub fn checkpointed(&self, through: u64) {
        let mut recent = self.recent();
        while recent
            .changes
            .front()
            .is_some_and(|c| c.sequence <= through)
        {
            recent.changes.pop_front();
        }
    }

    /// Ends every follower (the shard is no longer served here).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Waits until every follower has ended (after [`ChangeLog::close`]).
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if lock(&self.positions).is_empty() {
                return;
            }
            idle.await;
        }
    }

    /// The last published sequence.
    pub fn last(&self) -> u64 {
        *self.published.borrow()
    }

    /// Visits the published changes with `at_ms >= since_ms` and a sequence
    /// of at most `through`, in sequence order (what history is read from).
    pub fn visit_since(
        &self,
        since_ms: i64,
        through: u64,
        mut visit: impl FnMut(&pb::MembershipChange),
    ) -> Result<(), StoreError> {
        // Recent first: a checkpoint taken meanwhile moves changes from memory
        // to the store, never the other way, so store + snapshot covers all.
        let snapshot: Vec<Held> = self.recent().changes.iter().cloned().collect();
        let first_recent = snapshot.first().map_or(u64::MAX, |c| c.sequence);
        self.store.visit_changes_since(
            since_ms,
            first_recent.min(through.saturating_add(1)),
            &mut visit,
        )?;
        for change in snapshot {
            if change.sequence <= through && change.at_ms >= since_ms {
                visit(&pb::MembershipChange::decode(change.bytes)?);
            }
        }
        Ok(())
    }

    /// Follows the log after sequence `after`, sending `wrap(change)` to `out`
    /// for each change of a segment `filter` passes, until `out` is closed.
    /// Changes are decoded here, one by one (for in-process readers).
    pub async fn follow<T>(
        self: Arc<Self>,
        after: u64,
        filter: &SegmentFilter,
        out: &mpsc::Sender<T>,
        wrap: impl Fn(pb::MembershipChange) -> T,
    ) -> Result<(), StoreError> {
        let wrap = &wrap;
        let deliver = move |batch: Vec<Bytes>| async move {
            for bytes in batch {
                let change = pb::MembershipChange::decode(bytes)?;
                if out.send(wrap(change)).await.is_err() {
                    return Ok(false);
                }
            }
            Ok(true)
        };
        self.follow_batches(after, filter, deliver).await
    }

    /// Follows the log after sequence `after`, handing `deliver` the encoded
    /// changes `filter` passes in order, up to [`BATCH`] at a time. Ends when
    /// `deliver` returns false (or fails) or the log closes.
    pub async fn follow_batches<Delivered: Future<Output = Result<bool, StoreError>>>(
        self: Arc<Self>,
        mut after: u64,
        filter: &SegmentFilter,
        mut deliver: impl FnMut(Vec<Bytes>) -> Delivered,
    ) -> Result<(), StoreError> {
        let following = Following {
            log: &self,
            id: self.next_follower.fetch_add(1, Ordering::Relaxed),
        };
        following.delivered(after);
        let mut closed = self.closed.subscribe();
        let mut published = self.published.subscribe();
        loop {
            if *closed.borrow() {
                return Ok(());
            }
            // Marked seen before looking, so a publish after the look wakes
            // the wait below.
            published.borrow_and_update();
            let start = after;
            let (page, first_recent) = self.recent().after(after, BATCH);
            let mut batch = Vec::new();
            let caught_up = if after + 1 < first_recent {
                // Checkpointed history: from the store, up to what memory
                // holds (a checkpoint may have moved some there meanwhile).
                for (sequence, change) in self.store.changes_after(after, BATCH)? {
                    if sequence >= first_recent {
                        break;
                    }
                    after = sequence;
                    if filter.keeps(&change)? {
                        batch.push(change);
                    }
                }
                if after == start && first_recent != u64::MAX {
                    // Nothing stored before what memory holds (expired, or
                    // never stored here): go on from memory.
                    after = first_recent - 1;
                }
                after == start
            } else {
                let full = page.len() == BATCH;
                for change in page {
                    after = change.sequence;
                    if filter.keeps(&change.bytes)? {
                        batch.push(change.bytes);
                    }
                }
                !full
            };
            if batch.is_empty() {
                // Nothing delivered may mean nothing awaited: let others run.
                tokio::task::yield_now().await;
            } else if !deliver(batch).await? {
                return Ok(());
            }
            if after != start {
                following.delivered(after);
            }
            if caught_up {
                tokio::select! {
                    changed = published.changed() => if changed.is_err() { return Ok(()) },
                    _ = closed.wait_for(|c| *c) => return Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Checkpoint, Store};

    fn logged(sequence: u64) -> Logged {
        Logged {
            sequence,
            change: pb::MembershipChange {
                user_id: format!("user-{sequence}"),
                segment: "vip".into(),
                at_ms: 1000,
                cursor: Some(pb::Cursor {
                    shard: 0,
                    epoch: 1,
                    sequence,
                }),
                ..Default::default()
            },
        }
    }

    #[tokio::test]
    async fn changes_published_after_a_checkpoint_was_taken_are_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, &dir.path().join("wal")).unwrap();
        let shard = store.shard(0).unwrap();
        let log = Arc::new(ChangeLog::new(shard.clone(), 0));
        let all: Vec<Logged> = (1..=5).map(logged).collect();
        // A checkpoint is taken holding changes 1..=3; 4 and 5 are published while
        // it is written.
        let checkpoint = Checkpoint {
            changes: {
                let mut held = crate::store::ChangeRecords::default();
                for l in &all[..3] {
                    held.push(l.sequence, l.change.at_ms, &l.change);
                }
                held
            },
            expire_changes_before_ms: i64::MIN,
            ..Default::default()
        };
        log.publish(&all);
        shard.write_checkpoint(&checkpoint).unwrap();
        log.checkpointed(3);

        let (tx, mut rx) = mpsc::channel(16);
        let following = log.clone();
        let follower = tokio::spawn(async move {
            following
                .follow(0, &SegmentFilter::default(), &tx, |c| c)
                .await
        });
        let mut got = Vec::new();
        while got.len() < all.len() {
            let next = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
                .await
                .expect("a change is missing");
            got.push(next.unwrap().cursor.unwrap().sequence);
        }
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
        log.close();
        follower.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn the_backlog_is_what_the_slowest_follower_has_not_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, &dir.path().join("wal")).unwrap();
        let log = Arc::new(ChangeLog::new(store.shard(0).unwrap(), 0));
        log.publish(&(1..=10).map(logged).collect::<Vec<_>>());
        assert_eq!(log.backlog(), 0, "no follower, no backlog");

        // A follower whose reader takes nothing yet: one change fits in its
        // channel, the next waits in `deliver`.
        let (tx, mut rx) = mpsc::channel(1);
        let following = log.clone();
        let follower = tokio::spawn(async move {
            following
                .follow(4, &SegmentFilter::default(), &tx, |c| c)
                .await
        });
        let first = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("the follower sends")
            .unwrap();
        assert_eq!(first.cursor.unwrap().sequence, 5);
        assert_eq!(
            log.backlog(),
            6,
            "it started after 4 and has delivered no page yet"
        );
        let mut got = vec![5];
        while got.len() < 6 {
            got.push(rx.recv().await.unwrap().cursor.unwrap().sequence);
        }
        assert_eq!(got, (5..=10).collect::<Vec<_>>());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.backlog() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "backlog {}",
                log.backlog()
            );
            tokio::task::yield_now().await;
        }
        log.close();
        follower.await.unwrap().unwrap();
        assert_eq!(log.backlog(), 0, "an ended follower is not counted");
    }

    #[tokio::test]
    async fn a_follower_far_behind_live_changes_gets_each_once_in_order_and_batched() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, &dir.path().join("wal")).unwrap();
        let log = Arc::new(ChangeLog::new(store.shard(0).unwrap(), 0));
        let (tx, mut rx) = mpsc::channel(1);
        let following = log.clone();
        let follower = tokio::spawn(async move {
            let tx = &tx;
            let deliver = move |batch: Vec<Bytes>| async move { Ok(tx.send(batch).await.is_ok()) };
            following
                .follow_batches(0, &SegmentFilter::default(), deliver)
                .await
        });
        let sequences = |batch: Vec<Bytes>| -> Vec<u64> {
            batch
                .iter()
                .map(|c| ChangeView::parse(c).unwrap().sequence)
                .collect()
        };
        let next = async |rx: &mut mpsc::Receiver<Vec<Bytes>>| {
            tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
                .await
                .expect("a change is missing")
                .expect("the follower ended")
        };
        log.publish(&[logged(1)]);
        let mut got = sequences(next(&mut rx).await);
        // The follower is live; three times what the live buffer holds are
        // published before it runs again, so it lags and reads them back.
        let total = 3 * BATCH as u64 + 5;
        for sequence in 2..=total {
            log.publish(&[logged(sequence)]);
        }
        let mut batches = 1;
        while got.len() < total as usize {
            got.extend(sequences(next(&mut rx).await));
            batches += 1;
        }
        assert_eq!(got, (1..=total).collect::<Vec<_>>());
        // The first change alone, then full pages of what it missed.
        let pages = (total - 1).div_ceil(BATCH as u64);
        assert!(batches <= 1 + pages, "{total} changes in {batches} batches");
        log.close();
        follower.await.unwrap().unwrap();
    }
}
