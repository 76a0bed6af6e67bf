//! One shard's state machine: its users, their timers, dedupe, and its change
//! sequence. Synchronous and deterministic: given the same inputs (batches,
//! ticks, rule changes, each with the `now` it was applied at) it produces the
//! same changes with the same sequence numbers. That is what makes recovery
//! exact: replaying the write-ahead log after a checkpoint regenerates exactly
//! what was acknowledged and published before the crash.
//!
//! The async shell (`runtime`) owns one `Shard` per task and decides when inputs
//! are durable and their changes published.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use dynseg_proto::encoded::decode_event;
use dynseg_proto::{convert::change_to_wire, pb};
use dynseg_rules::{
    Change, Event, Explanation, Plan, SegmentId, Span, Timestamp, UserId, UserState,
};

use crate::seen::SeenIds;
use crate::store::{
    ChangeRecords, Checkpoint, MergedOut, Retained, ShardMeta, ShardStore, StoreError, UserRecord,
};
use crate::tail_search::partition_point_from_end;
use crate::wal::{LogReader, Lsn};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

const DAY_MS: i64 = 86_400_000;

fn day_of(t: Timestamp) -> u32 {
    t.millis().div_euclid(DAY_MS).clamp(0, i64::from(u32::MAX)) as u32
}

/// Events whose users are looked up (and their data prefetched) together
/// before they are applied: enough to overlap a batch's cache misses, few
/// enough that what is prefetched is still in L1 when its event comes.
const PREFETCH_RUN: usize = 16;

/// A message id's identity for dedupe: 96 bits of FNV-1a-128 of the id (a fixed
/// function, so stored ids stay valid across versions). Two different ids of one
/// user collide with probability about n²/2⁹⁷ for n ids in the horizon.
fn message_hash(message_id: &str) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let h = message_id
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u128::from(b)).wrapping_mul(PRIME));
    h >> 32
}

/// Settings of a shard.
#[derive(Clone, Debug)]
pub struct ShardConfig {
    /// How long a message id is remembered.
    pub dedupe_horizon: Span,
    /// How long events are kept for backfilling new rules.
    pub event_retention: Span,
    /// How long changes are kept for subscribers to resume from.
    pub change_retention: Span,
}

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            dedupe_horizon: Span::days(7),
            event_retention: Span::days(7),
            change_retention: Span::days(7),
        }
    }
}

/// One active user.
struct Entry {
    state: UserState,
    /// Recent message ids, for dedupe.
    seen: SeenIds,
    /// Logical time of the last access, for passivation.
    touched: u64,
    /// Changed since the last checkpoint (and listed in `Shard::dirty`).
    dirty: bool,
}

/// A change with its place in the shard's log.
#[derive(Clone, Debug, PartialEq)]
pub struct Logged {
    /// Sequence in the shard's change log.
    pub sequence: u64,
    /// The change as the wire and the store carry it (with its cursor).
    pub change: pb::MembershipChange,
}

/// What applying a batch did.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Events applied.
    pub applied: u32,
    /// Events ignored as repeats of a message id.
    pub duplicates: u32,
    /// Membership changes, in order.
    pub changes: Vec<Logged>,
    /// The batch's sequence among the shard's retained batches (for
    /// [`Shard::batch_logged`]).
    pub batch: u64,
}

/// One shard; see the module documentation.
pub struct Shard {
    id: u32,
    epoch: u64,
    plan: Arc<Plan>,
    config: ShardConfig,
    store: ShardStore,
    users: FastMap<UserId, Entry>,
    /// Every user with a wake-up (active or not), by time.
    timers: BTreeSet<(Timestamp, UserId)>,
    /// Members of each segment (every user, active or not).
    members: BTreeMap<SegmentId, BTreeSet<UserId>>,
    next_sequence: u64,
    next_event: u64,
    /// Users changed since the last checkpoint, each once: an entry's `dirty`
    /// flag says whether it is listed (a flag and a list cost no hash lookup
    /// per event, where a set did).
    dirty: Vec<UserId>,
    /// Batches applied since the last checkpoint: (arrival day, sequence,
    /// the batch), in sequence order. A batch's record is held until the log
    /// says where it is durable; then only its position.
    unsaved_events: Vec<(u32, u64, Retained)>,
    /// The arrival day of the last batch: days never go back within a shard
    /// (a wall clock stepping back keeps the day), so the store's retained
    /// batches in day order are in log order too.
    last_day: u32,
    unsaved_changes: ChangeRecords,
    /// Where replay must start if nothing else is applied.
    replay_from: Lsn,
    /// Logical clock of accesses.
    accesses: u64,
    /// Users the shard has ever seen (stored or new).
    user_count: u64,
    scratch: Vec<Change>,
    /// Identity merges taken out since the last checkpoint.
    merged_out: BTreeMap<String, MergedOut>,
    /// The day merges taken out were last pruned.
    merged_pruned_day: u32,
}

/// What [`Shard::merge_out`] answers.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeOutcome {
    /// What the profile was, for the other side of the merge.
    pub merged: MergedOut,
    /// The exits it caused (empty for a repeat).
    pub changes: Vec<Logged>,
}

impl Shard {
    /// Opens shard `id` from its stored checkpoint under `plan`, which must be the
    /// plan of the checkpoint's rule version; indexes timers and members of every
    /// stored user.
    pub fn open(
        id: u32,
        store: ShardStore,
        plan: Arc<Plan>,
        config: ShardConfig,
    ) -> Result<Shard, StoreError> {
        let meta = store.meta()?;
        let last_day = store.last_retained_day()?.unwrap_or(0);
        let mut shard = Shard {
            id,
            epoch: meta.epoch,
            plan,
            config,
            store,
            users: FastMap::default(),
            timers: BTreeSet::new(),
            members: BTreeMap::new(),
            next_sequence: meta.next_sequence.max(1),
            next_event: meta.next_event,
            dirty: Vec::new(),
            unsaved_events: Vec::new(),
            last_day,
            unsaved_changes: ChangeRecords::default(),
            replay_from: meta.replay_from,
            accesses: 0,
            user_count: 0,
            scratch: Vec::new(),
            merged_out: BTreeMap::new(),
            merged_pruned_day: 0,
        };
        let (mut timers, mut members, mut count) = (Vec::new(), BTreeMap::new(), 0);
        shard.store.visit_users(|user, record| {
            count += 1;
            let user = UserId::from(user);
            if let Some(t) = record.state.next_wakeup() {
                timers.push((t, user.clone()));
            }
            for segment in shard.plan.members(&record.state) {
                members
                    .entry(segment.clone())
                    .or_insert_with(Vec::new)
                    .push(user.clone());
            }
            Ok(())
        })?;
        shard.user_count = count;
        shard.timers = timers.into_iter().collect();
        shard.members = members
            .into_iter()
            .map(|(segment, users)| (segment, users.into_iter().collect()))
            .collect();
        Ok(shard)
    }

