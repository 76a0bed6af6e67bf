//! Settings of one control-plane member.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::faults::Faults;

/// How one control-plane member runs.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// This member's raft id (non-zero, unique in the group).
    pub id: u64,
    /// Where sled keeps the raft log, hard state and snapshots.
    pub data_dir: PathBuf,
    /// The founding members (`id → address`, this member included). Every
    /// founding member must be given the same map. Ignored once the data dir
    /// holds a group; empty with `join` for a member added later.
    pub peers: BTreeMap<u64, String>,
    /// Start empty and wait to be added with `AddControlMember`.
    pub join: bool,
    /// One raft tick.
    pub tick: Duration,
    /// Ticks without a heartbeat before a follower campaigns (randomized up to twice).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries between state-machine snapshots (each compacts the log).
    pub snapshot_interval: u64,
    /// Committed changes kept for `Watch`; a watcher further behind gets a snapshot.
    pub watch_history: usize,
    /// How long a write or a linearizable read waits for Raft before giving up.
    pub request_timeout: Duration,
    /// Network fault injection (tests); the default injects nothing.
    pub faults: Faults,
    /// A secret every member presents with its raft messages; with it set, a
    /// member decodes raft messages only from senders that know it.
    pub cluster_secret: Option<String>,
    /// Who may call the member: with a token store, clients need tokens and
    /// members the cluster secret (`cluster_secret` must then be set).
    pub access: dynseg_proto::auth::Access,
    /// Where to serve `/metrics` over HTTP, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The rule limits segment writes proposed through this member must fit
    /// (applying a write checks the ceiling, the same on every member).
    pub rule_limits: dynseg_rules::Limits,
    /// Bytes of one Control API message a caller may send.
    pub max_message_bytes: usize,
}

impl ControlConfig {
    /// Defaults for member `id` storing under `data_dir`: 50 ms ticks, elections
    /// after 0.5 to 1 s of silence, heartbeats every 100 ms.
    pub fn new(id: u64, data_dir: impl Into<PathBuf>) -> ControlConfig {
        ControlConfig {
            id,
            data_dir: data_dir.into(),
            peers: BTreeMap::new(),
            join: false,
            tick: Duration::from_millis(50),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_interval: 1024,
            watch_history: 1024,
            request_timeout: Duration::from_secs(5),
            faults: Faults::default(),
            cluster_secret: None,
            access: dynseg_proto::auth::Access::open(),
            metrics_listen: None,
            rule_limits: dynseg_rules::Limits::default(),
            max_message_bytes: 64 << 20,
        }
    }
}

/// The command line of a control member: `--id N --listen ADDR --data-dir DIR
/// [--peers ID=ADDR,...] [--join] [--snapshot-interval N] [--cluster-secret-file F] [--tokens-file F] [--metrics ADDR]`.
#[derive(Clone, Debug)]
pub struct ControlArgs {
    /// Where to listen.
    pub listen: String,
    /// The member's settings.
    pub config: ControlConfig,
}

/// The usage line of [`ControlArgs::parse`].
pub const USAGE: &str = "--id N|from-hostname --listen ADDR --data-dir DIR [--peers ID=ADDR,...] [--join] \
     [--snapshot-interval N] [--cluster-secret-file F] (or DYNSEG_CLUSTER_SECRET) \
     [--tokens-file F] (or DYNSEG_TOKENS) [--tls-cert F --tls-key F [--tls-ca F] [--mtls]] [--rule-limit NAME=VALUE]... [--max-message-bytes N] [--metrics ADDR]";

