//! A node in the gateway's own process (`dynseg dev`): the gateway lends it
//! each call's batches as they are, instead of encoding them, sending them
//! over HTTP/2 on loopback and having the node decode them again. Lent, not
//! given: the gateway keeps its events to resend a refused batch without
//! having copied them first. Routing, epochs, refusals and retries are the
//! same as for a remote node.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use dynseg_proto::{BatchRef, pb};

/// A boxed future, as [`LocalNode`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a gateway asks of a node in its own process.
pub trait LocalNode: Send + Sync + 'static {
    /// The node's `IngestShards`: the same checks, answers and errors.
    fn ingest_shards<'a>(
        &'a self,
        batches: &'a [BatchRef<'a>],
    ) -> BoxFuture<'a, Result<pb::ShardBatchResults, tonic::Status>>;
}

/// The node in this process, and the id it is placed under.
#[derive(Clone)]
pub struct LocalNodeHandle {
    /// The node's id in the topology.
    pub id: String,
    /// The node.
    pub node: Arc<dyn LocalNode>,
}

impl fmt::Debug for LocalNodeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalNodeHandle")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}
