//! Replays the parser fuzz corpus (crates/rules/fuzz/corpus/parse) as an ordinary
//! test: every input that fuzzing kept, and every input that once broke the
//! parser, must pass the fuzz target's checks on stable Rust too.

#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../fuzz/check_rule.rs"]
mod check_rule;

#[test]
fn parser_fuzz_corpus_replays_cleanly() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| check_rule::check_rule(&data));
        assert!(result.is_ok(), "corpus input {} fails", path.display());
        count += 1;
    }
    assert!(
        count >= 50,
        "the corpus at {} has only {count} inputs",
        dir.display()
    );
}
