//! The generated e-commerce and SaaS traffic of `dynseg demo` and
//! `dynseg bench`: a skewed choice of users and a fixed mix of events.
//!
//! Each draw is a [`Sample`], plain data over the generator's vocabulary; the
//! demo and the tests turn it into a `pb::Event`, the load generator writes
//! its encoding straight into a batch buffer (no owned strings or maps per
//! event, which made the generator a fifth of the machine's CPU at full rate).
//! Both come from the same draw, so the two are the same traffic.
//!
//! Some events are dated just inside a window's edge, so time-driven exits
//! (carts abandoned for 24 hours, for instance) happen live during the demo.

use dynseg_proto::encoded::{EventWriter, ScalarRef};
use dynseg_proto::pb;

/// Deterministic generator (xorshift64*), seeded per run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// A property or trait value of a generated event.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SampleValue {
    /// A string from the generator's vocabulary.
    Str(&'static str),
    /// A number.
    Number(f64),
    /// A boolean.
    Bool(bool),
}

impl SampleValue {
    fn to_pb(self) -> pb::Value {
        use pb::value::Kind;
        let kind = match self {
            SampleValue::Str(s) => Kind::StringValue(s.into()),
            SampleValue::Number(n) => Kind::NumberValue(n),
            SampleValue::Bool(b) => Kind::BoolValue(b),
        };
        pb::Value { kind: Some(kind) }
    }

    fn as_scalar(self) -> ScalarRef<'static> {
        match self {
            SampleValue::Str(s) => ScalarRef::String(s),
            SampleValue::Number(n) => ScalarRef::Number(n),
            SampleValue::Bool(b) => ScalarRef::Bool(b),
        }
    }
}

