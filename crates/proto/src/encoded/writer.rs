//! [`EventWriter`]: writes one `dynseg.v1.Event` straight into a buffer, field
//! by field, for senders that make events at a high rate (`dynseg bench`).
//!
//! Building a `pb::Event` costs an owned string per id and name and a
//! `BTreeMap` node per property, and prost then walks the maps twice (length,
//! then bytes). Writing the fields in place costs none of that; the bytes are
//! the ones prost would write for the same event, less the order of map
//! entries, which protobuf leaves free.

use prost::encoding::{encode_varint, encoded_len_varint};

use super::event::field;
use super::wire::{FIXED64, LEN, VARINT};
use crate::pb;

/// A scalar property or trait value, borrowed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScalarRef<'a> {
    /// An explicit null.
    Null,
    /// A boolean.
    Bool(bool),
    /// A number.
    Number(f64),
    /// A string.
    String(&'a str),
    /// Milliseconds since the Unix epoch.
    TimestampMs(i64),
}

/// Appends one event's fields to a buffer. Each call writes one field, so the
/// fields come out in the order called; write at most one of each scalar
/// field (a repeat would override the first on decoding, as in protobuf).
pub struct EventWriter<'b> {
    buf: &'b mut Vec<u8>,
}

fn key(buf: &mut Vec<u8>, field: u32, wire_type: u8) {
    encode_varint(u64::from(field << 3 | u32::from(wire_type)), buf);
}

fn string_len(field_len: usize) -> usize {
    1 + encoded_len_varint(field_len as u64) + field_len
}

fn string(buf: &mut Vec<u8>, field: u32, value: &str) {
    key(buf, field, LEN);
    encode_varint(value.len() as u64, buf);
    buf.extend_from_slice(value.as_bytes());
}

impl ScalarRef<'_> {
    /// The length of the `Value` message holding this scalar.
    fn encoded_len(&self) -> usize {
        match self {
            ScalarRef::Null | ScalarRef::Bool(_) => 2,
            ScalarRef::Number(_) => 9,
            ScalarRef::String(s) => string_len(s.len()),
            ScalarRef::TimestampMs(ms) => 1 + encoded_len_varint(*ms as u64),
        }
    }

    fn encode(&self, buf: &mut Vec<u8>) {
        match self {
            ScalarRef::Null => {
                key(buf, 1, VARINT);
                buf.push(1);
            }
            ScalarRef::Bool(b) => {
                key(buf, 2, VARINT);
                buf.push(u8::from(*b));
            }
            ScalarRef::Number(n) => {
                key(buf, 3, FIXED64);
                buf.extend_from_slice(&n.to_le_bytes());
            }
            ScalarRef::String(s) => string(buf, 4, s),
            ScalarRef::TimestampMs(ms) => {
                key(buf, 5, VARINT);
                encode_varint(*ms as u64, buf);
            }
        }
    }
}

