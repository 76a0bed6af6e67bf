//! Ingest through the gateway: split a client's events per shard, send each part
//! to its owner with the epoch the routing table names, retry redirects and
//! restarts until placement settles, and merge the replies. The client is
//! acknowledged only when every part is durable on its shard.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dynseg_proto::{BatchRef, pb, shard_for};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tonic::Code;
use tracing::Instrument;

use dynseg_proto::client::Conn;
use dynseg_proto::pb::node_client::NodeClient;

use crate::error::GatewayError;
use crate::local::LocalNodeHandle;
use crate::merge::{Merge, merge_of};
use crate::routing::Routing;

/// The events of one request bound for one shard, with their request indexes.
#[derive(Debug, Default, PartialEq)]
pub struct Part {
    /// Index in the request of each event.
    pub indexes: Vec<u32>,
    /// The events.
    pub events: Vec<pb::Event>,
}

/// The key a user is routed by: `user_id`, else `anonymous_id`.
pub fn user_key(event: &pb::Event) -> Option<&str> {
    [&event.user_id, &event.anonymous_id]
        .into_iter()
        .find(|id| !id.is_empty())
        .map(String::as_str)
}

/// Groups events by shard, keeping request order within each shard; events
/// with no user are refused here, by index.
pub fn split(
    events: Vec<pb::Event>,
    shard_count: u32,
) -> (BTreeMap<u32, Part>, Vec<pb::RejectedEvent>) {
    let mut parts: BTreeMap<u32, Part> = BTreeMap::new();
    let mut rejected = Vec::new();
    for (index, event) in events.into_iter().enumerate() {
        let index = index as u32;
        match user_key(&event) {
            Some(user) => {
                let part = parts.entry(shard_for(user, shard_count)).or_default();
                part.indexes.push(index);
                part.events.push(event);
            }
            None => rejected.push(pb::RejectedEvent {
                index,
                reason: "an event needs a user_id or an anonymous_id".into(),
            }),
        }
    }
    (parts, rejected)
}

/// Sends events to their shards' owners.
#[derive(Clone)]
pub struct Ingestor {
    routing: watch::Receiver<Arc<Routing>>,
    /// Bounds the shard batches in flight across all clients: when full, new
    /// requests wait (backpressure), nothing queues without bound.
    inflight: Arc<Semaphore>,
    retry_for: Duration,
    local: Option<LocalNodeHandle>,
}

impl Ingestor {
    /// An ingestor over `routing`, with at most `max_inflight` shard batches in
    /// flight, retrying a redirected batch for up to `retry_for`; `local` is a
    /// node in this process, called directly.
    pub fn new(
        routing: watch::Receiver<Arc<Routing>>,
        max_inflight: usize,
        retry_for: Duration,
        local: Option<LocalNodeHandle>,
    ) -> Ingestor {
        Ingestor {
            routing,
            inflight: Arc::new(Semaphore::new(max_inflight.max(1))),
            retry_for,
            local,
        }
    }

    /// Ingests `events` and returns the merged reply, rejected indexes as in
    /// the request.
    pub async fn ingest(&self, events: Vec<pb::Event>) -> Result<pb::IngestReply, GatewayError> {
        let started = Instant::now();
        let count = events.len();
        let outcome = self.route(events).await;
        crate::metrics::record_ingest(started, count, &outcome);
        outcome
    }

