//! A compact encoding of [`Value`]s into `u64` words, so traits and distinct values
//! live in a user's cell arena instead of in separate heap allocations.
//!
//! Each value starts with a tag word: the low 8 bits are the type, the next 32
//! bits a length (string bytes, list words) or the boolean. The encoding is
//! canonical (`-0.0` is stored as `0.0`, unused string bytes are zero), so two
//! values are equal exactly when their words are equal.
//!
//! | value | words |
//! |---|---|
//! | null | `[tag]` |
//! | bool | `[tag \| b << 8]` |
//! | number | `[tag, f64 bits]` |
//! | string | `[tag \| len << 8, bytes packed little-endian...]` |
//! | timestamp | `[tag, millis]` |
//! | list | `[tag \| words << 8, item encodings...]` |

use crate::event::{EventBody, EventName, Properties};
use crate::time::Timestamp;
use crate::value::Value;

const NULL: u64 = 0;
const BOOL: u64 = 1;
const NUMBER: u64 = 2;
const STRING: u64 = 3;
const TIMESTAMP: u64 = 4;
const LIST: u64 = 5;

/// Appends the encoding of `value` to `out`.
pub(crate) fn encode(value: &Value, out: &mut Vec<u64>) {
    match value {
        Value::Null => out.push(NULL),
        Value::Bool(b) => out.push(BOOL | (u64::from(*b) << 8)),
        Value::Number(n) => out.extend([NUMBER, (n + 0.0).to_bits()]),
        Value::Timestamp(t) => out.extend([TIMESTAMP, t.millis() as u64]),
        Value::String(s) => {
            let bytes = s.as_bytes();
            out.push(STRING | ((bytes.len() as u64) << 8));
            for chunk in bytes.chunks(8) {
                let mut word = [0u8; 8];
                word[..chunk.len()].copy_from_slice(chunk);
                out.push(u64::from_le_bytes(word));
            }
        }
        Value::List(items) => {
            let at = out.len();
            out.push(LIST);
            for item in items.iter() {
                encode(item, out);
            }
            let words = (out.len() - at - 1) as u64;
            out[at] = LIST | (words << 8);
        }
    }
}

/// Number of words the value at the start of `words` takes (at least one, at
/// most `words.len()`, so that a corrupt length cannot run past the end).
pub(crate) fn encoded_len(words: &[u64]) -> usize {
    let Some(&tag) = words.first() else { return 0 };
    let len = ((tag >> 8) & 0xffff_ffff) as usize;
    let total = match tag & 0xff {
        NUMBER | TIMESTAMP => 2,
        STRING => 1 + len.div_ceil(8),
        LIST => 1 + len,
        _ => 1,
    };
    total.min(words.len())
}

/// Decodes the value at the start of `words`. Malformed words decode as null:
/// state comes from this crate's own encoding, but a decoder must never panic.
pub(crate) fn decode(words: &[u64]) -> Value {
    let Some(&tag) = words.first() else {
        return Value::Null;
    };
    let len = ((tag >> 8) & 0xffff_ffff) as usize;
    match tag & 0xff {
        BOOL => Value::Bool(len != 0),
        NUMBER => words
            .get(1)
            .map_or(Value::Null, |w| Value::Number(f64::from_bits(*w))),
        TIMESTAMP => words
            .get(1)
            .map_or(Value::Null, |w| Value::Timestamp(Timestamp(*w as i64))),
        STRING => {
            let body = &words[1..encoded_len(words)];
            let mut bytes: Vec<u8> = body.iter().flat_map(|w| w.to_le_bytes()).collect();
            if bytes.len() < len {
                return Value::Null;
            }
            bytes.truncate(len);
            String::from_utf8(bytes).map_or(Value::Null, |s| Value::String(s.into()))
        }
        LIST => {
            let mut body = &words[1..encoded_len(words)];
            let mut items = Vec::new();
            while !body.is_empty() {
                let n = encoded_len(body);
                items.push(decode(&body[..n]));
                body = &body[n..];
            }
            Value::List(items.into())
        }
        _ => Value::Null,
    }
}

const TRACK: u64 = 0;
const IDENTIFY: u64 = 1;

