//! One signed POST to a webhook endpoint over HTTP/1.1, plain or TLS.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A request (connect, send, answer) takes at most this long.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The signature header's value for `body` sent at `timestamp_ms`:
/// `sha256=` and the hex HMAC-SHA256, keyed by the secret, of
/// `"{timestamp_ms}.{body}"` (the timestamp is signed so a captured delivery
/// cannot be replayed later as new).
pub fn sign(secret: &str, timestamp_ms: i64, body: &str) -> String {
    // HMAC takes keys of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(timestamp_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// A TLS client trusting the system's roots and the PEM certificates in
/// `extra_ca` (for endpoints with a private CA).
pub fn client_tls(extra_ca: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system root rustls cannot parse is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if let Some(pem) = extra_ca {
        let mut reader = pem;
        for cert in rustls_pemfile_certs(&mut reader)? {
            roots
                .add(cert)
                .map_err(|e| format!("webhook CA certificate: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn rustls_pemfile_certs(
    reader: &mut &[u8],
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("webhook CA file: {e}"))
}

/// The parts of an `http(s)://host[:port]/path` URL a request needs.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    tls: bool,
    host: String,
    port: u16,
    /// Path and query, `/` at least.
    path: String,
}

fn target(url: &str) -> Result<Target, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(format!("{url}: not an http:// or https:// URL"));
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    let path = match path {
        "" => "/".to_owned(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_owned(),
    };
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            match port.parse::<u16>() {
                Ok(port) => (host, port),
                Err(_) if host.starts_with('[') => (authority, default_port),
                Err(_) => return Err(format!("{url}: invalid port {port:?}")),
            }
        }
        _ => (authority, default_port),
    };
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    Ok(Target {
        tls,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
        path,
    })
}

/// POSTs `body` to `url`, signed with `secret`; Ok on a 2xx answer.
pub(crate) async fn post(
    url: &str,
    body: &str,
    secret: &str,
    delivery: &str,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let target = target(url)?;
    let sent = tokio::time::timeout(TIMEOUT, async {
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("connect {}:{}: {e}", target.host, target.port))?;
        let _ = tcp.set_nodelay(true);
        if target.tls {
            let name = ServerName::try_from(target.host.clone())
                .map_err(|e| format!("{}: {e}", target.host))?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {}: {e}", target.host))?;
            send(stream, &target, body, secret, delivery).await
        } else {
            send(tcp, &target, body, secret, delivery).await
        }
    })
    .await;
    sent.unwrap_or_else(|_| Err(format!("no answer within {} s", TIMEOUT.as_secs())))
}

async fn send<S>(
    stream: S,
    target: &Target,
    body: &str,
    secret: &str,
    delivery: &str,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    // The connection is driven until the answer is read, then dropped.
    let driver = tokio::spawn(connection);
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let host = if (target.tls && target.port == 443) || (!target.tls && target.port == 80) {
        target.host.clone()
    } else {
        format!("{}:{}", target.host, target.port)
    };
    let request = http::Request::post(target.path.as_str())
        .header(http::header::HOST, host)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("dynseg/", env!("CARGO_PKG_VERSION")),
        )
        .header("x-dynseg-timestamp", timestamp.to_string())
        .header("x-dynseg-signature", sign(secret, timestamp, body))
        .header("x-dynseg-delivery", delivery)
        .body(Full::new(Bytes::from(body.to_owned())))
        .map_err(|e| format!("request: {e}"))?;
    let answer = sender.send_request(request).await;
    let result = match answer {
        Ok(response) => {
            let status = response.status();
            // Read the body so the exchange completes; its content is ignored.
            let _ = response.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("answered {status}"))
            }
        }
        Err(e) => Err(format!("request failed: {e}")),
    };
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An https endpoint whose certificate chains to the given CA: a
    /// one-request TLS server answering `status`.
    async fn tls_endpoint(status: u16) -> (u16, Vec<u8>, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tls = dynseg_proto::tls::Tls::self_signed(&["localhost"], false).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.rustls_server().unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(mut stream) = acceptor.accept(tcp).await else {
                return String::from("handshake refused");
            };
            let mut buf = vec![0u8; 16 << 10];
            let n = stream.read(&mut buf).await.unwrap();
            let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
            stream.write_all(answer.as_bytes()).await.unwrap();
            let _ = stream.shutdown().await;
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        (port, tls.cert_pem().to_vec(), served)
    }

    #[tokio::test]
    async fn https_endpoints_are_checked_against_the_given_ca() {
        let (port, ca, served) = tls_endpoint(204).await;
        let url = format!("https://localhost:{port}/hook");
        let trusted = client_tls(Some(&ca)).unwrap();
        post(&url, "{}", "s3cret", "id/0/1-1", &trusted)
            .await
            .unwrap();
        let request = served.await.unwrap();
        assert!(request.starts_with("POST /hook HTTP/1.1"), "{request}");
        assert!(request.contains("x-dynseg-delivery: id/0/1-1"), "{request}");

        // Without the CA, the same kind of endpoint is refused before sending.
        let (port, _, served) = tls_endpoint(204).await;
        let untrusted = client_tls(None).unwrap();
        let err = post(
            &format!("https://localhost:{port}/hook"),
            "{}",
            "s",
            "d",
            &untrusted,
        )
        .await
        .unwrap_err();
        assert!(err.contains("TLS with localhost"), "{err}");
        assert_eq!(served.await.unwrap(), "handshake refused");

        // A non-2xx answer is a failure to retry.
        let (port, ca, _served) = tls_endpoint(503).await;
        let err = post(
            &format!("https://localhost:{port}/"),
            "{}",
            "s",
            "d",
            &client_tls(Some(&ca)).unwrap(),
        )
        .await
        .unwrap_err();
        assert!(err.contains("503"), "{err}");
    }

    #[test]
    fn urls_give_host_port_and_path() {
        let t = |url: &str| target(url).map(|t| (t.tls, t.host, t.port, t.path));
        assert_eq!(
            t("http://127.0.0.1:8080/hook?x=1"),
            Ok((false, "127.0.0.1".into(), 8080, "/hook?x=1".into()))
        );
        assert_eq!(
            t("https://example.com"),
            Ok((true, "example.com".into(), 443, "/".into()))
        );
        assert_eq!(
            t("http://[::1]:9/a"),
            Ok((false, "::1".into(), 9, "/a".into()))
        );
        assert!(t("ftp://x/").is_err());
        assert!(t("http://:80/").is_err());
        assert!(t("http://host:port/").is_err());
    }

    #[test]
    fn signatures_are_hmac_sha256_of_timestamp_and_body() {
        // Computed independently: Python's
        // hmac.new(b"s3cret", b'1700000000000.{"a":1}', hashlib.sha256).hexdigest()
        assert_eq!(
            sign("s3cret", 1_700_000_000_000, "{\"a\":1}"),
            "sha256=8a6f992378d0d47b6fcdf1cc8d72e46ba5c789b2c9d3a538be31fe07d598ba6d"
        );
        assert_ne!(
            sign("s3cret", 1_700_000_000_001, "{\"a\":1}"),
            sign("s3cret", 1_700_000_000_000, "{\"a\":1}"),
            "the timestamp is signed"
        );
    }
}
