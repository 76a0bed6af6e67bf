//! What the parser fuzz target checks for one input, shared with the test that
//! replays the corpus (`crates/rules/tests/fuzz_corpus.rs`).
//!
//! For any bytes: parsing, checking and compiling return a value and never panic;
//! and any rule that parses prints as text that parses again to the same printed
//! text (the printer and the parser agree).

use dynseg_rules::syntax::parse_rule;
use dynseg_rules::{Limits, Plan, RuleVersion, SegmentDef};

/// Runs every check on `data`; panics on a violation.
pub(crate) fn check_rule(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = Limits::default();
    let Ok(rule) = parse_rule(text, &limits) else {
        return;
    };
    let printed = rule.expr.to_string();
    match parse_rule(
        &printed,
        &Limits {
            max_rule_bytes: usize::MAX,
            ..limits.clone()
        },
    ) {
        Ok(again) => assert_eq!(
            again.expr.to_string(),
            printed,
            "printing is not stable for {text:?}"
        ),
        Err(e) => panic!("printed form {printed:?} of {text:?} does not parse: {e}"),
    }
    // Checking and compiling, alone and next to a segment it may reference.
    let defs = [
        SegmentDef::new("s", text),
        SegmentDef::new("vip", "count(order_completed) >= 2"),
    ];
    let _ = Plan::compile(&defs, RuleVersion(1), &limits);
    let _ = Plan::compile(&defs[..1], RuleVersion(1), &limits);
}
