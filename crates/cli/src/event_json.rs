//! Segment-shaped JSON events (one per line in `dynseg ingest` files) to the
//! wire's `Event`, by the same conversion as the gateway's HTTP API
//! ([`dynseg_gateway::http::message`]: every call type, nested properties,
//! `timestamp` RFC 3339 or milliseconds). A line without a `messageId` gets one
//! derived from its text, so ingesting the same file twice counts nothing twice.

use dynseg_gateway::HttpConfig;
use dynseg_gateway::http::message::{Envelope, derived_id, to_event};
use dynseg_proto::pb;
use serde_json::Value as Json;

/// Converts one JSON event. A missing timestamp is sent as 0, which the node
/// reads as "when received, by my clock" (the manual clock too).
pub fn parse_event(line: &str) -> Result<pb::Event, String> {
    let json: Json = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let envelope = Envelope {
        received_ms: 0,
        sent_at: None,
        max_depth: HttpConfig::default().max_depth,
    };
    let mut event = to_event(&json, None, &envelope)?;
    if event.message_id.is_empty() {
        event.message_id = derived_id("line", line.trim());
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynseg_rules::Timestamp;

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
            (r#"{"type":"launch"}"#, "unsupported type"),
            (r#"{"event":"e","timestamp":"yesterday"}"#, "timestamp"),
        ] {
            let err = parse_event(line).unwrap_err();
            assert!(err.contains(needle), "{line}: {err}");
        }
    }
}
