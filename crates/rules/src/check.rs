//! The checker: parses a set of segments and rejects what cannot be evaluated
//! meaningfully: type errors, misplaced `now`, comparisons with null, unknown or
//! cyclic segment references, and rules over the size limits.
//!
//! Traits and properties are dynamically typed (events arrive as JSON), so the
//! checker knows their types only from an optional [`Schema`] and from the rule
//! itself: `where category == "shoes"` shows that `category` holds strings, so
//! `sum(product_viewed.category)` in the same rule is a type error.

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{Error, RuleError, RuleErrorKind};
use crate::event::{EventName, SegmentId};
use crate::limits::Limits;
use crate::segment::{SegmentDef, is_valid_segment_id};
use crate::syntax::{
    AggFunc, Aggregate, CmpOp, EventSelector, Expr, ExprKind, Operand, OperandKind, Pos, Rule,
    Window, parse_rule,
};
use crate::value::{Value, ValueType};

/// Declared types of event properties and traits (a tracking plan). Optional:
/// what it declares is checked, what it omits is dynamically typed.
#[derive(Clone, Debug, Default)]
pub struct Schema {
    properties: HashMap<(String, String), ValueType>,
    traits: HashMap<String, ValueType>,
}

impl Schema {
    /// Declares that `event.property` holds values of type `ty`.
    pub fn property(mut self, event: &str, property: &str, ty: ValueType) -> Self {
        self.properties
            .insert((event.to_owned(), property.to_owned()), ty);
        self
    }

    /// Declares that trait `name` holds values of type `ty`.
    pub fn trait_type(mut self, name: &str, ty: ValueType) -> Self {
        self.traits.insert(name.to_owned(), ty);
        self
    }
}

/// One segment whose rule parsed and checked.
#[derive(Clone, Debug)]
pub struct CheckedSegment {
    /// The definition as given.
    pub def: SegmentDef,
    /// The parsed rule.
    pub rule: Rule,
    /// Segments this one reads with `in_segment`, as indexes into the checked set.
    pub depends_on: Vec<usize>,
}

/// A checked rule set, dependencies before dependents.
#[derive(Clone, Debug, Default)]
pub struct CheckedSet {
    /// The segments in evaluation order: every segment after those it references.
    pub segments: Vec<CheckedSegment>,
}

/// One segment's rule, parsed and checked, with the indexes in `index` of the
/// segments it reads.
fn check_one(
    def: &SegmentDef,
    index: &HashMap<&str, usize>,
    limits: &Limits,
    schema: &Schema,
) -> Result<(Rule, Vec<usize>), RuleError> {
    let rule = parse_rule(&def.rule, limits)?;
    let refs = check_rule(&rule, limits, schema)?;
    let mut depends_on = Vec::new();
    for (id, pos) in refs {
        let Some(&dep) = index.get(id.as_str()) else {
            return Err(RuleError::of(
                RuleErrorKind::UnknownSegment,
                pos,
                format!("in_segment(\"{id}\") names a segment that is not defined"),
            ));
        };
        if !depends_on.contains(&dep) {
            depends_on.push(dep);
        }
    }
    Ok((rule, depends_on))
}

/// Parses and checks a set of segments.
pub fn check_set(
    defs: &[SegmentDef],
    limits: &Limits,
    schema: Option<&Schema>,
) -> Result<CheckedSet, Error> {
    if defs.len() > limits.max_segments {
        return Err(Error::TooManySegments {
            count: defs.len(),
            limit: limits.max_segments,
        });
    }
    let empty = Schema::default();
    let schema = schema.unwrap_or(&empty);
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, def) in defs.iter().enumerate() {
        if !is_valid_segment_id(def.id.as_str()) {
            return Err(Error::InvalidSegmentId(def.id.as_str().to_owned()));
        }
        if index.insert(def.id.as_str(), i).is_some() {
            return Err(Error::DuplicateSegment(def.id.clone()));
        }
    }
    // Every rule is checked before any error is returned, so that one answer
    // names every rule to fix.
    let mut parsed = Vec::with_capacity(defs.len());
    let mut errors = Vec::new();
    for def in defs {
        match check_one(def, &index, limits, schema) {
            Ok(checked) => parsed.push(checked),
            Err(error) => errors.push(Error::Rule {
                segment: def.id.clone(),
                error,
            }),
        }
    }
    if let Some(error) = Error::all(errors) {
        return Err(error);
    }
    let order = topological_order(defs, &parsed)?;
    let mut position = vec![0; defs.len()];
    for (at, &i) in order.iter().enumerate() {
        position[i] = at;
    }
    let segments = order
        .iter()
        .map(|&i| CheckedSegment {
            def: defs[i].clone(),
            rule: parsed[i].0.clone(),
            depends_on: parsed[i].1.iter().map(|&d| position[d]).collect(),
        })
        .collect();
    Ok(CheckedSet { segments })
}

