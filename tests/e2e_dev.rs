//! End to end on the real `dynseg dev` binary, manual clock: the nine SPEC
//! segments, a generated e-commerce and SaaS scenario (10,000 users, 200,000
//! events by default) interleaved with clock moves; after every step every
//! membership is compared with the reference evaluator of dynseg-rules, and the
//! change stream (through the gateway) with the memberships it must add up to.
//!
//! `DYNSEG_E2E_USERS`, `DYNSEG_E2E_EVENTS` and `DYNSEG_SEED` change the scenario;
//! the seed is printed.

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use dynseg_cli::traffic::Traffic;
use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use dynseg_proto::pb::gateway_client::GatewayClient;
use dynseg_rules::{Event, Timestamp};
use support::{
    DevProcess, Process, apply_spec_segments, args, assert_memberships, env_number, fold_change,
    listed, reference_members, wait_for_rules,
};
use tokio::sync::mpsc;

/// `dynseg dev` in a temp dir with 16 shards on `clock`.
fn start_dev(clock: &str) -> DevProcess {
    DevProcess::start(&format!("--shards 16 --clock {clock}"), &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_cluster_matches_the_reference_through_ingest_and_clock_moves() {
    let seed = env_number("DYNSEG_SEED", 20_261_129);
    let users = env_number("DYNSEG_E2E_USERS", 10_000);
    let total_events = env_number("DYNSEG_E2E_EVENTS", 200_000);
    eprintln!("e2e scenario: seed {seed}, {users} users, {total_events} events");
    let start = Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
    let dev = start_dev("manual=2026-01-01T00:00:00Z");
    let mut control = ControlClient::connect(format!("http://{}", dev.control))
        .await
        .unwrap();
    let mut gateway = GatewayClient::connect(format!("http://{}", dev.gateway))
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);

    let (segments, reference) = apply_spec_segments(&mut control).await;
    // The node applies the committed rules through its control link.
    wait_for_rules(&mut gateway, &segments[segments.len() - 1]).await;

    // Follow every change through the gateway from the start.
    let (changes_tx, mut changes) = mpsc::unbounded_channel();
    let mut stream = gateway
        .subscribe(pb::GatewaySubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(item)) = stream.message().await {
            if changes_tx.send(item.change.unwrap()).is_err() {
                return;
            }
        }
    });

    let moves_ms: [i64; 10] = [
        3_600_000,
        30 * 60_000,
        86_400_000,
        6 * 3_600_000,
        3 * 86_400_000,
        2 * 60_000,
        10 * 86_400_000,
        3_600_000,
        45 * 86_400_000,
        5 * 60_000,
    ];
    let per_step = (total_events / moves_ms.len() as u64).max(1);
    let mut traffic = Traffic::new(users, seed);
    let mut history: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    let mut from_stream: BTreeSet<(String, String)> = BTreeSet::new();
    let mut last_sequence: BTreeMap<u32, u64> = BTreeMap::new();
    let mut now = start;
    for (step, advance) in moves_ms.iter().enumerate() {
        // Ingest this step's events (dated at or before the node's now).
        let events: Vec<pb::Event> = (0..per_step)
            .map(|_| traffic.next_event(now.millis()))
            .collect();
        for chunk in events.chunks(1_000) {
            let reply = gateway
                .ingest(pb::IngestRequest {
                    events: chunk.to_vec(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(
                reply.rejected.is_empty(),
                "step {step}: refused {:?} (seed {seed})",
                &reply.rejected[..1]
            );
        }
        for event in events {
            let event = Event::try_from(event).unwrap();
            history
                .entry(event.user.as_str().to_owned())
                .or_default()
                .push(event);
        }
        // Move the clock: it returns once every change due is durable.
        let reply = gateway
            .advance_clock(pb::AdvanceClockRequest {
                target: Some(pb::advance_clock_request::Target::ByMs(*advance)),
            })
            .await
            .unwrap()
            .into_inner();
        now = Timestamp(reply.now_ms);
        assert_eq!(
            now.millis(),
            start.millis() + moves_ms[..=step].iter().sum::<i64>()
        );

        let expected = reference_members(&reference, &history, now);
        let actual = listed(&mut gateway, &segments).await;
        assert_memberships(
            &actual,
            &expected,
            &format!("step {step} at {now} (seed {seed})"),
        );
        // The change stream adds up to the same memberships: every enter of a
        // member and exit of a non-member, in order per shard, none twice.
        let deadline = Instant::now() + Duration::from_secs(60);
        while from_stream != expected {
            let change = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), changes.recv())
                .await
                .unwrap_or_else(|_| {
                    let missing: Vec<_> = expected.difference(&from_stream).take(5).collect();
                    panic!("step {step}: the change stream stopped short (seed {seed}); missing {missing:?}")
                })
                .unwrap();
            fold_change(&change, &mut from_stream, &mut last_sequence);
        }
        eprintln!(
            "step {step}: {} users, {} memberships at {now}",
            history.len(),
            expected.len()
        );
    }
}

