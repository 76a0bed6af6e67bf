//! Parser, checker and compiler never panic; printed rules parse back.

#![no_main]

#[path = "../check_rule.rs"]
mod check_rule;

libfuzzer_sys::fuzz_target!(|data: &[u8]| check_rule::check_rule(data));