/// Orders segments so every one follows those it references; a cycle is an error
/// at the `in_segment` that closes it.
fn topological_order(
    defs: &[SegmentDef],
    parsed: &[(Rule, Vec<usize>)],
) -> Result<Vec<usize>, Error> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut marks = vec![Mark::New; defs.len()];
    let mut order = Vec::with_capacity(defs.len());
    for root in 0..defs.len() {
        if marks[root] != Mark::New {
            continue;
        }
        // Iterative depth-first search: (segment, next dependency to visit).
        let mut stack = vec![(root, 0usize)];
        marks[root] = Mark::Open;
        while let Some(&mut (seg, ref mut next)) = stack.last_mut() {
            if let Some(&dep) = parsed[seg].1.get(*next) {
                *next += 1;
                match marks[dep] {
                    Mark::New => {
                        marks[dep] = Mark::Open;
                        stack.push((dep, 0));
                    }
                    Mark::Open => {
                        let start = stack.iter().position(|(s, _)| *s == dep).unwrap_or(0);
                        let mut path: Vec<&str> = stack[start..]
                            .iter()
                            .map(|(s, _)| defs[*s].id.as_str())
                            .collect();
                        path.push(defs[dep].id.as_str());
                        let pos = in_segment_pos(&parsed[seg].0.expr, defs[dep].id.as_str())
                            .unwrap_or_default();
                        return Err(Error::Rule {
                            segment: defs[seg].id.clone(),
                            error: RuleError::of(
                                RuleErrorKind::Cycle,
                                pos,
                                format!(
                                    "in_segment(\"{}\") makes a cycle: {}",
                                    defs[dep].id,
                                    path.join(" -> ")
                                ),
                            ),
                        });
                    }
                    Mark::Done => {}
                }
            } else {
                marks[seg] = Mark::Done;
                order.push(seg);
                stack.pop();
            }
        }
    }
    Ok(order)
}

fn in_segment_pos(expr: &Expr, id: &str) -> Option<Pos> {
    let mut found = None;
    visit_operands(expr, &mut |op| {
        if let OperandKind::InSegment(s) = &op.kind
            && s.as_str() == id
            && found.is_none()
        {
            found = Some(op.pos);
        }
    });
    found
}

/// Calls `f` on every operand of `expr`, outside aggregates' filters.
fn visit_operands(expr: &Expr, f: &mut impl FnMut(&Operand)) {
    fn operand(op: &Operand, f: &mut impl FnMut(&Operand)) {
        f(op);
        if let OperandKind::Shift(base, _) = &op.kind {
            operand(base, f);
        }
    }
    match &expr.kind {
        ExprKind::And(a, b) | ExprKind::Or(a, b) => {
            visit_operands(a, f);
            visit_operands(b, f);
        }
        ExprKind::Not(e) => visit_operands(e, f),
        ExprKind::Compare(_, a, b) | ExprKind::Contains(a, b) | ExprKind::StartsWith(a, b) => {
            operand(a, f);
            operand(b, f);
        }
        ExprKind::In(a, _) | ExprKind::IsNull { operand: a, .. } | ExprKind::Truthy(a) => {
            operand(a, f)
        }
    }
}

/// The static type of an operand; `Any` for traits and properties of unknown type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ty {
    Any,
    Known(ValueType),
}

impl Ty {
    fn of(value: &Value) -> Ty {
        Ty::Known(value.value_type())
    }

