//! A shard's change log as subscribers see it: every published change, in
//! sequence order, from the store (checkpointed) and from memory (since the last
//! checkpoint), then live.
//!
//! A follower reads history, then live changes from a broadcast channel; it
//! tracks the last sequence it delivered, so switching from history to live (or
//! back, when it falls behind the broadcast) never repeats or skips a change.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dynseg_proto::pb;
use tokio::sync::{Notify, broadcast, mpsc, watch};

use crate::shard::Logged;
use crate::store::{ShardStore, StoreError};

/// Live changes a follower may fall behind by before it re-reads history.
const LIVE_BUFFER: usize = 8192;

/// Live changes taken from the broadcast together, at most.
const LIVE_BATCH: usize = 1024;

/// One shard's published changes.
pub struct ChangeLog {
    store: ShardStore,
    /// Guarded by a std mutex: held only to copy or append, never across an await.
    recent: Mutex<Recent>,
    live: broadcast::Sender<Arc<pb::MembershipChange>>,
    /// Set when the shard stops being served here: followers end.
    closed: watch::Sender<bool>,
    followers: AtomicUsize,
    idle: Notify,
}

/// Counts a follower while it runs.
struct Following<'a>(&'a ChangeLog);

impl Drop for Following<'_> {
    fn drop(&mut self) {
        self.0.followers.fetch_sub(1, Ordering::SeqCst);
        self.0.idle.notify_waiters();
    }
}

#[derive(Default)]
struct Recent {
    /// Published since the last checkpoint, in sequence order.
    changes: VecDeque<Arc<pb::MembershipChange>>,
    /// The last published sequence.
    last: u64,
}

fn sequence(change: &pb::MembershipChange) -> u64 {
    change.cursor.as_ref().map_or(0, |c| c.sequence)
}

