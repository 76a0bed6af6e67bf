//! `dynseg`: one binary for every role and every operator task (SPEC.md
//! section 5). `dynseg help` lists the commands.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use dynseg_node::Clock;
use dynseg_rules::Timestamp;

use dynseg_cli::args::Args;
use dynseg_cli::error::CliError;
use dynseg_cli::output::Output;
use dynseg_cli::{bench, cluster, commands, demo, dev, say};

// The node's allocation-heavy paths run faster on mimalloc (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const HELP: &str = "\
dynseg: real-time customer segmentation

Run:
  dynseg dev [--data DIR] [--clock system|manual[=RFC3339]] [--base-port P] [--shards N] [--tokens-file F] [--change-retention D]
                                   the whole cluster in one process (control P, node P+1, gateway P+2,
                                   its HTTP API P+3; --write-key KEY and the gateway's HTTP limits apply)
  dynseg demo [--users N] [--rate EVENTS_PER_S] [--duration SECS] [--data DIR]
                                   dev cluster + the nine SPEC segments + live traffic and changes
  dynseg control|node|gateway ARGS run one role (`dynseg node --help` shows its flags)

Segments (a gateway or a control member, --addr default 127.0.0.1:7102):
  dynseg segment validate|apply|preview -f FILE.yaml|json
  dynseg segment list | get ID | delete ID
  dynseg segment overlap A B [C...]   members of each pair of segments, and of all of them
  dynseg segment stats ID [--interval minute|hour|day] [--since 24h|RFC3339] [--threshold X]
                                   size, enters, exits and volatility per interval, with a chart
  dynseg cluster status            nodes (liveness, shards, epochs), moves in flight with progress
  dynseg cluster add-node NODE [--weight W] [--wait]    a registered node (id or address) takes shards
  dynseg cluster drain NODE [--wait]                    move every shard off a node
  dynseg cluster remove NODE                            forget a drained node
  dynseg cluster rebalance [--max-moves N] [--wait]     recompute the plan (N moves at once)

Data (gateway, --addr default 127.0.0.1:7102):
  dynseg ingest FILE.ndjson [--batch N]
  dynseg tail [--segment S]... [--from TOKEN] [--from-now] [--limit N]
  dynseg user ID
  dynseg explain USER SEGMENT       the rule's tree with every value for the user, and its next change
  dynseg members SEGMENT [--limit N]
  dynseg clock advance DURATION | --to RFC3339     (manual clock)
  dynseg bench [--users N] [--rate EVENTS_PER_S|0=max] [--duration SECS] [--warmup SECS] [--batch N] [--connections N]

Access (docs/operations.md):
  dynseg auth token NAME ROLE[,ROLE]  a new random token, and its line for a tokens file
  dynseg auth hash                    the tokens-file hash of the token read from stdin

Everywhere: --output table|json, --token T (or DYNSEG_TOKEN), --tls-ca F (or DYNSEG_TLS_CA). Exit status: 1 for a user error, 2 when a server cannot be reached.";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("dynseg: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(argv)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dynseg: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs to stderr (`RUST_LOG`, else `default`), and spans over OTLP as
/// `dynseg-ROLE` when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; keep the guard
/// for the command's life (dropping it flushes the spans).
fn init_logs(role: &str, default: &str) -> dynseg_telemetry::traces::Telemetry {
    dynseg_telemetry::traces::init(&format!("dynseg-{role}"), default)
}

fn parse_clock(text: Option<&str>) -> Result<Clock, CliError> {
    Ok(match text {
        None | Some("system") => Clock::System,
        Some("manual") => Clock::manual(Clock::System.now()),
        Some(other) => match other.strip_prefix("manual=") {
            Some(at) => Clock::manual(
                Timestamp::parse_rfc3339(at)
                    .map_err(|e| CliError::User(format!("--clock {other}: {e}")))?,
            ),
            None => {
                return Err(CliError::User(format!(
                    "unknown clock {other:?} (system, manual, manual=RFC3339)"
                )));
            }
        },
    })
}

async fn run(argv: Vec<String>) -> Result<ExitCode, CliError> {
    let command = argv.first().map(String::as_str).unwrap_or("help");
    // Roles take their own flags.
    match command {
        "control" => return run_control(&argv[1..]).await,
        "gateway" => return run_gateway(&argv[1..]).await,
        "node" => return run_node(&argv[1..]).await,
        "help" | "--help" | "-h" => {
            say!("{HELP}");
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let args = Args::parse(&argv, &["from-now", "wait", "tls"])?;
    let out = match args.get("output") {
        None | Some("table") => Output::Table,
        Some("json") => Output::Json,
        Some(other) => {
            return Err(CliError::User(format!(
                "--output {other}: use table or json"
            )));
        }
    };
    let common = ["addr", "output", "token", "tls-ca"];
    let known = |extra: &[&str]| args.only(&[&common[..], extra].concat());
    match command {
        "dev" => {
            known(
                &[
                    &[
                        "data",
                        "clock",
                        "base-port",
                        "shards",
                        "tokens-file",
                        "tls",
                        "change-retention",
                    ][..],
                    HTTP_FLAGS,
                ]
                .concat(),
            )?;
            let _telemetry = init_logs("dev", "warn,dynseg=info");
            let data = PathBuf::from(args.get("data").unwrap_or("data"));
            let clock = parse_clock(args.get("clock"))?;
            let cluster = dev::DevCluster::start(
                &data,
                dev::DevOptions {
                    base_port: args.number("base-port", 7100)?,
                    clock,
                    shard_count: args.number("shards", 256)?,
                    http: http_config(&args)?,
                    tokens: dev_tokens(&args)?,
                    tls: args.has("tls"),
                    change_retention: match args.get("change-retention") {
                        Some(text) => {
                            Some(dynseg_rules::Span(dynseg_cli::args::duration_ms(text)?))
                        }
                        None => None,
                    },
                    direct_ingest: true,
                },
            )
            .await
            .map_err(CliError::User)?;
            say!("dynseg dev cluster, data in {}", data.display());
            say!("control  {}", cluster.control);
            say!("node     {}", cluster.node);
            say!("gateway  {}", cluster.gateway);
            say!("http     {}", cluster.http);
            if args.has("tls") {
                say!(
                    "tls      {} (clients trust it: --tls-ca)",
                    data.join("tls").join("cert.pem").display()
                );
            }
            say!(
                "ready; Ctrl-C stops it (a restart resumes from {})",
                data.display()
            );
            commands::until_stopped().await;
            cluster.shutdown().await;
        }
        "demo" => {
            known(&["data", "users", "rate", "duration", "base-port", "shards"])?;
            let _telemetry = init_logs("demo", "warn");
            let temp;
            let data = match args.get("data") {
                Some(dir) => PathBuf::from(dir),
                None => {
                    temp = std::env::temp_dir().join(format!("dynseg-demo-{}", std::process::id()));
                    temp
                }
            };
            let cluster = dev::DevCluster::start(
                &data,
                dev::DevOptions {
                    base_port: args.number("base-port", 0)?,
                    shard_count: args.number("shards", 64)?,
                    ..dev::DevOptions::new(Clock::System)
                },
            )
            .await
            .map_err(CliError::User)?;
            say!(
                "dynseg demo: control {}, gateway {}, data in {}",
                cluster.control,
                cluster.gateway,
                data.display()
            );
            let duration: u64 = args.number("duration", 0)?;
            let result = demo::run(
                &cluster.control.to_string(),
                &cluster.gateway.to_string(),
                args.number("users", 5_000)?,
                args.number("rate", 2_000)?,
                (duration > 0).then(|| Duration::from_secs(duration)),
            )
            .await;
            cluster.shutdown().await;
            if args.get("data").is_none() {
                let _ = std::fs::remove_dir_all(&data);
            }
            result?;
        }
        "bench" => {
            known(&[
                "users",
                "rate",
                "duration",
                "warmup",
                "batch",
                "connections",
            ])?;
            let config = bench::BenchConfig {
                addr: commands::addr(&args),
                users: args.number("users", 100_000)?,
                rate: args.number("rate", 0)?,
                duration: Duration::from_secs(args.number("duration", 10)?),
                warmup: Duration::from_secs(args.number("warmup", 0)?),
                batch: args.number("batch", 1_000)?,
                connections: args.number("connections", 8)?,
                credentials: commands::credentials(&args)?,
            };
            bench::run(config, out).await?;
        }
        "segment" => commands::segment(&args, out).await?,
        "ingest" => {
            known(&["batch"])?;
            commands::ingest(&args, out).await?;
        }
        "tail" => {
            known(&["segment", "from", "from-now", "limit"])?;
            commands::tail(&args, out).await?;
        }
        "user" => commands::user(&args, out).await?,
        "explain" => {
            known(&[])?;
            let [_, user, segment] = args.positional.as_slice() else {
                return Err(CliError::User("usage: dynseg explain USER SEGMENT".into()));
            };
            dynseg_cli::insight::explain(&args, user, segment, out).await?;
        }
        "members" => {
            known(&["limit"])?;
            commands::members(&args, out).await?;
        }
        "clock" => {
            known(&["to"])?;
            commands::clock(&args, out).await?;
        }
        "auth" => {
            known(&[])?;
            auth(&args)?;
        }
        "cluster" => {
            known(&["weight", "wait", "max-moves"])?;
            match args.positional.get(1).map(String::as_str) {
                Some("status") => cluster::status(&args, out).await?,
                Some("add-node") => cluster::add_node(&args, out).await?,
                Some("drain") => cluster::drain(&args, out).await?,
                Some("remove") => cluster::remove(&args, out).await?,
                Some("rebalance") => cluster::rebalance(&args, out).await?,
                _ => {
                    return Err(CliError::User(
                        "usage: dynseg cluster status | add-node NODE [--weight W] [--wait] | drain NODE [--wait] | remove NODE | rebalance [--max-moves N] [--wait]".into(),
                    ));
                }
            }
        }
        other => {
            return Err(CliError::User(format!(
                "unknown command {other:?}; `dynseg help` lists them"
            )));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `dynseg auth token NAME ROLES` / `dynseg auth hash`.
fn auth(args: &Args) -> Result<(), CliError> {
    use dynseg_proto::auth::{Role, random_token, token_hash};
    match args.positional.get(1).map(String::as_str) {
        Some("token") => {
            let usage = || {
                CliError::User(
                    "usage: dynseg auth token NAME ROLE[,ROLE...] (ingest, read, admin)".into(),
                )
            };
            let name = args
                .positional
                .get(2)
                .map(String::as_str)
                .ok_or_else(usage)?;
            let roles = args
                .positional
                .get(3)
                .map(String::as_str)
                .ok_or_else(usage)?;
            for role in roles.split(',') {
                if Role::parse(role).is_none() {
                    return Err(CliError::User(format!(
                        "unknown role {role:?} (ingest, read, admin)"
                    )));
                }
            }
            let token = random_token()
                .map_err(|e| CliError::User(format!("cannot read random bytes: {e}")))?;
            say!("token: {token}");
            say!("tokens-file line: {name} {roles} {}", token_hash(&token));
        }
        Some("hash") => {
            let mut token = String::new();
            std::io::stdin()
                .read_line(&mut token)
                .map_err(|e| CliError::User(format!("cannot read the token: {e}")))?;
            say!("{}", token_hash(token.trim()));
        }
        _ => {
            return Err(CliError::User(
                "usage: dynseg auth token NAME ROLE[,ROLE...] | dynseg auth hash < token".into(),
            ));
        }
    }
    Ok(())
}

async fn run_control(argv: &[String]) -> Result<ExitCode, CliError> {
    use dynseg_control::config::{ControlArgs, USAGE};
    let dynseg_control::config::ControlArgs { listen, config } = ControlArgs::parse(argv)
        .map_err(|e| CliError::User(format!("{e}\nusage: dynseg control {USAGE}")))?;
    let _telemetry = init_logs("control", "info,raft=warn");
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| CliError::User(format!("cannot listen on {listen}: {e}")))?;
    let server = dynseg_control::ControlServer::start(config, listener)
        .await
        .map_err(|e| CliError::User(e.to_string()))?;
    say!("listening on {}", server.addr());
    commands::until_stopped().await;
    server.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

async fn run_node(argv: &[String]) -> Result<ExitCode, CliError> {
    use dynseg_node::args::{USAGE, parse};
    let (config, link) =
        parse(argv).map_err(|e| CliError::User(format!("{e}\nusage: dynseg node {USAGE}")))?;
    let _telemetry = init_logs("node", "info");
    let ready = |addr| say!("listening on {addr}");
    dynseg_node::server::run_linked(config, link, ready, commands::until_stopped())
        .await
        .map_err(|e| CliError::User(e.to_string()))?;
    Ok(ExitCode::SUCCESS)
}

/// The HTTP API's flags, shared by `dynseg dev` and `dynseg gateway`.
const HTTP_FLAGS: &[&str] = &[
    "write-key",
    "max-body-bytes",
    "max-message-bytes",
    "max-depth",
    "http-max-inflight",
];

/// `dynseg dev --tokens-file F` (or `DYNSEG_TOKENS`): the tokens the dev
/// cluster enforces; none: open.
fn dev_tokens(args: &Args) -> Result<Option<dynseg_proto::auth::TokenStore>, CliError> {
    let text = match args.get("tokens-file") {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| CliError::User(format!("--tokens-file {path}: {e}")))?,
        ),
        None => std::env::var("DYNSEG_TOKENS")
            .ok()
            .filter(|t| !t.trim().is_empty()),
    };
    text.map(|t| dynseg_proto::auth::TokenStore::parse(&t).map_err(CliError::User))
        .transpose()
}

fn http_config(args: &Args) -> Result<dynseg_gateway::HttpConfig, CliError> {
    let defaults = dynseg_gateway::HttpConfig::default();
    Ok(dynseg_gateway::HttpConfig {
        max_body_bytes: args.number("max-body-bytes", defaults.max_body_bytes)?,
        max_message_bytes: args.number("max-message-bytes", defaults.max_message_bytes)?,
        max_depth: args.number("max-depth", defaults.max_depth)?,
        max_inflight: args.number("http-max-inflight", defaults.max_inflight)?,
        write_keys: args.all("write-key").into_iter().collect(),
    })
}

async fn run_gateway(argv: &[String]) -> Result<ExitCode, CliError> {
    const USAGE: &str = "usage: dynseg gateway --control ADDR [--listen ADDR] [--http ADDR] [--tokens-file F] [--cluster-secret-file F] [--tls-cert F --tls-key F [--tls-ca F] [--mtls]] [--max-grpc-message-bytes N] [--write-key KEY]... [--max-body-bytes N] [--max-message-bytes N] [--max-depth N] [--http-max-inflight N]";
    let args = Args::parse(argv, &["mtls"])?;
    args.only(
        &[
            &[
                "control",
                "listen",
                "http",
                "tokens-file",
                "cluster-secret-file",
                "tls-cert",
                "tls-key",
                "tls-ca",
                "mtls",
                "max-grpc-message-bytes",
            ][..],
            HTTP_FLAGS,
        ]
        .concat(),
    )?;
    let control = args
        .get("control")
        .ok_or_else(|| CliError::User(USAGE.into()))?;
    let _telemetry = init_logs("gateway", "info");
    let bind = |addr: &str| {
        let addr = addr.to_owned();
        async move {
            tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|e| CliError::User(format!("cannot listen on {addr}: {e}")))
        }
    };
    let listener = bind(args.get("listen").unwrap_or("127.0.0.1:7102")).await?;
    let http_listener = match args.get("http") {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let mut config = dynseg_gateway::GatewayConfig::new(control);
    config.http = http_config(&args)?;
    config.max_message_bytes = args.number("max-grpc-message-bytes", config.max_message_bytes)?;
    config.access =
        dynseg_proto::auth::access_from(args.get("tokens-file"), args.get("cluster-secret-file"))
            .map_err(CliError::User)?
            .with_tls(
                dynseg_proto::tls::Tls::from_flags(
                    args.get("tls-cert"),
                    args.get("tls-key"),
                    args.get("tls-ca"),
                    args.has("mtls"),
                )
                .map_err(CliError::User)?,
            );
    let server = dynseg_gateway::GatewayServer::start(config, listener, http_listener)
        .await
        .map_err(|e| CliError::User(e.to_string()))?;
    say!("listening on {}", server.addr());
    if let Some(http) = server.http_addr() {
        say!("http on {http}");
    }
    commands::until_stopped().await;
    server.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
