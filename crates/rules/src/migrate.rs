//! Moving user states from one rule-set version to the next.
//!
//! A [`Migration`] maps each cell of the new plan to a cell of the old plan that
//! already holds what it needs (same events, filter, kind, property and absolute
//! range; at least as large a cap; at least as long a window). Those are carried
//! over; everything else starts empty and is reported as needing backfill, with
//! the segments that read it. The node then replays the user's retained events
//! into just those cells ([`Migration::backfill`]), so lifetime state that no
//! retention could rebuild is never thrown away by an unrelated rule edit.

use std::collections::HashMap;

use crate::cell::{CellKind, distinct};
use crate::change::{Cause, Change, ChangeKind};
use crate::event::{Event, EventBody, SegmentId, UserId};
use crate::plan::{Bound, Plan};
use crate::state::{UserState, cell_record};
use crate::time::Timestamp;

/// How to move states from `old` to `new`.
#[derive(Debug)]
pub struct Migration<'a> {
    old: &'a Plan,
    new: &'a Plan,
    /// New cell → old cell it is copied from.
    cell_from: Vec<Option<u32>>,
    /// New trait → old trait it is copied from.
    trait_from: Vec<Option<u32>>,
    /// New segment → old segment with the same id.
    segment_from: Vec<Option<u32>>,
    /// Per new segment: reads a cell or trait that must be backfilled (directly or
    /// through `in_segment`).
    needs_backfill: Vec<bool>,
}

impl Plan {
    /// How states of `old` become states of this plan.
    pub fn migration_from<'a>(&'a self, old: &'a Plan) -> Migration<'a> {
        let old_cells: HashMap<CellKey<'_>, u32> = (0..old.cells.len() as u32)
            .map(|c| (cell_key(old, c), c))
            .collect();
        let cell_from: Vec<Option<u32>> = (0..self.cells.len() as u32)
            .map(|c| {
                let from = *old_cells.get(&cell_key(self, c))?;
                covers(old, from, self, c).then_some(from)
            })
            .collect();
        let trait_from = self
            .traits
            .iter()
            .map(|name| old.trait_index.get(name).copied())
            .collect();
        let segment_from = self
            .segments
            .iter()
            .map(|s| old.segment_index(s.def.id.as_str()))
            .collect();
        let fresh_traits: Vec<bool> = self
            .traits
            .iter()
            .map(|t| !old.trait_index.contains_key(t))
            .collect();
        let mut needs_backfill = vec![false; self.segments.len()];
        for reader in &self.readers {
            let mut fresh = cell_from[reader.cell as usize].is_none();
            if let crate::plan::ReaderWindow::Since { anchor, .. } = reader.window {
                fresh |= cell_from[anchor as usize].is_none();
            }
            if fresh {
                needs_backfill[reader.segment as usize] = true;
            }
        }
        for (s, seg) in self.segments.iter().enumerate() {
            if seg_reads_fresh_trait(&seg.cond, &fresh_traits) {
                needs_backfill[s] = true;
            }
        }
        // Segments are in evaluation order, so one pass propagates through
        // `in_segment`.
        for s in 0..self.segments.len() {
            if self.segments[s]
                .depends_on
                .iter()
                .any(|&d| needs_backfill[d as usize])
            {
                needs_backfill[s] = true;
            }
        }
        Migration {
            old,
            new: self,
            cell_from,
            trait_from,
            segment_from,
            needs_backfill,
        }
    }
}

fn seg_reads_fresh_trait(cond: &crate::plan::Cond, fresh: &[bool]) -> bool {
    use crate::plan::{Cond, Val};
    fn val(v: &Val, fresh: &[bool]) -> bool {
        match v {
            Val::Trait(t) => fresh[*t as usize],
            Val::Shift(base, _) => val(base, fresh),
            _ => false,
        }
    }
    match cond {
        Cond::And(a, b) | Cond::Or(a, b) => {
            seg_reads_fresh_trait(a, fresh) || seg_reads_fresh_trait(b, fresh)
        }
        Cond::Not(a) => seg_reads_fresh_trait(a, fresh),
        Cond::Compare(_, a, b) | Cond::Contains(a, b) | Cond::StartsWith(a, b) => {
            val(a, fresh) || val(b, fresh)
        }
        Cond::CompareNow { other, .. } => val(other, fresh),
        Cond::In(a, _) | Cond::IsNull(a, _) | Cond::Truthy(a) => val(a, fresh),
        Cond::TraitIs { index, .. } => fresh[*index as usize],
    }
}

/// What makes two cells hold the same kind of data.
type CellKey<'a> = (
    &'a str,
    CellKind,
    Option<&'a str>,
    Option<(Timestamp, Timestamp)>,
);

fn cell_key(plan: &Plan, c: u32) -> CellKey<'_> {
    let spec = &plan.cells[c as usize];
    (
        plan.matchers[spec.matcher as usize].key.as_str(),
        spec.kind,
        spec.property.as_deref(),
        spec.range,
    )
}

/// True when old cell `o` keeps at least what new cell `n` needs.
fn covers(old: &Plan, o: u32, new: &Plan, n: u32) -> bool {
    let (os, ns) = (&old.cells[o as usize], &new.cells[n as usize]);
    let cap_ok = match (os.cap, ns.cap) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => a >= b,
    };
    let anchor_key = |plan: &Plan, anchor: u32| {
        plan.matchers[plan.cells[anchor as usize].matcher as usize]
            .key
            .clone()
    };
    let bound_ok = ns.bounds.iter().all(|nb| match *nb {
        Bound::Last(d) => os.bounds.iter().any(|ob| matches!(*ob, Bound::Last(od) if od >= d)),
        Bound::Since { anchor, nth } => os.bounds.iter().any(|ob| {
            matches!(*ob, Bound::Since { anchor: oa, nth: on } if on == nth && anchor_key(old, oa) == anchor_key(new, anchor))
        }),
    });
    cap_ok && bound_ok
}