    async fn route(&self, events: Vec<pb::Event>) -> Result<pb::IngestReply, GatewayError> {
        let shard_count = self.shard_count().await?;
        let merges: Vec<Merge> = events
            .iter()
            .enumerate()
            .filter_map(|(i, e)| merge_of(i as u32, e))
            .collect();
        let (parts, mut rejected) = split(events, shard_count);
        let mut reply = pb::IngestReply::default();
        // One call per owning node carries all its shards' parts; shards with
        // no owner yet (key `None`) and parts a call could not place are
        // retried one shard at a time, as placement settles.
        let mut by_node: BTreeMap<Option<String>, Vec<(u32, u64, Part)>> = BTreeMap::new();
        {
            let table = self.routing.borrow();
            for (shard, part) in parts {
                let (node, epoch) = match table.owner(shard) {
                    Some((owner, _)) => (Some(owner.node.clone()), owner.epoch),
                    None => (None, 0),
                };
                by_node.entry(node).or_default().push((shard, epoch, part));
            }
        }
        let mut sends = JoinSet::new();
        for (node, parts) in by_node {
            let ingestor = self.clone();
            // The part's calls belong to the request's trace.
            let span = tracing::Span::current();
            sends.spawn(
                async move {
                    let _permit = ingestor
                        .inflight
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| GatewayError::ShuttingDown)?;
                    ingestor.send_to_node(node.as_deref(), parts).await
                }
                .instrument(span),
            );
        }
        // Dropping the set on an error aborts the other parts; their events may
        // still have landed, which a retry with the same message ids makes harmless.
        while let Some(joined) = sends.join_next().await {
            let answered = joined.map_err(|e| GatewayError::Unavailable(e.to_string()))??;
            for (indexes, response) in answered {
                reply.accepted += response.accepted;
                reply.duplicates += response.duplicates;
                for r in response.rejected {
                    let index = indexes.get(r.index as usize).copied().unwrap_or(u32::MAX);
                    rejected.push(pb::RejectedEvent {
                        index,
                        reason: r.reason,
                    });
                }
            }
        }
        rejected.sort_by_key(|r| r.index);
        // Merges run once their events are durable (a refused event merges
        // nothing), in request order, before the client is acknowledged.
        for merge in &merges {
            if rejected.iter().all(|r| r.index != merge.index) {
                self.merge(merge).await?;
            }
        }
        reply.rejected = rejected;
        Ok(reply)
    }

    /// Sends a node all its shards' parts in one `IngestShards` call; parts
    /// the node refuses with a retryable error (a moved shard, a stale epoch)
    /// or that a failed call leaves unanswered go through [`Ingestor::send`].
    async fn send_to_node(
        &self,
        node: Option<&str>,
        parts: Vec<(u32, u64, Part)>,
    ) -> Result<Vec<(Vec<u32>, pb::IngestResponse)>, GatewayError> {
        let local = self
            .local
            .as_ref()
            .filter(|local| node == Some(local.id.as_str()));
        let answer = if let Some(local) = local {
            // Lent: a part the node refuses is resent from `parts` below.
            let batches: Vec<BatchRef<'_>> = parts
                .iter()
                .map(|(shard, epoch, part)| BatchRef {
                    shard: *shard,
                    epoch: *epoch,
                    events: &part.events,
                })
                .collect();
            // The same span a remote node's server would open, so traces
            // look alike either way.
            let method = "dynseg.v1.Node/IngestShards";
            let span = tracing::info_span!(
                "grpc",
                otel.name = method,
                otel.kind = "internal",
                rpc.method = method
            );
            Some(local.node.ingest_shards(&batches).instrument(span).await)
        } else if let Some(mut client) =
            node.and_then(|node| self.routing.borrow().nodes.get(node).cloned())
        {
            // Copied: a part the node refuses is resent on its own.
            let batches = pb::ShardBatches {
                batches: parts
                    .iter()
                    .map(|(shard, epoch, part)| pb::EventBatch {
                        shard: *shard,
                        epoch: *epoch,
                        events: part.events.clone(),
                    })
                    .collect(),
            };
            Some(
                client
                    .ingest_shards(batches)
                    .await
                    .map(tonic::Response::into_inner),
            )
        } else {
            None
        };
        // Parts no call answers (no owner, a cut connection) are sent one shard
        // at a time below.
        let results = match answer {
            Some(Ok(results)) => results.results,
            Some(Err(status)) if retryable(status.code()) => Vec::new(),
            Some(Err(status)) => return Err(GatewayError::Node(status)),
            None => Vec::new(),
        };
        let mut answered = Vec::with_capacity(parts.len());
        for (i, (shard, _, part)) in parts.into_iter().enumerate() {
            match results.get(i) {
                Some(pb::ShardBatchResult {
                    response: Some(response),
                    ..
                }) => answered.push((part.indexes, response.clone())),
                Some(result) if !retryable(Code::from(result.error_code)) => {
                    return Err(GatewayError::Node(tonic::Status::new(
                        Code::from(result.error_code),
                        result.error.clone(),
                    )));
                }
                _ => {
                    let response = self.send(shard, &part.events).await?;
                    answered.push((part.indexes, response));
                }
            }
        }
        Ok(answered)
    }

    pub(crate) async fn shard_count(&self) -> Result<u32, GatewayError> {
        let mut routing = self.routing.clone();
        let wait = routing.wait_for(|r| r.shard_count > 0);
        match tokio::time::timeout(self.retry_for, wait).await {
            Ok(Ok(r)) => Ok(r.shard_count),
            Ok(Err(_)) => Err(GatewayError::ShuttingDown),
            Err(_) => Err(GatewayError::Unavailable(
                "no shard placement from the control plane yet".into(),
            )),
        }
    }

    async fn send(
        &self,
        shard: u32,
        events: &[pb::Event],
    ) -> Result<pb::IngestResponse, GatewayError> {
        self.call_owner(shard, |epoch, mut client| {
            let batch = pb::EventBatch {
                shard,
                epoch,
                events: events.to_vec(),
            };
            async move { client.ingest(batch).await }
        })
        .await
    }

    /// Calls shard `shard`'s owner with `call(epoch, client)` until it answers,
    /// or fails with a code not worth retrying, or `retry_for` passes.
    ///
    /// Retried: a stale epoch, a moved shard, a restarting node, a connection
    /// cut mid-call (tonic reports UNKNOWN or CANCELLED; the call may or may
    /// not have landed, so only idempotent calls go through here: ingest drops
    /// repeated message ids, merges repeated merge ids). Between attempts it
    /// waits for placement to change, or a moment.
    pub(crate) async fn call_owner<T, F, Fut>(
        &self,
        shard: u32,
        mut call: F,
    ) -> Result<T, GatewayError>
    where
        F: FnMut(u64, NodeClient<Conn>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.retry_for;
        let mut routing = self.routing.clone();
        loop {
            let target = {
                let table = routing.borrow_and_update();
                table
                    .owner(shard)
                    .map(|(owner, client)| (owner.epoch, owner.node.clone(), client))
            };
            let problem = match target {
                None => format!("shard {shard} has no owner yet"),
                Some((epoch, node, client)) => match call(epoch, client).await {
                    Ok(response) => return Ok(response.into_inner()),
                    Err(status) if retryable(status.code()) => {
                        format!("node {node}: {}", status.message())
                    }
                    Err(status) => return Err(GatewayError::Node(status)),
                },
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(GatewayError::Unavailable(format!(
                    "shard {shard} did not answer in {:?}: {problem}",
                    self.retry_for
                )));
            }
            let pause = left.min(Duration::from_millis(100));
            let _ = tokio::time::timeout(pause, routing.changed()).await;
        }
    }
}

