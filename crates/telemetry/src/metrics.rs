//! Prometheus metrics. Every role registers its metrics in the process's
//! default registry (one process may run several roles: `dynseg dev`), and
//! any of its HTTP listeners serves them all at `GET /metrics`. The default
//! registry also carries the process collector (`process_*`: CPU, memory,
//! open files).
//!
//! Counters and histograms are updated where things happen. Gauges that
//! describe state owned by tasks (segment sizes, actors, raft status) are
//! refreshed when Prometheus scrapes, by hooks the owners register
//! ([`on_scrape`]): the numbers are exact at scrape time, and nothing runs
//! between scrapes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, TextEncoder};

/// How long one refresh hook may take before the scrape goes on without it.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);

type Refresh = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

static HOOKS: Mutex<Vec<(u64, Refresh)>> = Mutex::new(Vec::new());
static NEXT_HOOK: AtomicU64 = AtomicU64::new(1);

fn hooks() -> std::sync::MutexGuard<'static, Vec<(u64, Refresh)>> {
    // Pushes and removals only: a panic elsewhere cannot leave it half-done.
    HOOKS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A registered refresh hook; dropping it unregisters the hook (so a stopped
/// server's state is not kept alive by the registry).
#[must_use = "the hook is removed when this is dropped"]
pub struct ScrapeHook {
    id: u64,
}

impl Drop for ScrapeHook {
    fn drop(&mut self) {
        hooks().retain(|(id, _)| *id != self.id);
    }
}

/// Runs `refresh` before every scrape, until the returned hook is dropped.
pub fn on_scrape<F, Fut>(refresh: F) -> ScrapeHook
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let id = NEXT_HOOK.fetch_add(1, Ordering::Relaxed);
    let refresh: Refresh = Arc::new(move || Box::pin(refresh()));
    hooks().push((id, refresh));
    ScrapeHook { id }
}

/// Refreshes every hooked gauge, then renders the whole registry in
/// Prometheus' text format.
pub async fn render() -> Result<String, String> {
    let refreshes: Vec<Refresh> = hooks().iter().map(|(_, r)| r.clone()).collect();
    for refresh in refreshes {
        if tokio::time::timeout(REFRESH_TIMEOUT, refresh())
            .await
            .is_err()
        {
            tracing::warn!("a metrics refresh took over 5 s; its gauges are stale");
        }
    }
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&prometheus::gather(), &mut out)
        .map_err(|e| e.to_string())?;
    String::from_utf8(out).map_err(|e| e.to_string())
}

/// `GET /metrics`, to merge into any axum router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics() -> Response {
    match render().await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

/// A served `/metrics` endpoint, stopped on [`MetricsServer::shutdown`].
pub struct MetricsServer {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl MetricsServer {
    /// Starts serving `/metrics` on `listener` (over TLS with `tls`), for
    /// roles with no HTTP API of their own.
    pub fn start(
        listener: tokio::net::TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<MetricsServer> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(crate::http::serve(listener, router::<()>(), tls, async {
            let _ = stopped.await;
        }));
        tracing::info!(%addr, "serving /metrics");
        Ok(MetricsServer { addr, stop, task })
    }

    /// Where it serves.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Stops serving.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "metrics server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "metrics server task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn hooks_refresh_before_rendering_and_stop_when_dropped() {
        let gauge = prometheus::IntGauge::new("dynseg_test_refreshed", "a test gauge").unwrap();
        prometheus::register(Box::new(gauge.clone())).unwrap();
        let calls = Arc::new(AtomicU64::new(0));
        let hook = {
            let (gauge, calls) = (gauge.clone(), calls.clone());
            on_scrape(move || {
                let (gauge, calls) = (gauge.clone(), calls.clone());
                async move {
                    gauge.set(calls.fetch_add(1, Ordering::Relaxed) as i64 + 41);
                }
            })
        };
        assert!(render().await.unwrap().contains("dynseg_test_refreshed 41"));
        assert!(render().await.unwrap().contains("dynseg_test_refreshed 42"));
        drop(hook);
        assert!(render().await.unwrap().contains("dynseg_test_refreshed 42"));
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }
}
