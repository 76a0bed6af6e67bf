//! Conversions between wire messages (`pb`) and domain types (`dynseg_rules`).
//!
//! Wire to domain is `TryFrom`: structurally malformed input (no user, an unknown
//! event type, a list nested too deep) is an error with a reason, never a panic.
//! The node applies the content limits of SPEC.md section 6 on top.

use dynseg_rules::{
    Change, ChangeKind, Clause, Event, EventBody, Explanation, Properties, SegmentDef, Timestamp,
    UserId, Value,
};

use crate::pb;

/// Why a wire message could not become a domain value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConvertError(pub String);

fn fail<T>(reason: impl Into<String>) -> Result<T, ConvertError> {
    Err(ConvertError(reason.into()))
}

/// Lists may nest, but not without bound: decoding is recursive.
const MAX_VALUE_DEPTH: usize = 16;

impl TryFrom<pb::Value> for Value {
    type Error = ConvertError;

    fn try_from(value: pb::Value) -> Result<Self, ConvertError> {
        value_from_wire(&value, 0)
    }
}

// Conversions from the wire read by reference: the node keeps the wire event
// for its log, so converting without consuming it saves cloning every event.
fn value_from_wire(value: &pb::Value, depth: usize) -> Result<Value, ConvertError> {
    use pb::value::Kind;
    if depth > MAX_VALUE_DEPTH {
        return fail(format!("values nest deeper than {MAX_VALUE_DEPTH} lists"));
    }
    Ok(match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) if n.is_finite() => Value::Number(*n),
        Some(Kind::NumberValue(n)) => return fail(format!("number {n} is not finite")),
        Some(Kind::StringValue(s)) => Value::String(s.as_str().into()),
        Some(Kind::TimestampMs(ms)) => Value::Timestamp(Timestamp(*ms)),
        Some(Kind::ListValue(list)) => Value::List(
            list.values
                .iter()
                .map(|v| value_from_wire(v, depth + 1))
                .collect::<Result<Vec<_>, _>>()?
                .into(),
        ),
    })
}

impl From<&Value> for pb::Value {
    fn from(value: &Value) -> Self {
        use pb::value::Kind;
        let kind = match value {
            Value::Null => Kind::NullValue(true),
            Value::Bool(b) => Kind::BoolValue(*b),
            Value::Number(n) => Kind::NumberValue(*n),
            Value::String(s) => Kind::StringValue(s.to_string()),
            Value::Timestamp(t) => Kind::TimestampMs(t.millis()),
            Value::List(items) => Kind::ListValue(pb::ValueList {
                values: items.iter().map(pb::Value::from).collect(),
            }),
        };
        pb::Value { kind: Some(kind) }
    }
}

fn properties_from_wire(
    map: &std::collections::BTreeMap<String, pb::Value>,
) -> Result<Properties, ConvertError> {
    let mut props = Properties::new();
    for (key, value) in map {
        let value =
            value_from_wire(value, 0).map_err(|e| ConvertError(format!("{key}: {}", e.0)))?;
        props.insert(key.clone(), value);
    }
    Ok(props)
}

fn properties_to_wire(props: &Properties) -> std::collections::BTreeMap<String, pb::Value> {
    props
        .iter()
        .map(|(k, v)| (k.to_owned(), pb::Value::from(v)))
        .collect()
}

impl TryFrom<pb::Event> for Event {
    type Error = ConvertError;

    fn try_from(event: pb::Event) -> Result<Self, ConvertError> {
        Event::try_from(&event)
    }
}

impl TryFrom<&pb::Event> for Event {
    type Error = ConvertError;

