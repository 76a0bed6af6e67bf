//! Runs one control-plane member: `dynseg-control --id N --listen ADDR --data-dir
//! DIR [--peers ID=ADDR,...] [--join]`.
//!
//! Prints `listening on ADDR` once it serves; shuts down cleanly (raft storage
//! synced) on SIGTERM or Ctrl-C.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::process::ExitCode;

use dynseg_control::ControlServer;
use dynseg_control::config::{ControlArgs, USAGE};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,raft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ControlArgs { listen, config } = match ControlArgs::parse(&args) {
        Ok(parsed) => parsed,
        Err(problem) => {
            eprintln!("dynseg-control: {problem}\nusage: dynseg-control {USAGE}");
            return ExitCode::from(1);
        }
    };
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("dynseg-control: cannot listen on {listen}: {e}");
            return ExitCode::from(2);
        }
    };
    let server = match ControlServer::start(config, listener).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("dynseg-control: {e}");
            return ExitCode::from(2);
        }
    };
    println!("listening on {}", server.addr());
    let _ = std::io::stdout().flush();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            eprintln!("dynseg-control: cannot watch SIGTERM: {e}");
            return ExitCode::from(2);
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    server.shutdown().await;
    ExitCode::SUCCESS
}
