//! Per-user aggregate state ("cells") and its compact storage.
//!
//! A cell is the state one aggregate needs for one user, shared by every reader
//! that can be answered from it (see `plan`). All cells of a user live in one
//! [`CellArena`]: a single `Vec<u64>` of records `[header, payload...]`, sorted by
//! cell id, where the header holds the cell id and the payload length. A user pays
//! only for the cells it has data in, and one allocation holds them all.
//!
//! Payload layouts (timestamps and f64 values stored as their 64 bits):
//!
//! | kind | payload |
//! |---|---|
//! | `Counter` | `[count]` |
//! | `MaxTs`, `MinTs` | `[timestamp]` |
//! | `Recent`, `Anchor` | `[t0, t1, ...]` ascending, at most `cap` of the newest |
//! | `SumTotal` | `[count, partial0, partial1, ...]`: an [`ExactSum`]'s partials |
//! | `SumWindow` | `[t0, v0, t1, v1, ...]` ascending by time |
//! | `Extreme` | `[value]` |
//! | `Staircase` | `[t0, v0, ...]` ascending by time, values strictly improving |
//!
//! `distinct` keeps arbitrary values, so its cells live outside the arena in
//! [`DistinctCell`]s.

use crate::exact_sum::ExactSum;
use crate::time::Timestamp;
use crate::value::{Value, ValueKey};

/// Which state a cell keeps, chosen by the compiler from the aggregate and its
/// window class (whole history, or a suffix of it that slides).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum CellKind {
    /// Number of events (lifetime and absolute windows).
    Counter,
    /// Latest event time (`last_seen` and `exists`, any window).
    MaxTs,
    /// Earliest event time (`first_seen`, lifetime and absolute windows).
    MinTs,
    /// The newest timestamps, at most `cap` (`count` and `first_seen` over
    /// sliding windows).
    Recent,
    /// The newest timestamps of an anchor event (`since the Nth most recent X`).
    Anchor,
    /// Exact sum and count of a property (lifetime and absolute windows).
    SumTotal,
    /// Time and value of every event still inside a sliding window.
    SumWindow,
    /// Least (`max == false`) or greatest value ever (lifetime and absolute).
    Extreme {
        /// Greatest instead of least.
        max: bool,
    },
    /// The values that can still become the least (or greatest) as the window
    /// slides: an entry is dropped once a newer entry is at least as good.
    Staircase {
        /// Greatest instead of least.
        max: bool,
    },
    /// Distinct values ever seen, at most `cap`.
    DistinctAll,
    /// Distinct values with the time each was last seen, at most `cap` of the
    /// most recently seen.
    DistinctRecent,
}

impl CellKind {
    /// True when the kind keeps per-event times that a sliding window prunes.
    pub(crate) fn is_suffix(self) -> bool {
        matches!(
            self,
            CellKind::Recent
                | CellKind::SumWindow
                | CellKind::Staircase { .. }
                | CellKind::DistinctRecent
        )
    }

    /// True when the kind lives in a [`DistinctCell`] rather than the arena.
    pub(crate) fn is_distinct(self) -> bool {
        matches!(self, CellKind::DistinctAll | CellKind::DistinctRecent)
    }
}

fn ts_word(t: Timestamp) -> u64 {
    t.millis() as u64
}

fn word_ts(w: u64) -> Timestamp {
    Timestamp(w as i64)
}

/// The records of one user's cells; see the module documentation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CellArena {
    words: Vec<u64>,
}

impl CellArena {
    fn header(cell: u32, len: usize) -> u64 {
        (u64::from(cell) << 32) | len as u64
    }

    /// The payload range of `cell`'s record, or where a record for it would go.
    fn locate(&self, cell: u32) -> Result<(usize, usize), usize> {
        let mut at = 0;
        while at < self.words.len() {
            let header = self.words[at];
            let id = (header >> 32) as u32;
            let len = (header & 0xffff_ffff) as usize;
            if id == cell {
                return Ok((at + 1, len));
            }
            if id > cell {
                return Err(at);
            }
            at += 1 + len;
        }
        Err(at)
    }

    /// The payload of `cell`; empty when the cell holds nothing.
    pub(crate) fn get(&self, cell: u32) -> &[u64] {
        match self.locate(cell) {
            Ok((start, len)) => &self.words[start..start + len],
            Err(_) => &[],
        }
    }

