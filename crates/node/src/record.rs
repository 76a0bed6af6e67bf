//! What the write-ahead log records: the inputs of a shard, each with the `now` it
//! was applied at, so that replay applies them exactly as they were applied.

use bytes::Bytes;
use dynseg_proto::{encoded, pb};
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
    /// Validated events (rejected ones are not logged), each as it arrived.
    #[prost(message, tag = "3")]
    Batch(encoded::EventBatch),
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

    /// Decodes a record from its bytes, copied once: a batch's events are
    /// slices of that copy (decoded from a borrowed slice, each event would
    /// be copied on its own).
    pub fn from_slice(payload: &[u8]) -> Result<WalRecord, prost::DecodeError> {
        WalRecord::from_shared(Bytes::copy_from_slice(payload))
    }

    /// Decodes a record from bytes it shares.
    pub fn from_shared(payload: Bytes) -> Result<WalRecord, prost::DecodeError> {
        WalRecord::decode(payload)
    }
}

/// Room left before an encoded batch for its log record's header: the keys
/// and varints of `shard` (up to 6 bytes), `now_ms` (11) and the batch's
/// length (6).
const RECORD_HEADER_ROOM: usize = 23;

/// Encodes an `EventBatch` from borrowed encoded events: ingest logs the
/// events it was given as they arrived, copied once, never decoded into a
/// message and encoded again.
///
/// The buffer starts with room for the header of the log record that will
/// carry the batch, so the record is the same buffer (see
/// [`EncodedBatch::into_record`]): the events are not copied a second time.
pub struct BatchEncoder {
    buf: Vec<u8>,
    events_at: usize,
}

impl BatchEncoder {
    /// A batch for `shard` at `epoch`, with no events yet.
    pub fn new(shard: u32, epoch: u64) -> BatchEncoder {
        BatchEncoder::with_capacity(shard, epoch, 0)
    }

    /// A batch for `shard` at `epoch` with room for `event_bytes` of events
    /// (their keys and lengths included), so pushing them never regrows it.
    pub fn with_capacity(shard: u32, epoch: u64, event_bytes: usize) -> BatchEncoder {
        let mut buf = Vec::with_capacity(RECORD_HEADER_ROOM + 16 + event_bytes);
        buf.resize(RECORD_HEADER_ROOM, 0);
        // Fields in tag order and zero values left out, as prost does.
        if shard != 0 {
            prost::encoding::uint32::encode(1, &shard, &mut buf);
        }
        if epoch != 0 {
            prost::encoding::uint64::encode(2, &epoch, &mut buf);
        }
        BatchEncoder {
            events_at: buf.len(),
            buf,
        }
    }

    /// Appends an encoded event.
    pub fn push(&mut self, event: &[u8]) {
        use prost::encoding::{WireType, encode_key, encode_varint};
        encode_key(3, WireType::LengthDelimited, &mut self.buf);
        encode_varint(event.len() as u64, &mut self.buf);
        self.buf.extend_from_slice(event);
    }

    /// Appends encoded `event`, which has no time, as if its `timestamp_ms`
    /// were `timestamp_ms`, without decoding it to set the field: a field
    /// written after the others replaces any earlier one, so a decoder reads
    /// the event with this time.
    pub fn push_at(&mut self, event: &[u8], timestamp_ms: i64) {
        use prost::encoding::{WireType, encode_key, encode_varint, int64};
        // `Event.timestamp_ms` in proto/dynseg/v1/events.proto.
        const TIMESTAMP_MS: u32 = 6;
        let len = event.len() + int64::encoded_len(TIMESTAMP_MS, &timestamp_ms);
        encode_key(3, WireType::LengthDelimited, &mut self.buf);
        encode_varint(len as u64, &mut self.buf);
        self.buf.extend_from_slice(event);
        int64::encode(TIMESTAMP_MS, &timestamp_ms, &mut self.buf);
    }

    /// The encoded batch.
    pub fn finish(self) -> EncodedBatch {
        EncodedBatch {
            events_at: self.events_at,
            buf: self.buf,
        }
    }
}

/// An encoded `EventBatch`, with room before it for its log record's header.
pub struct EncodedBatch {
    buf: Vec<u8>,
    /// Where the events start in `buf` (after the room, shard and epoch).
    events_at: usize,
}

