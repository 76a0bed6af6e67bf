//! Compilation of a checked rule set into one [`Plan`].
//!
//! The plan is what the evaluator runs. Its parts:
//!
//! - **matchers**: one per distinct (event name, `where` filter); an event is
//!   tested against each matcher of its name once.
//! - **cells**: per-user state, one per distinct (matcher, state kind, property,
//!   absolute range). Aggregates that can be answered from the same state share
//!   a cell: `count(login) in last 7d >= 3` and `count(login) in last 30d >= 20`
//!   read one cell that keeps the 20 newest login times of the last 30 days.
//! - **readers**: one per aggregate occurrence: which cell, which window, which
//!   function. A reader turns a cell into a value at a given `now`.
//! - **segments**: conditions over readers, traits and other segments, in
//!   evaluation order (every segment after those it references).
//! - **routes**: for each event name, its matchers and the segments whose value it
//!   can change (including segments that reference those through `in_segment`).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::cell::CellKind;
use crate::check::{CheckedSet, Schema, check_set};
use crate::error::{Error, RuleError, RuleErrorKind};
use crate::event::{EventName, SegmentId};
use crate::limits::Limits;
use crate::segment::{RuleVersion, SegmentDef};
use crate::syntax::{
    AggFunc, Aggregate, CmpOp, EventSelector, Expr, ExprKind, Operand, OperandKind, Pos, Window,
};
use crate::time::{Span, Timestamp};
use crate::value::Value;

/// Hash maps looked up once per event: a fast hasher, seeded per process.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A compiled rule set: what every user's state is evaluated against.
#[derive(Debug)]
pub struct Plan {
    pub(crate) version: RuleVersion,
    pub(crate) segments: Vec<SegmentPlan>,
    pub(crate) matchers: Vec<Matcher>,
    pub(crate) cells: Vec<CellSpec>,
    pub(crate) readers: Vec<Reader>,
    /// Trait names the rules read; a user keeps only these traits.
    pub(crate) traits: Vec<Arc<str>>,
    pub(crate) trait_index: FastMap<Arc<str>, u32>,
    pub(crate) routes: FastMap<EventName, Route>,
    /// Segments an identify can change (readers of traits and their dependents).
    pub(crate) trait_segments: Vec<u32>,
    /// Per segment: itself and every segment that references it, transitively,
    /// in evaluation order (what to re-evaluate when it may have changed).
    pub(crate) closures: Vec<Vec<u32>>,
    /// Per segment: the sliding cells its aggregates read (what to prune after
    /// evaluating it at a wake-up).
    pub(crate) sliding_cells: Vec<Vec<u32>>,
}

/// One segment, compiled.
#[derive(Debug)]
pub(crate) struct SegmentPlan {
    pub(crate) def: SegmentDef,
    pub(crate) cond: Cond,
    /// The rule as the printer writes it: equal texts mean equal rules.
    pub(crate) canonical: String,
    /// Segments this one reads through `in_segment`.
    pub(crate) depends_on: Vec<u32>,
    /// The checked rule: what `explain` walks beside `cond` (its `and`, `or` and
    /// `not` nodes are `cond`'s, one for one).
    pub(crate) expr: crate::syntax::Expr,
}

/// Events of one name that pass one filter.
#[derive(Debug)]
pub(crate) struct Matcher {
    pub(crate) event: EventName,
    pub(crate) filter: Option<Cond>,
    /// `name` or `name where filter`, canonical: identifies the matcher across plans.
    pub(crate) key: String,
    pub(crate) cells: Vec<u32>,
}

/// One cell's specification.
#[derive(Debug)]
pub(crate) struct CellSpec {
    pub(crate) matcher: u32,
    pub(crate) kind: CellKind,
    /// The property read, for sums, extremes and distinct.
    pub(crate) property: Option<Arc<str>>,
    /// Absolute window: only events stamped inside it are kept.
    pub(crate) range: Option<(Timestamp, Timestamp)>,
    /// How many timestamps or values to keep at most (`None`: no bound).
    pub(crate) cap: Option<u32>,
    /// The windows that read this cell; the cell keeps what the widest needs.
    pub(crate) bounds: Vec<Bound>,
}