/// Appends a track or identify body: `[kind, name (track only), key count,
/// (key, value)...]`, names and keys as strings. Alias bodies have no effect on
/// rules and are never held, so they are not encoded.
pub(crate) fn encode_body(body: &EventBody, out: &mut Vec<u64>) {
    let properties = match body {
        EventBody::Track { name, properties } => {
            out.push(TRACK);
            encode(&Value::from(name.as_str()), out);
            properties
        }
        EventBody::Identify { traits } => {
            out.push(IDENTIFY);
            traits
        }
        EventBody::Alias { .. } => return,
    };
    out.push(properties.len() as u64);
    for (key, value) in properties.iter() {
        encode(&Value::from(key), out);
        encode(value, out);
    }
}

/// Decodes what [`encode_body`] wrote; `None` for words it did not write.
pub(crate) fn decode_body(words: &[u64]) -> Option<EventBody> {
    let (&kind, mut rest) = words.split_first()?;
    let mut next = || {
        let n = encoded_len(rest);
        let value = decode(&rest[..n]);
        rest = &rest[n..];
        value
    };
    let name = match kind {
        TRACK => match next() {
            Value::String(name) => Some(EventName::new(&*name)),
            _ => return None,
        },
        IDENTIFY => None,
        _ => return None,
    };
    let (&count, tail) = rest.split_first()?;
    rest = tail;
    let mut properties = Properties::new();
    for _ in 0..count.min(words.len() as u64) {
        let n = encoded_len(rest);
        let Value::String(key) = decode(&rest[..n]) else {
            return None;
        };
        rest = &rest[n..];
        let n = encoded_len(rest);
        properties.insert(key, decode(&rest[..n]));
        rest = &rest[n..];
    }
    Some(match name {
        Some(name) => EventBody::Track { name, properties },
        None => EventBody::Identify { traits: properties },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(value: Value) {
        let mut words = Vec::new();
        encode(&value, &mut words);
        assert_eq!(encoded_len(&words), words.len(), "{value}");
        assert_eq!(decode(&words), value, "{value}");
    }

    #[test]
    fn every_kind_of_value_round_trips() {
        round_trip(Value::Null);
        round_trip(Value::Bool(true));
        round_trip(Value::Bool(false));
        round_trip(Value::Number(-12.5));
        round_trip(Value::Timestamp(Timestamp(-5)));
        round_trip(Value::from(""));
        round_trip(Value::from("trial"));
        round_trip(Value::from("exactly8"));
        round_trip(Value::from("naïve café, longer than sixteen bytes"));
        round_trip(Value::List(
            vec![
                Value::from("a"),
                Value::Number(1.0),
                Value::List(vec![Value::Null].into()),
            ]
            .into(),
        ));
    }

    #[test]
    fn equal_values_encode_to_equal_words() {
        let words = |v: &Value| {
            let mut w = Vec::new();
            encode(v, &mut w);
            w
        };
        assert_eq!(words(&Value::Number(-0.0)), words(&Value::Number(0.0)));
        assert_ne!(words(&Value::from("a")), words(&Value::from("a\0")));
        assert_eq!(words(&Value::from("trial")).len(), 2);
    }

    #[test]
    fn event_bodies_round_trip() {
        let props: Properties = [
            ("revenue", Value::Number(12.5)),
            ("category", Value::from("shoes")),
        ]
        .into_iter()
        .collect();
        for body in [
            EventBody::Track {
                name: EventName::from("order_completed"),
                properties: props.clone(),
            },
            EventBody::Track {
                name: EventName::from("a rather long event name, past inline"),
                properties: Properties::new(),
            },
            EventBody::Identify { traits: props },
        ] {
            let mut words = Vec::new();
            encode_body(&body, &mut words);
            assert_eq!(decode_body(&words), Some(body));
        }
        assert_eq!(decode_body(&[7]), None);
        assert_eq!(decode_body(&[]), None);
    }

    #[test]
    fn malformed_words_decode_as_null_without_panicking() {
        assert_eq!(decode(&[]), Value::Null);
        assert_eq!(decode(&[STRING | (100 << 8)]), Value::Null);
        assert_eq!(decode(&[NUMBER]), Value::Null);
        assert_eq!(decode(&[STRING | (2 << 8), 0xffff]), Value::Null);
        assert_eq!(decode(&[99]), Value::Null);
        assert_eq!(encoded_len(&[LIST | (1000 << 8), 1]), 2);
    }
}
