//! [`Arena`]: all of one user's variable-size state in a single allocation.
//!
//! The arena holds records, each a run of `u64` words under a `u32` id. It lives
//! in one allocation behind a thin pointer ([`words::Words`]), so the handle is
//! 8 bytes, a user with no data allocates nothing, and growth leaves little
//! slack: with millions of users, per-user overhead is what memory is spent on.
//!
//! Layout of the slice:
//!
//! ```text
//! [used, n, dir_0 .. dir_{n-1}, payload_0, payload_1, ...]
//! ```
//!
//! `used` (the first word's low half; its high half is the allocation's length)
//! counts the words after it; `n` is the number of records; `dir_i` is
//! `id << 32 | offset`, sorted by id, where the offset is where record `i`'s
//! payload starts, counted from the first payload word (so adding a directory
//! entry moves no offset). A record ends where the next begins. Finding a record
//! scans the directory, a few contiguous words, then jumps once.

mod words;

use std::ops::Range;

use words::Words;

/// Records in one allocation; see the module documentation.
#[derive(Clone, Debug, Default)]
pub(crate) struct Arena {
    /// Empty: nothing allocated.
    words: Words,
}

impl PartialEq for Arena {
    fn eq(&self, other: &Self) -> bool {
        self.data() == other.data()
    }
}

const OFFSET_MASK: u64 = 0xffff_ffff;

/// Capacity (in data words) for `needed` words: an eighth more (at least two),
/// rounded so that the allocation, with malloc's 8-byte header, fills a 16-byte
/// chunk exactly.
fn capacity_for(needed: usize) -> usize {
    let total = needed + 1 + (needed / 8).max(2);
    (total | 1) - 1
}

impl Arena {
    fn used(&self) -> usize {
        self.words.low() as usize
    }

    /// The words after `used`: `[n, directory..., payloads...]`.
    fn data(&self) -> &[u64] {
        let used = self.used();
        self.words.get(1..1 + used).unwrap_or(&[])
    }

    fn records(&self) -> usize {
        self.data().first().map_or(0, |n| *n as usize)
    }

    fn directory(&self) -> &[u64] {
        let n = self.records();
        self.data().get(1..1 + n).unwrap_or(&[])
    }

    /// Data index of the first payload word.
    fn payload_base(&self) -> usize {
        1 + self.records()
    }

    /// Where record `id` is: its directory index and its payload's range in data
    /// coordinates; or the directory index it would take. One pass over the
    /// directory: this runs several times per event.
    fn find(&self, id: u32) -> Result<(usize, Range<usize>), usize> {
        let Some((_, rest)) = self.words.split_first() else {
            return Err(0);
        };
        let data = &rest[..self.used().min(rest.len())];
        let Some((&n, after)) = data.split_first() else {
            return Err(0);
        };
        let directory = &after[..(n as usize).min(after.len())];
        let base = 1 + directory.len();
        let key = u64::from(id);
        for (i, &entry) in directory.iter().enumerate() {
            let here = entry >> 32;
            if here < key {
                continue;
            }
            if here > key {
                return Err(i);
            }
            let start = base + (entry & OFFSET_MASK) as usize;
            let end = directory
                .get(i + 1)
                .map_or(data.len(), |next| base + (next & OFFSET_MASK) as usize);
            return Ok((i, start..end.max(start)));
        }
        Err(directory.len())
    }

    /// Replaces `data[range]` with `new`, reallocating only when it does not fit.
    fn splice(&mut self, range: Range<usize>, new: &[u64]) {
        let used = self.used();
        let new_used = used - range.len() + new.len();
        if new_used < self.words.len() {
            let data = self.words.tail_mut();
            data.copy_within(range.end..used, range.start + new.len());
            data[range.start..range.start + new.len()].copy_from_slice(new);
            self.words.set_low(new_used as u32);
            return;
        }
        let capacity = capacity_for(new_used);
        let mut grown = Vec::with_capacity(capacity + 1);
        grown.push(new_used as u64);
        grown.extend_from_slice(&self.data()[..range.start]);
        grown.extend_from_slice(new);
        grown.extend_from_slice(&self.data()[range.end..]);
        grown.resize(capacity + 1, 0);
        self.words = Words::new(grown.into_boxed_slice());
    }

