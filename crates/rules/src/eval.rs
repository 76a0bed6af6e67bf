//! The incremental evaluator: `apply`, `advance` and `next_wakeup`.
//!
//! Pure functions of (plan, state, input, now). An event folds into the cells its
//! name routes to, then only the segments that read those cells (and segments
//! referencing them) are re-evaluated. Time is handled by wake-ups: every
//! evaluation also computes the earliest future instant its answer could change
//! (a window's oldest event expiring, a comparison with `now` turning, a
//! future-dated event falling due). `advance` visits those instants in order and
//! evaluates every segment at each, so a change is emitted at the exact
//! millisecond it happens, with no event needed.

use std::borrow::Cow;
use std::cmp::Ordering;

use crate::cell::{
    self, CellKind, counter, distinct, extreme, extreme_ts, recent, staircase, sum_total,
    sum_window,
};
use crate::change::{Cause, Change, ChangeKind};
use crate::event::{Event, EventBody, EventName, Properties, UserId};
use crate::plan::{Bound, Cond, Plan, ReaderWindow, Route, Val};
use crate::state::{UserState, cell_record};
use crate::syntax::{AggFunc, CmpOp};
use crate::time::Timestamp;
use crate::value::Value;

/// Which segments an input can have changed.
enum Touched<'a> {
    Nothing,
    Segments(&'a [u32]),
}

impl Plan {
    /// A state for a user that has no events yet.
    pub fn new_state(&self) -> UserState {
        UserState::new()
    }

    /// Applies one accepted event at time `now` and appends the membership changes
    /// it causes (and, first, those that time caused up to `now`).
    ///
    /// `now` never moves a state backwards: an earlier `now` is taken as the
    /// state's own. An event stamped after `now` is held until it falls due.
    pub fn apply(
        &self,
        state: &mut UserState,
        event: &Event,
        now: Timestamp,
        out: &mut Vec<Change>,
    ) {
        let user = &event.user;
        let first = state.is_new();
        let now = if first { now } else { now.max(state.now) };
        if !first && state.wakeup <= now {
            self.advance(state, user, now, out);
        }
        state.now = now;
        let touched = if event.timestamp > now {
            self.defer(state, event);
            Touched::Nothing
        } else {
            let arrival = match event.body {
                EventBody::Identify { .. } => self.next_arrival(state, &event.body),
                _ => 0,
            };
            self.fold(state, &event.body, event.timestamp, arrival, now)
        };
        if first {
            // A user exists from its first event and is evaluated against every
            // segment from then on.
            self.evaluate_all(state, user, now, Cause::Event, out);
        } else if let Touched::Segments(segments) = touched {
            let segments = segments.iter().copied();
            self.evaluate(state, user, segments, now, Cause::Event, out);
        }
    }

    /// Moves the state's clock to `now`, appending every change due at or before
    /// it, each at the instant it happens.
    pub fn advance(
        &self,
        state: &mut UserState,
        user: &UserId,
        now: Timestamp,
        out: &mut Vec<Change>,
    ) {
        if state.is_new() {
            return;
        }
        let target = now.max(state.now);
        while state.wakeup <= target {
            let at = state.wakeup.max(state.now);
            state.now = at;
            // What can change at `at`: segments whose wake-up is due, the segments
            // that reference them, and whatever held events falling due touch.
            let mut due: Vec<u32> = Vec::new();
            for s in state.segments_due(at) {
                due.extend(&self.closures[s as usize]);
            }
            if state.first_pending().is_some_and(|t| t <= at) {
                for p in state.take_due(at) {
                    if let Touched::Segments(touched) =
                        self.fold(state, &p.body, p.timestamp, p.arrival, at)
                    {
                        due.extend(touched);
                    }
                }
            }
            due.sort_unstable();
            due.dedup();
            self.evaluate(state, user, due.iter().copied(), at, Cause::Time, out);
            for &s in &due {
                for &c in &self.sliding_cells[s as usize] {
                    self.prune_cell(state, c, at);
                }
            }
            state.tidy();
            if state.wakeup <= at {
                // Unreachable: wake-ups are computed strictly after `at`. Guard the
                // loop anyway.
                state.wakeup = at.next();
            }
        }
        state.now = target;
    }

