//! Running a node as a gRPC server until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;

use dynseg_proto::auth::AccessLayer;
use dynseg_proto::serving;
use dynseg_telemetry::metrics::{MetricsServer, ScrapeHook};
use tokio::net::TcpListener;

use crate::config::NodeConfig;
use crate::error::NodeError;
use crate::metrics;
use crate::runtime::{Node, NodeGuard};
use crate::service::NodeService;
use crate::webhooks::{self, Dispatcher};

/// A node serving gRPC.
pub struct Server {
    /// The node.
    pub node: Node,
    /// Where it listens (with the port picked when the config said 0).
    pub addr: SocketAddr,
    guard: NodeGuard,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    metrics_hook: ScrapeHook,
    metrics_server: Option<MetricsServer>,
    webhooks: Dispatcher,
}

impl Server {
    /// Starts the node (recovering its data) and its gRPC server.
    pub async fn start(config: NodeConfig) -> Result<Server, NodeError> {
        let listener = TcpListener::bind(config.listen).await.map_err(|e| {
            NodeError::Unavailable(format!("cannot listen on {}: {e}", config.listen))
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| NodeError::Unavailable(e.to_string()))?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                NodeError::Unavailable(format!("cannot listen on {addr} for /metrics: {e}"))
            })?),
            None => None,
        };
        let webhook_ca = match &config.webhook_ca {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                NodeError::Invalid(format!("--webhook-ca {}: {e}", path.display()))
            })?),
            None => None,
        };
        let webhook_tls =
            webhooks::client_tls(webhook_ca.as_deref()).map_err(NodeError::Invalid)?;
        let (node, guard) = Node::start(config).await?;
        let webhooks = Dispatcher::spawn(node.clone(), webhook_tls);
        let metrics_hook = metrics::hook(node.clone());
        let metrics_server = match metrics_listener {
            Some(listener) => Some(
                serving::http_tls(&node.config().access)
                    .and_then(|tls| MetricsServer::start(listener, tls))
                    .map_err(|e| NodeError::Unavailable(format!("/metrics: {e}")))?,
            ),
            None => None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = NodeService::new(node.clone()).into_server();
        let router = serving::builder(&node.config().access, true)
            .map_err(|e| NodeError::Unavailable(e.to_string()))?
            .layer(dynseg_telemetry::traces::TraceLayer)
            .layer(AccessLayer::new(node.config().access.clone()))
            .add_service(service);
        let (router, _health) =
            serving::add_standard_services(router, &[dynseg_proto::pb::node_server::SERVICE_NAME])
                .await
                .map_err(|e| NodeError::Unavailable(e.to_string()))?;
        let serving = tokio::spawn(router.serve_with_incoming_shutdown(
            serving::incoming(listener),
            async {
                let _ = stopped.await;
            },
        ));
        tracing::info!(%addr, "serving gRPC");
        Ok(Server {
            node,
            addr,
            guard,
            stop,
            serving,
            metrics_hook,
            metrics_server,
            webhooks,
        })
    }

    /// Stops accepting requests, then shuts the node down cleanly.
    pub async fn shutdown(self) {
        if let Some(metrics) = self.metrics_server {
            metrics.shutdown().await;
        }
        drop(self.metrics_hook);
        self.webhooks.shutdown().await;
        self.node.close_subscriptions().await;
        let _ = self.stop.send(());
        let _ = self.serving.await;
        self.guard.shutdown().await;
    }
}

/// Runs a node until `signal` resolves, then shuts it down cleanly.
pub async fn run(config: NodeConfig, signal: impl Future<Output = ()>) -> Result<(), NodeError> {
    let server = Server::start(config).await?;
    signal.await;
    server.shutdown().await;
    Ok(())
}

/// Runs a node until `signal`, following the control plane when `link` is given
/// (its advertised address defaults to where the node listens). `on_ready` gets
/// the address once the node serves.
pub async fn run_linked(
    config: NodeConfig,
    link: Option<crate::control_link::LinkConfig>,
    on_ready: impl FnOnce(SocketAddr),
    signal: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let server = Server::start(config).await?;
    on_ready(server.addr);
    let link = link.map(|mut link| {
        if link.advertise.is_empty() || link.advertise.ends_with(":0") {
            link.advertise = server.addr.to_string();
        }
        let timeout = link.drain_timeout;
        (
            crate::control_link::ControlLink::spawn(server.node.clone(), link),
            timeout,
        )
    });
    signal.await;
    if let Some((mut link, timeout)) = link {
        if !link.wait_drained(timeout).await {
            tracing::warn!(
                "stopping before the drain finished: the shards still here are unavailable until this node restarts"
            );
        }
        link.shutdown().await;
    }
    server.shutdown().await;
    Ok(())
}
