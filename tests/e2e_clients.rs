//! End to end with third-party clients against the real `dynseg` binary:
//! Segment's and RudderStack's own Python libraries send to the gateway's HTTP
//! API and drive memberships (manual clock, exact expected values); raw HTTP
//! requests cover what those libraries never send (a gzip body labelled as a
//! form, bad messages in a batch, wrong credentials, oversized bodies,
//! overload). The libraries come from PyPI into a virtualenv the tests make.

#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::Duration;

use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use dynseg_proto::pb::gateway_client::GatewayClient;
use support::clients::{
    Answer, basic_auth, grpcurl, grpcurl_with, http, promtool_problems, python, python_with_env,
    sample,
};
use support::dev::{Dev, T0, WRITE_KEY, ms};
use support::{Process, args};

/// Every dynseg metric (histograms by their buckets): the metrics test finds
/// each in a dev cluster's /metrics, the deploy test lets the dashboard and
/// the alerts read only these.
const EXPORTED: &[&str] = &[
    "dynseg_gateway_events_total",
    "dynseg_gateway_ingest_duration_seconds_bucket",
    "dynseg_gateway_http_requests_total",
    "dynseg_gateway_routed_shards",
    "dynseg_node_events_total",
    "dynseg_node_ingest_duration_seconds_bucket",
    "dynseg_segment_members",
    "dynseg_segment_changes_total",
    "dynseg_segment_churn_last_hour",
    "dynseg_segment_volatility",
    "dynseg_segment_volatile",
    "dynseg_node_users",
    "dynseg_node_shards",
    "dynseg_node_storage_bytes",
    "dynseg_node_subscriber_lag_changes",
    "dynseg_raft_role",
    "dynseg_raft_term",
    "dynseg_raft_commit_index",
    "dynseg_raft_applied_index",
    "dynseg_raft_leader_id",
    "dynseg_placement_shards",
    "dynseg_placement_moves_in_flight",
];
/// A gateway whose control plane never answers (so it has no placement),
/// with `flags`; the process and what it printed after `ready_prefix`.
fn lone_gateway(flags: &str, ready_prefix: &str) -> (Process, String) {
    let line = format!("gateway --control 127.0.0.1:9 --listen 127.0.0.1:0 {flags}");
    let argv: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    let process = Process::start(&argv, ready_prefix);
    let addr = support::printed(&process, ready_prefix);
    (process, addr)
}

fn expect(pairs: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
    pairs
        .iter()
        .map(|(user, segments)| {
            (
                (*user).to_owned(),
                segments.iter().map(|s| (*s).to_owned()).collect(),
            )
        })
        .collect()
}

/// Sends with both libraries: Segment's synchronously (one request per call,
/// plain JSON), RudderStack's from its queue (batched, gzip, identify traits
/// in `context.traits`). A wrong write key must come back as the 401 the
/// Segment library reads.
const CLIENTS: &str = r#"
import sys, datetime
from segment.analytics import Client as Segment
from segment.analytics.request import APIError
from rudderstack.analytics import Client as Rudder

host, key, t0 = sys.argv[1], sys.argv[2], datetime.datetime.fromisoformat(sys.argv[3].replace("Z", "+00:00"))
minutes = lambda n: t0 - datetime.timedelta(minutes=n)

seg = Segment(key, host=host, sync_mode=True, max_retries=0)
seg.track("seg-buyer", "order_completed", {"revenue": 30, "products": [{"sku": "a"}, {"sku": "b"}]}, timestamp=minutes(120))
seg.track("seg-buyer", "order_completed", {"revenue": 20}, timestamp=minutes(60))
seg.identify("seg-pro", {"plan": "pro", "address": {"city": "Lyon"}}, timestamp=minutes(60))
seg.page("seg-pricing", category="Docs", name="Pricing", properties={"path": "/pricing"}, timestamp=minutes(30))
seg.screen("seg-screen", name="Home", timestamp=minutes(30))
seg.group("seg-group", "acme", {"plan": "enterprise"}, timestamp=minutes(30))
seg.alias("seg-buyer", "seg-buyer-2", timestamp=minutes(10))
try:
    Segment("wrong-key", host=host, sync_mode=True, max_retries=0).track("seg-intruder", "order_completed", timestamp=minutes(5))
    sys.exit("a wrong write key was accepted")
except APIError as e:
    print("wrong key:", e.status, e.code)

errors = []
rud = Rudder(key, host=host, gzip=True, on_error=lambda e, batch: errors.append(repr(e)))
rud.track("rud-buyer", "order_completed", {"revenue": 5}, timestamp=minutes(100))
rud.track("rud-buyer", "order_completed", {"revenue": 6}, timestamp=minutes(90))
rud.identify("rud-pro", {"plan": "pro"}, timestamp=minutes(60))
rud.page("rud-pricing", category="Docs", name="Pricing", timestamp=minutes(20))
rud.flush()
rud.join()
if errors:
    sys.exit("rudderstack errors: %s" % errors)
