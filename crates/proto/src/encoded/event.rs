//! [`EventView`]: an encoded `dynseg.v1.Event` read in place.
//!
//! The gateway routes an event by its user and the node turns it into a domain
//! [`Event`]; neither needs the owned `pb::Event` prost would build (a `String`
//! per id, a map node, key and value per property) only to read it once and
//! drop it. The view reads the ids as `&str` into the event's bytes, and the
//! node builds the domain event straight from them.
//!
//! It decodes exactly as prost would: fields in any order, the last of a
//! repeated scalar winning, repeated map keys keeping the last value, repeated
//! embedded messages merged, unknown fields skipped. A property test checks
//! this against prost and `TryFrom<&pb::Event>`. Where prost would refuse the
//! whole request (a string that is not UTF-8, a cut field), the view refuses
//! only that event, so the rest of its batch is kept.

use dynseg_rules::{Event, EventBody, Properties, Timestamp, UserId, Value};

use super::wire::{FIXED64, Malformed, Reader, expect};
use crate::ConvertError;
use crate::pb;

/// Field numbers of `Event` in proto/dynseg/v1/events.proto (read here,
/// written by [`super::EventWriter`]).
pub(super) mod field {
    pub(in crate::encoded) const MESSAGE_ID: u32 = 1;
    pub(in crate::encoded) const USER_ID: u32 = 2;
    pub(in crate::encoded) const ANONYMOUS_ID: u32 = 3;
    pub(in crate::encoded) const TYPE: u32 = 4;
    pub(in crate::encoded) const EVENT: u32 = 5;
    pub(in crate::encoded) const TIMESTAMP_MS: u32 = 6;
    pub(in crate::encoded) const PROPERTIES: u32 = 7;
    pub(in crate::encoded) const TRAITS: u32 = 8;
    pub(in crate::encoded) const PREVIOUS_ID: u32 = 9;
}

/// Most map entries a conversion makes room for up front (see
/// `EventView::properties`).
const MAX_PRESIZED_ENTRIES: usize = 16;

/// Lists may nest, but not without bound: decoding is recursive (the same
/// bound as the conversion from `pb::Value`).
const MAX_VALUE_DEPTH: usize = 16;

/// The scalar fields of one encoded event, borrowed from its bytes; the
/// property and trait maps are read when [`EventView::to_event`] needs them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EventView<'a> {
    bytes: &'a [u8],
    /// `message_id` ("" when absent, as in proto3).
    pub message_id: &'a str,
    /// `user_id`.
    pub user_id: &'a str,
    /// `anonymous_id`.
    pub anonymous_id: &'a str,
    /// `type`, as the number on the wire.
    pub event_type: i32,
    /// `event`: a track event's name.
    pub event: &'a str,
    /// `timestamp_ms` (0: unset).
    pub timestamp_ms: i64,
    /// `previous_id`: an alias's other id.
    pub previous_id: &'a str,
    /// Whether the event has top-level fields this version does not know.
    unknown: bool,
    /// How many `properties` entries the bytes hold (repeated keys counted
    /// each time): a map that is absent is not looked for again.
    property_entries: usize,
    /// How many `traits` entries the bytes hold.
    trait_entries: usize,
}

fn malformed(e: Malformed) -> ConvertError {
    ConvertError(format!("malformed event: {e}"))
}