    /// The shard's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The ownership epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Sets the ownership epoch (stored at the next checkpoint).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// The plan states are under.
    pub fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    /// Where replay of the write-ahead log must start for this shard.
    pub fn replay_from(&self) -> Lsn {
        self.replay_from
    }

    /// The last change sequence written (0: none).
    pub fn last_sequence(&self) -> u64 {
        self.next_sequence - 1
    }

    /// Active users (in memory).
    pub fn active_users(&self) -> usize {
        self.users.len()
    }

    /// The earliest wake-up of any user.
    pub fn next_timer(&self) -> Option<Timestamp> {
        self.timers.first().map(|(t, _)| *t)
    }

    /// Marks that the write-ahead log record at `at` has been applied: replay
    /// after a checkpoint taken now starts after it.
    pub fn applied_record(&mut self, at: Lsn) {
        self.replay_from = Lsn {
            segment: at.segment,
            offset: at.offset + 1,
        };
    }

    /// The sequence the next applied batch gets.
    pub fn next_batch(&self) -> u64 {
        self.next_event
    }

    /// Marks that batch `batch` (see [`BatchOutcome::batch`]) is durable in
    /// the write-ahead log at `at`: the log's copy becomes the retained one,
    /// and the shard lets go of the record's bytes.
    pub fn batch_logged(&mut self, batch: u64, at: Lsn) {
        // The batch is among the last few (it was in flight until now).
        let events = &mut self.unsaved_events;
        let i = partition_point_from_end(events.len(), |i| events[i].1 < batch);
        if let Some((_, sequence, retained)) = events.get_mut(i)
            && *sequence == batch
        {
            *retained = Retained::Logged(at);
        }
    }

