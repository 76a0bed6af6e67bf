//! Per-user aggregate state ("cells") and its compact storage.
//!
//! A cell is the state one aggregate needs for one user, shared by every reader
//! that can be answered from it (see `plan`). All cells of a user are records of
//! one [`Arena`], keyed by cell index: a user pays only for the cells it has data
//! in, and one allocation holds them all.
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
//! | `DistinctAll`, `DistinctRecent` | entries `[last seen, value...]` (values in the `codec` encoding) |
//!
//! The same arena also holds the user's traits and bookkeeping (see `state`).

use crate::arena::Arena;
use crate::exact_sum::ExactSum;
use crate::time::Timestamp;
use crate::value::Value;

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
}

fn ts_word(t: Timestamp) -> u64 {
    t.millis() as u64
}

fn word_ts(w: u64) -> Timestamp {
    Timestamp(w as i64)
}

/// The newest timestamps, ascending, at most `cap`; keeps what `count >= k` needs
/// for any `k <= cap` over any window that is a suffix of time.
pub(crate) mod recent {
    use super::*;

    /// Inserts `t`, keeping only the `cap` newest (`None`: unbounded).
    pub(crate) fn insert(arena: &mut Arena, cell: u32, cap: Option<u32>, t: Timestamp) {
        let cap = cap.map_or(usize::MAX, |c| c as usize);
        if let Some(words) = arena.get_mut(cell)
            && words.len() >= cap
        {
            // Full: drop the oldest and slide the older part down, in place.
            let at = words.partition_point(|w| word_ts(*w) <= t);
            if at > 0 && cap > 0 {
                words.copy_within(1..at, 0);
                words[at - 1] = ts_word(t);
            }
            return;
        }
        let at = arena.get(cell).partition_point(|w| word_ts(*w) <= t);
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
    pub(crate) fn prune(arena: &mut Arena, cell: u32, bound: Timestamp) {
        let words = arena.get(cell);
        let cut = first_from(words, bound);
        if cut > 0 {
            arena.remove_front(cell, cut);
        }
    }
}

/// A single timestamp: the latest (`MaxTs`) or the earliest (`MinTs`).
pub(crate) mod extreme_ts {
    use super::*;

    /// Keeps the later (or earlier, when `min`) of the stored time and `t`.
    pub(crate) fn insert(arena: &mut Arena, cell: u32, min: bool, t: Timestamp) {
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
    pub(crate) fn increment(arena: &mut Arena, cell: u32) {
        match arena.get_mut(cell) {
            Some([n]) => *n = n.saturating_add(1),
            _ => arena.set(cell, &[1]),
        }
    }

    /// The count.
    pub(crate) fn get(words: &[u64]) -> u64 {
        words.first().copied().unwrap_or(0)
    }

    /// Adds `n`.
    pub(crate) fn add(arena: &mut Arena, cell: u32, n: u64) {
        let total = get(arena.get(cell)).saturating_add(n);
        arena.set(cell, &[total]);
    }
}

/// Exact lifetime sum and count.
pub(crate) mod sum_total {
    use super::*;

    /// Adds `x`.
    pub(crate) fn insert(arena: &mut Arena, cell: u32, x: f64) {
        let (count, mut sum) = get(arena.get(cell));
        sum.add(x);
        let partials = sum.partials();
        let mut record = [0u64; 9];
        if partials.len() < record.len() {
            record[0] = count + 1;
            for (slot, p) in record[1..].iter_mut().zip(partials) {
                *slot = p.to_bits();
            }
            arena.set(cell, &record[..1 + partials.len()]);
        } else {
            let mut words = vec![count + 1];
            words.extend(partials.iter().map(|p| p.to_bits()));
            arena.set(cell, &words);
        }
    }

