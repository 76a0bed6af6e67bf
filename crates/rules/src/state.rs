//! One user's evaluation state.
//!
//! Kept small because a node holds millions: three integers (the clock of the
//! last evaluation, the next wake-up, membership bits of the first 64 segments)
//! and one [`Arena`] holding everything else the user has, as records:
//!
//! | record id | payload |
//! |---|---|
//! | `PENDING` (0) | future-dated events: entries `[timestamp, arrival, length, body...]` |
//! | `WAKES` (1) | per segment with a finite next wake-up: `segment << 48 \| biased time` |
//! | `MEMBERS_HIGH` (2) | membership bits of segments 64 and up |
//! | `CELL_BASE + cell index` | the cell's state (see `cell`) |
//! | `TRAIT_BASE + trait index` | `[timestamp, arrival, value...]` of a trait the rules read |
//!
//! Records are sorted by id and found by scanning headers, so the bookkeeping
//! read on every event comes first, in the arena's first cache line.
//!
//! So a state is 32 bytes plus one allocation, and is plain data: words and
//! integers, ready to be written to disk as they are.

use crate::arena::Arena;
use crate::codec;
use crate::event::EventBody;
use crate::time::Timestamp;
use crate::value::Value;

const PENDING: u32 = 0;
const WAKES: u32 = 1;
const MEMBERS_HIGH: u32 = 2;
const CELL_BASE: u32 = 3;
/// First record id of traits (after every cell a plan can have).
const TRAIT_BASE: u32 = 1 << 30;

/// The arena record of cell `c`.
pub(crate) fn cell_record(c: u32) -> u32 {
    CELL_BASE + c
}

/// Wake-up times are packed with their segment into one word: 48 bits of time,
/// biased so that ±4,400 years around 1970 fit. A later time is stored as the
/// latest that fits, which only wakes the user early (harmless).
const WAKE_BIAS: i64 = 1 << 47;
const WAKE_TIME_MASK: u64 = (1 << 48) - 1;

fn pack_wake(segment: u32, t: Timestamp) -> u64 {
    let biased = (t.millis().clamp(-WAKE_BIAS, WAKE_BIAS - 1) + WAKE_BIAS) as u64;
    (u64::from(segment) << 48) | biased
}

fn unpack_wake(word: u64) -> (u32, Timestamp) {
    (
        (word >> 48) as u32,
        Timestamp((word & WAKE_TIME_MASK) as i64 - WAKE_BIAS),
    )
}

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
    /// Everything else; see the module documentation.
    pub(crate) arena: Arena,
}

/// Version of [`UserState::encode`]'s layout.
const STATE_FORMAT: u8 = 1;