    /// Moves the payload offsets of directory entries `from..` by `delta`.
    fn shift_offsets(&mut self, from: usize, delta: isize) {
        let n = self.records();
        for entry in &mut self.words.tail_mut()[1 + from..1 + n] {
            let offset = (*entry & OFFSET_MASK) as isize + delta;
            *entry = (*entry & !OFFSET_MASK) | offset as u64;
        }
    }

    /// The payload of record `id`; empty when there is none.
    pub(crate) fn get(&self, id: u32) -> &[u64] {
        match self.find(id) {
            Ok((_, span)) => &self.words[1 + span.start..1 + span.end],
            Err(_) => &[],
        }
    }

    /// Mutable payload of record `id`, for changes that keep its length.
    pub(crate) fn get_mut(&mut self, id: u32) -> Option<&mut [u64]> {
        let (_, span) = self.find(id).ok()?;
        Some(&mut self.words.tail_mut()[span])
    }

    /// Replaces record `id`'s payload (an empty payload removes the record).
    pub(crate) fn set(&mut self, id: u32, payload: &[u64]) {
        match self.find(id) {
            Ok((i, span)) => {
                if payload.is_empty() {
                    self.remove_record(i, span);
                } else if payload.len() == span.len() {
                    self.words.tail_mut()[span].copy_from_slice(payload);
                } else {
                    let delta = payload.len() as isize - span.len() as isize;
                    self.splice(span, payload);
                    self.shift_offsets(i + 1, delta);
                }
            }
            Err(_) if payload.is_empty() => {}
            Err(i) => self.add_record(i, id, payload),
        }
    }

    fn add_record(&mut self, i: usize, id: u32, payload: &[u64]) {
        if self.words.is_empty() {
            self.splice(0..0, &[0]);
        }
        let base = self.payload_base();
        let offset = self
            .directory()
            .get(i)
            .map_or(self.used() - base, |e| (e & OFFSET_MASK) as usize);
        self.splice(base + offset..base + offset, payload);
        self.shift_offsets(i, payload.len() as isize);
        self.splice(1 + i..1 + i, &[(u64::from(id) << 32) | offset as u64]);
        self.words.tail_mut()[0] += 1;
    }

    fn remove_record(&mut self, i: usize, span: Range<usize>) {
        let len = span.len() as isize;
        self.splice(span, &[]);
        self.shift_offsets(i + 1, -len);
        self.splice(1 + i..2 + i, &[]);
        let records = &mut self.words.tail_mut()[0];
        *records -= 1;
        if *records == 0 {
            self.words = Words::default();
        }
    }

    /// Inserts `new` into record `id`'s payload at word `offset` (creating the
    /// record).
    pub(crate) fn insert_at(&mut self, id: u32, offset: usize, new: &[u64]) {
        match self.find(id) {
            Ok((i, span)) => {
                let at = span.start + offset.min(span.len());
                self.splice(at..at, new);
                self.shift_offsets(i + 1, new.len() as isize);
            }
            Err(_) => self.set(id, new),
        }
    }

    /// Removes the first `count` words of record `id`'s payload.
    pub(crate) fn remove_front(&mut self, id: u32, count: usize) {
        self.remove_range(id, 0..count);
    }

    /// Removes words `range` of record `id`'s payload (clamped to it).
    pub(crate) fn remove_range(&mut self, id: u32, range: Range<usize>) {
        let Ok((i, span)) = self.find(id) else { return };
        let end = range.end.min(span.len());
        if range.start >= end {
            return;
        }
        if range.start == 0 && end == span.len() {
            self.remove_record(i, span);
        } else {
            self.splice(span.start + range.start..span.start + end, &[]);
            self.shift_offsets(i + 1, -((end - range.start) as isize));
        }
    }

