//! Validation of incoming events (SPEC.md section 6): every bound has a default
//! and can be configured, and a bad event is reported by index with a reason
//! while the good ones in its batch are kept.

use dynseg_rules::{Event, EventBody, Properties, Span, Timestamp, Value};

/// Bounds on one event.
#[derive(Clone, Debug)]
pub struct EventLimits {
    /// Bytes of a message id, user id or event name.
    pub max_id_bytes: usize,
    /// Properties (or traits) on one event.
    pub max_properties: usize,
    /// Bytes of a property key.
    pub max_key_bytes: usize,
    /// Bytes of one string value.
    pub max_string_bytes: usize,
    /// Items in one list, counting nested ones.
    pub max_list_items: usize,
    /// Levels of lists inside lists (a flat list is 1).
    pub max_depth: usize,
    /// Largest magnitude of a number.
    pub max_number: f64,
    /// How far into the future (past `now`) an event may be stamped.
    pub max_future_skew: Span,
    /// Events in one batch.
    pub max_batch: usize,
    /// Bytes of one gRPC message the node decodes (a shard snapshot chunk
    /// or a batch of batches).
    pub max_message_bytes: usize,
}

impl Default for EventLimits {
    fn default() -> Self {
        EventLimits {
            max_id_bytes: 256,
            max_properties: 256,
            max_key_bytes: 256,
            max_string_bytes: 8 * 1024,
            max_list_items: 1_000,
            max_depth: 4,
            max_number: 1e300,
            max_future_skew: Span::minutes(5),
            max_batch: 10_000,
            max_message_bytes: 64 << 20,
        }
    }
}

/// The limits `--limit NAME=VALUE` may set, as (name, what it bounds).
pub const LIMIT_NAMES: &[(&str, &str)] = &[
    (
        "max_id_bytes",
        "bytes of a message id, user id or event name",
    ),
    ("max_properties", "properties or traits on one event"),
    ("max_key_bytes", "bytes of a property key"),
    ("max_string_bytes", "bytes of one string value"),
    ("max_list_items", "items in one list, nested ones included"),
    ("max_depth", "levels of lists inside lists"),
    (
        "max_future_skew_secs",
        "seconds an event may be stamped ahead of the node's clock",
    ),
    ("max_batch", "events in one batch or call"),
    (
        "max_message_bytes",
        "bytes of one gRPC message the node accepts",
    ),
];

impl EventLimits {
    /// Sets one limit from `NAME=VALUE` (`--limit`); errors name the known ones.
    pub fn set(&mut self, assignment: &str) -> Result<(), String> {
        let (name, number) = dynseg_rules::limits::parse_setting(assignment, LIMIT_NAMES)?;
        match name {
            "max_id_bytes" => self.max_id_bytes = number,
            "max_properties" => self.max_properties = number,
            "max_key_bytes" => self.max_key_bytes = number,
            "max_string_bytes" => self.max_string_bytes = number,
            "max_list_items" => self.max_list_items = number,
            "max_depth" => self.max_depth = number,
            "max_future_skew_secs" => {
                // At most ten years: any more is "no limit" and would overflow.
                let seconds = number.min(10 * 365 * 24 * 3600) as i64;
                self.max_future_skew = Span::seconds(seconds);
            }
            "max_message_bytes" => self.max_message_bytes = number,
            "max_batch" => self.max_batch = number,
            other => return Err(format!("unknown limit {other:?}")),
        }
        Ok(())
    }

    /// Checks one event at `now`, and that its user belongs to `shard`.
    pub fn check(
        &self,
        event: &Event,
        now: Timestamp,
        shard: u32,
        shard_count: u32,
    ) -> Result<(), String> {
        for (what, id) in [
            ("message_id", event.message_id.as_str()),
            ("user id", event.user.as_str()),
        ] {
            if id.len() > self.max_id_bytes {
                return Err(format!(
                    "{what} is {} bytes, over the limit of {}",
                    id.len(),
                    self.max_id_bytes
                ));
            }
        }
        let owner = dynseg_proto::shard_for(event.user.as_str(), shard_count);
        if owner != shard {
            return Err(format!(
                "user {} belongs to shard {owner}, not {shard}",
                event.user
            ));
        }
        if event.timestamp > now.plus(self.max_future_skew) {
            return Err(format!(
                "timestamp {} is more than {} ahead of the node's clock ({now})",
                event.timestamp, self.max_future_skew
            ));
        }
        match &event.body {
            EventBody::Track { name, properties } => {
                if name.as_str().len() > self.max_id_bytes {
                    return Err(format!(
                        "event name is over the limit of {} bytes",
                        self.max_id_bytes
                    ));
                }
                self.check_properties(properties)
            }
            EventBody::Identify { traits } => self.check_properties(traits),
            EventBody::Alias { previous_id } => {
                if previous_id.as_str().len() > self.max_id_bytes {
                    return Err(format!(
                        "previous_id is over the limit of {} bytes",
                        self.max_id_bytes
                    ));
                }
                Ok(())
            }
        }
    }