    fn try_from(event: &pb::Event) -> Result<Self, ConvertError> {
        let user = if !event.user_id.is_empty() {
            &event.user_id
        } else if !event.anonymous_id.is_empty() {
            &event.anonymous_id
        } else {
            return fail("the event has neither user_id nor anonymous_id");
        };
        if event.message_id.is_empty() {
            return fail("the event has no message_id");
        }
        let body = match pb::EventType::try_from(event.r#type) {
            Ok(pb::EventType::Track) => {
                if event.event.is_empty() {
                    return fail("a track event needs an event name");
                }
                EventBody::Track {
                    name: event.event.as_str().into(),
                    properties: properties_from_wire(&event.properties)?,
                }
            }
            Ok(pb::EventType::Identify) => EventBody::Identify {
                traits: properties_from_wire(&event.traits)?,
            },
            Ok(pb::EventType::Alias) => {
                if event.previous_id.is_empty() {
                    return fail("an alias event needs previous_id");
                }
                EventBody::Alias {
                    previous_id: event.previous_id.as_str().into(),
                }
            }
            Ok(pb::EventType::Unspecified) | Err(_) => {
                return fail("the event type must be track, identify or alias");
            }
        };
        Ok(Event {
            message_id: event.message_id.as_str().into(),
            user: UserId::new(user.clone()),
            timestamp: Timestamp(event.timestamp_ms),
            body,
        })
    }
}

impl From<&Event> for pb::Event {
    fn from(event: &Event) -> Self {
        let mut out = pb::Event {
            message_id: event.message_id.to_string(),
            user_id: event.user.to_string(),
            timestamp_ms: event.timestamp.millis(),
            ..pb::Event::default()
        };
        match &event.body {
            EventBody::Track { name, properties } => {
                out.r#type = pb::EventType::Track.into();
                out.event = name.to_string();
                out.properties = properties_to_wire(properties);
            }
            EventBody::Identify { traits } => {
                out.r#type = pb::EventType::Identify.into();
                out.traits = properties_to_wire(traits);
            }
            EventBody::Alias { previous_id } => {
                out.r#type = pb::EventType::Alias.into();
                out.previous_id = previous_id.to_string();
            }
        }
        out
    }
}

impl TryFrom<pb::SegmentDef> for SegmentDef {
    type Error = ConvertError;

    fn try_from(def: pb::SegmentDef) -> Result<Self, ConvertError> {
        if def.id.is_empty() {
            return fail("a segment needs an id");
        }
        Ok(SegmentDef {
            name: if def.name.is_empty() {
                def.id.clone()
            } else {
                def.name
            },
            id: def.id.as_str().into(),
            description: def.description,
            rule: def.rule,
        })
    }
}

impl From<&SegmentDef> for pb::SegmentDef {
    fn from(def: &SegmentDef) -> Self {
        pb::SegmentDef {
            id: def.id.to_string(),
            name: def.name.clone(),
            description: def.description.clone(),
            rule: def.rule.clone(),
            webhooks: Vec::new(),
        }
    }
}

/// A change as the wire carries it, with the cursor it has in its shard's log.
pub fn change_to_wire(change: &Change, cursor: pb::Cursor) -> pb::MembershipChange {
    pb::MembershipChange {
        user_id: change.user.to_string(),
        segment: change.segment.to_string(),
        kind: match change.kind {
            ChangeKind::Enter => pb::ChangeKind::Enter,
            ChangeKind::Exit => pb::ChangeKind::Exit,
        }
        .into(),
        at_ms: change.at.millis(),
        cause: match change.cause {
            dynseg_rules::Cause::Event => pb::ChangeCause::Event,
            dynseg_rules::Cause::Time => pb::ChangeCause::Time,
            dynseg_rules::Cause::Rule => pb::ChangeCause::Rule,
        }
        .into(),
        rule_version: change.version.0,
        cursor: Some(cursor),
    }
}

impl From<&Clause> for pb::ExplainClause {
    fn from(clause: &Clause) -> Self {
        pb::ExplainClause {
            text: clause.text.clone(),
            truth: clause.truth,
            turns_at_ms: clause.turns_at.map_or(0, Timestamp::millis),
            values: clause
                .values
                .iter()
                .map(|v| pb::ExplainValue {
                    operand: v.text.clone(),
                    value: Some((&v.value).into()),
                    at_least: v.at_least,
                })
                .collect(),
            children: clause.children.iter().map(Into::into).collect(),
        }
    }
}