impl<'a> EventView<'a> {
    /// Reads the event's scalar fields, checking that every field is well
    /// formed and every string UTF-8; the maps' entries are checked by
    /// [`EventView::to_event`].
    pub fn parse(bytes: &'a [u8]) -> Result<EventView<'a>, ConvertError> {
        let mut view = EventView {
            bytes,
            message_id: "",
            user_id: "",
            anonymous_id: "",
            event_type: 0,
            event: "",
            timestamp_ms: 0,
            previous_id: "",
            unknown: false,
            property_entries: 0,
            trait_entries: 0,
        };
        let mut reader = Reader::new(bytes);
        while !reader.is_empty() {
            let (number, wire_type) = reader.key().map_err(malformed)?;
            let read = match number {
                field::MESSAGE_ID => reader
                    .string(number, wire_type)
                    .map(|s| view.message_id = s),
                field::USER_ID => reader.string(number, wire_type).map(|s| view.user_id = s),
                field::ANONYMOUS_ID => reader
                    .string(number, wire_type)
                    .map(|s| view.anonymous_id = s),
                // Enums and int64 are varints; prost keeps their low bits.
                field::TYPE => reader
                    .varint_field(number, wire_type)
                    .map(|v| view.event_type = v as i32),
                field::EVENT => reader.string(number, wire_type).map(|s| view.event = s),
                field::TIMESTAMP_MS => reader
                    .varint_field(number, wire_type)
                    .map(|v| view.timestamp_ms = v as i64),
                field::PROPERTIES => reader
                    .message(number, wire_type)
                    .map(|_| view.property_entries += 1),
                field::TRAITS => reader
                    .message(number, wire_type)
                    .map(|_| view.trait_entries += 1),
                field::PREVIOUS_ID => reader
                    .string(number, wire_type)
                    .map(|s| view.previous_id = s),
                _ => {
                    view.unknown = true;
                    reader.skip(wire_type)
                }
            };
            read.map_err(malformed)?;
        }
        Ok(view)
    }

    /// The key the event is routed by: `user_id`, else `anonymous_id`.
    pub fn user_key(&self) -> Option<&'a str> {
        [self.user_id, self.anonymous_id]
            .into_iter()
            .find(|id| !id.is_empty())
    }

    /// The event's type, if it is one this version knows.
    pub fn kind(&self) -> Option<pb::EventType> {
        pb::EventType::try_from(self.event_type).ok()
    }

    /// The domain event, with the same checks and reasons as
    /// `Event::try_from(&pb::Event)`. A map the event's type does not use is
    /// checked to be well formed too (not for its content, which the
    /// conversion ignores), so an accepted event always decodes as a
    /// `pb::Event`.
    pub fn to_event(&self) -> Result<Event, ConvertError> {
        self.to_event_noting_unknown().map(|(event, _)| event)
    }

    /// [`EventView::to_event`], and whether the bytes carry fields, at any
    /// depth, that this version does not know (and so ignored): such bytes
    /// are more than the event this node understood.
    pub fn to_event_noting_unknown(&self) -> Result<(Event, bool), ConvertError> {
        let mut unknown = self.unknown;
        let event = self.build(&mut unknown)?;
        Ok((event, unknown))
    }

    fn build(&self, unknown: &mut bool) -> Result<Event, ConvertError> {
        let Some(user) = self.user_key() else {
            return Err(ConvertError(
                "the event has neither user_id nor anonymous_id".into(),
            ));
        };
        if self.message_id.is_empty() {
            return Err(ConvertError("the event has no message_id".into()));
        }
        let body = match self.kind() {
            Some(pb::EventType::Track) => {
                if self.event.is_empty() {
                    return Err(ConvertError("a track event needs an event name".into()));
                }
                let properties = self.properties(field::PROPERTIES, unknown)?;
                self.check_map(field::TRAITS, unknown)?;
                EventBody::Track {
                    name: self.event.into(),
                    properties,
                }
            }
            Some(pb::EventType::Identify) => {
                let traits = self.properties(field::TRAITS, unknown)?;
                self.check_map(field::PROPERTIES, unknown)?;
                EventBody::Identify { traits }
            }
            Some(pb::EventType::Alias) => {
                if self.previous_id.is_empty() {
                    return Err(ConvertError("an alias event needs previous_id".into()));
                }
                self.check_map(field::PROPERTIES, unknown)?;
                self.check_map(field::TRAITS, unknown)?;
                EventBody::Alias {
                    previous_id: self.previous_id.into(),
                }
            }
            Some(pb::EventType::Unspecified) | None => {
                return Err(ConvertError(
                    "the event type must be track, identify or alias".into(),
                ));
            }
        };
        Ok(Event {
            message_id: self.message_id.into(),
            user: UserId::new(user),
            timestamp: Timestamp(self.timestamp_ms),
            body,
        })
    }

    /// How many entries of map field `number` the bytes hold.
    fn entry_count(&self, number: u32) -> usize {
        if number == field::PROPERTIES {
            self.property_entries
        } else {
            self.trait_entries
        }
    }

