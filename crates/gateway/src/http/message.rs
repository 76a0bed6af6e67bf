//! One Segment-shaped JSON message to the wire's `Event`: the conversion the
//! HTTP API and `dynseg ingest` share, pure and I/O-free.
//!
//! What it reads, as Segment's tracking API and RudderStack's clients send it:
//! - `type`: `track`, `identify`, `alias`, `page`, `screen`, `group` (default
//!   `track`); on a single-call endpoint (`/v1/track`) the endpoint decides.
//! - `userId`, `anonymousId` (strings, or numbers), `messageId`, `previousId`.
//! - `event` (track), `name` and `category` (page, screen), `groupId` (group).
//! - `properties` (track, page, screen), `traits` (identify, group); identify
//!   also reads `context.traits`, where RudderStack puts them (top-level
//!   `traits` win on a clash).
//! - Time: `timestamp` when given, as is. Otherwise `originalTimestamp`
//!   corrected for the client's clock skew by `sentAt` as Segment does
//!   (`received - (sentAt - originalTimestamp)`), or as is without `sentAt`.
//!   Without any of them the node stamps the event when it arrives (its clock,
//!   manual or system).
//!
//! dynseg's events are track, identify and alias; the other calls become track
//! events: page → `page_viewed`, screen → `screen_viewed` (properties plus
//! `name` and `category`), group → `group` (the group's traits plus
//! `group_id`). Nested objects are flattened to dotted keys
//! (`address.city`); a list of objects becomes one list per field
//! (`products.sku`), null where an item lacks it.

use std::collections::BTreeMap;

use dynseg_proto::pb;
use dynseg_rules::Timestamp;
use serde_json::{Map, Value as Json};

/// The call a message is, by Segment's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// An action the user took.
    Track,
    /// Who the user is (traits).
    Identify,
    /// Two ids are the same user.
    Alias,
    /// A web page view.
    Page,
    /// A mobile screen view.
    Screen,
    /// The user belongs to a group (company, account).
    Group,
}

impl Call {
    /// The call named `name` (Segment's `type` field).
    pub fn from_name(name: &str) -> Option<Call> {
        Some(match name.to_ascii_lowercase().as_str() {
            "track" => Call::Track,
            "identify" => Call::Identify,
            "alias" => Call::Alias,
            "page" => Call::Page,
            "screen" => Call::Screen,
            "group" => Call::Group,
            _ => return None,
        })
    }
}

/// The track event a page, screen or group call becomes.
pub const PAGE_EVENT: &str = "page_viewed";
/// See [`PAGE_EVENT`].
pub const SCREEN_EVENT: &str = "screen_viewed";
/// See [`PAGE_EVENT`].
pub const GROUP_EVENT: &str = "group";

/// What the receiver knows about the request a message came in.
#[derive(Clone, Copy, Debug)]
pub struct Envelope<'a> {
    /// When the request arrived, milliseconds since the epoch (for the skew
    /// correction of `originalTimestamp`).
    pub received_ms: i64,
    /// The batch's `sentAt`, which a message's own `sentAt` overrides.
    pub sent_at: Option<&'a Json>,
    /// Levels of nested objects a property may sit under (`a.b` is 1).
    pub max_depth: usize,
}

