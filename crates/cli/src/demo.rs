//! `dynseg demo`: the dev cluster, the nine SPEC segments, generated e-commerce
//! and SaaS traffic, and a live view of segment sizes and enters and exits.
//!
//! Some events are dated just inside a window's edge, so time-driven exits
//! (carts abandoned for 24 hours, for instance) happen live during the demo.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use dynseg_proto::pb::gateway_client::GatewayClient;

use crate::commands::change_line;
use crate::error::CliError;
use crate::say;

/// Deterministic generator (xorshift64*), seeded per demo run.
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

fn value_string(s: &str) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::StringValue(s.into())),
    }
}

fn value_number(n: f64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::NumberValue(n)),
    }
}

fn value_bool(b: bool) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::BoolValue(b)),
    }
}

/// The traffic generator: users, the event mix, and timestamps.
pub struct Traffic {
    rng: Rng,
    users: u64,
    sequence: u64,
    run: u64,
}

impl Traffic {
    /// Traffic over `users` users, seeded with `seed`.
    pub fn new(users: u64, seed: u64) -> Traffic {
        Traffic {
            rng: Rng(seed.max(1)),
            users: users.max(1),
            sequence: 0,
            run: seed,
        }
    }

    /// The next event, at wall-clock time `now_ms`.
    pub fn next_event(&mut self, now_ms: i64) -> pb::Event {
        let rng = &mut self.rng;
        // A skewed choice of user: a few are very active, most are not.
        let spread = rng.below(self.users) + 1;
        let user = format!("user{}", rng.below(spread));
        self.sequence += 1;
        let message_id = format!("demo-{}-{}", self.run, self.sequence);
        let mut event = pb::Event {
            message_id,
            user_id: user,
            r#type: pb::EventType::Track as i32,
            timestamp_ms: now_ms - rng.below(20 * DAY_MS as u64) as i64,
            ..Default::default()
        };
        let roll = rng.below(100);
        let name = match roll {
            0..=7 => {
                event.r#type = pb::EventType::Identify as i32;
                event.traits.insert(
                    "plan".into(),
                    value_string(rng.pick(&["trial", "trial", "pro", "free"])),
                );
                event
                    .traits
                    .insert("setup_completed".into(), value_bool(rng.below(3) == 0));
                event.timestamp_ms = now_ms;
                return event;
            }
            8..=27 => {
                event.properties.insert(
                    "category".into(),
                    value_string(rng.pick(&["shoes", "hats", "shirts"])),
                );
                "product_viewed"
            }
            28..=35 => {
                // Just inside the 24 h window: these carts expire during the demo.
                event.timestamp_ms = now_ms - DAY_MS + 5_000 + rng.below(120_000) as i64;
                "product_added"
            }
            36..=39 => "checkout_completed",
            40..=49 => {
                event
                    .properties
                    .insert("revenue".into(), value_number(10.0 + rng.below(400) as f64));
                event.properties.insert(
                    "category".into(),
                    value_string(rng.pick(&["shoes", "hats", "shirts"])),
                );
                "order_completed"
            }
            50..=59 => "email_opened",
            60..=64 => "campaign_sent",
            65..=74 => "session_started",
            75..=87 => "login",
            _ => {
                event.properties.insert(
                    "feature".into(),
                    value_string(rng.pick(&[
                        "search", "export", "alerts", "sharing", "api", "reports", "billing",
                    ])),
                );
                "feature_used"
            }
        };
        event.event = name.into();
        event
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Applies the SPEC segments, then sends traffic and shows the live view until
/// `duration` passes (or forever) or Ctrl-C.
pub async fn run(
    control: &str,
    gateway: &str,
    users: u64,
    rate: u64,
    duration: Option<Duration>,
) -> Result<(), CliError> {
    let mut admin = ControlClient::connect(format!("http://{control}")).await?;
    let segments = dynseg_rules::examples::spec_segments()
        .iter()
        .map(pb::SegmentDef::from)
        .collect();
    let applied = admin
        .apply_segments(pb::SegmentsRequest { segments })
        .await?
        .into_inner();
    say!(
        "applied the nine SPEC segments (rule-set version {})",
        applied.rules_version
    );

    let client = GatewayClient::connect(format!("http://{gateway}")).await?;
    let mut feed = client
        .clone()
        .subscribe(pb::GatewaySubscribeRequest {
            from_now: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut traffic = Traffic::new(users, now_ms() as u64);
    let mut sent = 0u64;
    let mut changes = 0u64;
    let mut recent: VecDeque<String> = VecDeque::new();
    let mut send_tick = tokio::time::interval(Duration::from_millis(100));
    let mut view_tick = tokio::time::interval(Duration::from_secs(1));
    let per_tick = (rate / 10).max(1);
    loop {
        if duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = send_tick.tick() => {
                let now = now_ms();
                let events = (0..per_tick).map(|_| traffic.next_event(now)).collect();
                let reply = client.clone().ingest(pb::IngestRequest { events }).await?.into_inner();
                sent += u64::from(reply.accepted);
            }
            item = feed.message() => {
                let Some(item) = item? else { return Err(CliError::Connection("the change stream ended".into())) };
                if let Some(change) = item.change {
                    changes += 1;
                    let line = change_line(&change);
                    if !tty && changes % 50 == 1 {
                        say!("change {line}");
                    }
                    recent.push_back(line);
                    if recent.len() > 12 {
                        recent.pop_front();
                    }
                }
            }
            _ = view_tick.tick() => {
                let counts = client.clone().segment_counts(pb::SegmentCountsRequest {}).await?.into_inner();
                let secs = started.elapsed().as_secs_f64().max(0.001);
                if tty {
                    print!("\x1b[2J\x1b[H");
                    say!("dynseg demo — {sent} events ({:.0}/s), {changes} changes, {} users   (Ctrl-C to stop)\n", sent as f64 / secs, counts.users);
                    say!("{:<20} {:>9}", "SEGMENT", "MEMBERS");
                    for count in &counts.counts {
                        say!("{:<20} {:>9}", count.segment, count.members);
                    }
                    say!("\nlatest changes:");
                    for line in &recent {
                        say!("  {line}");
                    }
                } else {
                    let sizes: Vec<String> = counts.counts.iter().map(|c| format!("{}={}", c.segment, c.members)).collect();
                    say!("t={:.0}s events={sent} changes={changes} users={} sizes: {}", secs, counts.users, sizes.join(" "));
                }
            }
        }
    }
    say!("demo done: {sent} events sent, {changes} membership changes streamed");
    Ok(())
}
