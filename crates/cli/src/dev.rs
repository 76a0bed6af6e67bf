//! The whole cluster in one process: one control member, one node serving every
//! shard, one gateway; storage under one directory, so a restart resumes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use dynseg_control::{ControlConfig, ControlServer};
use dynseg_gateway::local::BoxFuture;
use dynseg_gateway::{GatewayConfig, GatewayServer, HttpConfig, LocalNode, LocalNodeHandle};
use dynseg_node::control_link::{ControlLink, LinkConfig};
use dynseg_node::service::NodeService;
use dynseg_node::{Clock, NodeConfig};
use dynseg_proto::BatchRef;
use dynseg_proto::auth::{Access, Credentials, TokenStore, random_token};
use dynseg_proto::pb;
use dynseg_proto::tls::Tls;
use tokio::net::TcpListener;

/// The id of the dev cluster's one node.
const NODE_ID: &str = "node-1";

/// The node as the gateway calls it in this process: its service's own
/// `IngestShards`, without a network hop (the placement still names it, so
/// epochs and refusals work as between processes).
struct InProcessNode(NodeService);

impl LocalNode for InProcessNode {
    fn ingest_shards<'a>(
        &'a self,
        batches: &'a [BatchRef<'a>],
    ) -> BoxFuture<'a, Result<pb::ShardBatchResults, tonic::Status>> {
        Box::pin(self.0.ingest_batches(batches))
    }
}

/// A running dev cluster.
pub struct DevCluster {
    /// The control member's address.
    pub control: SocketAddr,
    /// The node's address.
    pub node: SocketAddr,
    /// The gateway's address (what clients use).
    pub gateway: SocketAddr,
    /// The gateway's HTTP API (Segment-compatible tracking).
    pub http: SocketAddr,
    control_server: ControlServer,
    node_server: dynseg_node::Server,
    link: ControlLink,
    gateway_server: GatewayServer,
}

async fn bind(port: u16) -> Result<TcpListener, String> {
    TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port}: {e}"))
}

/// How a dev cluster runs.
pub struct DevOptions {
    /// Ports `base_port`, `+1`, `+2`, `+3`: control, node, gateway, gateway
    /// HTTP (0: any free ports).
    pub base_port: u16,
    /// The node's clock.
    pub clock: Clock,
    /// Shards in the cluster.
    pub shard_count: u32,
    /// The gateway's HTTP API.
    pub http: HttpConfig,
    /// Tokens to enforce (none: open).
    pub tokens: Option<TokenStore>,
    /// Serve TLS with a self-signed certificate kept under `DATA/tls`.
    pub tls: bool,
    /// How long the node keeps its change log (and so segment history);
    /// `None`: the node's default, 7 days.
    pub change_retention: Option<dynseg_rules::Span>,
    /// The gateway hands ingest batches to the node in this process directly
    /// (true, the default); false sends them over loopback gRPC, as between
    /// processes (what the trace propagation test exercises).
    pub direct_ingest: bool,
}

impl DevOptions {
    /// Defaults: free ports, 64 shards, open, no TLS.
    pub fn new(clock: Clock) -> DevOptions {
        DevOptions {
            base_port: 0,
            clock,
            shard_count: 64,
            http: HttpConfig::default(),
            tokens: None,
            tls: false,
            change_retention: None,
            direct_ingest: true,
        }
    }
}

/// The self-signed pair of a dev cluster with `--tls`: made once, kept under
/// `DATA/tls` so clients keep trusting it across restarts.
fn dev_tls(data: &Path) -> Result<Tls, String> {
    let dir = data.join("tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if let (Ok(cert), Ok(key)) = (std::fs::read(&cert), std::fs::read(&key)) {
        return Ok(Tls::from_pem(cert, key, None, true));
    }
    let tls = Tls::self_signed(&["localhost", "127.0.0.1"], true)?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(&cert, tls.cert_pem()).map_err(|e| format!("{}: {e}", cert.display()))?;
    std::fs::write(&key, tls.key_pem()).map_err(|e| format!("{}: {e}", key.display()))?;
    Ok(tls)
}