/// A sliding window that reads a cell, for pruning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Bound {
    /// `in last D`.
    Last(Span),
    /// `since the Nth most recent` of the anchor cell.
    Since { anchor: u32, nth: u32 },
}

/// One aggregate occurrence: a function of a cell over a window.
#[derive(Debug)]
pub(crate) struct Reader {
    pub(crate) func: AggFunc,
    pub(crate) cell: u32,
    pub(crate) window: ReaderWindow,
    /// The segment whose rule holds this aggregate.
    pub(crate) segment: u32,
}

/// The window a reader applies to its cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReaderWindow {
    /// The cell holds exactly the events in the window (lifetime, absolute).
    All,
    /// `in last D`.
    Last(Span),
    /// `since the Nth most recent` event of the anchor cell.
    Since { anchor: u32, nth: u32 },
}

/// What an event name touches.
#[derive(Debug, Default)]
pub(crate) struct Route {
    pub(crate) matchers: Vec<u32>,
    /// In evaluation order.
    pub(crate) segments: Vec<u32>,
}

/// A compiled condition.
#[derive(Debug)]
pub(crate) enum Cond {
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
    Not(Box<Cond>),
    Compare(CmpOp, Val, Val),
    /// `other op now + offset`: the form whose truth changes as time passes.
    CompareNow {
        op: CmpOp,
        other: Val,
        offset: Span,
    },
    /// `trait == literal` (or `!=` when `negated`) for a string, number or bool
    /// literal, compared on the canonical encoding without decoding the trait.
    TraitIs {
        index: u32,
        literal: Box<[u64]>,
        negated: bool,
    },
    In(Val, Box<[Value]>),
    Contains(Val, Val),
    StartsWith(Val, Val),
    IsNull(Val, bool),
    Truthy(Val),
}

/// A compiled value.
#[derive(Debug)]
pub(crate) enum Val {
    Lit(Value),
    Now,
    Trait(u32),
    Prop(Arc<str>),
    Reader(u32),
    Segment(u32),
    Shift(Box<Val>, Span),
}

impl Plan {
    /// Parses, checks and compiles `defs` as rule-set `version`.
    pub fn compile(
        defs: &[SegmentDef],
        version: RuleVersion,
        limits: &Limits,
    ) -> Result<Plan, Error> {
        Plan::compile_with_schema(defs, version, limits, None)
    }

    /// [`Plan::compile`] with declared property and trait types.
    pub fn compile_with_schema(
        defs: &[SegmentDef],
        version: RuleVersion,
        limits: &Limits,
        schema: Option<&Schema>,
    ) -> Result<Plan, Error> {
        let checked = check_set(defs, limits, schema)?;
        Compiler::new(limits).compile(&checked, version)
    }

    /// The rule-set version changes carry.
    pub fn version(&self) -> RuleVersion {
        self.version
    }

    /// The segments, in evaluation order.
    pub fn segments(&self) -> impl Iterator<Item = &SegmentDef> {
        self.segments.iter().map(|s| &s.def)
    }

    /// The segment ids, in evaluation order.
    pub fn segment_ids(&self) -> impl Iterator<Item = &SegmentId> {
        self.segments.iter().map(|s| &s.def.id)
    }

    /// Index of segment `id`.
    pub(crate) fn segment_index(&self, id: &str) -> Option<u32> {
        self.segments
            .iter()
            .position(|s| s.def.id.as_str() == id)
            .map(|i| i as u32)
    }

    /// Number of cells (distinct per-user aggregate states) in the plan.
    pub fn cell_count(&self) -> usize {
        self.cells.len()
    }

    /// Number of aggregate occurrences across all rules.
    pub fn reader_count(&self) -> usize {
        self.readers.len()
    }

    /// The longest `in last` window any rule uses (`None` when there is none): how
    /// far back retained events must reach to backfill a new rule exactly.
    pub fn longest_window(&self) -> Option<Span> {
        self.readers
            .iter()
            .filter_map(|r| match r.window {
                ReaderWindow::Last(d) => Some(d),
                _ => None,
            })
            .max()
    }
}

/// What identifies a cell within a plan: matcher, kind, property, absolute range.
type CellKey = (
    u32,
    CellKind,
    Option<Arc<str>>,
    Option<(Timestamp, Timestamp)>,
);

