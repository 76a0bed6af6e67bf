//! A real node in this process (gRPC on port 0, a temp dir, the manual clock),
//! driven through its gRPC API.

#![allow(clippy::unwrap_used, clippy::print_stdout, missing_docs)]

use std::time::Duration;

use dynseg_node::{Clock, NodeConfig, Server};
use dynseg_proto::pb::{self, node_client::NodeClient};
use dynseg_proto::shard_for;
use dynseg_rules::{Span, Timestamp, Value};
use tonic::Code;
use tonic::transport::Channel;

const SHARDS: u32 = 4;

fn start_time() -> Timestamp {
    Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").unwrap()
}

fn config(dir: &std::path::Path) -> NodeConfig {
    let mut config = NodeConfig::new(
        dir.to_owned(),
        "127.0.0.1:0".parse().unwrap(),
        Clock::manual(start_time()),
    );
    config.shard_count = SHARDS;
    config.shards = (0..SHARDS).map(|s| (s, 1)).collect();
    config.checkpoint_every = Duration::from_secs(3600);
    config
}

async fn client(server: &Server) -> NodeClient<Channel> {
    NodeClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap()
}

/// A node on the manual clock in `dir` and a client of it, with `rules`
/// applied as version 1 (none: no rule set yet).
async fn start(dir: &std::path::Path, rules: &[(&str, &str)]) -> (Server, NodeClient<Channel>) {
    let server = Server::start(config(dir)).await.unwrap();
    let mut node = client(&server).await;
    if !rules.is_empty() {
        apply_rules(&mut node, 1, rules).await;
    }
    (server, node)
}

