//! Membership changes: what the engine emits.

use std::fmt;

use crate::event::{SegmentId, UserId};
use crate::segment::RuleVersion;
use crate::time::Timestamp;

/// A user entered or left a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Who.
    pub user: UserId,
    /// Which segment.
    pub segment: SegmentId,
    /// Entered or left.
    pub kind: ChangeKind,
    /// When: the event's processing time, or the exact instant time made it true.
    pub at: Timestamp,
    /// What caused it.
    pub cause: Cause,
    /// The rule-set version that produced it.
    pub version: RuleVersion,
}

/// The direction of a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChangeKind {
    /// The user became a member.
    Enter,
    /// The user stopped being a member.
    Exit,
}

/// Why a membership changed (SPEC.md section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// An event of the user arrived.
    Event,
    /// Time passed: a window slid past an event, a future-dated event fell due, or
    /// a comparison with `now` turned.
    Time,
    /// The rule set changed.
    Rule,
}

impl fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChangeKind::Enter => "enter",
            ChangeKind::Exit => "exit",
        })
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cause::Event => "event",
            Cause::Time => "time",
            Cause::Rule => "rule",
        })
    }
}

impl fmt::Display for Change {
    /// `2026-01-01T00:00:00Z alice enter vip (event)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} ({})",
            self.at, self.user, self.kind, self.segment, self.cause
        )
    }
}