    /// The id of the first record whose id is at least `min`.
    pub(crate) fn next_id_from(&self, min: u32) -> Option<u32> {
        self.directory()
            .iter()
            .map(|e| (e >> 32) as u32)
            .find(|id| *id >= min)
    }

    /// Hints the CPU to load the arena's first four cache lines (256 bytes,
    /// what a typical user's arena holds). The length is not read: it lives in
    /// the arena, and reading it would wait for the very line being prefetched.
    /// Lines past a short arena's end are harmless (a prefetch never faults).
    #[inline]
    pub(crate) fn prefetch(&self) {
        if let Some(start) = self.words.first_ptr() {
            for line in 0..4 {
                prefetch_line(start.wrapping_add(8 * line));
            }
        }
    }

    /// Bytes held on the heap.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// Frees slack that pruning left, well past what growth leaves, so that
    /// growing and shrinking do not alternate.
    pub(crate) fn shrink(&mut self) {
        let used = self.used();
        if self.words.len() > capacity_for(used) + used / 4 + 4 {
            let mut fitted = Vec::with_capacity(capacity_for(used) + 1);
            fitted.push(used as u64);
            fitted.extend_from_slice(self.data());
            fitted.resize(capacity_for(used) + 1, 0);
            self.words = Words::new(fitted.into_boxed_slice());
        }
    }

    /// The raw words (used count, directory, payloads), for storage: none
    /// when empty.
    pub(crate) fn raw(&self) -> impl Iterator<Item = u64> + '_ {
        let data = self.data();
        let used = (!self.words.is_empty()).then_some(data.len() as u64);
        used.into_iter().chain(data.iter().copied())
    }

    /// Restores an arena from [`Arena::raw`] words, checking that the directory is
    /// consistent (sorted ids, offsets inside the payload, in order): the words
    /// come from disk.
    pub(crate) fn from_raw(words: &[u64]) -> Option<Arena> {
        let Some((&used, data)) = words.split_first() else {
            return Some(Arena::default());
        };
        if used as usize != data.len() || data.is_empty() {
            return None;
        }
        let n = data[0] as usize;
        let directory = data.get(1..1 + n)?;
        let payload_len = data.len() - 1 - n;
        let mut last: Option<(u64, u64)> = None;
        for entry in directory {
            let (id, offset) = (entry >> 32, entry & OFFSET_MASK);
            if offset as usize > payload_len || last.is_some_and(|(i, o)| id <= i || offset < o) {
                return None;
            }
            last = Some((id, offset));
        }
        if n == 0 {
            return None;
        }
        let capacity = capacity_for(used as usize);
        let mut fitted = Vec::with_capacity(capacity + 1);
        fitted.extend_from_slice(words);
        fitted.resize(capacity + 1, 0);
        Some(Arena {
            words: Words::new(fitted.into_boxed_slice()),
        })
    }

    /// The ids of records that hold data.
    #[cfg(test)]
    pub(crate) fn ids(&self) -> Vec<u32> {
        self.directory().iter().map(|e| (e >> 32) as u32).collect()
    }
}