struct Compiler<'a> {
    limits: &'a Limits,
    matchers: Vec<Matcher>,
    matcher_index: HashMap<String, u32>,
    cells: Vec<CellSpec>,
    cell_index: HashMap<CellKey, u32>,
    readers: Vec<Reader>,
    traits: Vec<Arc<str>>,
    trait_index: FastMap<Arc<str>, u32>,
    trait_readers: BTreeSet<u32>,
    /// Index of the segment being compiled.
    segment: u32,
    segment_ids: HashMap<SegmentId, u32>,
}

/// How much of a count or distinct the comparison around it needs.
#[derive(Clone, Copy, Debug)]
enum Need {
    /// Compared with constants below `cap`: a value saturated at `cap` decides.
    UpTo(u32, Pos),
    /// The exact value.
    Exact,
}

impl<'a> Compiler<'a> {
    fn new(limits: &'a Limits) -> Self {
        Compiler {
            limits,
            matchers: Vec::new(),
            matcher_index: HashMap::new(),
            cells: Vec::new(),
            cell_index: HashMap::new(),
            readers: Vec::new(),
            traits: Vec::new(),
            trait_index: FastMap::default(),
            trait_readers: BTreeSet::new(),
            segment: 0,
            segment_ids: HashMap::new(),
        }
    }