impl<'b> EventWriter<'b> {
    /// A writer appending to `buf` (which may already hold other events).
    pub fn new(buf: &'b mut Vec<u8>) -> EventWriter<'b> {
        EventWriter { buf }
    }

    /// `message_id`, the idempotency key.
    pub fn message_id(&mut self, id: &str) -> &mut Self {
        string(self.buf, field::MESSAGE_ID, id);
        self
    }

    /// `message_id` as `prefix` followed by `number` in decimal, formatted in
    /// place (ids of the form `run-7-12345` without a `format!`).
    pub fn message_id_numbered(&mut self, prefix: &str, number: u64) -> &mut Self {
        self.numbered(field::MESSAGE_ID, prefix, number)
    }

    /// `user_id`.
    pub fn user_id(&mut self, user: &str) -> &mut Self {
        string(self.buf, field::USER_ID, user);
        self
    }

    /// `user_id` as `prefix` followed by `number` in decimal.
    pub fn user_id_numbered(&mut self, prefix: &str, number: u64) -> &mut Self {
        self.numbered(field::USER_ID, prefix, number)
    }

    /// `type`.
    pub fn kind(&mut self, kind: pb::EventType) -> &mut Self {
        if kind as i32 != 0 {
            key(self.buf, field::TYPE, VARINT);
            encode_varint(kind as i64 as u64, self.buf);
        }
        self
    }

    /// `event`: a track event's name.
    pub fn name(&mut self, name: &str) -> &mut Self {
        string(self.buf, field::EVENT, name);
        self
    }

    /// `timestamp_ms`: the event time in milliseconds since the Unix epoch.
    pub fn timestamp_ms(&mut self, ms: i64) -> &mut Self {
        if ms != 0 {
            key(self.buf, field::TIMESTAMP_MS, VARINT);
            encode_varint(ms as u64, self.buf);
        }
        self
    }

    /// One entry of `properties` (a track event's).
    pub fn property(&mut self, name: &str, value: ScalarRef<'_>) -> &mut Self {
        self.map_entry(field::PROPERTIES, name, value)
    }

    /// One entry of `traits` (an identify's).
    pub fn trait_value(&mut self, name: &str, value: ScalarRef<'_>) -> &mut Self {
        self.map_entry(field::TRAITS, name, value)
    }

    fn map_entry(&mut self, map: u32, name: &str, value: ScalarRef<'_>) -> &mut Self {
        let value_len = value.encoded_len();
        let entry_len =
            string_len(name.len()) + 1 + encoded_len_varint(value_len as u64) + value_len;
        key(self.buf, map, LEN);
        encode_varint(entry_len as u64, self.buf);
        string(self.buf, 1, name);
        key(self.buf, 2, LEN);
        encode_varint(value_len as u64, self.buf);
        value.encode(self.buf);
        self
    }

    fn numbered(&mut self, id_field: u32, prefix: &str, number: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut rest = number;
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        let digits = &digits[at..];
        key(self.buf, id_field, LEN);
        encode_varint((prefix.len() + digits.len()) as u64, self.buf);
        self.buf.extend_from_slice(prefix.as_bytes());
        self.buf.extend_from_slice(digits);
        self
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::pb::value::Kind;

    fn scalar() -> impl Strategy<Value = (Kind, String)> {
        prop_oneof![
            Just(Kind::NullValue(true)),
            any::<bool>().prop_map(Kind::BoolValue),
            (-1e9..1e9f64).prop_map(Kind::NumberValue),
            "[a-zé ]{0,200}".prop_map(Kind::StringValue),
            any::<i64>().prop_map(Kind::TimestampMs),
        ]
        .prop_flat_map(|kind| (Just(kind), "[a-z_]{1,140}"))
    }

    fn as_ref(kind: &Kind) -> ScalarRef<'_> {
        match kind {
            Kind::NullValue(_) => ScalarRef::Null,
            Kind::BoolValue(b) => ScalarRef::Bool(*b),
            Kind::NumberValue(n) => ScalarRef::Number(*n),
            Kind::StringValue(s) => ScalarRef::String(s),
            Kind::TimestampMs(ms) => ScalarRef::TimestampMs(*ms),
            Kind::ListValue(_) => unreachable!("the strategy makes scalars only"),
        }
    }

    proptest! {
        #![proptest_config(proptest::test_runner::Config {
            rng_seed: proptest::test_runner::RngSeed::Fixed(20_261_130),
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        })]
        /// What a sender writes field by field is the event prost decodes:
        /// long strings and ids (two-byte lengths), every scalar kind, both maps.
        #[test]
        fn a_written_event_decodes_as_the_event_it_describes(
            run in "[a-z-]{0,130}",
            sequence in any::<u64>(),
            user in "[a-z0-9]{0,200}",
            kind in prop_oneof![Just(pb::EventType::Track), Just(pb::EventType::Identify)],
            name in "[a-z_]{0,20}",
            timestamp_ms in prop_oneof![Just(0i64), any::<i64>()],
            properties in prop::collection::vec(scalar(), 0..4),
            traits in prop::collection::vec(scalar(), 0..4),
            numbered_user in any::<bool>(),
        ) {
            let mut buf = vec![7u8];
            let mut writer = EventWriter::new(&mut buf);
            writer.message_id_numbered(&run, sequence);
            if numbered_user {
                writer.user_id_numbered(&user, sequence);
            } else {
                writer.user_id(&user);
            }
            writer.kind(kind).name(&name).timestamp_ms(timestamp_ms);
            for (value, key) in &properties {
                writer.property(key, as_ref(value));
            }
            for (value, key) in &traits {
                writer.trait_value(key, as_ref(value));
            }
            // What was there before is left alone.
            prop_assert_eq!(buf[0], 7);
            let decoded = pb::Event::decode(&buf[1..]).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let map = |entries: &[(Kind, String)]| -> BTreeMap<String, pb::Value> {
                entries.iter().map(|(kind, key)| (key.clone(), pb::Value { kind: Some(kind.clone()) })).collect()
            };
            let expected = pb::Event {
                message_id: format!("{run}{sequence}"),
                user_id: if numbered_user { format!("{user}{sequence}") } else { user.clone() },
                r#type: kind as i32,
                event: name.clone(),
                timestamp_ms,
                properties: map(&properties),
                traits: map(&traits),
                ..Default::default()
            };
            prop_assert_eq!(decoded, expected);
        }
    }

    #[test]
    fn the_fields_of_a_simple_event_are_the_bytes_prost_writes() {
        let mut buf = Vec::new();
        EventWriter::new(&mut buf)
            .message_id("m-1")
            .user_id("alice")
            .kind(pb::EventType::Track)
            .name("order_completed")
            .timestamp_ms(1_700_000_000_000)
            .property("revenue", ScalarRef::Number(42.5));
        let event = pb::Event {
            message_id: "m-1".into(),
            user_id: "alice".into(),
            r#type: pb::EventType::Track as i32,
            event: "order_completed".into(),
            timestamp_ms: 1_700_000_000_000,
            properties: [(
                "revenue".to_owned(),
                pb::Value {
                    kind: Some(Kind::NumberValue(42.5)),
                },
            )]
            .into(),
            ..Default::default()
        };
        assert_eq!(buf, event.encode_to_vec());
    }
}
