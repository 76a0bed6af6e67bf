//! The reference evaluator: membership straight from SPEC.md section 3.
//!
//! Given every accepted event of a user and an instant `T`, it evaluates each rule
//! from its syntax tree over the full event list, with no state, no caps, no
//! pruning and no wake-ups. It is slow and obviously right, which is its job: the
//! tests compare the incremental engine against it, and later layers (node,
//! cluster) compare their results against it too.

use std::collections::{BTreeSet, HashMap};

use crate::check::{CheckedSet, check_set};
use crate::error::Error;
use crate::eval::compare;
use crate::event::{Event, EventBody, Properties, SegmentId};
use crate::exact_sum::ExactSum;
use crate::limits::Limits;
use crate::segment::SegmentDef;
use crate::syntax::{
    AggFunc, Aggregate, EventSelector, Expr, ExprKind, Operand, OperandKind, Window,
};
use crate::time::Timestamp;
use crate::value::{Value, ValueKey};

/// A checked rule set evaluated by brute force.
#[derive(Clone, Debug)]
pub struct Reference {
    set: CheckedSet,
}

impl Reference {
    /// Checks `defs` (the same checks as [`crate::Plan::compile`]).
    pub fn new(defs: &[SegmentDef], limits: &Limits) -> Result<Reference, Error> {
        Ok(Reference {
            set: check_set(defs, limits, None)?,
        })
    }

    /// The segments a user with these accepted events (in arrival order) is a member
    /// of at `at`, or `None` when the user does not exist (has no events).
    pub fn members(&self, events: &[Event], at: Timestamp) -> BTreeSet<SegmentId> {
        if events.is_empty() {
            return BTreeSet::new();
        }
        let traits = traits_at(events, at);
        let mut members: HashMap<&str, bool> = HashMap::new();
        let mut out = BTreeSet::new();
        for seg in &self.set.segments {
            let ctx = Ctx {
                events,
                at,
                traits: &traits,
                members: &members,
                props: None,
            };
            let member = ctx.cond(&seg.rule.expr);
            members.insert(seg.def.id.as_str(), member);
            if member {
                out.insert(seg.def.id.clone());
            }
        }
        out
    }
}

/// Profile traits as of `at`: per key, the value of the due identify with the latest
/// timestamp, ties to the later arrival.
fn traits_at(events: &[Event], at: Timestamp) -> HashMap<&str, &Value> {
    let mut best: HashMap<&str, (Timestamp, usize, &Value)> = HashMap::new();
    for (arrival, event) in events.iter().enumerate() {
        let EventBody::Identify { traits } = &event.body else {
            continue;
        };
        if event.timestamp > at {
            continue;
        }
        for (key, value) in traits.iter() {
            let newer = best
                .get(key)
                .is_none_or(|(t, a, _)| (event.timestamp, arrival) > (*t, *a));
            if newer {
                best.insert(key, (event.timestamp, arrival, value));
            }
        }
    }
    best.into_iter().map(|(k, (_, _, v))| (k, v)).collect()
}

struct Ctx<'a> {
    events: &'a [Event],
    at: Timestamp,
    traits: &'a HashMap<&'a str, &'a Value>,
    members: &'a HashMap<&'a str, bool>,
    /// The event being filtered, inside `where`.
    props: Option<&'a Properties>,
}

