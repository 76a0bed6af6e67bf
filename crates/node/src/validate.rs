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
    /// Largest magnitude of a number.
    pub max_number: f64,
    /// How far into the future (past `now`) an event may be stamped.
    pub max_future_skew: Span,
    /// Events in one batch.
    pub max_batch: usize,
}

impl Default for EventLimits {
    fn default() -> Self {
        EventLimits {
            max_id_bytes: 256,
            max_properties: 256,
            max_key_bytes: 256,
            max_string_bytes: 8 * 1024,
            max_list_items: 1_000,
            max_number: 1e300,
            max_future_skew: Span::minutes(5),
            max_batch: 10_000,
        }
    }
}

impl EventLimits {
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
            self.check_value(key, value, &mut items)?;
        }
        Ok(())
    }

    fn check_value(&self, key: &str, value: &Value, items: &mut usize) -> Result<(), String> {
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
            Value::List(list) => {
                for item in list.iter() {
                    *items += 1;
                    if *items > self.max_list_items {
                        return Err(format!(
                            "{key}: list of more than {} items",
                            self.max_list_items
                        ));
                    }
                    self.check_value(key, item, items)?;
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
    fn each_bound_has_a_clear_reason() {
        let limits = EventLimits {
            max_properties: 2,
            max_string_bytes: 4,
            max_list_items: 3,
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
