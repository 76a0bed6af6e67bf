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

/// The names [`Limits::set`] takes, with what each bounds.
pub const LIMIT_NAMES: &[(&str, &str)] = &[
    ("max_rule_bytes", "bytes of rule text"),
    ("max_depth", "nesting depth of parentheses, not and lists"),
    ("max_nodes", "expressions and operands in one rule"),
    ("max_aggregates", "aggregates in one rule"),
    ("max_list_len", "items in one list literal"),
    ("max_anchor_nth", "N in `since the Nth most recent X`"),
    (
        "max_window_threshold",
        "the largest threshold a windowed count or distinct is compared with",
    ),
    ("max_segments", "segments in one rule set"),
];

/// Reads a `NAME=VALUE` limit setting: the name, and the value as a positive
/// whole number; errors list the `known` names.
pub fn parse_setting<'a>(
    assignment: &'a str,
    known: &[(&str, &str)],
) -> Result<(&'a str, usize), String> {
    let names = || known.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
    let (name, value) = assignment
        .split_once('=')
        .ok_or_else(|| format!("a limit is NAME=VALUE ({})", names()))?;
    if !known.iter().any(|(n, _)| *n == name) {
        return Err(format!("unknown limit {name:?} ({})", names()));
    }
    let number = value
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("limit {name}: {value:?} is not a positive whole number"))?;
    Ok((name, number))
}

impl Limits {
    /// The most any setting may allow: what every node compiles rules the
    /// control plane accepted with, and what the control plane's replicated
    /// state machine checks against, so members configured differently never
    /// disagree on a write. (The defaults are the policy; this is the safety
    /// bound behind it.)
    pub fn ceiling() -> Limits {
        Limits {
            max_rule_bytes: 256 * 1024,
            max_depth: 256,
            max_nodes: 16 * 1024,
            max_aggregates: 1_024,
            max_list_len: 100_000,
            max_anchor_nth: 100_000,
            max_window_threshold: 1_000_000,
            max_segments: 65_535,
        }
    }

    /// Sets one limit from `NAME=VALUE`, at most its [`Limits::ceiling`].
    pub fn set(&mut self, assignment: &str) -> Result<(), String> {
        let (name, number) = parse_setting(assignment, LIMIT_NAMES)?;
        let ceiling = Limits::ceiling();
        let bounded = |most: usize| {
            if number > most {
                Err(format!(
                    "rule limit {name}: {number} is over the ceiling of {most}"
                ))
            } else {
                Ok(number)
            }
        };
        let small = |most: u32| bounded(most as usize).map(|n| n as u32);
        match name {
            "max_rule_bytes" => self.max_rule_bytes = bounded(ceiling.max_rule_bytes)?,
            "max_depth" => self.max_depth = bounded(ceiling.max_depth)?,
            "max_nodes" => self.max_nodes = bounded(ceiling.max_nodes)?,
            "max_aggregates" => self.max_aggregates = bounded(ceiling.max_aggregates)?,
            "max_list_len" => self.max_list_len = bounded(ceiling.max_list_len)?,
            "max_anchor_nth" => self.max_anchor_nth = small(ceiling.max_anchor_nth)?,
            "max_window_threshold" => {
                self.max_window_threshold = small(ceiling.max_window_threshold)?
            }
            "max_segments" => self.max_segments = bounded(ceiling.max_segments)?,
            other => return Err(format!("unknown limit {other:?}")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn limits_are_set_by_name_up_to_the_ceiling() {
        let mut limits = Limits::default();
        limits.set("max_nodes=4096").unwrap();
        limits.set("max_anchor_nth=5").unwrap();
        assert_eq!((limits.max_nodes, limits.max_anchor_nth), (4096, 5));
        for (bad, needle) in [
            ("max_nodes", "NAME=VALUE"),
            ("max_nodes=0", "not a positive"),
            ("max_nodes=100000", "over the ceiling of 16384"),
            ("max_colours=1", "unknown limit"),
        ] {
            let err = limits.set(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
        let defaults = Limits::default();
        let ceiling = Limits::ceiling();
        assert!(
            defaults.max_nodes <= ceiling.max_nodes
                && defaults.max_segments <= ceiling.max_segments
        );
    }
}
