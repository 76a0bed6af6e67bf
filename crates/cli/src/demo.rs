//! `dynseg demo`: the dev cluster, the nine SPEC segments, generated e-commerce
//! and SaaS traffic, and a live view of segment sizes and enters and exits.
//! The traffic is [`crate::traffic`]'s.

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
use crate::traffic::Traffic;

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