/// Why stored bytes are not a user state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid stored user state: {0}")]
pub struct StateDecodeError(&'static str);

/// An event that was not due when it arrived.
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
            arena: Arena::default(),
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

    /// Asks the CPU to start loading this state's arena into cache, so that a
    /// caller applying a batch of events can overlap memory latency: call it a few
    /// events ahead of `apply` (the state itself must be in cache or prefetched
    /// first, since this reads where the arena is). A hint only: never faults.
    #[inline]
    pub fn prefetch(&self) {
        self.arena.prefetch();
    }

    /// Bytes this state holds on the heap, not counting the state itself.
    pub fn heap_bytes(&self) -> usize {
        self.arena.heap_bytes()
    }

    pub(crate) fn is_member(&self, segment: u32) -> bool {
        if segment < 64 {
            return self.members & (1 << segment) != 0;
        }
        let (word, bit) = (((segment - 64) / 64) as usize, (segment - 64) % 64);
        self.arena
            .get(MEMBERS_HIGH)
            .get(word)
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
        let mut high = self.arena.get(MEMBERS_HIGH).to_vec();
        if high.len() <= word {
            if !member {
                return;
            }
            high.resize(word + 1, 0);
        }
        if member {
            high[word] |= 1 << bit;
        } else {
            high[word] &= !(1 << bit);
        }
        while high.last() == Some(&0) {
            high.pop();
        }
        self.arena.set(MEMBERS_HIGH, &high);
    }

    /// The next arrival number, which orders identifies and future-dated events
    /// that share a timestamp ("ties: later arrival wins"). It only has to exceed
    /// the arrivals still stored, so it is derived from them, not counted.
    pub(crate) fn next_arrival(&self) -> u64 {
        let mut last = 0;
        let mut next = TRAIT_BASE;
        while let Some(id) = self.arena.next_id_from(next) {
            last = last.max(self.arena.get(id).get(1).copied().unwrap_or(0));
            next = id + 1;
        }
        for entry in pending_entries(self.arena.get(PENDING)) {
            last = last.max(entry.arrival);
        }
        last + 1
    }

    /// The state of cell `c`.
    pub(crate) fn cell(&self, c: u32) -> &[u64] {
        self.arena.get(cell_record(c))
    }

    /// Records segment `segment`'s next wake-up (`MAX`: none).
    pub(crate) fn set_segment_wake(&mut self, segment: u32, t: Timestamp) {
        let words = self.arena.get(WAKES);
        let at = words.partition_point(|w| (w >> 48) < u64::from(segment));
        let present = words.get(at).is_some_and(|w| (w >> 48) as u32 == segment);
        match (present, t == Timestamp::MAX) {
            (true, true) => self.arena.remove_range(WAKES, at..at + 1),
            (true, false) => {
                let packed = pack_wake(segment, t);
                if let Some(slot) = self.arena.get_mut(WAKES).and_then(|w| w.get_mut(at)) {
                    *slot = packed;
                }
            }
            (false, false) => self.arena.insert_at(WAKES, at, &[pack_wake(segment, t)]),
            (false, true) => {}
        }
    }

    /// The segments whose wake-up is at or before `t`.
    pub(crate) fn segments_due(&self, t: Timestamp) -> impl Iterator<Item = u32> + '_ {
        self.arena
            .get(WAKES)
            .iter()
            .map(|w| unpack_wake(*w))
            .filter(move |(_, at)| *at <= t)
            .map(|(s, _)| s)
    }

    /// The earliest wake-up of any segment or held event.
    pub(crate) fn earliest_wake(&self) -> Timestamp {
        let segments = self
            .arena
            .get(WAKES)
            .iter()
            .map(|w| unpack_wake(*w).1)
            .min();
        segments
            .into_iter()
            .chain(self.first_pending())
            .min()
            .unwrap_or(Timestamp::MAX)
    }

    /// The current value of trait `index` (null when never set).
    pub(crate) fn trait_value(&self, index: u32) -> Value {
        codec::decode(self.trait_words(index))
    }

    /// The encoded value of trait `index` (empty when never set).
    pub(crate) fn trait_words(&self, index: u32) -> &[u64] {
        self.arena.get(TRAIT_BASE + index).get(2..).unwrap_or(&[])
    }

    /// Sets trait `index` if `(timestamp, arrival)` is newer than what set it;
    /// true when the value changed.
    pub(crate) fn set_trait(
        &mut self,
        index: u32,
        timestamp: Timestamp,
        arrival: u64,
        value: &Value,
    ) -> bool {
        let old = self.arena.get(TRAIT_BASE + index);
        if let [ts, stored_arrival, ..] = old
            && (Timestamp(*ts as i64), *stored_arrival) >= (timestamp, arrival)
        {
            return false;
        }
        let mut record = Vec::with_capacity(4);
        record.extend([timestamp.millis() as u64, arrival]);
        codec::encode(value, &mut record);
        let changed = old.get(2..) != Some(&record[2..]);
        self.arena.set(TRAIT_BASE + index, &record);
        changed
    }

    /// The raw record of trait `index`, for migration.
    pub(crate) fn trait_record(&self, index: u32) -> &[u64] {
        self.arena.get(TRAIT_BASE + index)
    }

    /// Stores a raw trait record, for migration.
    pub(crate) fn set_trait_record(&mut self, index: u32, record: &[u64]) {
        self.arena.set(TRAIT_BASE + index, record);
    }

    /// Holds an event until `now` reaches its timestamp.
    pub(crate) fn push_pending(&mut self, timestamp: Timestamp, arrival: u64, body: &EventBody) {
        let mut entry = vec![timestamp.millis() as u64, arrival, 0];
        codec::encode_body(body, &mut entry);
        entry[2] = (entry.len() - 3) as u64;
        // Entries stay sorted by (timestamp, arrival); arrivals only grow.
        let words = self.arena.get(PENDING);
        let offset = pending_entries(words)
            .find(|e| e.timestamp > timestamp)
            .map_or(words.len(), |e| e.offset);
        self.arena.insert_at(PENDING, offset, &entry);
    }

    /// Earliest due time among held events.
    pub(crate) fn first_pending(&self) -> Option<Timestamp> {
        self.arena
            .get(PENDING)
            .first()
            .map(|t| Timestamp(*t as i64))
    }

    /// Removes and returns the held events due at `now`, in (timestamp, arrival)
    /// order.
    pub(crate) fn take_due(&mut self, now: Timestamp) -> Vec<Pending> {
        let words = self.arena.get(PENDING);
        let mut due = Vec::new();
        let mut end = 0;
        for entry in pending_entries(words).take_while(|e| e.timestamp <= now) {
            if let Some(body) = codec::decode_body(entry.body) {
                due.push(Pending {
                    timestamp: entry.timestamp,
                    arrival: entry.arrival,
                    body,
                });
            }
            end = entry.offset + 3 + entry.body.len();
        }
        self.arena.remove_front(PENDING, end);
        due
    }

    /// The held events, in (timestamp, arrival) order, without removing them.
    pub(crate) fn pendings(&self) -> Vec<Pending> {
        pending_entries(self.arena.get(PENDING))
            .filter_map(|e| {
                Some(Pending {
                    timestamp: e.timestamp,
                    arrival: e.arrival,
                    body: codec::decode_body(e.body)?,
                })
            })
            .collect()
    }

    /// The raw held events, for migration.
    pub(crate) fn pending_record(&self) -> &[u64] {
        self.arena.get(PENDING)
    }

    /// Stores raw held events, for migration.
    pub(crate) fn set_pending_record(&mut self, record: &[u64]) {
        self.arena.set(PENDING, record);
    }

    /// Appends the state's bytes (little-endian words) to `out`; [`UserState::decode`]
    /// restores it. The layout is versioned by its first byte.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(STATE_FORMAT);
        for word in [
            self.now.millis() as u64,
            self.wakeup.millis() as u64,
            self.members,
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        for word in self.arena.raw() {
            out.extend_from_slice(&word.to_le_bytes());
        }
    }

    /// Restores a state from [`UserState::encode`]'s bytes. Bytes that are not a
    /// valid state (wrong version, truncated, an inconsistent arena) are an error.
    pub fn decode(bytes: &[u8]) -> Result<UserState, StateDecodeError> {
        let (&format, rest) = bytes.split_first().ok_or(StateDecodeError("empty"))?;
        if format != STATE_FORMAT {
            return Err(StateDecodeError("unknown state format"));
        }
        if rest.len() % 8 != 0 || rest.len() < 24 {
            return Err(StateDecodeError("truncated state"));
        }
        let words: Vec<u64> = rest
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let arena =
            Arena::from_raw(&words[3..]).ok_or(StateDecodeError("inconsistent state arena"))?;
        Ok(UserState {
            now: Timestamp(words[0] as i64),
            wakeup: Timestamp(words[1] as i64),
            members: words[2],
            arena,
        })
    }

    /// Frees what pruning left unused.
    pub(crate) fn tidy(&mut self) {
        self.arena.shrink();
    }
}