/// `dynseg bench` against a dev cluster on the system clock: it reports the
/// load and the changes it caused, counting only what follows its warm-up,
/// and names the shard and node counts it ran against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_counts_only_what_follows_its_warm_up() {
    let dev = start_dev("system");
    let mut control = ControlClient::connect(format!("http://{}", dev.control))
        .await
        .unwrap();
    let mut gateway = GatewayClient::connect(format!("http://{}", dev.gateway))
        .await
        .unwrap();
    let (segments, _) = apply_spec_segments(&mut control).await;
    wait_for_rules(&mut gateway, &segments[segments.len() - 1]).await;
    let bench = |warmup: &str| {
        support::run_cli(&[
            "bench",
            "--addr",
            &dev.gateway,
            "--users",
            "500",
            "--rate",
            "2000",
            "--duration",
            "3",
            "--warmup",
            warmup,
            "--batch",
            "100",
            "--connections",
            "2",
            "--output",
            "json",
        ])
    };

    let (code, _) = bench("3");
    assert_eq!(code, 1, "a warm-up as long as the run is the user's error");

    let (code, printed) = bench("1");
    assert_eq!(code, 0, "{printed}");
    let report: serde_json::Value = serde_json::from_str(&printed).unwrap();
    // Two seconds at 2,000 events/s are counted: about 4,000 events. With
    // the warm-up's second counted too there would be about 6,000.
    let events = report["events"].as_u64().unwrap();
    assert!((2_000..=5_000).contains(&events), "{report}");
    assert_eq!(report["warmup_s"].as_f64(), Some(1.0), "{report}");
    let seconds = report["seconds"].as_f64().unwrap();
    assert!((1.9..3.0).contains(&seconds), "{report}");
    // Fresh users enter segments on their first events; those that enter
    // after the warm-up are timed.
    assert!(report["changes"].as_u64().unwrap() > 0, "{report}");
    // The report says what it measured: this cluster's 16 shards, one node.
    assert_eq!(
        (&report["shards"], &report["nodes"]),
        (&16.into(), &1.into()),
        "{report}"
    );
}

