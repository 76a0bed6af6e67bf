//! One ingest is one trace across processes' boundaries: the gateway's span
//! for the client's call and the node's span for the gateway's call share a
//! trace id, and the node's span is the child of the gateway's. The context
//! travels in gRPC metadata (W3C `traceparent`) over real connections; the
//! spans go to an in-memory exporter.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use dynseg_cli::dev::{DevCluster, DevOptions};
use dynseg_node::Clock;
use dynseg_proto::pb;
use dynseg_proto::pb::gateway_client::GatewayClient;
use dynseg_rules::Timestamp;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ingest_is_one_trace_from_gateway_to_node() {
    dynseg_telemetry::traces::set_propagator();
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing_subscriber::registry()
        .with(dynseg_telemetry::traces::otel_layer(
            &provider,
            "dynseg-test",
        ))
        .init();

    let dir = tempfile::tempdir().unwrap();
    let t0 = Timestamp::parse_rfc3339("2026-03-01T12:00:00Z").unwrap();
    // Over loopback gRPC, as between processes (the dev cluster would
    // otherwise hand the node its batches in process).
    let options = DevOptions {
        shard_count: 4,
        direct_ingest: false,
        ..DevOptions::new(Clock::manual(t0))
    };
    let cluster = DevCluster::start(dir.path(), options).await.unwrap();
    let mut client = GatewayClient::connect(format!("http://{}", cluster.gateway))
        .await
        .unwrap();
    let reply = client
        .ingest(pb::IngestRequest {
            events: vec![pb::Event {
                message_id: "m1".into(),
                user_id: "traced-user".into(),
                r#type: pb::EventType::Track as i32,
                event: "order_completed".into(),
                timestamp_ms: t0.millis() - 1_000,
                ..pb::Event::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.accepted, 1);

    // The node's span ends when its answer is sent, a moment after the
    // gateway has it: poll for both with a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (gateway, node) = loop {
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();
        let find = |name: &str| spans.iter().find(|s| s.name == name).cloned();
        if let (Some(g), Some(n)) = (
            find("dynseg.v1.Gateway/Ingest"),
            find("dynseg.v1.Node/IngestShards"),
        ) {
            break (g, n);
        }
        let names: Vec<_> = spans.iter().map(|s| s.name.to_string()).collect();
        assert!(
            std::time::Instant::now() < deadline,
            "spans seen: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        node.span_context.trace_id(),
        gateway.span_context.trace_id()
    );
    assert_eq!(node.parent_span_id, gateway.span_context.span_id());
    assert!(node.parent_span_is_remote, "the parent came over the wire");
    cluster.shutdown().await;
}