/// Converts one message. `call` is the endpoint's call; `None` reads `type`.
/// The message id is left empty when the message has none (the caller derives
/// one from the message's bytes, so a resend is still a duplicate).
pub fn to_event(
    json: &Json,
    call: Option<Call>,
    envelope: &Envelope<'_>,
) -> Result<pb::Event, String> {
    let Json::Object(message) = json else {
        return Err("a message must be a JSON object".into());
    };
    let call = match call {
        Some(call) => call,
        None => match text(message, "type")?.as_str() {
            "" => Call::Track,
            name => Call::from_name(name).ok_or_else(|| {
                format!("unsupported type {name:?} (track, identify, alias, page, screen, group)")
            })?,
        },
    };
    let depth = envelope.max_depth;
    let mut event = pb::Event {
        message_id: text(message, "messageId")?,
        user_id: text(message, "userId")?,
        anonymous_id: text(message, "anonymousId")?,
        timestamp_ms: event_time(message, envelope)?,
        ..pb::Event::default()
    };
    match call {
        Call::Track => {
            event.r#type = pb::EventType::Track as i32;
            event.event = text(message, "event")?;
            if event.event.is_empty() {
                return Err("a track call needs an event name (event)".into());
            }
            event.properties = flat(message.get("properties"), "properties", depth)?;
        }
        Call::Identify => {
            event.r#type = pb::EventType::Identify as i32;
            let context_traits = match message.get("context") {
                Some(Json::Object(context)) => context.get("traits"),
                _ => None,
            };
            event.traits = flat(context_traits, "context.traits", depth)?;
            event
                .traits
                .extend(flat(message.get("traits"), "traits", depth)?);
        }
        Call::Alias => {
            event.r#type = pb::EventType::Alias as i32;
            event.previous_id = text(message, "previousId")?;
            if event.previous_id.is_empty() {
                return Err("an alias call needs the previous id (previousId)".into());
            }
        }
        Call::Page | Call::Screen => {
            event.r#type = pb::EventType::Track as i32;
            event.event = if call == Call::Page {
                PAGE_EVENT
            } else {
                SCREEN_EVENT
            }
            .into();
            event.properties = flat(message.get("properties"), "properties", depth)?;
            for key in ["name", "category"] {
                let value = text(message, key)?;
                if !value.is_empty() {
                    event.properties.insert(key.into(), string(value));
                }
            }
        }
        Call::Group => {
            event.r#type = pb::EventType::Track as i32;
            event.event = GROUP_EVENT.into();
            let group_id = text(message, "groupId")?;
            if group_id.is_empty() {
                return Err("a group call needs the group's id (groupId)".into());
            }
            event.properties = flat(message.get("traits"), "traits", depth)?;
            event.properties.insert("group_id".into(), string(group_id));
        }
    }
    Ok(event)
}

/// A message id for a message that has none, from its text (FNV-1a), so that
/// a resend of the same bytes is a duplicate.
pub fn derived_id(prefix: &str, text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{prefix}-{hash:016x}")
}

/// A text field: absent or null is empty; numbers are accepted as their text
/// (clients send numeric user ids).
fn text(message: &Map<String, Json>, key: &str) -> Result<String, String> {
    match message.get(key) {
        None | Some(Json::Null) => Ok(String::new()),
        Some(Json::String(s)) => Ok(s.clone()),
        Some(Json::Number(n)) => Ok(n.to_string()),
        Some(_) => Err(format!("{key} must be a string")),
    }
}

fn string(s: String) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::StringValue(s)),
    }
}

/// The event time in milliseconds, 0 for "when the node receives it".
fn event_time(message: &Map<String, Json>, envelope: &Envelope<'_>) -> Result<i64, String> {
    if let Some(at) = time(message.get("timestamp"), "timestamp")? {
        return Ok(at);
    }
    let Some(original) = time(message.get("originalTimestamp"), "originalTimestamp")? else {
        return Ok(0);
    };
    let sent_at = match message.get("sentAt") {
        None | Some(Json::Null) => time(envelope.sent_at, "sentAt")?,
        own => time(own, "sentAt")?,
    };
    Ok(match sent_at {
        // The client's clock is off by (sentAt - received); the event
        // happened that long before it was sent.
        Some(sent) => envelope
            .received_ms
            .saturating_sub(sent.saturating_sub(original)),
        None => original,
    })
}

fn time(json: Option<&Json>, key: &str) -> Result<Option<i64>, String> {
    match json {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) if s.is_empty() => Ok(None),
        Some(Json::String(s)) => Timestamp::parse_rfc3339(s)
            .map(|t| Some(t.millis()))
            .map_err(|e| format!("{key} {s:?}: {e}")),
        Some(Json::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| format!("{key} must be whole milliseconds")),
        Some(_) => Err(format!("{key} must be RFC 3339 text or milliseconds")),
    }
}

/// A properties or traits object, flattened to dotted keys.
pub fn flat(
    json: Option<&Json>,
    what: &str,
    max_depth: usize,
) -> Result<BTreeMap<String, pb::Value>, String> {
    let mut out = BTreeMap::new();
    match json {
        None | Some(Json::Null) => {}
        Some(Json::Object(map)) => {
            for (key, value) in map {
                flatten(key.clone(), value, 0, max_depth, what, &mut out)?;
            }
        }
        Some(_) => return Err(format!("{what} must be an object")),
    }
    Ok(out)
}

