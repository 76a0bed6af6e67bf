//! Identity merge: folding one user's state into another's, as if the second
//! user had received both users' events.
//!
//! Every cell keeps a summary that combines: counts add, exact sums add their
//! partials, extremes and latest or earliest times compare, and kept
//! timestamps, (time, value) pairs and distinct values are inserted one by one
//! through the same insert the engine runs for events (which keeps caps and
//! order). Both states are first brought to the same `now`, so what each kept
//! is what its windows need at that instant and the union is what the merged
//! profile needs. Traits take the value with the later timestamp; on a tie the
//! target's stays, as if the source's identifies had arrived first.

use crate::cell::{
    CellKind, counter, distinct, extreme, extreme_ts, recent, staircase, sum_total, sum_window,
};
use crate::change::{Cause, Change};
use crate::codec;
use crate::event::UserId;
use crate::plan::Plan;
use crate::state::{UserState, cell_record};
use crate::time::Timestamp;

impl Plan {
    /// Folds `source` (another profile of the same person, say its anonymous
    /// one) into `target`, the profile of `user`, at `now`, and appends the
    /// changes of `user`'s memberships (cause: event). `target` may be new.
    /// What `source` itself leaves is its caller's to emit.
    pub fn merge(
        &self,
        target: &mut UserState,
        source: &UserState,
        user: &UserId,
        now: Timestamp,
        out: &mut Vec<Change>,
    ) {
        if source.is_new() {
            return;
        }
        let now = if target.is_new() {
            now.max(source.now)
        } else {
            now.max(target.now).max(source.now)
        };
        let mut source = source.clone();
        let mut ignored = Vec::new();
        self.advance(&mut source, &UserId::from(""), now, &mut ignored);
        if target.is_new() {
            target.now = now;
        } else {
            self.advance(target, user, now, out);
        }
        for c in 0..self.cells.len() as u32 {
            let words = source.cell(c);
            if !words.is_empty() {
                self.merge_cell(target, c, words);
            }
        }
        for (index, _) in self.traits.iter().enumerate() {
            let index = index as u32;
            if let [ts, _arrival, value @ ..] = source.trait_record(index) {
                let value = codec::decode(value);
                // Arrival 0: on a tie the target's own identify stays.
                target.set_trait(index, Timestamp(*ts as i64), 0, &value);
            }
        }
        for pending in source.pendings() {
            target.push_pending(pending.timestamp, 0, &pending.body);
        }
        for c in 0..self.cells.len() as u32 {
            self.prune_cell(target, c, now);
        }
        self.evaluate_all(target, user, now, Cause::Event, out);
        target.tidy();
    }

    /// Adds what cell `c` of another state holds (`words`) to `target`'s.
    fn merge_cell(&self, target: &mut UserState, c: u32, words: &[u64]) {
        let spec = &self.cells[c as usize];
        let id = cell_record(c);
        let arena = &mut target.arena;
        let pairs = || {
            words
                .chunks_exact(2)
                .map(|p| (Timestamp(p[0] as i64), f64::from_bits(p[1])))
        };
        match spec.kind {
            CellKind::Counter => counter::add(arena, id, counter::get(words)),
            CellKind::MaxTs | CellKind::MinTs => {
                if let Some(t) = extreme_ts::get(words) {
                    extreme_ts::insert(arena, id, spec.kind == CellKind::MinTs, t);
                }
            }
            CellKind::Recent | CellKind::Anchor => {
                for w in words {
                    recent::insert(arena, id, spec.cap, Timestamp(*w as i64));
                }
            }
            CellKind::SumTotal => sum_total::merge(arena, id, words),
            CellKind::SumWindow => {
                for (t, x) in pairs() {
                    sum_window::insert(arena, id, t, x);
                }
            }
            CellKind::Extreme { max } => {
                if let Some(x) = extreme::get(words) {
                    extreme::insert(arena, id, max, x);
                }
            }
            CellKind::Staircase { max } => {
                for (t, x) in pairs() {
                    staircase::insert(arena, id, max, t, x);
                }
            }
            CellKind::DistinctAll | CellKind::DistinctRecent => {
                for (seen, value) in distinct::entries(words) {
                    distinct::insert(arena, id, &codec::decode(value), seen, spec.cap);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::event::{Event, Properties};
    use crate::limits::Limits;
    use crate::segment::{RuleVersion, SegmentDef};
    use crate::time::{Span, Timestamp};
    use crate::value::Value;
    use crate::{Plan, UserId};

    #[test]
    fn an_anonymous_profile_folds_into_the_known_one() {
        let defs = [
            SegmentDef::new("two_views", "count(page_viewed) in last 7d >= 2"),
            SegmentDef::new("spent_100", "sum(order_completed.total) >= 100"),
            SegmentDef::new("pro", "plan == \"pro\""),
        ];
        let plan = Plan::compile(&defs, RuleVersion(1), &Limits::default()).unwrap();
        let now = Timestamp::parse_rfc3339("2026-03-01T12:00:00Z").unwrap();
        let order = |id: &str, user: &str, total: f64| {
            let mut p = Properties::new();
            p.insert("total", Value::Number(total));
            Event::track(id, user, "order_completed", now.minus(Span::days(1)), p)
        };
        let view = |id: &str, user: &str| {
            Event::track(
                id,
                user,
                "page_viewed",
                now.minus(Span::days(2)),
                Properties::new(),
            )
        };
        let mut changes = Vec::new();
        let mut anon = plan.new_state();
        plan.apply(&mut anon, &view("v1", "anon"), now, &mut changes);
        plan.apply(&mut anon, &order("o1", "anon", 60.0), now, &mut changes);
        let mut traits = Properties::new();
        traits.insert("plan", Value::from("pro"));
        let identify = Event::identify("i1", "anon", now.minus(Span::days(3)), traits);
        plan.apply(&mut anon, &identify, now, &mut changes);
        let mut known = plan.new_state();
        plan.apply(&mut known, &view("v2", "ann"), now, &mut changes);
        plan.apply(&mut known, &order("o2", "ann", 40.0), now, &mut changes);
        assert_eq!(plan.members(&known).count(), 0);

        changes.clear();
        let ann = UserId::from("ann");
        plan.merge(&mut known, &anon, &ann, now, &mut changes);
        let entered: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            entered,
            vec![
                "2026-03-01T12:00:00Z ann enter two_views (event)",
                "2026-03-01T12:00:00Z ann enter spent_100 (event)",
                "2026-03-01T12:00:00Z ann enter pro (event)",
            ]
        );
        // The later view leaves the 7-day window 5 days from now.
        assert_eq!(known.next_wakeup(), Some(now.plus(Span::days(5))));
        // Merging into a new profile gives the source's memberships.
        let mut fresh = plan.new_state();
        changes.clear();
        plan.merge(&mut fresh, &anon, &ann, now, &mut changes);
        let ids: Vec<&str> = plan.members(&fresh).map(|s| s.as_str()).collect();
        assert_eq!(ids, vec!["pro"]);
    }
}
