//! The encoded messages against prost's: the same bytes on the wire, and the
//! same domain events (or the same reasons) from [`EventView`] as from prost
//! followed by `TryFrom<&pb::Event>`.

use std::collections::BTreeMap;

use bytes::Bytes;
use dynseg_rules::Event;
use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::ConvertError;

fn via_view(bytes: &[u8]) -> Result<Event, ConvertError> {
    EventView::parse(bytes)?.to_event()
}

fn via_prost(bytes: &[u8]) -> Result<Event, ConvertError> {
    let event = pb::Event::decode(bytes).map_err(|e| ConvertError(e.to_string()))?;
    Event::try_from(&event)
}

fn value() -> impl Strategy<Value = pb::Value> {
    use pb::value::Kind;
    let leaf = prop_oneof![
        Just(None),
        any::<bool>().prop_map(|b| Some(Kind::NullValue(b))),
        any::<bool>().prop_map(|b| Some(Kind::BoolValue(b))),
        prop_oneof![
            -1e6..1e6f64,
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(0.0),
            Just(-0.0)
        ]
        .prop_map(|n| Some(Kind::NumberValue(n))),
        "[a-zé]{0,6}".prop_map(|s| Some(Kind::StringValue(s))),
        any::<i64>().prop_map(|ms| Some(Kind::TimestampMs(ms))),
    ]
    .prop_map(|kind| pb::Value { kind });
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop::collection::vec(inner, 0..4).prop_map(|values| pb::Value {
            kind: Some(pb::value::Kind::ListValue(pb::ValueList { values })),
        })
    })
}

fn map() -> impl Strategy<Value = BTreeMap<String, pb::Value>> {
    prop::collection::btree_map(
        prop_oneof![Just(String::new()), "[a-d]{1,2}", "[a-z_]{20,30}"],
        value(),
        0..4,
    )
}

fn id() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z0-9]{1,8}", "[a-z0-9]{23,40}"]
}

fn event() -> impl Strategy<Value = pb::Event> {
    (
        (id(), id(), id(), -1..5i32, id()),
        (any::<i64>(), map(), map(), id()),
    )
        .prop_map(
            |(
                (message_id, user_id, anonymous_id, r#type, event),
                (timestamp_ms, properties, traits, previous_id),
            )| pb::Event {
                message_id,
                user_id,
                anonymous_id,
                r#type,
                event,
                timestamp_ms,
                properties,
                traits,
                previous_id,
            },
        )
}

/// A runner with a fixed seed (`DYNSEG_SEED` to change it; printed on
/// failure) and `DYNSEG_CASES` cases, 2,000 by default.
fn check<S: Strategy>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let seed = var("DYNSEG_SEED", 20_261_130);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases: var("DYNSEG_CASES", 2_000) as u32,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{name} failed with DYNSEG_SEED={seed}: {e}");
    }
}

/// Every event, valid or not, gives what prost and the conversion give.
#[test]
fn the_view_decodes_as_prost_does() {
    check("the view decodes as prost does", event(), |event| {
        let bytes = event.encode_to_vec();
        prop_assert_eq!(via_view(&bytes), Event::try_from(&event));
        Ok(())
    });
}

/// Two encodings one after the other are one message with the fields of
/// both merged (the last scalar wins, map entries add up, a repeated key
/// keeps its last value): the view merges as prost does.
#[test]
fn concatenated_events_merge_as_in_prost() {
    check("concatenated events merge", (event(), event()), |(a, b)| {
        let mut bytes = a.encode_to_vec();
        b.encode_raw(&mut bytes);
        prop_assert_eq!(via_view(&bytes), via_prost(&bytes));
        Ok(())
    });
}

/// A batch with encoded events is the same bytes as the typed batch, both ways.
#[test]
fn encoded_batches_are_typed_batches_on_the_wire() {
    let batch = (
        prop::collection::vec(event(), 0..4),
        any::<u32>(),
        any::<u64>(),
    );
    check("encoded batches", batch, |(events, shard, epoch)| {
        let typed = pb::EventBatch {
            shard,
            epoch,
            events,
        };
        let encoded = EventBatch::from(&typed);
        prop_assert_eq!(encoded.encode_to_vec(), typed.encode_to_vec());
        let decoded = EventBatch::decode(Bytes::from(typed.encode_to_vec()));
        prop_assert_eq!(decoded.ok(), Some(encoded));
        Ok(())
    });
}

