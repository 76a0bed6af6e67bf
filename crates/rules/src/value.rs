//! Property and trait values, and the typed comparisons of SPEC.md sections 2 and 3.
//!
//! Comparisons are typed: a number compares with a number, a string with a string
//! (byte-wise, so case-sensitive), a timestamp with a timestamp. Anything compared
//! with null, or with a value of another type, is false. The one conversion: a
//! string that reads as RFC 3339 compares with a timestamp as that instant, because
//! JSON clients can only send timestamps as strings.

use std::cmp::Ordering;
use std::fmt;

use crate::time::Timestamp;

/// A property or trait value.
#[derive(Clone, Debug, Default)]
pub enum Value {
    /// Explicit null (a missing key reads as null too).
    #[default]
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A finite f64; integers are exact up to 2^53.
    Number(f64),
    /// UTF-8 text.
    String(Box<str>),
    /// An instant.
    Timestamp(Timestamp),
    /// A list of values.
    List(Box<[Value]>),
}

/// The type of a value, as the checker and error messages name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueType {
    /// Null.
    Null,
    /// Boolean.
    Bool,
    /// Number.
    Number,
    /// String.
    String,
    /// Timestamp.
    Timestamp,
    /// List.
    List,
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ValueType::Null => "null",
            ValueType::Bool => "bool",
            ValueType::Number => "number",
            ValueType::String => "string",
            ValueType::Timestamp => "timestamp",
            ValueType::List => "list",
        })
    }
}