/// An explanation as the wire carries it (user, rule version and shard are the
/// caller's to fill in).
impl From<&Explanation> for pb::ExplainResponse {
    fn from(e: &Explanation) -> Self {
        let next = e.next_change.as_ref();
        pb::ExplainResponse {
            segment: e.segment.to_string(),
            member: e.member,
            now_ms: e.now.millis(),
            clause: Some((&e.clause).into()),
            next_change_ms: next.map_or(0, |n| n.at.millis()),
            next_change_kind: next.map_or(pb::ChangeKind::Unspecified, |n| match n.kind {
                ChangeKind::Enter => pb::ChangeKind::Enter,
                ChangeKind::Exit => pb::ChangeKind::Exit,
            }) as i32,
            next_change_clause: next.and_then(|n| n.clause.clone()).unwrap_or_default(),
            next_wakeup_ms: e.next_wakeup.map_or(0, Timestamp::millis),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire_event(kind: pb::EventType) -> pb::Event {
        pb::Event {
            message_id: "m1".into(),
            user_id: "alice".into(),
            r#type: kind.into(),
            event: "order_completed".into(),
            timestamp_ms: 1_767_225_600_000,
            properties: [("revenue".to_owned(), pb::Value::from(&Value::Number(12.5)))].into(),
            ..pb::Event::default()
        }
    }

    #[test]
    fn events_round_trip() {
        let event = Event::try_from(wire_event(pb::EventType::Track)).unwrap();
        assert_eq!(event.user.as_str(), "alice");
        assert_eq!(pb::Event::from(&event), wire_event(pb::EventType::Track));
        let identify = pb::Event {
            r#type: pb::EventType::Identify.into(),
            traits: [(
                "tags".to_owned(),
                pb::Value::from(&Value::List(vec![Value::from("a"), Value::Null].into())),
            )]
            .into(),
            ..wire_event(pb::EventType::Identify)
        };
        let domain = Event::try_from(identify).unwrap();
        let EventBody::Identify { traits } = &domain.body else {
            panic!()
        };
        assert_eq!(
            traits.get("tags"),
            &Value::List(vec![Value::from("a"), Value::Null].into())
        );
    }

    #[test]
    fn anonymous_id_stands_in_for_a_missing_user_id() {
        let event = pb::Event {
            user_id: String::new(),
            anonymous_id: "anon-1".into(),
            ..wire_event(pb::EventType::Track)
        };
        assert_eq!(Event::try_from(event).unwrap().user.as_str(), "anon-1");
    }

    #[test]
    fn malformed_events_are_errors_with_reasons() {
        let cases = [
            (
                pb::Event {
                    user_id: String::new(),
                    ..wire_event(pb::EventType::Track)
                },
                "the event has neither user_id nor anonymous_id",
            ),
            (
                pb::Event {
                    message_id: String::new(),
                    ..wire_event(pb::EventType::Track)
                },
                "the event has no message_id",
            ),
            (
                pb::Event {
                    event: String::new(),
                    ..wire_event(pb::EventType::Track)
                },
                "a track event needs an event name",
            ),
            (
                wire_event(pb::EventType::Unspecified),
                "the event type must be track, identify or alias",
            ),
            (
                pb::Event {
                    r#type: 99,
                    ..wire_event(pb::EventType::Track)
                },
                "the event type must be track, identify or alias",
            ),
            (
                wire_event(pb::EventType::Alias),
                "an alias event needs previous_id",
            ),
            (
                pb::Event {
                    properties: [(
                        "x".to_owned(),
                        pb::Value {
                            kind: Some(pb::value::Kind::NumberValue(f64::NAN)),
                        },
                    )]
                    .into(),
                    ..wire_event(pb::EventType::Track)
                },
                "x: number NaN is not finite",
            ),
        ];
        for (event, reason) in cases {
            assert_eq!(Event::try_from(event).unwrap_err().0, reason);
        }
    }

    #[test]
    fn deeply_nested_lists_are_refused() {
        let mut value = pb::Value::from(&Value::Null);
        for _ in 0..100 {
            value = pb::Value {
                kind: Some(pb::value::Kind::ListValue(pb::ValueList {
                    values: vec![value],
                })),
            };
        }
        assert!(
            Value::try_from(value)
                .unwrap_err()
                .0
                .contains("nest deeper")
        );
    }
}
