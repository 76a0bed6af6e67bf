//! # dynseg-control: the control plane
//!
//! What the whole cluster must agree on, replicated with Raft (raft-rs): segment
//! definitions and the cluster-wide rule-set version, the registered nodes and
//! gateways, the shard count, and the shard → node placement with per-shard
//! epochs. Every member serves the admin API; writes are forwarded to the leader
//! by raft; reads are linearizable (read index) unless asked stale; `Watch`
//! streams every committed change from a revision.
//!
//! ```text
//!  gRPC Control ──▶ ReplicaHandle ──bounded channel──▶ raft task (owns RawNode)
//!                        ▲                               │ Ready loop: send, persist
//!                        └──── watch<View> ◀── publish ──┘ (sled), apply, compact
//!  gRPC RaftPeer ──▶ step ──▶ raft task ──▶ Transport (one task per peer) ──▶ peers
//! ```
//!
//! | module | what it holds |
//! |---|---|
//! | [`state`], [`placement`] | the deterministic state machine; shard placement on a hash ring |
//! | [`storage`] | raft's `Storage` on sled: log, hard state, conf state, snapshots |
//! | [`replica`] | the raft task and the handle services use |
//! | [`transport`], [`faults`] | raft messages to peers; fault injection for tests |
//! | [`service`], [`wire`], [`server`] | gRPC services, their conversions, serving |
//! | [`metrics`] | Prometheus metrics: Raft status, placement |
//! | [`config`], [`error`], [`logger`] | settings; errors and gRPC codes; slog → tracing |

pub mod config;
pub mod error;
pub mod faults;
pub mod logger;
pub mod metrics;
pub mod moves;
pub mod placement;
pub mod replica;
pub mod server;
pub mod service;
pub mod state;
pub mod storage;
pub mod transport;
pub mod wire;

pub use config::ControlConfig;
pub use error::ControlError;
pub use faults::Faults;
pub use server::ControlServer;