impl EncodedBatch {
    /// The batch's encoding.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[RECORD_HEADER_ROOM..]
    }

    /// Appends `other`'s events after this batch's (its shard and epoch are
    /// taken to be this batch's): one batch, and so one log record, for
    /// batches a shard takes together.
    pub fn append(&mut self, other: &EncodedBatch) {
        self.buf.extend_from_slice(&other.buf[other.events_at..]);
    }

    /// The bytes of `WalRecord { shard, now_ms, input: Some(Input::Batch(b)) }`
    /// where `b` is this batch. An embedded message is written as its length
    /// and bytes, so the header goes into the room before the batch and the
    /// record is the batch's own buffer.
    pub fn into_record(self, shard: u32, now_ms: i64) -> Bytes {
        use bytes::Buf;
        use prost::encoding::{WireType, encode_key, encode_varint};
        let mut header = [0u8; RECORD_HEADER_ROOM];
        let written = {
            let mut free = &mut header[..];
            if shard != 0 {
                prost::encoding::uint32::encode(1, &shard, &mut free);
            }
            if now_ms != 0 {
                prost::encoding::int64::encode(2, &now_ms, &mut free);
            }
            encode_key(3, WireType::LengthDelimited, &mut free);
            encode_varint((self.buf.len() - RECORD_HEADER_ROOM) as u64, &mut free);
            RECORD_HEADER_ROOM - free.len()
        };
        let start = RECORD_HEADER_ROOM - written;
        let mut buf = self.buf;
        buf[start..RECORD_HEADER_ROOM].copy_from_slice(&header[..written]);
        let mut record = Bytes::from(buf);
        record.advance(start);
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: u64, timestamp_ms: i64) -> pb::Event {
        let mut e = pb::Event {
            message_id: format!("m{i}"),
            user_id: format!("user-{}", i % 7),
            event: ["order_completed", "", "page_viewed"][(i % 3) as usize].into(),
            r#type: (i % 2) as i32,
            timestamp_ms,
            ..Default::default()
        };
        if i.is_multiple_of(4) {
            e.properties.insert(
                "revenue".into(),
                pb::Value::from(&dynseg_rules::Value::Number(i as f64)),
            );
        }
        e
    }

    #[test]
    fn batches_and_records_encode_exactly_as_the_owned_messages_do() {
        for (shard, epoch, now_ms, n) in [
            (0, 0, 0, 0),
            (3, 1, 1_700_000_000_000, 1),
            (255, 7, -5, 10),
            (u32::MAX, u64::MAX, i64::MAX, 100),
            // The longest header: every varint at its longest.
            (u32::MAX, 1, i64::MIN, 3),
        ] {
            let events: Vec<pb::Event> = (0..n).map(|i| event(i, i as i64 * 1000)).collect();
            let mut encoder = BatchEncoder::new(shard, epoch);
            for e in &events {
                encoder.push(&e.encode_to_vec());
            }
            let batch = pb::EventBatch {
                shard,
                epoch,
                events,
            };
            let encoded = encoder.finish();
            assert_eq!(encoded.as_bytes(), batch.encode_to_vec(), "batch of {n}");
            let record = WalRecord {
                shard,
                now_ms,
                input: Some(Input::Batch(encoded::EventBatch::from(&batch))),
            };
            let raw = encoded.into_record(shard, now_ms);
            assert_eq!(&raw[..], &record.to_bytes()[..], "record of {n}");
            assert_eq!(WalRecord::from_slice(&raw[..]).unwrap(), record);
        }
    }

    #[test]
    fn appended_batches_are_one_batch_of_all_their_events_in_order() {
        for (shard, epoch, sizes) in [
            (0, 0, &[2usize, 3][..]),
            (7, 3, &[1, 0, 4]),
            (u32::MAX, u64::MAX, &[0, 0]),
        ] {
            let mut all = Vec::new();
            let mut merged: Option<EncodedBatch> = None;
            for (part, &n) in sizes.iter().enumerate() {
                let events: Vec<pb::Event> = (0..n)
                    .map(|i| event((part * 10 + i) as u64, 1000))
                    .collect();
                let mut encoder = BatchEncoder::new(shard, epoch);
                for e in &events {
                    encoder.push(&e.encode_to_vec());
                }
                all.extend(events);
                let encoded = encoder.finish();
                match merged.as_mut() {
                    Some(merged) => merged.append(&encoded),
                    None => merged = Some(encoded),
                }
            }
            let batch = pb::EventBatch {
                shard,
                epoch,
                events: all,
            };
            assert_eq!(
                merged.unwrap().as_bytes(),
                batch.encode_to_vec(),
                "{sizes:?}"
            );
        }
    }

    #[test]
    fn the_room_before_a_batch_holds_the_longest_record_header() {
        use prost::encoding::{encoded_len_varint, int64, key_len, uint32};
        // A batch's length is bounded by a gRPC message (well under 4 GiB).
        let longest = uint32::encoded_len(1, &u32::MAX)
            + int64::encoded_len(2, &i64::MIN)
            + key_len(3)
            + encoded_len_varint(u64::from(u32::MAX));
        assert_eq!(RECORD_HEADER_ROOM, longest);
    }

    #[test]
    fn an_event_without_time_is_logged_with_the_time_it_is_given() {
        let events: Vec<pb::Event> = (0..5).map(|i| event(i, 0)).collect();
        let mut encoder = BatchEncoder::new(2, 3);
        for (i, e) in events.iter().enumerate() {
            if i % 2 == 0 {
                encoder.push_at(&e.encode_to_vec(), 1_700_000_000_000 + i as i64);
            } else {
                encoder.push(&e.encode_to_vec());
            }
        }
        let filled = events
            .into_iter()
            .enumerate()
            .map(|(i, mut e)| {
                if i % 2 == 0 {
                    e.timestamp_ms = 1_700_000_000_000 + i as i64;
                }
                e
            })
            .collect();
        let decoded = pb::EventBatch::decode(encoder.finish().as_bytes()).unwrap();
        assert_eq!(
            decoded,
            pb::EventBatch {
                shard: 2,
                epoch: 3,
                events: filled
            }
        );
    }
}
