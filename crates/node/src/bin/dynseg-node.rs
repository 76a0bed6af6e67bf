//! Runs one shard node: `dynseg-node --data-dir DIR [--listen ADDR] [--node-id ID]
//! [--shard-count N] [--shards A-B] [--clock system|manual[=RFC3339]]
//! [--checkpoint-secs S] [--memory-mib M] [--control ADDR [--advertise ADDR]
//! [--weight N]]`.
//!
//! With `--control`, the node registers with the control plane and serves the
//! shards placement gives it (not `--shards`), applying each rule-set version
//! the control plane commits.
//!
//! Prints `listening on ADDR` once it serves, and shuts down cleanly (checkpoint,
//! sync) on SIGTERM or Ctrl-C.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::process::ExitCode;

use dynseg_node::args::{USAGE, parse};
use dynseg_node::server::run_linked;

// Allocation-heavy paths (protobuf decoding, sled's pages) run markedly faster
// on mimalloc than on glibc's malloc; docs/performance.md has the numbers.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn usage(problem: &str) -> ExitCode {
    eprintln!("dynseg-node: {problem}");
    eprintln!("usage: dynseg-node {USAGE}");
    ExitCode::from(1)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (config, link) = match parse(&args) {
        Ok(parsed) => parsed,
        Err(problem) => return usage(&problem),
    };
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            eprintln!("dynseg-node: cannot watch SIGTERM: {e}");
            return ExitCode::from(2);
        }
    };
    let ready = |addr| {
        println!("listening on {addr}");
        let _ = std::io::stdout().flush();
    };
    let stopped = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    if let Err(e) = run_linked(config, link, ready, stopped).await {
        eprintln!("dynseg-node: {e}");
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}
