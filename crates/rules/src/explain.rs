//! Why a user is in a segment or not: the rule's tree with the value of every
//! clause and aggregate for one state, and the next instant the membership
//! will change with no new event.
//!
//! The tree is the checked rule (its `and`, `or` and `not` nodes are the
//! compiled condition's, one for one), each node evaluated by the same
//! evaluator the engine runs, so an explanation cannot disagree with the
//! membership it explains. The next change is found by running the engine's
//! own wake-ups forward on a copy of the state: a wake-up only says when an
//! answer *could* turn (a window letting go of an event that does not decide
//! the count), so the copy is advanced until the segment really changes.

use crate::cell::CellKind;
use crate::change::ChangeKind;
use crate::eval::Evaluator;
use crate::event::{SegmentId, UserId};
use crate::plan::{Cond, Plan};
use crate::state::UserState;
use crate::syntax::{AggFunc, Expr, ExprKind, Operand, OperandKind};
use crate::time::Timestamp;
use crate::value::Value;

/// Wake-ups a search for the next change visits at most: a user's wake-ups are
/// bounded by the events its windows hold, so this is reached only by states far
/// beyond the rule limits.
const MAX_WAKEUPS: usize = 100_000;

/// One segment's rule, evaluated for one user.
#[derive(Clone, Debug, PartialEq)]
pub struct Explanation {
    /// The segment.
    pub segment: SegmentId,
    /// Whether the user is a member now.
    pub member: bool,
    /// The instant the tree was evaluated at.
    pub now: Timestamp,
    /// The rule's tree.
    pub clause: Clause,
    /// The next change of this membership with no new event, if any.
    pub next_change: Option<NextChange>,
    /// The user's next wake-up (any segment, or a future-dated event falling due).
    pub next_wakeup: Option<Timestamp>,
}

/// A node of the rule's tree.
#[derive(Clone, Debug, PartialEq)]
pub struct Clause {
    /// The clause as rule text.
    pub text: String,
    /// Its truth now.
    pub truth: bool,
    /// The earliest instant its truth could turn with no new event.
    pub turns_at: Option<Timestamp>,
    /// The value of each operand that is not a literal (aggregates, traits,
    /// `now`, segment references).
    pub values: Vec<OperandValue>,
    /// The clauses of `and`, `or` and `not`.
    pub children: Vec<Clause>,
}

/// An operand of a clause and its value now.
#[derive(Clone, Debug, PartialEq)]
pub struct OperandValue {
    /// The operand as rule text.
    pub text: String,
    /// Its value.
    pub value: Value,
    /// True when the value is a count or distinct that the user's state keeps
    /// only up to what the rule needs (`count(x) >= 3` keeps 3 events): the
    /// true value is this or more, and the rule's answer is the same either way.
    pub at_least: bool,
}

/// When, and why, a membership will change with no new event.
#[derive(Clone, Debug, PartialEq)]
pub struct NextChange {
    /// When.
    pub at: Timestamp,
    /// Enter or exit.
    pub kind: ChangeKind,
    /// The innermost clause whose turn at `at` changes the rule's answer;
    /// `None` when a future-dated event falling due does it.
    pub clause: Option<String>,
}

impl Plan {
    /// Explains segment `segment` for the user of `state` at `now` (the state is
    /// first brought to `now` on a copy, as the engine would). `None` when the
    /// plan has no such segment.
    pub fn explain(&self, state: &UserState, segment: &str, now: Timestamp) -> Option<Explanation> {
        let s = self.segment_index(segment)?;
        let plan = &self.segments[s as usize];
        let nobody = UserId::from("");
        let mut current = state.clone();
        let mut ignored = Vec::new();
        self.advance(&mut current, &nobody, now, &mut ignored);
        let now = current.now().map_or(now, |t| t.max(now));
        let readers: Vec<u32> = (0..self.readers.len() as u32)
            .filter(|&r| self.readers[r as usize].segment == s)
            .collect();
        let mut tree = TreeBuilder {
            plan: self,
            state: &current,
            now,
            readers: readers.into_iter(),
        };
        let clause = tree.clause(&plan.expr, &plan.cond);
        Some(Explanation {
            segment: plan.def.id.clone(),
            member: current.is_member(s),
            now,
            clause,
            next_change: self.next_change(&current, s),
            next_wakeup: current.next_wakeup(),
        })
    }

    /// Runs a copy of `state` through its wake-ups until segment `s` changes.
    fn next_change(&self, state: &UserState, s: u32) -> Option<NextChange> {
        let plan = &self.segments[s as usize];
        let nobody = UserId::from("");
        let mut state = state.clone();
        let mut changes = Vec::new();
        for _ in 0..MAX_WAKEUPS {
            let at = state.next_wakeup()?;
            let before = state.clone();
            changes.clear();
            self.advance(&mut state, &nobody, at, &mut changes);
            if let Some(change) = changes.iter().find(|c| c.segment == plan.def.id) {
                let from = before.now().unwrap_or(at);
                return Some(NextChange {
                    at: change.at,
                    kind: change.kind,
                    clause: turning_clause(self, &before, from, &plan.expr, &plan.cond, at),
                });
            }
        }
        None
    }
}

