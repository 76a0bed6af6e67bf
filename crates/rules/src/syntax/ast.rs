//! The syntax tree of a rule, as the parser produces it and the checker reads it.
//!
//! Every node carries the [`Pos`] where it starts, so later stages can point at it.
//! `Display` prints a tree back as rule text that parses to the same tree.

use std::fmt;
use std::sync::Arc;

use crate::event::{EventName, SegmentId};
use crate::time::{Span, Timestamp};
use crate::value::Value;

/// A 1-based line and column (columns count characters, not bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1.
    pub column: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A boolean expression.
#[derive(Clone, Debug)]
pub struct Expr {
    /// What the expression is.
    pub kind: ExprKind,
    /// Where it starts.
    pub pos: Pos,
}

/// The kinds of boolean expression.
#[derive(Clone, Debug)]
pub enum ExprKind {
    /// Both hold.
    And(Box<Expr>, Box<Expr>),
    /// Either holds.
    Or(Box<Expr>, Box<Expr>),
    /// Flips a boolean (`not (x > 3)` is true when x is null).
    Not(Box<Expr>),
    /// `lhs op rhs`; false when either side is null or the types differ.
    Compare(CmpOp, Operand, Operand),
    /// `lhs in [v1, v2, ...]`: equal to one of the listed values.
    In(Operand, Vec<Value>),
    /// `lhs contains rhs`: substring of a string, element of a list.
    Contains(Operand, Operand),
    /// `lhs starts_with rhs`, on strings.
    StartsWith(Operand, Operand),
    /// `x is null` (`negated`: `x is not null`, also written `x exists`).
    IsNull {
        /// The value tested.
        operand: Operand,
        /// True for `is not null` / `exists`.
        negated: bool,
    },
    /// A value in a boolean position: `exists(e)`, `in_segment("s")`, or a trait
    /// or property that is true only when it is the boolean `true`.
    Truthy(Operand),
}

/// Comparison operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl CmpOp {
    /// The operator with its sides swapped (`a < b` is `b > a`).
    pub fn flipped(self) -> CmpOp {
        match self {
            CmpOp::Eq => CmpOp::Eq,
            CmpOp::Ne => CmpOp::Ne,
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
        }
    }

    /// True when the operator orders (as opposed to testing equality).
    pub fn is_ordering(self) -> bool {
        !matches!(self, CmpOp::Eq | CmpOp::Ne)
    }

    /// The operator's text.
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

/// A value-producing expression.
#[derive(Clone, Debug)]
pub struct Operand {
    /// What the operand is.
    pub kind: OperandKind,
    /// Where it starts.
    pub pos: Pos,
}

/// The kinds of operand.
#[derive(Clone, Debug)]
pub enum OperandKind {
    /// A literal value.
    Literal(Value),
    /// The engine's clock.
    Now,
    /// A profile trait of the user (outside `where` filters).
    Trait(Arc<str>),
    /// A property of the event being filtered (inside `where` filters).
    Property(Arc<str>),
    /// A behavioural aggregate over the user's events.
    Aggregate(Box<Aggregate>),
    /// `in_segment("id")`: the user's current membership of another segment.
    InSegment(SegmentId),
    /// `base + span` or `base - span` (negative span), on timestamps.
    Shift(Box<Operand>, Span),
}

/// The aggregate functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AggFunc {
    /// Number of matching events.
    Count,
    /// Sum of a number property (0 over nothing).
    Sum,
    /// Mean of a number property (null over nothing).
    Avg,
    /// Least number (null over nothing).
    Min,
    /// Greatest number (null over nothing).
    Max,
    /// Number of distinct values of a property.
    Distinct,
    /// Timestamp of the earliest matching event.
    FirstSeen,
    /// Timestamp of the latest matching event.
    LastSeen,
    /// Whether any matching event exists.
    Exists,
}

impl AggFunc {
    /// Every function, in the order the documentation lists them.
    pub const ALL: [AggFunc; 9] = [
        AggFunc::Count,
        AggFunc::Sum,
        AggFunc::Avg,
        AggFunc::Min,
        AggFunc::Max,
        AggFunc::Distinct,
        AggFunc::FirstSeen,
        AggFunc::LastSeen,
        AggFunc::Exists,
    ];

    /// The function's name in rule text.
    pub fn name(self) -> &'static str {
        match self {
            AggFunc::Count => "count",
            AggFunc::Sum => "sum",
            AggFunc::Avg => "avg",
            AggFunc::Min => "min",
            AggFunc::Max => "max",
            AggFunc::Distinct => "distinct",
            AggFunc::FirstSeen => "first_seen",
            AggFunc::LastSeen => "last_seen",
            AggFunc::Exists => "exists",
        }
    }

    /// The function named `name`.
    pub fn from_name(name: &str) -> Option<AggFunc> {
        AggFunc::ALL.into_iter().find(|f| f.name() == name)
    }

    /// True for the functions that read a property (`sum(order_completed.revenue)`).
    pub fn takes_property(self) -> bool {
        matches!(
            self,
            AggFunc::Sum | AggFunc::Avg | AggFunc::Min | AggFunc::Max | AggFunc::Distinct
        )
    }
}

/// `func(event[.property] [where filter]) [window]`.
#[derive(Clone, Debug)]
pub struct Aggregate {
    /// Which aggregate.
    pub func: AggFunc,
    /// The events it reads: one name, optionally filtered.
    pub events: EventSelector,
    /// The property it reads, for the functions that take one.
    pub property: Option<Arc<str>>,
    /// Which of those events count, by time.
    pub window: Window,
}

