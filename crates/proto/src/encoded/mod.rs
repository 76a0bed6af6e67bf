//! Messages that carry events still encoded, and the node's and gateway's
//! services over them.
//!
//! `EventBatch`, `ShardBatches` and `IngestRequest` here have the same fields
//! and wire format as their `pb` namesakes, except that each event is its
//! encoded bytes (`repeated Event` and `repeated bytes` are both written as
//! length-delimited fields). Decoding one from a gRPC request slices the
//! request's buffer, one reference-counted `Bytes` per event, with no copy;
//! the gateway forwards those bytes to the nodes and the node logs them.
//! Events are read with [`EventView`].
//!
//! Changes go the other way the same way: the node's `Subscribe` and
//! `SubscribeBatches` send each change as the bytes it encoded once, when the
//! change was published ([`EncodedChange`], [`ChangeBatch`]), and read what
//! they filter by with [`ChangeView`]; the gateway's `Subscribe` passes those
//! bytes on ([`GatewayChange`]), reading only each change's cursor.
//!
//! Servers use the services generated here ([`node_server`],
//! [`gateway_server`]); the gateway sends batches with [`node_client`], and
//! `dynseg bench` sends events it wrote with [`EventWriter`] through
//! [`gateway_client`]. Every other client keeps the typed `pb` messages: both
//! speak the same protocol.

mod change;
mod event;
mod wire;
mod writer;

use bytes::Bytes;
use prost::Message;

pub use change::{ChangeBatch, ChangeView, EncodedChange, GatewayChange};
pub use event::{EventView, RouteView};
pub use writer::{EventWriter, ScalarRef};

use crate::pb;

#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/encoded/dynseg.v1.rs"));
}

pub use generated::{gateway_client, gateway_server, node_client, node_server};

/// `dynseg.v1.EventBatch` with its events encoded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EventBatch {
    /// The shard the events are for.
    #[prost(uint32, tag = "1")]
    pub shard: u32,
    /// The shard's epoch as the sender knows it.
    #[prost(uint64, tag = "2")]
    pub epoch: u64,
    /// Each event's encoding.
    #[prost(bytes = "bytes", repeated, tag = "3")]
    pub events: Vec<Bytes>,
}

/// `dynseg.v1.ShardBatches` with its events encoded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ShardBatches {
    /// The batches, one per shard.
    #[prost(message, repeated, tag = "1")]
    pub batches: Vec<EventBatch>,
}

/// `dynseg.v1.IngestRequest` with its events encoded.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IngestRequest {
    /// Each event's encoding.
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub events: Vec<Bytes>,
}

/// An event's encoding.
pub fn encode(event: &pb::Event) -> Bytes {
    event.encode_to_vec().into()
}

/// The domain event an encoded event holds (see [`EventView::to_event`]).
pub fn decode_event(bytes: &[u8]) -> Result<dynseg_rules::Event, crate::ConvertError> {
    EventView::parse(bytes)?.to_event()
}

impl From<&pb::EventBatch> for EventBatch {
    fn from(batch: &pb::EventBatch) -> Self {
        EventBatch {
            shard: batch.shard,
            epoch: batch.epoch,
            events: batch.events.iter().map(encode).collect(),
        }
    }
}

#[cfg(test)]
mod tests;