/// Prefetches the cache line holding `p` (a no-op off x86_64).
#[inline]
pub fn prefetch_line<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` only hints the cache; it never faults and reads no
    // memory architecturally, whatever the address. SSE is part of the x86_64
    // baseline, so the target feature the intrinsic requires is always present.
    #[allow(unsafe_code)]
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_stay_sorted_and_independent() {
        let mut arena = Arena::default();
        assert_eq!(arena.heap_bytes(), 0);
        arena.set(5, &[50, 51]);
        arena.set(1, &[10]);
        arena.set(3, &[30, 31, 32]);
        arena.set(u32::MAX, &[9]);
        assert_eq!(arena.ids(), vec![1, 3, 5, u32::MAX]);
        assert_eq!(arena.get(3), &[30, 31, 32]);
        arena.set(3, &[33]);
        assert_eq!(arena.get(3), &[33]);
        assert_eq!(arena.get(5), &[50, 51]);
        arena.insert_at(5, 1, &[55]);
        assert_eq!(arena.get(5), &[50, 55, 51]);
        assert_eq!(arena.get(u32::MAX), &[9]);
        arena.remove_front(5, 2);
        assert_eq!(arena.get(5), &[51]);
        arena.set(1, &[]);
        assert_eq!(arena.ids(), vec![3, 5, u32::MAX]);
        assert_eq!(arena.get(1), &[] as &[u64]);
        assert_eq!(arena.get(3), &[33]);
        if let Some(w) = arena.get_mut(u32::MAX) {
            w[0] = 99;
        }
        assert_eq!(arena.get(u32::MAX), &[99]);
        assert_eq!(arena.next_id_from(4), Some(5));
        arena.set(3, &[]);
        arena.remove_front(5, 1);
        arena.set(u32::MAX, &[]);
        assert_eq!(
            arena.heap_bytes(),
            0,
            "an emptied arena frees its allocation"
        );
    }

    #[test]
    fn random_edits_match_a_model() {
        use std::collections::BTreeMap;
        let mut arena = Arena::default();
        let mut model: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        let mut x: u64 = 12345;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for step in 0..20_000u64 {
            let id = (next() % 12) as u32;
            let entry = model.entry(id).or_default();
            match next() % 4 {
                0 => {
                    let len = (next() % 5) as usize;
                    let payload: Vec<u64> = (0..len as u64).map(|k| step * 10 + k).collect();
                    arena.set(id, &payload);
                    *entry = payload;
                }
                1 => {
                    let offset = (next() % 6) as usize;
                    arena.insert_at(id, offset, &[step]);
                    let at = offset.min(entry.len());
                    entry.insert(at, step);
                }
                2 => {
                    let count = (next() % 3) as usize;
                    arena.remove_front(id, count);
                    entry.drain(..count.min(entry.len()));
                }
                _ => arena.shrink(),
            }
            model.retain(|_, v| !v.is_empty());
            for (id, payload) in &model {
                assert_eq!(arena.get(*id), payload.as_slice(), "step {step} id {id}");
            }
            assert_eq!(
                arena.ids(),
                model.keys().copied().collect::<Vec<_>>(),
                "step {step}"
            );
        }
    }

    #[test]
    fn raw_words_round_trip_and_corrupt_ones_are_refused() {
        let mut arena = Arena::default();
        assert_eq!(arena.raw().count(), 0);
        assert_eq!(Arena::from_raw(&[]), Some(Arena::default()));
        arena.set(3, &[30, 31]);
        arena.set(9, &[90]);
        let raw: Vec<u64> = arena.raw().collect();
        assert_eq!(raw[0], raw.len() as u64 - 1, "the used count, nothing else");
        assert_eq!(Arena::from_raw(&raw), Some(arena));
        // Wrong used count, unsorted directory, offset past the end, empty directory.
        let mut bad = raw.clone();
        bad[0] += 1;
        assert_eq!(Arena::from_raw(&bad), None);
        let mut bad = raw.clone();
        bad.swap(2, 3);
        assert_eq!(Arena::from_raw(&bad), None);
        let mut bad = raw.clone();
        bad[3] = (9 << 32) | 100;
        assert_eq!(Arena::from_raw(&bad), None);
        assert_eq!(Arena::from_raw(&[1, 0]), None);
    }

    #[test]
    fn growth_leaves_little_slack_and_fills_malloc_chunks() {
        for needed in 1..200 {
            let cap = capacity_for(needed);
            assert!(cap >= needed);
            assert!(cap <= needed + needed / 8 + 3, "{needed} -> {cap}");
            assert_eq!(((cap + 1) * 8 + 8) % 16, 0, "{needed} -> {cap}");
        }
        let mut arena = Arena::default();
        for i in 0..100 {
            arena.insert_at(7, i, &[i as u64]);
        }
        assert_eq!(arena.get(7).len(), 100);
        arena.remove_front(7, 95);
        arena.shrink();
        assert!(arena.heap_bytes() <= 8 * (capacity_for(8) + 1));
        assert_eq!(arena.get(7), &[95, 96, 97, 98, 99]);
    }
}