impl Value {
    /// The value's type.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::Null => ValueType::Null,
            Value::Bool(_) => ValueType::Bool,
            Value::Number(_) => ValueType::Number,
            Value::String(_) => ValueType::String,
            Value::Timestamp(_) => ValueType::Timestamp,
            Value::List(_) => ValueType::List,
        }
    }

    /// True for [`Value::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The number, if this is a finite number. Aggregates skip everything else.
    pub fn as_number(&self) -> Option<f64> {
        match self {
            Value::Number(n) if n.is_finite() => Some(*n),
            _ => None,
        }
    }

    /// The instant, if this is a timestamp or a string in RFC 3339.
    pub fn as_timestamp(&self) -> Option<Timestamp> {
        match self {
            Value::Timestamp(t) => Some(*t),
            Value::String(s) => Timestamp::parse_rfc3339(s).ok(),
            _ => None,
        }
    }

    /// Typed ordering, `None` when the two are not comparable (null, different
    /// types, or an ordering asked of bools or lists).
    pub fn compare(&self, other: &Value) -> Option<Ordering> {
        match (self, other) {
            (Value::Number(a), Value::Number(b)) => a.partial_cmp(b),
            (Value::String(a), Value::String(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
            (Value::Timestamp(a), Value::Timestamp(b)) => Some(a.cmp(b)),
            (Value::Timestamp(a), Value::String(_)) => other.as_timestamp().map(|b| a.cmp(&b)),
            (Value::String(_), Value::Timestamp(b)) => self.as_timestamp().map(|a| a.cmp(b)),
            _ => None,
        }
    }

    /// Typed equality: `None` when the two are not comparable.
    pub fn equals(&self, other: &Value) -> Option<bool> {
        match (self, other) {
            (Value::Bool(a), Value::Bool(b)) => Some(a == b),
            (Value::List(a), Value::List(b)) => {
                if a.len() != b.len() {
                    return Some(false);
                }
                let mut all = true;
                for (x, y) in a.iter().zip(b.iter()) {
                    all &= x.equals(y)?;
                }
                Some(all)
            }
            _ => self.compare(other).map(Ordering::is_eq),
        }
    }

    /// `self contains needle`: a substring of a string, or an element of a list.
    pub fn contains(&self, needle: &Value) -> bool {
        match (self, needle) {
            (Value::String(hay), Value::String(n)) => hay.contains(&**n),
            (Value::List(items), _) => items.iter().any(|item| item.equals(needle) == Some(true)),
            _ => false,
        }
    }

    /// `self starts_with prefix`, for strings.
    pub fn starts_with(&self, prefix: &Value) -> bool {
        match (self, prefix) {
            (Value::String(s), Value::String(p)) => s.starts_with(&**p),
            _ => false,
        }
    }

    /// The truth of a value in a boolean position: only `true` is true.
    pub fn is_true(&self) -> bool {
        matches!(self, Value::Bool(true))
    }
}

/// A total order and exact identity over values, for `distinct` and for sorting.
/// Numbers compare by value with `-0.0 == 0.0`.
#[derive(Clone, Debug)]
pub struct ValueKey(pub Value);

fn rank(value: &Value) -> u8 {
    match value {
        Value::Null => 0,
        Value::Bool(_) => 1,
        Value::Number(_) => 2,
        Value::String(_) => 3,
        Value::Timestamp(_) => 4,
        Value::List(_) => 5,
    }
}

/// The total order behind [`ValueKey`]: by type, then by value.
fn total_cmp(a: &Value, b: &Value) -> Ordering {
    let by_rank = rank(a).cmp(&rank(b));
    if by_rank.is_ne() {
        return by_rank;
    }
    match (a, b) {
        (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
        // Adding 0.0 turns -0.0 into 0.0 so both are one key.
        (Value::Number(a), Value::Number(b)) => (a + 0.0).total_cmp(&(b + 0.0)),
        (Value::String(a), Value::String(b)) => a.cmp(b),
        (Value::Timestamp(a), Value::Timestamp(b)) => a.cmp(b),
        (Value::List(a), Value::List(b)) => {
            for (x, y) in a.iter().zip(b.iter()) {
                let o = total_cmp(x, y);
                if o.is_ne() {
                    return o;
                }
            }
            a.len().cmp(&b.len())
        }
        _ => Ordering::Equal,
    }
}

impl Ord for ValueKey {
    fn cmp(&self, other: &Self) -> Ordering {
        total_cmp(&self.0, &other.0)
    }
}

impl PartialOrd for ValueKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for ValueKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for ValueKey {}

impl PartialEq for Value {
    /// Structural equality (null equals null); rule comparisons use [`Value::equals`].
    fn eq(&self, other: &Self) -> bool {
        total_cmp(self, other).is_eq()
    }
}

impl fmt::Display for Value {
    /// The value as the rule language would write it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Number(n) => write!(f, "{n}"),
            Value::String(s) => write_quoted(f, s),
            Value::Timestamp(t) => write!(f, "@{t}"),
            Value::List(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// Writes `text` as a rule-language string literal: in double quotes, with `"`, `\\`
/// and control characters escaped the way the lexer reads them back.
pub fn write_quoted(f: &mut impl fmt::Write, text: &str) -> fmt::Result {
    f.write_char('"')?;
    for c in text.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\t' => f.write_str("\\t")?,
            '\r' => f.write_str("\\r")?,
            c if c.is_control() => write!(f, "\\u{{{:x}}}", u32::from(c))?,
            c => f.write_char(c)?,
        }
    }
    f.write_char('"')
}

impl From<f64> for Value {
    fn from(n: f64) -> Self {
        Value::Number(n)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.into())
    }
}

impl From<Timestamp> for Value {
    fn from(t: Timestamp) -> Self {
        Value::Timestamp(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Value {
        Value::from(text)
    }

    #[test]
    fn comparisons_are_typed_and_case_sensitive() {
        assert_eq!(s("Shoes").equals(&s("shoes")), Some(false));
        assert_eq!(s("shoes").equals(&s("shoes")), Some(true));
        assert_eq!(Value::Number(3.0).equals(&s("3")), None);
        assert_eq!(
            Value::Number(3.0).compare(&Value::Number(4.0)),
            Some(Ordering::Less)
        );
        assert_eq!(Value::Bool(true).compare(&Value::Bool(false)), None);
        assert_eq!(Value::Bool(true).equals(&Value::Bool(true)), Some(true));
    }

    #[test]
    fn null_compares_with_nothing() {
        for other in [Value::Null, Value::Number(0.0), s(""), Value::Bool(false)] {
            assert_eq!(Value::Null.compare(&other), None);
            assert_eq!(Value::Null.equals(&other), None);
        }
    }

    #[test]
    fn rfc3339_strings_compare_with_timestamps() {
        let t = Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        let ts = Value::Timestamp(t);
        assert_eq!(
            s("2026-01-01T00:00:01Z").compare(&ts),
            Some(Ordering::Greater)
        );
        assert_eq!(ts.compare(&s("2026-01-01")), Some(Ordering::Equal));
        assert_eq!(ts.compare(&s("yesterday")), None);
    }

    #[test]
    fn contains_and_starts_with() {
        assert!(s("running shoes").contains(&s("shoes")));
        assert!(!s("running shoes").contains(&s("Shoes")));
        let list = Value::List(vec![s("a"), Value::Number(1.0)].into());
        assert!(list.contains(&Value::Number(1.0)));
        assert!(!list.contains(&s("1")));
        assert!(s("/checkout/step").starts_with(&s("/checkout")));
        assert!(!Value::Number(12.0).starts_with(&s("1")));
    }

    #[test]
    fn value_keys_identify_negative_zero_with_zero() {
        assert_eq!(ValueKey(Value::Number(-0.0)), ValueKey(Value::Number(0.0)));
        assert!(ValueKey(Value::Number(1.0)) < ValueKey(s("1")));
    }
}