/// One generated event: user `user{user}`, message id `demo-{run}-{sequence}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The user's number.
    pub user: u64,
    /// The event's number in its generator's run.
    pub sequence: u64,
    /// Track or identify.
    pub kind: pb::EventType,
    /// Event time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// A track event's name (empty for an identify).
    pub name: &'static str,
    /// Properties of a track event, traits of an identify: the first
    /// `field_count` (at most two; kept inline, no allocation per draw).
    fields: [(&'static str, SampleValue); 2],
    field_count: usize,
}

impl Sample {
    /// Properties of a track event, traits of an identify.
    pub fn fields(&self) -> &[(&'static str, SampleValue)] {
        &self.fields[..self.field_count]
    }

    fn with_fields(&mut self, fields: &[(&'static str, SampleValue)]) {
        self.fields[..fields.len()].copy_from_slice(fields);
        self.field_count = fields.len();
    }

    /// The event as a typed message; `prefix` is its run's message-id prefix
    /// (`demo-{run}-`).
    pub fn to_pb(&self, prefix: &str) -> pb::Event {
        let fields = self
            .fields()
            .iter()
            .map(|(name, value)| ((*name).to_owned(), value.to_pb()))
            .collect();
        let mut event = pb::Event {
            message_id: format!("{prefix}{}", self.sequence),
            user_id: format!("user{}", self.user),
            r#type: self.kind as i32,
            event: self.name.to_owned(),
            timestamp_ms: self.timestamp_ms,
            ..Default::default()
        };
        if self.kind == pb::EventType::Identify {
            event.traits = fields;
        } else {
            event.properties = fields;
        }
        event
    }

    /// Appends the event's encoding to `buf`; `prefix` as for
    /// [`Sample::to_pb`].
    pub fn encode(&self, prefix: &str, buf: &mut Vec<u8>) {
        let mut writer = EventWriter::new(buf);
        writer
            .message_id_numbered(prefix, self.sequence)
            .user_id_numbered("user", self.user)
            .kind(self.kind)
            .timestamp_ms(self.timestamp_ms);
        if self.kind == pb::EventType::Identify {
            for (name, value) in self.fields() {
                writer.trait_value(name, value.as_scalar());
            }
        } else {
            writer.name(self.name);
            for (name, value) in self.fields() {
                writer.property(name, value.as_scalar());
            }
        }
    }
}

/// The traffic generator: users, the event mix, and timestamps.
pub struct Traffic {
    rng: Rng,
    users: u64,
    sequence: u64,
    /// The message-id prefix of this run's events.
    prefix: String,
}

impl Traffic {
    /// Traffic over `users` users, seeded with `seed`.
    pub fn new(users: u64, seed: u64) -> Traffic {
        Traffic {
            rng: Rng(seed.max(1)),
            users: users.max(1),
            sequence: 0,
            prefix: format!("demo-{seed}-"),
        }
    }

    /// The next event, at wall-clock time `now_ms`.
    pub fn next_event(&mut self, now_ms: i64) -> pb::Event {
        self.next_sample(now_ms).to_pb(&self.prefix)
    }

    /// Appends the next event's encoding to `buf`, at wall-clock time `now_ms`.
    pub fn encode_next(&mut self, now_ms: i64, buf: &mut Vec<u8>) {
        let sample = self.next_sample(now_ms);
        sample.encode(&self.prefix, buf);
    }

    /// The next draw, at wall-clock time `now_ms`.
    pub fn next_sample(&mut self, now_ms: i64) -> Sample {
        let rng = &mut self.rng;
        // A skewed choice of user: a few are very active, most are not.
        let spread = rng.below(self.users) + 1;
        let user = rng.below(spread);
        self.sequence += 1;
        let mut sample = Sample {
            user,
            sequence: self.sequence,
            kind: pb::EventType::Track,
            timestamp_ms: now_ms - rng.below(20 * DAY_MS as u64) as i64,
            name: "",
            fields: [("", SampleValue::Bool(false)); 2],
            field_count: 0,
        };
        let roll = rng.below(100);
        sample.name = match roll {
            0..=7 => {
                sample.kind = pb::EventType::Identify;
                sample.with_fields(&[
                    (
                        "plan",
                        SampleValue::Str(rng.pick(&["trial", "trial", "pro", "free"])),
                    ),
                    ("setup_completed", SampleValue::Bool(rng.below(3) == 0)),
                ]);
                sample.timestamp_ms = now_ms;
                return sample;
            }
            8..=27 => {
                sample.with_fields(&[(
                    "category",
                    SampleValue::Str(rng.pick(&["shoes", "hats", "shirts"])),
                )]);
                "product_viewed"
            }
            28..=35 => {
                // Just inside the 24 h window: these carts expire during the demo.
                sample.timestamp_ms = now_ms - DAY_MS + 5_000 + rng.below(120_000) as i64;
                "product_added"
            }
            36..=39 => "checkout_completed",
            40..=49 => {
                sample.with_fields(&[
                    ("revenue", SampleValue::Number(10.0 + rng.below(400) as f64)),
                    (
                        "category",
                        SampleValue::Str(rng.pick(&["shoes", "hats", "shirts"])),
                    ),
                ]);
                "order_completed"
            }
            50..=59 => "email_opened",
            60..=64 => "campaign_sent",
            65..=74 => "session_started",
            75..=87 => "login",
            _ => {
                sample.with_fields(&[(
                    "feature",
                    SampleValue::Str(rng.pick(&[
                        "search", "export", "alerts", "sharing", "api", "reports", "billing",
                    ])),
                )]);
                "feature_used"
            }
        };
        sample
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// The load generator's encoding is the demo's event: the same ids,
    /// names, times, properties and traits, over every kind of draw.
    #[test]
    fn an_encoded_draw_decodes_as_the_event_the_demo_sends() {
        let seed = 0x5eed_0001;
        let mut typed = Traffic::new(1_000, seed);
        let mut encoded = Traffic::new(1_000, seed);
        let mut names = std::collections::BTreeSet::new();
        let mut buf = Vec::new();
        for _ in 0..2_000 {
            let event = typed.next_event(1_750_000_000_000);
            buf.clear();
            encoded.encode_next(1_750_000_000_000, &mut buf);
            let decoded = pb::Event::decode(buf.as_slice()).expect("decodes");
            assert_eq!(decoded, event, "seed {seed:#x}");
            names.insert(event.event.clone());
        }
        // Every branch of the mix was drawn: identify (no name) and nine tracks.
        assert_eq!(names.len(), 10, "seed {seed:#x}: {names:?}");
    }
}
