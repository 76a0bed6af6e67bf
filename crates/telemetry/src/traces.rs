//! Logs and traces. Logs go to stderr (filtered by `RUST_LOG`). When the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set,
//! spans are also exported over OTLP (gRPC). Every server opens a span per
//! call ([`TraceLayer`]) whose parent is the caller's, read from the W3C
//! `traceparent` in the call's metadata; every client call carries the
//! current span's context there ([`inject`]). So one ingest is one trace
//! from the gateway through the node.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// Keeps the trace exporter alive; dropping it flushes what is buffered.
#[must_use = "traces are flushed when this is dropped"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces failed");
        }
    }
}

/// Whether the standard environment asks for OTLP export.
pub fn otlp_requested() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|v| !v.is_empty()))
}

/// Installs the process's subscriber: logs to stderr by `RUST_LOG` (else
/// `default_filter`), and OTLP export of spans as `service` when requested.
/// Call inside a tokio runtime (the exporter is a tonic client). A second
/// call does nothing.
pub fn init(service: &str, default_filter: &str) -> Telemetry {
    set_propagator();
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        );
    let mut provider = None;
    let mut exporter_error = None;
    let traces = if otlp_requested() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => {
                let built = SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name(service.to_owned())
                            .build(),
                    )
                    .build();
                let layer = otel_layer(&built, service);
                provider = Some(built);
                Some(layer)
            }
            Err(e) => {
                exporter_error = Some(e.to_string());
                None
            }
        }
    } else {
        None
    };
    let installed = tracing_subscriber::registry()
        .with(traces)
        .with(logs)
        .try_init()
        .is_ok();
    if let Some(e) = exporter_error {
        tracing::warn!(error = %e, "OTLP trace export not started");
    }
    if installed && provider.is_some() {
        tracing::info!(service, "exporting traces over OTLP");
    }
    Telemetry { provider }
}

/// The layer that turns spans into OpenTelemetry spans of `provider`. The
/// exporter's own crates are left out: exporting must not trace itself.
pub fn otel_layer(
    provider: &SdkTracerProvider,
    service: &str,
) -> Box<dyn Layer<Registry> + Send + Sync> {
    let quiet = Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF);
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service.to_owned()))
        .with_filter(quiet)
        .boxed()
}

/// Uses W3C trace context (`traceparent`) to carry spans across processes.
pub fn set_propagator() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Puts the current span's context in an outgoing call's metadata.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// A tower layer that runs every call in a span named by its gRPC method,
/// child of the caller's span when the call carries one.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceLayer;

impl<S> tower_layer::Layer<S> for TraceLayer {
    type Service = TraceService<S>;

    fn layer(&self, inner: S) -> TraceService<S> {
        TraceService { inner }
    }
}

/// See [`TraceLayer`].
#[derive(Clone, Debug)]
pub struct TraceService<S> {
    inner: S,
}

impl<S, B> tower_service::Service<http::Request<B>> for TraceService<S>
where
    S: tower_service::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().trim_start_matches('/').to_owned();
        let span = tracing::info_span!("grpc", otel.name = %method, otel.kind = "server", rpc.method = %method);
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&HeaderExtractor(request.headers()))
        });
        // A call without a usable traceparent starts a trace of its own.
        let _ = span.set_parent(parent);
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(future.instrument(span))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use opentelemetry::trace::TraceContextExt;
    use opentelemetry_sdk::trace::InMemorySpanExporter;

    #[test]
    fn context_goes_out_in_metadata_and_comes_back_as_the_parent() {
        set_propagator();
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry().with(otel_layer(&provider, "test"));
        tracing::subscriber::with_default(subscriber, || {
            let caller = tracing::info_span!("caller");
            let mut metadata = tonic::metadata::MetadataMap::new();
            caller.in_scope(|| inject(&mut metadata));
            let traceparent = metadata
                .get("traceparent")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let caller_trace = caller.context().span().span_context().trace_id();
            assert!(
                traceparent.contains(&caller_trace.to_string()),
                "{traceparent}"
            );

            let headers = metadata.into_headers();
            let parent = opentelemetry::global::get_text_map_propagator(|p| {
                p.extract(&HeaderExtractor(&headers))
            });
            assert_eq!(parent.span().span_context().trace_id(), caller_trace);
            assert!(parent.span().span_context().is_remote());
        });
    }
}
