//! [`BatchRef`]: one shard's batch of events, borrowed.

use crate::pb;

/// One shard's batch of events, borrowed: how a gateway hands batches to a
/// node in its own process (`dynseg dev`) and how the node's service reads
/// the batches it received. The sender keeps its events, to resend a refused
/// batch, without having copied them.
#[derive(Clone, Copy, Debug)]
pub struct BatchRef<'a> {
    /// The shard the events are for.
    pub shard: u32,
    /// The shard's epoch as the sender knows it.
    pub epoch: u64,
    /// The events.
    pub events: &'a [pb::Event],
}

impl<'a> BatchRef<'a> {
    /// Borrows a batch.
    pub fn of(batch: &'a pb::EventBatch) -> BatchRef<'a> {
        BatchRef {
            shard: batch.shard,
            epoch: batch.epoch,
            events: &batch.events,
        }
    }
}