    /// Replaces `cell`'s payload (an empty payload removes the record).
    pub(crate) fn set(&mut self, cell: u32, payload: &[u64]) {
        match self.locate(cell) {
            Ok((start, len)) if payload.is_empty() => {
                self.words.drain(start - 1..start + len);
            }
            Ok((start, len)) => {
                self.words[start - 1] = Self::header(cell, payload.len());
                if len == payload.len() {
                    self.words[start..start + len].copy_from_slice(payload);
                } else {
                    self.words
                        .splice(start..start + len, payload.iter().copied());
                }
            }
            Err(_) if payload.is_empty() => {}
            Err(at) => {
                let record = std::iter::once(Self::header(cell, payload.len()))
                    .chain(payload.iter().copied());
                self.words.splice(at..at, record);
            }
        }
    }

    /// Inserts `new` into `cell`'s payload at word `offset` (creating the record).
    pub(crate) fn insert_at(&mut self, cell: u32, offset: usize, new: &[u64]) {
        match self.locate(cell) {
            Ok((start, len)) => {
                self.words[start - 1] = Self::header(cell, len + new.len());
                let at = start + offset;
                self.words.splice(at..at, new.iter().copied());
            }
            Err(at) => {
                let record =
                    std::iter::once(Self::header(cell, new.len())).chain(new.iter().copied());
                self.words.splice(at..at, record);
            }
        }
    }

    /// Removes the first `count` words of `cell`'s payload.
    pub(crate) fn remove_front(&mut self, cell: u32, count: usize) {
        if let Ok((start, len)) = self.locate(cell) {
            if count >= len {
                self.words.drain(start - 1..start + len);
            } else if count > 0 {
                self.words[start - 1] = Self::header(cell, len - count);
                self.words.drain(start..start + count);
            }
        }
    }

    /// Mutable payload of `cell` when its length does not change.
    pub(crate) fn get_mut(&mut self, cell: u32) -> Option<&mut [u64]> {
        let (start, len) = self.locate(cell).ok()?;
        Some(&mut self.words[start..start + len])
    }

    /// Bytes held on the heap.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.words.capacity() * 8
    }

    /// Frees slack capacity left by pruning.
    pub(crate) fn shrink(&mut self) {
        if self.words.capacity() > self.words.len() + 4 {
            self.words.shrink_to_fit();
        }
    }

    /// The ids of cells that hold data.
    pub(crate) fn cell_ids(&self) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut at = 0;
        while at < self.words.len() {
            let header = self.words[at];
            ids.push((header >> 32) as u32);
            at += 1 + (header & 0xffff_ffff) as usize;
        }
        ids
    }
}

/// The newest timestamps, ascending, at most `cap`; keeps what `count >= k` needs
/// for any `k <= cap` over any window that is a suffix of time.
pub(crate) mod recent {
    use super::*;

    /// Inserts `t`, keeping only the `cap` newest (`None`: unbounded).
    pub(crate) fn insert(arena: &mut CellArena, cell: u32, cap: Option<u32>, t: Timestamp) {
        let old = arena.get(cell);
        let at = old.partition_point(|w| word_ts(*w) <= t);
        let cap = cap.map_or(usize::MAX, |c| c as usize);
        if old.len() >= cap {
            if at == 0 || cap == 0 {
                return; // older than every kept timestamp of a full cell
            }
            // Drop the oldest, shift the older part down, insert.
            if let Some(words) = arena.get_mut(cell) {
                words.copy_within(1..at, 0);
                words[at - 1] = ts_word(t);
            }
            return;
        }
        arena.insert_at(cell, at, &[ts_word(t)]);
    }

    /// Number of kept timestamps at or after `lower`.
    pub(crate) fn count_from(words: &[u64], lower: Timestamp) -> usize {
        words.len() - first_from(words, lower)
    }

    /// Index of the first kept timestamp at or after `lower`.
    pub(crate) fn first_from(words: &[u64], lower: Timestamp) -> usize {
        words.partition_point(|w| word_ts(*w) < lower)
    }

    /// The earliest kept timestamp at or after `lower`.
    pub(crate) fn earliest_from(words: &[u64], lower: Timestamp) -> Option<Timestamp> {
        words.get(first_from(words, lower)).map(|w| word_ts(*w))
    }

    /// The `nth` newest (1-based), or the oldest when fewer are kept.
    pub(crate) fn nth_newest_or_oldest(words: &[u64], nth: u32) -> Option<Timestamp> {
        let n = nth as usize;
        let idx = words.len().saturating_sub(n);
        words.get(idx).map(|w| word_ts(*w))
    }