    /// `user`'s entry, loaded or created if it is not active, marked as
    /// changed: every caller is about to change it.
    fn activate(&mut self, user: &UserId) -> Result<&mut Entry, StoreError> {
        self.accesses += 1;
        let touched = self.accesses;
        // One hash lookup for the common case (the user is active).
        let entry = match self.users.entry(user.clone()) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(vacant) => {
                let entry = match self.store.load_user(user.as_str())? {
                    Some(record) => Entry {
                        state: record.state,
                        seen: SeenIds::from_stored(&record.seen),
                        touched,
                        dirty: false,
                    },
                    None => {
                        self.user_count += 1;
                        Entry {
                            state: self.plan.new_state(),
                            seen: SeenIds::default(),
                            touched,
                            dirty: false,
                        }
                    }
                };
                vacant.insert(entry)
            }
        };
        entry.touched = touched;
        if !entry.dirty {
            entry.dirty = true;
            self.dirty.push(user.clone());
        }
        Ok(entry)
    }

    /// Moves `user`'s timer from `before` to its state's next wake-up.
    fn retime(&mut self, user: &UserId, before: Option<Timestamp>, after: Option<Timestamp>) {
        if before == after {
            return;
        }
        if let Some(t) = before {
            self.timers.remove(&(t, user.clone()));
        }
        if let Some(t) = after {
            self.timers.insert((t, user.clone()));
        }
    }

    /// Gives the engine's changes sequence numbers, records them, and updates the
    /// member index.
    fn log(&mut self, changes: &mut Vec<Change>, out: &mut Vec<Logged>) {
        for change in changes.drain(..) {
            let sequence = self.next_sequence;
            self.next_sequence += 1;
            let members = self.members.entry(change.segment.clone()).or_default();
            match change.kind {
                dynseg_rules::ChangeKind::Enter => members.insert(change.user.clone()),
                dynseg_rules::ChangeKind::Exit => members.remove(&change.user),
            };
            let cursor = pb::Cursor {
                shard: self.id,
                epoch: self.epoch,
                sequence,
            };
            let wire = change_to_wire(&change, cursor);
            self.unsaved_changes.push(sequence, wire.at_ms, &wire);
            out.push(Logged {
                sequence,
                change: wire,
            });
        }
    }

    /// Applies a batch of validated events at `now`: repeats of a message id
    /// within the dedupe horizon are counted and ignored. `record` is the
    /// write-ahead log record that carries the batch (encoded): it is retained
    /// as is for backfilling, rather than each event encoded again.
    pub fn apply_batch(
        &mut self,
        now: Timestamp,
        events: &[Event],
        record: bytes::Bytes,
    ) -> Result<BatchOutcome, StoreError> {
        self.apply_batch_parts(now, events, &[events.len()], record)
            .map(|(outcome, _)| outcome)
    }

    /// [`Shard::apply_batch`] for a batch made of parts (batches the shard
    /// task took together, one record for all): `ends` are where each part
    /// ends in `events`; each part's repeats are counted apart, in the second
    /// value. Applying the parts together is applying the whole batch, as
    /// replaying its record does.
    pub fn apply_batch_parts(
        &mut self,
        now: Timestamp,
        events: &[Event],
        ends: &[usize],
        record: bytes::Bytes,
    ) -> Result<(BatchOutcome, Vec<u32>), StoreError> {
        let mut part_duplicates = vec![0u32; ends.len()];
        let mut part = 0;
        let day = day_of(now);
        // Retained by a day that never goes back (see `last_day`); message ids
        // by the clock's own day, as backfill reads them from the records.
        self.last_day = self.last_day.max(day);
        let mut outcome = BatchOutcome {
            batch: self.next_event,
            ..BatchOutcome::default()
        };
        self.unsaved_events
            .push((self.last_day, self.next_event, Retained::Record(record)));
        self.next_event += 1;
        let oldest_day = day_of(now.minus(self.config.dedupe_horizon));
        let plan = self.plan.clone();
        let mut changes = std::mem::take(&mut self.scratch);
        let mut hashes = [0u128; PREFETCH_RUN];
        for (run_index, run) in events.chunks(PREFETCH_RUN).enumerate() {
            for (event, hash) in run.iter().zip(&mut hashes) {
                *hash = message_hash(event.message_id.as_str());
            }
            self.prefetch(run, &hashes);
            for (i, (event, &hash)) in run.iter().zip(&hashes).enumerate() {
                let entry = self.activate(&event.user)?;
                if entry.seen.check_and_insert(hash, day, oldest_day) {
                    outcome.duplicates += 1;
                    let index = run_index * PREFETCH_RUN + i;
                    while ends.get(part).is_some_and(|&end| index >= end) {
                        part += 1;
                    }
                    if let Some(count) = part_duplicates.get_mut(part) {
                        *count += 1;
                    }
                    continue;
                }
                let before = entry.state.next_wakeup();
                plan.apply(&mut entry.state, event, now, &mut changes);
                let after = entry.state.next_wakeup();
                self.retime(&event.user, before, after);
                outcome.applied += 1;
                self.log(&mut changes, &mut outcome.changes);
            }
        }
        self.scratch = changes;
        Ok((outcome, part_duplicates))
    }

    /// Starts loading what applying `run` will read: each active user's map
    /// slot, its message-id slot and its state. The lookups here do not depend
    /// on each other, so the CPU overlaps their cache misses, where applying
    /// the events one by one waits for each in turn (in the dev cluster's
    /// profile the user's entry and its message ids were 13% of the process,
    /// cache misses mostly).
    fn prefetch(&self, run: &[Event], hashes: &[u128]) {
        for (event, &hash) in run.iter().zip(hashes) {
            if let Some(entry) = self.users.get(&event.user) {
                entry.seen.prefetch(hash);
                entry.state.prefetch();
            }
        }
    }

    /// Identity merge, step 1: takes `user`'s profile out of the shard at
    /// `now` for merging into another. Its memberships exit (cause: event), its
    /// state is returned and the profile starts again empty, keeping its
    /// message ids (a late repeat of one of its events stays a repeat). A
    /// repeat of `merge_id` answers what the first one did and changes nothing.
    pub fn merge_out(
        &mut self,
        now: Timestamp,
        user: &UserId,
        merge_id: &str,
    ) -> Result<MergeOutcome, StoreError> {
        if let Some(merged) = self.merged_out.get(merge_id) {
            return Ok(MergeOutcome {
                merged: merged.clone(),
                changes: Vec::new(),
            });
        }
        if let Some(merged) = self.store.merged_out(merge_id)? {
            return Ok(MergeOutcome {
                merged,
                changes: Vec::new(),
            });
        }
        let plan = self.plan.clone();
        let known = self.users.contains_key(user) || self.store.load_user(user.as_str())?.is_some();
        let mut merged = MergedOut {
            at_ms: now.millis(),
            found: false,
            state: Vec::new(),
            rule_version: plan.version().0,
        };
        let mut out = Vec::new();
        if known {
            let mut changes = std::mem::take(&mut self.scratch);
            let entry = self.activate(user)?;
            let before = entry.state.next_wakeup();
            plan.advance(&mut entry.state, user, now, &mut changes);
            if !entry.state.is_new() {
                merged.found = true;
                entry.state.encode(&mut merged.state);
                for segment in plan.members(&entry.state) {
                    changes.push(Change {
                        user: user.clone(),
                        segment: segment.clone(),
                        kind: dynseg_rules::ChangeKind::Exit,
                        at: now,
                        cause: dynseg_rules::Cause::Event,
                        version: plan.version(),
                    });
                }
                entry.state = plan.new_state();
            }
            self.retime(user, before, None);
            self.log(&mut changes, &mut out);
            self.scratch = changes;
        }
        self.merged_out.insert(merge_id.to_owned(), merged.clone());
        Ok(MergeOutcome {
            merged,
            changes: out,
        })
    }

    /// Identity merge, step 2: folds `state` (taken out of another profile by
    /// [`Shard::merge_out`], under this shard's rule version) into `user`'s
    /// profile at `now`. Once per `merge_id`: a repeat is ignored (false).
    pub fn merge_in(
        &mut self,
        now: Timestamp,
        user: &UserId,
        merge_id: &str,
        state: &UserState,
    ) -> Result<(bool, Vec<Logged>), StoreError> {
        let plan = self.plan.clone();
        let day = day_of(now);
        let oldest_day = day_of(now.minus(self.config.dedupe_horizon));
        let hash = message_hash(merge_id);
        let mut changes = std::mem::take(&mut self.scratch);
        let entry = self.activate(user)?;
        if entry.seen.check_and_insert(hash, day, oldest_day) {
            self.scratch = changes;
            return Ok((false, Vec::new()));
        }
        let before = entry.state.next_wakeup();
        plan.merge(&mut entry.state, state, user, now, &mut changes);
        let after = entry.state.next_wakeup();
        self.retime(user, before, after);
        let mut out = Vec::new();
        self.log(&mut changes, &mut out);
        self.scratch = changes;
        Ok((true, out))
    }

    /// Every retained event by user, in arrival order, with repeats of a
    /// message id left out exactly as ingest left them out (same horizon, same
    /// arrival days).
    fn retained_events(&self) -> Result<FastMap<UserId, Vec<Event>>, StoreError> {
        let mut records = self.store.retained_since(0)?;
        let mut log = LogReader::new(self.store.log_dir());
        for (_, _, retained) in &self.unsaved_events {
            let record = match retained {
                Retained::Record(bytes) => crate::record::WalRecord::from_shared(bytes.clone())?,
                Retained::Logged(at) => {
                    crate::record::WalRecord::from_slice(log.read(*at).map_err(StoreError::from)?)?
                }
            };
            records.push(record);
        }
        let mut first_seen: FastMap<(UserId, u128), u32> = FastMap::default();
        let mut retained: FastMap<UserId, Vec<Event>> = FastMap::default();
        for record in records {
            let Some(crate::record::Input::Batch(batch)) = record.input else {
                continue;
            };
            let now = Timestamp(record.now_ms);
            let (day, oldest_day) = (day_of(now), day_of(now.minus(self.config.dedupe_horizon)));
            for wire in batch.events {
                let Ok(event) = decode_event(&wire) else {
                    continue;
                };
                let key = (event.user.clone(), message_hash(event.message_id.as_str()));
                match first_seen.get(&key) {
                    Some(&first) if first >= oldest_day => continue,
                    _ => first_seen.insert(key, day),
                };
                retained.entry(event.user.clone()).or_default().push(event);
            }
        }
        Ok(retained)
    }

    /// Moves every user whose wake-up is due by `now` to `now`, and returns the
    /// changes time caused, ordered by the instant they happened, then by user.
    /// (That order depends only on the states, not on when earlier ticks ran, so
    /// replay assigns the same sequence numbers.)
    pub fn tick(&mut self, now: Timestamp) -> Result<Vec<Logged>, StoreError> {
        let plan = self.plan.clone();
        let mut changes = std::mem::take(&mut self.scratch);
        while let Some((t, user)) = self.timers.first().cloned() {
            if t > now {
                break;
            }
            self.timers.remove(&(t, user.clone()));
            let entry = self.activate(&user)?;
            plan.advance(&mut entry.state, &user, now, &mut changes);
            let after = entry.state.next_wakeup();
            if let Some(t) = after {
                self.timers.insert((t, user.clone()));
            }
        }
        // Stable: one user's changes keep their order.
        changes.sort_by(|a, b| (a.at, &a.user).cmp(&(b.at, &b.user)));
        let mut out = Vec::new();
        self.log(&mut changes, &mut out);
        self.scratch = changes;
        Ok(out)
    }

    /// Moves every user of the shard to `plan` at `now`, backfilling from the
    /// retained events what the new rules need; `progress(done, total)` is called
    /// as users are done.
    pub fn apply_rules(
        &mut self,
        plan: Arc<Plan>,
        now: Timestamp,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Vec<Logged>, StoreError> {
        let old = self.plan.clone();
        let migration = plan.migration_from(&old);
        let mut users: BTreeSet<UserId> = self.users.keys().cloned().collect();
        self.store.visit_users(|user, _| {
            users.insert(UserId::from(user));
            Ok(())
        })?;
        let retained = if migration.needs_backfill() {
            self.retained_events()?
        } else {
            FastMap::default()
        };
        let total = users.len() as u64;
        let mut out = Vec::new();
        let mut changes = std::mem::take(&mut self.scratch);
        self.members.clear();
        for (done, user) in users.into_iter().enumerate() {
            let entry = self.activate(&user)?;
            let before = entry.state.next_wakeup();
            migration.migrate(&mut entry.state, &user, now, &mut changes);
            if let Some(events) = retained.get(&user) {
                migration.backfill(&mut entry.state, &user, events, &mut changes);
            }
            let after = entry.state.next_wakeup();
            let segments: Vec<SegmentId> = plan.members(&entry.state).cloned().collect();
            self.retime(&user, before, after);
            for segment in segments {
                self.members
                    .entry(segment)
                    .or_default()
                    .insert(user.clone());
            }
            // The member index was rebuilt above; log without touching it again.
            for change in changes.drain(..) {
                let sequence = self.next_sequence;
                self.next_sequence += 1;
                let cursor = pb::Cursor {
                    shard: self.id,
                    epoch: self.epoch,
                    sequence,
                };
                let wire = change_to_wire(&change, cursor);
                self.unsaved_changes.push(sequence, wire.at_ms, &wire);
                out.push(Logged {
                    sequence,
                    change: wire,
                });
            }
            if done % 1024 == 1023 {
                progress(done as u64 + 1, total);
            }
        }
        progress(total, total);
        self.scratch = changes;
        self.plan = plan;
        Ok(out)
    }

    /// How many users would be in each of `segments` under `plan` now, without
    /// applying it: every user's state is migrated and backfilled on a copy,
    /// exactly as [`Shard::apply_rules`] would, and what that would emit is
    /// dropped. Nothing in the shard changes.
    pub fn preview(
        &self,
        plan: &Plan,
        segments: &[SegmentId],
        now: Timestamp,
    ) -> Result<Vec<u64>, StoreError> {
        let migration = plan.migration_from(&self.plan);
        let retained = if migration.needs_backfill() {
            self.retained_events()?
        } else {
            FastMap::default()
        };
        let mut counts = vec![0u64; segments.len()];
        let mut dropped = Vec::new();
        let mut count = |user: &UserId, mut state: UserState| {
            migration.migrate(&mut state, user, now, &mut dropped);
            if let Some(events) = retained.get(user) {
                migration.backfill(&mut state, user, events, &mut dropped);
            }
            dropped.clear();
            for (i, segment) in segments.iter().enumerate() {
                if plan.is_member(&state, segment.as_str()) {
                    counts[i] += 1;
                }
            }
        };
        // Active users' states are newer than their stored ones.
        self.store.visit_users(|user, record| {
            let user = UserId::from(user);
            if !self.users.contains_key(&user) {
                count(&user, record.state);
            }
            Ok(())
        })?;
        for (user, entry) in &self.users {
            count(user, entry.state.clone());
        }
        Ok(counts)
    }

    /// The segments `user` is in, or `None` when the shard has never seen them.
    pub fn user_segments(&self, user: &UserId) -> Result<Option<Vec<SegmentId>>, StoreError> {
        // A profile merged away (its state emptied) does not exist.
        if let Some(entry) = self.users.get(user) {
            return Ok(
                (!entry.state.is_new()).then(|| self.plan.members(&entry.state).cloned().collect())
            );
        }
        Ok(self
            .store
            .load_user(user.as_str())?
            .filter(|r| !r.state.is_new())
            .map(|r| self.plan.members(&r.state).cloned().collect()))
    }

    /// Segment `segment`'s rule evaluated for `user` at `now`, or `None` when
    /// the shard has never seen the user (or the plan has no such segment).
    pub fn explain(
        &self,
        user: &UserId,
        segment: &SegmentId,
        now: Timestamp,
    ) -> Result<Option<Explanation>, StoreError> {
        let stored;
        let state = match self.users.get(user) {
            Some(entry) => &entry.state,
            None => match self.store.load_user(user.as_str())? {
                Some(record) => {
                    stored = record.state;
                    &stored
                }
                None => return Ok(None),
            },
        };
        if state.is_new() {
            // Merged away into another profile: it no longer exists.
            return Ok(None);
        }
        Ok(self.plan.explain(state, segment.as_str(), now))
    }

    /// Up to `limit` members of `segment` after `after`, in user-id order.
    pub fn members_after(&self, segment: &str, after: &str, limit: usize) -> Vec<UserId> {
        let Some(members) = self.members.get(segment) else {
            return Vec::new();
        };
        members
            .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .take(limit)
            .cloned()
            .collect()
    }

    /// For `segments` (n of them): row-major n × n counts of users in both
    /// segments of each pair (the diagonal is each size), and the count of
    /// users in all of them. Each intersection walks the smaller set.
    pub fn overlap(&self, segments: &[SegmentId]) -> (Vec<u64>, u64) {
        let empty = BTreeSet::new();
        let sets: Vec<&BTreeSet<UserId>> = segments
            .iter()
            .map(|s| self.members.get(s).unwrap_or(&empty))
            .collect();
        let n = sets.len();
        let mut pairwise = vec![0u64; n * n];
        for i in 0..n {
            for j in i..n {
                let (small, large) = if sets[i].len() <= sets[j].len() {
                    (sets[i], sets[j])
                } else {
                    (sets[j], sets[i])
                };
                let both = small.iter().filter(|u| large.contains(*u)).count() as u64;
                pairwise[i * n + j] = both;
                pairwise[j * n + i] = both;
            }
        }
        let all = match sets.iter().min_by_key(|s| s.len()) {
            Some(smallest) => smallest
                .iter()
                .filter(|u| sets.iter().all(|s| s.contains(*u)))
                .count() as u64,
            None => 0,
        };
        (pairwise, all)
    }

    /// Members per segment.
    pub fn counts(&self) -> BTreeMap<SegmentId, u64> {
        self.plan
            .segment_ids()
            .map(|s| (s.clone(), self.size(s)))
            .collect()
    }

    /// Members of `segment` (0 for a segment the shard has none of).
    pub fn size(&self, segment: &SegmentId) -> u64 {
        self.members.get(segment).map_or(0, |m| m.len() as u64)
    }

    /// Number of users the shard has (active or stored).
    pub fn user_count(&self) -> u64 {
        self.user_count
    }

    /// Takes everything changed since the last checkpoint, for
    /// [`ShardStore::write_checkpoint`] (durable at the next `Store::sync`). Take
    /// only when every applied input is durable, so the checkpoint matches
    /// `replay_from`; write checkpoints in the order they were taken.
    pub fn take_checkpoint(&mut self, now: Timestamp) -> Checkpoint {
        // Merges taken out are kept for the dedupe horizon; pruning scans them
        // all, so it runs once a day.
        let prune_merged = day_of(now) != self.merged_pruned_day;
        if prune_merged {
            self.merged_pruned_day = day_of(now);
        }
        let mut users = Vec::with_capacity(self.dirty.len());
        let mut state = Vec::new();
        for user in self.dirty.drain(..) {
            if let Some(entry) = self.users.get_mut(&user) {
                entry.dirty = false;
                state.clear();
                entry.state.encode(&mut state);
                users.push((
                    user.as_str().as_bytes().to_vec(),
                    UserRecord::encode_parts(&state, entry.seen.stored()),
                ));
            }
        }
        Checkpoint {
            users,
            events: std::mem::take(&mut self.unsaved_events),
            changes: std::mem::take(&mut self.unsaved_changes),
            meta: ShardMeta {
                epoch: self.epoch,
                replay_from: self.replay_from,
                next_sequence: self.next_sequence,
                next_event: self.next_event,
                rule_version: self.plan.version().0,
            },
            expire_events_before_day: day_of(now.minus(self.event_retention())),
            expire_changes_before_ms: now.minus(self.config.change_retention).millis(),
            merged_out: std::mem::take(&mut self.merged_out).into_iter().collect(),
            expire_merged_before_ms: prune_merged
                .then(|| now.minus(self.config.dedupe_horizon).millis()),
        }
    }

    /// Gives back a checkpoint that could not be written: its users are dirty
    /// again and its events and changes go before the ones taken since.
    pub fn untake_checkpoint(&mut self, checkpoint: Checkpoint) {
        for (user, _) in checkpoint.users {
            let Ok(user) = std::str::from_utf8(&user) else {
                continue;
            };
            let user = UserId::from(user);
            if let Some(entry) = self.users.get_mut(&user)
                && !entry.dirty
            {
                entry.dirty = true;
                self.dirty.push(user);
            }
        }
        let mut events = checkpoint.events;
        events.append(&mut self.unsaved_events);
        self.unsaved_events = events;
        let mut changes = checkpoint.changes;
        changes.append(std::mem::take(&mut self.unsaved_changes));
        self.unsaved_changes = changes;
        for (merge_id, merged) in checkpoint.merged_out {
            self.merged_out.entry(merge_id).or_insert(merged);
        }
    }

    /// How long events are kept: the configured retention, and at least the
    /// longest window the rules use (SPEC.md section 4), so a new rule over a
    /// window already in use backfills exactly.
    pub fn event_retention(&self) -> Span {
        self.plan
            .longest_window()
            .map_or(self.config.event_retention, |w| {
                w.max(self.config.event_retention)
            })
    }

    /// Takes and writes a checkpoint (see [`Shard::take_checkpoint`]).
    pub fn checkpoint(&mut self, now: Timestamp) -> Result<(), StoreError> {
        let checkpoint = self.take_checkpoint(now);
        self.store.write_checkpoint(&checkpoint)
    }

    /// Drops clean users from memory, least recently used first, until at most
    /// `keep` are active. Their state is in the store; timers and member index
    /// entries stay, so they are woken and listed as before.
    pub fn passivate(&mut self, keep: usize) -> usize {
        if self.users.len() <= keep {
            return 0;
        }
        let mut clean: Vec<(u64, UserId)> = self
            .users
            .iter()
            .filter(|(_, e)| !e.dirty)
            .map(|(u, e)| (e.touched, u.clone()))
            .collect();
        clean.sort_unstable();
        let excess = self.users.len() - keep;
        let mut dropped = 0;
        for (_, user) in clean.into_iter().take(excess) {
            self.users.remove(&user);
            dropped += 1;
        }
        dropped
    }

    /// Approximate bytes the active users hold.
    pub fn memory_bytes(&self) -> usize {
        self.users
            .values()
            .map(|e| {
                96 + std::mem::size_of::<UserState>() + e.state.heap_bytes() + e.seen.heap_bytes()
            })
            .sum::<usize>()
            + 64 * self.timers.len()
    }

    /// The store of this shard.
    pub fn store(&self) -> &ShardStore {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynseg_proto::encoded;
    use dynseg_rules::{Limits, Properties, RuleVersion, SegmentDef, Value};

    fn plan(rules: &[(&str, &str)], version: u64) -> Arc<Plan> {
        let defs: Vec<_> = rules.iter().map(|(id, r)| SegmentDef::new(id, r)).collect();
        Arc::new(Plan::compile(&defs, RuleVersion(version), &Limits::default()).unwrap())
    }

    fn t(s: &str) -> Timestamp {
        Timestamp::parse_rfc3339(s).unwrap()
    }

    fn order(id: &str, user: &str, at: Timestamp) -> Event {
        let props: Properties = [("revenue", Value::Number(100.0))].into_iter().collect();
        Event::track(id, user, "order_completed", at, props)
    }

    /// Applies events as the runtime does: carried by a write-ahead log record.
    fn apply(
        shard: &mut Shard,
        now: Timestamp,
        events: &[Event],
    ) -> Result<BatchOutcome, StoreError> {
        let record = crate::record::WalRecord {
            shard: shard.id(),
            now_ms: now.millis(),
            input: Some(crate::record::Input::Batch(encoded::EventBatch {
                shard: shard.id(),
                epoch: shard.epoch(),
                events: events
                    .iter()
                    .map(|e| encoded::encode(&pb::Event::from(e)))
                    .collect(),
            })),
        };
        shard.apply_batch(now, events, record.to_bytes().into())
    }

    fn summary(changes: &[Logged]) -> Vec<(u64, String, String, i32)> {
        changes
            .iter()
            .map(|l| {
                (
                    l.sequence,
                    l.change.user_id.clone(),
                    l.change.segment.clone(),
                    l.change.kind,
                )
            })
            .collect()
    }

    fn open(dir: &std::path::Path, p: Arc<Plan>) -> (crate::store::Store, Shard) {
        let store = crate::store::Store::open(dir, 1 << 20, &dir.join("wal")).unwrap();
        let shard = Shard::open(3, store.shard(3).unwrap(), p, ShardConfig::default()).unwrap();
        (store, shard)
    }

    #[test]
    fn retained_batches_stay_in_log_order_when_the_clock_steps_back_a_day() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(&[("buyers", "exists(order_completed)")], 1);
        let (_store, mut shard) = open(dir.path(), p);
        let later = t("2026-01-02T00:10:00Z");
        let earlier = t("2026-01-01T23:50:00Z");
        let first = apply(&mut shard, later, &[order("o1", "alice", later)]).unwrap();
        let second = apply(&mut shard, earlier, &[order("o2", "bob", earlier)]).unwrap();
        let (a, b) = (
            Lsn {
                segment: 4,
                offset: 0,
            },
            Lsn {
                segment: 5,
                offset: 0,
            },
        );
        shard.batch_logged(first.batch, a);
        shard.batch_logged(second.batch, b);
        shard.checkpoint(later).unwrap();
        // Keyed by the day the clock showed, the second batch would come
        // first, and the log could be cut after the first batch's segment.
        assert_eq!(shard.store().first_logged().unwrap(), Some(a));
        assert_eq!(
            shard.store().last_retained_day().unwrap(),
            Some(day_of(later))
        );
    }

    #[test]
    fn merges_answer_repeats_the_same_across_checkpoints_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(&[("buyers", "exists(order_completed)")], 1);
        let now = t("2026-01-01T00:00:00Z");
        let (merged, first_exits) = {
            let (_store, mut shard) = open(dir.path(), p.clone());
            apply(&mut shard, now, &[order("o1", "anon", now)]).unwrap();
            let first = shard.merge_out(now, &UserId::from("anon"), "m1").unwrap();
            assert!(first.merged.found);
            // A repeat before the checkpoint: the same answer, no change.
            let repeat = shard.merge_out(now, &UserId::from("anon"), "m1").unwrap();
            assert_eq!(
                (repeat.merged.clone(), repeat.changes.len()),
                (first.merged.clone(), 0)
            );
            assert_eq!(shard.user_segments(&UserId::from("anon")).unwrap(), None);
            // Into ann, once.
            let state = UserState::decode(&first.merged.state).unwrap();
            let (applied, changes) = shard
                .merge_in(now, &UserId::from("ann"), "m1", &state)
                .unwrap();
            assert!(applied);
            assert_eq!(summary(&changes)[0].1, "ann");
            let (again, none) = shard
                .merge_in(now, &UserId::from("ann"), "m1", &state)
                .unwrap();
            assert!(!again && none.is_empty());
            shard.checkpoint(now).unwrap();
            (first.merged, summary(&first.changes))
        };
        assert_eq!(first_exits.len(), 1);
        // Reopened from the checkpoint: the repeat reads the stored answer.
        let (_store, mut shard) = open(dir.path(), p);
        let repeat = shard.merge_out(now, &UserId::from("anon"), "m1").unwrap();
        assert_eq!((repeat.merged, repeat.changes.len()), (merged.clone(), 0));
        let state = UserState::decode(&merged.state).unwrap();
        let (again, _) = shard
            .merge_in(now, &UserId::from("ann"), "m1", &state)
            .unwrap();
        assert!(!again, "the merge id is kept with ann's message ids");
        assert_eq!(
            shard.user_segments(&UserId::from("ann")).unwrap(),
            Some(vec![SegmentId::from("buyers")])
        );
        // A profile that never existed merges out as not found, and its next
        // event starts it afresh.
        let none = shard.merge_out(now, &UserId::from("ghost"), "m2").unwrap();
        assert!(!none.merged.found && none.changes.is_empty());
        let later = apply(&mut shard, now, &[order("o2", "anon", now)]).unwrap();
        assert_eq!(
            summary(&later.changes).len(),
            1,
            "anon starts again and enters"
        );
    }

    #[test]
    fn merges_replay_from_the_log_exactly_as_they_ran() {
        // Runs the inputs through the write-ahead log path on a fresh shard,
        // then again on another (a crash before any checkpoint, replayed):
        // the same changes with the same sequences, the same state handed over.
        let p = plan(&[("buyers", "exists(order_completed)")], 1);
        let now = t("2026-01-01T00:00:00Z");
        let batch = crate::record::WalRecord {
            shard: 3,
            now_ms: now.millis(),
            input: Some(crate::record::Input::Batch(encoded::EventBatch {
                shard: 3,
                epoch: 0,
                events: vec![encoded::encode(&pb::Event::from(&order("o1", "anon", now)))],
            })),
        };
        let out = crate::record::WalRecord {
            shard: 3,
            now_ms: now.millis() + 1,
            input: Some(crate::record::Input::MergeOut(pb::MergeOutRequest {
                shard: 3,
                user_id: "anon".into(),
                into: "ann".into(),
                merge_id: "m1".into(),
                ..Default::default()
            })),
        };
        let run = || {
            let dir = tempfile::tempdir().unwrap();
            let (_store, mut shard) = open(dir.path(), p.clone());
            let mut all = Vec::new();
            for record in [&batch, &out] {
                let bytes = record.to_bytes().into();
                all.extend(summary(
                    &crate::runtime::apply_input(&mut shard, record, &bytes).unwrap(),
                ));
            }
            let merged = shard
                .merge_out(now, &UserId::from("anon"), "m1")
                .unwrap()
                .merged;
            let into = crate::record::WalRecord {
                shard: 3,
                now_ms: now.millis() + 2,
                input: Some(crate::record::Input::MergeIn(pb::MergeInRequest {
                    shard: 3,
                    user_id: "ann".into(),
                    from: "anon".into(),
                    merge_id: "m1".into(),
                    state: merged.state.clone(),
                    rule_version: 1,
                    ..Default::default()
                })),
            };
            let bytes = into.to_bytes().into();
            all.extend(summary(
                &crate::runtime::apply_input(&mut shard, &into, &bytes).unwrap(),
            ));
            (all, merged)
        };
        let (first, merged) = run();
        assert_eq!(
            first
                .iter()
                .map(|(seq, user, _, kind)| (*seq, user.as_str(), *kind))
                .collect::<Vec<_>>(),
            vec![
                (1, "anon", pb::ChangeKind::Enter as i32),
                (2, "anon", pb::ChangeKind::Exit as i32),
                (3, "ann", pb::ChangeKind::Enter as i32),
            ]
        );
        assert!(merged.found);
        assert_eq!(run(), (first, merged));
    }

    #[test]
    fn overlap_counts_each_pair_and_all() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, mut shard) = open(
            dir.path(),
            plan(
                &[("a", "exists(a)"), ("b", "exists(b)"), ("c", "exists(c)")],
                1,
            ),
        );
        let now = t("2026-01-01T00:00:00Z");
        let event =
            |id: &str, user: &str, name: &str| Event::track(id, user, name, now, Properties::new());
        // u1 {a}, u2 {a, b}, u3 {a, b, c}, u4 {b, c}, u5 {c}.
        let events = [
            event("1", "u1", "a"),
            event("2", "u2", "a"),
            event("3", "u2", "b"),
            event("4", "u3", "a"),
            event("5", "u3", "b"),
            event("6", "u3", "c"),
            event("7", "u4", "b"),
            event("8", "u4", "c"),
            event("9", "u5", "c"),
        ];
        apply(&mut shard, now, &events).unwrap();
        let ids: Vec<SegmentId> = ["a", "b", "c"].map(SegmentId::from).to_vec();
        let (pairwise, all) = shard.overlap(&ids);
        assert_eq!(pairwise, vec![3, 2, 1, 2, 3, 2, 1, 2, 3]);
        assert_eq!(all, 1);
        let (pairwise, all) = shard.overlap(&ids[..2]);
        assert_eq!((pairwise, all), (vec![3, 2, 2, 3], 2));
    }

    #[test]
    fn batches_produce_sequenced_changes_and_repeats_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, mut shard) = open(
            dir.path(),
            plan(&[("buyer", "count(order_completed) in last 1d >= 1")], 1),
        );
        let now = t("2026-01-01T00:00:00Z");
        let out = apply(
            &mut shard,
            now,
            &[
                order("m1", "alice", now),
                order("m1", "alice", now),
                order("m2", "bob", now),
            ],
        )
        .unwrap();
        assert_eq!((out.applied, out.duplicates), (2, 1));
        assert_eq!(
            summary(&out.changes),
            vec![
                (1, "alice".into(), "buyer".into(), 1),
                (2, "bob".into(), "buyer".into(), 1)
            ]
        );
        // A repeat in a later batch is still a repeat.
        let again = apply(&mut shard, now, &[order("m2", "bob", now)]).unwrap();
        assert_eq!((again.applied, again.duplicates), (0, 1));
        assert_eq!(shard.counts()[&SegmentId::from("buyer")], 2);
        assert_eq!(shard.next_timer(), Some(now.plus(Span::days(1))));
        // Time alone: both leave a day later, in user order.
        let exits = shard.tick(now.plus(Span::days(1))).unwrap();
        assert_eq!(
            summary(&exits),
            vec![
                (3, "alice".into(), "buyer".into(), 2),
                (4, "bob".into(), "buyer".into(), 2)
            ]
        );
        assert_eq!(shard.next_timer(), None);
    }

    #[test]
    fn a_batch_of_several_prefetch_runs_applies_as_its_events_one_by_one() {
        let rules = [("buyer", "count(order_completed) in last 1d >= 2")];
        let now = t("2026-01-01T00:00:00Z");
        // 50 events over 7 users: more than three runs, with repeats of a
        // message id inside a run, across runs, and of a user's first event.
        let events: Vec<Event> = (0..50u32)
            .map(|i| {
                let id = if i % 9 == 8 { i - 5 } else { i };
                order(&format!("m{id}"), &format!("user{}", id % 7), now)
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let (_store, mut whole) = open(dir.path(), plan(&rules, 1));
        let together = apply(&mut whole, now, &events).unwrap();
        let other = tempfile::tempdir().unwrap();
        let (_store, mut single) = open(other.path(), plan(&rules, 1));
        let (mut applied, mut duplicates, mut changes) = (0, 0, Vec::new());
        for event in &events {
            let out = apply(&mut single, now, std::slice::from_ref(event)).unwrap();
            applied += out.applied;
            duplicates += out.duplicates;
            changes.extend(out.changes);
        }
        assert!(events.len() > 3 * PREFETCH_RUN);
        assert_eq!(
            (together.applied, together.duplicates),
            (applied, duplicates)
        );
        assert_eq!(duplicates, 5);
        assert_eq!(summary(&together.changes), summary(&changes));
        assert_eq!(whole.counts(), single.counts());
    }

    #[test]
    fn batches_applied_as_parts_of_one_count_each_parts_repeats() {
        let rules = [("buyer", "count(order_completed) in last 1d >= 2")];
        let now = t("2026-01-01T00:00:00Z");
        // 40 events over 5 users, repeats within parts and across them.
        let events: Vec<Event> = (0..40u32)
            .map(|i| {
                let id = if i % 7 == 6 { i - 4 } else { i };
                order(&format!("m{id}"), &format!("user{}", id % 5), now)
            })
            .collect();
        // Parts of 0, 9, 1, 14 (two prefetch runs) and 16 events.
        let ends = [0, 9, 10, 24, 40];
        let dir = tempfile::tempdir().unwrap();
        let (_store, mut whole) = open(dir.path(), plan(&rules, 1));
        let record = bytes::Bytes::from_static(b"");
        let (together, per_part) = whole
            .apply_batch_parts(now, &events, &ends, record)
            .unwrap();
        let other = tempfile::tempdir().unwrap();
        let (_store, mut apart) = open(other.path(), plan(&rules, 1));
        let mut starts = vec![0];
        starts.extend_from_slice(&ends[..ends.len() - 1]);
        let mut changes = Vec::new();
        let mut duplicates = Vec::new();
        for (&start, &end) in starts.iter().zip(&ends) {
            let out = apply(&mut apart, now, &events[start..end]).unwrap();
            duplicates.push(out.duplicates);
            changes.extend(out.changes);
        }
        assert_eq!(per_part, duplicates);
        assert_eq!(per_part.iter().sum::<u32>(), together.duplicates);
        assert!(
            duplicates.iter().filter(|&&d| d > 0).count() >= 2,
            "{duplicates:?}"
        );
        assert_eq!(summary(&together.changes), summary(&changes));
        assert_eq!(whole.counts(), apart.counts());
    }

    #[test]
    fn repeats_are_forgotten_after_the_horizon() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, mut shard) = open(dir.path(), plan(&[], 1));
        let now = t("2026-01-01T00:00:00Z");
        assert_eq!(
            apply(&mut shard, now, &[order("m1", "alice", now)])
                .unwrap()
                .applied,
            1
        );
        let later = now.plus(Span::days(6));
        assert_eq!(
            apply(&mut shard, later, &[order("m1", "alice", later)])
                .unwrap()
                .duplicates,
            1
        );
        let much_later = now.plus(Span::days(9));
        assert_eq!(
            apply(&mut shard, much_later, &[order("m1", "alice", much_later)])
                .unwrap()
                .applied,
            1
        );
    }

    #[test]
    fn checkpointed_state_reopens_identically_and_passivated_users_wake() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(&[("buyer", "count(order_completed) in last 1d >= 1")], 1);
        let now = t("2026-01-01T00:00:00Z");
        {
            let (store, mut shard) = open(dir.path(), p.clone());
            apply(&mut shard, now, &[order("m1", "alice", now)]).unwrap();
            shard.applied_record(Lsn {
                segment: 0,
                offset: 41,
            });
            shard.checkpoint(now).unwrap();
            assert_eq!(shard.passivate(0), 1);
            assert_eq!(shard.active_users(), 0);
            // A passivated user still lists, looks up, and wakes.
            assert_eq!(
                shard.members_after("buyer", "", 10),
                vec![UserId::from("alice")]
            );
            assert_eq!(
                shard.user_segments(&UserId::from("alice")).unwrap(),
                Some(vec![SegmentId::from("buyer")])
            );
            store.sync().unwrap();
        }
        let (_store, mut shard) = open(dir.path(), p);
        assert_eq!(
            shard.replay_from(),
            Lsn {
                segment: 0,
                offset: 42
            }
        );
        assert_eq!(shard.last_sequence(), 1);
        assert_eq!(shard.next_timer(), Some(now.plus(Span::days(1))));
        let exits = shard.tick(now.plus(Span::days(2))).unwrap();
        assert_eq!(
            summary(&exits),
            vec![(2, "alice".into(), "buyer".into(), 2)]
        );
        // The dedupe memory came back with the state.
        assert_eq!(
            apply(&mut shard, now, &[order("m1", "alice", now)])
                .unwrap()
                .duplicates,
            1
        );
    }

    #[test]
    fn a_checkpoint_writes_each_changed_user_once_and_only_clean_users_passivate() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(&[("buyer", "count(order_completed) in last 1d >= 1")], 1);
        let now = t("2026-01-01T00:00:00Z");
        let (_store, mut shard) = open(dir.path(), p);
        let written = |cp: &Checkpoint| {
            let mut users: Vec<String> = cp
                .users
                .iter()
                .map(|(u, _)| String::from_utf8(u.clone()).unwrap())
                .collect();
            users.sort();
            users
        };
        apply(
            &mut shard,
            now,
            &[order("m1", "alice", now), order("m2", "bob", now)],
        )
        .unwrap();
        apply(&mut shard, now, &[order("m3", "alice", now)]).unwrap();
        let first = shard.take_checkpoint(now);
        assert_eq!(written(&first), ["alice", "bob"]);
        // Nothing changed since: nothing to write, and both may passivate.
        assert!(shard.take_checkpoint(now).users.is_empty());

        // Changed again after the checkpoint: dirty again, and kept active.
        apply(&mut shard, now, &[order("m4", "bob", now)]).unwrap();
        assert_eq!(shard.passivate(0), 1, "only alice is clean");
        assert_eq!(shard.active_users(), 1);
        let second = shard.take_checkpoint(now);
        assert_eq!(written(&second), ["bob"]);

        // A checkpoint that could not be written makes its users dirty again,
        // once each even if they changed meanwhile.
        apply(&mut shard, now, &[order("m5", "bob", now)]).unwrap();
        shard.untake_checkpoint(second);
        assert_eq!(shard.passivate(0), 0);
        assert_eq!(written(&shard.take_checkpoint(now)), ["bob"]);
    }

    #[test]
    fn rule_changes_backfill_from_retained_events() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, mut shard) = open(dir.path(), plan(&[], 1));
        let now = t("2026-01-01T00:00:00Z");
        apply(
            &mut shard,
            now,
            &[
                order("m1", "alice", now.minus(Span::hours(2))),
                order("m2", "alice", now),
                order("m3", "bob", now),
            ],
        )
        .unwrap();
        shard.checkpoint(now).unwrap();
        let mut reported = Vec::new();
        let changes = shard
            .apply_rules(
                plan(&[("repeat", "count(order_completed) in last 1d >= 2")], 2),
                now,
                |d, t| reported.push((d, t)),
            )
            .unwrap();
        assert_eq!(
            summary(&changes),
            vec![(1, "alice".into(), "repeat".into(), 1)]
        );
        assert_eq!(changes[0].change.rule_version, 2);
        assert_eq!(reported.last(), Some(&(2, 2)));
        assert_eq!(shard.counts()[&SegmentId::from("repeat")], 1);
    }

    #[test]
    fn backfill_leaves_out_exactly_the_repeats_ingest_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, mut shard) = open(dir.path(), plan(&[], 1));
        let now = t("2026-01-01T00:00:00Z");
        let later = now.plus(Span::days(8));
        assert_eq!(
            apply(&mut shard, now, &[order("m1", "alice", now)])
                .unwrap()
                .applied,
            1
        );
        // A repeat within the horizon is ignored; one after it counts again.
        assert_eq!(
            apply(&mut shard, now, &[order("m1", "alice", now)])
                .unwrap()
                .duplicates,
            1
        );
        assert_eq!(
            apply(&mut shard, later, &[order("m1", "alice", later)])
                .unwrap()
                .applied,
            1
        );
        let changes = shard
            .apply_rules(
                plan(
                    &[
                        ("twice", "count(order_completed) >= 2"),
                        ("thrice", "count(order_completed) >= 3"),
                    ],
                    2,
                ),
                later,
                |_, _| {},
            )
            .unwrap();
        assert_eq!(
            summary(&changes),
            vec![(1, "alice".into(), "twice".into(), 1)]
        );
    }

    #[test]
    fn message_hashes_are_fixed() {
        assert_eq!(
            message_hash(""),
            0x6c62_272e_07bb_0142_62b8_2175_6295_c58d >> 32
        );
        assert_ne!(message_hash("m1"), message_hash("m2"));
    }
}