    fn compile(mut self, checked: &CheckedSet, version: RuleVersion) -> Result<Plan, Error> {
        for (i, seg) in checked.segments.iter().enumerate() {
            self.segment_ids.insert(seg.def.id.clone(), i as u32);
        }
        let mut segments = Vec::with_capacity(checked.segments.len());
        for (i, seg) in checked.segments.iter().enumerate() {
            self.segment = i as u32;
            let cond = self
                .condition(&seg.rule.expr)
                .map_err(|error| Error::Rule {
                    segment: seg.def.id.clone(),
                    error,
                })?;
            segments.push(SegmentPlan {
                def: seg.def.clone(),
                cond,
                canonical: seg.rule.expr.to_string(),
                depends_on: seg.depends_on.iter().map(|&d| d as u32).collect(),
                expr: seg.rule.expr.clone(),
            });
        }
        let dependents = dependents_of(&segments);
        let mut routes: FastMap<EventName, Route> = FastMap::default();
        let mut cell_segments: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); self.cells.len()];
        for reader in &self.readers {
            let seg = reader.segment;
            cell_segments[reader.cell as usize].insert(seg);
            if let ReaderWindow::Since { anchor, .. } = reader.window {
                cell_segments[anchor as usize].insert(seg);
            }
        }
        for (m, matcher) in self.matchers.iter().enumerate() {
            let route = routes.entry(matcher.event.clone()).or_default();
            route.matchers.push(m as u32);
            let mut touched: BTreeSet<u32> = route.segments.iter().copied().collect();
            for &cell in &matcher.cells {
                touched.extend(&cell_segments[cell as usize]);
            }
            route.segments = with_dependents(touched, &dependents);
        }
        let trait_segments = with_dependents(self.trait_readers.clone(), &dependents);
        let closures = (0..segments.len() as u32)
            .map(|s| with_dependents(BTreeSet::from([s]), &dependents))
            .collect();
        let mut sliding_cells: Vec<Vec<u32>> = vec![Vec::new(); segments.len()];
        for reader in &self.readers {
            let cells = &mut sliding_cells[reader.segment as usize];
            if self.cells[reader.cell as usize].kind.is_suffix() && !cells.contains(&reader.cell) {
                cells.push(reader.cell);
            }
        }
        Ok(Plan {
            version,
            segments,
            matchers: self.matchers,
            cells: self.cells,
            readers: self.readers,
            traits: self.traits,
            trait_index: self.trait_index,
            routes,
            trait_segments,
            closures,
            sliding_cells,
        })
    }

    fn condition(&mut self, expr: &Expr) -> Result<Cond, RuleError> {
        Ok(match &expr.kind {
            ExprKind::And(a, b) => {
                Cond::And(Box::new(self.condition(a)?), Box::new(self.condition(b)?))
            }
            ExprKind::Or(a, b) => {
                Cond::Or(Box::new(self.condition(a)?), Box::new(self.condition(b)?))
            }
            ExprKind::Not(e) => Cond::Not(Box::new(self.condition(e)?)),
            ExprKind::Compare(op, a, b) => self.comparison(*op, a, b)?,
            ExprKind::In(a, list) => {
                let need = list
                    .iter()
                    .filter_map(Value::as_number)
                    .map(|k| need_for_threshold(CmpOp::Eq, k, a.pos))
                    .reduce(merge_need)
                    .unwrap_or(Need::UpTo(0, a.pos));
                Cond::In(self.operand(a, need)?, list.clone().into())
            }
            ExprKind::Contains(a, b) => {
                Cond::Contains(self.operand(a, Need::Exact)?, self.operand(b, Need::Exact)?)
            }
            ExprKind::StartsWith(a, b) => {
                Cond::StartsWith(self.operand(a, Need::Exact)?, self.operand(b, Need::Exact)?)
            }
            ExprKind::IsNull { operand, negated } => {
                // Whether a count is null needs none of its value.
                Cond::IsNull(self.operand(operand, Need::UpTo(0, operand.pos))?, *negated)
            }
            ExprKind::Truthy(a) => Cond::Truthy(self.operand(a, Need::Exact)?),
        })
    }

    fn comparison(&mut self, op: CmpOp, a: &Operand, b: &Operand) -> Result<Cond, RuleError> {
        if let Some(cond) = self
            .trait_equality(op, a, b)
            .or_else(|| self.trait_equality(op, b, a))
        {
            return Ok(cond);
        }
        let (need_a, need_b) = (literal_need(op, b), literal_need(op.flipped(), a));
        match (now_offset(a), now_offset(b)) {
            (Some(offset), None) => Ok(Cond::CompareNow {
                op: op.flipped(),
                other: self.operand(b, need_b)?,
                offset,
            }),
            (None, Some(offset)) => Ok(Cond::CompareNow {
                op,
                other: self.operand(a, need_a)?,
                offset,
            }),
            _ => Ok(Cond::Compare(
                op,
                self.operand(a, need_a)?,
                self.operand(b, need_b)?,
            )),
        }
    }

    /// `trait == literal` or `trait != literal` where equal values have equal
    /// encodings: a string, number or bool literal (a timestamp literal can equal
    /// a string trait, so it takes the general path).
    fn trait_equality(&mut self, op: CmpOp, a: &Operand, b: &Operand) -> Option<Cond> {
        let (OperandKind::Trait(name), OperandKind::Literal(v)) = (&a.kind, &b.kind) else {
            return None;
        };
        if !matches!(op, CmpOp::Eq | CmpOp::Ne)
            || !matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))
        {
            return None;
        }
        self.trait_readers.insert(self.segment);
        let index = self.trait_slot(name);
        let mut literal = Vec::new();
        crate::codec::encode(v, &mut literal);
        Some(Cond::TraitIs {
            index,
            literal: literal.into(),
            negated: op == CmpOp::Ne,
        })
    }

    fn operand(&mut self, op: &Operand, need: Need) -> Result<Val, RuleError> {
        Ok(match &op.kind {
            OperandKind::Literal(v) => Val::Lit(v.clone()),
            OperandKind::Now => Val::Now,
            OperandKind::Trait(name) => {
                self.trait_readers.insert(self.segment);
                Val::Trait(self.trait_slot(name))
            }
            OperandKind::Property(name) => Val::Prop(name.clone()),
            OperandKind::InSegment(id) => {
                let idx = self.segment_ids.get(id).copied().ok_or_else(|| {
                    RuleError::of(
                        RuleErrorKind::UnknownSegment,
                        op.pos,
                        format!("unknown segment {id}"),
                    )
                })?;
                Val::Segment(idx)
            }
            OperandKind::Shift(base, span) => {
                Val::Shift(Box::new(self.operand(base, Need::Exact)?), *span)
            }
            OperandKind::Aggregate(agg) => Val::Reader(self.aggregate(agg, need)?),
        })
    }

    fn trait_slot(&mut self, name: &Arc<str>) -> u32 {
        if let Some(&i) = self.trait_index.get(name) {
            return i;
        }
        let i = self.traits.len() as u32;
        self.traits.push(name.clone());
        self.trait_index.insert(name.clone(), i);
        i
    }

    fn matcher(&mut self, selector: &EventSelector) -> Result<u32, RuleError> {
        let key = selector.to_string();
        if let Some(&m) = self.matcher_index.get(&key) {
            return Ok(m);
        }
        let filter = match &selector.filter {
            Some(f) => Some(self.condition(f)?),
            None => None,
        };
        let m = self.matchers.len() as u32;
        self.matchers.push(Matcher {
            event: selector.name.clone(),
            filter,
            key: key.clone(),
            cells: Vec::new(),
        });
        self.matcher_index.insert(key, m);
        Ok(m)
    }

    fn cell(
        &mut self,
        matcher: u32,
        kind: CellKind,
        property: Option<Arc<str>>,
        range: Option<(Timestamp, Timestamp)>,
    ) -> u32 {
        let key = (matcher, kind, property.clone(), range);
        if let Some(&c) = self.cell_index.get(&key) {
            return c;
        }
        let c = self.cells.len() as u32;
        self.cells.push(CellSpec {
            matcher,
            kind,
            property,
            range,
            cap: Some(0),
            bounds: Vec::new(),
        });
        self.cell_index.insert(key, c);
        self.matchers[matcher as usize].cells.push(c);
        c
    }

    /// Raises `cell`'s cap to cover `need`, within the limit.
    fn require(&mut self, cell: u32, need: Need) -> Result<(), RuleError> {
        let spec = &mut self.cells[cell as usize];
        spec.cap = match (spec.cap, need) {
            (None, _) | (_, Need::Exact) => None,
            (Some(cap), Need::UpTo(want, pos)) => {
                if want > self.limits.max_window_threshold {
                    return Err(RuleError::of(
                        RuleErrorKind::Limit,
                        pos,
                        format!(
                            "this comparison makes a windowed count or distinct keep {want} values per user, over the limit of {}",
                            self.limits.max_window_threshold
                        ),
                    ));
                }
                Some(cap.max(want))
            }
        };
        Ok(())
    }

    fn aggregate(&mut self, agg: &Aggregate, need: Need) -> Result<u32, RuleError> {
        let matcher = self.matcher(&agg.events)?;
        let (window, range, suffix) = match &agg.window {
            Window::Lifetime => (ReaderWindow::All, None, false),
            Window::Between(a, b) => (ReaderWindow::All, Some((*a, *b)), false),
            Window::Last(d) => (ReaderWindow::Last(*d), None, true),
            Window::Since { nth, anchor } => {
                let anchor_matcher = self.matcher(anchor)?;
                let anchor_cell = self.cell(anchor_matcher, CellKind::Anchor, None, None);
                let spec = &mut self.cells[anchor_cell as usize];
                spec.cap = Some(spec.cap.unwrap_or(0).max(*nth));
                (
                    ReaderWindow::Since {
                        anchor: anchor_cell,
                        nth: *nth,
                    },
                    None,
                    true,
                )
            }
        };
        let kind = match (agg.func, suffix) {
            (AggFunc::Count, false) => CellKind::Counter,
            (AggFunc::Count | AggFunc::FirstSeen, true) => CellKind::Recent,
            (AggFunc::Exists | AggFunc::LastSeen, _) => CellKind::MaxTs,
            (AggFunc::FirstSeen, false) => CellKind::MinTs,
            (AggFunc::Sum | AggFunc::Avg, false) => CellKind::SumTotal,
            (AggFunc::Sum | AggFunc::Avg, true) => CellKind::SumWindow,
            (AggFunc::Min, false) => CellKind::Extreme { max: false },
            (AggFunc::Max, false) => CellKind::Extreme { max: true },
            (AggFunc::Min, true) => CellKind::Staircase { max: false },
            (AggFunc::Max, true) => CellKind::Staircase { max: true },
            (AggFunc::Distinct, false) => CellKind::DistinctAll,
            (AggFunc::Distinct, true) => CellKind::DistinctRecent,
        };
        let property = if kind == CellKind::MaxTs || !agg.func.takes_property() {
            None
        } else {
            agg.property.clone()
        };
        let cell = self.cell(matcher, kind, property, range);
        match kind {
            CellKind::Recent if agg.func == AggFunc::FirstSeen => {
                self.require(cell, Need::Exact)?
            }
            CellKind::Recent | CellKind::DistinctAll | CellKind::DistinctRecent => {
                self.require(cell, need)?
            }
            _ => self.cells[cell as usize].cap = None,
        }
        if kind.is_suffix() {
            let bound = match window {
                ReaderWindow::Last(d) => Some(Bound::Last(d)),
                ReaderWindow::Since { anchor, nth } => Some(Bound::Since { anchor, nth }),
                ReaderWindow::All => None,
            };
            let bounds = &mut self.cells[cell as usize].bounds;
            if let Some(bound) = bound.filter(|b| !bounds.contains(b)) {
                bounds.push(bound);
            }
        }
        let r = self.readers.len() as u32;
        self.readers.push(Reader {
            func: agg.func,
            cell,
            window,
            segment: self.segment,
        });
        Ok(r)
    }
}

