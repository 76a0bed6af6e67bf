//! What the write-ahead log records: the inputs of a shard, each with the `now` it
//! was applied at, so that replay applies them exactly as they were applied.

use dynseg_proto::pb;
use prost::Message;

/// One log record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WalRecord {
    /// The shard the input is for.
    #[prost(uint32, tag = "1")]
    pub shard: u32,
    /// The node's clock when the shard applied it (milliseconds).
    #[prost(int64, tag = "2")]
    pub now_ms: i64,
    /// The input.
    #[prost(oneof = "Input", tags = "3, 4, 5, 6, 7, 8")]
    pub input: Option<Input>,
}

/// A shard input.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Input {
    /// Validated events (rejected ones are not logged).
    #[prost(message, tag = "3")]
    Batch(pb::EventBatch),
    /// Time moved to `now_ms`: due wake-ups fire.
    #[prost(message, tag = "4")]
    Tick(Tick),
    /// A new rule set.
    #[prost(message, tag = "5")]
    Rules(pb::ApplyRulesRequest),
    /// The shard arrived from another node with everything before this record
    /// in its checkpoint: replay starts after it.
    #[prost(message, tag = "6")]
    MovedIn(Tick),
    /// Identity merge: a profile's state taken out.
    #[prost(message, tag = "7")]
    MergeOut(pb::MergeOutRequest),
    /// Identity merge: a state folded into a profile.
    #[prost(message, tag = "8")]
    MergeIn(pb::MergeInRequest),
}

/// A clock tick (no fields: the record's `now_ms` is the time).
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Tick {}

impl WalRecord {
    /// The record's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }
}