impl Ctx<'_> {
    fn cond(&self, expr: &Expr) -> bool {
        match &expr.kind {
            ExprKind::And(a, b) => self.cond(a) && self.cond(b),
            ExprKind::Or(a, b) => self.cond(a) || self.cond(b),
            ExprKind::Not(e) => !self.cond(e),
            ExprKind::Compare(op, a, b) => compare(*op, &self.value(a), &self.value(b)),
            ExprKind::In(a, list) => {
                let x = self.value(a);
                list.iter().any(|v| x.equals(v) == Some(true))
            }
            ExprKind::Contains(a, b) => self.value(a).contains(&self.value(b)),
            ExprKind::StartsWith(a, b) => self.value(a).starts_with(&self.value(b)),
            ExprKind::IsNull { operand, negated } => self.value(operand).is_null() != *negated,
            ExprKind::Truthy(a) => self.value(a).is_true(),
        }
    }

    fn value(&self, op: &Operand) -> Value {
        match &op.kind {
            OperandKind::Literal(v) => v.clone(),
            OperandKind::Now => Value::Timestamp(self.at),
            OperandKind::Trait(name) => self
                .traits
                .get(&**name)
                .map_or(Value::Null, |v| (*v).clone()),
            OperandKind::Property(name) => self.props.map_or(Value::Null, |p| p.get(name).clone()),
            OperandKind::InSegment(id) => {
                Value::Bool(self.members.get(id.as_str()).copied().unwrap_or(false))
            }
            OperandKind::Shift(base, span) => self
                .value(base)
                .as_timestamp()
                .map_or(Value::Null, |t| Value::Timestamp(t.plus(*span))),
            OperandKind::Aggregate(agg) => self.aggregate(agg),
        }
    }

    /// Due events of the selector's name that pass its filter.
    fn selected<'e>(
        &'e self,
        selector: &'e EventSelector,
    ) -> impl Iterator<Item = (Timestamp, &'e Properties)> + 'e {
        self.events.iter().filter_map(move |e| match &e.body {
            EventBody::Track { name, properties }
                if *name == selector.name && e.timestamp <= self.at =>
            {
                let passes = selector.filter.as_ref().is_none_or(|f| {
                    let ctx = Ctx {
                        props: Some(properties),
                        ..*self
                    };
                    ctx.cond(f)
                });
                passes.then_some((e.timestamp, properties))
            }
            _ => None,
        })
    }

    fn aggregate(&self, agg: &Aggregate) -> Value {
        let in_window: Box<dyn Fn(Timestamp) -> bool> = match &agg.window {
            Window::Lifetime => Box::new(|_| true),
            Window::Last(d) => {
                let start = self.at.minus(*d);
                Box::new(move |t| t > start)
            }
            Window::Between(a, b) => {
                let (a, b) = (*a, *b);
                Box::new(move |t| a <= t && t <= b)
            }
            Window::Since { nth, anchor } => {
                let mut anchors: Vec<Timestamp> = self.selected(anchor).map(|(t, _)| t).collect();
                anchors.sort_unstable_by(|a, b| b.cmp(a));
                match anchors.get(*nth as usize - 1).or(anchors.last()) {
                    Some(&start) => Box::new(move |t| t >= start),
                    None => Box::new(|_| false),
                }
            }
        };
        let events: Vec<(Timestamp, &Properties)> = self
            .selected(&agg.events)
            .filter(|(t, _)| in_window(*t))
            .collect();
        let property_values = || {
            let name = agg.property.as_deref().unwrap_or("");
            events
                .iter()
                .map(move |(_, p)| p.get(name))
                .filter(|v| !v.is_null())
        };
        let numbers = || property_values().filter_map(Value::as_number);
        let times = events.iter().map(|(t, _)| *t);
        match agg.func {
            AggFunc::Count => Value::Number(events.len() as f64),
            AggFunc::Exists => Value::Bool(!events.is_empty()),
            AggFunc::FirstSeen => times.min().map_or(Value::Null, Value::Timestamp),
            AggFunc::LastSeen => times.max().map_or(Value::Null, Value::Timestamp),
            AggFunc::Sum => {
                let mut sum = ExactSum::new();
                numbers().for_each(|x| sum.add(x));
                Value::Number(sum.value())
            }
            AggFunc::Avg => {
                let mut sum = ExactSum::new();
                let mut n = 0usize;
                numbers().for_each(|x| {
                    sum.add(x);
                    n += 1;
                });
                if n == 0 {
                    Value::Null
                } else {
                    Value::Number(sum.value() / n as f64)
                }
            }
            AggFunc::Min => numbers()
                .reduce(f64::min)
                .map_or(Value::Null, Value::Number),
            AggFunc::Max => numbers()
                .reduce(f64::max)
                .map_or(Value::Null, Value::Number),
            AggFunc::Distinct => {
                let set: BTreeSet<ValueKey> =
                    property_values().map(|v| ValueKey(v.clone())).collect();
                Value::Number(set.len() as f64)
            }
        }
    }
}
