//! The client commands: segments (against the control plane), and ingest, tail,
//! lookups and the clock (against a gateway).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{BufRead, IsTerminal, Write};
use std::time::Instant;

use dynseg_proto::auth::Credentials;
use dynseg_proto::client::{self, Conn, is_refusal};
use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use dynseg_proto::pb::gateway_client::GatewayClient;
use serde_json::json;

use crate::args::{Args, duration_ms};
use crate::error::CliError;
use crate::event_json::parse_event;
use crate::output::{self, Output};
use crate::say;
use crate::segments_file;

/// The dev cluster's gateway: it serves the data API and forwards the control
/// plane's admin API, so every command can use it.
pub const GATEWAY_ADDR: &str = "127.0.0.1:7102";

/// Where commands go: `--addr`, else `DYNSEG_ADDR`, else [`GATEWAY_ADDR`].
pub fn addr(args: &Args) -> String {
    match args.get("addr") {
        Some(addr) => addr.to_owned(),
        None => std::env::var("DYNSEG_ADDR")
            .ok()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| GATEWAY_ADDR.to_owned()),
    }
}

/// What the CLI presents: `--token`, else `DYNSEG_TOKEN`, else the cluster
/// secret of `DYNSEG_CLUSTER_SECRET` (a member's own pod runs `dynseg
/// cluster drain` that way), else nothing.
/// Over TLS when `--tls-ca F` (or `DYNSEG_TLS_CA`) names the CA to trust.
pub fn credentials(args: &Args) -> Result<Credentials, CliError> {
    let token = match args.get("token") {
        Some(token) => Some(token.to_owned()),
        None => std::env::var("DYNSEG_TOKEN").ok().filter(|t| !t.is_empty()),
    };
    let credentials = match token {
        Some(token) => Credentials::token(&token).map_err(CliError::User)?,
        None => {
            let secret = dynseg_proto::auth::cluster_secret_from(None).map_err(CliError::User)?;
            Credentials::member(&dynseg_proto::auth::Access::new(None, secret))
        }
    };
    let ca = match args.get("tls-ca") {
        Some(path) => Some(path.to_owned()),
        None => std::env::var("DYNSEG_TLS_CA")
            .ok()
            .filter(|p| !p.is_empty()),
    };
    match ca {
        Some(path) => {
            let pem = std::fs::read(&path)
                .map_err(|e| CliError::User(format!("--tls-ca {path}: {e}")))?;
            Ok(credentials.with_tls(dynseg_proto::tls::client_trusting(&pem)))
        }
        None => Ok(credentials),
    }
}

pub(crate) async fn control(args: &Args) -> Result<ControlClient<Conn>, CliError> {
    let addr = &addr(args);
    let channel = client::connect(addr, credentials(args)?)
        .await
        .map_err(|e| {
            CliError::Connection(format!("cannot reach the control plane at {addr}: {e}"))
        })?;
    Ok(ControlClient::new(channel).max_decoding_message_size(64 << 20))
}

pub(crate) async fn gateway(args: &Args) -> Result<GatewayClient<Conn>, CliError> {
    let addr = &addr(args);
    let channel = client::connect(addr, credentials(args)?)
        .await
        .map_err(|e| CliError::Connection(format!("cannot reach the gateway at {addr}: {e}")))?;
    Ok(GatewayClient::new(channel).max_decoding_message_size(64 << 20))
}

fn record_json(record: &pb::SegmentRecord) -> serde_json::Value {
    let def = record.def.clone().unwrap_or_default();
    let webhooks: Vec<serde_json::Value> = def
        .webhooks
        .iter()
        .map(|w| json!({"url": w.url, "secret_env": w.secret_env}))
        .collect();
    json!({"id": def.id, "name": def.name, "description": def.description, "rule": def.rule, "webhooks": webhooks, "version": record.version})
}