    /// The earliest time any membership of this state could change with no new
    /// event.
    pub fn next_wakeup(&self, state: &UserState) -> Option<Timestamp> {
        state.next_wakeup()
    }

    /// True when the state is a member of segment `id`.
    pub fn is_member(&self, state: &UserState, id: &str) -> bool {
        self.segment_index(id).is_some_and(|s| state.is_member(s))
    }

    /// The segments the state is a member of, in evaluation order.
    pub fn members<'a>(
        &'a self,
        state: &'a UserState,
    ) -> impl Iterator<Item = &'a crate::SegmentId> + 'a {
        self.segments
            .iter()
            .enumerate()
            .filter(|(i, _)| state.is_member(*i as u32))
            .map(|(_, s)| &s.def.id)
    }

    /// Rebuilds a user's state from that user's accepted events (in arrival order)
    /// as of `now`, without emitting changes: the memberships are those of the
    /// rebuilt state.
    pub fn rebuild<'e>(
        &self,
        events: impl IntoIterator<Item = &'e Event>,
        now: Timestamp,
    ) -> UserState {
        let mut state = UserState::new();
        state.now = now;
        for event in events {
            if event.timestamp > now {
                self.defer(&mut state, event);
            } else {
                let arrival = self.next_arrival(&mut state, &event.body);
                self.fold(&mut state, &event.body, event.timestamp, arrival, now);
            }
        }
        let mut ignored = Vec::new();
        let nobody = UserId::from("");
        self.evaluate_all(&mut state, &nobody, now, Cause::Rule, &mut ignored);
        state.tidy();
        state
    }

    // ---------------------------------------------------------------------
    // Folding inputs into state.

    /// An arrival number for an identify that sets a trait the rules read (0 for
    /// anything else: only those are ordered by arrival).
    pub(crate) fn next_arrival(&self, state: &mut UserState, body: &EventBody) -> u64 {
        let reads_traits = match body {
            EventBody::Identify { traits } => {
                traits.iter().any(|(k, _)| self.trait_index.contains_key(k))
            }
            _ => false,
        };
        if reads_traits {
            state.next_arrival()
        } else {
            0
        }
    }

    /// Holds a future-dated event until it is due.
    fn defer(&self, state: &mut UserState, event: &Event) {
        if matches!(event.body, EventBody::Alias { .. }) {
            return;
        }
        let arrival = state.next_arrival();
        state.push_pending(event.timestamp, arrival, &event.body);
        state.wakeup = state.wakeup.min(event.timestamp);
    }

    fn fold<'p>(
        &'p self,
        state: &mut UserState,
        body: &EventBody,
        ts: Timestamp,
        arrival: u64,
        now: Timestamp,
    ) -> Touched<'p> {
        match body {
            EventBody::Track { name, properties } => {
                match self.fold_track(state, name, properties, ts, now, None) {
                    Some(route) => Touched::Segments(&route.segments),
                    None => Touched::Nothing,
                }
            }
            EventBody::Identify { traits } => {
                if self.set_traits(state, traits, ts, arrival, None) {
                    Touched::Segments(&self.trait_segments)
                } else {
                    Touched::Nothing
                }
            }
            EventBody::Alias { .. } => Touched::Nothing,
        }
    }

    /// Inserts a due track event into the cells whose matcher it passes (only the
    /// cells flagged in `only`, when given: a backfill).
    pub(crate) fn fold_track(
        &self,
        state: &mut UserState,
        name: &EventName,
        properties: &Properties,
        ts: Timestamp,
        now: Timestamp,
        only: Option<&[bool]>,
    ) -> Option<&Route> {
        let route = self.routes.get(name)?;
        for &m in &route.matchers {
            let matcher = &self.matchers[m as usize];
            if only.is_some_and(|only| matcher.cells.iter().all(|c| !only[*c as usize])) {
                continue;
            }
            if let Some(filter) = &matcher.filter
                && !self.filter_passes(state, filter, properties)
            {
                continue;
            }
            for &c in &matcher.cells {
                if only.is_none_or(|only| only[c as usize]) {
                    self.insert(state, c, properties, ts, now);
                }
            }
        }
        Some(route)
    }

    fn filter_passes(&self, state: &UserState, filter: &Cond, properties: &Properties) -> bool {
        let mut eval = Evaluator {
            plan: self,
            state,
            props: Some(properties),
            now: state.now,
            wake: Timestamp::MAX,
        };
        eval.cond(filter).0
    }

    /// Applies an identify's referenced traits where it is newer (by timestamp, then
    /// arrival) than what set them; true when any changed.
    pub(crate) fn set_traits(
        &self,
        state: &mut UserState,
        traits: &Properties,
        ts: Timestamp,
        arrival: u64,
        only: Option<&[bool]>,
    ) -> bool {
        let mut changed = false;
        for (key, value) in traits.iter() {
            let Some(&index) = self.trait_index.get(key) else {
                continue;
            };
            if only.is_some_and(|only| !only[index as usize]) {
                continue;
            }
            changed |= state.set_trait(index, ts, arrival, value);
        }
        changed
    }

    fn insert(
        &self,
        state: &mut UserState,
        c: u32,
        props: &Properties,
        ts: Timestamp,
        now: Timestamp,
    ) {
        let spec = &self.cells[c as usize];
        if let Some((start, end)) = spec.range
            && (ts < start || ts > end)
        {
            return;
        }
        // A late event that every sliding window reading this cell has already let
        // go of changes nothing.
        let bound = if spec.kind.is_suffix() {
            self.prune_bound(state, c, now)
        } else {
            Timestamp::MIN
        };
        if ts < bound {
            return;
        }
        let property = spec.property.as_deref().map(|p| props.get(p));
        let number = property.and_then(Value::as_number);
        let arena = &mut state.arena;
        let id = cell_record(c);
        match spec.kind {
            CellKind::Counter => counter::increment(arena, id),
            CellKind::MaxTs => extreme_ts::insert(arena, id, false, ts),
            CellKind::MinTs => extreme_ts::insert(arena, id, true, ts),
            CellKind::Recent | CellKind::Anchor => recent::insert(arena, id, spec.cap, ts),
            CellKind::SumTotal => {
                if let Some(x) = number {
                    sum_total::insert(arena, id, x);
                }
            }
            CellKind::SumWindow => {
                if let Some(x) = number {
                    sum_window::insert(arena, id, ts, x);
                }
            }
            CellKind::Extreme { max } => {
                if let Some(x) = number {
                    extreme::insert(arena, id, max, x);
                }
            }
            CellKind::Staircase { max } => {
                if let Some(x) = number {
                    staircase::insert(arena, id, max, ts, x);
                }
            }
            CellKind::DistinctAll | CellKind::DistinctRecent => {
                let Some(value) = property.filter(|v| !v.is_null()) else {
                    return;
                };
                let seen = if spec.kind == CellKind::DistinctAll {
                    Timestamp::MIN
                } else {
                    ts
                };
                distinct::insert(arena, id, value, seen, spec.cap);
            }
        }
        self.prune_to(state, c, bound);
    }

    /// The oldest time a sliding cell must still keep at `now`: the widest of its
    /// windows. A `since` window only lets go once its anchor can no longer move
    /// back (N anchors exist), because a late anchor could reopen older events.
    fn prune_bound(&self, state: &UserState, c: u32, now: Timestamp) -> Timestamp {
        let bounds = &self.cells[c as usize].bounds;
        let mut bound = Timestamp::MAX;
        for b in bounds {
            let lower = match *b {
                Bound::Last(d) => now.minus(d).next(),
                Bound::Since { anchor, nth } => {
                    let anchors = state.cell(anchor);
                    if anchors.len() >= nth as usize {
                        recent::nth_newest_or_oldest(anchors, nth).unwrap_or(Timestamp::MIN)
                    } else {
                        Timestamp::MIN
                    }
                }
            };
            bound = bound.min(lower);
        }
        if bounds.is_empty() {
            Timestamp::MIN
        } else {
            bound
        }
    }

    pub(crate) fn prune_cell(&self, state: &mut UserState, c: u32, now: Timestamp) {
        let bound = self.prune_bound(state, c, now);
        self.prune_to(state, c, bound);
    }

    /// Drops what cell `c` keeps from before `bound`.
    fn prune_to(&self, state: &mut UserState, c: u32, bound: Timestamp) {
        if bound == Timestamp::MIN {
            return;
        }
        match self.cells[c as usize].kind {
            CellKind::Recent => recent::prune(&mut state.arena, cell_record(c), bound),
            CellKind::SumWindow => sum_window::prune(&mut state.arena, cell_record(c), bound),
            CellKind::Staircase { .. } => staircase::prune(&mut state.arena, cell_record(c), bound),
            CellKind::DistinctRecent => {
                distinct::retain(&mut state.arena, cell_record(c), bound, None)
            }
            _ => {}
        }
    }

    // ---------------------------------------------------------------------
    // Evaluation.

    pub(crate) fn evaluate_all(
        &self,
        state: &mut UserState,
        user: &UserId,
        now: Timestamp,
        cause: Cause,
        out: &mut Vec<Change>,
    ) {
        let all = 0..self.segments.len() as u32;
        self.evaluate(state, user, all, now, cause, out);
    }

    /// Re-evaluates `segments` (in evaluation order) at `now`, records each one's
    /// next wake-up, and appends the membership changes.
    pub(crate) fn evaluate(
        &self,
        state: &mut UserState,
        user: &UserId,
        segments: impl IntoIterator<Item = u32>,
        now: Timestamp,
        cause: Cause,
        out: &mut Vec<Change>,
    ) {
        for s in segments {
            let mut eval = Evaluator {
                plan: self,
                state,
                props: None,
                now,
                wake: Timestamp::MAX,
            };
            let (member, segment_wake) = eval.cond(&self.segments[s as usize].cond);
            state.set_segment_wake(s, segment_wake);
            if member != state.is_member(s) {
                state.set_member(s, member);
                out.push(Change {
                    user: user.clone(),
                    segment: self.segments[s as usize].def.id.clone(),
                    kind: if member {
                        ChangeKind::Enter
                    } else {
                        ChangeKind::Exit
                    },
                    at: now,
                    cause,
                    version: self.version,
                });
            }
        }
        state.wakeup = state.earliest_wake();
    }
}