impl DevCluster {
    /// Starts the cluster under `data` and waits until every shard is placed
    /// and served.
    pub async fn start(data: &Path, options: DevOptions) -> Result<DevCluster, String> {
        let DevOptions {
            base_port,
            clock,
            shard_count,
            http,
            tokens,
            tls,
            change_retention,
            direct_ingest,
        } = options;
        // With tokens, the roles in this process call each other with a
        // cluster secret made for this run.
        let access = match tokens {
            Some(tokens) => {
                let secret = random_token().map_err(|e| format!("cluster secret: {e}"))?;
                Access::new(Some(tokens), Some(secret))
            }
            None => Access::open(),
        };
        let access = if tls {
            access.with_tls(Some(dev_tls(data)?))
        } else {
            access
        };
        let port = |offset: u16| {
            if base_port == 0 {
                0
            } else {
                base_port + offset
            }
        };
        let control_listener = bind(port(0)).await?;
        let control = control_listener.local_addr().map_err(|e| e.to_string())?;
        let mut control_config = ControlConfig::new(1, data.join("control"));
        control_config.peers = BTreeMap::from([(1, control.to_string())]);
        control_config.cluster_secret = access.cluster_secret().map(str::to_owned);
        control_config.access = access.clone();
        let control_server = ControlServer::start(control_config, control_listener)
            .await
            .map_err(|e| format!("control plane: {e}"))?;
        set_shard_count(control, shard_count, &access).await?;

        let node_listener = bind(port(1)).await?;
        let node_addr = node_listener.local_addr().map_err(|e| e.to_string())?;
        drop(node_listener);
        let mut node_config = NodeConfig::new(data.join("node"), node_addr, clock);
        node_config.node_id = NODE_ID.into();
        node_config.shard_count = shard_count;
        node_config.shards = Vec::new();
        node_config.access = access.clone();
        if let Some(span) = change_retention {
            node_config.shard.change_retention = span;
        }
        let node_server = dynseg_node::Server::start(node_config)
            .await
            .map_err(|e| format!("node: {e}"))?;
        let link = ControlLink::spawn(
            node_server.node.clone(),
            LinkConfig::new(control.to_string(), node_server.addr.to_string()),
        );

        let gateway_listener = bind(port(2)).await?;
        let http_listener = bind(port(3)).await?;
        let mut gateway_config = GatewayConfig::new(control.to_string());
        gateway_config.http = http;
        gateway_config.access = access;
        gateway_config.local_node = direct_ingest.then(|| LocalNodeHandle {
            id: NODE_ID.into(),
            node: std::sync::Arc::new(InProcessNode(NodeService::new(node_server.node.clone()))),
        });
        let gateway_server =
            GatewayServer::start(gateway_config, gateway_listener, Some(http_listener))
                .await
                .map_err(|e| format!("gateway: {e}"))?;
        let http = gateway_server
            .http_addr()
            .ok_or("gateway: the HTTP API did not start")?;
        let cluster = DevCluster {
            control,
            node: node_server.addr,
            gateway: gateway_server.addr(),
            http,
            control_server,
            node_server,
            link,
            gateway_server,
        };
        cluster.wait_ready(shard_count).await?;
        Ok(cluster)
    }

    async fn wait_ready(&self, shard_count: u32) -> Result<(), String> {
        if !self.gateway_server.ready(Duration::from_secs(30)).await {
            return Err("the gateway got no placement within 30 s".into());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.node_server.node.serving().len() < shard_count as usize {
            if tokio::time::Instant::now() > deadline {
                return Err("the node did not take its shards within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops the gateway, the node (checkpointing) and the control member.
    pub async fn shutdown(self) {
        self.gateway_server.shutdown().await;
        self.link.shutdown().await;
        self.node_server.shutdown().await;
        self.control_server.shutdown().await;
    }
}

/// Sets the shard count on a new cluster; a cluster that already has one keeps it
/// (a mismatch is reported).
async fn set_shard_count(
    control: SocketAddr,
    shard_count: u32,
    access: &Access,
) -> Result<(), String> {
    use dynseg_proto::pb;
    let channel = dynseg_proto::client::connect(&control.to_string(), Credentials::member(access))
        .await
        .map_err(|e| e.to_string())?;
    let mut client = pb::control_client::ControlClient::new(channel);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let topology = client.get_topology(pb::ReadOptions { stale: false }).await;
        match topology {
            Ok(t) => {
                let topology = t.into_inner().topology.unwrap_or_default();
                if topology.shard_count == shard_count {
                    return Ok(());
                }
                if !topology.nodes.is_empty() {
                    return Err(format!(
                        "this data directory holds a cluster of {} shards, not {shard_count}",
                        topology.shard_count
                    ));
                }
                client
                    .set_shard_count(pb::SetShardCountRequest { shard_count })
                    .await
                    .map_err(|e| e.message().to_owned())?;
                return Ok(());
            }
            // The group of one elects itself within a second or so.
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => return Err(format!("control plane: {}", status.message())),
        }
    }
}
