//! Errors of the gateway and their two mappings: to gRPC status codes and to
//! HTTP answers in the shape Segment's clients read.

use tonic::{Code, Status};

/// Everything that can go wrong in the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No credentials, or credentials the gateway does not know.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Known credentials without the role the request needs.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The request is over a size limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// Too much work in flight: the client should retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// No placement yet, or a shard's owner did not take the batch before the
    /// retry deadline: the client may retry (message ids make it safe).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A node answered with an error that retrying cannot fix.
    #[error("{0}")]
    Node(Status),
    /// The gateway is shutting down.
    #[error("gateway is shutting down")]
    ShuttingDown,
}

impl From<dynseg_proto::auth::Denied> for GatewayError {
    fn from(denied: dynseg_proto::auth::Denied) -> GatewayError {
        match denied {
            dynseg_proto::auth::Denied::Unauthenticated(m) => GatewayError::Unauthenticated(m),
            dynseg_proto::auth::Denied::PermissionDenied(m) => GatewayError::PermissionDenied(m),
        }
    }
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Status {
        match e {
            GatewayError::Node(status) => status,
            GatewayError::InvalidArgument(m) => Status::new(Code::InvalidArgument, m),
            GatewayError::Unauthenticated(m) => Status::new(Code::Unauthenticated, m),
            GatewayError::PermissionDenied(m) => Status::new(Code::PermissionDenied, m),
            GatewayError::TooLarge(m) => Status::new(Code::InvalidArgument, m),
            GatewayError::Overloaded(m) => Status::new(Code::ResourceExhausted, m),
            GatewayError::Unavailable(m) => Status::new(Code::Unavailable, m),
            GatewayError::ShuttingDown => {
                Status::new(Code::Unavailable, "gateway is shutting down")
            }
        }
    }
}

/// An HTTP answer: status, Segment's error `code`, and whether the client
/// should retry after a pause (sent as `Retry-After`, in seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpError {
    /// The HTTP status.
    pub status: u16,
    /// A short machine-readable code (`invalid_request`, `unauthorized`, ...).
    pub code: &'static str,
    /// What went wrong, for a person.
    pub message: String,
    /// Seconds the client should wait before retrying, if it should.
    pub retry_after: Option<u32>,
}

impl From<GatewayError> for HttpError {
    fn from(e: GatewayError) -> HttpError {
        let message = e.to_string();
        let (status, code, retry_after) = match &e {
            GatewayError::InvalidArgument(_) => (400, "invalid_request", None),
            GatewayError::Unauthenticated(_) => (401, "unauthorized", None),
            GatewayError::PermissionDenied(_) => (403, "forbidden", None),
            GatewayError::TooLarge(_) => (413, "payload_too_large", None),
            GatewayError::Overloaded(_) => (429, "rate_limited", Some(1)),
            GatewayError::Unavailable(_) | GatewayError::ShuttingDown => {
                (503, "unavailable", Some(1))
            }
            GatewayError::Node(status) => match status.code() {
                Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                    (400, "invalid_request", None)
                }
                Code::Unauthenticated => (401, "unauthorized", None),
                Code::PermissionDenied => (403, "forbidden", None),
                Code::ResourceExhausted => (429, "rate_limited", Some(1)),
                Code::Unavailable | Code::Aborted | Code::DeadlineExceeded => {
                    (503, "unavailable", Some(1))
                }
                _ => (500, "internal", None),
            },
        };
        HttpError {
            status,
            code,
            message,
            retry_after,
        }
    }
}
