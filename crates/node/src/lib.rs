//! # dynseg-node: the shard node
//!
//! A node owns shards. Each shard is one task that owns its users' states and
//! applies their events with the rule engine; every input is written to the
//! node's write-ahead log and acknowledged once durable; membership changes go
//! to a per-shard change log that subscribers follow from a cursor.
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`], [`clock`], [`args`] | settings; the node's one clock (system or manual); the command line |
//! | [`validate`] | bounds on incoming events |
//! | [`wal`], [`commit`], [`record`] | the write-ahead log, group commit, what it records |
//! | [`store`] | sled: checkpoints, retained events, change log |
//! | [`shard`] | the deterministic per-shard state machine |
//! | `seen` | a user's recent message ids, for dedupe: a small hash table |
//! | `tail_search` | searching sorted runs from their warm end |
//! | [`changelog`] | published changes and how subscribers follow them |
//! | [`runtime`] | shard tasks, recovery, checkpoints, the [`Node`] handle |
//! | `insight` | segment size history from the change logs; explanations of one user |
//! | [`service`], [`transfer`], [`server`] | gRPC service, shard export/import, serving |
//! | [`moves`] | live shard moves: both ends of the protocol |
//! | [`metrics`] | Prometheus metrics: ingest, changes, segment sizes, actors, storage |
//! | [`webhooks`] | delivering each segment's changes to its HTTP endpoints, signed, at least once, in order |
//! | [`control_link`] | following the control plane: rule versions, placement, moves in, heartbeats |
//! | [`error`] | errors and their gRPC codes |

pub mod args;
pub mod changelog;
pub mod clock;
pub mod commit;
pub mod config;
pub mod control_link;
pub mod error;
mod insight;
pub mod metrics;
pub mod moves;
pub mod record;
pub mod runtime;
mod seen;
pub mod server;
pub mod service;
pub mod shard;
pub mod store;
mod tail_search;
pub mod transfer;
pub mod validate;
pub mod wal;
pub mod webhooks;

pub use clock::Clock;
pub use config::NodeConfig;
pub use error::NodeError;
pub use runtime::{Node, NodeGuard};
pub use server::{Server, run};
