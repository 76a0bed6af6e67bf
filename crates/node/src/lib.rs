//! # dynseg-node: the shard node
//!
//! Work in progress.

pub mod commit;
pub mod shard;
pub mod store;
pub mod wal;
