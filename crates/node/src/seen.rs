//! A user's recent message ids, for dedupe: a small open-addressing hash
//! table, so that checking an event costs one or two cache lines however many
//! ids the user sent within the horizon.
//!
//! Each id is held as `hash << 32 | day`: a 96-bit hash of the message id and
//! the day it first arrived (the shard clock's day). An id is remembered while
//! its day is within the horizon; an expired id is skipped by lookups, and its
//! slot is reused by the next insert or dropped when the table is rebuilt. The
//! stored form (the user's record) is the list of ids, as before the table:
//! the table is rebuilt from it on activation.
//!
//! Before, the ids were a list scanned for every event. The scan was cheap for
//! a handful of ids, but it read every id a user had sent in the horizon: a
//! tenth of the dev cluster's CPU at 50 events per user, cache misses mostly,
//! and linear in the events of a heavy user.

/// A slot no id occupies. An id is never 0: that would be a message id whose
/// 96-bit hash is 0 arriving on 1970-01-01.
const EMPTY: u128 = 0;

/// Tables of up to this many slots may fill up (a lookup reads them whole:
/// two cache lines); larger ones are kept at most three quarters full. The
/// smallest table has four slots.
const SMALL: usize = 8;

/// A user's recent message ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SeenIds {
    /// A power of two in length (or empty); `EMPTY` marks a free slot.
    slots: Box<[u128]>,
    /// Slots holding an id, expired or not.
    occupied: usize,
}

fn day(id: u128) -> u32 {
    id as u32
}

fn hash(id: u128) -> u128 {
    id >> 32
}

/// Where a probe for `hash` starts in a table of `len` slots (a power of two):
/// the hash's bits mixed, so that ids cluster no more than random ones.
fn start(hash: u128, len: usize) -> usize {
    let folded = (hash as u64) ^ ((hash >> 64) as u64);
    let mixed = folded.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (mixed >> (64 - len.trailing_zeros())) as usize
}

impl SeenIds {
    /// The ids a user's record holds.
    pub(crate) fn from_stored(ids: &[u128]) -> SeenIds {
        let mut seen = SeenIds::default();
        seen.rebuild(ids, None, 0);
        seen
    }