    fn check_properties(&self, props: &Properties) -> Result<(), String> {
        if props.len() > self.max_properties {
            return Err(format!(
                "{} properties, over the limit of {}",
                props.len(),
                self.max_properties
            ));
        }
        for (key, value) in props.iter() {
            if key.len() > self.max_key_bytes {
                return Err(format!(
                    "property key of {} bytes, over the limit of {}",
                    key.len(),
                    self.max_key_bytes
                ));
            }
            let mut items = 0;
            self.check_value(key, value, &mut items, 0)?;
        }
        Ok(())
    }

    fn check_value(
        &self,
        key: &str,
        value: &Value,
        items: &mut usize,
        depth: usize,
    ) -> Result<(), String> {
        match value {
            Value::String(s) if s.len() > self.max_string_bytes => Err(format!(
                "{key}: string of {} bytes, over the limit of {}",
                s.len(),
                self.max_string_bytes
            )),
            Value::Number(n) if !n.is_finite() || n.abs() > self.max_number => Err(format!(
                "{key}: number {n:e} is beyond ±{:e}",
                self.max_number
            )),
            Value::List(_) if depth >= self.max_depth => Err(format!(
                "{key}: lists nested deeper than {} levels",
                self.max_depth
            )),
            Value::List(list) => {
                for item in list.iter() {
                    *items += 1;
                    if *items > self.max_list_items {
                        return Err(format!(
                            "{key}: list of more than {} items",
                            self.max_list_items
                        ));
                    }
                    self.check_value(key, item, items, depth + 1)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard_of(user: &str) -> u32 {
        dynseg_proto::shard_for(user, 16)
    }

    #[test]
    fn limits_are_set_by_name() {
        let mut limits = EventLimits::default();
        limits.set("max_properties=512").unwrap();
        limits.set("max_future_skew_secs=60").unwrap();
        assert_eq!(
            (limits.max_properties, limits.max_future_skew),
            (512, Span::seconds(60))
        );
        for (bad, needle) in [
            ("max_properties", "NAME=VALUE"),
            ("max_properties=0", "not a positive"),
            ("max_properties=lots", "not a positive"),
            ("max_colours=3", "unknown limit \"max_colours\""),
        ] {
            let err = limits.set(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn each_bound_has_a_clear_reason() {
        let limits = EventLimits {
            max_properties: 2,
            max_string_bytes: 4,
            max_list_items: 3,
            max_depth: 2,
            ..EventLimits::default()
        };
        let now = Timestamp(1_000_000);
        let ok = Event::track("m", "alice", "e", now, Properties::new());
        assert_eq!(limits.check(&ok, now, shard_of("alice"), 16), Ok(()));
        let with = |props: Vec<(&str, Value)>| {
            Event::track("m", "alice", "e", now, props.into_iter().collect())
        };
        let cases = [
            (
                with(vec![
                    ("a", Value::Null),
                    ("b", Value::Null),
                    ("c", Value::Null),
                ]),
                "3 properties, over the limit of 2",
            ),
            (
                with(vec![("s", Value::from("too long"))]),
                "s: string of 8 bytes, over the limit of 4",
            ),
            (
                with(vec![("n", Value::Number(1e301))]),
                "n: number 1e301 is beyond ±1e300",
            ),
            (
                with(vec![("l", Value::List(vec![Value::Null; 4].into()))]),
                "l: list of more than 3 items",
            ),
            (
                with(vec![(
                    "d",
                    Value::List(vec![Value::List(vec![Value::List(vec![].into())].into())].into()),
                )]),
                "d: lists nested deeper than 2 levels",
            ),
        ];
        for (event, reason) in cases {
            assert_eq!(
                limits.check(&event, now, shard_of("alice"), 16),
                Err(reason.to_owned())
            );
        }
        let future = Event::track(
            "m",
            "alice",
            "e",
            now.plus(Span::minutes(6)),
            Properties::new(),
        );
        assert!(
            limits
                .check(&future, now, shard_of("alice"), 16)
                .unwrap_err()
                .contains("ahead of the node's clock")
        );
        let wrong = shard_of("alice") + 1;
        assert!(
            limits
                .check(&ok, now, wrong % 16, 16)
                .unwrap_err()
                .contains("belongs to shard")
        );
        let long_id = Event::track(
            "m".repeat(300).as_str(),
            "alice",
            "e",
            now,
            Properties::new(),
        );
        assert_eq!(
            limits.check(&long_id, now, shard_of("alice"), 16),
            Err("message_id is 300 bytes, over the limit of 256".into())
        );
    }
}