/// One held event inside the `PENDING` record.
struct PendingEntry<'a> {
    offset: usize,
    timestamp: Timestamp,
    arrival: u64,
    body: &'a [u64],
}

fn pending_entries(words: &[u64]) -> impl Iterator<Item = PendingEntry<'_>> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        let [ts, arrival, len, ..] = words.get(offset..)? else {
            return None;
        };
        let start = offset + 3;
        let end = (start + *len as usize).min(words.len());
        let entry = PendingEntry {
            offset,
            timestamp: Timestamp(*ts as i64),
            arrival: *arrival,
            body: &words[start..end],
        };
        offset = end;
        Some(entry)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Properties;

    #[test]
    fn states_encode_and_decode() {
        let mut state = UserState::new();
        let mut bytes = Vec::new();
        state.encode(&mut bytes);
        assert_eq!(UserState::decode(&bytes), Ok(state.clone()));
        state.now = Timestamp(1234);
        state.wakeup = Timestamp(99_999);
        state.set_member(3, true);
        state.set_member(100, true);
        state.set_trait(0, Timestamp(5), 1, &Value::from("trial"));
        bytes.clear();
        state.encode(&mut bytes);
        assert_eq!(UserState::decode(&bytes), Ok(state));
        for bad in [&[][..], &[9][..], &bytes[..bytes.len() - 3], &bytes[..20]] {
            assert!(UserState::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn membership_bits_beyond_64_live_in_the_arena() {
        let mut state = UserState::new();
        state.set_member(3, true);
        state.set_member(200, true);
        assert!(state.is_member(3) && state.is_member(200));
        assert!(!state.is_member(199) && !state.is_member(1000));
        state.set_member(200, false);
        assert!(!state.is_member(200));
        assert!(
            state.arena.get(MEMBERS_HIGH).is_empty(),
            "cleared bits free their words"
        );
    }

    #[test]
    fn segment_wakes_are_kept_per_segment() {
        let mut state = UserState::new();
        state.set_segment_wake(5, Timestamp(500));
        state.set_segment_wake(2, Timestamp(-200));
        state.set_segment_wake(9, Timestamp(900));
        assert_eq!(state.earliest_wake(), Timestamp(-200));
        assert_eq!(
            state.segments_due(Timestamp(500)).collect::<Vec<_>>(),
            vec![2, 5]
        );
        state.set_segment_wake(2, Timestamp::MAX);
        state.set_segment_wake(5, Timestamp(1000));
        assert_eq!(
            state.segments_due(Timestamp(900)).collect::<Vec<_>>(),
            vec![9]
        );
        assert_eq!(state.earliest_wake(), Timestamp(900));
        state.set_segment_wake(9, Timestamp::MAX);
        state.set_segment_wake(5, Timestamp::MAX);
        assert_eq!(state.earliest_wake(), Timestamp::MAX);
        assert_eq!(state.heap_bytes(), 0);
        // Beyond the packable range, a wake-up is stored earlier, never later.
        state.set_segment_wake(1, Timestamp::MAX.minus(crate::time::Span(1)));
        assert!(state.earliest_wake() < Timestamp::MAX);
    }

    #[test]
    fn traits_keep_the_newest_by_timestamp_then_arrival() {
        let mut state = UserState::new();
        assert!(state.set_trait(0, Timestamp(10), 1, &Value::from("trial")));
        assert!(
            !state.set_trait(0, Timestamp(5), 2, &Value::from("pro")),
            "older timestamp loses"
        );
        assert_eq!(state.trait_value(0), Value::from("trial"));
        assert!(
            state.set_trait(0, Timestamp(10), 3, &Value::from("pro")),
            "same timestamp, later arrival wins"
        );
        assert!(
            !state.set_trait(0, Timestamp(11), 4, &Value::from("pro")),
            "same value: no change"
        );
        assert_eq!(state.trait_value(1), Value::Null);
        assert_eq!(state.next_arrival(), 5);
    }

    #[test]
    fn held_events_come_out_in_timestamp_then_arrival_order() {
        let mut state = UserState::new();
        let body = |n: f64| EventBody::Identify {
            traits: [("n", Value::Number(n))]
                .into_iter()
                .collect::<Properties>(),
        };
        state.push_pending(Timestamp(30), 1, &body(1.0));
        state.push_pending(Timestamp(10), 2, &body(2.0));
        state.push_pending(Timestamp(30), 3, &body(3.0));
        state.push_pending(Timestamp(20), 4, &body(4.0));
        assert_eq!(state.first_pending(), Some(Timestamp(10)));
        assert_eq!(state.next_arrival(), 5);
        let due: Vec<_> = state
            .take_due(Timestamp(20))
            .into_iter()
            .map(|p| p.arrival)
            .collect();
        assert_eq!(due, vec![2, 4]);
        assert_eq!(state.first_pending(), Some(Timestamp(30)));
        let due: Vec<_> = state
            .take_due(Timestamp(100))
            .into_iter()
            .map(|p| (p.timestamp, p.body))
            .collect();
        assert_eq!(
            due,
            vec![(Timestamp(30), body(1.0)), (Timestamp(30), body(3.0))]
        );
        assert_eq!(state.first_pending(), None);
        assert_eq!(state.heap_bytes(), 0);
    }
}
