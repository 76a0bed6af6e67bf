//! How a node is set up.

use std::net::SocketAddr;
use std::path::PathBuf;

use dynseg_rules::{Limits, Span};

use crate::clock::Clock;
use crate::shard::ShardConfig;
use crate::validate::EventLimits;

/// Settings of one node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The node's name in the cluster.
    pub node_id: String,
    /// gRPC listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Where to serve `/metrics` over HTTP, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Who may call the node (open by default), and the cluster secret its
    /// own calls to other members present.
    pub access: dynseg_proto::auth::Access,
    /// Directory of the write-ahead log and the store.
    pub data_dir: PathBuf,
    /// Shards in the cluster (a cluster setting: users hash to one of these).
    pub shard_count: u32,
    /// Shards this node serves at start, with their epochs, when they have no
    /// stored epoch of their own.
    pub shards: Vec<(u32, u64)>,
    /// Where `now` comes from.
    pub clock: Clock,
    /// Per-shard retention and dedupe settings.
    pub shard: ShardConfig,
    /// Bounds on incoming events.
    pub event_limits: EventLimits,
    /// Bounds on rules.
    pub rule_limits: Limits,
    /// Memory for active users, in bytes, across all shards; least recently used
    /// users beyond it are passivated to the store at checkpoints. The default,
    /// 1 GiB, holds about a million users of the SPEC segments.
    pub memory_budget: usize,
    /// Bound on sled's page cache, in bytes. Active users live in the shards'
    /// memory, so the store's cache mostly serves passivated users and history.
    pub store_cache_bytes: u64,
    /// How often shards checkpoint (and the write-ahead log is truncated).
    pub checkpoint_every: std::time::Duration,
    /// Size of one write-ahead log segment.
    pub wal_segment_bytes: u64,
    /// With the system clock: the longest a due wake-up waits to be processed.
    pub tick_every: std::time::Duration,
    /// PEM certificates https webhook endpoints may chain to, besides the
    /// system's roots.
    pub webhook_ca: Option<PathBuf>,
}

impl NodeConfig {
    /// A single node serving every shard, with defaults.
    pub fn new(data_dir: PathBuf, listen: SocketAddr, clock: Clock) -> NodeConfig {
        let shard_count = 256;
        NodeConfig {
            node_id: "node-1".into(),
            listen,
            metrics_listen: None,
            access: dynseg_proto::auth::Access::open(),
            data_dir,
            shard_count,
            shards: (0..shard_count).map(|s| (s, 1)).collect(),
            clock,
            shard: ShardConfig::default(),
            event_limits: EventLimits::default(),
            rule_limits: Limits::default(),
            memory_budget: 1 << 30,
            store_cache_bytes: 64 << 20,
            checkpoint_every: std::time::Duration::from_secs(10),
            wal_segment_bytes: 64 << 20,
            tick_every: std::time::Duration::from_millis(250),
            webhook_ca: None,
        }
    }

    /// Longest allowed distance of an event into the future.
    pub fn max_future_skew(&self) -> Span {
        self.event_limits.max_future_skew
    }
}
