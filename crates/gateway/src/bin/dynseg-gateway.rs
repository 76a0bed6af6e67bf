//! Runs one gateway: `dynseg-gateway --control ADDR [--listen ADDR] [--http ADDR]`.
//!
//! Prints `listening on ADDR` once it serves; shuts down on SIGTERM or Ctrl-C.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::process::ExitCode;

use dynseg_gateway::{GatewayConfig, GatewayServer};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut control = None;
    let mut listen = "127.0.0.1:7300".to_owned();
    let mut http = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match (flag.as_str(), it.next()) {
            ("--control", Some(v)) => control = Some(v.clone()),
            ("--listen", Some(v)) => listen = v.clone(),
            ("--http", Some(v)) => http = Some(v.clone()),
            _ => {
                eprintln!(
                    "dynseg-gateway: unexpected {flag}\nusage: dynseg-gateway --control ADDR [--listen ADDR] [--http ADDR]"
                );
                return ExitCode::from(1);
            }
        }
    }
    let Some(control) = control else {
        eprintln!(
            "dynseg-gateway: --control is required\nusage: dynseg-gateway --control ADDR [--listen ADDR] [--http ADDR]"
        );
        return ExitCode::from(1);
    };
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("dynseg-gateway: cannot listen on {listen}: {e}");
            return ExitCode::from(2);
        }
    };
    let http_listener = match &http {
        None => None,
        Some(http) => match tokio::net::TcpListener::bind(http).await {
            Ok(listener) => Some(listener),
            Err(e) => {
                eprintln!("dynseg-gateway: cannot listen on {http}: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let server =
        match GatewayServer::start(GatewayConfig::new(control), listener, http_listener).await {
            Ok(server) => server,
            Err(e) => {
                eprintln!("dynseg-gateway: {e}");
                return ExitCode::from(2);
            }
        };
    println!("listening on {}", server.addr());
    let _ = std::io::stdout().flush();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            eprintln!("dynseg-gateway: cannot watch SIGTERM: {e}");
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