/// The total shift of `now` when `op` is `now` shifted by durations.
fn now_offset(op: &Operand) -> Option<Span> {
    match &op.kind {
        OperandKind::Now => Some(Span::ZERO),
        OperandKind::Shift(base, span) => {
            now_offset(base).map(|s| Span(s.millis().saturating_add(span.millis())))
        }
        _ => None,
    }
}

/// What a count or distinct needs when it is compared as `value op other`.
fn literal_need(op: CmpOp, other: &Operand) -> Need {
    match &other.kind {
        OperandKind::Literal(v) => v
            .as_number()
            .map_or(Need::Exact, |k| need_for_threshold(op, k, other.pos)),
        _ => Need::Exact,
    }
}

/// The smallest cap `m` such that a count saturated at `m` answers `count op k`
/// exactly. Every comparison with a constant reduces to "is the count at least
/// `m`?" for one `m`: below the cap the saturated count is the true count, and at
/// the cap both are at least `m`.
///
/// | comparison | same as | cap |
/// |---|---|---|
/// | `>= k`, `< k` | `count >= ceil(k)` (or its negation) | `ceil(k)` |
/// | `> k`, `<= k` | `count >= floor(k) + 1` (or its negation) | `floor(k) + 1` |
/// | `== k`, `!= k` | tells `k` from `k + 1` (never equal when `k` is fractional) | `k + 1` |
fn need_for_threshold(op: CmpOp, k: f64, pos: Pos) -> Need {
    let cap = match op {
        CmpOp::Ge | CmpOp::Lt => k.ceil(),
        CmpOp::Gt | CmpOp::Le => k.floor() + 1.0,
        CmpOp::Eq | CmpOp::Ne if k.fract() == 0.0 => k + 1.0,
        CmpOp::Eq | CmpOp::Ne => 0.0,
    }
    .max(0.0);
    if cap > f64::from(u32::MAX) {
        Need::UpTo(u32::MAX, pos)
    } else {
        Need::UpTo(cap as u32, pos)
    }
}