    /// The ids, for the user's record (in no particular order).
    pub(crate) fn stored(&self) -> impl Iterator<Item = u128> + '_ {
        self.slots.iter().copied().filter(|&id| id != EMPTY)
    }

    /// Hints the CPU to load the slot a lookup of `hash` starts at.
    pub(crate) fn prefetch(&self, hash: u128) {
        let len = self.slots.len();
        if len > 0 {
            dynseg_rules::prefetch_line(&self.slots[start(hash, len)]);
        }
    }

    /// Bytes the table holds on the heap.
    pub(crate) fn heap_bytes(&self) -> usize {
        16 * self.slots.len()
    }

    /// Whether `hash` arrived on a day from `oldest_day` on; if not, it is
    /// remembered as arriving on `day`. `true`: a repeat, nothing changed.
    pub(crate) fn check_and_insert(&mut self, hash: u128, day: u32, oldest_day: u32) -> bool {
        let len = self.slots.len();
        // The slot to insert into: the first expired one met, else the free
        // one that ends the probe.
        let mut free = None;
        if len > 0 {
            let mask = len - 1;
            let mut i = start(hash, len);
            for _ in 0..len {
                let id = self.slots[i];
                if id == EMPTY {
                    free.get_or_insert(i);
                    break;
                }
                if self::day(id) < oldest_day {
                    free.get_or_insert(i);
                } else if self::hash(id) == hash {
                    return true;
                }
                i = (i + 1) & mask;
            }
        }
        let id = (hash << 32) | u128::from(day);
        match free {
            Some(i) if self.slots[i] != EMPTY => self.slots[i] = id,
            Some(i) if !self.over_load(self.occupied + 1) => {
                self.slots[i] = id;
                self.occupied += 1;
            }
            _ => {
                let old = std::mem::take(&mut self.slots);
                self.rebuild(&old, Some(id), oldest_day);
            }
        }
        false
    }

    fn over_load(&self, occupied: usize) -> bool {
        let len = self.slots.len();
        if len <= SMALL {
            occupied > len
        } else {
            occupied * 4 > len * 3
        }
    }

    /// A table of the distinct `ids` (and `extra`) not expired by
    /// `oldest_day`, with room for more: one allocation.
    fn rebuild(&mut self, ids: &[u128], extra: Option<u128>, oldest_day: u32) {
        let live = |id: &u128| *id != EMPTY && self::day(*id) >= oldest_day;
        let count = ids.iter().filter(|id| live(id)).count() + usize::from(extra.is_some());
        let len = match count {
            0 => 0,
            // Four slots at least: as a list of ids first allocated.
            1..=SMALL => count.next_power_of_two().max(4),
            _ => (count * 4).div_ceil(3).next_power_of_two(),
        };
        self.slots = vec![EMPTY; len].into_boxed_slice();
        self.occupied = 0;
        for id in ids.iter().copied().filter(live).chain(extra) {
            let mask = len - 1;
            let mut i = start(self::hash(id), len);
            while self.slots[i] != EMPTY {
                i = (i + 1) & mask;
            }
            self.slots[i] = id;
            self.occupied += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What dedupe did before the table: a list scanned for every event.
    #[derive(Default)]
    struct Listed(Vec<u128>);

    impl Listed {
        fn check_and_insert(&mut self, hash: u128, day: u32, oldest_day: u32) -> bool {
            self.0.retain(|&id| super::day(id) >= oldest_day);
            if self.0.iter().any(|&id| super::hash(id) == hash) {
                return true;
            }
            self.0.push((hash << 32) | u128::from(day));
            false
        }
    }

    fn live(ids: impl Iterator<Item = u128>, oldest_day: u32) -> Vec<u128> {
        let mut live: Vec<u128> = ids.filter(|&id| day(id) >= oldest_day).collect();
        live.sort_unstable();
        live
    }

    /// Events of a few users' days: message ids from a small set (so that
    /// repeats are common), days that advance, horizons of 0 to 3 days.
    fn arrivals() -> impl Strategy<Value = (u32, Vec<(u128, u32)>)> {
        (0..4u32, prop::collection::vec((0..40u128, 0..3u32), 0..300))
    }

    fn check_against_the_list(
        horizon: u32,
        arrivals: &[(u128, u32)],
        store_every: usize,
    ) -> Result<(), TestCaseError> {
        let mut table = SeenIds::default();
        let mut list = Listed::default();
        let mut today = 20_000u32;
        for (n, &(message, days_later)) in arrivals.iter().enumerate() {
            today += days_later;
            // Hashes spread like real ones; some share their low bits.
            let hash = (message * 0x9e37_79b9_7f4a_7c15_f39c_c060) >> 32 | (message << 1);
            let oldest = today - horizon;
            prop_assert_eq!(
                table.check_and_insert(hash, today, oldest),
                list.check_and_insert(hash, today, oldest),
                "arrival {} of message {}",
                n,
                message
            );
            prop_assert_eq!(
                live(table.stored(), oldest),
                live(list.0.iter().copied(), oldest)
            );
            if store_every > 0 && n % store_every == 0 {
                let stored: Vec<u128> = table.stored().collect();
                table = SeenIds::from_stored(&stored);
            }
        }
        Ok(())
    }

    /// The table answers as the scanned list did, event after event, and
    /// remembers the same live ids; also when stored and read back. The seed
    /// is fixed (`DYNSEG_SEED` to change it; printed on failure).
    #[test]
    fn the_table_dedupes_as_the_scanned_list_did() {
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
        let seed: u64 = std::env::var("DYNSEG_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_261_130);
        let mut seed_bytes = [0u8; 32];
        seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let config = Config {
            cases: 1_000,
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner = TestRunner::new_with_rng(
            config,
            TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
        );
        let result = runner.run(&(arrivals(), 0..20usize), |((horizon, arrivals), every)| {
            check_against_the_list(horizon, &arrivals, every)
        });
        if let Err(e) = result {
            panic!("failed with DYNSEG_SEED={seed}: {e}");
        }
    }

    #[test]
    fn a_heavy_user_costs_a_few_slots_per_id_and_probes_stay_short() {
        let mut seen = SeenIds::default();
        for message in 1..=10_000u128 {
            assert!(!seen.check_and_insert(message << 8, 20_000, 19_993));
        }
        assert!(seen.check_and_insert(5_000 << 8, 20_000, 19_993));
        assert_eq!(seen.stored().count(), 10_000);
        assert!(seen.heap_bytes() <= 16 * 4 * 10_000 / 3 * 2);
        // A week later every id has expired: the next insert reuses a slot
        // or rebuilds, and the table holds one id.
        assert!(!seen.check_and_insert(1, 20_008, 20_001));
        assert!(!seen.check_and_insert(5_000 << 8, 20_008, 20_001));
        assert_eq!(live(seen.stored(), 20_001).len(), 2);
    }

    #[test]
    fn small_tables_fill_up_before_growing() {
        let mut seen = SeenIds::default();
        for message in 1..=8u128 {
            assert!(!seen.check_and_insert(message << 40, 20_000, 20_000));
        }
        assert_eq!(seen.heap_bytes(), 16 * 8, "eight ids in eight slots");
        assert!(!seen.check_and_insert(9 << 40, 20_000, 20_000));
        assert_eq!(seen.heap_bytes(), 16 * 16);
        assert!((1..=9).all(|m| seen.check_and_insert(m << 40, 20_000, 20_000)));
    }
}
