//! Shared by the end-to-end tests: real `dynseg` processes, free ports, and the
//! memberships a cluster lists.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod clients;
pub mod dev;
pub mod receiver;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use dynseg_proto::pb::gateway_client::GatewayClient;
use dynseg_rules::reference::Reference;
use dynseg_rules::{Limits, SegmentDef};
use tonic::transport::Channel;

/// A number from the environment, or `default`.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Free loopback ports, found by binding port 0 and letting go.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A `dynseg` process; killed (SIGKILL) when dropped.
pub struct Process {
    args: Vec<String>,
    /// Extra environment for the process (fault hooks).
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// Lines it printed on stdout before the one it was waiting for.
    pub lines: Vec<String>,
    /// Its stdout lines after those.
    output: Option<mpsc::Receiver<String>>,
}

impl Process {
    /// Starts `dynseg ARGS` and waits for a stdout line starting with `ready_prefix`.
    pub fn start(args: &[String], ready_prefix: &str) -> Process {
        Process::start_with_env(args, ready_prefix, &[])
    }

    /// [`Process::start`] with extra environment variables.
    pub fn start_with_env(args: &[String], ready_prefix: &str, env: &[(&str, &str)]) -> Process {
        let mut process = Process {
            args: args.to_vec(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
            lines: Vec::new(),
            output: None,
        };
        process.spawn(ready_prefix);
        process
    }

    /// Starts `dynseg ARGS` without waiting for any line (a client such as
    /// `tail`); read what it prints with [`Process::next_line`].
    pub fn start_client(args: &[String]) -> Process {
        Process::start(args, "")
    }

    /// The next stdout line after the readiness line, or `None` after `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        self.output.as_ref()?.recv_timeout(timeout).ok()
    }

    fn spawn(&mut self, ready_prefix: &str) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dynseg"))
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("DYNSEG_E2E_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        while !ready_prefix.is_empty() {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| {
                    panic!("dynseg {:?} did not print {ready_prefix:?}", self.args)
                });
            let done = line.starts_with(ready_prefix);
            self.lines.push(line);
            if done {
                break;
            }
        }
        self.output = Some(rx);
        self.child = Some(child);
    }

    /// SIGINT (Ctrl-C), then waits for a clean exit; true when it exited 0.
    pub fn interrupt(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let sent = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        sent && child.wait().is_ok_and(|s| s.success())
    }

    /// SIGTERM, then waits for the exit; true when it exited 0.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        sent && child.wait().is_ok_and(|s| s.success())
    }

    /// Waits up to `timeout` for the process to exit by itself; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, stopped, with the same arguments and environment; what
    /// it prints from then on replaces [`Process::lines`].
    pub fn respawn(&mut self, ready_prefix: &str) {
        assert!(self.child.is_none());
        self.lines.clear();
        self.spawn(ready_prefix);
    }

    /// Starts it again with `args` (for example a new clock), same readiness line.
    pub fn restart_with(&mut self, args: &[String], ready_prefix: &str) {
        assert!(self.child.is_none());
        self.args = args.to_vec();
        self.env.clear();
        self.spawn(ready_prefix);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `dynseg dev --base-port 0 ARGS --data TEMP`: the process, its data
/// directory, and the addresses it printed.
pub struct DevProcess {
    pub process: Process,
    pub dir: tempfile::TempDir,
    pub control: String,
    pub node: String,
    pub gateway: String,
    pub http: String,
}

impl DevProcess {
    /// Starts it with `line` (flags) and extra environment, and waits for `ready`.
    pub fn start(line: &str, env: &[(&str, &str)]) -> DevProcess {
        let dir = tempfile::tempdir().unwrap();
        let line = format!("dev --base-port 0 {line} --data");
        let process = Process::start_with_env(&args(&line, dir.path()), "ready", env);
        let printed = |prefix: &str| printed(&process, prefix);
        DevProcess {
            control: printed("control"),
            node: printed("node"),
            gateway: printed("gateway"),
            http: printed("http"),
            process,
            dir,
        }
    }

    /// What it printed after `prefix` on a line of its own.
    pub fn printed(&self, prefix: &str) -> String {
        printed(&self.process, prefix)
    }

    /// Stops it with SIGTERM (a clean shutdown) and starts it again on the
    /// same data; the addresses are the new ones it printed.
    pub fn restart(&mut self) {
        assert!(self.process.terminate(), "dev did not stop cleanly");
        self.respawn();
    }

    /// Kills it with SIGKILL (no shutdown path runs) and starts it again on
    /// the same data; the addresses are the new ones it printed.
    pub fn crash_and_restart(&mut self) {
        self.process.kill9();
        self.respawn();
    }

    fn respawn(&mut self) {
        self.process.respawn("ready");
        self.control = self.printed("control");
        self.node = self.printed("node");
        self.gateway = self.printed("gateway");
        self.http = self.printed("http");
    }
}

/// What `process` printed after `prefix`, on the last line with it (a
/// restarted process prints its new addresses after the old ones).
pub fn printed(process: &Process, prefix: &str) -> String {
    process
        .lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("nothing printed after {prefix:?}: {:?}", process.lines))
        .trim()
        .to_owned()
}

