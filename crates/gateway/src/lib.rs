//! # dynseg-gateway: the cluster's front door
//!
//! Stateless: a gateway follows the control plane's placement and routes. Ingest
//! is split per shard and sent to each shard's owner with its epoch; redirects
//! (stale epoch, moved shard, restarting node) are retried as placement
//! changes; the client is acknowledged when every part is durable. Subscribe
//! merges every shard's change stream into one, resumable from a token on any
//! gateway. Lookups go to the owner (a user) or to every node (members, counts).
//!
//! | module | what it holds |
//! |---|---|
//! | [`routing`] | the routing table and the task that follows the control plane |
//! | [`ingest`] | splitting, sending with retries, merging replies |
//! | [`merge`] | identity merge: alias and identify fold one profile into another, exactly once |
//! | [`subscribe`] | resume tokens and the merged change stream |
//! | [`service`], [`server`] | the gRPC service and serving |
//! | [`http`] | the Segment-compatible HTTP API, `/healthz` and `/metrics` |
//! | [`metrics`] | Prometheus metrics: events, ack latency, HTTP answers, routing |
//! | [`admin`] | the control plane's admin API, forwarded |
//! | [`error`] | errors and their gRPC codes |

pub mod admin;
pub mod error;
pub mod http;
pub mod ingest;
pub mod local;
pub mod merge;
pub mod metrics;
pub mod routing;
pub mod server;
pub mod service;
pub mod subscribe;

pub use error::{GatewayError, HttpError};
pub use http::HttpConfig;
pub use local::{LocalNode, LocalNodeHandle};
pub use server::{GatewayConfig, GatewayServer};