/// The innermost clause, evaluated on `state` at `now`, that turns at `at`:
/// its own truth turns then, or it reads a segment (`in_segment`) whose rule
/// has such a clause (then named as `clause, because inner`).
fn turning_clause(
    plan: &Plan,
    state: &UserState,
    now: Timestamp,
    expr: &Expr,
    cond: &Cond,
    at: Timestamp,
) -> Option<String> {
    match (&expr.kind, cond) {
        (ExprKind::And(ea, eb), Cond::And(ca, cb)) | (ExprKind::Or(ea, eb), Cond::Or(ca, cb)) => {
            turning_clause(plan, state, now, ea, ca, at)
                .or_else(|| turning_clause(plan, state, now, eb, cb, at))
        }
        (ExprKind::Not(e), Cond::Not(c)) => turning_clause(plan, state, now, e, c, at),
        (kind, leaf) => {
            if Evaluator::new(plan, state, now).cond(leaf).1 == at {
                return Some(expr.to_string());
            }
            leaf_operands(kind).into_iter().find_map(|operand| {
                let OperandKind::InSegment(id) = &operand.kind else {
                    return None;
                };
                let other = &plan.segments[plan.segment_index(id.as_str())? as usize];
                let inner = turning_clause(plan, state, now, &other.expr, &other.cond, at)?;
                Some(format!("{expr}, because {inner}"))
            })
        }
    }
}

/// The operands of a clause that is not `and`, `or` or `not`.
fn leaf_operands(kind: &ExprKind) -> Vec<&Operand> {
    match kind {
        ExprKind::Compare(_, a, b) | ExprKind::Contains(a, b) | ExprKind::StartsWith(a, b) => {
            vec![a, b]
        }
        ExprKind::In(a, _) | ExprKind::Truthy(a) => vec![a],
        ExprKind::IsNull { operand, .. } => vec![operand],
        ExprKind::And(..) | ExprKind::Or(..) | ExprKind::Not(_) => Vec::new(),
    }
}

/// Builds the explained tree, handing out the segment's aggregate readers in
/// the order the compiler created them (the rule's reading order).
struct TreeBuilder<'a, I> {
    plan: &'a Plan,
    state: &'a UserState,
    now: Timestamp,
    readers: I,
}

impl<I: Iterator<Item = u32>> TreeBuilder<'_, I> {
    fn clause(&mut self, expr: &Expr, cond: &Cond) -> Clause {
        let (truth, turns) = Evaluator::new(self.plan, self.state, self.now).cond(cond);
        let mut clause = Clause {
            text: expr.to_string(),
            truth,
            turns_at: (turns != Timestamp::MAX).then_some(turns),
            values: Vec::new(),
            children: Vec::new(),
        };
        match (&expr.kind, cond) {
            (ExprKind::And(ea, eb), Cond::And(ca, cb))
            | (ExprKind::Or(ea, eb), Cond::Or(ca, cb)) => {
                clause.children = vec![self.clause(ea, ca), self.clause(eb, cb)];
            }
            (ExprKind::Not(e), Cond::Not(c)) => clause.children = vec![self.clause(e, c)],
            (kind, _) => {
                for operand in leaf_operands(kind) {
                    let mut at_least = false;
                    let value = self.value(operand, &mut at_least);
                    if !matches!(operand.kind, OperandKind::Literal(_)) {
                        clause.values.push(OperandValue {
                            text: operand.to_string(),
                            value,
                            at_least,
                        });
                    }
                }
            }
        }
        clause
    }

    /// An operand's value now; consumes the readers of the aggregates in it and
    /// sets `at_least` when an aggregate's value is a saturated count.
    fn value(&mut self, operand: &Operand, at_least: &mut bool) -> Value {
        match &operand.kind {
            OperandKind::Literal(v) => v.clone(),
            OperandKind::Now => Value::Timestamp(self.now),
            OperandKind::Trait(name) => match self.plan.trait_index.get(name) {
                Some(&i) => self.state.trait_value(i),
                None => Value::Null,
            },
            // Properties are read only inside `where` filters, never here.
            OperandKind::Property(_) => Value::Null,
            OperandKind::InSegment(id) => Value::Bool(
                self.plan
                    .segment_index(id.as_str())
                    .is_some_and(|i| self.state.is_member(i)),
            ),
            OperandKind::Aggregate(_) => match self.readers.next() {
                Some(r) => {
                    let value = Evaluator::new(self.plan, self.state, self.now).read(r);
                    *at_least |= self.saturated(r, &value);
                    value
                }
                None => Value::Null,
            },
            OperandKind::Shift(base, span) => match self.value(base, at_least).as_timestamp() {
                Some(t) => Value::Timestamp(t.plus(*span)),
                None => Value::Null,
            },
        }
    }
}

