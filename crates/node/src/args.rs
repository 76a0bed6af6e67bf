//! The node's command line, shared by the `dynseg-node` binary and `dynseg node`.

use crate::clock::Clock;
use crate::config::NodeConfig;
use crate::control_link::{DEFAULT_DRAIN_TIMEOUT, DEFAULT_MOVE_BYTES_PER_SEC, LinkConfig};
use dynseg_rules::{Span, Timestamp};
use std::path::PathBuf;

/// The flags `parse` accepts.
pub const USAGE: &str = "--data-dir DIR [--listen ADDR] [--metrics ADDR] [--node-id ID] [--shard-count N] [--shards A-B] [--clock system|manual[=RFC3339]] [--checkpoint-secs S] [--memory-mib M] [--limit NAME=VALUE]... [--tokens-file F] [--cluster-secret-file F] [--tls-cert F --tls-key F [--tls-ca F] [--mtls]] [--webhook-ca F] [--change-retention D] [--event-retention D] [--dedupe-horizon D] [--control ADDR [--advertise ADDR] [--weight N] [--move-mib-per-sec N] [--drain-timeout-secs S] [--rejoin]]";

/// Parses the flags into the node's settings and, with `--control`, how it
/// follows the control plane.
pub fn parse(args: &[String]) -> Result<(NodeConfig, Option<LinkConfig>), String> {
    let mut data_dir = None;
    let mut listen = "127.0.0.1:0".to_owned();
    let mut metrics = None;
    let mut webhook_ca = None;
    let mut retention: Vec<(String, Span)> = Vec::new();
    let mut rejoin = false;
    let mut limits = Vec::new();
    let mut tokens_file = None;
    let mut secret_file = None;
    let (mut tls_cert, mut tls_key, mut tls_ca, mut mtls) = (None, None, None, false);
    let mut node_id = "node-1".to_owned();
    let mut shard_count = 256u32;
    let mut shards: Option<(u32, u32)> = None;
    let mut clock = Clock::System;
    let mut checkpoint_secs = None;
    let mut memory_mib = None;
    let mut control = None;
    let mut advertise = None;
    let mut weight = 1u32;
    let mut move_bytes_per_sec = DEFAULT_MOVE_BYTES_PER_SEC;
    let mut drain_timeout = DEFAULT_DRAIN_TIMEOUT;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--data-dir" => data_dir = Some(PathBuf::from(value()?)),
            "--listen" => listen = value()?,
            "--metrics" => metrics = Some(value()?),
            "--webhook-ca" => webhook_ca = Some(PathBuf::from(value()?)),
            "--change-retention" | "--event-retention" | "--dedupe-horizon" => {
                let text = value()?;
                retention.push((
                    flag.clone(),
                    span(&text).ok_or_else(|| {
                        format!("{flag} takes a duration such as 7d, 36h or 90m, not {text:?}")
                    })?,
                ));
            }
            "--rejoin" => rejoin = true,
            "--limit" => limits.push(value()?),
            "--tokens-file" => tokens_file = Some(value()?),
            "--tls-cert" => tls_cert = Some(value()?),
            "--tls-key" => tls_key = Some(value()?),
            "--tls-ca" => tls_ca = Some(value()?),
            "--mtls" => mtls = true,
            "--cluster-secret-file" => secret_file = Some(value()?),
            "--node-id" => node_id = value()?,
            "--shard-count" => {
                shard_count = value()?
                    .parse()
                    .map_err(|_| "--shard-count takes a number")?
            }
            "--shards" => {
                let v = value()?;
                let (a, b) = v.split_once('-').unwrap_or((&v, &v));
                let a = a.parse().map_err(|_| "--shards takes A-B")?;
                let b = b.parse().map_err(|_| "--shards takes A-B")?;
                shards = Some((a, b));
            }
            "--clock" => {
                let v = value()?;
                clock = match v.split_once('=') {
                    None if v == "system" => Clock::System,
                    None if v == "manual" => Clock::manual(Clock::System.now()),
                    Some(("manual", at)) => {
                        Clock::manual(Timestamp::parse_rfc3339(at).map_err(|e| e.to_string())?)
                    }
                    _ => return Err(format!("unknown clock {v}")),
                };
            }
            "--checkpoint-secs" => {
                checkpoint_secs = Some(
                    value()?
                        .parse::<u64>()
                        .map_err(|_| "--checkpoint-secs takes a number")?,
                )
            }
            "--memory-mib" => {
                memory_mib = Some(
                    value()?
                        .parse::<usize>()
                        .map_err(|_| "--memory-mib takes a number")?,
                )
            }
            "--control" => control = Some(value()?),
            "--advertise" => advertise = Some(value()?),
            "--weight" => weight = value()?.parse().map_err(|_| "--weight takes a number")?,
            "--move-mib-per-sec" => {
                let mib: f64 = value()?
                    .parse()
                    .ok()
                    .filter(|m: &f64| m.is_finite() && *m >= 0.0)
                    .ok_or("--move-mib-per-sec takes a number of MiB, such as 64 or 0.5 (0: unthrottled)")?;
                move_bytes_per_sec = (mib * f64::from(1 << 20)) as u64;
            }
            "--drain-timeout-secs" => {
                drain_timeout = std::time::Duration::from_secs(
                    value()?
                        .parse()
                        .map_err(|_| "--drain-timeout-secs takes a number")?,
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let data_dir = data_dir.ok_or("--data-dir is required")?;
    let listen = listen
        .parse()
        .map_err(|_| format!("invalid --listen address {listen}"))?;
    let mut config = NodeConfig::new(data_dir, listen, clock);
    for limit in &limits {
        config.event_limits.set(limit)?;
    }
    config.access =
        dynseg_proto::auth::access_from(tokens_file.as_deref(), secret_file.as_deref())?.with_tls(
            dynseg_proto::tls::Tls::from_flags(
                tls_cert.as_deref(),
                tls_key.as_deref(),
                tls_ca.as_deref(),
                mtls,
            )?,
        );
    config.metrics_listen = match metrics {
        Some(addr) => Some(
            addr.parse()
                .map_err(|_| format!("invalid --metrics address {addr}"))?,
        ),
        None => None,
    };
    config.webhook_ca = webhook_ca;
    for (flag, span) in retention {
        match flag.as_str() {
            "--change-retention" => config.shard.change_retention = span,
            "--event-retention" => config.shard.event_retention = span,
            _ => config.shard.dedupe_horizon = span,
        }
    }
    config.node_id = node_id;
    config.shard_count = shard_count;
    if control.is_some() && shards.is_some() {
        return Err("--shards and --control exclude each other: placement decides".into());
    }
    config.shards = match control {
        // Placement decides; the shards stored here are opened at start.
        Some(_) => Vec::new(),
        None => {
            let (a, b) = shards.unwrap_or((0, shard_count.saturating_sub(1)));
            (a..=b.min(shard_count.saturating_sub(1)))
                .map(|s| (s, 1))
                .collect()
        }
    };
    if let Some(mib) = memory_mib {
        config.memory_budget = mib.saturating_mul(1 << 20);
    }
    if let Some(s) = checkpoint_secs {
        config.checkpoint_every = std::time::Duration::from_secs(s.max(1));
    }
    let link = control.map(|control| LinkConfig {
        control,
        advertise: advertise.unwrap_or_else(|| listen.to_string()),
        weight,
        move_bytes_per_sec,
        drain_timeout,
        rejoin,
    });
    Ok((config, link))
}

/// A positive duration: a number and a unit (`s`, `m`, `h`, `d`, `w`).
fn span(text: &str) -> Option<Span> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    Span::from_unit(number.parse().ok()?, unit).filter(|s| s.millis() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(extra: &str) -> Result<NodeConfig, String> {
        let argv: Vec<String> = format!("--data-dir /tmp/x {extra}")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        parse(&argv).map(|(config, _)| config)
    }

    #[test]
    fn retention_flags_take_durations() {
        let config =
            parsed("--change-retention 30d --event-retention 36h --dedupe-horizon 2w").unwrap();
        assert_eq!(config.shard.change_retention, Span::days(30));
        assert_eq!(config.shard.event_retention, Span::hours(36));
        assert_eq!(config.shard.dedupe_horizon, Span::days(14));
        for bad in [
            "--change-retention 0d",
            "--event-retention 7",
            "--dedupe-horizon 3y",
        ] {
            let err = parsed(bad).unwrap_err();
            assert!(err.contains("takes a duration"), "{bad}: {err}");
        }
    }
}
