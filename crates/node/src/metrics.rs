//! The node's Prometheus metrics (names and meaning: docs/operations.md).
//! Counters and the ack-latency histogram are updated as events and changes
//! go by; the gauges are read from the shard tasks when Prometheus scrapes.

use std::path::Path;
use std::sync::LazyLock;
use std::time::Instant;

use dynseg_proto::pb;
use dynseg_telemetry::metrics::{ScrapeHook, on_scrape};
use prometheus::{
    Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, register_histogram,
    register_int_counter_vec, register_int_gauge, register_int_gauge_vec,
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
        EVENTS
            .with_label_values(&["accepted"])
            .inc_by(u64::from(response.accepted));
        EVENTS
            .with_label_values(&["duplicate"])
            .inc_by(u64::from(response.duplicates));
        EVENTS
            .with_label_values(&["rejected"])
            .inc_by(response.rejected.len() as u64);
    }
}

/// Records durable changes as they are published.
pub(crate) fn record_changes<'a>(changes: impl IntoIterator<Item = &'a pb::MembershipChange>) {
    for change in changes {
        let kind = if change.kind == pb::ChangeKind::Enter as i32 {
            "enter"
        } else {
            "exit"
        };
        CHANGES.with_label_values(&[&change.segment, kind]).inc();
    }
}

/// Refreshes the node's gauges at every scrape, until the hook is dropped.
pub(crate) fn hook(node: Node) -> ScrapeHook {
    // Counters show from the start, at zero.
    for outcome in ["accepted", "duplicate", "rejected"] {
        EVENTS.with_label_values(&[outcome]);
    }
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
    MEMBERS.reset();
    for (segment, count) in members {
        MEMBERS.with_label_values(&[&segment]).set(count);
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