/// Codes after which a batch is worth resending.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Aborted | Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(user: &str, anonymous: &str) -> pb::Event {
        pb::Event {
            user_id: user.into(),
            anonymous_id: anonymous.into(),
            ..Default::default()
        }
    }

    #[test]
    fn split_groups_by_shard_keeps_indexes_and_refuses_anonymous_events() {
        let events = vec![
            event("alice", ""),
            event("", ""),
            event("", "anon-7"),
            event("alice", "ignored"),
        ];
        let (parts, rejected) = split(events, 16);
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].index, 1);
        let alice = &parts[&shard_for("alice", 16)];
        assert!(alice.indexes.starts_with(&[0]));
        assert!(alice.indexes.contains(&3));
        let anon = &parts[&shard_for("anon-7", 16)];
        assert!(anon.indexes.contains(&2));
        let total: usize = parts.values().map(|p| p.events.len()).sum();
        assert_eq!(total, 3);
    }

    /// A node in the same process that records what it is handed and
    /// refuses one shard's batch with `refuse`.
    struct Recording {
        seen: std::sync::Mutex<Vec<pb::EventBatch>>,
        refuse: Option<(u32, Code)>,
    }

    impl crate::local::LocalNode for Recording {
        fn ingest_shards<'a>(
            &'a self,
            batches: &'a [BatchRef<'a>],
        ) -> crate::local::BoxFuture<'a, Result<pb::ShardBatchResults, tonic::Status>> {
            Box::pin(async move {
                let mut results = Vec::new();
                for batch in batches {
                    results.push(match self.refuse {
                        Some((shard, code)) if shard == batch.shard => pb::ShardBatchResult {
                            response: None,
                            error_code: code as i32,
                            error: "refused".into(),
                        },
                        _ => pb::ShardBatchResult {
                            response: Some(pb::IngestResponse {
                                shard: batch.shard,
                                accepted: batch.events.len() as u32,
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    });
                    self.seen.lock().unwrap().push(pb::EventBatch {
                        shard: batch.shard,
                        epoch: batch.epoch,
                        events: batch.events.to_vec(),
                    });
                }
                Ok(pb::ShardBatchResults { results })
            })
        }
    }

    /// Every shard of 4 placed on `node` at epoch 7.
    fn placed_on(node: &str) -> watch::Receiver<Arc<Routing>> {
        let mut routing = Routing::default();
        routing.shard_count = 4;
        routing.shards = vec![
            Some(crate::routing::Owner {
                node: node.into(),
                epoch: 7,
            });
            4
        ];
        // The node's network address refuses connections: whatever reaches
        // it came by the network, not the local handle.
        let client = crate::routing::node_client("127.0.0.1:9", &routing.credentials)
            .expect("a lazy client");
        routing.nodes.insert(node.into(), client);
        watch::channel(Arc::new(routing)).1
    }

    /// An ingestor whose placement puts every shard on `node-1`, this
    /// process's node, which refuses `refuse` (shard, code) if given.
    fn local_ingestor(refuse: Option<(u32, Code)>) -> (Arc<Recording>, Ingestor) {
        let local = Arc::new(Recording {
            seen: Default::default(),
            refuse,
        });
        let handle = LocalNodeHandle {
            id: "node-1".into(),
            node: local.clone(),
        };
        let ingestor = Ingestor::new(
            placed_on("node-1"),
            8,
            Duration::from_millis(200),
            Some(handle),
        );
        (local, ingestor)
    }

    #[tokio::test]
    async fn a_node_in_this_process_is_handed_the_batches_with_their_epochs() {
        let (local, ingestor) = local_ingestor(None);
        let users = ["ann", "bob", "cy", "dee", "eve", "fay"];
        let events: Vec<pb::Event> = users.iter().map(|u| event(u, "")).collect();
        let reply = ingestor.ingest(events).await.unwrap();
        assert_eq!(reply.accepted, 6);
        let seen = local.seen.lock().unwrap();
        let mut handed: Vec<&str> = seen
            .iter()
            .flat_map(|b| b.events.iter().map(|e| e.user_id.as_str()))
            .collect();
        handed.sort_unstable();
        assert_eq!(handed, users);
        for batch in seen.iter() {
            assert_eq!(batch.epoch, 7);
            assert!(
                batch
                    .events
                    .iter()
                    .all(|e| shard_for(&e.user_id, 4) == batch.shard)
            );
        }
    }

    #[tokio::test]
    async fn a_local_refusal_is_an_error_or_a_retry_as_from_a_remote_node() {
        let shard = shard_for("ann", 4);
        // Not retryable: the client gets the node's error.
        let (_, ingestor) = local_ingestor(Some((shard, Code::InvalidArgument)));
        match ingestor.ingest(vec![event("ann", "")]).await {
            Err(GatewayError::Node(status)) => assert_eq!(status.code(), Code::InvalidArgument),
            other => panic!("expected the node's error, got {other:?}"),
        }
        // Retryable (the shard moved): resent to its owner until placement
        // settles, here never, so UNAVAILABLE once the retry budget is spent.
        let (_, ingestor) = local_ingestor(Some((shard, Code::Aborted)));
        assert!(matches!(
            ingestor.ingest(vec![event("ann", "")]).await,
            Err(GatewayError::Unavailable(_))
        ));
    }
}
