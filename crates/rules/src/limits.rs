//! Size and complexity bounds on rules, so no rule can exhaust a node.

/// Bounds checked when rules are parsed and compiled. Every bound is configurable;
/// the defaults suit interactive segment definitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of rule text.
    pub max_rule_bytes: usize,
    /// Nesting depth of parentheses, `not` and lists.
    pub max_depth: usize,
    /// Nodes (expressions and operands) in one rule.
    pub max_nodes: usize,
    /// Aggregates in one rule.
    pub max_aggregates: usize,
    /// Items in one list literal.
    pub max_list_len: usize,
    /// N in `since the Nth most recent X` (each user keeps up to N timestamps of X).
    pub max_anchor_nth: u32,
    /// The largest threshold a windowed `count` or `distinct` may be compared with:
    /// each user keeps up to that many timestamps for it.
    pub max_window_threshold: u32,
    /// Segments in one rule set (at most 65,535 whatever this says).
    pub max_segments: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_rule_bytes: 16 * 1024,
            max_depth: 64,
            max_nodes: 1_024,
            max_aggregates: 64,
            max_list_len: 1_000,
            max_anchor_nth: 1_000,
            max_window_threshold: 10_000,
            max_segments: 10_000,
        }
    }
}
