//! The node's Prometheus metrics (names and meaning: docs/operations.md).
//! Counters and the ack-latency histogram are updated as events and changes
//! go by; the gauges are read from the shard tasks when Prometheus scrapes.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use dynseg_proto::history::DEFAULT_VOLATILITY_THRESHOLD;
use dynseg_proto::pb;
use dynseg_telemetry::metrics::{ScrapeHook, on_scrape};
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    register_gauge_vec, register_histogram, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec,
};

use crate::error::NodeError;
use crate::runtime::{Command, Node};

// Registration fails only for a malformed or duplicate definition: a bug
// caught by the first test that touches the metric, not a runtime condition.
const DEFINED: &str = "metric definitions are valid and unique";

static EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new("dynseg_node_events_total", "Events the node answered for, by outcome: accepted (durable, duplicates included), duplicate, rejected."),
        &["outcome"]
    )
    .expect(DEFINED)
});

/// `EVENTS` by outcome (accepted, duplicate, rejected), looked up once: a
/// label lookup hashes the label and takes a lock, and every shard batch
/// counts all three.
static EVENT_OUTCOMES: LazyLock<[IntCounter; 3]> = LazyLock::new(|| {
    ["accepted", "duplicate", "rejected"].map(|outcome| EVENTS.with_label_values(&[outcome]))
});

static INGEST_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        HistogramOpts::new(
            "dynseg_node_ingest_duration_seconds",
            "Time from a batch's arrival to its acknowledgement (durable on disk)."
        )
        .buckets(vec![
            0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0
        ])
    )
    .expect(DEFINED)
});

static CHANGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "dynseg_segment_changes_total",
            "Durable membership changes on this node's shards, by segment and kind (enter, exit)."
        ),
        &["segment", "kind"]
    )
    .expect(DEFINED)
});

static MEMBERS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        Opts::new(
            "dynseg_segment_members",
            "Members of each segment among this node's users (sum over nodes for the size)."
        ),
        &["segment"]
    )
    .expect(DEFINED)
});

static CHURN_LAST_HOUR: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        Opts::new(
            "dynseg_segment_churn_last_hour",
            "Enters plus exits of each segment on this node's shards in the last 60 minutes of the node's clock."
        ),
        &["segment"]
    )
    .expect(DEFINED)
});

static VOLATILITY: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        Opts::new(
            "dynseg_segment_volatility",
            "Churn of the last hour over the segment's size on this node (at least 1): rules that flap score high."
        ),
        &["segment"]
    )
    .expect(DEFINED)
});

static VOLATILE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        Opts::new(
            "dynseg_segment_volatile",
            "1 when the segment's volatility on this node is above the threshold (0.5), else 0."
        ),
        &["segment"]
    )
    .expect(DEFINED)
});

/// Enters plus exits per segment per minute (of change time), for the last
/// hour: what the volatility gauges are computed from at scrape time.
static CHURN: LazyLock<Mutex<HashMap<String, ChurnMinutes>>> = LazyLock::new(Default::default);

/// (minute since the epoch, enters plus exits), oldest first.
type ChurnMinutes = VecDeque<(i64, u64)>;

const MINUTE_MS: i64 = 60_000;

static USERS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        Opts::new("dynseg_node_users", "Users of this node's shards: active (an in-memory actor) or passivated (state on disk only)."),
        &["state"]
    )
    .expect(DEFINED)
});

static SHARDS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("dynseg_node_shards", "Shards this node serves.").expect(DEFINED)
});

static STORAGE: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "dynseg_node_storage_bytes",
        "Bytes of the node's data directory (write-ahead log and sled)."
    )
    .expect(DEFINED)
});

static SUBSCRIBER_LAG: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "dynseg_node_subscriber_lag_changes",
        "Changes published but not yet taken by the slowest live subscriber of any shard."
    )
    .expect(DEFINED)
});

/// Records one answered batch: its outcome and how long it took.
pub(crate) fn record_ingest(started: Instant, outcome: &Result<pb::IngestResponse, NodeError>) {
    INGEST_SECONDS.observe(started.elapsed().as_secs_f64());
    if let Ok(response) = outcome {
        let [accepted, duplicate, rejected] = &*EVENT_OUTCOMES;
        accepted.inc_by(u64::from(response.accepted));
        duplicate.inc_by(u64::from(response.duplicates));
        rejected.inc_by(response.rejected.len() as u64);
    }
}

