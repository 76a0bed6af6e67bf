//! Segment insight commands: `dynseg segment overlap A B ...`, `dynseg
//! segment stats ID`, `dynseg explain USER SEGMENT`.

use dynseg_proto::pb;
use dynseg_rules::{Timestamp, Value};
use serde_json::json;

use crate::args::{Args, duration_ms};
use crate::commands::gateway;
use crate::error::CliError;
use crate::output::{self, Output};
use crate::say;

/// `dynseg segment overlap A B [C...]`: the pairwise overlap matrix (members
/// of both segments of each pair; the diagonal is each size) and the members
/// of all of them.
pub async fn overlap(args: &Args, out: Output) -> Result<(), CliError> {
    let segments: Vec<String> = args.positional.iter().skip(2).cloned().collect();
    if segments.len() < 2 {
        return Err(CliError::User(
            "usage: dynseg segment overlap SEGMENT SEGMENT [SEGMENT...]".into(),
        ));
    }
    let reply = gateway(args)
        .await?
        .segment_overlap(pb::SegmentOverlapRequest { segments })
        .await?
        .into_inner();
    let n = reply.segments.len();
    let cell = |i: usize, j: usize| reply.pairwise.get(i * n + j).copied().unwrap_or(0);
    match out {
        Output::Json => output::json(&json!({
            "segments": reply.segments,
            "sizes": (0..n).map(|i| cell(i, i)).collect::<Vec<_>>(),
            "pairwise": (0..n).map(|i| (0..n).map(|j| cell(i, j)).collect::<Vec<_>>()).collect::<Vec<_>>(),
            "all": reply.all,
        })),
        Output::Table => {
            let mut header = vec![""];
            header.extend(reply.segments.iter().map(String::as_str));
            let rows: Vec<Vec<String>> = (0..n)
                .map(|i| {
                    let mut row = vec![reply.segments[i].clone()];
                    row.extend((0..n).map(|j| cell(i, j).to_string()));
                    row
                })
                .collect();
            output::table(&header, &rows);
            say!("in all {n}: {}", reply.all);
        }
    }
    Ok(())
}

/// `dynseg segment stats ID [--interval minute|hour|day] [--since DURATION|RFC3339]
/// [--threshold X]`: size, enters, exits and volatility per interval, with a
/// bar of the size.
pub async fn stats(args: &Args, out: Output) -> Result<(), CliError> {
    let [_, _, segment] = args.positional.as_slice() else {
        return Err(CliError::User(
            "usage: dynseg segment stats SEGMENT [--interval minute|hour|day] [--since 24h|RFC3339] [--threshold X]".into(),
        ));
    };
    let interval = match args.get("interval").unwrap_or("hour") {
        "minute" => pb::HistoryInterval::Minute,
        "hour" => pb::HistoryInterval::Hour,
        "day" => pb::HistoryInterval::Day,
        other => {
            return Err(CliError::User(format!(
                "unknown interval {other:?} (minute, hour, day)"
            )));
        }
    };
    let (since_ms, last_ms) = match args.get("since") {
        None => (0, 0),
        Some(text) => match Timestamp::parse_rfc3339(text) {
            Ok(t) => (t.millis(), 0),
            Err(_) => (0, duration_ms(text)?),
        },
    };
    let threshold = args.number("threshold", 0.0f64)?;
    let reply = gateway(args)
        .await?
        .segment_history(pb::SegmentHistoryRequest {
            segment: segment.clone(),
            interval: interval as i32,
            since_ms,
            last_ms,
            volatility_threshold: threshold,
        })
        .await?
        .into_inner();
    match out {
        Output::Json => output::json(&json!({
            "segment": reply.segment,
            "interval": args.get("interval").unwrap_or("hour"),
            "now": time_text(reply.now_ms),
            "retained_from": time_text(reply.retained_from_ms),
            "volatility_threshold": reply.volatility_threshold,
            "points": reply.points.iter().map(|p| json!({
                "start": time_text(p.start_ms),
                "size": p.size,
                "enters": p.enters,
                "exits": p.exits,
                "volatility": p.volatility,
                "volatile": p.volatile,
            })).collect::<Vec<_>>(),
            "webhooks": reply.webhooks.iter().map(|w| json!({
                "url": w.url,
                "shards": w.shards,
                "delivered": w.delivered,
                "failed_attempts": w.failed_attempts,
                "behind": w.behind,
                "last_delivered": (w.last_delivered_ms != 0).then(|| time_text(w.last_delivered_ms)),
                "last_error": (!w.last_error.is_empty()).then_some(&w.last_error),
            })).collect::<Vec<_>>(),
        })),
        Output::Table => {
            let widest = reply.points.iter().map(|p| p.size).max().unwrap_or(0);
            let rows: Vec<Vec<String>> = reply
                .points
                .iter()
                .map(|p| {
                    vec![
                        time_text(p.start_ms),
                        p.size.to_string(),
                        format!("+{}", p.enters),
                        format!("-{}", p.exits),
                        format!("{:.2}{}", p.volatility, if p.volatile { " !" } else { "" }),
                        bar(p.size, widest, 30),
                    ]
                })
                .collect();
            output::table(
                &["START", "SIZE", "ENTERS", "EXITS", "VOLATILITY", ""],
                &rows,
            );
            let flagged = reply.points.iter().filter(|p| p.volatile).count();
            say!(
                "{} interval(s) flagged ! (enters + exits over the size above {}): {}",
                flagged,
                reply.volatility_threshold,
                if flagged == 0 {
                    "the rule is stable"
                } else {
                    "review the rule for flapping"
                }
            );
            for w in &reply.webhooks {
                let mut line = format!(
                    "webhook {}: {} delivered, {} failed attempts, {} behind",
                    w.url, w.delivered, w.failed_attempts, w.behind
                );
                if !w.last_error.is_empty() {
                    line.push_str(&format!(
                        "; retrying after: {} (at {})",
                        w.last_error,
                        time_text(w.last_error_ms)
                    ));
                }
                say!("{line}");
            }
        }
    }
    Ok(())
}