/// Edits that damage an encoding: a byte overwritten, a byte spliced in, or
/// the rest cut off, at a place chosen along it.
type Edit = (prop::sample::Index, u8, u8);

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4)
}

fn damage(bytes: &mut Vec<u8>, edits: Vec<Edit>) {
    for (at, byte, how) in edits {
        let at = at.index(bytes.len() + 1);
        match how {
            0 if at < bytes.len() => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            _ => bytes.truncate(at),
        }
    }
}

/// Bytes off the network are anything: valid events cut, with bytes
/// overwritten or spliced in. The view never panics, and an event it accepts
/// is one prost decodes to the same domain event.
#[test]
fn damaged_events_are_refused_or_read_as_prost_reads_them() {
    let cases = (event(), edits(), any::<prop::sample::Index>());
    check("damaged events", cases, |(event, edits, cut)| {
        let mut bytes = event.encode_to_vec();
        damage(&mut bytes, edits);
        let bytes = &bytes[..cut.index(bytes.len() + 1)];
        if let Ok(accepted) = via_view(bytes) {
            prop_assert_eq!(via_prost(bytes), Ok(accepted));
        }
        Ok(())
    });
}

/// Routing reads the user key and type the full view reads, and refuses
/// what it refuses with the same reason, except strings that are not UTF-8:
/// those it leaves to the node, which refuses the event then.
#[test]
fn the_route_view_reads_what_the_view_reads_but_leaves_utf8_to_the_node() {
    let cases = (
        event(),
        edits(),
        any::<prop::sample::Index>(),
        any::<bool>(),
    );
    check("route view", cases, |(event, edits, cut, damaged)| {
        let mut bytes = event.encode_to_vec();
        if damaged {
            damage(&mut bytes, edits);
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        let route = RouteView::parse(&bytes);
        match EventView::parse(&bytes) {
            Ok(view) => {
                let route = route.map_err(|e| TestCaseError::fail(e.0))?;
                prop_assert_eq!(route.user_key(), view.user_key().map(str::as_bytes));
                prop_assert_eq!(route.kind(), view.kind());
            }
            // The first fault the view met; routing passes over it and may
            // meet a later, structural one.
            Err(e) if e.0.contains("not valid UTF-8") => {
                if let Err(r) = route {
                    prop_assert!(!r.0.contains("UTF-8"), "{}", r.0);
                }
            }
            Err(e) => prop_assert_eq!(route.err(), Some(e)),
        }
        Ok(())
    });
}

fn track(user: &str) -> pb::Event {
    pb::Event {
        message_id: "m1".into(),
        user_id: user.into(),
        r#type: pb::EventType::Track.into(),
        event: "order_completed".into(),
        timestamp_ms: 1_700_000_000_000,
        ..Default::default()
    }
}

#[test]
fn decoding_a_batch_slices_the_request_instead_of_copying_it() {
    let typed = pb::EventBatch {
        shard: 3,
        epoch: 9,
        events: vec![track("alice"), track("bob")],
    };
    let buffer = Bytes::from(typed.encode_to_vec());
    let batch = EventBatch::decode(buffer.clone()).unwrap();
    let within = buffer.as_ptr_range();
    for event in &batch.events {
        assert!(within.contains(&event.as_ptr()), "an event was copied");
    }
    let users: Vec<_> = batch
        .events
        .iter()
        .map(|e| EventView::parse(e).unwrap().user_key())
        .collect();
    assert_eq!(users, [Some("alice"), Some("bob")]);
}

#[test]
fn unknown_fields_are_skipped() {
    let mut bytes = track("alice").encode_to_vec();
    // Fields 15 (varint), 16 (64-bit), 17 (bytes) and 18 (32-bit).
    bytes.extend_from_slice(&[0x78, 0x96, 0x01]);
    bytes.extend_from_slice(&[0x81, 0x01, 1, 2, 3, 4, 5, 6, 7, 8]);
    bytes.extend_from_slice(&[0x8a, 0x01, 2, b'h', b'i']);
    bytes.extend_from_slice(&[0x95, 0x01, 1, 2, 3, 4]);
    assert_eq!(via_view(&bytes), Event::try_from(&track("alice")));
    let noted = |bytes: &[u8]| {
        let view = EventView::parse(bytes).unwrap();
        view.to_event_noting_unknown().unwrap().1
    };
    assert!(noted(&bytes), "fields 15 to 18 are unknown");
    assert!(!noted(&track("alice").encode_to_vec()));

    // Inside a property's value: property "n", a Value with number 1.0 and
    // an unknown field 9 (varint 1).
    let mut value = vec![0x19];
    value.extend_from_slice(&1.0f64.to_le_bytes());
    value.extend_from_slice(&[0x48, 0x01]);
    let mut entry = vec![0x0a, 1, b'n', 0x12, value.len() as u8];
    entry.extend_from_slice(&value);
    let mut nested = track("alice").encode_to_vec();
    nested.extend_from_slice(&[0x3a, entry.len() as u8]);
    nested.extend_from_slice(&entry);
    assert!(noted(&nested));
    assert_eq!(via_view(&nested), via_prost(&nested));
    assert!(via_prost(&nested).unwrap() != via_prost(&track("alice").encode_to_vec()).unwrap());
}

#[test]
fn a_malformed_event_is_refused_with_a_reason() {
    let mut not_utf8 = track("alice");
    not_utf8.user_id = "\u{0}lice".into();
    let mut bytes = not_utf8.encode_to_vec();
    let at = bytes.iter().position(|&b| b == 0).unwrap();
    bytes[at] = 0xff;
    let reason = via_view(&bytes).unwrap_err().0;
    assert_eq!(reason, "malformed event: field 2 is not valid UTF-8");
    // prost refuses such bytes too (the whole request, where this is one event).
    assert!(pb::Event::decode(&bytes[..]).is_err());

    let whole = track("alice").encode_to_vec();
    let reason = via_view(&whole[..whole.len() - 1]).unwrap_err().0;
    assert_eq!(reason, "malformed event: the bytes end inside a field");

    // user_id (field 2) sent as a varint.
    let reason = via_view(&[0x10, 0x01]).unwrap_err().0;
    assert_eq!(
        reason,
        "malformed event: field 2 has the wrong wire type (0)"
    );
}

#[test]
fn lists_nested_too_deep_are_refused_by_key() {
    let mut value = pb::Value {
        kind: Some(pb::value::Kind::BoolValue(true)),
    };
    for _ in 0..=16 {
        value = pb::Value {
            kind: Some(pb::value::Kind::ListValue(pb::ValueList {
                values: vec![value],
            })),
        };
    }
    let mut event = track("alice");
    event.properties.insert("deep".into(), value);
    let bytes = event.encode_to_vec();
    let reason = via_view(&bytes).unwrap_err().0;
    assert_eq!(reason, "deep: values nest deeper than 16 lists");
    assert_eq!(Event::try_from(&event).unwrap_err().0, reason);
}

fn change() -> impl Strategy<Value = pb::MembershipChange> {
    // Zero often: proto3 leaves it off the wire, which a merge must respect.
    let number = || prop_oneof![Just(0), any::<u64>()];
    let shard = prop_oneof![Just(0), any::<u32>()];
    let cursor = prop::option::of((shard, number(), number()));
    (
        (id(), id(), 0..4i32, any::<i64>()),
        (0..5i32, any::<u64>(), cursor),
    )
        .prop_map(
            |((user_id, segment, kind, at_ms), (cause, rule_version, cursor))| {
                pb::MembershipChange {
                    user_id,
                    segment,
                    kind,
                    at_ms,
                    cause,
                    rule_version,
                    cursor: cursor.map(|(shard, epoch, sequence)| pb::Cursor {
                        shard,
                        epoch,
                        sequence,
                    }),
                }
            },
        )
}

/// What prost reads of the fields a `ChangeView` has.
fn change_fields(change: &pb::MembershipChange) -> (&str, &str, i64, u32, u64) {
    let (shard, sequence) = change
        .cursor
        .as_ref()
        .map_or((0, 0), |c| (c.shard, c.sequence));
    (
        &change.user_id,
        &change.segment,
        change.at_ms,
        shard,
        sequence,
    )
}

fn view_fields(view: ChangeView<'_>) -> (&str, &str, i64, u32, u64) {
    (
        view.user_id,
        view.segment,
        view.at_ms,
        view.shard,
        view.sequence,
    )
}

/// One change, or two encodings one after the other (one message, the
/// cursors merged): the view reads what prost reads.
#[test]
fn the_change_view_reads_what_prost_reads() {
    check("change view", (change(), change()), |(a, b)| {
        let one = a.encode_to_vec();
        let view = ChangeView::parse(&one).map_err(|e| TestCaseError::fail(e.0))?;
        prop_assert_eq!(view_fields(view), change_fields(&a));

        let mut two = one.clone();
        b.encode_raw(&mut two);
        let merged = pb::MembershipChange::decode(&two[..])
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let view = ChangeView::parse(&two).map_err(|e| TestCaseError::fail(e.0))?;
        prop_assert_eq!(view_fields(view), change_fields(&merged));
        Ok(())
    });
}

/// Damaged changes: the view never panics, and what it reads of a change
/// prost also accepts is what prost reads; an `EncodedChange` decoded from
/// them holds a change prost reads as it reads the damaged bytes.
#[test]
fn damaged_changes_are_refused_or_read_as_prost_reads_them() {
    let cases = (change(), edits());
    check("damaged changes", cases, |(change, edits)| {
        let mut bytes = change.encode_to_vec();
        damage(&mut bytes, edits);
        if let (Ok(view), Ok(typed)) = (
            ChangeView::parse(&bytes),
            pb::MembershipChange::decode(&bytes[..]),
        ) {
            prop_assert_eq!(view_fields(view), change_fields(&typed));
        }
        // Kept as it came, it reads as the bytes it came from.
        if let Ok(kept) = EncodedChange::decode(&bytes[..]) {
            prop_assert_eq!(
                pb::MembershipChange::decode(kept.0).ok(),
                pb::MembershipChange::decode(&bytes[..]).ok()
            );
        }
        Ok(())
    });
}

/// An encoded change, alone, in a batch or in a gateway's change, is the
/// typed change on the wire, both ways.
#[test]
fn encoded_changes_are_typed_changes_on_the_wire() {
    check(
        "encoded changes",
        prop::collection::vec(change(), 0..4),
        |changes| {
            let typed = pb::ChangeBatch {
                changes: changes.clone(),
            };
            let encoded = ChangeBatch {
                changes: changes.iter().map(|c| c.encode_to_vec().into()).collect(),
            };
            prop_assert_eq!(encoded.encode_to_vec(), typed.encode_to_vec());
            let decoded = ChangeBatch::decode(Bytes::from(typed.encode_to_vec()));
            prop_assert_eq!(decoded.ok(), Some(encoded));
            for change in changes {
                let bytes = Bytes::from(change.encode_to_vec());
                let one = EncodedChange(bytes.clone());
                prop_assert_eq!(one.encode_to_vec(), bytes.to_vec());
                let back = EncodedChange::decode(bytes.clone());
                prop_assert_eq!(back.ok(), Some(one.clone()));
                let typed = pb::GatewayChange {
                    change: Some(change),
                    resume_token: "v1:3.12-250.7".into(),
                };
                let encoded = GatewayChange {
                    change: Some(one),
                    resume_token: typed.resume_token.clone(),
                };
                prop_assert_eq!(encoded.encode_to_vec(), typed.encode_to_vec());
                let decoded = GatewayChange::decode(Bytes::from(typed.encode_to_vec()));
                prop_assert_eq!(decoded.ok(), Some(encoded));
            }
            Ok(())
        },
    );
}

#[test]
fn a_malformed_change_is_refused_with_a_reason() {
    let mut bytes = pb::MembershipChange {
        user_id: "alice".into(),
        segment: "vip".into(),
        ..Default::default()
    }
    .encode_to_vec();
    bytes.truncate(bytes.len() - 1);
    assert_eq!(
        ChangeView::parse(&bytes).map(|_| ()),
        Err(ConvertError(
            "malformed change: the bytes end inside a field".into()
        ))
    );
    assert!(EncodedChange::decode(&bytes[..]).is_err());
}

/// Merging into an encoded change appends, as merging encodings does.
#[test]
fn merging_into_an_encoded_change_appends_the_fields() {
    let alice = pb::MembershipChange {
        user_id: "alice".into(),
        ..Default::default()
    };
    let vip = pb::MembershipChange {
        segment: "vip".into(),
        ..Default::default()
    };
    let mut change = EncodedChange::decode(&alice.encode_to_vec()[..]).unwrap();
    change.merge(&vip.encode_to_vec()[..]).unwrap();
    let merged = pb::MembershipChange::decode(change.0).unwrap();
    assert_eq!(
        (merged.user_id.as_str(), merged.segment.as_str()),
        ("alice", "vip")
    );
}
