//! Segment-shaped JSON events (one per line in `dynseg ingest` files) to the
//! wire's `Event`.
//!
//! Accepted fields: `type` (track, identify, alias; default track), `userId`,
//! `anonymousId`, `event`, `messageId`, `timestamp` (RFC 3339, or milliseconds),
//! `properties`, `traits`, `previousId`. A line without a `messageId` gets one
//! derived from its text, so ingesting the same file twice counts nothing twice.

use std::collections::BTreeMap;

use dynseg_proto::pb;
use dynseg_rules::Timestamp;
use serde_json::Value as Json;

/// Converts one JSON event. A missing timestamp is sent as 0, which the node
/// reads as "when received, by my clock" (the manual clock too).
pub fn parse_event(line: &str) -> Result<pb::Event, String> {
    let json: Json = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let Json::Object(map) = json else {
        return Err("an event must be a JSON object".into());
    };
    let text = |key: &str| -> Result<String, String> {
        match map.get(key) {
            None | Some(Json::Null) => Ok(String::new()),
            Some(Json::String(s)) => Ok(s.clone()),
            Some(Json::Number(n)) => Ok(n.to_string()),
            Some(_) => Err(format!("{key} must be a string")),
        }
    };
    let kind = match text("type")?.to_ascii_lowercase().as_str() {
        "" | "track" => pb::EventType::Track,
        "identify" => pb::EventType::Identify,
        "alias" => pb::EventType::Alias,
        other => {
            return Err(format!(
                "unsupported type {other:?} (track, identify, alias)"
            ));
        }
    };
    let timestamp_ms = match map.get("timestamp") {
        None | Some(Json::Null) => 0,
        Some(Json::Number(n)) => n.as_i64().ok_or("timestamp must be whole milliseconds")?,
        Some(Json::String(s)) => Timestamp::parse_rfc3339(s)
            .map_err(|e| format!("timestamp {s:?}: {e}"))?
            .millis(),
        Some(_) => return Err("timestamp must be RFC 3339 text or milliseconds".into()),
    };
    let mut message_id = text("messageId")?;
    if message_id.is_empty() {
        message_id = format!("line-{:016x}", fnv64(line.trim().as_bytes()));
    }
    Ok(pb::Event {
        message_id,
        user_id: text("userId")?,
        anonymous_id: text("anonymousId")?,
        r#type: kind as i32,
        event: text("event")?,
        timestamp_ms,
        properties: values(map.get("properties"), "properties")?,
        traits: values(map.get("traits"), "traits")?,
        previous_id: text("previousId")?,
    })
}

fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn values(json: Option<&Json>, what: &str) -> Result<BTreeMap<String, pb::Value>, String> {
    match json {
        None | Some(Json::Null) => Ok(BTreeMap::new()),
        Some(Json::Object(map)) => map
            .iter()
            .map(|(k, v)| Ok((k.clone(), value(v).map_err(|e| format!("{what}.{k}: {e}"))?)))
            .collect(),
        Some(_) => Err(format!("{what} must be an object")),
    }
}

/// A JSON value as a property value.
pub fn value(json: &Json) -> Result<pb::Value, String> {
    use pb::value::Kind;
    let kind = match json {
        Json::Null => Kind::NullValue(true),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().ok_or("number out of range")?),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => Kind::ListValue(pb::ValueList {
            values: items.iter().map(value).collect::<Result<_, _>>()?,
        }),
        Json::Object(_) => return Err("nested objects are not supported; flatten them".into()),
    };
    Ok(pb::Value { kind: Some(kind) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_shaped_events_convert() {
        let line = r#"{"type":"track","userId":"u1","event":"order_completed","messageId":"m1","timestamp":"2026-01-01T00:00:00Z","properties":{"revenue":120.5,"category":"shoes","tags":["a","b"],"gift":null}}"#;
        let event = parse_event(line).unwrap();
        assert_eq!(event.user_id, "u1");
        assert_eq!(event.r#type, pb::EventType::Track as i32);
        assert_eq!(
            event.timestamp_ms,
            Timestamp::parse_rfc3339("2026-01-01T00:00:00Z")
                .unwrap()
                .millis()
        );
        assert_eq!(event.properties.len(), 4);
        let identify =
            parse_event(r#"{"type":"identify","userId":"u1","traits":{"plan":"pro"}}"#).unwrap();
        assert_eq!((identify.timestamp_ms, identify.traits.len()), (0, 1));
        // A line without a message id gets a stable one.
        assert_eq!(
            identify.message_id,
            parse_event(r#"{"type":"identify","userId":"u1","traits":{"plan":"pro"}}"#)
                .unwrap()
                .message_id
        );
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        for (line, needle) in [
            ("not json", "not JSON"),
            ("[1]", "object"),
            (r#"{"type":"page"}"#, "unsupported type"),
            (r#"{"timestamp":"yesterday"}"#, "timestamp"),
            (r#"{"properties":{"a":{"b":1}}}"#, "properties.a: nested"),
        ] {
            let err = parse_event(line).unwrap_err();
            assert!(err.contains(needle), "{line}: {err}");
        }
    }
}
