//! [`BatchRef`]: one shard's batch of events, borrowed.

use bytes::Bytes;

use crate::encoded;

/// One shard's batch of encoded events, borrowed: how a gateway hands batches
/// to a node in its own process (`dynseg dev`) and how the node's service
/// reads the batches it received. The sender keeps its events, to resend a
/// refused batch, without having copied them.
#[derive(Clone, Copy, Debug)]
pub struct BatchRef<'a> {
    /// The shard the events are for.
    pub shard: u32,
    /// The shard's epoch as the sender knows it.
    pub epoch: u64,
    /// Each event's encoding (a `dynseg.v1.Event`).
    pub events: &'a [Bytes],
}

impl<'a> BatchRef<'a> {
    /// Borrows a batch.
    pub fn of(batch: &'a encoded::EventBatch) -> BatchRef<'a> {
        BatchRef {
            shard: batch.shard,
            epoch: batch.epoch,
            events: &batch.events,
        }
    }
}
