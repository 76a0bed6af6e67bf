//! Segment insight end to end against the real `dynseg dev` on the manual
//! clock, with exact expected values: overlap, size history and volatility
//! (`dynseg segment stats`, the gRPC series, the metrics), and explain.

#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::time::Duration;

use dynseg_proto::pb;
use serde_json::json;
use support::clients::http;
use support::dev::{Dev, T0, ms};

const HOUR: i64 = 3_600_000;

fn track(id: &str, user: &str, name: &str, at_ms: i64) -> pb::Event {
    pb::Event {
        message_id: id.into(),
        user_id: user.into(),
        r#type: pb::EventType::Track as i32,
        event: name.into(),
        timestamp_ms: at_ms,
        ..pb::Event::default()
    }
}

async fn ingest(dev: &Dev, events: Vec<pb::Event>) {
    let n = events.len() as u32;
    let reply = dev
        .client()
        .await
        .ingest(pb::IngestRequest { events })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.accepted, n, "{reply:?}");
}

fn cli_json(argv: &[&str]) -> serde_json::Value {
    let (code, out) = support::run_cli(argv);
    assert_eq!(code, 0, "{argv:?}: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{argv:?}: {e}: {out}"))
}

/// `dynseg segment overlap`: the pairwise matrix and the all-of-them count,
/// exact, over users spread across shards; bad requests name the problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_overlap_counts_every_pair_exactly() {
    let dev = Dev::start("");
    dev.apply(&[("a", "exists(a)"), ("b", "exists(b)"), ("c", "exists(c)")])
        .await;
    // u1 {a}, u2 {a, b}, u3 {a, b, c}, u4 {b, c}, u5 {c}: on 8 shards.
    let mut events = Vec::new();
    for (user, names) in [
        ("u1", &["a"][..]),
        ("u2", &["a", "b"]),
        ("u3", &["a", "b", "c"]),
        ("u4", &["b", "c"]),
        ("u5", &["c"]),
    ] {
        for name in names {
            events.push(pb::Event {
                message_id: format!("{user}-{name}"),
                user_id: user.into(),
                r#type: pb::EventType::Track as i32,
                event: (*name).into(),
                timestamp_ms: ms(T0) - 1_000,
                ..pb::Event::default()
            });
        }
    }
    let reply = dev
        .client()
        .await
        .ingest(pb::IngestRequest { events })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.accepted, 9);

    let (code, out) = support::run_cli(&[
        "segment",
        "overlap",
        "a",
        "b",
        "c",
        "--addr",
        &dev.gateway,
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["sizes"], serde_json::json!([3, 3, 3]));
    assert_eq!(
        json["pairwise"],
        serde_json::json!([[3, 2, 1], [2, 3, 2], [1, 2, 3]])
    );
    assert_eq!(json["all"], 1);
    let (code, table) = support::run_cli(&["segment", "overlap", "b", "c", "--addr", &dev.gateway]);
    assert_eq!(code, 0);
    assert!(table.contains("in all 2: 2"), "{table}");

    let mut client = dev.client().await;
    for (segments, code, needle) in [
        (vec!["a"], tonic::Code::InvalidArgument, "2 to 16 segments"),
        (
            vec!["a", "nope"],
            tonic::Code::NotFound,
            "no segment \"nope\"",
        ),
        (vec!["a", "a"], tonic::Code::InvalidArgument, "given twice"),
    ] {
        let err = client
            .segment_overlap(pb::SegmentOverlapRequest {
                segments: segments.into_iter().map(str::to_owned).collect(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(needle), "{err:?}");
    }
}

/// Size history per hour, minute and day, summed over shards, with each
/// interval's volatility; the same in the metrics. Scenario (manual clock from
/// 12:00): three users log in at 12:00 and enter `active` (logged in within
/// 2h); a fourth at 13:00; at 14:00 the first three leave by time alone, and
/// one of them logs in again at 14:00:30.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_stats_show_size_history_and_flag_volatile_intervals() {
    let dev = Dev::start("");
    dev.apply(&[("active", "exists(login) in last 2h")]).await;
    let t0 = ms(T0);
    ingest(
        &dev,
        ["u1", "u2", "u3"]
            .iter()
            .map(|u| track(&format!("{u}-1"), u, "login", t0))
            .collect(),
    )
    .await;
    dev.advance(Duration::from_secs(3600)).await;
    ingest(&dev, vec![track("u4-1", "u4", "login", t0 + HOUR)]).await;
    dev.advance(Duration::from_secs(3600 + 30)).await;
    ingest(
        &dev,
        vec![track("u1-2", "u1", "login", t0 + 2 * HOUR + 30_000)],
    )
    .await;
    dev.advance(Duration::from_secs(30 * 60 - 30)).await;

    let hours = cli_json(&[
        "segment",
        "stats",
        "active",
        "--since",
        T0,
        "--addr",
        &dev.gateway,
        "--output",
        "json",
    ]);
    let point = |start: &str, size: u64, enters: u64, exits: u64, volatility: f64| {
        json!({"start": start, "size": size, "enters": enters, "exits": exits,
               "volatility": volatility, "volatile": volatility > 0.5})
    };
    assert_eq!(
        hours["points"],
        json!([
            point("2026-03-01T12:00:00Z", 3, 3, 0, 1.0),
            point("2026-03-01T13:00:00Z", 4, 1, 0, 0.25),
            point("2026-03-01T14:00:00Z", 2, 1, 3, 1.0),
        ])
    );
    assert_eq!(hours["now"], "2026-03-01T14:30:00Z");

    // Minutes of the last half hour: the exits and the new login both fall in
    // 14:00; nothing happens after it.
    let minutes = cli_json(&[
        "segment",
        "stats",
        "active",
        "--interval",
        "minute",
        "--since",
        "30m",
        "--addr",
        &dev.gateway,
        "--output",
        "json",
    ]);
    let points = minutes["points"].as_array().unwrap();
    assert_eq!(points.len(), 31);
    assert_eq!(points[0], point("2026-03-01T14:00:00Z", 2, 1, 3, 4.0 / 4.0));
    for p in &points[1..] {
        assert_eq!(
            (
                p["size"].as_u64(),
                p["enters"].as_u64(),
                p["exits"].as_u64()
            ),
            (Some(2), Some(0), Some(0)),
            "{p}"
        );
    }

    // Days over the retained week: empty until today.
    let days = cli_json(&[
        "segment",
        "stats",
        "active",
        "--interval",
        "day",
        "--addr",
        &dev.gateway,
        "--output",
        "json",
    ]);
    let points = days["points"].as_array().unwrap();
    assert_eq!(points.len(), 8, "{days}");
    assert_eq!(points[7], point("2026-03-01T00:00:00Z", 2, 5, 3, 4.0));
    assert!(
        points[..7]
            .iter()
            .all(|p| p["size"] == 0 && p["enters"] == 0),
        "{days}"
    );

    // A threshold of 2 flags nothing; the table shows a chart and the verdict.
    let (code, table) = support::run_cli(&[
        "segment",
        "stats",
        "active",
        "--since",
        T0,
        "--threshold",
        "2",
        "--addr",
        &dev.gateway,
    ]);
    assert_eq!(code, 0, "{table}");
    assert!(table.contains("0 interval(s) flagged"), "{table}");
    assert!(
        table.contains(
            "2026-03-01T13:00:00Z  4     +1      -0     0.25        ██████████████████████████████"
        ),
        "{table}"
    );

    // The gRPC series, and bad requests.
    let mut client = dev.client().await;
    let series = client
        .segment_history(pb::SegmentHistoryRequest {
            segment: "active".into(),
            interval: pb::HistoryInterval::Hour as i32,
            since_ms: t0 + HOUR,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(i64, u64, u64, u64, bool)> = series
        .points
        .iter()
        .map(|p| (p.start_ms, p.size, p.enters, p.exits, p.volatile))
        .collect();
    assert_eq!(
        got,
        vec![(t0 + HOUR, 4, 1, 0, false), (t0 + 2 * HOUR, 2, 1, 3, true)]
    );
    let err = client
        .segment_history(pb::SegmentHistoryRequest {
            segment: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let err = client
        .segment_history(pb::SegmentHistoryRequest {
            segment: "active".into(),
            interval: pb::HistoryInterval::Minute as i32,
            since_ms: t0 - 30 * 24 * HOUR,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("over the limit"), "{err:?}");

    // Metrics: 4 changes in the last hour (after 13:30), over 2 members.
    let text = http(&dev.http, "GET", "/metrics", &[], b"").body;
    for line in [
        "dynseg_segment_churn_last_hour{segment=\"active\"} 4",
        "dynseg_segment_volatility{segment=\"active\"} 2",
        "dynseg_segment_volatile{segment=\"active\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
}

/// `dynseg explain`: every clause's truth and values for the user, the next
/// change with the clause that makes it, and the same after time passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_the_rule_tree_values_and_the_next_change() {
    let dev = Dev::start("");
    dev.apply(&[
        ("pro", "plan == \"pro\""),
        (
            "repeat_pro",
            "count(order_completed) in last 30d >= 2 and in_segment(\"pro\")",
        ),
    ])
    .await;
    let t0 = ms(T0);
    let day = 24 * HOUR;
    let mut identify = track("ann-id", "ann", "", t0 - HOUR);
    identify.r#type = pb::EventType::Identify as i32;
    identify.traits.insert(
        "plan".into(),
        pb::Value {
            kind: Some(pb::value::Kind::StringValue("pro".into())),
        },
    );
    ingest(
        &dev,
        vec![
            identify,
            track("ann-o1", "ann", "order_completed", t0 - 20 * day),
            track("ann-o2", "ann", "order_completed", t0 - 25 * day),
            track("ann-o3", "ann", "order_completed", t0 - 5 * day),
        ],
    )
    .await;

    let explained = cli_json(&[
        "explain",
        "ann",
        "repeat_pro",
        "--addr",
        &dev.gateway,
        "--output",
        "json",
    ]);
    let count = "count(order_completed) in last 30d >= 2";
    assert_eq!(
        explained["rule"],
        json!({
            "text": format!("{count} and in_segment(\"pro\")"),
            "truth": true,
            "turns_at": "2026-03-11T12:00:00Z",
            "values": [],
            "children": [
                {
                    "text": count,
                    "truth": true,
                    "turns_at": "2026-03-11T12:00:00Z",
                    "values": [{"operand": "count(order_completed) in last 30d", "value": "2", "at_least": true}],
                    "children": [],
                },
                {
                    "text": "in_segment(\"pro\")",
                    "truth": true,
                    "turns_at": null,
                    "values": [{"operand": "in_segment(\"pro\")", "value": "true", "at_least": false}],
                    "children": [],
                },
            ],
        })
    );
    assert_eq!(explained["member"], true);
    // Orders 5 and 20 days old keep the count at 2 until the older leaves the
    // 30-day window, 10 days from now.
    assert_eq!(
        explained["next_change"],
        json!({"at": "2026-03-11T12:00:00Z", "kind": "exit", "clause": count})
    );

    let (code, table) = support::run_cli(&["explain", "ann", "repeat_pro", "--addr", &dev.gateway]);
    assert_eq!(code, 0, "{table}");
    for needle in [
        "ann is in repeat_pro",
        "├─ ✓ count(order_completed) in last 30d >= 2    [count(order_completed) in last 30d = 2 or more]",
        "└─ ✓ in_segment(\"pro\")    [in_segment(\"pro\") = true]",
        "next change: exit at 2026-03-11T12:00:00Z, when `count(order_completed) in last 30d >= 2` turns",
    ] {
        assert!(table.contains(needle), "{needle:?} not in\n{table}");
    }

    // Ten days later the exit happened; nothing changes without a new event.
    dev.advance(Duration::from_secs(10 * 24 * 3600)).await;
    let later = cli_json(&[
        "segment",
        "explain",
        "ann",
        "repeat_pro",
        "--addr",
        &dev.gateway,
        "--output",
        "json",
    ]);
    assert_eq!(later["member"], false);
    assert_eq!(later["rule"]["children"][0]["values"][0]["value"], "1");
    assert_eq!(later["rule"]["children"][0]["values"][0]["at_least"], false);
    assert_eq!(later["next_change"], serde_json::Value::Null);

    let mut client = dev.client().await;
    for (user, segment, needle) in [
        ("nobody", "repeat_pro", "no user \"nobody\""),
        ("ann", "no_such_segment", "no segment \"no_such_segment\""),
    ] {
        let (code, _) = support::run_cli(&["explain", user, segment, "--addr", &dev.gateway]);
        assert_eq!(code, 1, "{user} {segment}");
        let err = client
            .explain(pb::ExplainRequest {
                user_id: user.into(),
                segment: segment.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
        assert!(err.message().contains(needle), "{err:?}");
    }
}
