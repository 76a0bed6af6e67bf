//! Serving one control member: its raft task and its gRPC listener, started
//! together and stopped together.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use dynseg_proto::auth::AccessLayer;
use dynseg_proto::pb::control_server::ControlServer as ControlGrpc;
use dynseg_proto::pb::raft_peer_server::RaftPeerServer;
use dynseg_proto::serving;
use dynseg_telemetry::metrics::{MetricsServer, ScrapeHook};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::ControlConfig;
use crate::error::ControlError;
use crate::metrics;
use crate::replica::{self, ReplicaHandle, ReplicaTask};
use crate::service::ControlService;

/// Largest raft message accepted from a member: snapshots of the state
/// machine travel in one message. (The Control API's bound is configurable.)
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A running control member.
pub struct ControlServer {
    addr: SocketAddr,
    replica: ReplicaHandle,
    replica_task: ReplicaTask,
    stop: oneshot::Sender<()>,
    serve: JoinHandle<Result<(), tonic::transport::Error>>,
    metrics_hook: ScrapeHook,
    metrics_server: Option<MetricsServer>,
}

impl ControlServer {
    /// Starts a member serving on `listener` (bind it first, so tests can use
    /// port 0 and tell every member the others' addresses).
    pub async fn start(
        config: ControlConfig,
        listener: TcpListener,
    ) -> Result<ControlServer, ControlError> {
        let addr = listener
            .local_addr()
            .map_err(|e| ControlError::InvalidArgument(format!("listener: {e}")))?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                ControlError::InvalidArgument(format!("cannot listen on {addr} for /metrics: {e}"))
            })?),
            None => None,
        };
        let (replica, replica_task) = replica::start(&config)?;
        let metrics_hook = metrics::hook(replica.clone());
        let metrics_server = match metrics_listener {
            Some(listener) => Some(
                serving::http_tls(&config.access)
                    .and_then(|tls| MetricsServer::start(listener, tls))
                    .map_err(|e| ControlError::InvalidArgument(format!("/metrics: {e}")))?,
            ),
            None => None,
        };
        let service = ControlService::new(
            replica.clone(),
            config.peers.keys().copied().collect::<BTreeSet<_>>(),
            config.cluster_secret.as_deref(),
            config.rule_limits.clone(),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let router = serving::builder(&config.access, true)
            .map_err(|e| ControlError::InvalidArgument(e.to_string()))?
            .layer(dynseg_telemetry::traces::TraceLayer)
            .layer(AccessLayer::new(config.access.clone()))
            .add_service(
                ControlGrpc::new(service.clone())
                    .max_decoding_message_size(config.max_message_bytes),
            )
            .add_service(RaftPeerServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES));
        let (router, _health) = serving::add_standard_services(
            router,
            &[
                dynseg_proto::pb::control_server::SERVICE_NAME,
                dynseg_proto::pb::raft_peer_server::SERVICE_NAME,
            ],
        )
        .await
        .map_err(|e| ControlError::InvalidArgument(format!("gRPC services: {e}")))?;
        let serve = tokio::spawn(router.serve_with_incoming_shutdown(
            serving::incoming(listener),
            async {
                let _ = stopped.await;
            },
        ));
        tracing::info!(member = config.id, %addr, "control member serving");
        Ok(ControlServer {
            addr,
            replica,
            replica_task,
            stop,
            serve,
            metrics_hook,
            metrics_server,
        })
    }

    /// Where it serves.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its replica (for in-process callers and tests).
    pub fn replica(&self) -> &ReplicaHandle {
        &self.replica
    }

    /// Stops serving (open streams end), then stops raft and syncs storage.
    pub async fn shutdown(self) {
        if let Some(metrics) = self.metrics_server {
            metrics.shutdown().await;
        }
        drop(self.metrics_hook);
        let _ = self.stop.send(());
        self.replica_task.shutdown().await;
        match self.serve.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "control server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "control server task failed"),
        }
    }
}
