//! Real `dynseg-control` processes on 127.0.0.1 for multi-process tests and the
//! benchmark: start, wait until serving, kill -9, restart on the same data dir.

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

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

/// Starts a founding group of `members` processes on free loopback ports, data
/// under `dir/m1`, `dir/m2`, ...; returns their addresses and the processes.
pub fn start_group(bin: &Path, members: usize, dir: &Path) -> (Vec<String>, Vec<ControlProcess>) {
    let addrs: Vec<String> = free_ports(members)
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let processes = addrs
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            let id = i as u64 + 1;
            ControlProcess::start(bin, id, addr, &peers, &dir.join(format!("m{id}")))
        })
        .collect();
    (addrs, processes)
}

pub struct ControlProcess {
    pub id: u64,
    pub addr: String,
    pub data_dir: PathBuf,
    pub peers: String,
    child: Option<Child>,
}

impl ControlProcess {
    pub fn start(bin: &Path, id: u64, addr: &str, peers: &str, data_dir: &Path) -> ControlProcess {
        let mut process = ControlProcess {
            id,
            addr: addr.to_owned(),
            data_dir: data_dir.to_owned(),
            peers: peers.to_owned(),
            child: None,
        };
        process.spawn(bin);
        process
    }

    fn spawn(&mut self, bin: &Path) {
        let mut child = Command::new(bin)
            .args(["--id", &self.id.to_string(), "--listen", &self.addr])
            .args(["--peers", &self.peers])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if line.starts_with("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("dynseg-control did not start serving");
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn restart(&mut self, bin: &Path) {
        assert!(self.child.is_none());
        self.spawn(bin);
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
