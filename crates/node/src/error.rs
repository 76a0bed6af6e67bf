//! The node's errors, and their one mapping to gRPC status codes.
//!
//! Three families stay apart for clients: retry elsewhere (`ABORTED`: wrong
//! owner or stale epoch, with the current epoch and owner in metadata), retry
//! later (`UNAVAILABLE`), and do not retry (`INVALID_ARGUMENT`, `NOT_FOUND`,
//! `FAILED_PRECONDITION`).

use std::sync::Arc;

use tonic::{Code, Status};

use crate::store::StoreError;
use crate::wal::WalError;

/// Errors of the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The batch names an epoch that is not the shard's current one.
    #[error("shard {shard}: epoch {sent} is not the current epoch {current}")]
    WrongEpoch {
        /// The shard.
        shard: u32,
        /// The epoch the client sent.
        sent: u64,
        /// The shard's epoch here.
        current: u64,
    },
    /// This node does not serve the shard.
    #[error("shard {shard} is not served by this node{}", owner.as_ref().map(|o| format!("; its owner is {o}")).unwrap_or_default())]
    NotServing {
        /// The shard.
        shard: u32,
        /// Who serves it now, if known.
        owner: Option<String>,
    },
    /// The shard is being handed to another node: writes wait for the control
    /// plane to commit (or abort) the move.
    #[error("shard {0} is moving to another node; retry shortly")]
    Moving(u32),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// A rule set does not compile.
    #[error("invalid rules: {0}")]
    Rules(#[from] dynseg_rules::Error),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request needs the manual clock.
    #[error("the node runs on the system clock: only a manual clock can be advanced")]
    NotManualClock,
    /// The node is shutting down or a shard task stopped.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The write-ahead log failed: nothing more can be made durable.
    #[error("{0}")]
    Wal(Arc<WalError>),
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl From<Arc<WalError>> for NodeError {
    fn from(e: Arc<WalError>) -> Self {
        NodeError::Wal(e)
    }
}

/// Metadata keys clients read to redirect.
pub const META_ERROR: &str = "dynseg-error";
/// The shard's current epoch, with `wrong-epoch`.
pub const META_EPOCH: &str = "dynseg-epoch";
/// The shard's owner, with `not-serving` when known.
pub const META_OWNER: &str = "dynseg-owner";

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        let message = e.to_string();
        match e {
            NodeError::WrongEpoch { current, .. } => {
                let mut status = Status::new(Code::Aborted, message);
                status
                    .metadata_mut()
                    .insert(META_ERROR, "wrong-epoch".parse().expect("ascii"));
                if let Ok(v) = current.to_string().parse() {
                    status.metadata_mut().insert(META_EPOCH, v);
                }
                status
            }
            NodeError::NotServing { owner, .. } => {
                let mut status = Status::new(Code::Aborted, message);
                status
                    .metadata_mut()
                    .insert(META_ERROR, "not-serving".parse().expect("ascii"));
                if let Some(v) = owner.and_then(|o| o.parse().ok()) {
                    status.metadata_mut().insert(META_OWNER, v);
                }
                status
            }
            NodeError::Invalid(_) | NodeError::Rules(_) => Status::invalid_argument(message),
            NodeError::NotFound(_) => Status::not_found(message),
            NodeError::NotManualClock => Status::failed_precondition(message),
            NodeError::Unavailable(_) | NodeError::Moving(_) => Status::unavailable(message),
            NodeError::Wal(_) | NodeError::Store(_) => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_carry_the_epoch_and_owner() {
        let status = Status::from(NodeError::WrongEpoch {
            shard: 3,
            sent: 1,
            current: 2,
        });
        assert_eq!(status.code(), Code::Aborted);
        assert_eq!(status.metadata().get(META_ERROR).unwrap(), "wrong-epoch");
        assert_eq!(status.metadata().get(META_EPOCH).unwrap(), "2");
        let status = Status::from(NodeError::NotServing {
            shard: 3,
            owner: Some("10.0.0.2:7000".into()),
        });
        assert_eq!(
            status.message(),
            "shard 3 is not served by this node; its owner is 10.0.0.2:7000"
        );
        assert_eq!(status.metadata().get(META_OWNER).unwrap(), "10.0.0.2:7000");
        assert_eq!(
            Status::from(NodeError::Invalid("bad".into())).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            Status::from(NodeError::NotManualClock).code(),
            Code::FailedPrecondition
        );
    }
}
