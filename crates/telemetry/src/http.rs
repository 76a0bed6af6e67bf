//! Serving an HTTP router (`/metrics`, the gateway's tracking API) on a
//! listener, plain or over TLS. Plain is axum's own server; TLS is a small
//! accept loop: rustls handshake, then hyper (HTTP/1.1 or HTTP/2 by ALPN).

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Serves `router` on `listener` until `stop` resolves; over TLS with `tls`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let Some(tls) = tls else {
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            // Small answers must not wait out delayed ACKs.
            let _ = tcp.set_nodelay(true);
        });
        return axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    // Each connection is a task of this set: they end with the server.
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut stop => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // A connection that failed before accept (reset, fd limit)
                // is that connection's problem, not the server's.
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        connections.spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
}