fn merge_need(a: Need, b: Need) -> Need {
    match (a, b) {
        (Need::UpTo(x, p), Need::UpTo(y, q)) => {
            if x >= y {
                Need::UpTo(x, p)
            } else {
                Need::UpTo(y, q)
            }
        }
        _ => Need::Exact,
    }
}

fn dependents_of(segments: &[SegmentPlan]) -> Vec<Vec<u32>> {
    let mut dependents = vec![Vec::new(); segments.len()];
    for (i, seg) in segments.iter().enumerate() {
        for &d in &seg.depends_on {
            dependents[d as usize].push(i as u32);
        }
    }
    dependents
}

/// `segments` and everything that references them, in evaluation order.
fn with_dependents(segments: BTreeSet<u32>, dependents: &[Vec<u32>]) -> Vec<u32> {
    let mut all = segments.clone();
    let mut stack: Vec<u32> = segments.into_iter().collect();
    while let Some(s) = stack.pop() {
        for &d in &dependents[s as usize] {
            if all.insert(d) {
                stack.push(d);
            }
        }
    }
    all.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(rules: &[(&str, &str)]) -> Plan {
        let defs: Vec<_> = rules.iter().map(|(id, r)| SegmentDef::new(id, r)).collect();
        Plan::compile(&defs, RuleVersion(1), &Limits::default()).unwrap()
    }

    #[test]
    fn shared_aggregates_are_kept_once() {
        let p = plan(&[
            ("a", "count(login) in last 7d >= 3"),
            ("b", "count(login) in last 30d >= 20"),
            (
                "c",
                "exists(login) in last 1d and last_seen(login) > now - 2d",
            ),
        ]);
        assert_eq!(p.reader_count(), 4);
        assert_eq!(p.cell_count(), 2, "{:#?}", p.cells);
        let recent = p.cells.iter().find(|c| c.kind == CellKind::Recent).unwrap();
        assert_eq!(recent.cap, Some(20));
        assert_eq!(
            recent.bounds,
            vec![Bound::Last(Span::days(7)), Bound::Last(Span::days(30))]
        );
        assert_eq!(p.matchers.len(), 1);
    }

    #[test]
    fn caps_follow_the_thresholds() {
        for (rule, cap) in [
            ("count(e) in last 1d >= 5", Some(5)),
            ("count(e) in last 1d > 5", Some(6)),
            ("count(e) in last 1d == 0", Some(1)),
            ("count(e) in last 1d < 2.5", Some(3)),
            ("count(e) in last 1d <= 2.5", Some(3)),
            ("count(e) in last 1d == 2.5", Some(0)),
            ("count(e) in last 1d in [1, 4]", Some(5)),
            ("2 <= count(e) in last 1d", Some(2)),
            ("2 > count(e) in last 1d", Some(2)),
            ("count(e) in last 1d > count(f) in last 1d", None),
            ("count(e) in last 1d > -3", Some(0)),
            ("first_seen(e) in last 1d < now - 1h", None),
        ] {
            let p = plan(&[("s", rule)]);
            let cell = p
                .cells
                .iter()
                .find(|c| c.kind == CellKind::Recent && p.matchers[c.matcher as usize].key == "e")
                .unwrap();
            assert_eq!(cell.cap, cap, "{rule}");
        }
    }

    #[test]
    fn routes_reach_dependents_and_only_readers_of_the_name() {
        let p = plan(&[
            ("repeat_buyers", "count(order_completed) in last 90d >= 2"),
            (
                "vip",
                "in_segment(\"repeat_buyers\") and sum(order_completed.revenue) >= 1000",
            ),
            ("dormant", "not exists(email_opened) in last 45d"),
            ("trial", "plan == \"trial\""),
        ]);
        let route = |name: &str| -> Vec<&str> {
            p.routes[name]
                .segments
                .iter()
                .map(|&s| p.segments[s as usize].def.id.as_str())
                .collect()
        };
        assert_eq!(route("order_completed"), ["repeat_buyers", "vip"]);
        assert_eq!(route("email_opened"), ["dormant"]);
        assert!(!p.routes.contains_key("page_viewed"));
        let trait_segs: Vec<_> = p
            .trait_segments
            .iter()
            .map(|&s| p.segments[s as usize].def.id.as_str())
            .collect();
        assert_eq!(trait_segs, ["trial"]);
    }

    #[test]
    fn comparisons_with_now_are_normalised() {
        let p = plan(&[("s", "now - 180d > last_seen(order_completed)")]);
        let Cond::CompareNow { op, offset, .. } = &p.segments[0].cond else {
            panic!("{:?}", p.segments[0].cond)
        };
        assert_eq!((*op, *offset), (CmpOp::Lt, Span::days(-180)));
    }

    #[test]
    fn windowed_thresholds_over_the_limit_are_rejected() {
        let defs = [SegmentDef::new("s", "count(e) in last 1d >= 50")];
        let limits = Limits {
            max_window_threshold: 10,
            ..Limits::default()
        };
        let err = Plan::compile(&defs, RuleVersion(1), &limits).unwrap_err();
        assert_eq!(err.rule_error().unwrap().kind, RuleErrorKind::Limit);
        assert_eq!(
            err.to_string(),
            "segment s: 1:24: this comparison makes a windowed count or distinct keep 50 values per user, over the limit of 10"
        );
        // A lifetime count is a counter: any threshold is fine.
        assert!(
            Plan::compile(
                &[SegmentDef::new("s", "count(e) >= 50")],
                RuleVersion(1),
                &limits
            )
            .is_ok()
        );
    }
}