    /// Drops timestamps before `bound`.
    pub(crate) fn prune(arena: &mut CellArena, cell: u32, bound: Timestamp) {
        let words = arena.get(cell);
        let cut = first_from(words, bound);
        arena.remove_front(cell, cut);
    }
}

/// A single timestamp: the latest (`MaxTs`) or the earliest (`MinTs`).
pub(crate) mod extreme_ts {
    use super::*;

    /// Keeps the later (or earlier, when `min`) of the stored time and `t`.
    pub(crate) fn insert(arena: &mut CellArena, cell: u32, min: bool, t: Timestamp) {
        match arena.get_mut(cell) {
            Some([w]) => {
                let old = word_ts(*w);
                if (min && t < old) || (!min && t > old) {
                    *w = ts_word(t);
                }
            }
            _ => arena.set(cell, &[ts_word(t)]),
        }
    }

    /// The stored time.
    pub(crate) fn get(words: &[u64]) -> Option<Timestamp> {
        words.first().map(|w| word_ts(*w))
    }
}

/// A plain event counter.
pub(crate) mod counter {
    use super::*;

    /// Adds one.
    pub(crate) fn increment(arena: &mut CellArena, cell: u32) {
        match arena.get_mut(cell) {
            Some([n]) => *n = n.saturating_add(1),
            _ => arena.set(cell, &[1]),
        }
    }

    /// The count.
    pub(crate) fn get(words: &[u64]) -> u64 {
        words.first().copied().unwrap_or(0)
    }
}

/// Exact lifetime sum and count.
pub(crate) mod sum_total {
    use super::*;

    /// Adds `x`.
    pub(crate) fn insert(arena: &mut CellArena, cell: u32, x: f64) {
        let (count, mut sum) = get(arena.get(cell));
        sum.add(x);
        let mut words = vec![count + 1];
        words.extend(sum.partials().iter().map(|p| p.to_bits()));
        arena.set(cell, &words);
    }

    /// The count and the exact sum.
    pub(crate) fn get(words: &[u64]) -> (u64, ExactSum) {
        match words.split_first() {
            Some((count, partials)) => (
                *count,
                ExactSum::from_partials(partials.iter().map(|p| f64::from_bits(*p))),
            ),
            None => (0, ExactSum::new()),
        }
    }
}

/// Every (time, value) pair still inside a sliding window.
pub(crate) mod sum_window {
    use super::*;

    /// Inserts `(t, x)` in time order.
    pub(crate) fn insert(arena: &mut CellArena, cell: u32, t: Timestamp, x: f64) {
        let old = arena.get(cell);
        let pairs = old.len() / 2;
        let at = partition_pairs(old, pairs, |pt| pt <= t);
        arena.insert_at(cell, 2 * at, &[ts_word(t), x.to_bits()]);
    }

    /// Count and exact sum of the values at or after `lower`.
    pub(crate) fn sum_from(words: &[u64], lower: Timestamp) -> (u64, ExactSum) {
        let start = first_pair_from(words, lower);
        let mut sum = ExactSum::new();
        let mut count = 0;
        for pair in words[2 * start..].chunks_exact(2) {
            sum.add(f64::from_bits(pair[1]));
            count += 1;
        }
        (count, sum)
    }

    /// Drops pairs before `bound`.
    pub(crate) fn prune(arena: &mut CellArena, cell: u32, bound: Timestamp) {
        prune_pairs(arena, cell, bound);
    }
}