    fn compatible(self, other: Ty) -> bool {
        use ValueType::{String, Timestamp};
        match (self, other) {
            (Ty::Any, _) | (_, Ty::Any) => true,
            (Ty::Known(a), Ty::Known(b)) => {
                a == b || matches!((a, b), (String, Timestamp) | (Timestamp, String))
            }
        }
    }
}

struct Checker<'a> {
    limits: &'a Limits,
    schema: &'a Schema,
    /// Types of event properties seen compared with literals in this rule.
    evidence: Evidence,
    /// The event whose filter is being checked.
    filter_event: Option<EventName>,
    nodes: usize,
    aggregates: usize,
    refs: Vec<(SegmentId, Pos)>,
}

/// Checks one parsed rule and returns the segments it references.
pub fn check_rule(
    rule: &Rule,
    limits: &Limits,
    schema: &Schema,
) -> Result<Vec<(SegmentId, Pos)>, RuleError> {
    let mut checker = Checker {
        limits,
        schema,
        evidence: HashMap::new(),
        filter_event: None,
        nodes: 0,
        aggregates: 0,
        refs: Vec::new(),
    };
    collect_evidence(&rule.expr, None, &mut checker.evidence);
    checker.condition(&rule.expr)?;
    Ok(checker.refs)
}

/// Records, for each `event.property` compared with a literal inside a filter, the
/// literal's type (the first one seen).
fn collect_evidence(expr: &Expr, event: Option<&EventName>, out: &mut Evidence) {
    match &expr.kind {
        ExprKind::And(a, b) | ExprKind::Or(a, b) => {
            collect_evidence(a, event, out);
            collect_evidence(b, event, out);
        }
        ExprKind::Not(e) => collect_evidence(e, event, out),
        ExprKind::Compare(_, a, b) | ExprKind::StartsWith(a, b) => {
            note_literal_type(a, b, event, out);
            note_literal_type(b, a, event, out);
            operand_evidence(a, out);
            operand_evidence(b, out);
        }
        ExprKind::Contains(a, b) => {
            operand_evidence(a, out);
            operand_evidence(b, out);
        }
        ExprKind::In(a, _) | ExprKind::IsNull { operand: a, .. } | ExprKind::Truthy(a) => {
            operand_evidence(a, out)
        }
    }
}

type Evidence = HashMap<(EventName, Arc<str>), (ValueType, Pos)>;

fn note_literal_type(prop: &Operand, lit: &Operand, event: Option<&EventName>, out: &mut Evidence) {
    if let (Some(event), OperandKind::Property(name), OperandKind::Literal(v)) =
        (event, &prop.kind, &lit.kind)
        && !v.is_null()
    {
        out.entry((event.clone(), name.clone()))
            .or_insert((v.value_type(), lit.pos));
    }
}

/// Looks into the filters of an aggregate operand.
fn operand_evidence(op: &Operand, out: &mut Evidence) {
    let mut base = op;
    while let OperandKind::Shift(inner, _) = &base.kind {
        base = inner;
    }
    if let OperandKind::Aggregate(agg) = &base.kind {
        let anchor = match &agg.window {
            Window::Since { anchor, .. } => Some(anchor),
            _ => None,
        };
        for selector in std::iter::once(&agg.events).chain(anchor) {
            if let Some(filter) = &selector.filter {
                collect_evidence(filter, Some(&selector.name), out);
            }
        }
    }
}