    /// The entries of map field `number` (properties or traits).
    fn properties(&self, number: u32, unknown: &mut bool) -> Result<Properties, ConvertError> {
        let count = self.entry_count(number);
        if count == 0 {
            return Ok(Properties::new());
        }
        // Sized by the entries, but not past a handful: repeated keys count
        // each time, and bytes of many tiny repeated entries must not buy a
        // large allocation before the limits are checked.
        let mut props = Properties::with_capacity(count.min(MAX_PRESIZED_ENTRIES));
        self.entries(number, unknown, |key, value| {
            props.insert(key, value);
            Ok(())
        })?;
        // Checked once the map is whole, in key order, as the conversion from
        // prost's map checks it: a repeated key's earlier value does not count.
        for (key, value) in props.iter() {
            check_finite(value).map_err(|e| in_key(key, e))?;
        }
        Ok(props)
    }

    /// Checks that the entries of map field `number` are well formed.
    fn check_map(&self, number: u32, unknown: &mut bool) -> Result<(), ConvertError> {
        if self.entry_count(number) == 0 {
            return Ok(());
        }
        self.entries(number, unknown, |_, _| Ok(()))
    }

    fn entries(
        &self,
        number: u32,
        unknown: &mut bool,
        mut each: impl FnMut(&str, Value) -> Result<(), ConvertError>,
    ) -> Result<(), ConvertError> {
        let mut reader = Reader::new(self.bytes);
        while !reader.is_empty() {
            let (n, wire_type) = reader.key().map_err(malformed)?;
            if n != number {
                reader.skip(wire_type).map_err(malformed)?;
                continue;
            }
            let entry = reader.message(n, wire_type).map_err(malformed)?;
            let (key, value) = map_entry(entry, unknown)?;
            each(key, value)?;
        }
        Ok(())
    }
}

/// What routing reads of an encoded event: its user key and its type.
///
/// The event's structure is checked as [`EventView::parse`] checks it, with
/// the same reasons, but its strings are not checked to be UTF-8: the node
/// that takes the event parses it in full and refuses it then, with the
/// reason `parse` gives, so a gateway checking them as well did the work
/// twice (UTF-8 checks were about 4% of the dev cluster's CPU). The shard of a
/// user key is a hash of its bytes, the same whether they are text or not.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouteView<'a> {
    user_id: &'a [u8],
    anonymous_id: &'a [u8],
    event_type: i32,
}

impl<'a> RouteView<'a> {
    /// Reads the fields routing needs, checking that every field is well
    /// formed (but not that strings are UTF-8).
    pub fn parse(bytes: &'a [u8]) -> Result<RouteView<'a>, ConvertError> {
        let mut view = RouteView {
            user_id: &[],
            anonymous_id: &[],
            event_type: 0,
        };
        let mut reader = Reader::new(bytes);
        while !reader.is_empty() {
            let (number, wire_type) = reader.key().map_err(malformed)?;
            let read = match number {
                field::USER_ID => reader.message(number, wire_type).map(|b| view.user_id = b),
                field::ANONYMOUS_ID => reader
                    .message(number, wire_type)
                    .map(|b| view.anonymous_id = b),
                field::TYPE => reader
                    .varint_field(number, wire_type)
                    .map(|v| view.event_type = v as i32),
                field::TIMESTAMP_MS => reader.varint_field(number, wire_type).map(drop),
                field::MESSAGE_ID
                | field::EVENT
                | field::PREVIOUS_ID
                | field::PROPERTIES
                | field::TRAITS => reader.message(number, wire_type).map(drop),
                _ => reader.skip(wire_type),
            };
            read.map_err(malformed)?;
        }
        Ok(view)
    }

    /// The key the event is routed by: `user_id`, else `anonymous_id`.
    pub fn user_key(&self) -> Option<&'a [u8]> {
        [self.user_id, self.anonymous_id]
            .into_iter()
            .find(|id| !id.is_empty())
    }

    /// The event's type, if it is one this version knows.
    pub fn kind(&self) -> Option<pb::EventType> {
        pb::EventType::try_from(self.event_type).ok()
    }

    /// `user_id` and `anonymous_id`, as bytes.
    pub fn ids(&self) -> (&'a [u8], &'a [u8]) {
        (self.user_id, self.anonymous_id)
    }
}