/// Binary search over `[t, v]` pairs: the number of leading pairs whose time
/// satisfies `pred`.
fn partition_pairs(words: &[u64], pairs: usize, pred: impl Fn(Timestamp) -> bool) -> usize {
    let (mut lo, mut hi) = (0, pairs);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if pred(word_ts(words[2 * mid])) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Index of the first pair at or after `lower`.
pub(crate) fn first_pair_from(words: &[u64], lower: Timestamp) -> usize {
    partition_pairs(words, words.len() / 2, |t| t < lower)
}

/// The earliest pair time at or after `lower`.
pub(crate) fn earliest_pair_from(words: &[u64], lower: Timestamp) -> Option<Timestamp> {
    words
        .get(2 * first_pair_from(words, lower))
        .map(|w| word_ts(*w))
}

fn prune_pairs(arena: &mut CellArena, cell: u32, bound: Timestamp) {
    let words = arena.get(cell);
    let cut = first_pair_from(words, bound);
    arena.remove_front(cell, 2 * cut);
}

/// The least or greatest value over the whole history.
pub(crate) mod extreme {
    use super::*;

    /// Keeps the better of the stored value and `x`.
    pub(crate) fn insert(arena: &mut CellArena, cell: u32, max: bool, x: f64) {
        match arena.get_mut(cell) {
            Some([w]) => {
                let old = f64::from_bits(*w);
                if (max && x > old) || (!max && x < old) {
                    *w = x.to_bits();
                }
            }
            _ => arena.set(cell, &[x.to_bits()]),
        }
    }

    /// The stored value.
    pub(crate) fn get(words: &[u64]) -> Option<f64> {
        words.first().map(|w| f64::from_bits(*w))
    }
}

/// The least or greatest value over a window that slides: pairs ascending by time,
/// each kept only while no newer pair is at least as good. Along the list the values
/// therefore get strictly worse, and the first pair inside the window is the answer.
pub(crate) mod staircase {
    use super::*;

    fn better_or_equal(max: bool, a: f64, b: f64) -> bool {
        if max { a >= b } else { a <= b }
    }

    /// Inserts `(t, x)` unless a pair at least as new is at least as good, and
    /// drops the pairs it makes useless.
    pub(crate) fn insert(arena: &mut CellArena, cell: u32, max: bool, t: Timestamp, x: f64) {
        let old = arena.get(cell);
        let dominated = old
            .chunks_exact(2)
            .any(|p| word_ts(p[0]) >= t && better_or_equal(max, f64::from_bits(p[1]), x));
        if dominated {
            return;
        }
        let mut new = Vec::with_capacity(old.len() + 2);
        let mut placed = false;
        for p in old.chunks_exact(2) {
            let (pt, pv) = (word_ts(p[0]), f64::from_bits(p[1]));
            if pt <= t && better_or_equal(max, x, pv) {
                continue; // the new pair is newer and at least as good
            }
            if !placed && pt > t {
                new.extend([ts_word(t), x.to_bits()]);
                placed = true;
            }
            new.extend_from_slice(p);
        }
        if !placed {
            new.extend([ts_word(t), x.to_bits()]);
        }
        arena.set(cell, &new);
    }

    /// The best value among pairs at or after `lower`.
    pub(crate) fn best_from(words: &[u64], lower: Timestamp) -> Option<f64> {
        words
            .get(2 * first_pair_from(words, lower) + 1)
            .map(|w| f64::from_bits(*w))
    }

    /// Drops pairs before `bound`.
    pub(crate) fn prune(arena: &mut CellArena, cell: u32, bound: Timestamp) {
        prune_pairs(arena, cell, bound);
    }
}

/// Distinct values of a property, each with the last time it was seen.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct DistinctCell {
    /// `(value, last seen)`, in no particular order.
    entries: Vec<(ValueKey, Timestamp)>,
}

impl DistinctCell {
    /// Records `value` seen at `t`, keeping at most `cap` values: the most recently
    /// seen ones (for lifetime cells every time is `Timestamp::MIN`, so the first
    /// `cap` values stay, which is all a lifetime `distinct >= k` needs).
    pub(crate) fn insert(&mut self, value: &Value, t: Timestamp, cap: Option<u32>) {
        if let Some(entry) = self.entries.iter_mut().find(|(v, _)| v.0 == *value) {
            entry.1 = entry.1.max(t);
            return;
        }
        let cap = cap.map_or(usize::MAX, |c| c as usize);
        if self.entries.len() >= cap {
            // Replace the least recently seen value if this one is more recent.
            let Some((oldest, _)) = self.entries.iter().enumerate().min_by_key(|(_, (_, t))| *t)
            else {
                return;
            };
            if self.entries[oldest].1 < t {
                self.entries[oldest] = (ValueKey(value.clone()), t);
            }
            return;
        }
        self.entries.push((ValueKey(value.clone()), t));
    }

    /// Number of values last seen at or after `lower`.
    pub(crate) fn count_from(&self, lower: Timestamp) -> usize {
        self.entries.iter().filter(|(_, t)| *t >= lower).count()
    }

    /// The earliest last-seen time at or after `lower`.
    pub(crate) fn earliest_from(&self, lower: Timestamp) -> Option<Timestamp> {
        self.entries
            .iter()
            .map(|(_, t)| *t)
            .filter(|t| *t >= lower)
            .min()
    }

    /// Drops values last seen before `bound`.
    pub(crate) fn prune(&mut self, bound: Timestamp) {
        self.entries.retain(|(_, t)| *t >= bound);
    }