/// Evaluates conditions over one state (or, for filters, one event's properties)
/// at `now`, and collects the earliest future instant the result could change.
pub(crate) struct Evaluator<'a> {
    plan: &'a Plan,
    state: &'a UserState,
    props: Option<&'a Properties>,
    now: Timestamp,
    wake: Timestamp,
}

const NULL: &Value = &Value::Null;

impl<'a> Evaluator<'a> {
    /// An evaluator of `state`'s conditions at `now`.
    pub(crate) fn new(plan: &'a Plan, state: &'a UserState, now: Timestamp) -> Self {
        Evaluator {
            plan,
            state,
            props: None,
            now,
            wake: Timestamp::MAX,
        }
    }

    fn wake_at(&mut self, t: Timestamp) {
        if t > self.now && t < self.wake {
            self.wake = t;
        }
    }

    /// Evaluates `cond` at `now`: its truth, and the earliest instant after `now`
    /// at which that truth could change with no new event (`MAX`: never).
    ///
    /// Instants combine by what they can do to the result: a conjunction with a
    /// false side stays false until that side can turn true; with two false sides,
    /// until both can. A side that is false (in `and`; true in `or`) and can never
    /// turn without a new event settles the result, and the other side is not
    /// evaluated at all.
    pub(crate) fn cond(&mut self, cond: &'a Cond) -> (bool, Timestamp) {
        match cond {
            Cond::And(a, b) => {
                let (x, wx) = self.cond(a);
                if !x && wx == Timestamp::MAX {
                    // False until a new event: the other side cannot matter.
                    return (false, Timestamp::MAX);
                }
                let (y, wy) = self.cond(b);
                let wake = match (x, y) {
                    (true, true) => wx.min(wy),
                    (true, false) => wy,
                    (false, true) => wx,
                    (false, false) => wx.max(wy),
                };
                (x && y, wake)
            }
            Cond::Or(a, b) => {
                let (x, wx) = self.cond(a);
                if x && wx == Timestamp::MAX {
                    // True until a new event: the other side cannot matter.
                    return (true, Timestamp::MAX);
                }
                let (y, wy) = self.cond(b);
                let wake = match (x, y) {
                    (false, false) => wx.min(wy),
                    (false, true) => wy,
                    (true, false) => wx,
                    (true, true) => wx.max(wy),
                };
                (x || y, wake)
            }
            Cond::Not(a) => {
                let (x, w) = self.cond(a);
                (!x, w)
            }
            leaf => {
                let outer = std::mem::replace(&mut self.wake, Timestamp::MAX);
                let truth = self.leaf(leaf);
                let wake = std::mem::replace(&mut self.wake, outer);
                (truth, wake)
            }
        }
    }