impl Checker<'_> {
    fn count_node(&mut self, pos: Pos) -> Result<(), RuleError> {
        self.nodes += 1;
        if self.nodes > self.limits.max_nodes {
            return Err(RuleError::of(
                RuleErrorKind::Limit,
                pos,
                format!(
                    "rule has more than the limit of {} terms",
                    self.limits.max_nodes
                ),
            ));
        }
        Ok(())
    }

    fn condition(&mut self, expr: &Expr) -> Result<(), RuleError> {
        self.count_node(expr.pos)?;
        match &expr.kind {
            ExprKind::And(a, b) | ExprKind::Or(a, b) => {
                self.condition(a)?;
                self.condition(b)
            }
            ExprKind::Not(e) => self.condition(e),
            ExprKind::Compare(op, a, b) => self.comparison(*op, a, b),
            ExprKind::In(a, list) => {
                self.no_now(a, "in")?;
                let ty = self.operand(a)?;
                for item in list {
                    if item.is_null() {
                        return Err(type_error(
                            a.pos,
                            "null in a list never matches: test for null with 'is null'",
                        ));
                    }
                    if !ty.compatible(Ty::of(item)) {
                        return Err(type_error(
                            a.pos,
                            format!("{a} is a {} and can never equal {item}", describe(ty)),
                        ));
                    }
                }
                Ok(())
            }
            ExprKind::Contains(a, b) => {
                self.no_now(a, "contains")?;
                self.no_now(b, "contains")?;
                let (ta, tb) = (self.operand(a)?, self.operand(b)?);
                match ta {
                    Ty::Any | Ty::Known(ValueType::List) => Ok(()),
                    Ty::Known(ValueType::String) if tb.compatible(Ty::Known(ValueType::String)) => {
                        Ok(())
                    }
                    _ => Err(type_error(
                        a.pos,
                        format!(
                            "contains needs a string or a list on its left, found {} {a}",
                            describe(ta)
                        ),
                    )),
                }
            }
            ExprKind::StartsWith(a, b) => {
                self.no_now(a, "starts_with")?;
                self.no_now(b, "starts_with")?;
                for side in [a, b] {
                    let ty = self.operand(side)?;
                    if !matches!(ty, Ty::Any | Ty::Known(ValueType::String)) {
                        return Err(type_error(
                            side.pos,
                            format!(
                                "starts_with works on strings, found {} {side}",
                                describe(ty)
                            ),
                        ));
                    }
                }
                Ok(())
            }
            ExprKind::IsNull { operand, .. } => {
                self.no_now(operand, "is null")?;
                self.operand(operand).map(drop)
            }
            ExprKind::Truthy(a) => {
                self.no_now(a, "a condition")?;
                match self.operand(a)? {
                    Ty::Any | Ty::Known(ValueType::Bool) => Ok(()),
                    ty => Err(type_error(
                        a.pos,
                        format!(
                            "{a} is a {} and not a condition: compare it, as in {a} {}",
                            describe(ty),
                            example_comparison(ty)
                        ),
                    )),
                }
            }
        }
    }

    fn comparison(&mut self, op: CmpOp, a: &Operand, b: &Operand) -> Result<(), RuleError> {
        let (ta, tb) = (self.operand(a)?, self.operand(b)?);
        for (side, other) in [(a, b), (b, a)] {
            if let OperandKind::Literal(Value::Null) = side.kind {
                return Err(type_error(
                    side.pos,
                    format!(
                        "a comparison with null is always false: write {other} is {}null",
                        if op == CmpOp::Ne { "not " } else { "" }
                    ),
                ));
            }
        }
        if !ta.compatible(tb) {
            return Err(type_error(
                a.pos,
                format!(
                    "cannot compare {} {a} with {} {b}",
                    describe(ta),
                    describe(tb)
                ),
            ));
        }
        if op.is_ordering() {
            for (side, ty) in [(a, ta), (b, tb)] {
                if let Ty::Known(t @ (ValueType::Bool | ValueType::List)) = ty {
                    return Err(type_error(
                        side.pos,
                        format!(
                            "'{}' orders values, but {side} is a {t}: use == or !=",
                            op.as_str()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Rejects `now` anywhere but as a side of a comparison.
    fn no_now(&self, op: &Operand, context: &str) -> Result<(), RuleError> {
        let mut base = op;
        while let OperandKind::Shift(inner, _) = &base.kind {
            base = inner;
        }
        if matches!(base.kind, OperandKind::Now) {
            return Err(type_error(
                op.pos,
                format!(
                    "now cannot be used with {context}: compare it, as in last_seen(e) < now - 7d"
                ),
            ));
        }
        Ok(())
    }

    fn operand(&mut self, op: &Operand) -> Result<Ty, RuleError> {
        self.count_node(op.pos)?;
        match &op.kind {
            OperandKind::Literal(v) => Ok(Ty::of(v)),
            OperandKind::Now => Ok(Ty::Known(ValueType::Timestamp)),
            OperandKind::Trait(name) => Ok(self
                .schema
                .traits
                .get(&**name)
                .map_or(Ty::Any, |t| Ty::Known(*t))),
            OperandKind::Property(name) => Ok(self.property_type(name)),
            OperandKind::InSegment(id) => {
                self.refs.push((id.clone(), op.pos));
                Ok(Ty::Known(ValueType::Bool))
            }
            OperandKind::Shift(base, _) => match self.operand(base)? {
                Ty::Any | Ty::Known(ValueType::Timestamp | ValueType::String) => {
                    Ok(Ty::Known(ValueType::Timestamp))
                }
                ty => Err(type_error(
                    base.pos,
                    format!(
                        "only timestamps can be shifted by a duration, but {base} is a {}",
                        describe(ty)
                    ),
                )),
            },
            OperandKind::Aggregate(agg) => self.aggregate(agg, op.pos),
        }
    }

    fn property_type(&self, name: &Arc<str>) -> Ty {
        let Some(event) = &self.filter_event else {
            return Ty::Any;
        };
        let declared = self
            .schema
            .properties
            .get(&(event.as_str().to_owned(), name.to_string()));
        declared.map_or(Ty::Any, |t| Ty::Known(*t))
    }

    fn aggregate(&mut self, agg: &Aggregate, pos: Pos) -> Result<Ty, RuleError> {
        self.aggregates += 1;
        if self.aggregates > self.limits.max_aggregates {
            return Err(RuleError::of(
                RuleErrorKind::Limit,
                pos,
                format!(
                    "rule has more than the limit of {} aggregates",
                    self.limits.max_aggregates
                ),
            ));
        }
        let name = agg.func.name();
        match (&agg.property, agg.func.takes_property()) {
            (None, true) => {
                return Err(type_error(
                    pos,
                    format!(
                        "{name} needs a property, as in {name}({}.revenue)",
                        agg.events.name
                    ),
                ));
            }
            (Some(p), false) => {
                return Err(type_error(
                    pos,
                    format!(
                        "{name} takes an event, not a property: to require {p}, filter with where, as in {name}({} where {p} exists)",
                        agg.events.name
                    ),
                ));
            }
            _ => {}
        }
        if let (Some(property), AggFunc::Sum | AggFunc::Avg | AggFunc::Min | AggFunc::Max) =
            (&agg.property, agg.func)
        {
            self.numeric_property(agg, property, pos)?;
        }
        self.selector(&agg.events)?;
        if let Window::Since { anchor, .. } = &agg.window {
            self.selector(anchor)?;
        }
        Ok(Ty::Known(match agg.func {
            AggFunc::Count
            | AggFunc::Distinct
            | AggFunc::Sum
            | AggFunc::Avg
            | AggFunc::Min
            | AggFunc::Max => ValueType::Number,
            AggFunc::FirstSeen | AggFunc::LastSeen => ValueType::Timestamp,
            AggFunc::Exists => ValueType::Bool,
        }))
    }

    fn numeric_property(
        &self,
        agg: &Aggregate,
        property: &Arc<str>,
        pos: Pos,
    ) -> Result<(), RuleError> {
        let event = &agg.events.name;
        let declared = self
            .schema
            .properties
            .get(&(event.as_str().to_owned(), property.to_string()));
        let (ty, why) = if let Some(ty) = declared {
            (*ty, "the schema declares it".to_owned())
        } else if let Some((ty, at)) = self.evidence.get(&(event.clone(), property.clone())) {
            (*ty, format!("it is compared with a {ty} at {at}"))
        } else {
            return Ok(());
        };
        if ty == ValueType::Number {
            return Ok(());
        }
        Err(type_error(
            pos,
            format!(
                "{}({event}.{property}) needs a number property, but {property} is a {ty}: {why}",
                agg.func.name()
            ),
        ))
    }

    fn selector(&mut self, selector: &EventSelector) -> Result<(), RuleError> {
        if let Some(filter) = &selector.filter {
            let outer = self.filter_event.replace(selector.name.clone());
            let result = self.condition(filter);
            self.filter_event = outer;
            result?;
        }
        Ok(())
    }
}

fn type_error(pos: Pos, message: impl Into<String>) -> RuleError {
    RuleError::of(RuleErrorKind::Type, pos, message)
}

fn describe(ty: Ty) -> String {
    match ty {
        Ty::Any => "value".into(),
        Ty::Known(t) => t.to_string(),
    }
}

fn example_comparison(ty: Ty) -> &'static str {
    match ty {
        Ty::Known(ValueType::Number) => ">= 1",
        Ty::Known(ValueType::Timestamp) => "> now - 7d",
        Ty::Known(ValueType::String) => "== \"text\"",
        _ => "== true",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rules: &[(&str, &str)]) -> Result<CheckedSet, Error> {
        let defs: Vec<_> = rules
            .iter()
            .map(|(id, rule)| SegmentDef::new(id, rule))
            .collect();
        check_set(&defs, &Limits::default(), None)
    }

    fn error_of(rule: &str) -> (RuleErrorKind, String) {
        match check(&[("s", rule)]) {
            Ok(_) => panic!("{rule} checked"),
            Err(Error::Rule { error, .. }) => (error.kind, error.to_string()),
            Err(other) => panic!("{other}"),
        }
    }

    #[test]
    fn every_segment_in_error_is_named_in_the_order_given() {
        let err = check(&[
            ("a", "count(x) >="),
            ("b", "exists(login)"),
            ("c", "in_segment(\"nope\")"),
            ("d", "sum(x.v) in last 0d > 1"),
        ])
        .unwrap_err();
        let Error::Rules(errors) = &err else {
            panic!("{err}");
        };
        let named: Vec<(&str, RuleErrorKind)> = errors
            .iter()
            .map(|e| match e {
                Error::Rule { segment, error } => (segment.as_str(), error.kind),
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(
            named,
            vec![
                ("a", RuleErrorKind::Syntax),
                ("c", RuleErrorKind::UnknownSegment),
                ("d", RuleErrorKind::Window),
            ]
        );
        // Shown a line each, each as the error alone would be.
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(err.to_string(), lines.join("\n"));
        assert_eq!(err.rule_error(), errors[0].rule_error());
        // One error alone is itself, not a list of one.
        assert!(matches!(
            check(&[("a", "count(x) >="), ("b", "exists(login)")]),
            Err(Error::Rule { .. })
        ));
    }

    #[test]
    fn orders_segments_after_their_references() {
        let set = check(&[
            (
                "vip",
                "in_segment(\"repeat_buyers\") and sum(order_completed.revenue) >= 1000",
            ),
            ("repeat_buyers", "count(order_completed) in last 90d >= 2"),
            (
                "vip_dormant",
                "in_segment(\"vip\") and in_segment(\"repeat_buyers\")",
            ),
        ])
        .unwrap();
        let ids: Vec<_> = set.segments.iter().map(|s| s.def.id.as_str()).collect();
        assert_eq!(ids, ["repeat_buyers", "vip", "vip_dormant"]);
        assert_eq!(set.segments[2].depends_on, vec![1, 0]);
    }

    #[test]
    fn unknown_and_cyclic_references() {
        let err = check(&[("a", "x == 1 and in_segment(\"nope\")")]).unwrap_err();
        let e = err.rule_error().unwrap();
        assert_eq!(e.kind, RuleErrorKind::UnknownSegment);
        assert_eq!(
            err.to_string(),
            "segment a: 1:12: in_segment(\"nope\") names a segment that is not defined"
        );

        let err = check(&[
            ("a", "in_segment(\"b\")"),
            ("b", "x == 1 or in_segment(\"c\")"),
            ("c", "in_segment(\"a\")"),
        ])
        .unwrap_err();
        assert_eq!(err.rule_error().unwrap().kind, RuleErrorKind::Cycle);
        assert_eq!(
            err.to_string(),
            "segment c: 1:1: in_segment(\"a\") makes a cycle: a -> b -> c -> a"
        );

        let err = check(&[("self", "in_segment(\"self\")")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "segment self: 1:1: in_segment(\"self\") makes a cycle: self -> self"
        );
    }

    #[test]
    fn set_level_errors() {
        assert_eq!(
            check(&[("a", "x == 1"), ("a", "y == 1")]).unwrap_err(),
            Error::DuplicateSegment(SegmentId::from("a"))
        );
        assert_eq!(
            check(&[("bad id", "x == 1")]).unwrap_err(),
            Error::InvalidSegmentId("bad id".into())
        );
        let defs = vec![SegmentDef::new("a", "x == 1"); 3];
        let limits = Limits {
            max_segments: 2,
            ..Limits::default()
        };
        assert_eq!(
            check_set(&defs, &limits, None).unwrap_err(),
            Error::TooManySegments { count: 3, limit: 2 }
        );
    }

    #[test]
    fn type_errors_name_the_position_and_the_types() {
        use RuleErrorKind::Type;
        for (rule, message) in [
            (
                "count(a) > \"x\"",
                "1:1: cannot compare number count(a) with string \"x\"",
            ),
            (
                "last_seen(a) > 5",
                "1:1: cannot compare timestamp last_seen(a) with number 5",
            ),
            (
                "count(a)",
                "1:1: count(a) is a number and not a condition: compare it, as in count(a) >= 1",
            ),
            (
                "plan == null",
                "1:9: a comparison with null is always false: write plan is null",
            ),
            (
                "plan != null",
                "1:9: a comparison with null is always false: write plan is not null",
            ),
            (
                "exists(a) > true",
                "1:1: '>' orders values, but exists(a) is a bool: use == or !=",
            ),
            (
                "sum(a) > 1",
                "1:1: sum needs a property, as in sum(a.revenue)",
            ),
            (
                "count(a.p) > 1",
                "1:1: count takes an event, not a property: to require p, filter with where, as in count(a where p exists)",
            ),
            (
                "sum(product_viewed.category) > 1 or count(product_viewed where category == \"shoes\") > 0",
                "1:1: sum(product_viewed.category) needs a number property, but category is a string: it is compared with a string at 1:76",
            ),
            (
                "count(a) + 1d > now",
                "1:1: only timestamps can be shifted by a duration, but count(a) is a number",
            ),
            (
                "now in [@2026-01-01]",
                "1:1: now cannot be used with in: compare it, as in last_seen(e) < now - 7d",
            ),
            (
                "plan in [\"a\", null]",
                "1:1: null in a list never matches: test for null with 'is null'",
            ),
            (
                "count(a) in [\"x\"]",
                "1:1: count(a) is a number and can never equal \"x\"",
            ),
            (
                "count(a) contains 1",
                "1:1: contains needs a string or a list on its left, found number count(a)",
            ),
            (
                "plan starts_with 5",
                "1:18: starts_with works on strings, found number 5",
            ),
        ] {
            assert_eq!(error_of(rule), (Type, message.to_owned()), "{rule}");
        }
    }

    #[test]
    fn schema_types_are_checked() {
        let schema = Schema::default()
            .property("order_completed", "currency", ValueType::String)
            .trait_type("age", ValueType::Number);
        let check_one = |rule: &str| {
            check_set(
                &[SegmentDef::new("s", rule)],
                &Limits::default(),
                Some(&schema),
            )
            .map_err(|e| e.to_string())
        };
        assert_eq!(
            check_one("avg(order_completed.currency) > 1").unwrap_err(),
            "segment s: 1:1: avg(order_completed.currency) needs a number property, but currency is a string: the schema declares it"
        );
        assert_eq!(
            check_one("age == \"old\"").unwrap_err(),
            "segment s: 1:1: cannot compare number age with string \"old\""
        );
        assert_eq!(
            check_one("count(order_completed where currency > 3) > 1").unwrap_err(),
            "segment s: 1:29: cannot compare string currency with number 3"
        );
        assert!(check_one("sum(order_completed.revenue where currency == \"EUR\") > 1").is_ok());
    }

    #[test]
    fn size_limits() {
        let limits = Limits {
            max_nodes: 5,
            max_aggregates: 1,
            ..Limits::default()
        };
        let defs = [SegmentDef::new("s", "a == 1 and b == 2 and c == 3")];
        let err = check_set(&defs, &limits, None).unwrap_err();
        assert_eq!(err.rule_error().unwrap().kind, RuleErrorKind::Limit);
        assert_eq!(
            err.to_string(),
            "segment s: 1:12: rule has more than the limit of 5 terms"
        );
        let defs = [SegmentDef::new("s", "exists(a) and exists(b)")];
        let err = check_set(&defs, &limits, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "segment s: 1:15: rule has more than the limit of 1 aggregates"
        );
    }
}
