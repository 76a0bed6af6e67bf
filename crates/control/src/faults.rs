//! Network fault knobs for tests: drop, delay and partition raft messages between
//! in-process members, deterministically from a seed.
//!
//! The transport asks [`Faults::verdict`] before sending each message, so a fault
//! acts like a lossy or cut network: Raft sees messages vanish, never corrupted.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// What happens to one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it after this delay (zero: now).
    Deliver(Duration),
    /// Lose it.
    Drop,
}

#[derive(Debug)]
struct State {
    rng: u64,
    drop_per_mille: u32,
    delay: Duration,
    cut: HashSet<(u64, u64)>,
}

/// Shared fault settings; clones share them. The default injects nothing.
#[derive(Clone, Debug)]
pub struct Faults(Arc<Mutex<State>>);

impl Default for Faults {
    fn default() -> Self {
        Faults::seeded(1)
    }
}

impl Faults {
    /// No faults yet; drops will be drawn from a generator seeded with `seed`.
    pub fn seeded(seed: u64) -> Faults {
        Faults(Arc::new(Mutex::new(State {
            rng: seed.max(1),
            drop_per_mille: 0,
            delay: Duration::ZERO,
            cut: HashSet::new(),
        })))
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Loses each message with probability `per_mille / 1000`.
    pub fn set_drop(&self, per_mille: u32) {
        self.with(|s| s.drop_per_mille = per_mille.min(1000));
    }

    /// Delays every message by `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.with(|s| s.delay = delay);
    }

    /// Cuts every link between a member of `side` and a member of `other`, both ways.
    pub fn partition(&self, side: &[u64], other: &[u64]) {
        self.with(|s| {
            for &a in side {
                for &b in other {
                    s.cut.insert((a, b));
                    s.cut.insert((b, a));
                }
            }
        });
    }

    /// Removes every fault.
    pub fn heal(&self) {
        self.with(|s| {
            s.cut.clear();
            s.drop_per_mille = 0;
            s.delay = Duration::ZERO;
        });
    }

    /// The fate of one message from `from` to `to`.
    pub fn verdict(&self, from: u64, to: u64) -> Verdict {
        self.with(|s| {
            if s.cut.contains(&(from, to)) {
                return Verdict::Drop;
            }
            if s.drop_per_mille > 0 {
                // xorshift64: deterministic for a seed and a message order.
                s.rng ^= s.rng << 13;
                s.rng ^= s.rng >> 7;
                s.rng ^= s.rng << 17;
                if (s.rng % 1000) < u64::from(s.drop_per_mille) {
                    return Verdict::Drop;
                }
            }
            Verdict::Deliver(s.delay)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cut_both_ways_and_heal() {
        let faults = Faults::seeded(7);
        faults.partition(&[1], &[2, 3]);
        assert_eq!(faults.verdict(1, 2), Verdict::Drop);
        assert_eq!(faults.verdict(3, 1), Verdict::Drop);
        assert_eq!(faults.verdict(2, 3), Verdict::Deliver(Duration::ZERO));
        faults.heal();
        assert_eq!(faults.verdict(1, 2), Verdict::Deliver(Duration::ZERO));
    }

    #[test]
    fn drops_follow_the_rate_and_the_seed() {
        let run = |seed| {
            let faults = Faults::seeded(seed);
            faults.set_drop(300);
            (0..10_000)
                .map(|_| faults.verdict(1, 2) == Verdict::Drop)
                .collect::<Vec<_>>()
        };
        let a = run(42);
        assert_eq!(a, run(42));
        let dropped = a.iter().filter(|d| **d).count();
        assert!(
            (2_500..3_500).contains(&dropped),
            "dropped {dropped} of 10000"
        );
    }
}