impl ChangeLog {
    /// The log of a shard whose last published sequence is `last`.
    pub fn new(store: ShardStore, last: u64) -> ChangeLog {
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        let (closed, _) = watch::channel(false);
        ChangeLog {
            store,
            recent: Mutex::new(Recent {
                changes: VecDeque::new(),
                last,
            }),
            live,
            closed,
            followers: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        // A panic while holding this lock cannot leave it half-updated (pushes
        // only), so a poisoned lock is still consistent.
        self.recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Publishes durable changes: followers see them from now on.
    pub fn publish(&self, changes: &[Logged]) {
        if changes.is_empty() {
            return;
        }
        crate::metrics::record_changes(changes.iter().map(|l| &l.change));
        let mut recent = self.recent();
        for logged in changes {
            let change = Arc::new(logged.change.clone());
            recent.last = logged.sequence;
            recent.changes.push_back(change.clone());
            let _ = self.live.send(change);
        }
    }

    /// Changes published but not yet received by the slowest live follower.
    pub fn backlog(&self) -> usize {
        self.live.len()
    }

    /// The shard checkpointed the changes through sequence `through`: they are
    /// read from the store from now on. (Changes published since the checkpoint
    /// was taken stay in memory until the next one.)
    pub fn checkpointed(&self, through: u64) {
        let mut recent = self.recent();
        while recent
            .changes
            .front()
            .is_some_and(|c| sequence(c) <= through)
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
            if self.followers.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// The last published sequence.
    pub fn last(&self) -> u64 {
        self.recent().last
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
        let snapshot: Vec<_> = self.recent().changes.iter().cloned().collect();
        let first_recent = snapshot.first().map_or(u64::MAX, |c| sequence(c));
        self.store.visit_changes_since(
            since_ms,
            first_recent.min(through.saturating_add(1)),
            &mut visit,
        )?;
        for change in snapshot {
            if sequence(&change) <= through && change.at_ms >= since_ms {
                visit(&change);
            }
        }
        Ok(())
    }

    /// Follows the log after sequence `after`, sending `wrap(change)` to `out` for
    /// each change `keep` accepts, until `out` is closed.
    pub async fn follow<T>(
        self: Arc<Self>,
        after: u64,
        keep: impl Fn(&pb::MembershipChange) -> bool,
        out: &mpsc::Sender<T>,
        wrap: impl Fn(pb::MembershipChange) -> T,
    ) -> Result<(), StoreError> {
        let wrap = &wrap;
        let deliver = move |batch: Vec<pb::MembershipChange>| async move {
            for change in batch {
                if out.send(wrap(change)).await.is_err() {
                    return false;
                }
            }
            true
        };
        self.follow_batches(after, keep, deliver).await
    }

    /// Follows the log after sequence `after`, handing `deliver` the changes
    /// `keep` accepts in order, several at a time: a page of history, or the
    /// live changes ready together (up to [`LIVE_BATCH`]). Ends when `deliver`
    /// returns false or the log closes.
    pub async fn follow_batches<Delivered: Future<Output = bool>>(
        self: Arc<Self>,
        mut after: u64,
        keep: impl Fn(&pb::MembershipChange) -> bool,
        mut deliver: impl FnMut(Vec<pb::MembershipChange>) -> Delivered,
    ) -> Result<(), StoreError> {
        // A change read from history is this follower's alone: taken as it is,
        // not copied.
        let own = |change: Arc<pb::MembershipChange>| {
            Arc::try_unwrap(change).unwrap_or_else(|shared| (*shared).clone())
        };
        self.followers.fetch_add(1, Ordering::SeqCst);
        let _following = Following(&self);
        let mut closed = self.closed.subscribe();
        loop {
            if *closed.borrow() {
                return Ok(());
            }
            let (mut live, snapshot) = {
                let recent = self.recent();
                (
                    self.live.subscribe(),
                    recent.changes.iter().cloned().collect::<Vec<_>>(),
                )
            };
            let first_recent = snapshot.first().map_or(u64::MAX, |c| sequence(c));
            // Checkpointed history, in pages.
            while after + 1 < first_recent {
                let page = self.store.changes_after(after, 1024)?;
                if page.is_empty() {
                    break;
                }
                let mut batch = Vec::with_capacity(page.len());
                for change in page {
                    let seq = sequence(&change);
                    if seq >= first_recent {
                        break;
                    }
                    after = seq;
                    if keep(&change) {
                        batch.push(change);
                    }
                }
                if !batch.is_empty() && !deliver(batch).await {
                    return Ok(());
                }
            }
            let mut batch = Vec::new();
            for change in snapshot {
                let seq = sequence(&change);
                if seq <= after {
                    continue;
                }
                after = seq;
                if keep(&change) {
                    batch.push(own(change));
                }
            }
            if !batch.is_empty() && !deliver(batch).await {
                return Ok(());
            }
            loop {
                let received = tokio::select! {
                    received = live.recv() => received,
                    _ = closed.wait_for(|c| *c) => return Ok(()),
                };
                let first = match received {
                    Ok(change) => change,
                    // Fell behind: read what was missed from history.
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                };
                let mut batch = Vec::new();
                let mut lagged = false;
                let mut next = Some(first);
                // Counted as received, not as kept: a follower whose filter
                // keeps little still hands over (and yields) every so often.
                let mut received = 0;
                while let Some(change) = next.take() {
                    received += 1;
                    let seq = sequence(&change);
                    if seq > after {
                        after = seq;
                        if keep(&change) {
                            batch.push(own(change));
                        }
                    }
                    if received < LIVE_BATCH {
                        match live.try_recv() {
                            Ok(change) => next = Some(change),
                            Err(broadcast::error::TryRecvError::Lagged(_)) => lagged = true,
                            Err(_) => {}
                        }
                    }
                }
                if !batch.is_empty() && !deliver(batch).await {
                    return Ok(());
                }
                if lagged {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Checkpoint, Store};
    use prost::Message;

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
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let shard = store.shard(0).unwrap();
        let log = Arc::new(ChangeLog::new(shard.clone(), 0));
        let all: Vec<Logged> = (1..=5).map(logged).collect();
        // A checkpoint is taken holding changes 1..=3; 4 and 5 are published while
        // it is written.
        let checkpoint = Checkpoint {
            changes: all[..3]
                .iter()
                .map(|l| (l.sequence, l.change.at_ms, l.change.encode_to_vec()))
                .collect(),
            expire_changes_before_ms: i64::MIN,
            ..Default::default()
        };
        log.publish(&all);
        shard.write_checkpoint(&checkpoint).unwrap();
        log.checkpointed(3);

        let (tx, mut rx) = mpsc::channel(16);
        let following = log.clone();
        let follower = tokio::spawn(async move { following.follow(0, |_| true, &tx, |c| c).await });
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
    async fn a_follower_far_behind_live_changes_gets_each_once_in_order_and_batched() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let log = Arc::new(ChangeLog::new(store.shard(0).unwrap(), 0));
        let (tx, mut rx) = mpsc::channel(1);
        let following = log.clone();
        let follower = tokio::spawn(async move {
            let tx = &tx;
            let deliver =
                move |batch: Vec<pb::MembershipChange>| async move { tx.send(batch).await.is_ok() };
            following.follow_batches(0, |_| true, deliver).await
        });
        let sequences = |batch: Vec<pb::MembershipChange>| -> Vec<u64> {
            batch.iter().map(|c| c.cursor.unwrap().sequence).collect()
        };
        let next = async |rx: &mut mpsc::Receiver<Vec<pb::MembershipChange>>| {
            tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
                .await
                .expect("a change is missing")
                .expect("the follower ended")
        };
        log.publish(&[logged(1)]);
        let mut got = sequences(next(&mut rx).await);
        // The follower is live; three times what the live buffer holds are
        // published before it runs again, so it lags and reads them back.
        let total = 3 * LIVE_BUFFER as u64;
        for sequence in 2..=total {
            log.publish(&[logged(sequence)]);
        }
        let mut batches = 1;
        while got.len() < total as usize {
            got.extend(sequences(next(&mut rx).await));
            batches += 1;
        }
        assert_eq!(got, (1..=total).collect::<Vec<_>>());
        assert!(batches <= 3, "{total} changes in {batches} batches");
        log.close();
        follower.await.unwrap().unwrap();
    }
}
