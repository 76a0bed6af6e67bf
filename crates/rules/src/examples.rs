//! The nine example segments of SPEC.md section 3, with the SPEC's ids, exactly
//! as docs/rules.md writes them (its test checks the two agree). Benchmarks,
//! tests and demos across the workspace use this one copy.

use crate::SegmentDef;

/// (id, rule) of each example segment, in SPEC order.
pub const SPEC_SEGMENTS: [(&str, &str); 9] = [
    ("repeat_buyers", "count(order_completed) in last 90d >= 2"),
    ("email_dormant", "not exists(email_opened) in last 45d"),
    (
        "big_spenders_30d",
        "sum(order_completed.revenue) in last 30d > 500",
    ),
    (
        "high_intent_shoes",
        "count(product_viewed where category == \"shoes\") in last 7d >= 3 and not exists(order_completed where category == \"shoes\") in last 7d",
    ),
    (
        "cart_abandoners",
        "exists(product_added) in last 24h and not (last_seen(checkout_completed) > last_seen(product_added))",
    ),
    (
        "onboarding_stuck",
        "plan == \"trial\" and count(session_started) in last 5d < 2 and not (setup_completed == true)",
    ),
    (
        "power_users",
        "count(login) in last 30d >= 20 and distinct(feature_used.feature) in last 30d >= 5",
    ),
    (
        "win_back",
        "exists(order_completed) and last_seen(order_completed) < now - 180d and not exists(email_opened) since the 5th most recent campaign_sent",
    ),
    (
        "vip",
        "in_segment(\"repeat_buyers\") and sum(order_completed.revenue) >= 1000",
    ),
];

/// The example segments as definitions.
pub fn spec_segments() -> Vec<SegmentDef> {
    SPEC_SEGMENTS
        .iter()
        .map(|(id, rule)| SegmentDef::new(id, rule))
        .collect()
}
