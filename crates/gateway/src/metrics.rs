//! The gateway's Prometheus metrics: what clients sent and how long their
//! acknowledgements took, HTTP answers by status, and the routing table's
//! coverage (read at every scrape).

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use dynseg_proto::pb;
use dynseg_telemetry::metrics::{ScrapeHook, on_scrape};
use prometheus::{
    Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, register_histogram,
    register_int_counter_vec, register_int_gauge,
};
use tokio::sync::watch;

use crate::error::GatewayError;
use crate::routing::Routing;

// Registration fails only for a malformed or duplicate definition: a bug
// caught by the first test that touches the metric, not a runtime condition.
const DEFINED: &str = "metric definitions are valid and unique";

static EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new("dynseg_gateway_events_total", "Events clients sent through this gateway, by outcome: accepted (durable, duplicates included), duplicate, rejected, failed (the request failed as a whole)."),
        &["outcome"]
    )
    .expect(DEFINED)
});

static ACK_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(HistogramOpts::new(
        "dynseg_gateway_ingest_duration_seconds",
        "Time from a client's ingest request to its acknowledgement (every part durable on its shard)."
    )
    .buckets(vec![
        0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0
    ]))
    .expect(DEFINED)
});

static HTTP_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        Opts::new(
            "dynseg_gateway_http_requests_total",
            "Requests to the HTTP tracking API, by status code."
        ),
        &["code"]
    )
    .expect(DEFINED)
});

static ROUTED: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "dynseg_gateway_routed_shards",
        "Shards with an owner in this gateway's routing table."
    )
    .expect(DEFINED)
});

/// Records one ingest request: its events' outcomes and its latency.
pub(crate) fn record_ingest(
    started: Instant,
    events: usize,
    outcome: &Result<pb::IngestReply, GatewayError>,
) {
    ACK_SECONDS.observe(started.elapsed().as_secs_f64());
    match outcome {
        Ok(reply) => {
            let rejected = reply.rejected.len() as u64;
            EVENTS
                .with_label_values(&["accepted"])
                .inc_by(u64::from(reply.accepted));
            EVENTS
                .with_label_values(&["duplicate"])
                .inc_by(u64::from(reply.duplicates));
            EVENTS.with_label_values(&["rejected"]).inc_by(rejected);
        }
        Err(_) => EVENTS.with_label_values(&["failed"]).inc_by(events as u64),
    }
}

/// Records messages the HTTP API refused before they became events.
pub(crate) fn record_refused(count: usize) {
    EVENTS.with_label_values(&["rejected"]).inc_by(count as u64);
}

/// Records one HTTP answer.
pub(crate) fn record_http(status: u16) {
    HTTP_REQUESTS
        .with_label_values(&[&status.to_string()])
        .inc();
}

/// Refreshes the gateway's gauges at every scrape, until the hook is dropped.
pub(crate) fn hook(routing: watch::Receiver<Arc<Routing>>) -> ScrapeHook {
    for outcome in ["accepted", "duplicate", "rejected", "failed"] {
        EVENTS.with_label_values(&[outcome]);
    }
    LazyLock::force(&ACK_SECONDS);
    LazyLock::force(&HTTP_REQUESTS);
    on_scrape(move || {
        let owned = routing
            .borrow()
            .shards
            .iter()
            .filter(|s| s.is_some())
            .count();
        ROUTED.set(owned as i64);
        std::future::ready(())
    })
}
