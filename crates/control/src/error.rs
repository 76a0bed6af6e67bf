//! Errors of the control plane and their one mapping to gRPC status codes.

use tonic::{Code, Status};

/// Everything that can go wrong in the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A segment rule (or the set it forms with the stored segments) is invalid;
    /// the message carries the rule error's `line:column`.
    #[error("invalid rule: {0}")]
    InvalidRule(String),
    /// A request field is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The named segment does not exist.
    #[error("segment {0} not found")]
    SegmentNotFound(String),
    /// The named node, gateway or control member does not exist.
    #[error("{0} not found")]
    MemberNotFound(String),
    /// The write is valid in itself but conflicts with the stored state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No leader is reachable (or it did not answer in time): nothing was applied.
    #[error("no raft leader reachable: {0}")]
    NoLeader(String),
    /// The write was proposed but its commit was not seen in time: it may still
    /// commit. Retrying a segment write is safe (writes are idempotent puts).
    #[error("write not confirmed in time (it may still commit): {0}")]
    Unconfirmed(String),
    /// The raft task has stopped (the member is shutting down).
    #[error("control member is shutting down")]
    ShuttingDown,
    /// A raft message came without the cluster secret (or with a wrong one).
    #[error("raft messages need the cluster secret")]
    Unauthenticated,
    /// A raft message from a peer could not be decoded or is not from a member.
    #[error("rejected raft message: {0}")]
    BadPeerMessage(String),
    /// Storage failed.
    #[error("storage: {0}")]
    Storage(#[from] sled::Error),
    /// Raft itself refused (other than a dropped proposal).
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// Stored data could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

impl From<ControlError> for Status {
    fn from(e: ControlError) -> Status {
        let code = match &e {
            ControlError::InvalidRule(_)
            | ControlError::InvalidArgument(_)
            | ControlError::BadPeerMessage(_) => Code::InvalidArgument,
            ControlError::SegmentNotFound(_) | ControlError::MemberNotFound(_) => Code::NotFound,
            ControlError::FailedPrecondition(_) => Code::FailedPrecondition,
            ControlError::NoLeader(_) | ControlError::ShuttingDown => Code::Unavailable,
            ControlError::Unauthenticated => Code::Unauthenticated,
            ControlError::Unconfirmed(_) => Code::DeadlineExceeded,
            ControlError::Storage(_) | ControlError::Raft(_) | ControlError::Corrupt(_) => {
                Code::Internal
            }
        };
        Status::new(code, e.to_string())
    }
}