    /// True when no value is kept.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keeps at most `cap` of the most recently seen values.
    pub(crate) fn truncate(&mut self, cap: Option<u32>) {
        let Some(cap) = cap else { return };
        while self.entries.len() > cap as usize {
            if let Some((oldest, _)) = self.entries.iter().enumerate().min_by_key(|(_, (_, t))| *t)
            {
                self.entries.swap_remove(oldest);
            }
        }
    }

    /// Bytes held on the heap (values' own heap parts are estimated).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<(ValueKey, Timestamp)>()
            + self
                .entries
                .iter()
                .map(|(v, _)| match &v.0 {
                    Value::String(s) => s.len(),
                    _ => 0,
                })
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp(ms)
    }

    #[test]
    fn arena_keeps_records_sorted_and_independent() {
        let mut arena = CellArena::default();
        arena.set(5, &[50, 51]);
        arena.set(1, &[10]);
        arena.set(3, &[30, 31, 32]);
        assert_eq!(arena.cell_ids(), vec![1, 3, 5]);
        assert_eq!(arena.get(3), &[30, 31, 32]);
        arena.set(3, &[33]);
        assert_eq!(arena.get(3), &[33]);
        assert_eq!(arena.get(5), &[50, 51]);
        arena.set(1, &[]);
        assert_eq!(arena.cell_ids(), vec![3, 5]);
        assert_eq!(arena.get(1), &[] as &[u64]);
        assert_eq!(arena.get(4), &[] as &[u64]);
    }

    #[test]
    fn recent_keeps_the_newest_cap_timestamps_in_order() {
        let mut arena = CellArena::default();
        for ms in [50, 10, 30, 20, 40] {
            recent::insert(&mut arena, 0, Some(3), t(ms));
        }
        let words = arena.get(0);
        let kept: Vec<_> = words.iter().map(|w| *w as i64).collect();
        assert_eq!(kept, vec![30, 40, 50]);
        assert_eq!(recent::count_from(words, t(35)), 2);
        assert_eq!(recent::earliest_from(words, t(35)), Some(t(40)));
        assert_eq!(recent::nth_newest_or_oldest(words, 2), Some(t(40)));
        assert_eq!(recent::nth_newest_or_oldest(words, 9), Some(t(30)));
        // Older than everything in a full cell: ignored.
        recent::insert(&mut arena, 0, Some(3), t(1));
        assert_eq!(arena.get(0).len(), 3);
        recent::prune(&mut arena, 0, t(41));
        assert_eq!(arena.get(0), &[50]);
    }

    #[test]
    fn staircase_keeps_only_pairs_that_can_still_be_the_minimum() {
        let mut arena = CellArena::default();
        for (ms, v) in [(10, 5.0), (20, 3.0), (30, 4.0), (25, 9.0), (5, 1.0)] {
            staircase::insert(&mut arena, 0, false, t(ms), v);
        }
        let pairs: Vec<_> = arena
            .get(0)
            .chunks_exact(2)
            .map(|p| (p[0] as i64, f64::from_bits(p[1])))
            .collect();
        assert_eq!(pairs, vec![(5, 1.0), (20, 3.0), (30, 4.0)]);
        assert_eq!(staircase::best_from(arena.get(0), t(6)), Some(3.0));
        assert_eq!(staircase::best_from(arena.get(0), t(21)), Some(4.0));
        assert_eq!(staircase::best_from(arena.get(0), t(31)), None);
    }

    #[test]
    fn sum_total_round_trips_exact_partials() {
        let mut arena = CellArena::default();
        for x in [1e16, 1.0, 1.0, -1e16] {
            sum_total::insert(&mut arena, 0, x);
        }
        let (count, sum) = sum_total::get(arena.get(0));
        assert_eq!((count, sum.value()), (4, 2.0));
    }

    #[test]
    fn distinct_keeps_the_most_recently_seen_values() {
        let mut cell = DistinctCell::default();
        for (v, ms) in [("a", 10), ("b", 20), ("a", 30), ("c", 40), ("d", 5)] {
            cell.insert(&Value::from(v), t(ms), Some(3));
        }
        assert_eq!(cell.count_from(t(0)), 3);
        assert_eq!(cell.count_from(t(25)), 2);
        assert_eq!(cell.earliest_from(t(0)), Some(t(20)));
        cell.insert(&Value::from("e"), t(50), Some(3));
        assert_eq!(cell.earliest_from(t(0)), Some(t(30)));
    }
}