    /// A condition without `and`, `or`, `not`; its wake-ups go to `self.wake`.
    fn leaf(&mut self, cond: &'a Cond) -> bool {
        match cond {
            Cond::And(..) | Cond::Or(..) | Cond::Not(_) => self.cond(cond).0,
            Cond::Compare(op, a, b) => {
                if let Some(truth) = self.threshold(*op, a, b) {
                    return truth;
                }
                let (x, y) = (self.val(a), self.val(b));
                compare(*op, &x, &y)
            }
            Cond::CompareNow { op, other, offset } => {
                let Some(x) = self.val(other).as_timestamp() else {
                    return false;
                };
                // `x op now + offset` turns as `now` crosses `x - offset`.
                let turn = x.minus(*offset);
                match op {
                    CmpOp::Le | CmpOp::Gt => self.wake_at(turn),
                    CmpOp::Lt | CmpOp::Ge => self.wake_at(turn.next()),
                    CmpOp::Eq | CmpOp::Ne => {
                        self.wake_at(turn);
                        self.wake_at(turn.next());
                    }
                }
                let rhs = Value::Timestamp(self.now.plus(*offset));
                compare(*op, &Value::Timestamp(x), &rhs)
            }
            Cond::TraitIs {
                index,
                literal,
                negated,
            } => {
                let words = self.state.trait_words(*index);
                if *negated {
                    // `!=` holds only between values of one type.
                    let same_type = words
                        .first()
                        .zip(literal.first())
                        .is_some_and(|(a, b)| a & 0xff == b & 0xff);
                    same_type && words != &literal[..]
                } else {
                    words == &literal[..]
                }
            }
            Cond::In(a, list) => {
                let x = self.val(a);
                list.iter().any(|v| x.equals(v) == Some(true))
            }
            Cond::Contains(a, b) => {
                let (x, y) = (self.val(a), self.val(b));
                x.contains(&y)
            }
            Cond::StartsWith(a, b) => {
                let (x, y) = (self.val(a), self.val(b));
                x.starts_with(&y)
            }
            Cond::IsNull(a, negated) => self.val(a).is_null() != *negated,
            Cond::Truthy(a) => self.val(a).is_true(),
        }
    }

