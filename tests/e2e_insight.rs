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
    ingest(&dev, events).await;

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

/// Webhooks: a segment's enters and exits reach two endpoints as signed JSON,
/// in order per user, exactly the changes that happened; one endpoint fails
/// its first three requests and gets every batch once it recovers (each
/// failed batch resent as it was); delivery status shows in `segment stats`;
/// after a restart deliveries resume from the stored cursor, with nothing
/// resent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_deliver_signed_changes_in_order_through_failures_and_restarts() {
    use hmac::{Hmac, Mac};
    use support::receiver::Receiver;

    let good = Receiver::start(0).await;
    let flaky = Receiver::start(3).await;
    let mut dev = Dev::start_with_env("", &[("HOOK_SECRET", "s3cret")]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("segments.yaml");
    std::fs::write(
        &file,
        format!(
            "- id: buyers\n  rule: exists(order_completed) in last 1d\n  webhooks:\n    - url: {}\n      secret_env: HOOK_SECRET\n    - url: {}\n      secret_env: HOOK_SECRET\n",
            good.url("/hooks/buyers"),
            flaky.url("/flaky")
        ),
    )
    .unwrap();
    let (code, out) = support::run_cli(&[
        "segment",
        "apply",
        "-f",
        file.to_str().unwrap(),
        "--addr",
        &dev.gateway,
    ]);
    assert_eq!(code, 0, "{out}");
    let mut client = dev.client().await;
    support::wait_for_rules(&mut client, "buyers").await;
    let (code, shown) = support::run_cli(&["segment", "get", "buyers", "--addr", &dev.gateway]);
    assert_eq!(code, 0, "{shown}");
    assert!(
        shown.contains(&format!(
            "webhook:     {} (secret in $HOOK_SECRET)",
            good.url("/hooks/buyers")
        )),
        "{shown}"
    );
    // Deliveries start from the changes after each shard's delivery starts:
    // wait for all 8 shards of both endpoints.
    let stats = |dev: &Dev| {
        cli_json(&[
            "segment",
            "stats",
            "buyers",
            "--addr",
            &dev.gateway,
            "--output",
            "json",
        ])
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stats(&dev)["webhooks"]
        .as_array()
        .is_none_or(|w| w.len() != 2 || w.iter().any(|w| w["shards"] != 8))
    {
        assert!(std::time::Instant::now() < deadline, "{}", stats(&dev));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let t0 = ms(T0);
    let orders: Vec<pb::Event> = ["u1", "u2", "u3", "u4"]
        .iter()
        .map(|u| track(&format!("{u}-o1"), u, "order_completed", t0))
        .collect();
    ingest(&dev, orders).await;
    dev.advance(Duration::from_secs(3600)).await;
    ingest(
        &dev,
        vec![track("u1-o2", "u1", "order_completed", t0 + HOUR)],
    )
    .await;
    dev.advance(Duration::from_secs(24 * 3600)).await;

    // What happened, per user: in at T0 (an order), out a day after the last.
    let day = "2026-03-02T12:00:00Z";
    let mut expected: Vec<(String, String, String, String)> = Vec::new();
    for (user, exit) in [
        ("u1", "2026-03-02T13:00:00Z"),
        ("u2", day),
        ("u3", day),
        ("u4", day),
    ] {
        expected.push((user.into(), "enter".into(), T0.into(), "event".into()));
        expected.push((user.into(), "exit".into(), exit.into(), "time".into()));
    }
    expected.sort();
    let summary = |changes: &[serde_json::Value]| {
        let mut got: Vec<(String, String, String, String)> = changes
            .iter()
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap().to_owned();
                (s("user_id"), s("kind"), s("at"), s("cause"))
            })
            .collect();
        got.sort();
        got
    };
    for receiver in [&good, &flaky] {
        let changes = receiver.wait_for_changes(8).await;
        assert_eq!(summary(&changes), expected, "{:?}", receiver.requests());
        // In order per user: each enter comes before that user's exit.
        for user in ["u1", "u2", "u3", "u4"] {
            let kinds: Vec<&str> = changes
                .iter()
                .filter(|c| c["user_id"] == user)
                .map(|c| c["kind"].as_str().unwrap())
                .collect();
            assert_eq!(kinds, vec!["enter", "exit"], "{user}");
        }
        for c in &changes {
            assert_eq!(c["segment"], "buyers");
            assert_eq!(c["id"], format!("{}-{}", c["shard"], c["sequence"]));
        }
        // Every request is signed: HMAC-SHA256 of "timestamp.body".
        for r in receiver.requests() {
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
            mac.update(format!("{}.{}", r.headers["x-dynseg-timestamp"], r.body).as_bytes());
            let hex: String = mac
                .finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(r.headers["x-dynseg-signature"], format!("sha256={hex}"));
            assert_eq!(r.headers["content-type"], "application/json");
        }
    }
    assert!(
        good.requests()
            .iter()
            .all(|r| r.status == 200 && r.path == "/hooks/buyers")
    );
    // Each failed request was resent as it was, and then accepted.
    let flaky_requests = flaky.requests();
    let failed: Vec<_> = flaky_requests.iter().filter(|r| r.status == 500).collect();
    assert_eq!(failed.len(), 3);
    for f in failed {
        let id = &f.headers["x-dynseg-delivery"];
        assert!(
            flaky_requests.iter().any(|r| r.status == 200
                && &r.headers["x-dynseg-delivery"] == id
                && r.body == f.body),
            "{id} never accepted"
        );
    }

    // Delivery status, once everything is acknowledged.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let webhooks = loop {
        let s = stats(&dev);
        let webhooks = s["webhooks"].as_array().unwrap().clone();
        if webhooks
            .iter()
            .all(|w| w["delivered"] == 8 && w["behind"] == 0)
        {
            break webhooks;
        }
        assert!(std::time::Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let by_url = |url: &str| webhooks.iter().find(|w| w["url"] == url).unwrap().clone();
    let g = by_url(&good.url("/hooks/buyers"));
    let f = by_url(&flaky.url("/flaky"));
    assert_eq!(
        (g["failed_attempts"].as_u64(), g["last_error"].is_null()),
        (Some(0), true)
    );
    assert_eq!(
        (f["failed_attempts"].as_u64(), f["last_error"].is_null()),
        (Some(3), true),
        "{f}"
    );

    // A clean restart: deliveries resume after the stored cursors.
    dev.restart();
    ingest(
        &dev,
        vec![track("u5-o1", "u5", "order_completed", t0 + 25 * HOUR)],
    )
    .await;
    for receiver in [&good, &flaky] {
        let changes = receiver.wait_for_changes(9).await;
        let last = changes.last().unwrap();
        assert_eq!(
            (last["user_id"].as_str(), last["kind"].as_str()),
            (Some("u5"), Some("enter"))
        );
        assert_eq!(summary(&changes[..8]), expected, "nothing resent");
    }
    // Settled: since the restart each endpoint took exactly the one new
    // change, and nothing is behind (so nothing is left to resend).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = stats(&dev);
        let webhooks = s["webhooks"].as_array().unwrap();
        if webhooks.len() == 2
            && webhooks
                .iter()
                .all(|w| w["behind"] == 0 && w["shards"] == 8)
        {
            assert!(webhooks.iter().all(|w| w["delivered"] == 1), "{s}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(good.accepted_changes().len(), 9);
    assert_eq!(flaky.accepted_changes().len(), 9);

    // A crash (SIGKILL, no shutdown): at least once. The last batch may come
    // again (its cursor may not have reached the disk), the same change with
    // the same id; nothing is missing, and a new change still arrives.
    dev.crash_and_restart();
    ingest(
        &dev,
        vec![track("u6-o1", "u6", "order_completed", t0 + 25 * HOUR)],
    )
    .await;
    for receiver in [&good, &flaky] {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !receiver
            .accepted_changes()
            .iter()
            .any(|c| c["user_id"] == "u6")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                receiver.requests()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let changes = receiver.accepted_changes();
        let ids: std::collections::BTreeSet<&str> =
            changes.iter().map(|c| c["id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), 10, "nine before the crash and u6's: {changes:?}");
        assert_eq!(summary(&changes[..8]), expected);
        // After the first nine: u6's enter, and perhaps u5's again (shards
        // deliver independently, so in either order).
        for c in &changes[9..] {
            assert!(c["user_id"] == "u5" || c["user_id"] == "u6", "{c}");
        }
        let u6 = changes.iter().filter(|c| c["user_id"] == "u6").count();
        assert_eq!(u6, 1, "{changes:?}");
    }
}

/// Identity merge: an alias (over the Segment HTTP API) folds an anonymous
/// profile on another shard into the known user; both memberships are
/// re-evaluated and the changes emitted once; a retry changes nothing; a merge
/// interrupted after its first step completes on the retry without repeating
/// it; an identify with both ids merges too, the later trait winning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_merge_folds_anonymous_profiles_into_users_exactly_once() {
    use support::clients::basic_auth;

    let dev = Dev::start("");
    dev.apply(&[
        ("browsers", "exists(page_viewed)"),
        ("two_views", "count(page_viewed) in last 7d >= 2"),
        ("buyer", "exists(order_completed)"),
        ("pro", "plan == \"pro\""),
    ])
    .await;
    let t0 = ms(T0);
    // Anonymous ids on shards other than ann's (8 shards).
    let shard = |user: &str| dynseg_proto::shard_for(user, 8);
    let mut anonymous = (0..)
        .map(|i| format!("anon-{i}"))
        .filter(|a| shard(a) != shard("ann"));
    let (anon1, anon2, anon3) = (
        anonymous.next().unwrap(),
        anonymous.next().unwrap(),
        anonymous.next().unwrap(),
    );
    let identify = |id: &str, anon: &str, user: &str, plan: &str, at: i64| {
        let mut e = track(id, user, "", at);
        e.r#type = pb::EventType::Identify as i32;
        e.anonymous_id = anon.into();
        e.traits.insert(
            "plan".into(),
            pb::Value {
                kind: Some(pb::value::Kind::StringValue(plan.into())),
            },
        );
        e
    };
    let mut anon_view = track("v1", "", "page_viewed", t0 - HOUR);
    anon_view.anonymous_id = anon1.clone();
    ingest(
        &dev,
        vec![
            anon_view,
            identify("i1", &anon1, "", "pro", t0 - 2 * HOUR),
            track("v2", "ann", "page_viewed", t0 - 3 * HOUR),
            track("o1", "ann", "order_completed", t0 - 3 * HOUR),
        ],
    )
    .await;
    let users = [anon1.as_str(), "ann"];
    let segments = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(
        dev.memberships(&users).await,
        [
            (anon1.clone(), segments(&["browsers", "pro"])),
            ("ann".into(), segments(&["browsers", "buyer"]))
        ]
        .into()
    );

    let mut stream = dev
        .client()
        .await
        .subscribe(pb::GatewaySubscribeRequest {
            from_now: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let alias = format!(
        r#"{{"type":"alias","userId":"ann","previousId":"{anon1}","messageId":"a1","timestamp":"{T0}"}}"#
    );
    let auth = basic_auth(support::dev::WRITE_KEY);
    let headers = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    let answer = dev.post("/v1/alias", &headers, alias.as_bytes());
    assert_eq!(answer.status, 200, "{answer:?}");

    // The anonymous profile leaves what it was in; ann gains the second view
    // and the trait.
    let mut changes = Vec::new();
    while changes.len() < 4 {
        let next = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("a merge change is missing")
            .unwrap()
            .unwrap();
        let c = next.change.unwrap();
        changes.push((
            c.user_id.clone(),
            c.segment.clone(),
            c.kind,
            c.at_ms,
            c.cause,
        ));
    }
    changes.sort();
    let (enter, exit, event) = (
        pb::ChangeKind::Enter as i32,
        pb::ChangeKind::Exit as i32,
        pb::ChangeCause::Event as i32,
    );
    let mut expected = vec![
        (anon1.clone(), "browsers".to_owned(), exit, t0, event),
        (anon1.clone(), "pro".to_owned(), exit, t0, event),
        ("ann".to_owned(), "two_views".to_owned(), enter, t0, event),
        ("ann".to_owned(), "pro".to_owned(), enter, t0, event),
    ];
    expected.sort();
    assert_eq!(changes, expected);
    let merged = [(
        "ann".to_owned(),
        segments(&["browsers", "two_views", "buyer", "pro"]),
    )];
    assert_eq!(dev.memberships(&["ann"]).await, merged.clone().into());
    let mut client = dev.client().await;
    let gone = client
        .get_user(pb::GetUserRequest {
            user_id: anon1.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!gone.exists, "{gone:?}");
    let err = client
        .explain(pb::ExplainRequest {
            user_id: anon1.clone(),
            segment: "browsers".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");

    // The same alias again (a client retry): a duplicate, and no change.
    let again = dev.post("/v1/alias", &headers, alias.as_bytes());
    assert_eq!(again.status, 200, "{again:?}");
    let history = |segment: &str| {
        let out = cli_json(&[
            "segment",
            "stats",
            segment,
            "--since",
            T0,
            "--addr",
            &dev.gateway,
            "--output",
            "json",
        ]);
        let p = &out["points"][0];
        (p["enters"].as_u64().unwrap(), p["exits"].as_u64().unwrap())
    };
    // In the hour from T0 (the first events were processed at T0 too): pro
    // had anon's enter and exit and ann's enter, nothing more.
    assert_eq!(history("pro"), (2, 1));
    assert_eq!(history("two_views"), (1, 0));

    // A merge interrupted after its first step (the anonymous profile taken
    // out on its node, then the gateway lost): the client's retry of the alias
    // completes it, and the first step is not repeated.
    let mut view = track("v3", "", "page_viewed", t0);
    view.anonymous_id = anon2.clone();
    ingest(&dev, vec![view, identify("i3", &anon3, "", "team", t0 - 1)]).await;
    let mut node = pb::node_client::NodeClient::connect(format!("http://{}", dev.node))
        .await
        .unwrap();
    let status = node
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let epoch = status
        .shards
        .iter()
        .find(|s| s.shard == shard(&anon2))
        .unwrap()
        .epoch;
    let first = node
        .merge_out(pb::MergeOutRequest {
            shard: shard(&anon2),
            epoch,
            user_id: anon2.clone(),
            into: "ann".into(),
            merge_id: format!("a2\u{1f}{anon2}\u{1f}ann"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(first.found);
    assert_eq!(first.exits, 1, "anon-2 was in browsers");
    let alias2 = format!(
        r#"{{"type":"alias","userId":"ann","previousId":"{anon2}","messageId":"a2","timestamp":"{T0}"}}"#
    );
    assert_eq!(
        dev.post("/v1/alias", &headers, alias2.as_bytes()).status,
        200
    );
    // ann: 3 views now, the same segments; browsers saw anon-2 enter and
    // leave once (3 enters, 2 exits in all).
    assert_eq!(dev.memberships(&["ann"]).await, merged.clone().into());
    assert_eq!(history("browsers"), (3, 2));

    // An identify with both ids merges too; the later plan wins (team, set a
    // millisecond before T0, over pro, set two hours before).
    let both = format!(
        r#"{{"type":"identify","userId":"ann","anonymousId":"{anon3}","messageId":"i4","timestamp":"{T0}","traits":{{"name":"Ann"}}}}"#
    );
    assert_eq!(
        dev.post("/v1/identify", &headers, both.as_bytes()).status,
        200
    );
    assert_eq!(
        dev.memberships(&["ann"]).await,
        [(
            "ann".to_owned(),
            segments(&["browsers", "two_views", "buyer"])
        )]
        .into()
    );
    assert_eq!(
        history("pro"),
        (2, 2),
        "ann left pro; anon-3 was never in it"
    );
}
