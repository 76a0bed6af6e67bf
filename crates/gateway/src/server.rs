//! Serving a gateway: the topology task, the gRPC listener and the optional
//! HTTP listener, started and stopped together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dynseg_proto::auth::{Access, AccessLayer, Credentials};
use dynseg_proto::encoded::gateway_server::GatewayServer as GatewayGrpc;
use dynseg_proto::pb;
use dynseg_proto::pb::control_server::ControlServer as ControlGrpc;
use dynseg_proto::serving;
use dynseg_telemetry::metrics::ScrapeHook;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::admin::AdminProxy;
use crate::http::{self, HttpConfig};
use crate::ingest::Ingestor;
use crate::local::LocalNodeHandle;
use crate::routing::{self, Routing};
use crate::service::GatewayService;

/// How a gateway runs.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// A control-plane member to follow.
    pub control: String,
    /// This gateway's id (default: `gateway-` and its port).
    pub id: Option<String>,
    /// The address clients reach it at (default: where it listens).
    pub advertise: Option<String>,
    /// Shard batches in flight at most, across all clients.
    pub max_inflight: usize,
    /// How long a batch is retried while its shard is redirected or its owner
    /// restarts, before the client gets UNAVAILABLE.
    pub retry_for: Duration,
    /// The HTTP API's limits and write keys (when it listens).
    pub http: HttpConfig,
    /// Who may call the gateway (open by default), and the cluster secret it
    /// presents to nodes and the control plane.
    pub access: Access,
    /// Bytes of one gRPC message a client may send (a larger one is refused
    /// with OUT_OF_RANGE before it is decoded).
    pub max_message_bytes: usize,
    /// A node in this process (`dynseg dev`), called directly rather than
    /// over the network.
    pub local_node: Option<LocalNodeHandle>,
}

impl GatewayConfig {
    /// Defaults: 1,024 batches in flight, 10 s of retries.
    pub fn new(control: impl Into<String>) -> GatewayConfig {
        GatewayConfig {
            control: control.into(),
            id: None,
            advertise: None,
            max_inflight: 1024,
            retry_for: Duration::from_secs(10),
            http: HttpConfig::default(),
            access: Access::open(),
            max_message_bytes: 64 << 20,
            local_node: None,
        }
    }
}

/// A running gateway.
pub struct GatewayServer {
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    routing: watch::Receiver<Arc<Routing>>,
    stop_topology: oneshot::Sender<()>,
    topology: JoinHandle<()>,
    stop_serving: oneshot::Sender<()>,
    serving: JoinHandle<Result<(), tonic::transport::Error>>,
    stop_http: Option<oneshot::Sender<()>>,
    /// Ends when the topology task drops the routing table's sender.
    health: JoinHandle<()>,
    metrics_hook: ScrapeHook,
    http: Option<JoinHandle<std::io::Result<()>>>,
}