/// What the node answers for `user_id`.
async fn user(client: &mut NodeClient<Channel>, user_id: &str) -> pb::GetUserResponse {
    client
        .get_user(pb::GetUserRequest {
            user_id: user_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Every shard's changes from now on, one per message.
async fn subscribe_from_now(
    node: &mut NodeClient<Channel>,
) -> tonic::Streaming<pb::MembershipChange> {
    node.subscribe(pb::SubscribeRequest {
        from_now: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

fn track(id: &str, user: &str, name: &str, at: Timestamp, props: &[(&str, Value)]) -> pb::Event {
    pb::Event {
        message_id: id.into(),
        user_id: user.into(),
        r#type: pb::EventType::Track.into(),
        event: name.into(),
        timestamp_ms: at.millis(),
        properties: props
            .iter()
            .map(|(k, v)| ((*k).to_owned(), pb::Value::from(v)))
            .collect(),
        ..Default::default()
    }
}

/// The refused events of an answer, as (index, reason).
fn rejections(ack: &pb::IngestResponse) -> Vec<(u32, &str)> {
    ack.rejected
        .iter()
        .map(|r| (r.index, r.reason.as_str()))
        .collect()
}

/// Sends each event to its user's shard, one batch per shard; returns the
/// responses by shard.
async fn ingest(
    client: &mut NodeClient<Channel>,
    events: Vec<pb::Event>,
) -> Vec<pb::IngestResponse> {
    let mut by_shard: std::collections::BTreeMap<u32, Vec<pb::Event>> = Default::default();
    for event in events {
        by_shard
            .entry(shard_for(&event.user_id, SHARDS))
            .or_default()
            .push(event);
    }
    let mut out = Vec::new();
    for (shard, events) in by_shard {
        out.push(
            client
                .ingest(pb::EventBatch {
                    shard,
                    epoch: 1,
                    events,
                })
                .await
                .unwrap()
                .into_inner(),
        );
    }
    out
}

async fn apply_rules(
    client: &mut NodeClient<Channel>,
    version: u64,
    rules: &[(&str, &str)],
) -> Vec<pb::RuleProgress> {
    let segments = rules
        .iter()
        .map(|(id, rule)| pb::SegmentDef {
            id: (*id).into(),
            name: String::new(),
            description: String::new(),
            rule: (*rule).into(),
            webhooks: Vec::new(),
        })
        .collect();
    let mut stream = client
        .apply_rules(pb::ApplyRulesRequest { version, segments })
        .await
        .unwrap()
        .into_inner();
    let mut progress = Vec::new();
    while let Some(p) = stream.message().await.unwrap() {
        progress.push(p);
    }
    progress
}

/// Reads `n` changes from a subscription (failing after a deadline).
async fn take(
    stream: &mut tonic::Streaming<pb::MembershipChange>,
    n: usize,
) -> Vec<pb::MembershipChange> {
    let mut out = Vec::new();
    while out.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
        match next {
            Ok(Ok(Some(change))) => out.push(change),
            other => panic!("expected {n} changes, got {} then {other:?}", out.len()),
        }
    }
    out
}

fn brief(changes: &[pb::MembershipChange]) -> Vec<String> {
    let mut v: Vec<String> = changes
        .iter()
        .map(|c| {
            let kind = if c.kind == pb::ChangeKind::Enter as i32 {
                "enter"
            } else {
                "exit"
            };
            format!(
                "{} {kind} {} at {}",
                c.user_id,
                c.segment,
                Timestamp(c.at_ms)
            )
        })
        .collect();
    v.sort();
    v
}

async fn advance(client: &mut NodeClient<Channel>, span: Span) {
    let by = pb::advance_clock_request::Target::ByMs(span.millis());
    client
        .advance_clock(pb::AdvanceClockRequest { target: Some(by) })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_subscribe_lookups_time_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut node) = start(dir.path(), &[]).await;
    let progress = apply_rules(
        &mut node,
        1,
        &[
            ("repeat_buyers", "count(order_completed) in last 90d >= 2"),
            ("dormant", "not exists(email_opened) in last 45d"),
        ],
    )
    .await;
    assert_eq!(
        progress.iter().filter(|p| p.finished).count(),
        SHARDS as usize
    );
    let mut feed = node
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();

    let now = start_time();
    let acks = ingest(
        &mut node,
        vec![
            track(
                "a1",
                "alice",
                "order_completed",
                now.minus(Span::days(10)),
                &[],
            ),
            track("a2", "alice", "order_completed", now, &[]),
            track("a2", "alice", "order_completed", now, &[]),
            track("b1", "bob", "email_opened", now, &[]),
        ],
    )
    .await;
    assert_eq!(acks.iter().map(|a| a.accepted).sum::<u32>(), 4);
    assert_eq!(acks.iter().map(|a| a.duplicates).sum::<u32>(), 1);
    let changes = take(&mut feed, 2).await;
    assert_eq!(
        brief(&changes),
        vec![
            "alice enter dormant at 2026-01-01T00:00:00Z",
            "alice enter repeat_buyers at 2026-01-01T00:00:00Z"
        ]
    );

    // Lookups.
    let alice = user(&mut node, "alice").await;
    assert!(alice.exists);
    assert_eq!(alice.segments, vec!["repeat_buyers", "dormant"]);
    let nobody = user(&mut node, "nobody").await;
    assert!(!nobody.exists);
    let counts = node
        .segment_counts(pb::SegmentCountsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(counts.users, 2);
    assert_eq!(
        counts
            .counts
            .iter()
            .map(|c| (c.segment.as_str(), c.members))
            .collect::<Vec<_>>(),
        vec![("repeat_buyers", 1), ("dormant", 1)]
    );

    // Time alone: bob's open leaves the 45-day window; alice's older order leaves
    // the 90 days on 2026-03-22.
    advance(&mut node, Span::days(80)).await;
    let changes = take(&mut feed, 2).await;
    assert_eq!(
        brief(&changes),
        vec![
            "alice exit repeat_buyers at 2026-03-22T00:00:00Z",
            "bob enter dormant at 2026-02-15T00:00:00Z"
        ]
    );

    // Restart: state, dedupe and the change log survive; a cursor resumes.
    let last = changes
        .iter()
        .map(|c| c.cursor.unwrap())
        .collect::<Vec<_>>();
    let day80 = start_time().plus(Span::days(80));
    ingest(
        &mut node,
        vec![track("v1", "alice", "page_viewed", day80, &[])],
    )
    .await;
    drop(feed);
    server.shutdown().await;
    let (server, mut node) = start(dir.path(), &[]).await;
    let again = ingest(
        &mut node,
        vec![track("v1", "alice", "page_viewed", day80, &[])],
    )
    .await;
    assert_eq!(again[0].duplicates, 1, "message ids survive a restart");
    let members = node
        .list_members(pb::ListMembersRequest {
            segment: "dormant".into(),
            page_size: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(members.user_ids, vec!["alice", "bob"]);
    let mut resumed = node
        .subscribe(pb::SubscribeRequest {
            after: last,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        server.node.now(),
        start_time().plus(Span::days(80)),
        "the manual clock resumes where it was"
    );
    ingest(
        &mut node,
        vec![track("c1", "carol", "page_viewed", server.node.now(), &[])],
    )
    .await;
    let next = take(&mut resumed, 1).await;
    assert_eq!(next[0].user_id, "carol");
    assert_eq!(next[0].segment, "dormant");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_are_reported_by_index_and_stale_epochs_redirect() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut node) = start(dir.path(), &[]).await;
    let now = start_time();
    let shard = shard_for("alice", SHARDS);
    let mut no_user = track("x2", "alice", "e", now, &[]);
    no_user.user_id.clear();
    let events = vec![
        track("x1", "alice", "e", now, &[]),
        no_user,
        track("x3", "alice", "e", now.plus(Span::hours(1)), &[]),
        track("x4", "alice", "e", now, &[("n", Value::Number(1e301))]),
        track("x5", "alice", "e", now, &[]),
    ];
    let ack = node
        .ingest(pb::EventBatch {
            shard,
            epoch: 1,
            events,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.accepted, 2);
    let rejected = rejections(&ack);
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    assert_eq!(
        rejected[0],
        (1, "the event has neither user_id nor anonymous_id")
    );
    assert!(rejected[1].0 == 2 && rejected[1].1.contains("ahead of the node's clock"));
    assert!(rejected[2].0 == 3 && rejected[2].1.contains("beyond"));

    let wrong_shard = (shard + 1) % SHARDS;
    let ack = node
        .ingest(pb::EventBatch {
            shard: wrong_shard,
            epoch: 1,
            events: vec![track("y", "alice", "e", now, &[])],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ack.rejected[0].reason.contains("belongs to shard"));

    let stale = node
        .ingest(pb::EventBatch {
            shard,
            epoch: 0,
            events: vec![track("z", "alice", "e", now, &[])],
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(stale.metadata().get("dynseg-error").unwrap(), "wrong-epoch");
    assert_eq!(stale.metadata().get("dynseg-epoch").unwrap(), "1");

    // Several shards in one call: each batch gets its own result, in order; a
    // stale epoch fails only its own batch.
    let other_user = (0..)
        .map(|i| format!("user{i}"))
        .find(|u| shard_for(u, SHARDS) != shard)
        .unwrap();
    let other = shard_for(&other_user, SHARDS);
    let results = node
        .ingest_shards(pb::ShardBatches {
            batches: vec![
                pb::EventBatch {
                    shard,
                    epoch: 1,
                    events: vec![track("m1", "alice", "e", now, &[])],
                },
                pb::EventBatch {
                    shard: other,
                    epoch: 0,
                    events: vec![track("m2", &other_user, "e", now, &[])],
                },
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].response.as_ref().unwrap().accepted, 1);
    assert!(results[1].response.is_none());
    assert_eq!(results[1].error_code, Code::Aborted as i32);
    assert!(results[1].error.contains("epoch"), "{}", results[1].error);

    node.release_shard(pb::ReleaseShardRequest {
        shard,
        new_owner: "10.0.0.9:7000".into(),
    })
    .await
    .unwrap();
    let moved = node
        .ingest(pb::EventBatch {
            shard,
            epoch: 1,
            events: vec![track("z", "alice", "e", now, &[])],
        })
        .await
        .unwrap_err();
    assert_eq!(moved.code(), Code::Aborted);
    assert_eq!(
        moved.metadata().get("dynseg-owner").unwrap(),
        "10.0.0.9:7000"
    );
    server.shutdown().await;
}

/// An event whose bytes are not a well-formed `Event` (here a user id that is
/// not UTF-8) costs only itself: prost would have refused the whole request.
/// The events around it are kept and retained: a rule applied after a restart
/// is backfilled from them and counts each once. Fields the node does not know
/// (here 100 KB of them) are not kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_event_is_refused_alone_and_the_rest_are_retained() {
    use dynseg_proto::encoded;
    use prost::Message;

    let dir = tempfile::tempdir().unwrap();
    let (server, _) = start(dir.path(), &[]).await;
    let now = start_time();
    let shard = shard_for("alice", SHARDS);
    let mut broken = track("x2", "alice", "e", now, &[]).encode_to_vec();
    let at = broken.windows(5).position(|w| w == b"alice").unwrap();
    broken[at] = 0xff;
    let mut padded = track("x4", "alice", "e", now, &[]).encode_to_vec();
    // Field 100, length-delimited, 100,000 bytes.
    padded.extend_from_slice(&[0xa2, 0x06]);
    prost::encoding::encode_varint(100_000, &mut padded);
    padded.resize(padded.len() + 100_000, b'p');
    let events = vec![
        track("x1", "alice", "e", now, &[]).encode_to_vec().into(),
        broken.into(),
        track("x3", "alice", "e", now, &[]).encode_to_vec().into(),
        padded.into(),
    ];
    let log_bytes = || {
        std::fs::read_dir(dir.path().join("wal"))
            .unwrap()
            .map(|f| f.unwrap().metadata().unwrap().len())
            .sum::<u64>()
    };
    let logged_before = log_bytes();
    let mut raw = encoded::node_client::NodeClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    let ack = raw
        .ingest(encoded::EventBatch {
            shard,
            epoch: 1,
            events,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (ack.accepted, rejections(&ack)),
        (3, vec![(1, "malformed event: field 2 is not valid UTF-8")])
    );
    let logged = log_bytes() - logged_before;
    assert!(
        logged < 10_000,
        "{logged} bytes logged for three small events"
    );
    server.shutdown().await;
    let (server, mut node) = start(
        dir.path(),
        &[("thrice", "count(e) >= 3"), ("four", "count(e) >= 4")],
    )
    .await;
    assert_eq!(user(&mut node, "alice").await.segments, ["thrice"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_updates_backfill_and_carry_their_version() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut node) = start(dir.path(), &[]).await;
    let now = start_time();
    ingest(
        &mut node,
        vec![
            track(
                "o1",
                "alice",
                "order_completed",
                now.minus(Span::days(3)),
                &[("revenue", Value::Number(600.0))],
            ),
            track(
                "o2",
                "alice",
                "order_completed",
                now,
                &[("revenue", Value::Number(500.0))],
            ),
            track(
                "o3",
                "bob",
                "order_completed",
                now,
                &[("revenue", Value::Number(20.0))],
            ),
        ],
    )
    .await;
    server.node.checkpoint().await.unwrap();
    let mut feed = subscribe_from_now(&mut node).await;
    // A preview tells what applying would give, and applies nothing.
    let sequences = |status: pb::StatusResponse| -> Vec<u64> {
        status.shards.iter().map(|s| s.last_sequence).collect()
    };
    let before = node
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let preview = node
        .preview_segments(pb::PreviewSegmentsRequest {
            segments: vec![
                pb::SegmentDef {
                    id: "vip".into(),
                    rule: "sum(order_completed.revenue) >= 1000".into(),
                    ..Default::default()
                },
                pb::SegmentDef {
                    id: "buyers".into(),
                    rule: "exists(order_completed)".into(),
                    ..Default::default()
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let previewed: Vec<(&str, u64)> = preview
        .counts
        .iter()
        .map(|c| (c.segment.as_str(), c.members))
        .collect();
    assert_eq!(previewed, [("vip", 1), ("buyers", 2)]);
    assert_eq!(preview.users, 2);
    let after = node
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.rule_version, before.rule_version);
    assert_eq!(sequences(after), sequences(before));
    let progress = apply_rules(
        &mut node,
        1,
        &[("vip", "sum(order_completed.revenue) >= 1000")],
    )
    .await;
    let finished: Vec<_> = progress.iter().filter(|p| p.finished).collect();
    assert_eq!(finished.len(), SHARDS as usize);
    assert!(
        finished
            .iter()
            .all(|p| p.backfilled_segments == vec!["vip".to_owned()])
    );
    let changes = take(&mut feed, 1).await;
    assert_eq!(
        brief(&changes),
        vec!["alice enter vip at 2026-01-01T00:00:00Z"]
    );
    assert_eq!(changes[0].rule_version, 1);
    assert_eq!(changes[0].cause, pb::ChangeCause::Rule as i32);
    // What was applied is what the preview said.
    let counts = node
        .segment_counts(pb::SegmentCountsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(counts.counts[0].segment, "vip");
    assert_eq!(counts.counts[0].members, previewed[0].1);

    // Invalid rules are refused with their position, and change nothing.
    let bad = node
        .apply_rules(pb::ApplyRulesRequest {
            version: 2,
            segments: vec![pb::SegmentDef {
                id: "x".into(),
                rule: "count(e) >".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("1:11"), "{}", bad.message());
    let status = node
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.rule_version, 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_users_expiring_at_one_instant() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut node) = start(dir.path(), &[("active", "exists(login) in last 1h")]).await;
    let now = start_time();
    let events: Vec<pb::Event> = (0..500)
        .map(|i| track(&format!("l{i}"), &format!("user-{i}"), "login", now, &[]))
        .collect();
    ingest(&mut node, events).await;
    let mut feed = subscribe_from_now(&mut node).await;
    // A future-dated login (due in two minutes) keeps one user a little longer.
    ingest(
        &mut node,
        vec![track(
            "late",
            "user-7",
            "login",
            now.plus(Span::minutes(2)),
            &[],
        )],
    )
    .await;
    advance(&mut node, Span::hours(1)).await;
    let exits = take(&mut feed, 499).await;
    assert!(
        exits
            .iter()
            .all(|c| c.at_ms == now.plus(Span::hours(1)).millis()
                && c.kind == pb::ChangeKind::Exit as i32)
    );
    assert!(!exits.iter().any(|c| c.user_id == "user-7"));
    advance(&mut node, Span::minutes(2)).await;
    let last = take(&mut feed, 1).await;
    assert_eq!(
        brief(&last),
        vec!["user-7 exit active at 2026-01-01T01:02:00Z"]
    );
    let counts = node
        .segment_counts(pb::SegmentCountsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(counts.counts[0].members, 0);
    server.shutdown().await;
}

/// On the wall clock, a shard's timer fires each user's time-driven exit at
/// its instant with no input to wake it: the earlier of two exits due on one
/// shard arrives after the later one, so the timer is moved earlier, then set
/// again for the second exit once the first has fired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_wall_clock_exits_fire_at_their_instant_without_input() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.clock = Clock::System;
    let server = Server::start(config).await.unwrap();
    let mut node = client(&server).await;
    apply_rules(&mut node, 1, &[("active", "exists(login) in last 1h")]).await;
    // Two users of one shard.
    let first = "user-0";
    let second = (1..)
        .map(|i| format!("user-{i}"))
        .find(|u| shard_for(u, SHARDS) == shard_for(first, SHARDS))
        .unwrap();
    let now = Clock::System.now();
    let mut feed = subscribe_from_now(&mut node).await;
    // The later exit is logged first.
    let hour = Span::hours(1).millis();
    let late = Timestamp(now.millis() - hour + 1_500);
    let early = Timestamp(now.millis() - hour + 700);
    ingest(&mut node, vec![track("l2", &second, "login", late, &[])]).await;
    ingest(&mut node, vec![track("l1", first, "login", early, &[])]).await;
    let enters = take(&mut feed, 2).await;
    assert!(
        enters
            .iter()
            .all(|c| c.kind == pb::ChangeKind::Enter as i32)
    );
    let mut exits = Vec::new();
    for _ in 0..2 {
        let exit = take(&mut feed, 1).await.remove(0);
        let received = Clock::System.now();
        assert!(
            exit.at_ms <= received.millis(),
            "an exit due at {} came at {received}",
            Timestamp(exit.at_ms)
        );
        exits.push(exit);
    }
    assert_eq!(
        exits
            .iter()
            .map(|c| (c.user_id.as_str(), c.kind, c.at_ms))
            .collect::<Vec<_>>(),
        vec![
            (
                first,
                pb::ChangeKind::Exit as i32,
                early.plus(Span::hours(1)).millis()
            ),
            (
                second.as_str(),
                pb::ChangeKind::Exit as i32,
                late.plus(Span::hours(1)).millis()
            ),
        ]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_without_a_time_happened_when_the_node_received_it() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut node) = start(dir.path(), &[("active", "exists(login) in last 1h")]).await;
    advance(&mut node, Span::minutes(10)).await;
    let mut feed = subscribe_from_now(&mut node).await;
    let mut untimed = track("u1", "user-1", "login", start_time(), &[]);
    untimed.timestamp_ms = 0;
    let timed = track("t2", "user-2", "login", start_time(), &[]);
    ingest(&mut node, vec![untimed, timed]).await;
    assert_eq!(
        brief(&take(&mut feed, 2).await),
        vec![
            "user-1 enter active at 2026-01-01T00:10:00Z",
            "user-2 enter active at 2026-01-01T00:10:00Z",
        ]
    );
    // The login without a time counts from when it arrived, ten minutes
    // after the other.
    advance(&mut node, Span::hours(1)).await;
    assert_eq!(
        brief(&take(&mut feed, 2).await),
        vec![
            "user-1 exit active at 2026-01-01T01:10:00Z",
            "user-2 exit active at 2026-01-01T01:00:00Z",
        ]
    );
    server.shutdown().await;
}

/// Changes by shard, checking that each shard's come in sequence order.
fn per_shard(
    changes: Vec<pb::MembershipChange>,
) -> std::collections::BTreeMap<u32, Vec<pb::MembershipChange>> {
    let mut shards = std::collections::BTreeMap::<u32, Vec<pb::MembershipChange>>::new();
    for change in changes {
        let cursor = change.cursor.unwrap();
        let previous = shards.entry(cursor.shard).or_default();
        if let Some(last) = previous.last() {
            assert!(last.cursor.as_ref().unwrap().sequence < cursor.sequence);
        }
        previous.push(change);
    }
    shards
}

/// Reads batches until they hold `n` changes (failing after a deadline);
/// returns the changes and how many messages carried them.
async fn take_batches(
    stream: &mut tonic::Streaming<pb::ChangeBatch>,
    n: usize,
) -> (Vec<pb::MembershipChange>, usize) {
    let (mut out, mut messages) = (Vec::new(), 0);
    while out.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
        match next {
            Ok(Ok(Some(batch))) => {
                assert!(!batch.changes.is_empty(), "an empty batch");
                messages += 1;
                out.extend(batch.changes);
            }
            other => panic!("expected {n} changes, got {} then {other:?}", out.len()),
        }
    }
    (out, messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_subscriptions_carry_the_same_changes_in_fewer_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut node) = start(dir.path(), &[("active", "exists(login) in last 1h")]).await;
    let now = start_time();
    let from_now = pb::SubscribeRequest {
        from_now: true,
        ..Default::default()
    };
    let mut live_one = node.subscribe(from_now.clone()).await.unwrap().into_inner();
    let mut live_batched = node.subscribe_batches(from_now).await.unwrap().into_inner();
    let events: Vec<pb::Event> = (0..500)
        .map(|i| track(&format!("l{i}"), &format!("user-{i}"), "login", now, &[]))
        .collect();
    ingest(&mut node, events).await;
    advance(&mut node, Span::hours(1)).await;
    // Live: the same 1,000 changes (500 enters, then 500 exits), each shard's
    // in sequence order (shards interleave differently on each stream).
    let one = per_shard(take(&mut live_one, 1000).await);
    let (batched, _) = take_batches(&mut live_batched, 1000).await;
    assert_eq!(per_shard(batched), one);
    // History from the start: the same again, ready at once, so batched.
    let mut history_one = node
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut history_batched = node
        .subscribe_batches(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(per_shard(take(&mut history_one, 1000).await), one);
    let (batched, messages) = take_batches(&mut history_batched, 1000).await;
    assert_eq!(per_shard(batched), one);
    assert!(messages < 100, "1,000 ready changes in {messages} messages");
    // Resuming one shard after a cursor gives the rest of that shard.
    let (&shard, changes) = one.iter().max_by_key(|(_, c)| c.len()).unwrap();
    let half = changes.len() / 2;
    let mut resumed = node
        .subscribe_batches(pb::SubscribeRequest {
            shards: vec![shard],
            after: vec![changes[half - 1].cursor.unwrap()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (rest, _) = take_batches(&mut resumed, changes.len() - half).await;
    assert_eq!(rest, changes[half..]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_filter_passes_its_segments_changes_and_no_others() {
    let dir = tempfile::tempdir().unwrap();
    let rules = [
        ("active", "exists(login) in last 1h"),
        ("buyer", "exists(order_completed) in last 1h"),
    ];
    let (server, mut node) = start(dir.path(), &rules).await;
    let now = start_time();
    let buyers = pb::SubscribeRequest {
        segments: vec!["buyer".into()],
        ..Default::default()
    };
    let mut live = node.subscribe(buyers.clone()).await.unwrap().into_inner();
    // Logins and orders interleaved: 300 `active` enters, 100 `buyer` enters.
    let events: Vec<pb::Event> = (0..400)
        .map(|i| {
            let name = if i % 4 == 0 {
                "order_completed"
            } else {
                "login"
            };
            track(&format!("e{i}"), &format!("user-{i}"), name, now, &[])
        })
        .collect();
    ingest(&mut node, events).await;
    let mut all = node
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut expected = per_shard(take(&mut all, 400).await);
    for changes in expected.values_mut() {
        changes.retain(|c| c.segment == "buyer");
    }
    assert_eq!(expected.values().map(Vec::len).sum::<usize>(), 100);

    let mut history = node.subscribe(buyers.clone()).await.unwrap().into_inner();
    let mut history_batched = node
        .subscribe_batches(buyers.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(per_shard(take(&mut live, 100).await), expected);
    assert_eq!(per_shard(take(&mut history, 100).await), expected);
    assert_eq!(
        per_shard(take_batches(&mut history_batched, 100).await.0),
        expected
    );
    // After them, the next change each stream sends is the next `buyer` one.
    ingest(
        &mut node,
        vec![
            track("late-login", "late", "login", now, &[]),
            track("late-order", "late", "order_completed", now, &[]),
        ],
    )
    .await;
    for next in [take(&mut live, 1).await, take(&mut history, 1).await] {
        assert_eq!(brief(&next), [format!("late enter buyer at {now}")]);
    }
    let (next, _) = take_batches(&mut history_batched, 1).await;
    assert_eq!(brief(&next), [format!("late enter buyer at {now}")]);

    let unknown = node
        .subscribe(pb::SubscribeRequest {
            segments: vec!["no-such".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_exported_and_imported_elsewhere_keeps_state_and_cursors() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start(config(a_dir.path())).await.unwrap();
    let mut b_config = config(b_dir.path());
    b_config.shards = Vec::new();
    let b = Server::start(b_config).await.unwrap();
    let (mut node_a, mut node_b) = (client(&a).await, client(&b).await);
    let rules = [("repeat_buyers", "count(order_completed) in last 90d >= 2")];
    apply_rules(&mut node_a, 1, &rules).await;
    apply_rules(&mut node_b, 1, &rules).await;
    let now = start_time();
    ingest(
        &mut node_a,
        vec![
            track("1", "alice", "order_completed", now, &[]),
            track("2", "alice", "order_completed", now, &[]),
        ],
    )
    .await;
    let shard = shard_for("alice", SHARDS);
    let mut feed = node_a
        .subscribe(pb::SubscribeRequest {
            shards: vec![shard],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let entered = take(&mut feed, 1).await;
    let cursor = entered[0].cursor.unwrap();

    node_a
        .release_shard(pb::ReleaseShardRequest {
            shard,
            new_owner: b.addr.to_string(),
        })
        .await
        .unwrap();
    let chunks: Vec<pb::ShardChunk> = {
        let mut stream = node_a
            .export_shard(pb::ExportShardRequest { shard })
            .await
            .unwrap()
            .into_inner();
        let mut chunks = Vec::new();
        while let Some(chunk) = stream.message().await.unwrap() {
            chunks.push(chunk);
        }
        chunks
    };
    let imported = node_b
        .import_shard(tokio_stream::iter(chunks))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(imported.users, 1);
    // The new owner serves it at the next epoch, with the state and the cursor.
    let alice = user(&mut node_b, "alice").await;
    assert_eq!(alice.segments, vec!["repeat_buyers"]);
    let dup = node_b
        .ingest(pb::EventBatch {
            shard,
            epoch: 2,
            events: vec![track("2", "alice", "order_completed", now, &[])],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dup.duplicates, 1, "dedupe moved with the shard");
    let mut resumed = node_b
        .subscribe(pb::SubscribeRequest {
            shards: vec![shard],
            after: vec![cursor],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    advance(&mut node_b, Span::days(90)).await;
    let exit = take(&mut resumed, 1).await;
    assert_eq!(
        brief(&exit),
        vec!["alice exit repeat_buyers at 2026-04-01T00:00:00Z"]
    );
    assert_eq!(
        exit[0].cursor.as_ref().unwrap().sequence,
        cursor.sequence + 1
    );
    assert_eq!(exit[0].cursor.as_ref().unwrap().epoch, 2);

    // The retained events moved too (the source's log positions travel as
    // the records): segments over a new aggregate are backfilled from them,
    // the repeat sent to the new owner left out.
    let mut feed_b = subscribe_from_now(&mut node_b).await;
    apply_rules(
        &mut node_b,
        2,
        &[
            rules[0],
            ("orders_ever", "count(order_completed) >= 2"),
            ("orders_3", "count(order_completed) >= 3"),
        ],
    )
    .await;
    assert_eq!(
        brief(&take(&mut feed_b, 1).await),
        vec!["alice enter orders_ever at 2026-04-01T00:00:00Z"]
    );
    let alice = user(&mut node_b, "alice").await;
    assert_eq!(alice.segments, vec!["orders_ever"]);
    a.shutdown().await;
    b.shutdown().await;
}

/// Subscribers that disconnect at random cursors and reconnect, while events
/// and clock moves keep producing changes, receive every change exactly once:
/// no gap, no repeat, each user's changes in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_subscriptions_see_every_change_exactly_once() {
    let seed: u64 = std::env::var("DYNSEG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    println!("subscription resume seed {seed} (rerun with DYNSEG_SEED={seed})");
    let mut state = seed.max(1);
    let mut rng = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let dir = tempfile::tempdir().unwrap();
    let (server, mut node) = start(dir.path(), &[]).await;
    apply_rules(
        &mut node,
        1,
        &[
            ("seen", "exists(e) in last 30m"),
            ("busy", "count(e) in last 1h >= 3"),
        ],
    )
    .await;

    // Producer: batches of events and clock moves.
    let plan: Vec<(Vec<(u64, u64)>, u64)> = (0..40)
        .map(|_| {
            (
                (0..1 + rng(20))
                    .map(|_| (rng(30), rng(1_000_000)))
                    .collect(),
                1 + rng(40),
            )
        })
        .collect();
    let producer = {
        let mut node = node.clone();
        let clock = server.node.clone();
        tokio::spawn(async move {
            for (round, (events, minutes)) in plan.into_iter().enumerate() {
                let now = clock.now();
                let batch = events
                    .iter()
                    .enumerate()
                    .map(|(i, (user, _))| {
                        track(
                            &format!("r{round}-{i}"),
                            &format!("user-{user}"),
                            "e",
                            now,
                            &[],
                        )
                    })
                    .collect();
                ingest(&mut node, batch).await;
                advance(&mut node, Span::minutes(minutes as i64)).await;
            }
        })
    };

    // Consumer: reconnects after a random number of changes each time.
    let mut cursors: std::collections::BTreeMap<u32, pb::Cursor> = Default::default();
    let mut received: Vec<pb::MembershipChange> = Vec::new();
    let mut producing = true;
    loop {
        let request = pb::SubscribeRequest {
            after: cursors.values().copied().collect(),
            ..Default::default()
        };
        let mut stream = node.subscribe(request).await.unwrap().into_inner();
        let want = 1 + rng(40) as usize;
        let mut got = 0;
        while got < want {
            match tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
                Ok(Ok(Some(change))) => {
                    let cursor = change.cursor.unwrap();
                    cursors.insert(cursor.shard, cursor);
                    received.push(change);
                    got += 1;
                }
                Ok(other) => panic!("stream ended: {other:?}"),
                // Nothing new right now.
                Err(_) => break,
            }
        }
        drop(stream);
        if producing && producer.is_finished() {
            producing = false;
        }
        if !producing {
            let status = node
                .status(pb::StatusRequest {})
                .await
                .unwrap()
                .into_inner();
            let total: u64 = status.shards.iter().map(|s| s.last_sequence).sum();
            if received.len() as u64 >= total {
                assert_eq!(
                    received.len() as u64,
                    total,
                    "received more changes than were logged"
                );
                break;
            }
        }
    }
    producer.await.unwrap();

    // The whole log, in one go, to compare with.
    let mut full_stream = node
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let full = take(&mut full_stream, received.len()).await;
    let key = |c: &pb::MembershipChange| {
        let cursor = c.cursor.unwrap();
        (cursor.shard, cursor.sequence)
    };
    let mut received_keys: Vec<_> = received.iter().map(key).collect();
    let before = received_keys.len();
    received_keys.sort_unstable();
    received_keys.dedup();
    assert_eq!(received_keys.len(), before, "a change was received twice");
    let mut full_keys: Vec<_> = full.iter().map(key).collect();
    full_keys.sort_unstable();
    assert_eq!(
        received_keys, full_keys,
        "the reconnecting subscriber missed changes"
    );
    // Each user's changes arrive in the order they happened.
    let per_user = |changes: &[pb::MembershipChange]| {
        let mut map: std::collections::BTreeMap<String, Vec<(String, i32, i64)>> =
            Default::default();
        for c in changes {
            map.entry(c.user_id.clone())
                .or_default()
                .push((c.segment.clone(), c.kind, c.at_ms));
        }
        map
    };
    assert_eq!(per_user(&received), per_user(&full));
    assert!(
        received.len() > 100,
        "too few changes to mean anything: {}",
        received.len()
    );
    server.shutdown().await;
}

/// A batch's write-ahead log record is its retained copy: the log keeps the
/// segments retained batches are in after checkpoints cover them, across a
/// restart, and a rule added later is backfilled from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_events_stay_in_the_log_after_checkpoints_cover_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut small_segments = config(dir.path());
    // A segment per record or two: checkpoints could delete nearly all of them.
    small_segments.wal_segment_bytes = 256;
    let server = Server::start(small_segments.clone()).await.unwrap();
    let mut node = client(&server).await;
    let now = start_time();
    let order = |id: &str, user: &str, revenue: f64, at: Timestamp| {
        track(
            id,
            user,
            "order_completed",
            at,
            &[("revenue", Value::Number(revenue))],
        )
    };
    ingest(
        &mut node,
        vec![order("o1", "alice", 600.0, now.minus(Span::days(3)))],
    )
    .await;
    server.node.checkpoint().await.unwrap();
    // Later batches on every shard move every replay point past the first
    // batch's segment.
    for round in 0..3 {
        let events = (0..20)
            .map(|u| order(&format!("r{round}-{u}"), &format!("user{u}"), 1.0, now))
            .chain([order(&format!("a{round}"), "alice", 200.0, now)])
            .collect();
        ingest(&mut node, events).await;
        server.node.checkpoint().await.unwrap();
    }
    server.shutdown().await;

    let server = Server::start(small_segments).await.unwrap();
    let mut node = client(&server).await;
    let mut feed = subscribe_from_now(&mut node).await;
    apply_rules(
        &mut node,
        1,
        &[("vip", "sum(order_completed.revenue) >= 1000")],
    )
    .await;
    let changes = take(&mut feed, 1).await;
    assert_eq!(
        brief(&changes),
        vec!["alice enter vip at 2026-01-01T00:00:00Z"],
        "600 from the first batch and 3 x 200 after it"
    );
    server.shutdown().await;
}