print("sent")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_and_rudderstack_libraries_drive_memberships() {
    let dev = Dev::start("");
    dev.apply(&[
        ("repeat_buyers", "count(order_completed) in last 7d >= 2"),
        ("pro_plan", r#"plan == "pro""#),
        ("lyon", r#"`address.city` == "Lyon""#),
        (
            "pricing_visitors",
            r#"exists(page_viewed where name == "Pricing" and category == "Docs") in last 1d"#,
        ),
        (
            "home_screen",
            r#"exists(screen_viewed where name == "Home") in last 1d"#,
        ),
        (
            "acme",
            r#"exists(group where group_id == "acme" and plan == "enterprise")"#,
        ),
        (
            "sku_b",
            r#"exists(order_completed where `products.sku` contains "b")"#,
        ),
    ])
    .await;
    let out = python(CLIENTS, &[&format!("http://{}", dev.http), WRITE_KEY, T0]);
    assert!(out.contains("wrong key: 401 unauthorized"), "{out}");
    assert!(out.contains("sent"), "{out}");

    let users = [
        "seg-buyer",
        "seg-buyer-2",
        "seg-pro",
        "seg-pricing",
        "seg-screen",
        "seg-group",
        "seg-intruder",
        "rud-buyer",
        "rud-pro",
        "rud-pricing",
    ];
    assert_eq!(
        dev.memberships(&users).await,
        expect(&[
            // Segment's alias merged seg-buyer into seg-buyer-2
            // (docs/identity.md).
            ("seg-buyer", &[]),
            ("seg-buyer-2", &["repeat_buyers", "sku_b"]),
            ("seg-pro", &["lyon", "pro_plan"]),
            ("seg-pricing", &["pricing_visitors"]),
            ("seg-screen", &["home_screen"]),
            ("seg-group", &["acme"]),
            ("seg-intruder", &[]),
            ("rud-buyer", &["repeat_buyers"]),
            ("rud-pro", &["pro_plan"]),
            ("rud-pricing", &["pricing_visitors"]),
        ])
    );
    let intruder = dev
        .client()
        .await
        .get_user(pb::GetUserRequest {
            user_id: "seg-intruder".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!intruder.exists, "a refused request must change nothing");
    let merged_away = dev
        .client()
        .await
        .get_user(pb::GetUserRequest {
            user_id: "seg-buyer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!merged_away.exists, "{merged_away:?}");

    // A week later the orders and the page views are out of their windows.
    dev.advance(Duration::from_secs(7 * 24 * 3600)).await;
    assert_eq!(
        dev.memberships(&users).await,
        expect(&[
            ("seg-buyer", &[]),
            ("seg-buyer-2", &["sku_b"]),
            ("seg-pro", &["lyon", "pro_plan"]),
            ("seg-pricing", &[]),
            ("seg-screen", &[]),
            ("seg-group", &["acme"]),
            ("seg-intruder", &[]),
            ("rud-buyer", &[]),
            ("rud-pro", &["pro_plan"]),
            ("rud-pricing", &[]),
        ])
    );
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_keeps_good_events_dedupes_and_refuses_bad_requests_cleanly() {
    let dev = Dev::start("--max-message-bytes 600 --max-body-bytes 4096");
    dev.apply(&[("buyers", "count(order_completed) >= 1")])
        .await;
    let auth = basic_auth(WRITE_KEY);
    let json = [
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];

    // RudderStack's Node client: gzip labelled as a form, no Content-Encoding.
    let body = gzip(
        br#"{"batch":[{"type":"track","userId":"form-user","event":"order_completed","messageId":"f1","timestamp":"2026-03-01T11:00:00Z"}],"sentAt":"2026-03-01T12:00:00Z"}"#,
    );
    let answer = dev.post(
        "/v1/batch",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("authorization", &auth),
        ],
        &body,
    );
    assert_eq!(
        (answer.status, answer.json()["accepted"].as_u64()),
        (200, Some(1)),
        "{answer:?}"
    );

    // A batch with bad messages keeps the good ones and names the bad ones.
    let big = "x".repeat(700);
    let batch = format!(
        r#"{{"batch":[
            {{"type":"track","userId":"b-user","messageId":"b0"}},
            {{"type":"track","userId":"b-user","event":"order_completed","messageId":"b1","timestamp":"2026-03-01T11:00:00Z"}},
            {{"type":"launch","userId":"b-user"}},
            {{"type":"track","userId":"b-user","event":"order_completed","properties":{{"note":"{big}"}}}},
            {{"type":"track","event":"order_completed","messageId":"b4"}}
        ]}}"#
    );
    let answer = dev.post("/v1/batch", &json, batch.as_bytes());
    assert_eq!(answer.status, 200, "{answer:?}");
    let reply = answer.json();
    assert_eq!(
        (reply["accepted"].as_u64(), reply["duplicates"].as_u64()),
        (Some(1), Some(0))
    );
    let rejected: Vec<(u64, String)> = reply["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let indexes: Vec<u64> = rejected.iter().map(|(i, _)| *i).collect();
    assert_eq!(indexes, [0, 2, 3, 4], "{rejected:?}");
    for (needle, (_, reason)) in [
        "event name",
        "unsupported type",
        "limit is 600",
        "user_id or an anonymous_id",
    ]
    .iter()
    .zip(&rejected)
    {
        assert!(reason.contains(needle), "{reason}");
    }
    // The same batch again: the good message is taken again but counted as
    // a duplicate of its messageId (accepted counts duplicates, as over gRPC).
    let again = dev.post("/v1/batch", &json, batch.as_bytes()).json();
    assert_eq!(
        (again["accepted"].as_u64(), again["duplicates"].as_u64()),
        (Some(1), Some(1))
    );

    // Requests refused whole: the error shape Segment's clients read, and no
    // user comes to exist.
    let single = |user: &str| {
        format!(
            r#"{{"userId":"{user}","event":"order_completed","timestamp":"2026-03-01T11:00:00Z"}}"#
        )
    };
    let refused: Vec<(Answer, u16, &str)> = vec![
        (
            dev.post("/v1/track", &[], single("no-key").as_bytes()),
            401,
            "unauthorized",
        ),
        (
            dev.post(
                "/v1/track",
                &[("authorization", &basic_auth("nope"))],
                single("bad-key").as_bytes(),
            ),
            401,
            "unauthorized",
        ),
        (
            dev.post(
                "/v1/track",
                &[("authorization", "Bearer abc")],
                single("bearer").as_bytes(),
            ),
            401,
            "unauthorized",
        ),
        (
            dev.post("/v1/track", &json, b"{not json"),
            400,
            "invalid_request",
        ),
        (
            dev.post(
                "/v1/batch",
                &json,
                br#"{"batch":[{"type":"track","userId":"all-bad"}]}"#,
            ),
            400,
            "invalid_request",
        ),
        (
            dev.post("/v1/batch", &json, br#"{"events":[]}"#),
            400,
            "invalid_request",
        ),
        (
            dev.post(
                "/v1/batch",
                &json,
                format!(r#"{{"batch":[],"pad":"{}"}}"#, "y".repeat(5000)).as_bytes(),
            ),
            413,
            "payload_too_large",
        ),
        (
            dev.post(
                "/v1/batch",
                &[("authorization", &auth), ("content-encoding", "gzip")],
                &gzip(format!(r#"{{"batch":[],"pad":"{}"}}"#, " ".repeat(50_000)).as_bytes()),
            ),
            413,
            "payload_too_large",
        ),
    ];
    for (answer, status, code) in &refused {
        assert_eq!(answer.status, *status, "{answer:?}");
        let body = answer.json();
        assert_eq!(
            (body["success"].as_bool(), body["code"].as_str()),
            (Some(false), Some(*code)),
            "{answer:?}"
        );
        assert!(!body["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(
        refused[0].0.header("www-authenticate"),
        Some("Basic realm=\"dynseg\"")
    );
    let mut client = dev.client().await;
    for user in ["no-key", "bad-key", "bearer", "all-bad"] {
        let reply = client
            .get_user(pb::GetUserRequest {
                user_id: user.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!reply.exists, "{user} exists after a refused request");
    }
    assert_eq!(
        dev.memberships(&["form-user", "b-user"]).await,
        expect(&[("form-user", &["buyers"]), ("b-user", &["buyers"])])
    );

    // The write key may also ride in the body, as analytics.js sends it.
    let in_body = format!(
        r#"{{"writeKey":"{WRITE_KEY}","batch":[{{"userId":"body-key","event":"order_completed","messageId":"k1","timestamp":{}}}]}}"#,
        ms("2026-03-01T11:30:00Z")
    );
    let answer = dev.post("/v1/batch", &[], in_body.as_bytes());
    assert_eq!(
        (answer.status, answer.json()["accepted"].as_u64()),
        (200, Some(1)),
        "{answer:?}"
    );

    let health = http(&dev.http, "GET", "/healthz", &[], b"");
    assert_eq!((health.status, health.body.trim()), (200, "ok"));
}

#[test]
fn an_overloaded_gateway_answers_429_with_retry_after() {
    // A gateway whose control plane never answers has no placement, so an
    // ingest request waits (up to its retry deadline) holding the only slot.
    let (_gateway, http_addr) = lone_gateway("--http 127.0.0.1:0 --http-max-inflight 1", "http on");
    let health = http(&http_addr, "GET", "/healthz", &[], b"");
    assert_eq!(health.status, 503, "{health:?}");

    // Two requests at once: one takes the slot (and waits out the retry
    // deadline), the other is turned away at once.
    let body = br#"{"userId":"u","event":"e"}"#;
    let requests: Vec<_> = (0..2)
        .map(|_| {
            let addr = http_addr.clone();
            std::thread::spawn(move || http(&addr, "POST", "/v1/track", &[], body))
        })
        .collect();
    let mut answers: Vec<Answer> = requests.into_iter().map(|r| r.join().unwrap()).collect();
    answers.sort_by_key(|a| a.status);
    let [overloaded, held] = <[Answer; 2]>::try_from(answers).unwrap();
    assert_eq!(overloaded.status, 429, "{overloaded:?}");
    assert_eq!(overloaded.header("retry-after"), Some("1"));
    assert_eq!(overloaded.json()["code"].as_str(), Some("rate_limited"));
    // The request holding the slot gives up as unavailable, also retryable.
    assert_eq!(
        (held.status, held.header("retry-after")),
        (503, Some("1")),
        "{held:?}"
    );
}

#[test]
fn every_server_answers_grpc_health_and_reflection() {
    let dev = Dev::start("");
    // grpcurl knows nothing of dynseg: everything it calls it learns by
    // reflection. Arguments before "" are flags, after it the call.
    let standard = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    for (addr, own) in [
        (
            &dev.control,
            &["dynseg.v1.Control", "dynseg.v1.RaftPeer"][..],
        ),
        (&dev.node, &["dynseg.v1.Node"][..]),
        (
            &dev.gateway,
            &["dynseg.v1.Control", "dynseg.v1.Gateway"][..],
        ),
    ] {
        let listed = grpcurl(addr, &["", "list"]).unwrap();
        let mut expected: Vec<&str> = own.iter().chain(&standard).copied().collect();
        expected.sort_unstable();
        assert_eq!(listed.lines().collect::<Vec<_>>(), expected, "{addr}");
        for service in own.iter().copied().chain([""]) {
            let request = format!(r#"{{"service":"{service}"}}"#);
            let health =
                grpcurl(addr, &["-d", &request, "", "grpc.health.v1.Health/Check"]).unwrap();
            assert!(
                health.contains(r#""status": "SERVING""#),
                "{addr} {service}: {health}"
            );
        }
    }
    let unknown = grpcurl(
        &dev.node,
        &[
            "-d",
            r#"{"service":"dynseg.v1.Nope"}"#,
            "",
            "grpc.health.v1.Health/Check",
        ],
    )
    .unwrap_err();
    assert!(unknown.contains("NotFound"), "{unknown}");
    // A real call through reflection, and a described message.
    let user = grpcurl(
        &dev.gateway,
        &[
            "-d",
            r#"{"user_id":"nobody"}"#,
            "",
            "dynseg.v1.Gateway/GetUser",
        ],
    )
    .unwrap();
    assert!(user.contains(r#""shard""#), "{user}");
    let described = grpcurl(&dev.gateway, &["", "describe", "dynseg.v1.Event"]).unwrap();
    assert!(described.contains("message_id"), "{described}");

    // A gateway without a control plane has no placement: NOT_SERVING, so a
    // Kubernetes readiness probe keeps traffic away.
    let (_lonely, addr) = lone_gateway("", "listening on");
    let health = grpcurl(&addr, &["", "grpc.health.v1.Health/Check"]).unwrap();
    assert!(health.contains(r#""status": "NOT_SERVING""#), "{health}");
}

/// Every process serves `/metrics` that promtool accepts, and the numbers are
/// what happened: the dev cluster (all roles in one process, on the gateway's
/// HTTP port), a control member and a node run alone (`--metrics`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_what_happened() {
    let dev = Dev::start("");
    dev.apply(&[("buyers", "count(order_completed) >= 1")])
        .await;
    let auth = basic_auth(WRITE_KEY);
    let headers = [("authorization", auth.as_str())];
    let order = |user: &str, id: &str| {
        format!(
            r#"{{"type":"track","userId":"{user}","event":"order_completed","messageId":"{id}","timestamp":"2026-03-01T11:00:00Z"}}"#
        )
    };
    let batch = format!(
        r#"{{"batch":[{},{},{{"type":"track","userId":"x"}}]}}"#,
        order("m-1", "o1"),
        order("m-2", "o2")
    );
    assert_eq!(
        dev.post("/v1/batch", &headers, batch.as_bytes()).status,
        200
    );
    assert_eq!(
        dev.post("/v1/track", &headers, order("m-1", "o1").as_bytes())
            .status,
        200
    );
    assert_eq!(
        dev.post("/v1/track", &[], order("m-3", "o3").as_bytes())
            .status,
        401
    );

    let text = http(&dev.http, "GET", "/metrics", &[], b"").body;
    promtool_problems(&text).unwrap_or_else(|p| panic!("promtool: {p}\n{text}"));
    let value = |name: &str, labels: &[(&str, &str)]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
    };
    // Node: three events taken (one a duplicate), two users, both entered.
    assert_eq!(
        value("dynseg_node_events_total", &[("outcome", "accepted")]),
        3.0
    );
    assert_eq!(
        value("dynseg_node_events_total", &[("outcome", "duplicate")]),
        1.0
    );
    // One observation per shard batch: the batch's users may share a shard.
    let shards: BTreeSet<u32> = ["m-1", "m-2"]
        .iter()
        .map(|u| dynseg_proto::shard_for(u, 8))
        .collect();
    assert_eq!(
        value("dynseg_node_ingest_duration_seconds_count", &[]),
        shards.len() as f64 + 1.0
    );
    assert_eq!(
        value("dynseg_segment_members", &[("segment", "buyers")]),
        2.0
    );
    assert_eq!(
        value(
            "dynseg_segment_changes_total",
            &[("segment", "buyers"), ("kind", "enter")]
        ),
        2.0
    );
    assert_eq!(value("dynseg_node_users", &[("state", "active")]), 2.0);
    assert_eq!(value("dynseg_node_users", &[("state", "passivated")]), 0.0);
    assert_eq!(value("dynseg_node_shards", &[]), 8.0);
    assert_eq!(value("dynseg_node_subscriber_lag_changes", &[]), 0.0);
    assert!(value("dynseg_node_storage_bytes", &[]) > 0.0);
    // Gateway: the same, plus the message it refused and the HTTP answers.
    assert_eq!(
        value("dynseg_gateway_events_total", &[("outcome", "accepted")]),
        3.0
    );
    assert_eq!(
        value("dynseg_gateway_events_total", &[("outcome", "rejected")]),
        1.0
    );
    assert_eq!(
        value("dynseg_gateway_ingest_duration_seconds_count", &[]),
        2.0
    );
    assert_eq!(
        value("dynseg_gateway_http_requests_total", &[("code", "200")]),
        2.0
    );
    assert_eq!(
        value("dynseg_gateway_http_requests_total", &[("code", "401")]),
        1.0
    );
    assert_eq!(value("dynseg_gateway_routed_shards", &[]), 8.0);
    // Control: a group of one leads, and places every shard on the node.
    assert_eq!(value("dynseg_raft_role", &[("role", "leader")]), 1.0);
    assert_eq!(value("dynseg_raft_role", &[("role", "follower")]), 0.0);
    assert!(value("dynseg_raft_term", &[]) >= 1.0);
    assert!(value("dynseg_raft_commit_index", &[]) >= value("dynseg_raft_applied_index", &[]));
    assert_eq!(value("dynseg_placement_shards", &[("node", "node-1")]), 8.0);
    assert!(value("process_resident_memory_bytes", &[]) > 0.0);
    for name in EXPORTED {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} is not exported"
        );
    }

    // The roles run alone serve their own metrics.
    let dir = tempfile::tempdir().unwrap();
    let ports = support::free_ports(4);
    let control = format!(
        "control --id 1 --listen 127.0.0.1:{} --metrics 127.0.0.1:{} --data-dir",
        ports[0], ports[1]
    );
    let _control = Process::start(&args(&control, &dir.path().join("control")), "listening on");
    let node = format!(
        "node --listen 127.0.0.1:{} --metrics 127.0.0.1:{} --shard-count 4 --data-dir",
        ports[2], ports[3]
    );
    let _node = Process::start(&args(&node, &dir.path().join("node")), "listening on");
    for (port, name) in [
        (ports[1], "dynseg_raft_term"),
        (ports[3], "dynseg_node_shards"),
    ] {
        let addr = format!("127.0.0.1:{port}");
        let text = http(&addr, "GET", "/metrics", &[], b"").body;
        promtool_problems(&text).unwrap_or_else(|p| panic!("promtool: {p}\n{text}"));
        assert!(sample(&text, name, &[]).is_some(), "no {name} in\n{text}");
    }
    let node_text = http(
        &format!("127.0.0.1:{}", ports[3]),
        "GET",
        "/metrics",
        &[],
        b"",
    )
    .body;
    assert_eq!(sample(&node_text, "dynseg_node_shards", &[]), Some(4.0));
}

/// `dynseg ARGS` with `token` in the environment: exit code and stderr.
fn cli_with_token(token: Option<&str>, argv: &[&str]) -> (i32, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_dynseg"));
    command
        .args(argv)
        .env("RUST_LOG", "warn")
        .env_remove("DYNSEG_TOKEN");
    if let Some(token) = token {
        command.env("DYNSEG_TOKEN", token);
    }
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// With a tokens file, every call needs a token with its method's role, a
/// refused call changes nothing, members still reach each other (they use
/// the cluster secret), and probes stay public.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_guard_every_call() {
    let hash = dynseg_proto::auth::token_hash;
    let tokens = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        tokens.path(),
        format!(
            "# name roles hash\nbackend ingest {}\nanalyst read {}\nops admin,read {}\n",
            hash("t-ingest"),
            hash("t-read"),
            hash("t-admin")
        ),
    )
    .unwrap();
    let dev = Dev::start(&format!("--tokens-file {}", tokens.path().display()));
    let gw = dev.gateway.as_str();

    // Admin calls through the CLI: a token with the role, without, or none.
    let segments = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        segments.path(),
        "- id: buyers\n  name: Buyers\n  rule: count(order_completed) >= 1\n",
    )
    .unwrap();
    let file = segments.path().to_str().unwrap();
    let apply = ["segment", "apply", "-f", file, "--addr", gw];
    let (code, err) = cli_with_token(None, &apply);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("needs a token with the admin role"), "{err}");
    let (code, err) = cli_with_token(Some("t-read"), &apply);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("needs the admin role; token \"analyst\" has read"),
        "{err}"
    );
    let (code, err) = cli_with_token(Some("t-nope"), &["segment", "list", "--addr", gw]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unknown token"), "{err}");
    let (code, err) = cli_with_token(Some("t-admin"), &apply);
    assert_eq!(code, 0, "{err}");

    // Ingest: over gRPC a read token is refused and nothing lands; an ingest
    // token goes through the gateway to the node (which takes the gateway's
    // cluster secret) and drives the membership.
    let order = |user: &str| pb::Event {
        message_id: format!("m-{user}"),
        user_id: user.into(),
        r#type: pb::EventType::Track as i32,
        event: "order_completed".into(),
        timestamp_ms: ms("2026-03-01T11:00:00Z"),
        ..pb::Event::default()
    };
    let client = |token: &str| {
        let credentials = dynseg_proto::auth::Credentials::token(token).unwrap();
        let gw = gw.to_owned();
        async move {
            GatewayClient::new(
                dynseg_proto::client::connect(&gw, credentials)
                    .await
                    .unwrap(),
            )
        }
    };
    let refused = client("t-read")
        .await
        .track(order("grpc-read"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    client("t-ingest")
        .await
        .track(order("grpc-ingest"))
        .await
        .unwrap();
    let mut reader = client("t-read").await;
    // The node has the rules once it lists the segment's members.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while reader
        .list_members(pb::ListMembersRequest {
            segment: "buyers".into(),
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "rules never reached the node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (user, exists, segments) in [
        ("grpc-ingest", true, vec!["buyers".to_owned()]),
        ("grpc-read", false, vec![]),
    ] {
        let reply = reader
            .get_user(pb::GetUserRequest {
                user_id: user.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((reply.exists, reply.segments), (exists, segments), "{user}");
    }
    let lookup = client("t-ingest")
        .await
        .get_user(pb::GetUserRequest {
            user_id: "grpc-ingest".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(lookup.code(), tonic::Code::PermissionDenied);

    // HTTP: the write key is a token with the ingest role.
    let body = |user: &str| {
        format!(
            r#"{{"userId":"{user}","event":"order_completed","messageId":"h-{user}","timestamp":"2026-03-01T11:00:00Z"}}"#
        )
    };
    for (key, status) in [("t-ingest", 200), ("t-read", 403), ("t-nope", 401)] {
        let answer = dev.post(
            "/v1/track",
            &[("authorization", &basic_auth(key))],
            body(key).as_bytes(),
        );
        assert_eq!(answer.status, status, "{key}: {answer:?}");
    }
    let forbidden = dev.post(
        "/v1/track",
        &[("authorization", &basic_auth("t-read"))],
        body("x").as_bytes(),
    );
    assert_eq!(forbidden.json()["code"].as_str(), Some("forbidden"));
    for (user, exists) in [("t-ingest", true), ("t-read", false), ("t-nope", false)] {
        let reply = reader
            .get_user(pb::GetUserRequest {
                user_id: user.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.exists, exists, "{user}");
    }

    // The node and the control member accept only members (or tokens with
    // the role, for the control plane's read API); probes are public.
    let node = dynseg_proto::client::connect(
        &dev.node,
        dynseg_proto::auth::Credentials::token("t-admin").unwrap(),
    )
    .await
    .unwrap();
    let denied = pb::node_client::NodeClient::new(node)
        .get_user(pb::GetUserRequest {
            user_id: "grpc-ingest".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let anonymous = ControlClient::connect(format!("http://{}", dev.control))
        .await
        .unwrap()
        .list_segments(pb::ReadOptions { stale: true })
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
    for addr in [&dev.control, &dev.node, &dev.gateway] {
        let health = grpcurl(addr, &["", "grpc.health.v1.Health/Check"]).unwrap();
        assert!(health.contains("SERVING"), "{addr}: {health}");
    }
}

/// The Kubernetes manifests render (`kubectl kustomize`) and the result
/// passes the Kubernetes schemas offline (`kubernetes-validate --strict`); the
/// alert rules pass promtool; every metric the dashboard and the alerts read
/// is one the processes export (the metrics test checks those by value).
#[test]
fn deploy_manifests_render_validate_and_read_real_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    for (overlay, workloads) in [("deploy/k8s/base", 3), ("deploy/k8s/overlays/dev", 3)] {
        let rendered = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(root.join(overlay))
            .output()
            .unwrap_or_else(|e| panic!("kubectl is needed (.ci/run installs it): {e}"));
        assert!(
            rendered.status.success(),
            "{overlay}: {}",
            String::from_utf8_lossy(&rendered.stderr)
        );
        let text = String::from_utf8(rendered.stdout).unwrap();
        let file = dir.path().join(overlay.replace('/', "_") + ".yaml");
        std::fs::write(&file, &text).unwrap();
        let validated =
            std::process::Command::new(support::clients::venv().join("bin/kubernetes-validate"))
                .args(["--strict", "--quiet"])
                .arg(&file)
                .output()
                .unwrap();
        assert!(
            validated.status.success(),
            "{overlay}: {}{}",
            String::from_utf8_lossy(&validated.stdout),
            String::from_utf8_lossy(&validated.stderr)
        );
        // What the issue asks of the manifests, in the rendered output.
        let count = |needle: &str| text.matches(needle).count();
        assert_eq!(
            count("kind: StatefulSet") + count("kind: Deployment"),
            workloads,
            "{overlay}"
        );
        assert_eq!(count("kind: PodDisruptionBudget"), 3, "{overlay}");
        assert_eq!(
            count("readinessProbe:\n          grpc:"),
            3,
            "{overlay}: gRPC readiness probes"
        );
        assert_eq!(count("volumeClaimTemplates:"), 2, "{overlay}");
        assert_eq!(count("preStop:"), 1, "{overlay}");
        assert_eq!(count("limits:"), 3, "{overlay}");
        assert!(
            text.contains("clusterIP: None"),
            "{overlay}: headless services"
        );
    }

    let rules = root.join("deploy/prometheus/alerts.yaml");
    let checked = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stdout)
    );

    // Every dynseg metric named by the dashboard and the alerts is exported.
    for file in [
        "deploy/grafana/dynseg.json",
        "deploy/prometheus/alerts.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut named = BTreeSet::new();
        for (start, _) in text.match_indices("dynseg_") {
            let name: String = text[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            named.insert(name);
        }
        named.retain(|n| n != "dynseg_");
        assert!(!named.is_empty(), "{file}");
        for name in &named {
            assert!(
                EXPORTED.contains(&name.as_str()),
                "{file} reads {name}, which no process exports"
            );
        }
    }
}

/// A fake OTLP collector: every exported span, with its service name.
struct Collector(tokio::sync::mpsc::Sender<(String, opentelemetry_proto::tonic::trace::v1::Span)>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let _ = self.0.send((service.clone(), span)).await;
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

/// The real binary exports its spans over OTLP when the standard variable
/// names a collector, and an ingest's spans on the gateway and the node form
/// one trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_to_the_otlp_collector_named_by_the_environment() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (tx, mut spans) = tokio::sync::mpsc::channel(10_000);
    let collector = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dev = Dev::start_with_env(
        "",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            // Export within 100 ms rather than the default 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let mut client = dev.client().await;
    client
        .ingest(pb::IngestRequest {
            events: vec![pb::Event {
                message_id: "otlp-1".into(),
                user_id: "otlp-user".into(),
                r#type: pb::EventType::Track as i32,
                event: "order_completed".into(),
                timestamp_ms: ms(T0) - 1_000,
                ..pb::Event::default()
            }],
        })
        .await
        .unwrap();

    // Span name → (service, trace id, span id, parent span id).
    type Seen = (String, Vec<u8>, Vec<u8>, Vec<u8>);
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(seen.contains_key("dynseg.v1.Gateway/Ingest")
        && seen.contains_key("dynseg.v1.Node/IngestShards"))
    {
        let (service, span) = tokio::time::timeout_at(deadline, spans.recv())
            .await
            .unwrap_or_else(|_| panic!("spans seen: {:?}", seen.keys().collect::<Vec<_>>()))
            .unwrap();
        seen.insert(
            span.name.clone(),
            (service, span.trace_id, span.span_id, span.parent_span_id),
        );
    }
    let gateway_span = &seen["dynseg.v1.Gateway/Ingest"];
    let node_span = &seen["dynseg.v1.Node/IngestShards"];
    assert_eq!(gateway_span.0, "dynseg-dev");
    assert_eq!(node_span.1, gateway_span.1, "one trace");
    assert_eq!(
        node_span.3, gateway_span.2,
        "the node's span is the gateway span's child"
    );
    drop(dev);
    collector.abort();
}

/// `dynseg dev --tls`: every listener speaks TLS with the cluster's
/// self-signed certificate (kept under DATA/tls); clients that trust it get
/// through (the CLI, grpcurl, Segment's library over HTTPS), plaintext
/// clients do not; the node and control servers (members only, mutual TLS)
/// refuse a caller without a certificate the CA signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_every_listener_and_mutual_between_members() {
    let dev = Dev::start("--tls");
    let dir = dev.process.dir.path();
    let (gateway, node, control, http_addr) = (&dev.gateway, &dev.node, &dev.control, &dev.http);
    let ca_path = dir.join("tls/cert.pem");
    let ca = ca_path.to_str().unwrap();
    assert!(
        dev.process.printed("tls").starts_with(ca),
        "the certificate is printed"
    );

    // The CLI: with the CA it works, without it fails.
    let segments = dir.join("segments.yaml");
    std::fs::write(
        &segments,
        "- id: buyers\n  name: Buyers\n  rule: count(order_completed) >= 1\n",
    )
    .unwrap();
    let apply = [
        "segment",
        "apply",
        "-f",
        segments.to_str().unwrap(),
        "--addr",
        gateway,
    ];
    let (code, err) = cli_with_token(None, &[&apply[..], &["--tls-ca", ca]].concat());
    assert_eq!(code, 0, "{err}");
    let (code, _) = cli_with_token(None, &["segment", "list", "--addr", gateway]);
    assert_ne!(code, 0, "a plaintext client must not get through");

    // grpcurl trusts the CA: health over TLS.
    for addr in [&gateway, &node, &control] {
        let health = grpcurl_with(&["-cacert", ca], addr, &["", "grpc.health.v1.Health/Check"]);
        if addr == &gateway {
            assert!(health.unwrap().contains("SERVING"));
        } else {
            // Members only: grpcurl has no client certificate.
            assert!(
                health.is_err(),
                "{addr} took a caller without a certificate"
            );
        }
    }

    // Segment's library over HTTPS, trusting the CA as requests does.
    let script = r#"
import sys, datetime
from segment.analytics import Client
t = datetime.datetime(2026, 3, 1, 11, 0, tzinfo=datetime.timezone.utc)
Client(sys.argv[2], host=sys.argv[1], sync_mode=True, max_retries=0).track("tls-user", "order_completed", timestamp=t)
print("sent")
"#;
    let out = python_with_env(
        script,
        &[&format!("https://{http_addr}"), WRITE_KEY],
        &[("REQUESTS_CA_BUNDLE", ca)],
    );
    assert!(out.contains("sent"), "{out}");

    // A member's certificate opens the node; trusting the CA alone does not.
    let pem = std::fs::read(&ca_path).unwrap();
    let key = std::fs::read(dir.join("tls/key.pem")).unwrap();
    let member = dynseg_proto::tls::Tls::from_pem(pem.clone(), key, None, true);
    let get_user = |tls: tonic::transport::ClientTlsConfig| {
        let node = node.clone();
        async move {
            let credentials = dynseg_proto::auth::Credentials::none().with_tls(tls);
            match dynseg_proto::client::connect(&node, credentials).await {
                Ok(channel) => pb::node_client::NodeClient::new(channel)
                    .get_user(pb::GetUserRequest {
                        user_id: "tls-user".into(),
                    })
                    .await
                    .map(|r| r.into_inner()),
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            }
        }
    };
    let reply = get_user(member.client()).await.unwrap();
    assert_eq!(
        (reply.exists, reply.segments),
        (true, vec!["buyers".to_owned()])
    );
    assert!(
        get_user(dynseg_proto::tls::client_trusting(&pem))
            .await
            .is_err()
    );
}

/// An event as the node's wire has it, but with bytes where the real message
/// has strings: lets the test send what no honest client can (bad UTF-8).
#[derive(Clone, PartialEq, prost::Message)]
struct RawEvent {
    #[prost(bytes = "vec", tag = "1")]
    message_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    user_id: Vec<u8>,
    #[prost(int32, tag = "4")]
    kind: i32,
    #[prost(bytes = "vec", tag = "5")]
    event: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawBatch {
    #[prost(uint32, tag = "1")]
    shard: u32,
    #[prost(uint64, tag = "2")]
    epoch: u64,
    #[prost(message, repeated, tag = "3")]
    events: Vec<RawEvent>,
}

/// Event limits are set with `--limit NAME=VALUE`; an event over one is
/// refused by index with the limit named while the rest of its batch is
/// kept; a message with bad UTF-8 is refused whole and changes nothing; an
/// unknown limit stops the node at start with the known ones listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_configurable_and_bad_input_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = cli_with_token(
        None,
        &[
            "node",
            "--limit",
            "max_colours=3",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("unknown limit \"max_colours\"") && err.contains("max_properties"),
        "{err}"
    );

    let line = format!(
        "node --shard-count 4 --clock manual={T0} --limit max_properties=2 --limit max_depth=1 --limit max_string_bytes=16 --limit max_message_bytes=65536 --data-dir"
    );
    let process = Process::start(&args(&line, dir.path()), "listening on");
    let addr = support::printed(&process, "listening on");
    let mut node = pb::node_client::NodeClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let user = "limits-user";
    let shard = dynseg_proto::shard_for(user, 4);
    let value = |kind| pb::Value { kind: Some(kind) };
    use pb::value::Kind;
    let event = |id: &str, properties: Vec<(&str, pb::Value)>| pb::Event {
        message_id: id.into(),
        user_id: user.into(),
        r#type: pb::EventType::Track as i32,
        event: "order_completed".into(),
        timestamp_ms: ms(T0) - 1_000,
        properties: properties
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        ..pb::Event::default()
    };
    let flat = value(Kind::ListValue(pb::ValueList {
        values: vec![value(Kind::NumberValue(1.0))],
    }));
    let nested = value(Kind::ListValue(pb::ValueList {
        values: vec![flat.clone()],
    }));
    let reply = node
        .ingest(pb::EventBatch {
            shard,
            epoch: 1,
            events: vec![
                event(
                    "ok-1",
                    vec![("a", value(Kind::BoolValue(true))), ("list", flat)],
                ),
                event(
                    "too-many",
                    vec![
                        ("a", value(Kind::BoolValue(true))),
                        ("b", value(Kind::BoolValue(true))),
                        ("c", value(Kind::BoolValue(true))),
                    ],
                ),
                event("too-deep", vec![("n", nested)]),
                event(
                    "too-long",
                    vec![("s", value(Kind::StringValue("x".repeat(17))))],
                ),
                event("ok-2", vec![]),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.accepted, 2);
    let reasons: Vec<(u32, String)> = reply
        .rejected
        .iter()
        .map(|r| (r.index, r.reason.clone()))
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    for ((index, reason), (want_index, needle)) in reasons.iter().zip([
        (1, "3 properties, over the limit of 2"),
        (2, "n: lists nested deeper than 1 levels"),
        (3, "s: string of 17 bytes, over the limit of 16"),
    ]) {
        assert_eq!(*index, want_index, "{reason}");
        assert!(reason.contains(needle), "{reason}");
    }

    // A message over the node's size limit is refused before decoding.
    let huge = node
        .ingest(pb::EventBatch {
            shard,
            epoch: 1,
            events: vec![event(
                "huge",
                vec![("s", value(Kind::StringValue("x".repeat(70_000))))],
            )],
        })
        .await
        .unwrap_err();
    assert_eq!(huge.code(), tonic::Code::OutOfRange, "{huge:?}");

    // So is one over the gateway's (`--max-grpc-message-bytes`).
    let (_gateway, gateway_addr) = lone_gateway("--max-grpc-message-bytes 1024", "listening on");
    let too_big = GatewayClient::connect(format!("http://{gateway_addr}"))
        .await
        .unwrap()
        .track(event(
            "big",
            vec![("s", value(Kind::StringValue("x".repeat(2_000))))],
        ))
        .await
        .unwrap_err();
    assert_eq!(too_big.code(), tonic::Code::OutOfRange, "{too_big:?}");

    // Bad UTF-8 in a string field: that event is not a well-formed `Event`.
    // It is refused by index like any bad event (the node reads each event
    // on its own, so the rest of a batch would be kept), and nothing lands.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let raw = RawBatch {
        shard,
        epoch: 1,
        events: vec![RawEvent {
            message_id: b"utf8".to_vec(),
            user_id: b"utf8-user".to_vec(),
            kind: pb::EventType::Track as i32,
            event: vec![0xff, 0xfe, b'x'],
        }],
    };
    let codec = tonic_prost::ProstCodec::<RawBatch, pb::IngestResponse>::default();
    let answer = grpc
        .unary(
            tonic::Request::new(raw),
            http::uri::PathAndQuery::from_static("/dynseg.v1.Node/Ingest"),
            codec,
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.accepted, 0, "{answer:?}");
    let refused: Vec<_> = answer
        .rejected
        .iter()
        .map(|r| (r.index, r.reason.as_str()))
        .collect();
    assert_eq!(
        refused,
        [(0, "malformed event: field 5 is not valid UTF-8")]
    );
    let utf8_user = node
        .get_user(pb::GetUserRequest {
            user_id: "utf8-user".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!utf8_user.exists);
}
