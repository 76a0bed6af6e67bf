//! One user's evaluation state.
//!
//! Kept small because a node holds millions: the clock of the last evaluation,
//! the next wake-up, membership bits for the first 64 segments, the cell arena,
//! and a boxed [`Extra`] for what few users need (traits, future-dated events,
//! distinct values, more than 64 segments).

use crate::cell::{CellArena, DistinctCell};
use crate::event::EventBody;
use crate::time::Timestamp;
use crate::value::Value;

/// A user's state under one [`Plan`](crate::Plan). Create it with
/// [`Plan::new_state`](crate::Plan::new_state) and change it only through the
/// plan's `apply`, `advance` and `migrate`.
#[derive(Clone, Debug, PartialEq)]
pub struct UserState {
    /// Time of the last evaluation; `Timestamp::MIN` before the first event.
    pub(crate) now: Timestamp,
    /// Earliest time a membership could change with no new event (a lower bound:
    /// waking earlier is harmless, later never happens). `MAX`: never.
    pub(crate) wakeup: Timestamp,
    /// Membership of segments 0..64, one bit each.
    pub(crate) members: u64,
    pub(crate) cells: CellArena,
    pub(crate) extra: Option<Box<Extra>>,
}

/// The parts of a state most users do not need.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Extra {
    /// Referenced traits that have been set, sorted by trait index.
    pub(crate) traits: Vec<TraitSlot>,
    /// Events stamped after `now`, sorted by (timestamp, arrival).
    pub(crate) pending: Vec<Pending>,
    /// `distinct` cells, sorted by cell index.
    pub(crate) distinct: Vec<(u32, DistinctCell)>,
    /// Membership of segments 64 and up.
    pub(crate) members_high: Vec<u64>,
    /// Arrival counter for identifies and future-dated events: orders equal
    /// timestamps ("ties: later arrival wins").
    pub(crate) arrivals: u64,
}

/// The current value of one trait and which identify set it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TraitSlot {
    pub(crate) index: u32,
    pub(crate) timestamp: Timestamp,
    pub(crate) arrival: u64,
    pub(crate) value: Value,
}

/// An event that is not due yet.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Pending {
    pub(crate) timestamp: Timestamp,
    pub(crate) arrival: u64,
    pub(crate) body: EventBody,
}

impl UserState {
    pub(crate) fn new() -> Self {
        UserState {
            now: Timestamp::MIN,
            wakeup: Timestamp::MAX,
            members: 0,
            cells: CellArena::default(),
            extra: None,
        }
    }

    /// True before the state has seen any event.
    pub fn is_new(&self) -> bool {
        self.now == Timestamp::MIN
    }

    /// The time of the state's last evaluation.
    pub fn now(&self) -> Option<Timestamp> {
        (!self.is_new()).then_some(self.now)
    }

    /// The earliest time a membership of this user could change with no new event:
    /// a window sliding past an event, a future-dated event becoming due, a
    /// comparison with `now` turning. `None`: never, without a new event.
    pub fn next_wakeup(&self) -> Option<Timestamp> {
        (self.wakeup != Timestamp::MAX).then_some(self.wakeup)
    }

    pub(crate) fn is_member(&self, segment: u32) -> bool {
        if segment < 64 {
            return self.members & (1 << segment) != 0;
        }
        let (word, bit) = ((segment - 64) / 64, (segment - 64) % 64);
        self.extra
            .as_ref()
            .and_then(|e| e.members_high.get(word as usize))
            .is_some_and(|w| w & (1 << bit) != 0)
    }

    pub(crate) fn set_member(&mut self, segment: u32, member: bool) {
        if segment < 64 {
            if member {
                self.members |= 1 << segment;
            } else {
                self.members &= !(1 << segment);
            }
            return;
        }
        let (word, bit) = (((segment - 64) / 64) as usize, (segment - 64) % 64);
        if !member
            && self
                .extra
                .as_ref()
                .is_none_or(|e| e.members_high.len() <= word)
        {
            return;
        }
        let high = &mut self.extra_mut().members_high;
        if high.len() <= word {
            high.resize(word + 1, 0);
        }
        if member {
            high[word] |= 1 << bit;
        } else {
            high[word] &= !(1 << bit);
        }
    }

    pub(crate) fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    pub(crate) fn trait_value(&self, index: u32) -> &Value {
        const NULL: &Value = &Value::Null;
        self.extra
            .as_ref()
            .and_then(|e| {
                e.traits
                    .binary_search_by_key(&index, |t| t.index)
                    .ok()
                    .map(|i| &e.traits[i].value)
            })
            .unwrap_or(NULL)
    }

    pub(crate) fn distinct(&self, cell: u32) -> Option<&DistinctCell> {
        let extra = self.extra.as_ref()?;
        let i = extra
            .distinct
            .binary_search_by_key(&cell, |(c, _)| *c)
            .ok()?;
        Some(&extra.distinct[i].1)
    }

    pub(crate) fn distinct_mut(&mut self, cell: u32) -> &mut DistinctCell {
        let distinct = &mut self.extra_mut().distinct;
        let i = match distinct.binary_search_by_key(&cell, |(c, _)| *c) {
            Ok(i) => i,
            Err(i) => {
                distinct.insert(i, (cell, DistinctCell::default()));
                i
            }
        };
        &mut distinct[i].1
    }

    /// Earliest due time among future-dated events.
    pub(crate) fn first_pending(&self) -> Option<Timestamp> {
        self.extra
            .as_ref()
            .and_then(|e| e.pending.first())
            .map(|p| p.timestamp)
    }

    /// Approximate bytes this state holds on the heap, not counting the state itself.
    pub fn heap_bytes(&self) -> usize {
        let extra = self.extra.as_ref().map_or(0, |e| {
            std::mem::size_of::<Extra>()
                + e.traits.capacity() * std::mem::size_of::<TraitSlot>()
                + e.pending.capacity() * std::mem::size_of::<Pending>()
                + e.distinct
                    .iter()
                    .map(|(_, d)| d.heap_bytes())
                    .sum::<usize>()
                + e.distinct.capacity() * std::mem::size_of::<(u32, DistinctCell)>()
                + e.members_high.capacity() * 8
        });
        self.cells.heap_bytes() + extra
    }

    /// Drops the boxed extra part when it holds nothing. (Its arrival counter only
    /// orders traits and pending events against each other, so with none left it
    /// can restart.)
    pub(crate) fn tidy(&mut self) {
        if self.extra.as_ref().is_some_and(|e| {
            e.traits.is_empty()
                && e.pending.is_empty()
                && e.distinct.is_empty()
                && e.members_high.iter().all(|w| *w == 0)
        }) {
            self.extra = None;
        }
        self.cells.shrink();
    }
}