/// `dynseg segment validate|apply|preview|list|get|delete|overlap|stats|explain`.
pub async fn segment(args: &Args, out: Output) -> Result<(), CliError> {
    let action = args.positional.get(1).map(String::as_str).unwrap_or("");
    match action {
        "validate" | "apply" => {
            let path = args
                .get("f")
                .or_else(|| args.get("file"))
                .ok_or_else(|| CliError::User(format!("segment {action} needs -f FILE")))?;
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::User(format!("{path}: {e}")))?;
            let file = segments_file::SegmentsFile::read(path, &text)?;
            let defs = &file.defs;
            let request = pb::SegmentsRequest {
                segments: defs.clone(),
            };
            let mut client = control(args).await?;
            let explain = |status: tonic::Status| match status.code() {
                tonic::Code::InvalidArgument => CliError::User(file.explain(status.message())),
                _ => CliError::from(status),
            };
            if action == "validate" {
                let reply = client
                    .validate_segments(request)
                    .await
                    .map_err(explain)?
                    .into_inner();
                match out {
                    Output::Json => output::json(
                        &json!({"valid": true, "segments": defs.len(), "next_rules_version": reply.next_rules_version}),
                    ),
                    Output::Table => say!(
                        "{} segment(s) valid; applying them would make rule-set version {}",
                        defs.len(),
                        reply.next_rules_version
                    ),
                }
            } else {
                let reply = client
                    .apply_segments(request)
                    .await
                    .map_err(explain)?
                    .into_inner();
                match out {
                    Output::Json => output::json(
                        &json!({"applied": defs.len(), "rules_version": reply.rules_version, "revision": reply.revision}),
                    ),
                    Output::Table => say!(
                        "applied {} segment(s): rule-set version {}",
                        defs.len(),
                        reply.rules_version
                    ),
                }
            }
        }
        "preview" => {
            let path = args
                .get("f")
                .or_else(|| args.get("file"))
                .ok_or_else(|| CliError::User("segment preview needs -f FILE".into()))?;
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::User(format!("{path}: {e}")))?;
            let file = segments_file::SegmentsFile::read(path, &text)?;
            let reply = gateway(args)
                .await?
                .preview_segments(pb::PreviewSegmentsRequest {
                    segments: file.defs.clone(),
                })
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::InvalidArgument => CliError::User(file.explain(status.message())),
                    _ => CliError::from(status),
                })?
                .into_inner();
            match out {
                Output::Json => output::json(&json!({
                    "users": reply.users,
                    "segments": reply.counts.iter().map(|c| json!({"id": c.segment, "members_now": c.members})).collect::<Vec<_>>(),
                })),
                Output::Table => {
                    let rows: Vec<Vec<String>> = reply
                        .counts
                        .iter()
                        .map(|c| vec![c.segment.clone(), c.members.to_string()])
                        .collect();
                    output::table(&["SEGMENT", "MEMBERS NOW"], &rows);
                    say!("(of {} users; nothing was applied)", reply.users);
                }
            }
        }
        "overlap" => crate::insight::overlap(args, out).await?,
        "stats" => crate::insight::stats(args, out).await?,
        "explain" => match args.positional.as_slice() {
            [_, _, user, segment] => crate::insight::explain(args, user, segment, out).await?,
            _ => {
                return Err(CliError::User(
                    "usage: dynseg segment explain USER SEGMENT".into(),
                ));
            }
        },
        "list" => {
            let list = control(args)
                .await?
                .list_segments(pb::ReadOptions { stale: false })
                .await?
                .into_inner();
            match out {
                Output::Json => output::json(
                    &json!({"rules_version": list.rules_version, "segments": list.segments.iter().map(record_json).collect::<Vec<_>>()}),
                ),
                Output::Table => {
                    let rows: Vec<Vec<String>> = list
                        .segments
                        .iter()
                        .map(|r| {
                            let def = r.def.clone().unwrap_or_default();
                            vec![
                                def.id,
                                format!("v{}", r.version),
                                def.rule.replace('\n', " "),
                            ]
                        })
                        .collect();
                    output::table(&["SEGMENT", "VERSION", "RULE"], &rows);
                }
            }
        }
        "get" => {
            let id = args
                .positional
                .get(2)
                .ok_or_else(|| CliError::User("segment get needs an id".into()))?;
            let record = control(args)
                .await?
                .get_segment(pb::GetSegmentRequest {
                    id: id.clone(),
                    stale: false,
                })
                .await?
                .into_inner();
            match out {
                Output::Json => output::json(&record_json(&record)),
                Output::Table => {
                    let def = record.def.unwrap_or_default();
                    say!(
                        "id:          {}\nname:        {}\ndescription: {}\nversion:     v{}\nrule:        {}",
                        def.id,
                        def.name,
                        def.description,
                        record.version,
                        def.rule
                    );
                    for w in &def.webhooks {
                        say!("webhook:     {} (secret in ${})", w.url, w.secret_env);
                    }
                }
            }
        }
        "delete" => {
            let id = args
                .positional
                .get(2)
                .ok_or_else(|| CliError::User("segment delete needs an id".into()))?;
            let reply = control(args)
                .await?
                .delete_segment(pb::DeleteSegmentRequest { id: id.clone() })
                .await?
                .into_inner();
            match out {
                Output::Json => {
                    output::json(&json!({"deleted": id, "rules_version": reply.rules_version}))
                }
                Output::Table => say!("deleted {id}: rule-set version {}", reply.rules_version),
            }
        }
        other => {
            return Err(CliError::User(format!(
                "unknown segment command {other:?} (validate, apply, preview, list, get, delete, overlap, stats, explain)"
            )));
        }
    }
    Ok(())
}

