//! The data model of SPEC.md section 2: identities, events and their properties.

use std::fmt;

use crate::id::{IdStr, MessageStr};
use crate::time::Timestamp;
use crate::value::Value;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        string_id!($(#[$doc])* $name, IdStr);
    };
    ($(#[$doc:meta])* $name:ident, $repr:ty) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name($repr);

        impl $name {
            /// Wraps a string.
            pub fn new(id: impl Into<$repr>) -> Self {
                $name(id.into())
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                $name(id.into())
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                self.as_str()
            }
        }
    };
}

string_id!(
    /// A user: the event's `user_id`, or its `anonymous_id` when it has none.
    UserId
);
string_id!(
    /// A segment's stable id, such as `repeat_buyers`.
    SegmentId
);
string_id!(
    /// The name of a track event, such as `order_completed`.
    EventName
);
string_id!(
    /// The client's idempotency key for one event (up to 46 bytes inline:
    /// see [`MessageStr`]).
    MessageId,
    MessageStr
);

/// One accepted event of one user.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Idempotency key; the node drops repeats before the engine sees them.
    pub message_id: MessageId,
    /// Whose event this is.
    pub user: UserId,
    /// Event time (when it happened, not when it arrived).
    pub timestamp: Timestamp,
    /// What happened.
    pub body: EventBody,
}

/// The kinds of event.
#[derive(Clone, Debug, PartialEq)]
pub enum EventBody {
    /// A named behavioural event with properties.
    Track {
        /// The event name aggregates select on.
        name: EventName,
        /// The event's properties.
        properties: Properties,
    },
    /// An update of the user's profile traits.
    Identify {
        /// Traits to set; a key with null sets the trait to null, an absent key
        /// leaves it unchanged.
        traits: Properties,
    },
    /// Links another id to this user. Identity merge is the node's job; the rule
    /// engine only records that the user exists.
    Alias {
        /// The id being merged into this user.
        previous_id: UserId,
    },
}

impl Event {
    /// A track event.
    pub fn track(
        message_id: impl Into<MessageId>,
        user: impl Into<UserId>,
        name: impl Into<EventName>,
        timestamp: Timestamp,
        properties: Properties,
    ) -> Event {
        Event {
            message_id: message_id.into(),
            user: user.into(),
            timestamp,
            body: EventBody::Track {
                name: name.into(),
                properties,
            },
        }
    }

    /// An identify event.
    pub fn identify(
        message_id: impl Into<MessageId>,
        user: impl Into<UserId>,
        timestamp: Timestamp,
        traits: Properties,
    ) -> Event {
        Event {
            message_id: message_id.into(),
            user: user.into(),
            timestamp,
            body: EventBody::Identify { traits },
        }
    }
}

/// A small map of keys to values, kept sorted by key (events have few properties,
/// so a sorted vector beats a hash map in both memory and lookup time). Keys
/// are [`IdStr`]s: a key of up to 22 bytes (nearly all of them) costs no
/// allocation, where a `Box<str>` cost one per key per event.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Properties(Vec<(IdStr, Value)>);

impl Properties {
    /// No properties.
    pub const fn new() -> Self {
        Properties(Vec::new())
    }

    /// No properties, with room for `capacity` keys.
    pub fn with_capacity(capacity: usize) -> Self {
        Properties(Vec::with_capacity(capacity))
    }

    /// The value of `key`; a missing key reads as null.
    pub fn get(&self, key: &str) -> &Value {
        const NULL: &Value = &Value::Null;
        // Events carry a handful of properties: a scan that compares lengths
        // first beats a binary search of string comparisons.
        if self.0.len() <= 8 {
            return self
                .0
                .iter()
                .find(|(k, _)| k.as_str() == key)
                .map_or(NULL, |(_, v)| v);
        }
        match self.0.binary_search_by(|(k, _)| k.as_str().cmp(key)) {
            Ok(i) => &self.0[i].1,
            Err(_) => NULL,
        }
    }

    /// True when `key` is present (even with a null value).
    pub fn contains_key(&self, key: &str) -> bool {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .is_ok()
    }

    /// Sets `key` to `value`, replacing an earlier value.
    pub fn insert(&mut self, key: impl Into<IdStr>, value: Value) {
        let key = key.into();
        match self
            .0
            .binary_search_by(|(k, _)| k.as_str().cmp(key.as_str()))
        {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (key, value)),
        }
    }

    /// The entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no keys.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Into<IdStr>> FromIterator<(K, Value)> for Properties {
    /// Builds the map; when a key repeats, the last value wins.
    fn from_iter<I: IntoIterator<Item = (K, Value)>>(iter: I) -> Self {
        let mut props = Properties::new();
        for (k, v) in iter {
            props.insert(k, v);
        }
        props
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_read_as_null_and_last_write_wins() {
        let props: Properties = [
            ("b", Value::Number(1.0)),
            ("a", Value::from("x")),
            ("b", Value::Number(2.0)),
            ("c", Value::Null),
        ]
        .into_iter()
        .collect();
        assert_eq!(props.len(), 3);
        assert_eq!(props.get("b"), &Value::Number(2.0));
        assert!(props.get("zzz").is_null());
        assert!(props.contains_key("c"));
        assert!(!props.contains_key("zzz"));
        let keys: Vec<_> = props.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "b", "c"]);
    }
}