    /// Adds another sum cell's count and sum (its partials are exact parts
    /// of its total, so adding them keeps the sum exact).
    pub(crate) fn merge(arena: &mut Arena, cell: u32, other: &[u64]) {
        let (count, mut sum) = get(arena.get(cell));
        let (other_count, other_sum) = get(other);
        for p in other_sum.partials() {
            sum.add(*p);
        }
        let mut words = vec![count + other_count];
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
    pub(crate) fn insert(arena: &mut Arena, cell: u32, t: Timestamp, x: f64) {
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
    pub(crate) fn prune(arena: &mut Arena, cell: u32, bound: Timestamp) {
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

fn prune_pairs(arena: &mut Arena, cell: u32, bound: Timestamp) {
    let words = arena.get(cell);
    let cut = first_pair_from(words, bound);
    if cut > 0 {
        arena.remove_front(cell, 2 * cut);
    }
}

/// The least or greatest value over the whole history.
pub(crate) mod extreme {
    use super::*;

    /// Keeps the better of the stored value and `x`.
    pub(crate) fn insert(arena: &mut Arena, cell: u32, max: bool, x: f64) {
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
    pub(crate) fn insert(arena: &mut Arena, cell: u32, max: bool, t: Timestamp, x: f64) {
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
    pub(crate) fn prune(arena: &mut Arena, cell: u32, bound: Timestamp) {
        prune_pairs(arena, cell, bound);
    }
}

/// Distinct values of a property, each with the last time it was seen: entries
/// `[last seen, value...]` in the arena, in no particular order.
pub(crate) mod distinct {
    use super::*;
    use crate::codec;

    /// Iterates `(last seen, encoded value)` over a distinct cell's payload.
    pub(crate) fn entries(words: &[u64]) -> impl Iterator<Item = (Timestamp, &[u64])> {
        let mut rest = words;
        std::iter::from_fn(move || {
            let (&t, tail) = rest.split_first()?;
            let n = codec::encoded_len(tail);
            let value = &tail[..n];
            rest = &tail[n..];
            Some((word_ts(t), value))
        })
    }

    /// Records `value` seen at `t`, keeping at most `cap` values: the most recently
    /// seen ones. (Lifetime cells store every time as `Timestamp::MIN`, so their
    /// first `cap` values stay, which is all a lifetime `distinct >= k` needs.)
    pub(crate) fn insert(
        arena: &mut Arena,
        cell: u32,
        value: &Value,
        t: Timestamp,
        cap: Option<u32>,
    ) {
        let mut encoded = Vec::with_capacity(4);
        codec::encode(value, &mut encoded);
        let old = arena.get(cell);
        let mut count = 0;
        let mut oldest: Option<(Timestamp, usize)> = None;
        let mut offset = 0;
        let mut found = None;
        for (seen, words) in entries(old) {
            if words == encoded.as_slice() {
                found = Some((seen, offset));
                break;
            }
            if oldest.is_none_or(|(o, _)| seen < o) {
                oldest = Some((seen, offset));
            }
            count += 1;
            offset += 1 + words.len();
        }
        if let Some((seen, at)) = found {
            if t > seen
                && let Some(slot) = arena.get_mut(cell)
            {
                slot[at] = ts_word(t);
            }
            return;
        }
        let mut new = Vec::with_capacity(old.len() + 1 + encoded.len());
        match (cap, oldest) {
            (Some(cap), _) if count < cap as usize => new.extend_from_slice(old),
            (None, _) => new.extend_from_slice(old),
            (Some(_), Some((seen, at))) if seen < t => {
                // Replace the least recently seen value.
                let n = 1 + codec::encoded_len(&old[at + 1..]);
                new.extend_from_slice(&old[..at]);
                new.extend_from_slice(&old[at + n..]);
            }
            _ => return,
        }
        new.push(ts_word(t));
        new.extend_from_slice(&encoded);
        arena.set(cell, &new);
    }

    /// Number of values last seen at or after `lower`.
    pub(crate) fn count_from(words: &[u64], lower: Timestamp) -> usize {
        entries(words).filter(|(t, _)| *t >= lower).count()
    }

    /// Fills `newest` with the newest last-seen times at or after `lower`, newest
    /// first, and returns how many values were last seen at or after `lower`.
    pub(crate) fn newest_from(words: &[u64], lower: Timestamp, newest: &mut [Timestamp]) -> usize {
        let mut count = 0;
        for (t, _) in entries(words).filter(|(t, _)| *t >= lower) {
            // Insertion into a short descending list.
            let filled = count.min(newest.len());
            let at = newest[..filled].partition_point(|x| *x >= t);
            if at < newest.len() {
                let end = (filled + 1).min(newest.len());
                newest.copy_within(at..end - 1, at + 1);
                newest[at] = t;
            }
            count += 1;
        }
        count
    }

    /// The earliest last-seen time at or after `lower`.
    pub(crate) fn earliest_from(words: &[u64], lower: Timestamp) -> Option<Timestamp> {
        entries(words).map(|(t, _)| t).filter(|t| *t >= lower).min()
    }

    /// Keeps the values last seen at or after `bound`, at most `cap` of the most
    /// recently seen.
    pub(crate) fn retain(arena: &mut Arena, cell: u32, bound: Timestamp, cap: Option<u32>) {
        let words = arena.get(cell);
        let mut kept: Vec<(Timestamp, &[u64])> =
            entries(words).filter(|(t, _)| *t >= bound).collect();
        let total = entries(words).count();
        if let Some(cap) = cap
            && kept.len() > cap as usize
        {
            kept.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
            kept.truncate(cap as usize);
        }
        if kept.len() == total {
            return;
        }
        let mut new = Vec::with_capacity(words.len());
        for (t, value) in kept {
            new.push(ts_word(t));
            new.extend_from_slice(value);
        }
        arena.set(cell, &new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> Timestamp {
        Timestamp(ms)
    }

    #[test]
    fn recent_keeps_the_newest_cap_timestamps_in_order() {
        let mut arena = Arena::default();
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
        let mut arena = Arena::default();
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
        let mut arena = Arena::default();
        for x in [1e16, 1.0, 1.0, -1e16] {
            sum_total::insert(&mut arena, 0, x);
        }
        let (count, sum) = sum_total::get(arena.get(0));
        assert_eq!((count, sum.value()), (4, 2.0));
    }

    #[test]
    fn distinct_keeps_the_most_recently_seen_values() {
        let mut arena = Arena::default();
        for (v, ms) in [("a", 10), ("b", 20), ("a", 30), ("c", 40), ("d", 5)] {
            distinct::insert(&mut arena, 0, &Value::from(v), t(ms), Some(3));
        }
        assert_eq!(distinct::count_from(arena.get(0), t(0)), 3);
        assert_eq!(distinct::count_from(arena.get(0), t(25)), 2);
        assert_eq!(distinct::earliest_from(arena.get(0), t(0)), Some(t(20)));
        distinct::insert(&mut arena, 0, &Value::from("e"), t(50), Some(3));
        assert_eq!(distinct::earliest_from(arena.get(0), t(0)), Some(t(30)));
        distinct::retain(&mut arena, 0, t(35), Some(3));
        assert_eq!(distinct::count_from(arena.get(0), t(0)), 2);
        let mut newest = [Timestamp::MIN; 2];
        assert_eq!(distinct::newest_from(arena.get(0), t(0), &mut newest), 2);
        assert_eq!(newest, [t(50), t(40)]);
        distinct::retain(&mut arena, 0, Timestamp::MIN, Some(1));
        assert_eq!(distinct::earliest_from(arena.get(0), t(0)), Some(t(50)));
    }
}
