//! # dynseg-rules: the segment rule language and its incremental evaluator
//!
//! A pure library: no I/O, no clock, no threads. Inputs are events and instants;
//! outputs are membership changes and the next instant anything could change. The
//! shard node wraps it with storage, timers and networking.
//!
//! ```text
//!  rule text ──parse──▶ syntax tree ──check──▶ checked set ──compile──▶ Plan
//!                                                                        │
//!  UserState ◀── apply(state, event, now) / advance(state, now) ────────┘
//!      └──▶ Vec<Change> (user, segment, enter|exit, at, cause, version)
//!           next_wakeup(state): earliest instant a membership could change
//! ```
//!
//! ## Map of the crate
//!
//! | module | what it holds |
//! |---|---|
//! | [`time`], [`value`], [`event`] | the data model of SPEC.md section 2 |
//! | [`syntax`] | lexer, syntax tree, parser, printer of the rule language |
//! | [`check`] | type and reference checks, size limits ([`limits`]) |
//! | `plan` | compilation into shared matchers, cells and readers: [`Plan`] |
//! | `cell`, `state` | compact per-user state: [`UserState`] |
//! | `eval` | `apply`, `advance`, `next_wakeup`, `rebuild` on a [`Plan`] |
//! | `migrate` | moving states to a new rule set: [`Migration`] |
//! | `merge` | identity merge: one user's state folded into another's ([`Plan::merge`]) |
//! | [`explain`](mod@explain) | a rule's tree evaluated for one user, and its next change |
//! | [`reference`](mod@reference) | the brute-force evaluator the tests hold the engine to |
//! | [`exact_sum`] | order-independent exact sums for `sum` and `avg` |
//! | [`change`], [`error`] | what the engine emits, and what can go wrong |
//! | [`examples`] | the nine example segments of SPEC.md section 3 |
//!
//! ## Example
//!
//! ```
//! use dynseg_rules::{Event, Limits, Plan, Properties, RuleVersion, SegmentDef, Span, Timestamp};
//!
//! let defs = [SegmentDef::new("repeat_buyers", "count(order_completed) in last 90d >= 2")];
//! let plan = Plan::compile(&defs, RuleVersion(1), &Limits::default()).unwrap();
//! let now = Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
//! let mut state = plan.new_state();
//! let mut changes = Vec::new();
//! for (id, at) in [("m1", now.minus(Span::days(10))), ("m2", now)] {
//!     let order = Event::track(id, "alice", "order_completed", at, Properties::new());
//!     plan.apply(&mut state, &order, now, &mut changes);
//! }
//! assert_eq!(changes[0].to_string(), "2026-01-01T00:00:00Z alice enter repeat_buyers (event)");
//! // The older order leaves the 90-day window on 2026-03-22: that is when alice exits.
//! assert_eq!(state.next_wakeup().unwrap().to_string(), "2026-03-22T00:00:00Z");
//! ```

mod arena;
mod cell;
pub mod change;
pub mod check;
mod codec;
pub mod error;
mod eval;
pub mod event;
pub mod exact_sum;
pub mod examples;
pub mod explain;
mod id;
pub mod limits;
mod merge;
mod migrate;
mod plan;
pub mod reference;
pub mod segment;
mod state;
pub mod syntax;
pub mod time;
pub mod value;

#[doc(hidden)]
pub use arena::prefetch_line;
pub use change::{Cause, Change, ChangeKind};
pub use error::{Error, RuleError, RuleErrorKind};
pub use event::{Event, EventBody, EventName, MessageId, Properties, SegmentId, UserId};
pub use explain::{Clause, Explanation, NextChange, OperandValue};
pub use id::{IdStr, InlineStr, MessageStr};
pub use limits::Limits;
pub use migrate::Migration;
pub use plan::Plan;
pub use segment::{RuleVersion, SegmentDef};
pub use state::{StateDecodeError, UserState};
pub use time::{Span, Timestamp};
pub use value::Value;