    /// A sliding-window `count` or `distinct` compared with a number. Such a value
    /// only falls as time passes, so `value >= m` turns false exactly when the
    /// m-th newest event (or value) leaves the window, and never when fewer than m
    /// are in it. Waking only then, instead of at every expiry, spares most users
    /// most wake-ups (a user with 3 logins needs none for `count(login) >= 20`).
    fn threshold(&mut self, op: CmpOp, a: &'a Val, b: &'a Val) -> Option<bool> {
        let (reader, op, k) = match (a, b) {
            (Val::Reader(r), Val::Lit(Value::Number(k))) => (*r, op, *k),
            (Val::Lit(Value::Number(k)), Val::Reader(r)) => (*r, op.flipped(), *k),
            _ => return None,
        };
        let reader_spec = &self.plan.readers[reader as usize];
        let ReaderWindow::Last(d) = reader_spec.window else {
            return None;
        };
        let words = self.state.cell(reader_spec.cell);
        let lower = self.now.minus(d).next();
        let kind = self.plan.cells[reader_spec.cell as usize].kind;
        let mut newest_first: [Timestamp; 2] = [Timestamp::MIN; 2];
        let thresholds = crossing_thresholds(op, k);
        let count = match (reader_spec.func, kind) {
            (AggFunc::Count, CellKind::Recent) => {
                let count = recent::count_from(words, lower);
                for (slot, m) in newest_first.iter_mut().zip(thresholds) {
                    if let Some(m) = m.filter(|m| *m >= 1 && *m <= count) {
                        *slot = Timestamp(words[words.len() - m] as i64);
                    }
                }
                count
            }
            (AggFunc::Distinct, CellKind::DistinctRecent) => {
                let deepest = thresholds.iter().flatten().copied().max().unwrap_or(0);
                let mut stack = [Timestamp::MIN; 16];
                let mut heap = Vec::new();
                let newest = if deepest <= stack.len() {
                    &mut stack[..deepest]
                } else {
                    heap.resize(deepest, Timestamp::MIN);
                    &mut heap[..]
                };
                let count = distinct::newest_from(words, lower, newest);
                for (slot, m) in newest_first.iter_mut().zip(thresholds) {
                    if let Some(m) = m.filter(|m| *m >= 1 && *m <= count) {
                        *slot = newest[m - 1];
                    }
                }
                count
            }
            _ => return None,
        };
        for t in newest_first {
            if t != Timestamp::MIN {
                self.wake_at(t.plus(d));
            }
        }
        Some(compare(op, &Value::Number(count as f64), &Value::Number(k)))
    }

