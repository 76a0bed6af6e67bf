//! Segment definitions and rule-set versions.

use std::fmt;

use crate::event::SegmentId;

/// A segment as an operator defines it (SPEC.md section 3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentDef {
    /// Stable id, `[A-Za-z0-9_.-]{1,128}`.
    pub id: SegmentId,
    /// Human-readable name.
    pub name: String,
    /// What the segment is for.
    pub description: String,
    /// The rule text.
    pub rule: String,
}

impl SegmentDef {
    /// A definition whose name is its id and with no description.
    pub fn new(id: &str, rule: &str) -> SegmentDef {
        SegmentDef {
            id: SegmentId::from(id),
            name: id.to_owned(),
            description: String::new(),
            rule: rule.to_owned(),
        }
    }
}

/// The cluster-wide version of the whole rule set; it increases with every change,
/// and every membership change names the version that produced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RuleVersion(pub u64);

impl fmt::Display for RuleVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// True when `id` is a valid segment id.
pub fn is_valid_segment_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}