impl<I> TreeBuilder<'_, I> {
    /// True when reader `r`'s `value` is a count or distinct at the cap of a
    /// cell that keeps at most that many events or values.
    fn saturated(&self, r: u32, value: &Value) -> bool {
        let reader = &self.plan.readers[r as usize];
        let spec = &self.plan.cells[reader.cell as usize];
        let capped = matches!(
            spec.kind,
            CellKind::Recent | CellKind::DistinctAll | CellKind::DistinctRecent
        );
        matches!(reader.func, AggFunc::Count | AggFunc::Distinct)
            && capped
            && spec
                .cap
                .is_some_and(|cap| value.as_number() == Some(f64::from(cap)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Properties};
    use crate::limits::Limits;
    use crate::segment::{RuleVersion, SegmentDef};
    use crate::time::Span;

    fn at(text: &str) -> Timestamp {
        Timestamp::parse_rfc3339(text).unwrap()
    }

    fn plan(rules: &[(&str, &str)]) -> Plan {
        let defs: Vec<SegmentDef> = rules.iter().map(|(id, r)| SegmentDef::new(id, r)).collect();
        Plan::compile(&defs, RuleVersion(1), &Limits::default()).unwrap()
    }

    #[test]
    fn a_count_in_a_window_shows_its_value_and_the_order_that_will_expire_it() {
        let plan = plan(&[(
            "repeat",
            "count(order_completed) in last 90d >= 2 and plan == \"pro\"",
        )]);
        let now = at("2026-03-01T00:00:00Z");
        let mut state = plan.new_state();
        let mut changes = Vec::new();
        let mut props = Properties::new();
        props.insert("plan", Value::String("pro".into()));
        let identify = Event::identify("i1", "ann", now.minus(Span::days(30)), props);
        plan.apply(&mut state, &identify, now, &mut changes);
        for (id, days) in [("o1", 10), ("o2", 40), ("o3", 5)] {
            let order = Event::track(
                id,
                "ann",
                "order_completed",
                now.minus(Span::days(days)),
                Properties::new(),
            );
            plan.apply(&mut state, &order, now, &mut changes);
        }
        let e = plan.explain(&state, "repeat", now).unwrap();
        assert!(e.member);
        assert_eq!(e.clause.children.len(), 2);
        let count = &e.clause.children[0];
        assert_eq!(count.text, "count(order_completed) in last 90d >= 2");
        assert!(count.truth);
        assert_eq!(
            count.values,
            // `>= 2` needs only the two newest orders: the state keeps those.
            vec![OperandValue {
                text: "count(order_completed) in last 90d".into(),
                value: Value::Number(2.0),
                at_least: true,
            }]
        );
        let traits = &e.clause.children[1];
        assert_eq!(
            traits.values,
            vec![OperandValue {
                text: "plan".into(),
                value: Value::String("pro".into()),
                at_least: false,
            }]
        );
        assert_eq!(traits.turns_at, None);
        // Of three orders, the second newest (10 days old) leaving the window
        // leaves one: that is the exit, 80 days from now.
        let next = e.next_change.unwrap();
        assert_eq!(next.kind, ChangeKind::Exit);
        assert_eq!(next.at, now.minus(Span::days(10)).plus(Span::days(90)));
        assert_eq!(
            next.clause.as_deref(),
            Some("count(order_completed) in last 90d >= 2")
        );
        assert_eq!(e.next_wakeup, Some(next.at));
    }

    #[test]
    fn a_user_out_of_a_segment_that_no_time_can_change_has_no_next_change() {
        let plan = plan(&[
            ("buyers", "exists(order_completed)"),
            ("not_buyers", "not in_segment(\"buyers\")"),
        ]);
        let now = at("2026-03-01T00:00:00Z");
        let mut state = plan.new_state();
        let mut changes = Vec::new();
        let login = Event::track("l1", "bob", "login", now, Properties::new());
        plan.apply(&mut state, &login, now, &mut changes);
        let e = plan.explain(&state, "not_buyers", now).unwrap();
        assert!(e.member);
        assert_eq!(e.clause.text, "not in_segment(\"buyers\")");
        assert_eq!(
            e.clause.children[0].values,
            vec![OperandValue {
                text: "in_segment(\"buyers\")".into(),
                value: Value::Bool(false),
                at_least: false,
            }]
        );
        assert_eq!(e.next_change, None);
        assert!(plan.explain(&state, "nope", now).is_none());
    }

    #[test]
    fn a_future_dated_event_is_named_as_no_clause() {
        let plan = plan(&[("buyers", "exists(order_completed)")]);
        let now = at("2026-03-01T00:00:00Z");
        let mut state = plan.new_state();
        let mut changes = Vec::new();
        let order = Event::track(
            "o1",
            "cy",
            "order_completed",
            now.plus(Span::days(1)),
            Properties::new(),
        );
        plan.apply(&mut state, &order, now, &mut changes);
        let e = plan.explain(&state, "buyers", now).unwrap();
        assert!(!e.member);
        let next = e.next_change.unwrap();
        assert_eq!(
            (next.at, next.kind, next.clause),
            (now.plus(Span::days(1)), ChangeKind::Enter, None)
        );
    }
}