impl GatewayServer {
    /// Starts a gateway serving gRPC on `listener`, and the HTTP API on
    /// `http_listener` if given.
    pub async fn start(
        config: GatewayConfig,
        listener: TcpListener,
        http_listener: Option<TcpListener>,
    ) -> std::io::Result<GatewayServer> {
        let addr = listener.local_addr()?;
        let credentials = Credentials::member(&config.access);
        let (publish, routing) = watch::channel(Arc::new(Routing::new(credentials.clone())));
        let (stop_topology, stopped) = oneshot::channel();
        let me = pb::RegisterMemberRequest {
            kind: pb::MemberKind::Gateway as i32,
            id: config
                .id
                .clone()
                .unwrap_or_else(|| format!("gateway-{}", addr.port())),
            address: config.advertise.clone().unwrap_or_else(|| addr.to_string()),
            weight: 0,
        };
        let topology = tokio::spawn(routing::follow_topology(
            config.control.clone(),
            me,
            publish,
            stopped,
        ));
        let ingestor = Ingestor::new(
            routing.clone(),
            config.max_inflight,
            config.retry_for,
            config.local_node.clone(),
        );
        let service = GatewayService::new(routing.clone(), ingestor.clone());
        let (stop_serving, stop) = oneshot::channel::<()>();
        let admin = AdminProxy::new(&config.control, credentials)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let router = serving::builder(&config.access, false)?
            .layer(dynseg_telemetry::traces::TraceLayer)
            .layer(AccessLayer::new(config.access.clone()))
            .add_service(
                GatewayGrpc::new(service).max_decoding_message_size(config.max_message_bytes),
            )
            .add_service(
                ControlGrpc::new(admin).max_decoding_message_size(config.max_message_bytes),
            );
        let (router, health) = serving::add_standard_services(
            router,
            &[
                dynseg_proto::pb::gateway_server::SERVICE_NAME,
                dynseg_proto::pb::control_server::SERVICE_NAME,
            ],
        )
        .await?;
        // NOT_SERVING until every shard has an owner: a load balancer or
        // Kubernetes readiness probe then sends no traffic it would refuse.
        health.set(serving::ServingStatus::NotServing).await;
        let health = tokio::spawn(report_health(routing.clone(), health));
        let routing_for_metrics = routing.clone();
        let serving = tokio::spawn(router.serve_with_incoming_shutdown(
            serving::incoming(listener),
            async {
                let _ = stop.await;
            },
        ));
        let (http_addr, stop_http, http) = match http_listener {
            Some(listener) => {
                let http_addr = listener.local_addr()?;
                let router = http::router(
                    ingestor,
                    routing.clone(),
                    config.http.clone(),
                    &config.access,
                );
                let (stop_http, stop) = oneshot::channel::<()>();
                let tls = serving::http_tls(&config.access)?;
                let serving = tokio::spawn(dynseg_telemetry::http::serve(
                    listener,
                    router,
                    tls,
                    async {
                        let _ = stop.await;
                    },
                ));
                tracing::info!(addr = %http_addr, "gateway HTTP API serving");
                (Some(http_addr), Some(stop_http), Some(serving))
            }
            None => (None, None, None),
        };
        tracing::info!(%addr, control = %config.control, "gateway serving");
        Ok(GatewayServer {
            addr,
            http_addr,
            stop_http,
            http,
            routing,
            stop_topology,
            topology,
            stop_serving,
            serving,
            health,
            metrics_hook: crate::metrics::hook(routing_for_metrics),
        })
    }

    /// Where it serves gRPC.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where it serves HTTP, if it does.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Waits until the gateway has a placement for every shard (or `timeout`).
    pub async fn ready(&self, timeout: Duration) -> bool {
        let mut routing = self.routing.clone();
        let placed = routing.wait_for(|r| r.is_complete());
        matches!(tokio::time::timeout(timeout, placed).await, Ok(Ok(_)))
    }

    /// Stops serving, then stops following the control plane.
    pub async fn shutdown(self) {
        drop(self.metrics_hook);
        if let Some(stop) = self.stop_http {
            let _ = stop.send(());
        }
        if let Some(http) = self.http {
            match http.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "gateway HTTP server ended with an error"),
                Err(e) => tracing::warn!(error = %e, "gateway HTTP server task failed"),
            }
        }
        let _ = self.stop_serving.send(());
        let _ = self.stop_topology.send(());
        let _ = self.topology.await;
        let _ = self.health.await;
        match self.serving.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "gateway server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "gateway server task failed"),
        }
    }
}

/// Keeps the gRPC health status in step with placement: SERVING while every
/// shard has an owner.
async fn report_health(mut routing: watch::Receiver<Arc<Routing>>, health: serving::Health) {
    loop {
        let placed = routing.borrow_and_update().is_complete();
        let status = if placed {
            serving::ServingStatus::Serving
        } else {
            serving::ServingStatus::NotServing
        };
        health.set(status).await;
        if routing.changed().await.is_err() {
            return;
        }
    }
}
