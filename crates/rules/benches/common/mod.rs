//! A realistic event stream for the rule-engine benchmarks: the nine SPEC
//! segments over a large user base, with the event mix of an e-commerce and SaaS
//! product (mostly page views and logins, few orders), skewed user activity,
//! slightly late events, a few very late and a few future-dated ones.

#![allow(dead_code)]

use std::collections::HashMap;

use dynseg_rules::{
    Change, Event, EventBody, EventName, Limits, MessageId, Plan, Properties, RuleVersion,
    SegmentDef, Span, Timestamp, UserId, UserState, Value,
};

/// The nine example segments of SPEC.md section 3.
pub(crate) const SPEC_SEGMENTS: [(&str, &str); 9] = dynseg_rules::examples::SPEC_SEGMENTS;

pub(crate) fn spec_plan() -> Plan {
    let defs: Vec<SegmentDef> = SPEC_SEGMENTS
        .iter()
        .map(|(id, rule)| SegmentDef::new(id, rule))
        .collect();
    Plan::compile(&defs, RuleVersion(1), &Limits::default()).expect("the SPEC segments compile")
}

/// xorshift64*: small, fast, deterministic.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Shared strings, so generating an event allocates only its properties.
struct Names {
    users: Vec<UserId>,
    events: HashMap<&'static str, EventName>,
    message: MessageId,
    features: Vec<Value>,
}

/// An endless, time-ordered stream of events for `users` users, spanning
/// `per_event` of simulated time per event.
pub(crate) struct Workload {
    rng: Rng,
    names: Names,
    clock: Timestamp,
    per_event: Span,
}

/// Event mix, in per-mille.
const MIX: [(&str, u64); 11] = [
    ("page_viewed", 400),
    ("login", 180),
    ("product_viewed", 150),
    ("session_started", 80),
    ("email_opened", 40),
    ("campaign_sent", 40),
    ("product_added", 30),
    ("feature_used", 30),
    ("identify", 25),
    ("order_completed", 15),
    ("checkout_completed", 10),
];

impl Workload {
    /// A stream for `users` users whose clock starts at 2026-01-01 and advances by
    /// `span_per_event` per event.
    pub(crate) fn new(users: usize, span_per_event: Span, seed: u64) -> Workload {
        let users = (0..users)
            .map(|i| UserId::new(format!("user-{i:09}")))
            .collect();
        let events = MIX
            .iter()
            .map(|(name, _)| (*name, EventName::from(*name)))
            .collect();
        let features = (0..12)
            .map(|i| Value::from(format!("feature_{i}").as_str()))
            .collect();
        Workload {
            rng: Rng::new(seed),
            names: Names {
                users,
                events,
                message: MessageId::from("m"),
                features,
            },
            clock: Timestamp::parse_rfc3339("2026-01-01T00:00:00Z").expect("valid"),
            per_event: span_per_event,
        }
    }

    /// The stream's current time: what `now` is for the next event.
    pub(crate) fn now(&self) -> Timestamp {
        self.clock
    }

    pub(crate) fn users(&self) -> usize {
        self.names.users.len()
    }

    /// The next event; the clock moves forward.
    pub(crate) fn next_event(&mut self) -> Event {
        self.next_indexed().1
    }

    /// The next event and its user's index (0..users).
    pub(crate) fn next_indexed(&mut self) -> (usize, Event) {
        self.clock = self.clock.plus(self.per_event);
        let r = &mut self.rng;
        // Skewed activity: user index u^2 * N puts most events on few users.
        let u = r.unit();
        let index = ((u * u) * self.names.users.len() as f64) as usize;
        let user = &self.names.users[index];
        let mut pick = r.below(1000);
        let mut kind = MIX[0].0;
        for (name, weight) in MIX {
            if pick < weight {
                kind = name;
                break;
            }
            pick -= weight;
        }
        // Most events are a little late; 1% are hours late; 0.1% are ahead by up
        // to 4 minutes.
        let skew = match r.below(1000) {
            0 => Span::minutes(r.below(4) as i64 + 1).millis(),
            1..=10 => -Span::hours(r.below(48) as i64).millis(),
            _ => -(r.below(2_000) as i64),
        };
        let timestamp = self.clock.plus(Span(skew));
        let mut props = Properties::new();
        let body = match kind {
            "identify" => {
                let plan = ["trial", "pro", "free"][r.below(3) as usize];
                props.insert("plan", Value::from(plan));
                if r.below(2) == 0 {
                    props.insert("setup_completed", Value::Bool(r.below(3) == 0));
                }
                EventBody::Identify { traits: props }
            }
            name => {
                match name {
                    "product_viewed" => {
                        let category = if r.below(5) == 0 { "shoes" } else { "bags" };
                        props.insert("category", Value::from(category));
                    }
                    "order_completed" => {
                        let category = if r.below(7) == 0 { "shoes" } else { "other" };
                        props.insert("category", Value::from(category));
                        props.insert(
                            "revenue",
                            Value::Number((r.below(30_000) as f64) / 100.0 + 5.0),
                        );
                    }
                    "feature_used" => {
                        let f = self.names.features[r.below(12) as usize].clone();
                        props.insert("feature", f);
                    }
                    _ => {}
                }
                EventBody::Track {
                    name: self.names.events[name].clone(),
                    properties: props,
                }
            }
        };
        let event = Event {
            message_id: self.names.message.clone(),
            user: user.clone(),
            timestamp,
            body,
        };
        (index, event)
    }
}

/// User states keyed by user, as a node's shard would hold them.
#[derive(Default)]
pub(crate) struct Users {
    pub(crate) states: HashMap<UserId, UserState, foldhash::fast::RandomState>,
}

impl Users {
    /// Applies one event to its user's state (creating it), at `now`.
    pub(crate) fn apply(
        &mut self,
        plan: &Plan,
        event: &Event,
        now: Timestamp,
        out: &mut Vec<Change>,
    ) {
        let state = match self.states.get_mut(&event.user) {
            Some(state) => state,
            None => self
                .states
                .entry(event.user.clone())
                .or_insert_with(|| plan.new_state()),
        };
        plan.apply(state, event, now, out);
    }
}