/// `dynseg ingest FILE.ndjson`: batches of events, a progress line, and a
/// summary of what was refused and why; exits 1 if anything was refused.
pub async fn ingest(args: &Args, out: Output) -> Result<(), CliError> {
    let path = args
        .positional
        .get(1)
        .ok_or_else(|| CliError::User("ingest needs a file (one JSON event per line)".into()))?;
    let batch_size: usize = args.number("batch", 500)?;
    let file = std::fs::File::open(path).map_err(|e| CliError::User(format!("{path}: {e}")))?;
    let total_bytes = file.metadata().map(|m| m.len()).unwrap_or(0).max(1);
    let mut client = gateway(args).await?;
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let (mut accepted, mut duplicates, mut read_bytes) = (0u64, 0u64, 0u64);
    let mut refused: Vec<(usize, String)> = Vec::new();
    let mut batch = Vec::with_capacity(batch_size);
    let mut lines_of_batch = Vec::with_capacity(batch_size);
    let mut lines = std::io::BufReader::new(file).lines().enumerate();
    loop {
        let next = lines.next();
        let finished = next.is_none();
        if let Some((number, line)) = next {
            let line = line.map_err(|e| CliError::User(format!("{path}: {e}")))?;
            read_bytes += line.len() as u64 + 1;
            if line.trim().is_empty() {
                continue;
            }
            match parse_event(&line) {
                Ok(event) => {
                    batch.push(event);
                    lines_of_batch.push(number + 1);
                }
                Err(reason) => refused.push((number + 1, reason)),
            }
            if batch.len() < batch_size {
                continue;
            }
        }
        if !batch.is_empty() {
            let reply = ingest_with_retries(&mut client, std::mem::take(&mut batch)).await?;
            accepted += u64::from(reply.accepted);
            duplicates += u64::from(reply.duplicates);
            for r in reply.rejected {
                let line = lines_of_batch.get(r.index as usize).copied().unwrap_or(0);
                refused.push((line, r.reason));
            }
            lines_of_batch.clear();
            if tty {
                eprint!(
                    "\r{:>3}%  {accepted} accepted, {} refused",
                    read_bytes * 100 / total_bytes,
                    refused.len()
                );
            }
        }
        if finished {
            break;
        }
    }
    if tty {
        eprintln!();
    }
    refused.sort();
    let secs = started.elapsed().as_secs_f64();
    match out {
        Output::Json => output::json(&json!({
            "accepted": accepted, "duplicates": duplicates, "refused": refused.len(), "seconds": secs,
            "refusals": refused.iter().take(100).map(|(l, r)| json!({"line": l, "reason": r})).collect::<Vec<_>>(),
        })),
        Output::Table => {
            say!(
                "{accepted} events accepted ({duplicates} repeats ignored), {} refused, in {secs:.1} s",
                refused.len()
            );
            for (line, reason) in refused.iter().take(20) {
                say!("  line {line}: {reason}");
            }
            if refused.len() > 20 {
                say!("  ... and {} more", refused.len() - 20);
            }
        }
    }
    // Refused lines are the file's errors: a script learns of them from the
    // exit code (1), after everything else is ingested.
    if refused.is_empty() {
        Ok(())
    } else {
        Err(CliError::User(format!(
            "{} event(s) refused (listed above); the other {accepted} are ingested",
            refused.len()
        )))
    }
}

