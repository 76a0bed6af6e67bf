//! The node's one clock: the wall clock, or a manual clock tests move.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use dynseg_rules::Timestamp;

/// Where `now` comes from.
#[derive(Clone, Debug)]
pub enum Clock {
    /// The wall clock.
    System,
    /// A clock that only moves when told (`AdvanceClock`).
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// A manual clock starting at `start`.
    pub fn manual(start: Timestamp) -> Clock {
        Clock::Manual(Arc::new(AtomicI64::new(start.millis())))
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        match self {
            Clock::System => {
                let since = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                Timestamp(since.as_millis() as i64)
            }
            Clock::Manual(t) => Timestamp(t.load(Ordering::SeqCst)),
        }
    }

    /// True for a manual clock.
    pub fn is_manual(&self) -> bool {
        matches!(self, Clock::Manual(_))
    }

    /// Moves a manual clock forward to `to` (never back); returns the new time, or
    /// `None` for the wall clock.
    pub fn advance_to(&self, to: Timestamp) -> Option<Timestamp> {
        match self {
            Clock::System => None,
            Clock::Manual(t) => {
                let now = t.fetch_max(to.millis(), Ordering::SeqCst).max(to.millis());
                Some(Timestamp(now))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manual_clock_moves_only_forwards() {
        let clock = Clock::manual(Timestamp(100));
        assert_eq!(clock.now(), Timestamp(100));
        assert_eq!(clock.advance_to(Timestamp(150)), Some(Timestamp(150)));
        assert_eq!(clock.advance_to(Timestamp(120)), Some(Timestamp(150)));
        assert_eq!(clock.now(), Timestamp(150));
        assert_eq!(Clock::System.advance_to(Timestamp(0)), None);
        assert!(Clock::System.now() > Timestamp(1_700_000_000_000));
    }
}