/// One map entry: `key` = 1, `value` = 2; an absent value is null.
fn map_entry<'e>(entry: &'e [u8], unknown: &mut bool) -> Result<(&'e str, Value), ConvertError> {
    let mut key = "";
    let mut value = Value::Null;
    let mut reader = Reader::new(entry);
    while !reader.is_empty() {
        let (n, wire_type) = reader.key().map_err(malformed)?;
        match n {
            1 => key = reader.string(n, wire_type).map_err(malformed)?,
            // A repeated embedded message merges into the first.
            2 => {
                let bytes = reader.message(n, wire_type).map_err(malformed)?;
                merge_value(&mut value, bytes, 0, unknown).map_err(|e| in_key(key, e))?;
            }
            _ => {
                *unknown = true;
                reader.skip(wire_type).map_err(malformed)?;
            }
        }
    }
    Ok((key, value))
}

/// The reason, prefixed with the property's key as the `pb::Value`
/// conversion words it. (The key is the one read so far; prost reads the
/// key first when it is written first, as every encoder writes it.)
fn in_key(key: &str, e: ConvertError) -> ConvertError {
    ConvertError(format!("{key}: {}", e.0))
}

/// Merges one encoded `Value` into `value`: a scalar replaces it, a list
/// merges into a list (its items appended) and replaces anything else.
fn merge_value(
    value: &mut Value,
    bytes: &[u8],
    depth: usize,
    unknown: &mut bool,
) -> Result<(), ConvertError> {
    if depth > MAX_VALUE_DEPTH {
        return Err(ConvertError(format!(
            "values nest deeper than {MAX_VALUE_DEPTH} lists"
        )));
    }
    let mut reader = Reader::new(bytes);
    while !reader.is_empty() {
        let (n, wire_type) = reader.key().map_err(malformed)?;
        match n {
            1 => {
                reader.varint_field(n, wire_type).map_err(malformed)?;
                *value = Value::Null;
            }
            2 => *value = Value::Bool(reader.varint_field(n, wire_type).map_err(malformed)? != 0),
            3 => {
                expect(n, wire_type, FIXED64).map_err(malformed)?;
                *value = Value::Number(f64::from_bits(reader.fixed64().map_err(malformed)?));
            }
            4 => *value = Value::String(reader.string(n, wire_type).map_err(malformed)?.into()),
            5 => {
                let ms = reader.varint_field(n, wire_type).map_err(malformed)? as i64;
                *value = Value::Timestamp(Timestamp(ms));
            }
            6 => {
                let list = reader.message(n, wire_type).map_err(malformed)?;
                let mut items = match std::mem::take(value) {
                    Value::List(items) => items.into_vec(),
                    _ => Vec::new(),
                };
                list_items(&mut items, list, depth, unknown)?;
                *value = Value::List(items.into());
            }
            _ => {
                *unknown = true;
                reader.skip(wire_type).map_err(malformed)?;
            }
        }
    }
    Ok(())
}

/// Appends the items of an encoded `ValueList` (`values` = 1, repeated).
fn list_items(
    items: &mut Vec<Value>,
    list: &[u8],
    depth: usize,
    unknown: &mut bool,
) -> Result<(), ConvertError> {
    let mut reader = Reader::new(list);
    while !reader.is_empty() {
        let (n, wire_type) = reader.key().map_err(malformed)?;
        if n == 1 {
            let bytes = reader.message(n, wire_type).map_err(malformed)?;
            let mut item = Value::Null;
            merge_value(&mut item, bytes, depth + 1, unknown)?;
            items.push(item);
        } else {
            *unknown = true;
            reader.skip(wire_type).map_err(malformed)?;
        }
    }
    Ok(())
}

/// Numbers are checked after decoding, as the `pb::Value` conversion checks
/// them: a later field may replace a number that is not finite.
fn check_finite(value: &Value) -> Result<(), ConvertError> {
    match value {
        Value::Number(n) if !n.is_finite() => {
            Err(ConvertError(format!("number {n} is not finite")))
        }
        Value::List(items) => items.iter().try_for_each(check_finite),
        _ => Ok(()),
    }
}