/// Events of one name, optionally filtered by a predicate on their properties.
#[derive(Clone, Debug)]
pub struct EventSelector {
    /// The event name.
    pub name: EventName,
    /// Where the name is written.
    pub name_pos: Pos,
    /// `where ...`: only events whose properties satisfy it.
    pub filter: Option<Box<Expr>>,
}

/// The time window of an aggregate.
#[derive(Clone, Debug)]
pub enum Window {
    /// Every due event (no window written, or `in lifetime`).
    Lifetime,
    /// `in last D`: `now - D < timestamp <= now`.
    Last(Span),
    /// `between T1 and T2`: `T1 <= timestamp <= T2` (and `<= now`).
    Between(Timestamp, Timestamp),
    /// `since the Nth most recent X`: timestamp at or after the Nth most recent due
    /// X (the oldest X when there are fewer than N; empty when there is none).
    Since {
        /// N, from 1.
        nth: u32,
        /// The anchor events.
        anchor: EventSelector,
    },
}

/// A segment's rule as parsed: the text and its tree.
#[derive(Clone, Debug)]
pub struct Rule {
    /// The source text.
    pub text: Arc<str>,
    /// The parsed expression.
    pub expr: Expr,
}

// ---------------------------------------------------------------------------
// Printing. Output parses back to the same tree (tested in the parser module).

/// Binding strength of a boolean expression, for minimal parentheses.
fn precedence(expr: &Expr) -> u8 {
    match expr.kind {
        ExprKind::Or(..) => 1,
        ExprKind::And(..) => 2,
        ExprKind::Not(_) => 3,
        _ => 4,
    }
}

fn write_child(f: &mut fmt::Formatter<'_>, child: &Expr, min: u8) -> fmt::Result {
    if precedence(child) < min {
        write!(f, "({child})")
    } else {
        write!(f, "{child}")
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ExprKind::Or(a, b) => {
                write_child(f, a, 1)?;
                f.write_str(" or ")?;
                write_child(f, b, 2)
            }
            ExprKind::And(a, b) => {
                write_child(f, a, 2)?;
                f.write_str(" and ")?;
                write_child(f, b, 3)
            }
            ExprKind::Not(e) => {
                f.write_str("not ")?;
                write_child(f, e, 3)
            }
            ExprKind::Compare(op, a, b) => write!(f, "{a} {} {b}", op.as_str()),
            ExprKind::In(a, list) => {
                write!(f, "{a} in ")?;
                write!(f, "{}", Value::List(list.clone().into()))
            }
            ExprKind::Contains(a, b) => write!(f, "{a} contains {b}"),
            ExprKind::StartsWith(a, b) => write!(f, "{a} starts_with {b}"),
            ExprKind::IsNull {
                operand,
                negated: false,
            } => write!(f, "{operand} is null"),
            ExprKind::IsNull {
                operand,
                negated: true,
            } => write!(f, "{operand} is not null"),
            ExprKind::Truthy(a) => write!(f, "{a}"),
        }
    }
}

/// Writes a name bare when it lexes as an identifier and is not reserved, else in
/// backticks.
fn write_name(f: &mut fmt::Formatter<'_>, name: &str) -> fmt::Result {
    if super::lexer::is_plain_identifier(name) && !super::parser::is_reserved(name) {
        f.write_str(name)
    } else {
        write!(f, "`{}`", name.replace('`', "``"))
    }
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            OperandKind::Literal(v) => write!(f, "{v}"),
            OperandKind::Now => f.write_str("now"),
            OperandKind::Trait(name) | OperandKind::Property(name) => write_name(f, name),
            OperandKind::Aggregate(agg) => write!(f, "{agg}"),
            OperandKind::InSegment(id) => {
                f.write_str("in_segment(")?;
                crate::value::write_quoted(f, id.as_str())?;
                f.write_str(")")
            }
            OperandKind::Shift(base, span) => {
                write!(f, "{base}")?;
                if span.millis() < 0 {
                    write!(f, " - {}", Span(-span.millis()))
                } else {
                    write!(f, " + {span}")
                }
            }
        }
    }
}

impl fmt::Display for EventSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_name(f, self.name.as_str())?;
        if let Some(filter) = &self.filter {
            write!(f, " where {filter}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Aggregate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.func.name())?;
        write_name(f, self.events.name.as_str())?;
        if let Some(property) = &self.property {
            f.write_str(".")?;
            write_name(f, property)?;
        }
        if let Some(filter) = &self.events.filter {
            write!(f, " where {filter}")?;
        }
        f.write_str(")")?;
        match &self.window {
            Window::Lifetime => Ok(()),
            Window::Last(span) => write!(f, " in last {span}"),
            Window::Between(a, b) => write!(f, " between @{a} and @{b}"),
            Window::Since { nth, anchor } => {
                write!(f, " since the {nth}{} most recent ", ordinal_suffix(*nth))?;
                if anchor.filter.is_some() {
                    write!(f, "({anchor})")
                } else {
                    write!(f, "{anchor}")
                }
            }
        }
    }
}

/// `st`, `nd`, `rd` or `th`, as English writes 1st, 2nd, 3rd, 11th, 21st.
pub fn ordinal_suffix(n: u32) -> &'static str {
    match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    }
}
