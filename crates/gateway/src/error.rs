//! Errors of the gateway and their one mapping to gRPC status codes.

use tonic::{Code, Status};

/// Everything that can go wrong in the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
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

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Status {
        match e {
            GatewayError::Node(status) => status,
            GatewayError::InvalidArgument(m) => Status::new(Code::InvalidArgument, m),
            GatewayError::Unavailable(m) => Status::new(Code::Unavailable, m),
            GatewayError::ShuttingDown => {
                Status::new(Code::Unavailable, "gateway is shutting down")
            }
        }
    }
}