impl ControlArgs {
    /// Parses the flags; with no `--peers` (and no `--join`) the member founds a
    /// group of one at its `--listen` address.
    pub fn parse(args: &[String]) -> Result<ControlArgs, String> {
        let mut id = None;
        let mut listen = None;
        let mut data_dir = None;
        let mut peers = BTreeMap::new();
        let mut join = false;
        let mut metrics_listen = None;
        let mut rule_limits = Vec::new();
        let mut max_message_bytes = None;
        let mut snapshot_interval = None;
        let mut secret_file = None;
        let mut tokens_file = None;
        let (mut tls_cert, mut tls_key, mut tls_ca, mut mtls) = (None, None, None, false);
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value"))
            };
            match flag.as_str() {
                "--id" => {
                    let text = value()?;
                    id = Some(if text == "from-hostname" {
                        id_from_hostname()?
                    } else {
                        text.parse::<u64>()
                            .ok()
                            .filter(|id| *id > 0)
                            .ok_or("--id takes a number from 1, or from-hostname")?
                    })
                }
                "--listen" => listen = Some(value()?),
                "--data-dir" => data_dir = Some(PathBuf::from(value()?)),
                "--peers" => {
                    for peer in value()?.split(',').filter(|p| !p.is_empty()) {
                        let (peer_id, address) = peer
                            .split_once('=')
                            .ok_or_else(|| format!("--peers: {peer:?} is not ID=ADDR"))?;
                        let peer_id = peer_id
                            .parse::<u64>()
                            .ok()
                            .filter(|id| *id > 0)
                            .ok_or_else(|| format!("--peers: bad id in {peer:?}"))?;
                        peers.insert(peer_id, address.to_owned());
                    }
                }
                "--join" => join = true,
                "--metrics" => {
                    let addr = value()?;
                    metrics_listen = Some(
                        addr.parse()
                            .map_err(|_| format!("invalid --metrics address {addr}"))?,
                    );
                }
                "--cluster-secret-file" => secret_file = Some(value()?),
                "--tokens-file" => tokens_file = Some(value()?),
                "--tls-cert" => tls_cert = Some(value()?),
                "--tls-key" => tls_key = Some(value()?),
                "--tls-ca" => tls_ca = Some(value()?),
                "--mtls" => mtls = true,
                "--rule-limit" => rule_limits.push(value()?),
                "--max-message-bytes" => {
                    max_message_bytes = Some(
                        value()?
                            .parse::<usize>()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or("--max-message-bytes takes a positive number")?,
                    )
                }
                "--snapshot-interval" => {
                    snapshot_interval = Some(
                        value()?
                            .parse::<u64>()
                            .map_err(|_| "--snapshot-interval takes a number")?,
                    )
                }
                other => return Err(format!("unknown argument {other}")),
            }
        }
        let id = id.ok_or("--id is required")?;
        let listen = listen.ok_or("--listen is required")?;
        let data_dir = data_dir.ok_or("--data-dir is required")?;
        if peers.is_empty() && !join {
            peers.insert(id, listen.clone());
        }
        let mut config = ControlConfig::new(id, data_dir);
        config.peers = peers;
        config.join = join;
        config.metrics_listen = metrics_listen;
        for limit in &rule_limits {
            config.rule_limits.set(limit)?;
        }
        if let Some(bytes) = max_message_bytes {
            config.max_message_bytes = bytes;
        }
        if let Some(n) = snapshot_interval {
            config.snapshot_interval = n.max(1);
        }
        let access =
            dynseg_proto::auth::access_from(tokens_file.as_deref(), secret_file.as_deref())?
                .with_tls(dynseg_proto::tls::Tls::from_flags(
                    tls_cert.as_deref(),
                    tls_key.as_deref(),
                    tls_ca.as_deref(),
                    mtls,
                )?);
        config.cluster_secret = access.cluster_secret().map(str::to_owned);
        config.access = access;
        Ok(ControlArgs { listen, config })
    }
}

/// A StatefulSet pod's raft id: its ordinal (`dynseg-control-2`) plus one.
fn id_from_hostname() -> Result<u64, String> {
    let host = std::env::var("HOSTNAME")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map_err(|e| format!("--id from-hostname: no hostname: {e}"))?;
    ordinal_id(host.trim())
}

fn ordinal_id(host: &str) -> Result<u64, String> {
    host.rsplit_once('-')
        .and_then(|(_, n)| n.parse::<u64>().ok())
        .map(|n| n + 1)
        .ok_or_else(|| format!("--id from-hostname: {host:?} does not end in -ORDINAL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn a_statefulset_ordinal_gives_the_raft_id() {
        assert_eq!(ordinal_id("dynseg-control-0"), Ok(1));
        assert_eq!(ordinal_id("dynseg-control-2"), Ok(3));
        assert!(ordinal_id("control").is_err());
    }

    #[test]
    fn a_lone_member_founds_a_group_of_one() {
        let parsed =
            ControlArgs::parse(&args("--id 1 --listen 127.0.0.1:7100 --data-dir d")).unwrap();
        assert_eq!(
            parsed.config.peers,
            BTreeMap::from([(1, "127.0.0.1:7100".into())])
        );
    }

    #[test]
    fn peers_and_errors() {
        let parsed = ControlArgs::parse(&args(
            "--id 2 --listen :7101 --data-dir d --peers 1=a:1,2=b:2,3=c:3",
        ))
        .unwrap();
        assert_eq!(parsed.config.peers.len(), 3);
        assert_eq!(parsed.config.peers[&3], "c:3");
        for bad in [
            "--listen a --data-dir d",
            "--id 0 --listen a --data-dir d",
            "--id 1 --listen a --data-dir d --peers 1:a",
            "--id 1 --listen a --data-dir d --bogus",
            "--id 1 --listen a --data-dir d --cluster-secret-file /nonexistent/secret",
        ] {
            assert!(ControlArgs::parse(&args(bad)).is_err(), "{bad}");
        }
    }
}