/// Applies one segment through the control API at `addr` (a control member or
/// a gateway).
async fn apply_segment(addr: &str, id: &str, rule: &str) {
    ControlClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .apply_segments(pb::SegmentsRequest {
            segments: vec![pb::SegmentDef {
                id: id.into(),
                rule: rule.into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
}

/// The control and gateway addresses the latest start printed.
fn addresses(process: &Process) -> (String, String) {
    (
        support::printed(process, "control"),
        support::printed(process, "gateway"),
    )
}

async fn members(
    gateway: &mut GatewayClient<tonic::transport::Channel>,
    segment: &str,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let page = gateway
            .list_members(pb::ListMembersRequest {
                segment: segment.into(),
                page_size: 100,
                page_token: String::new(),
            })
            .await;
        match page {
            Ok(page) => return page.into_inner().user_ids,
            // NOT_FOUND until the node has the rules.
            Err(status) => assert!(Instant::now() < deadline, "{status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_the_dev_cluster_cleanly_and_a_restart_resumes_from_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let line = "dev --base-port 0 --shards 4 --clock manual=2026-01-01T00:00:00Z --data";
    let mut process = Process::start(&args(line, dir.path()), "ready");
    let (control, gateway) = addresses(&process);
    apply_segment(
        &control,
        "buyers",
        "count(order_completed) in last 90d >= 1",
    )
    .await;
    let mut client = GatewayClient::connect(format!("http://{gateway}"))
        .await
        .unwrap();
    assert!(members(&mut client, "buyers").await.is_empty());
    let start = Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
    let events = (0..3)
        .map(|i| pb::Event {
            message_id: format!("m{i}"),
            user_id: format!("u{i}"),
            r#type: pb::EventType::Track as i32,
            event: "order_completed".into(),
            timestamp_ms: start.millis(),
            ..Default::default()
        })
        .collect();
    client.ingest(pb::IngestRequest { events }).await.unwrap();
    assert_eq!(members(&mut client, "buyers").await, ["u0", "u1", "u2"]);

    assert!(
        process.interrupt(),
        "dynseg dev did not exit cleanly on Ctrl-C"
    );
    process.restart_with(&args(line, dir.path()), "ready");
    let (_, gateway) = addresses(&process);
    let mut client = GatewayClient::connect(format!("http://{gateway}"))
        .await
        .unwrap();
    assert_eq!(members(&mut client, "buyers").await, ["u0", "u1", "u2"]);
    // Time still drives exits after the restart: 90 days on, the orders leave
    // the window.
    client
        .advance_clock(pb::AdvanceClockRequest {
            target: Some(pb::advance_clock_request::Target::ByMs(91 * 86_400_000)),
        })
        .await
        .unwrap();
    assert!(members(&mut client, "buyers").await.is_empty());
}

/// A base port with the two after it free too (`dynseg dev` uses all three).
fn free_base_port() -> u16 {
    loop {
        let base = support::free_ports(1)[0];
        if base < 65_000
            && (0..3).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok())
        {
            return base;
        }
    }
}

async fn track(
    gateway: &mut GatewayClient<tonic::transport::Channel>,
    users: std::ops::Range<u32>,
) {
    let events = users
        .map(|i| pb::Event {
            message_id: format!("order-{i}"),
            user_id: format!("u{i}"),
            r#type: pb::EventType::Track as i32,
            event: "order_completed".into(),
            ..Default::default()
        })
        .collect();
    gateway.ingest(pb::IngestRequest { events }).await.unwrap();
}

/// Runs `dynseg ARGS` to its exit: its code (`None`: still running after
/// `timeout`, then killed) and what it wrote to stderr.
fn run_to_exit(args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dynseg"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (code, stderr)
}

fn entered(tail: &mut Process) -> String {
    let line = tail
        .next_line(Duration::from_secs(30))
        .expect("tail printed nothing");
    let change: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(change["kind"], "enter", "{line}");
    change["user"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_resumes_by_itself_across_a_cluster_restart() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let gateway = format!("127.0.0.1:{}", base + 2);
    let line =
        format!("dev --base-port {base} --shards 4 --clock manual=2026-01-01T00:00:00Z --data");
    let mut dev = Process::start(&args(&line, dir.path()), "ready");
    // Segments through the gateway, which forwards them to the control plane.
    apply_segment(&gateway, "buyers", "exists(order_completed)").await;
    let mut client = GatewayClient::connect(format!("http://{gateway}"))
        .await
        .unwrap();
    wait_for_rules(&mut client, "buyers").await;
    // A segment no node has: the nodes refuse it for what it asks, so after
    // the gateway's grace (a new segment may still be reaching them) the
    // stream ends with their answer, and tail says so and exits 1 instead of
    // resuming without end.
    let (code, stderr) = run_to_exit(
        &["tail", "--addr", &gateway, "--segment", "no_such_segment"],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no segment no_such_segment"), "{stderr}");
    let tail_args: Vec<String> = ["tail", "--addr", &gateway, "--output", "json"]
        .map(String::from)
        .to_vec();
    let mut tail = Process::start_client(&tail_args);
    track(&mut client, 0..3).await;
    let mut seen: Vec<String> = (0..3).map(|_| entered(&mut tail)).collect();

    assert!(dev.interrupt(), "dynseg dev did not exit cleanly");
    dev.restart_with(&args(&line, dir.path()), "ready");
    let mut client = GatewayClient::connect(format!("http://{gateway}"))
        .await
        .unwrap();
    track(&mut client, 3..5).await;
    // The same tail process continues after the last change it printed: the
    // next two lines are the new users, not repeats of the first three.
    seen.extend((0..2).map(|_| entered(&mut tail)));
    seen.sort();
    assert_eq!(seen, ["u0", "u1", "u2", "u3", "u4"]);
}

/// `dynseg segment validate`, `preview` and `apply` with a file of two broken
/// rules (one a literal block): exit 1, one error per broken rule at its line
/// and column in the file with the file's line and a caret under it, and
/// nothing applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_rules_are_each_shown_at_their_place_in_the_file_and_nothing_is_applied() {
    let dev = start_dev("manual=2026-01-01T00:00:00Z");
    let file = dev.dir.path().join("segments.yaml");
    let text = "\
- id: fine
  rule: exists(login)
- id: first
  rule: count(order_completed) in last 90d >=
- id: second
  rule: |
    exists(login)
    and sum(order_completed.revenue) in last 30 > 5
";
    std::fs::write(&file, text).unwrap();
    let path = file.to_str().unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for action in ["validate", "preview", "apply"] {
        let argv = ["segment", action, "-f", path, "--addr", &dev.gateway];
        let (code, stderr) = run_to_exit(&argv, Duration::from_secs(30));
        assert_eq!(code, Some(1), "{action}: {stderr}");
        let shown: Vec<&str> = stderr.lines().collect();
        for (segment, line, after) in [("first", 4, ">="), ("second", 8, "last 30")] {
            let at = format!("{path}:{line}:");
            let i = shown
                .iter()
                .position(|l| l.contains(&at))
                .unwrap_or_else(|| panic!("{action}: no error at {at}: {stderr}"));
            let rest = &shown[i][shown[i].find(&at).unwrap() + at.len()..];
            let (column, message) = rest.split_once(": ").unwrap();
            let column: usize = column.parse().unwrap();
            assert!(
                message.starts_with(&format!("segment {segment}: ")),
                "{stderr}"
            );
            // The file's line, then a caret under the column, which is at or
            // after the part of the rule in error.
            assert_eq!(shown[i + 1], format!("  {}", lines[line - 1]), "{stderr}");
            assert_eq!(
                shown[i + 2],
                format!("  {}^", " ".repeat(column - 1)),
                "{stderr}"
            );
            assert!(column > lines[line - 1].find(after).unwrap(), "{stderr}");
        }
    }
    let (code, out) = support::run_cli(&[
        "segment",
        "list",
        "--addr",
        &dev.gateway,
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "{out}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["segments"], serde_json::json!([]), "{out}");
}

/// `dynseg ingest` with a file of good and bad lines: the good events are
/// ingested, every bad line is listed with its reason, and the exit code is 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_takes_the_good_lines_lists_the_bad_ones_and_exits_1() {
    let dev = start_dev("manual=2026-01-01T00:00:00Z");
    apply_segment(&dev.gateway, "buyers", "count(order_completed) >= 2").await;
    let file = dev.dir.path().join("events.ndjson");
    let lines = [
        r#"{"userId":"ann","event":"order_completed","timestamp":"2025-12-30T10:00:00Z"}"#,
        "not json",
        r#"{"userId":"ann","event":"order_completed","timestamp":"2025-12-31T10:00:00Z"}"#,
        "",
        r#"{"event":"order_completed"}"#,
        r#"{"userId":"bob","event":"order_completed","timestamp":"2025-12-31T11:00:00Z"}"#,
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let path = file.to_str().unwrap();
    let argv = ["ingest", path, "--addr", &dev.gateway, "--output", "json"];
    let (code, out) = support::run_cli(&argv);
    assert_eq!(code, 1, "{out}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&summary["accepted"], &summary["refused"]),
        (&3.into(), &2.into()),
        "{out}"
    );
    let refused: Vec<u64> = summary["refusals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(refused, vec![2, 5], "{out}");
    assert!(
        summary["refusals"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("user_id"),
        "{out}"
    );
    // The good lines are in: ann has two orders, bob one.
    let mut gateway = GatewayClient::connect(format!("http://{}", dev.gateway))
        .await
        .unwrap();
    assert_eq!(
        members(&mut gateway, "buyers").await,
        vec!["ann".to_owned()]
    );
    // A file with nothing wrong exits 0.
    std::fs::write(&file, lines[5]).unwrap();
    let (code, out) = support::run_cli(&argv);
    assert_eq!(code, 0, "{out}");
}