fn flatten(
    key: String,
    json: &Json,
    depth: usize,
    max_depth: usize,
    what: &str,
    out: &mut BTreeMap<String, pb::Value>,
) -> Result<(), String> {
    let deeper = |depth: usize, key: &str| {
        if depth >= max_depth {
            Err(format!(
                "{what}.{key}: nested deeper than {max_depth} levels"
            ))
        } else {
            Ok(depth + 1)
        }
    };
    match json {
        Json::Object(map) => {
            let depth = deeper(depth, &key)?;
            for (inner, value) in map {
                flatten(format!("{key}.{inner}"), value, depth, max_depth, what, out)?;
            }
        }
        Json::Array(items) if items.iter().any(Json::is_object) => {
            // One list per field, aligned with the items.
            let depth = deeper(depth, &key)?;
            let mut columns: BTreeMap<String, Vec<pb::Value>> = BTreeMap::new();
            for (index, item) in items.iter().enumerate() {
                let mut fields = BTreeMap::new();
                match item {
                    Json::Object(map) => {
                        for (inner, value) in map {
                            flatten(inner.clone(), value, depth, max_depth, what, &mut fields)?;
                        }
                    }
                    other => {
                        fields.insert(String::new(), scalar(other, what, &key)?);
                    }
                }
                for (field, value) in fields {
                    columns
                        .entry(field)
                        .or_insert_with(|| vec![null(); index])
                        .push(value);
                }
                for column in columns.values_mut() {
                    column.resize(index + 1, null());
                }
            }
            for (field, values) in columns {
                let name = if field.is_empty() {
                    key.clone()
                } else {
                    format!("{key}.{field}")
                };
                out.insert(
                    name,
                    pb::Value {
                        kind: Some(pb::value::Kind::ListValue(pb::ValueList { values })),
                    },
                );
            }
        }
        other => {
            let value = scalar(other, what, &key)?;
            out.insert(key, value);
        }
    }
    Ok(())
}

fn null() -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::NullValue(true)),
    }
}