    fn val(&mut self, val: &'a Val) -> Cow<'a, Value> {
        match val {
            Val::Lit(v) => Cow::Borrowed(v),
            Val::Now => Cow::Owned(Value::Timestamp(self.now)),
            Val::Trait(i) => Cow::Owned(self.state.trait_value(*i)),
            Val::Prop(name) => Cow::Borrowed(self.props.map_or(NULL, |p| p.get(name))),
            Val::Reader(r) => Cow::Owned(self.read(*r)),
            Val::Segment(s) => Cow::Owned(Value::Bool(self.state.is_member(*s))),
            Val::Shift(base, span) => match self.val(base).as_timestamp() {
                Some(t) => Cow::Owned(Value::Timestamp(t.plus(*span))),
                None => Cow::Borrowed(NULL),
            },
        }
    }

    /// A reader's value at `now`; for sliding windows also the instant its oldest
    /// event inside the window leaves it.
    pub(crate) fn read(&mut self, r: u32) -> Value {
        let reader = &self.plan.readers[r as usize];
        let spec = &self.plan.cells[reader.cell as usize];
        let lower = match reader.window {
            ReaderWindow::All => Timestamp::MIN,
            ReaderWindow::Last(d) => self.now.minus(d).next(),
            ReaderWindow::Since { anchor, nth } => {
                match recent::nth_newest_or_oldest(self.state.cell(anchor), nth) {
                    Some(t) => t,
                    None => return empty_value(reader.func),
                }
            }
        };
        let state = self.state;
        let words = state.cell(reader.cell);
        if let ReaderWindow::Last(d) = reader.window {
            let oldest_inside = match spec.kind {
                CellKind::MaxTs => extreme_ts::get(words).filter(|t| *t >= lower),
                CellKind::Recent => recent::earliest_from(words, lower),
                CellKind::SumWindow | CellKind::Staircase { .. } => {
                    cell::earliest_pair_from(words, lower)
                }
                CellKind::DistinctRecent => distinct::earliest_from(words, lower),
                _ => None,
            };
            if let Some(t) = oldest_inside {
                self.wake_at(t.plus(d));
            }
        }
        let number = |n: usize| Value::Number(n as f64);
        let timestamp = |t: Option<Timestamp>| t.map_or(Value::Null, Value::Timestamp);
        match (reader.func, spec.kind) {
            (AggFunc::Count, CellKind::Counter) => Value::Number(counter::get(words) as f64),
            (AggFunc::Count, _) => number(recent::count_from(words, lower)),
            (AggFunc::Exists, _) => Value::Bool(extreme_ts::get(words).is_some_and(|t| t >= lower)),
            (AggFunc::LastSeen, _) => timestamp(extreme_ts::get(words).filter(|t| *t >= lower)),
            (AggFunc::FirstSeen, CellKind::MinTs) => timestamp(extreme_ts::get(words)),
            (AggFunc::FirstSeen, _) => timestamp(recent::earliest_from(words, lower)),
            (AggFunc::Sum | AggFunc::Avg, kind) => {
                let (count, sum) = if kind == CellKind::SumTotal {
                    sum_total::get(words)
                } else {
                    sum_window::sum_from(words, lower)
                };
                match reader.func {
                    AggFunc::Sum => Value::Number(sum.value()),
                    _ if count == 0 => Value::Null,
                    _ => Value::Number(sum.value() / count as f64),
                }
            }
            (AggFunc::Min | AggFunc::Max, CellKind::Extreme { .. }) => {
                extreme::get(words).map_or(Value::Null, Value::Number)
            }
            (AggFunc::Min | AggFunc::Max, _) => {
                staircase::best_from(words, lower).map_or(Value::Null, Value::Number)
            }
            (AggFunc::Distinct, _) => number(distinct::count_from(words, lower)),
        }
    }
}

/// An aggregate over no events: counts and sums are 0, `exists` is false, the rest
/// are null.
fn empty_value(func: AggFunc) -> Value {
    match func {
        AggFunc::Count | AggFunc::Distinct | AggFunc::Sum => Value::Number(0.0),
        AggFunc::Exists => Value::Bool(false),
        AggFunc::Avg | AggFunc::Min | AggFunc::Max | AggFunc::FirstSeen | AggFunc::LastSeen => {
            Value::Null
        }
    }
}

/// The counts at which `count op k` can change truth as the count falls: `m` such
/// that the truth differs between `count >= m` and `count < m`.
fn crossing_thresholds(op: CmpOp, k: f64) -> [Option<usize>; 2] {
    let at = |m: f64| (m >= 1.0 && m <= usize::MAX as f64).then_some(m as usize);
    match op {
        CmpOp::Ge | CmpOp::Lt => [at(k.ceil()), None],
        CmpOp::Gt | CmpOp::Le => [at(k.floor() + 1.0), None],
        CmpOp::Eq | CmpOp::Ne if k.fract() == 0.0 => [at(k), at(k + 1.0)],
        CmpOp::Eq | CmpOp::Ne => [None, None],
    }
}

/// A typed comparison; false when the values do not compare.
pub(crate) fn compare(op: CmpOp, a: &Value, b: &Value) -> bool {
    match op {
        CmpOp::Eq => a.equals(b) == Some(true),
        CmpOp::Ne => a.equals(b) == Some(false),
        CmpOp::Lt => a.compare(b) == Some(Ordering::Less),
        CmpOp::Le => matches!(a.compare(b), Some(Ordering::Less | Ordering::Equal)),
        CmpOp::Gt => a.compare(b) == Some(Ordering::Greater),
        CmpOp::Ge => matches!(a.compare(b), Some(Ordering::Greater | Ordering::Equal)),
    }
}
