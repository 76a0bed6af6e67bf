//! Where every shard lives, as the control plane publishes it: a table the
//! topology task rebuilds on every change and publishes on a `watch` channel,
//! so request handlers read it without locks or waiting.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dynseg_proto::auth::Credentials;
use dynseg_proto::client::{self, Conn};
use dynseg_proto::encoded;
use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use dynseg_proto::pb::node_client::NodeClient;
use dynseg_proto::pb::watch_event::Kind;
use tokio::sync::{oneshot, watch};

/// One shard's owner.
#[derive(Clone, Debug)]
pub struct Owner {
    /// Node id.
    pub node: String,
    /// The epoch to present.
    pub epoch: u64,
}

/// The routing table at one control-plane revision.
#[derive(Clone, Debug, Default)]
pub struct Routing {
    /// The control-plane revision it reflects (0: nothing received yet).
    pub revision: u64,
    /// Number of shards (0 until the first topology arrives).
    pub shard_count: u32,
    /// Owner per shard (None: unplaced).
    pub shards: Vec<Option<Owner>>,
    /// A client per node, by node id.
    pub nodes: BTreeMap<String, NodeClient<Conn>>,
    /// A client per node on the same connection for ingest and change
    /// streams, where events and changes stay encoded: events go on as they
    /// arrived, changes come back as the node encoded them.
    pub encoded: BTreeMap<String, EncodedClient>,
    /// Each node's address, by node id.
    pub addresses: BTreeMap<String, String>,
    /// What this gateway presents to nodes.
    pub credentials: Credentials,
}

impl Routing {
    /// An empty table whose node clients will present `credentials`.
    pub fn new(credentials: Credentials) -> Routing {
        Routing {
            credentials,
            ..Routing::default()
        }
    }

    /// Whether every shard has an owner (the gateway can route anything).
    pub fn is_complete(&self) -> bool {
        self.shard_count > 0 && self.shards.iter().all(Option::is_some)
    }

    /// The owner of `shard`, if placed.
    pub fn placement(&self, shard: u32) -> Option<&Owner> {
        self.shards.get(shard as usize)?.as_ref()
    }

    /// The owner of `shard` and a client for it.
    pub fn owner(&self, shard: u32) -> Option<(&Owner, NodeClient<Conn>)> {
        let owner = self.placement(shard)?;
        let client = self.nodes.get(&owner.node)?.clone();
        Some((owner, client))
    }

    /// The shards each node owns.
    pub fn shards_by_node(&self) -> BTreeMap<String, Vec<u32>> {
        let mut by_node: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (shard, owner) in self.shards.iter().enumerate() {
            if let Some(owner) = owner {
                by_node
                    .entry(owner.node.clone())
                    .or_default()
                    .push(shard as u32);
            }
        }
        by_node
    }

    fn rebuild(&self, revision: u64, topology: &pb::Topology) -> Routing {
        let mut nodes = BTreeMap::new();
        let mut encoded = BTreeMap::new();
        for node in &topology.nodes {
            // Keep existing clients (and their connection) when the address is unchanged.
            let kept = match (self.nodes.get(&node.id), self.encoded.get(&node.id)) {
                (Some(api), Some(encoded))
                    if self.addresses.get(&node.id) == Some(&node.address) =>
                {
                    Some((api.clone(), encoded.clone()))
                }
                _ => None,
            };
            let Some((api, encoded_client)) =
                kept.or_else(|| node_clients(&node.address, &self.credentials))
            else {
                continue;
            };
            nodes.insert(node.id.clone(), api);
            encoded.insert(node.id.clone(), encoded_client);
        }
        let shards = topology
            .shards
            .iter()
            .map(|p| {
                (!p.node_id.is_empty()).then(|| Owner {
                    node: p.node_id.clone(),
                    epoch: p.epoch,
                })
            })
            .collect();
        Routing {
            revision,
            shard_count: topology.shard_count,
            shards,
            nodes,
            encoded,
            addresses: topology
                .nodes
                .iter()
                .map(|n| (n.id.clone(), n.address.clone()))
                .collect(),
            credentials: self.credentials.clone(),
        }
    }
}

/// A node's client for encoded events and changes (see [`Routing::encoded`]).
pub type EncodedClient = encoded::node_client::NodeClient<Conn>;

/// A node's two clients, on one lazily connected channel.
pub(crate) fn node_clients(
    address: &str,
    credentials: &Credentials,
) -> Option<(NodeClient<Conn>, EncodedClient)> {
    let endpoint = client::endpoint(address, credentials).ok()?;
    let channel = client::lazy(
        endpoint.connect_timeout(Duration::from_secs(1)),
        credentials.clone(),
    );
    Some((
        NodeClient::new(channel.clone()).max_decoding_message_size(64 << 20),
        EncodedClient::new(channel).max_decoding_message_size(64 << 20),
    ))
}

/// Registers this gateway, follows the control plane's `Watch` and publishes a new [`Routing`] on every
/// topology change; reconnects with a capped backoff. Ends when `stop` fires.
pub async fn follow_topology(
    control: String,
    me: pb::RegisterMemberRequest,
    publish: watch::Sender<Arc<Routing>>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            result = watch_once(&control, &me, &publish) => {
                if let Err(status) = result {
                    tracing::warn!(%control, %status, "topology watch lost; reconnecting");
                }
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn watch_once(
    control: &str,
    me: &pb::RegisterMemberRequest,
    publish: &watch::Sender<Arc<Routing>>,
) -> Result<(), tonic::Status> {
    let credentials = publish.borrow().credentials.clone();
    let channel = client::connect(control, credentials)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = ControlClient::new(channel).max_decoding_message_size(64 << 20);
    // Registered so operators see every gateway; re-registering is a no-op.
    client.register_member(me.clone()).await?;
    let mut stream = client
        .watch(pb::WatchRequest { from_revision: 0 })
        .await?
        .into_inner();
    while let Some(event) = stream.message().await? {
        let topology = match event.kind {
            Some(Kind::Snapshot(snapshot)) => snapshot.topology,
            Some(Kind::Topology(topology)) => Some(topology),
            _ => None,
        };
        if let Some(topology) = topology {
            let next = publish.borrow().rebuild(event.revision, &topology);
            publish.send_replace(Arc::new(next));
        }
    }
    Err(tonic::Status::unavailable("watch stream ended"))
}