/// How long a batch is retried while the cluster is unavailable.
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends a batch, resending it while the gateway answers UNAVAILABLE (a node
/// restarting, a leader election): the same message ids make a resend count
/// nothing twice.
async fn ingest_with_retries(
    client: &mut GatewayClient<Conn>,
    events: Vec<pb::Event>,
) -> Result<pb::IngestReply, CliError> {
    let started = Instant::now();
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        match client
            .ingest(pb::IngestRequest {
                events: events.clone(),
            })
            .await
        {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status)
                if status.code() == tonic::Code::Unavailable && started.elapsed() < RETRY_FOR =>
            {
                eprintln!("dynseg: {}; retrying the batch", status.message());
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
            }
            Err(status) => return Err(status.into()),
        }
    }
}

fn kind_name(kind: i32) -> &'static str {
    match pb::ChangeKind::try_from(kind) {
        Ok(pb::ChangeKind::Enter) => "enter",
        Ok(pb::ChangeKind::Exit) => "exit",
        _ => "?",
    }
}

fn cause_name(cause: i32) -> &'static str {
    match pb::ChangeCause::try_from(cause) {
        Ok(pb::ChangeCause::Event) => "event",
        Ok(pb::ChangeCause::Time) => "time",
        Ok(pb::ChangeCause::Rule) => "rule",
        _ => "?",
    }
}

/// One change as a line of text.
pub fn change_line(change: &pb::MembershipChange) -> String {
    let at = dynseg_rules::Timestamp(change.at_ms);
    format!(
        "{at}  {:<5}  {}  {}  ({}, v{})",
        kind_name(change.kind),
        change.segment,
        change.user_id,
        cause_name(change.cause),
        change.rule_version
    )
}

/// `dynseg tail [--segment S]... [--from TOKEN] [--from-now] [--limit N]`.
pub async fn tail(args: &Args, out: Output) -> Result<(), CliError> {
    let limit: u64 = args.number("limit", 0)?;
    let request = |token: &str| pb::GatewaySubscribeRequest {
        segments: args.all("segment"),
        resume_token: token.to_owned(),
        from_now: token.is_empty() && args.has("from-now"),
    };
    let mut last_token = args.get("from").unwrap_or_default().to_owned();
    let mut stream = gateway(args)
        .await?
        .subscribe(request(&last_token))
        .await?
        .into_inner();
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    loop {
        let next = tokio::select! {
            next = stream.message() => next,
            _ = tokio::signal::ctrl_c() => break,
        };
        let item = match next {
            Ok(Some(item)) => item,
            // Refused for what it asks (an unknown segment, a malformed
            // token, missing rights, a change no node can read): asking
            // again gets the same answer.
            Err(status) if is_refusal(status.code()) => return Err(status.into()),
            // The stream never ends by itself: the gateway went away (or shut
            // down). Resume after the last change printed, on whichever gateway
            // answers at --addr, until Ctrl-C.
            lost => {
                let why = lost
                    .err()
                    .map_or("the stream ended".to_owned(), |s| s.message().to_owned());
                eprintln!("dynseg: change stream lost ({why}); resuming");
                stream = loop {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => return Ok(()),
                        () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                    }
                    let Ok(mut client) = gateway(args).await else {
                        continue;
                    };
                    match client.subscribe(request(&last_token)).await {
                        Ok(resumed) => break resumed.into_inner(),
                        Err(status) if is_refusal(status.code()) => return Err(status.into()),
                        Err(_) => {}
                    }
                };
                continue;
            }
        };
        let Some(change) = item.change else { continue };
        let written = {
            let mut lock = stdout.lock();
            match out {
                Output::Json => writeln!(
                    lock,
                    "{}",
                    json!({"at_ms": change.at_ms, "user": change.user_id, "segment": change.segment,
                           "kind": kind_name(change.kind), "cause": cause_name(change.cause),
                           "rule_version": change.rule_version, "resume_token": item.resume_token})
                ),
                Output::Table => writeln!(lock, "{}", change_line(&change)),
            }
        };
        if written.is_err() {
            // stdout closed (`dynseg tail | head`): stop following.
            break;
        }
        last_token = item.resume_token;
        seen += 1;
        if limit > 0 && seen >= limit {
            break;
        }
    }
    if !last_token.is_empty() && seen > 0 {
        eprintln!("resume with: dynseg tail --from {last_token}");
    }
    Ok(())
}