impl Migration<'_> {
    /// True when some segment of the new plan must be backfilled from events.
    pub fn needs_backfill(&self) -> bool {
        self.needs_backfill.iter().any(|b| *b)
    }

    /// Segments that are new or whose rule changed.
    pub fn edited_segments(&self) -> impl Iterator<Item = &SegmentId> {
        self.new
            .segments
            .iter()
            .zip(&self.segment_from)
            .filter_map(|(seg, from)| {
                let same =
                    from.is_some_and(|o| self.old.segments[o as usize].canonical == seg.canonical);
                (!same).then_some(&seg.def.id)
            })
    }

    /// Segments of the old plan that the new one no longer has.
    pub fn removed_segments(&self) -> impl Iterator<Item = &SegmentId> {
        self.old
            .segments
            .iter()
            .filter(|s| self.new.segment_index(s.def.id.as_str()).is_none())
            .map(|s| &s.def.id)
    }

    /// The segments whose membership is exact only after [`Migration::backfill`].
    pub fn segments_needing_backfill(&self) -> impl Iterator<Item = &SegmentId> {
        self.new
            .segments
            .iter()
            .zip(&self.needs_backfill)
            .filter(|(_, b)| **b)
            .map(|(s, _)| &s.def.id)
    }

    /// Moves `state` to the new plan at `now`. First advances it under the old plan
    /// (emitting what time did up to `now`), then carries over every cell and
    /// trait the new plan can reuse and re-evaluates every segment that needs no
    /// backfill, emitting changes caused by the rule change. Segments removed from
    /// the rule set emit an exit for their members. Segments needing backfill keep
    /// their old membership until [`Migration::backfill`].
    pub fn migrate(
        &self,
        state: &mut UserState,
        user: &UserId,
        now: Timestamp,
        out: &mut Vec<Change>,
    ) {
        if state.is_new() {
            return;
        }
        self.old.advance(state, user, now, out);
        let mut next = UserState::new();
        next.now = state.now;
        for (n, from) in self.cell_from.iter().enumerate() {
            let Some(o) = *from else { continue };
            let n = n as u32;
            let spec = &self.new.cells[n as usize];
            next.arena.set(cell_record(n), state.cell(o));
            // A smaller cap keeps only the newest values.
            match spec.kind {
                CellKind::Recent | CellKind::Anchor => {
                    if let Some(cap) = spec.cap {
                        let excess = next.cell(n).len().saturating_sub(cap as usize);
                        next.arena.remove_front(cell_record(n), excess);
                    }
                }
                CellKind::DistinctAll | CellKind::DistinctRecent => {
                    distinct::retain(&mut next.arena, cell_record(n), Timestamp::MIN, spec.cap);
                }
                _ => {}
            }
        }
        for (n, from) in self.trait_from.iter().enumerate() {
            if let Some(o) = *from {
                next.set_trait_record(n as u32, state.trait_record(o));
            }
        }
        next.set_pending_record(state.pending_record());
        for (n, from) in self.segment_from.iter().enumerate() {
            if let Some(o) = *from {
                next.set_member(n as u32, state.is_member(o));
            }
        }
        for (o, seg) in self.old.segments.iter().enumerate() {
            if self.new.segment_index(seg.def.id.as_str()).is_none() && state.is_member(o as u32) {
                out.push(Change {
                    user: user.clone(),
                    segment: seg.def.id.clone(),
                    kind: ChangeKind::Exit,
                    at: next.now,
                    cause: Cause::Rule,
                    version: self.new.version,
                });
            }
        }
        let ready =
            (0..self.new.segments.len() as u32).filter(|s| !self.needs_backfill[*s as usize]);
        let at = next.now;
        self.new
            .evaluate(&mut next, user, ready, at, Cause::Rule, out);
        next.tidy();
        *state = next;
    }

    /// Rebuilds the cells and traits that could not be carried over from the user's
    /// accepted events (in arrival order), then re-evaluates every segment,
    /// emitting the changes the rule change caused. Events stamped after the
    /// state's clock are already held in the state and are skipped.
    pub fn backfill<'e>(
        &self,
        state: &mut UserState,
        user: &UserId,
        events: impl IntoIterator<Item = &'e Event>,
        out: &mut Vec<Change>,
    ) {
        if state.is_new() || !self.needs_backfill() {
            return;
        }
        let now = state.now;
        let fresh_cell: Vec<bool> = self.cell_from.iter().map(Option::is_none).collect();
        let fresh_trait: Vec<bool> = self.trait_from.iter().map(Option::is_none).collect();
        for event in events {
            if event.timestamp > now {
                continue;
            }
            match &event.body {
                EventBody::Track { name, properties } => {
                    self.new.fold_track(
                        state,
                        name,
                        properties,
                        event.timestamp,
                        now,
                        Some(&fresh_cell),
                    );
                }
                EventBody::Identify { traits } => {
                    let arrival = self.new.next_arrival(state, &event.body);
                    self.new.set_traits(
                        state,
                        traits,
                        event.timestamp,
                        arrival,
                        Some(&fresh_trait),
                    );
                }
                EventBody::Alias { .. } => {}
            }
        }
        self.new.evaluate_all(state, user, now, Cause::Rule, out);
        state.tidy();
    }
}