/// Runs `dynseg ARGS` to completion: its exit code and stdout.
pub fn run_cli(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_dynseg"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// Starts a control plane of one member listening on `addr`, with its data
/// under `dir`, and returns it with a client once it takes writes, the shard
/// count set to `shards`.
pub async fn start_control(
    dir: &Path,
    addr: &str,
    shards: u32,
) -> (Process, ControlClient<Channel>) {
    let process = Process::start(
        &args(
            &format!("control --id 1 --listen {addr} --peers 1={addr} --data-dir"),
            dir,
        ),
        "listening on",
    );
    let mut control = ControlClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    set_shard_count(&mut control, shards).await;
    (process, control)
}

/// Sets the shard count, retrying while the control plane elects a leader.
pub async fn set_shard_count(control: &mut ControlClient<Channel>, shards: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while control
        .set_shard_count(pb::SetShardCountRequest {
            shard_count: shards,
        })
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the control plane never took a write"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The topology, read linearizably.
pub async fn topology(control: &mut ControlClient<Channel>) -> pb::Topology {
    control
        .get_topology(pb::ReadOptions { stale: false })
        .await
        .unwrap()
        .into_inner()
        .topology
        .unwrap()
}

/// Applies the nine SPEC segments; returns their ids and the reference
/// evaluator over them.
pub async fn apply_spec_segments(control: &mut ControlClient<Channel>) -> (Vec<String>, Reference) {
    let defs: Vec<SegmentDef> = dynseg_rules::examples::spec_segments();
    control
        .apply_segments(pb::SegmentsRequest {
            segments: defs.iter().map(pb::SegmentDef::from).collect(),
        })
        .await
        .unwrap();
    let ids = defs.iter().map(|d| d.id.as_str().to_owned()).collect();
    (ids, Reference::new(&defs, &Limits::default()).unwrap())
}

/// Arguments from a space-separated line plus a path.
pub fn args(line: &str, dir: &Path) -> Vec<String> {
    let mut args: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
    args.push(dir.to_string_lossy().into_owned());
    args
}

/// Sends a batch until it is acknowledged: a node being restarted makes the
/// gateway answer UNAVAILABLE after its own retries, and the client tries again
/// with the same message ids (the node drops repeats).
pub async fn ingest_until_acked(
    client: &mut GatewayClient<Channel>,
    events: &[pb::Event],
    seed: u64,
) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut retries = 0;
    loop {
        match client
            .ingest(pb::IngestRequest {
                events: events.to_vec(),
            })
            .await
        {
            Ok(reply) => {
                let reply = reply.into_inner();
                assert!(
                    reply.rejected.is_empty(),
                    "refused {:?} (seed {seed})",
                    reply.rejected.first()
                );
                return retries;
            }
            Err(status) if status.code() == tonic::Code::Unavailable => {
                assert!(
                    Instant::now() < deadline,
                    "ingest never recovered: {status} (seed {seed})"
                );
                retries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("ingest failed: {status} (seed {seed})"),
        }
    }
}

/// Every (user, segment) membership the cluster lists through a gateway.
pub async fn listed(
    client: &mut GatewayClient<Channel>,
    segments: &[String],
) -> BTreeSet<(String, String)> {
    let mut members = BTreeSet::new();
    for segment in segments {
        let mut token = String::new();
        loop {
            let page = client
                .list_members(pb::ListMembersRequest {
                    segment: segment.clone(),
                    page_size: 10_000,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            members.extend(page.user_ids.into_iter().map(|u| (u, segment.clone())));
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
    }
    members
}

/// Folds one change into stream-derived memberships, checking it is the next
/// in its shard and consistent (enter of a non-member, exit of a member).
pub fn fold_change(
    change: &pb::MembershipChange,
    members: &mut BTreeSet<(String, String)>,
    last_sequence: &mut std::collections::BTreeMap<u32, u64>,
) {
    let cursor = change.cursor.unwrap();
    let last = last_sequence.entry(cursor.shard).or_insert(0);
    assert!(
        cursor.sequence > *last,
        "shard {} repeated or reordered a change: {change:?}",
        cursor.shard
    );
    *last = cursor.sequence;
    let key = (change.user_id.clone(), change.segment.clone());
    if change.kind == pb::ChangeKind::Enter as i32 {
        assert!(members.insert(key), "enter twice without exit: {change:?}");
    } else {
        assert!(members.remove(&key), "exit of a non-member: {change:?}");
    }
}

/// Waits until every node behind `client` has the rules that define `segment`
/// (a node answers NOT_FOUND for a segment it does not have yet).
pub async fn wait_for_rules(client: &mut GatewayClient<Channel>, segment: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let probe = client
            .list_members(pb::ListMembersRequest {
                segment: segment.to_owned(),
                page_size: 1,
                page_token: String::new(),
            })
            .await;
        if probe.is_ok() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rules never reached the nodes: {probe:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every (user, segment) membership the reference evaluator gives at `now`.
pub fn reference_members(
    reference: &dynseg_rules::reference::Reference,
    history: &std::collections::BTreeMap<String, Vec<dynseg_rules::Event>>,
    now: dynseg_rules::Timestamp,
) -> BTreeSet<(String, String)> {
    history
        .iter()
        .flat_map(|(user, events)| {
            reference
                .members(events, now)
                .into_iter()
                .map(move |s| (user.clone(), s.as_str().to_owned()))
        })
        .collect()
}

/// Fails with a sample of the differences when the cluster's memberships are
/// not the reference's.
pub fn assert_memberships(
    actual: &BTreeSet<(String, String)>,
    expected: &BTreeSet<(String, String)>,
    context: &str,
) {
    if actual != expected {
        let missing: Vec<_> = expected.difference(actual).take(5).collect();
        let extra: Vec<_> = actual.difference(expected).take(5).collect();
        panic!("{context}: memberships differ; missing {missing:?}, extra {extra:?}");
    }
}