/// `dynseg user ID`.
pub async fn user(args: &Args, out: Output) -> Result<(), CliError> {
    let id = args
        .positional
        .get(1)
        .ok_or_else(|| CliError::User("user needs an id".into()))?;
    let reply = gateway(args)
        .await?
        .get_user(pb::GetUserRequest {
            user_id: id.clone(),
        })
        .await?
        .into_inner();
    match out {
        Output::Json => output::json(
            &json!({"user": id, "known": reply.exists, "shard": reply.shard, "segments": reply.segments}),
        ),
        Output::Table if !reply.exists => say!("{id}: not seen (shard {})", reply.shard),
        Output::Table => {
            say!(
                "{id} (shard {}) is in {} segment(s)",
                reply.shard,
                reply.segments.len()
            );
            for segment in reply.segments {
                say!("  {segment}");
            }
        }
    }
    Ok(())
}

/// `dynseg members SEGMENT [--limit N]`.
pub async fn members(args: &Args, out: Output) -> Result<(), CliError> {
    let segment = args
        .positional
        .get(1)
        .ok_or_else(|| CliError::User("members needs a segment".into()))?;
    let limit: usize = args.number("limit", 100)?;
    let mut client = gateway(args).await?;
    let mut users = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_members(pb::ListMembersRequest {
                segment: segment.clone(),
                page_size: (limit - users.len()).min(1000) as u32,
                page_token: token,
            })
            .await?
            .into_inner();
        users.extend(page.user_ids);
        token = page.next_page_token;
        if token.is_empty() || users.len() >= limit {
            break;
        }
    }
    match out {
        Output::Json => {
            output::json(&json!({"segment": segment, "members": users, "more": !token.is_empty()}))
        }
        Output::Table => {
            for user in &users {
                say!("{user}");
            }
            if !token.is_empty() {
                eprintln!("(first {} shown; --limit N for more)", users.len());
            }
        }
    }
    Ok(())
}

/// `dynseg clock advance DURATION` or `dynseg clock advance --to TIME`.
pub async fn clock(args: &Args, out: Output) -> Result<(), CliError> {
    if args.positional.get(1).map(String::as_str) != Some("advance") {
        return Err(CliError::User(
            "usage: dynseg clock advance DURATION | --to RFC3339".into(),
        ));
    }
    let target = match (args.positional.get(2), args.get("to")) {
        (Some(by), None) => pb::advance_clock_request::Target::ByMs(duration_ms(by)?),
        (None, Some(to)) => pb::advance_clock_request::Target::ToMs(
            dynseg_rules::Timestamp::parse_rfc3339(to)
                .map_err(|e| CliError::User(format!("--to {to}: {e}")))?
                .millis(),
        ),
        _ => {
            return Err(CliError::User(
                "give a duration or --to TIME, not both".into(),
            ));
        }
    };
    let reply = gateway(args)
        .await?
        .advance_clock(pb::AdvanceClockRequest {
            target: Some(target),
        })
        .await?
        .into_inner();
    let now = dynseg_rules::Timestamp(reply.now_ms);
    match out {
        Output::Json => output::json(&json!({"now_ms": reply.now_ms, "now": now.to_string()})),
        Output::Table => say!("clock now {now}; every change due by then is durable"),
    }
    Ok(())
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn until_stopped() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
