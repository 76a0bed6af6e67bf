//! The rule language reference (docs/rules.md) stays true: its table of the nine
//! SPEC segments compiles as one rule set, with the SPEC's ids, and says what the
//! data-driven tests and benchmarks run.

#![allow(clippy::unwrap_used, missing_docs)]

use dynseg_rules::{Limits, Plan, RuleVersion, SegmentDef};

fn nine_segments_from_docs() -> Vec<SegmentDef> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/rules.md");
    let text = std::fs::read_to_string(path).unwrap();
    let section = text.split("## The nine example segments").nth(1).unwrap();
    let table = section
        .split("\n\n")
        .find(|block| block.starts_with("| id | rule |"))
        .unwrap();
    table
        .lines()
        .skip(2)
        .map(|row| {
            let cells: Vec<&str> = row.split(" | ").collect();
            let id = cells[0].trim_start_matches("| `").trim_end_matches('`');
            let rule = cells[1]
                .trim_end_matches(" |")
                .trim_start_matches('`')
                .trim_end_matches('`');
            SegmentDef::new(id, rule)
        })
        .collect()
}

#[test]
fn the_nine_spec_segments_in_the_docs_compile_together() {
    let defs = nine_segments_from_docs();
    assert_eq!(
        defs,
        dynseg_rules::examples::spec_segments(),
        "docs/rules.md and dynseg_rules::examples disagree"
    );
    let ids: Vec<&str> = defs.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "repeat_buyers",
            "email_dormant",
            "big_spenders_30d",
            "high_intent_shoes",
            "cart_abandoners",
            "onboarding_stuck",
            "power_users",
            "win_back",
            "vip"
        ]
    );
    let plan = Plan::compile(&defs, RuleVersion(1), &Limits::default()).unwrap();
    // Shared state: 15 aggregates over 10 event kinds keep 13 cells.
    assert_eq!(plan.reader_count(), 15);
    assert_eq!(plan.cell_count(), 13);
}

#[test]
fn the_spec_test_files_run_the_documented_rules() {
    for def in nine_segments_from_docs() {
        let path = format!(
            "{}/testdata/spec_{}.txt",
            env!("CARGO_MANIFEST_DIR"),
            def.id
        );
        let text = std::fs::read_to_string(&path).unwrap();
        // The test file writes the rule over continuation lines; join them.
        let block = text
            .split("segments\n")
            .nth(1)
            .unwrap()
            .split("\n----")
            .next()
            .unwrap();
        let line = block
            .lines()
            .find(|l| l.starts_with(&format!("{}:", def.id)))
            .unwrap();
        let mut rule = line.split_once(':').unwrap().1.trim().to_owned();
        for more in block
            .lines()
            .skip_while(|l| *l != line)
            .skip(1)
            .take_while(|l| l.starts_with(' '))
        {
            rule.push(' ');
            rule.push_str(more.trim());
        }
        assert_eq!(rule, def.rule, "{path}");
    }
}