/// A value that is not an object: null, bool, number, string, or a list of them.
fn scalar(json: &Json, what: &str, key: &str) -> Result<pb::Value, String> {
    use pb::value::Kind;
    let kind = match json {
        Json::Null => Kind::NullValue(true),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(
            n.as_f64()
                .ok_or_else(|| format!("{what}.{key}: number out of range"))?,
        ),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => Kind::ListValue(pb::ValueList {
            values: items
                .iter()
                .map(|item| scalar(item, what, key))
                .collect::<Result<_, _>>()?,
        }),
        Json::Object(_) => {
            return Err(format!(
                "{what}.{key}: objects inside nested lists are not supported"
            ));
        }
    };
    Ok(pb::Value { kind: Some(kind) })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    const DEPTH: usize = 4;

    fn envelope(sent_at: Option<&Json>) -> Envelope<'_> {
        Envelope {
            received_ms: 1_000_000,
            sent_at,
            max_depth: DEPTH,
        }
    }

    fn convert(json: Json) -> Result<pb::Event, String> {
        to_event(&json, None, &envelope(None))
    }

    fn number(n: f64) -> pb::Value {
        pb::Value {
            kind: Some(pb::value::Kind::NumberValue(n)),
        }
    }

    fn list(values: Vec<pb::Value>) -> pb::Value {
        pb::Value {
            kind: Some(pb::value::Kind::ListValue(pb::ValueList { values })),
        }
    }

    #[test]
    fn a_track_call_keeps_its_fields() {
        let event = convert(json!({
            "type": "track", "userId": 42, "anonymousId": "a1", "messageId": "m1",
            "event": "order_completed", "timestamp": "2026-01-01T00:00:00.250+01:00",
            "properties": {"revenue": 120.5, "tags": ["a", "b"], "gift": null}
        }))
        .unwrap();
        assert_eq!(
            (
                event.user_id.as_str(),
                event.anonymous_id.as_str(),
                event.message_id.as_str()
            ),
            ("42", "a1", "m1")
        );
        assert_eq!(event.r#type, pb::EventType::Track as i32);
        assert_eq!(event.event, "order_completed");
        assert_eq!(
            event.timestamp_ms,
            Timestamp::parse_rfc3339("2025-12-31T23:00:00.250Z")
                .unwrap()
                .millis()
        );
        assert_eq!(event.properties["revenue"], number(120.5));
        assert_eq!(event.properties["gift"], null());
        assert_eq!(event.properties.len(), 3);
    }

    #[test]
    fn identify_reads_context_traits_and_top_level_traits_win() {
        let event = convert(json!({
            "type": "identify", "userId": "u1",
            "context": {"traits": {"plan": "free", "email": "a@example.com"}},
            "traits": {"plan": "pro"}
        }))
        .unwrap();
        assert_eq!(event.r#type, pb::EventType::Identify as i32);
        assert_eq!(event.traits["plan"], string("pro".into()));
        assert_eq!(event.traits["email"], string("a@example.com".into()));
        assert_eq!(event.timestamp_ms, 0, "no time given: the node stamps it");
    }

    #[test]
    fn the_endpoint_decides_the_call() {
        let event = to_event(
            &json!({"type": "identify", "userId": "u1", "event": "signed_up"}),
            Some(Call::Track),
            &envelope(None),
        )
        .unwrap();
        assert_eq!(
            (event.r#type, event.event.as_str()),
            (pb::EventType::Track as i32, "signed_up")
        );
    }

    #[test]
    fn page_screen_and_group_become_track_events() {
        let page = convert(json!({"type": "page", "userId": "u", "name": "Pricing",
            "category": "Docs", "properties": {"path": "/pricing"}}))
        .unwrap();
        assert_eq!(page.event, PAGE_EVENT);
        assert_eq!(page.properties["name"], string("Pricing".into()));
        assert_eq!(page.properties["category"], string("Docs".into()));
        assert_eq!(page.properties["path"], string("/pricing".into()));
        let screen = convert(json!({"type": "screen", "userId": "u", "name": "Home"})).unwrap();
        assert_eq!(screen.event, SCREEN_EVENT);
        let group = convert(json!({"type": "group", "userId": "u", "groupId": 7,
            "traits": {"plan": "enterprise"}}))
        .unwrap();
        assert_eq!(group.event, GROUP_EVENT);
        assert_eq!(group.properties["group_id"], string("7".into()));
        assert_eq!(group.properties["plan"], string("enterprise".into()));
    }

    #[test]
    fn original_timestamp_is_corrected_by_sent_at() {
        // The client's clock runs 10 s fast: it says it sent at 10_000 + x
        // what the gateway received at 1_000_000.
        let sent = json!(1_010_000);
        let message = json!({"userId": "u", "event": "e", "originalTimestamp": 1_009_000});
        let batch = to_event(&message, None, &envelope(Some(&sent))).unwrap();
        assert_eq!(batch.timestamp_ms, 999_000);
        // A message's own sentAt overrides the batch's.
        let own = json!({"userId": "u", "event": "e", "originalTimestamp": 1_009_000,
            "sentAt": 1_009_500});
        assert_eq!(
            to_event(&own, None, &envelope(Some(&sent)))
                .unwrap()
                .timestamp_ms,
            999_500
        );
        // Without sentAt it is taken as is; an explicit timestamp always wins.
        assert_eq!(convert(message).unwrap().timestamp_ms, 1_009_000);
        let explicit = json!({"userId": "u", "event": "e", "timestamp": 5,
            "originalTimestamp": 1_009_000});
        assert_eq!(
            to_event(&explicit, None, &envelope(Some(&sent)))
                .unwrap()
                .timestamp_ms,
            5
        );
    }

    #[test]
    fn nested_objects_flatten_and_lists_of_objects_become_columns() {
        let event = convert(
            json!({"userId": "u", "event": "order_completed", "properties": {
                "address": {"city": "Lyon", "geo": {"lat": 45.7}},
                "products": [{"sku": "a", "price": 10}, {"sku": "b"}, {"price": 30}]
            }}),
        )
        .unwrap();
        assert_eq!(event.properties["address.city"], string("Lyon".into()));
        assert_eq!(event.properties["address.geo.lat"], number(45.7));
        assert_eq!(
            event.properties["products.sku"],
            list(vec![string("a".into()), string("b".into()), null()])
        );
        assert_eq!(
            event.properties["products.price"],
            list(vec![number(10.0), null(), number(30.0)])
        );
    }

    #[test]
    fn bad_messages_say_what_is_wrong() {
        let too_deep = json!({"userId": "u", "event": "e",
            "properties": {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}});
        for (message, needle) in [
            (json!([1]), "JSON object"),
            (json!({"type": "launch"}), "unsupported type \"launch\""),
            (json!({"userId": "u"}), "event name"),
            (json!({"type": "alias", "userId": "u"}), "previousId"),
            (json!({"type": "group", "userId": "u"}), "groupId"),
            (
                json!({"userId": "u", "event": "e", "timestamp": "yesterday"}),
                "timestamp \"yesterday\"",
            ),
            (
                json!({"userId": {"id": 1}, "event": "e"}),
                "userId must be a string",
            ),
            (
                json!({"userId": "u", "event": "e", "properties": [1]}),
                "properties must be an object",
            ),
            (
                too_deep,
                "properties.a.b.c.d.e: nested deeper than 4 levels",
            ),
        ] {
            let err = convert(message.clone()).unwrap_err();
            assert!(err.contains(needle), "{message}: {err}");
        }
    }
}
