//! How dynseg processes reach each other and how the CLI reaches them: one
//! place that turns an address into a channel presenting credentials.

use tonic::transport::{Endpoint, Error};

pub use crate::auth::Conn;
use crate::auth::{Credentials, with_credentials};

/// `http://` (or `https://` with TLS) + `address`, unless it already names a
/// scheme.
pub fn url(address: &str, tls: bool) -> String {
    if address.contains("://") {
        address.to_owned()
    } else if tls {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    }
}

/// The endpoint for `address`, over TLS when `credentials` say so.
pub fn endpoint(address: &str, credentials: &Credentials) -> Result<Endpoint, Error> {
    let endpoint = Endpoint::from_shared(url(address, credentials.tls().is_some()))?;
    match credentials.tls() {
        Some(tls) => endpoint.tls_config(tls.clone()),
        None => Ok(endpoint),
    }
}

/// Connects to `address` now, presenting `credentials` on every call.
pub async fn connect(address: &str, credentials: Credentials) -> Result<Conn, Error> {
    connect_endpoint(endpoint(address, &credentials)?, credentials).await
}

/// Connects through `endpoint` (with its timeouts) now.
pub async fn connect_endpoint(endpoint: Endpoint, credentials: Credentials) -> Result<Conn, Error> {
    Ok(with_credentials(endpoint.connect().await?, credentials))
}

/// A channel to `endpoint` that connects on first use (and reconnects).
pub fn lazy(endpoint: Endpoint, credentials: Credentials) -> Conn {
    with_credentials(endpoint.connect_lazy(), credentials)
}

/// Whether a call answered with `code` was refused for what it asked (an
/// unknown segment, a malformed token, missing rights, unreadable data), so
/// asking the same again gets the same answer; the other codes (a server
/// restarting, a moved shard, a cut connection, an overload) may pass by
/// themselves. A stream that follows the cluster retries the second kind and
/// gives up on the first.
pub fn is_refusal(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::DataLoss
    )
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn addresses_get_a_scheme_once() {
        assert_eq!(url("127.0.0.1:7102", false), "http://127.0.0.1:7102");
        assert_eq!(url("127.0.0.1:7102", true), "https://127.0.0.1:7102");
        assert_eq!(url("https://gw:443", false), "https://gw:443");
    }

    #[test]
    fn refusals_are_what_the_request_asked_and_the_rest_may_pass() {
        for code in [
            Code::NotFound,
            Code::InvalidArgument,
            Code::DataLoss,
            Code::PermissionDenied,
        ] {
            assert!(is_refusal(code), "{code:?}");
        }
        for code in [
            Code::Unavailable,
            Code::Aborted,
            Code::Cancelled,
            Code::Unknown,
            Code::Internal,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
        ] {
            assert!(!is_refusal(code), "{code:?}");
        }
    }
}
