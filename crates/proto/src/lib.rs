//! # dynseg-proto: the gRPC API of dynseg
//!
//! - [`pb`]: the messages and services of package `dynseg.v1`, generated from
//!   `proto/dynseg/v1/*.proto` at build time.
//! - [`convert`]: the one place wire types become domain types (`TryFrom`, which
//!   rejects malformed input with a reason) and domain types become wire types.
//! - [`encoded`]: the ingest messages with each event left encoded, the
//!   servers that take them, and [`encoded::EventView`], which reads an
//!   encoded event in place.
//! - [`routing`]: which shard a user belongs to.
//! - [`history`]: segment size history: intervals, per-shard points, sums.
//! - [`auth`]: roles, token stores, the access check every server runs, and
//!   the credentials every client presents.
//! - [`client`]: addresses to channels that present credentials.
//! - [`tls`]: TLS on every listener, mutual between members.
//! - [`serving`]: what every dynseg gRPC server shares: health, reflection,
//!   accepted connections.

pub mod auth;
pub mod batch;
pub mod client;
pub mod convert;
pub mod encoded;
pub mod history;
pub mod routing;
pub mod serving;
pub mod tls;

/// Generated code for package `dynseg.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("dynseg.v1");
}

pub use batch::BatchRef;
pub use convert::ConvertError;
pub use routing::{shard_for, shard_for_bytes};