/// A horizontal bar of `value` out of `max`, `width` cells wide at most, in
/// eighths of a cell.
fn bar(value: u64, max: u64, width: usize) -> String {
    const EIGHTHS: [char; 8] = [' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'];
    if max == 0 {
        return String::new();
    }
    let eighths = (value as u128 * width as u128 * 8 / max as u128) as usize;
    let mut out = "█".repeat(eighths / 8);
    if !eighths.is_multiple_of(8) {
        out.push(EIGHTHS[eighths % 8]);
    }
    out
}

/// `dynseg explain USER SEGMENT` (also `dynseg segment explain USER SEGMENT`):
/// the rule's tree with every clause's truth and values for the user, and
/// the next change with no new event.
pub async fn explain(args: &Args, user: &str, segment: &str, out: Output) -> Result<(), CliError> {
    let reply = gateway(args)
        .await?
        .explain(pb::ExplainRequest {
            user_id: user.to_owned(),
            segment: segment.to_owned(),
        })
        .await?
        .into_inner();
    let next_kind = match reply.next_change_kind() {
        pb::ChangeKind::Enter => "enter",
        pb::ChangeKind::Exit => "exit",
        pb::ChangeKind::Unspecified => "",
    };
    match out {
        Output::Json => output::json(&json!({
            "user": reply.user_id,
            "segment": reply.segment,
            "member": reply.member,
            "now": time_text(reply.now_ms),
            "rule_version": reply.rule_version,
            "shard": reply.shard,
            "rule": reply.clause.as_ref().map(clause_json),
            "next_change": (reply.next_change_ms != 0).then(|| json!({
                "at": time_text(reply.next_change_ms),
                "kind": next_kind,
                "clause": (!reply.next_change_clause.is_empty()).then_some(&reply.next_change_clause),
            })),
            "next_wakeup": (reply.next_wakeup_ms != 0).then(|| time_text(reply.next_wakeup_ms)),
        })),
        Output::Table => {
            say!(
                "{} is {} {} (rule v{}, at {})",
                reply.user_id,
                if reply.member { "in" } else { "not in" },
                reply.segment,
                reply.rule_version,
                time_text(reply.now_ms)
            );
            if let Some(clause) = &reply.clause {
                print_clause(clause, "", "");
            }
            if reply.next_change_ms == 0 {
                say!("next change: none without a new event");
            } else if reply.next_change_clause.is_empty() {
                say!(
                    "next change: {next_kind} at {}, when a future-dated event falls due",
                    time_text(reply.next_change_ms)
                );
            } else {
                say!(
                    "next change: {next_kind} at {}, when `{}` turns",
                    time_text(reply.next_change_ms),
                    reply.next_change_clause
                );
            }
        }
    }
    Ok(())
}

fn print_clause(clause: &pb::ExplainClause, first: &str, rest: &str) {
    let mut line = format!(
        "{first}{} {}",
        if clause.truth { "✓" } else { "✗" },
        clause.text
    );
    let values: Vec<String> = clause.values.iter().map(value_text).collect();
    if !values.is_empty() {
        line.push_str(&format!("    [{}]", values.join("; ")));
    }
    if clause.turns_at_ms != 0 {
        line.push_str(&format!(
            "    (may turn at {})",
            time_text(clause.turns_at_ms)
        ));
    }
    say!("{line}");
    let n = clause.children.len();
    for (i, child) in clause.children.iter().enumerate() {
        let (branch, under) = if i + 1 == n {
            ("└─ ", "   ")
        } else {
            ("├─ ", "│  ")
        };
        print_clause(child, &format!("{rest}{branch}"), &format!("{rest}{under}"));
    }
}

fn value_text(v: &pb::ExplainValue) -> String {
    let value = v
        .value
        .clone()
        .and_then(|value| Value::try_from(value).ok())
        .map_or_else(|| "null".to_owned(), |value| value.to_string());
    let more = if v.at_least { " or more" } else { "" };
    format!("{} = {value}{more}", v.operand)
}

fn clause_json(clause: &pb::ExplainClause) -> serde_json::Value {
    json!({
        "text": clause.text,
        "truth": clause.truth,
        "turns_at": (clause.turns_at_ms != 0).then(|| time_text(clause.turns_at_ms)),
        "values": clause.values.iter().map(|v| json!({
            "operand": v.operand,
            "value": v.value.clone().and_then(|value| Value::try_from(value).ok()).map(|value| value.to_string()),
            "at_least": v.at_least,
        })).collect::<Vec<_>>(),
        "children": clause.children.iter().map(clause_json).collect::<Vec<_>>(),
    })
}

fn time_text(ms: i64) -> String {
    Timestamp(ms).to_string()
}
