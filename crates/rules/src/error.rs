//! Errors of the rule language: every one is a value that names where and why.

use crate::event::SegmentId;
use crate::syntax::Pos;

/// The broad kind of a rule error, for callers that branch on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleErrorKind {
    /// The text does not follow the grammar.
    Syntax,
    /// A function name that does not exist.
    UnknownFunction,
    /// An operation applied to a value of the wrong type.
    Type,
    /// A window that is empty, zero or negative.
    Window,
    /// `in_segment` names a segment that is not defined.
    UnknownSegment,
    /// `in_segment` references form a cycle.
    Cycle,
    /// The rule is over a size or complexity limit.
    Limit,
}

/// An error at a position in one rule's text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{pos}: {message}")]
pub struct RuleError {
    /// What kind of error.
    pub kind: RuleErrorKind,
    /// Where in the rule text (1-based line and column).
    pub pos: Pos,
    /// What was wrong and, for syntax errors, what was expected.
    pub message: String,
}

impl RuleError {
    /// A syntax error.
    pub(crate) fn new(pos: Pos, message: impl Into<String>) -> Self {
        RuleError {
            kind: RuleErrorKind::Syntax,
            pos,
            message: message.into(),
        }
    }

    /// An error of another kind.
    pub(crate) fn of(kind: RuleErrorKind, pos: Pos, message: impl Into<String>) -> Self {
        RuleError {
            kind,
            pos,
            message: message.into(),
        }
    }
}

/// Errors of this crate.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Error {
    /// A segment's rule is invalid.
    #[error("segment {segment}: {error}")]
    Rule {
        /// The segment whose rule failed.
        segment: SegmentId,
        /// Where and why.
        error: RuleError,
    },
    /// Several segments' rules are invalid: one error per segment, in the
    /// order given, shown a line each (so one answer names every rule to fix).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Rules(Vec<Error>),
    /// Two segments share an id.
    #[error("segment id {0} is defined twice")]
    DuplicateSegment(SegmentId),
    /// A segment id is empty, too long or has characters outside `[A-Za-z0-9_.-]`.
    #[error("invalid segment id {0:?}: use 1 to 128 of A-Z a-z 0-9 _ . -")]
    InvalidSegmentId(String),
    /// More segments than the limit allows.
    #[error("{count} segments exceed the limit of {limit}")]
    TooManySegments {
        /// How many were given.
        count: usize,
        /// The limit.
        limit: usize,
    },
}

impl Error {
    /// The positioned rule error, when there is one (the first, of several).
    pub fn rule_error(&self) -> Option<&RuleError> {
        match self {
            Error::Rule { error, .. } => Some(error),
            Error::Rules(errors) => errors.first().and_then(Error::rule_error),
            _ => None,
        }
    }

    /// One error for `errors` found checking rules one by one: none, the one,
    /// or [`Error::Rules`] holding them all.
    pub fn all(mut errors: Vec<Error>) -> Option<Error> {
        match errors.len() {
            0 => None,
            1 => errors.pop(),
            _ => Some(Error::Rules(errors)),
        }
    }
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