/// Records durable changes as they are published: counted per (segment,
/// kind, minute) first, so a batch costs one label lookup per group, not per
/// change.
pub(crate) fn record_changes<'a>(changes: impl IntoIterator<Item = &'a pb::MembershipChange>) {
    let enter = pb::ChangeKind::Enter as i32;
    // A batch touches few segments: a vector beats a map.
    let mut groups: Vec<(&str, bool, i64, u64)> = Vec::new();
    for change in changes {
        let key = (
            change.segment.as_str(),
            change.kind == enter,
            change.at_ms.div_euclid(MINUTE_MS),
        );
        match groups.iter_mut().find(|g| (g.0, g.1, g.2) == key) {
            Some(group) => group.3 += 1,
            None => groups.push((key.0, key.1, key.2, 1)),
        }
    }
    if groups.is_empty() {
        return;
    }
    let mut churn = CHURN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for (segment, entered, minute, n) in groups {
        let kind = if entered { "enter" } else { "exit" };
        CHANGES.with_label_values(&[segment, kind]).inc_by(n);
        let minutes = match churn.get_mut(segment) {
            Some(minutes) => minutes,
            None => churn.entry(segment.to_owned()).or_default(),
        };
        match minutes.iter_mut().rev().find(|(m, _)| *m == minute) {
            Some((_, count)) => *count += n,
            None => {
                // Changes come in time order but for a handful at a minute's edge.
                let at = minutes.partition_point(|(m, _)| *m < minute);
                minutes.insert(at, (minute, n));
            }
        }
        let newest = minutes.back().map_or(minute, |(m, _)| *m);
        while minutes.front().is_some_and(|(m, _)| *m <= newest - 60) {
            minutes.pop_front();
        }
    }
}

/// Enters plus exits of each segment in the 60 minutes up to `now_ms`.
fn churn_last_hour(now_ms: i64) -> HashMap<String, u64> {
    let now = now_ms.div_euclid(MINUTE_MS);
    let churn = CHURN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    churn
        .iter()
        .map(|(segment, minutes)| {
            let sum = minutes
                .iter()
                .filter(|(m, _)| *m > now - 60 && *m <= now)
                .map(|(_, n)| n)
                .sum();
            (segment.clone(), sum)
        })
        .collect()
}

/// Refreshes the node's gauges at every scrape, until the hook is dropped.
pub(crate) fn hook(node: Node) -> ScrapeHook {
    // Counters show from the start, at zero.
    LazyLock::force(&EVENT_OUTCOMES);
    LazyLock::force(&INGEST_SECONDS);
    LazyLock::force(&CHANGES);
    on_scrape(move || {
        let node = node.clone();
        async move { refresh(&node).await }
    })
}

async fn refresh(node: &Node) {
    let mut members: std::collections::BTreeMap<String, i64> = node
        .plan()
        .segment_ids()
        .map(|s| (s.to_string(), 0))
        .collect();
    let (mut active, mut total, mut shards, mut lag) = (0u64, 0u64, 0i64, 0usize);
    for (_, handle) in node.handles() {
        lag = lag.max(handle.log.backlog());
        let Ok(status) = node.ask(&handle, |reply| Command::Status { reply }).await else {
            continue; // the shard stopped meanwhile
        };
        let Ok((counts, _)) = node.ask(&handle, |reply| Command::Counts { reply }).await else {
            continue;
        };
        shards += 1;
        active += status.users_active;
        total += status.users_total;
        for (segment, count) in counts {
            *members.entry(segment.to_string()).or_default() += count as i64;
        }
    }
    let churn = churn_last_hour(node.now().millis());
    MEMBERS.reset();
    CHURN_LAST_HOUR.reset();
    VOLATILITY.reset();
    VOLATILE.reset();
    for (segment, count) in members {
        MEMBERS.with_label_values(&[&segment]).set(count);
        let changes = churn.get(&segment).copied().unwrap_or(0);
        let volatility = changes as f64 / count.max(1) as f64;
        CHURN_LAST_HOUR
            .with_label_values(&[&segment])
            .set(changes as i64);
        VOLATILITY.with_label_values(&[&segment]).set(volatility);
        VOLATILE
            .with_label_values(&[&segment])
            .set(i64::from(volatility > DEFAULT_VOLATILITY_THRESHOLD));
    }
    USERS.with_label_values(&["active"]).set(active as i64);
    USERS
        .with_label_values(&["passivated"])
        .set(total.saturating_sub(active) as i64);
    SHARDS.set(shards);
    SUBSCRIBER_LAG.set(lag as i64);
    STORAGE.set(directory_bytes(&node.config().data_dir) as i64);
}

/// Bytes of the files under `dir` (unreadable entries count as 0).
fn directory_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => directory_bytes(&entry.path()),
            Ok(_) => entry.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}
