//! Ingest through the gateway: split a client's events per shard, send each part
//! to its owner with the epoch the routing table names, retry redirects and
//! restarts until placement settles, and merge the replies. The client is
//! acknowledged only when every part is durable on its shard.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dynseg_proto::encoded::{self, EventView, RouteView};
use dynseg_proto::{BatchRef, pb, shard_for_bytes};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tonic::Code;
use tracing::Instrument;

use dynseg_proto::client::Conn;
use dynseg_proto::pb::node_client::NodeClient;

use crate::error::GatewayError;
use crate::local::LocalNodeHandle;
use crate::merge::{Merge, may_merge, merge_of};
use crate::routing::Routing;

/// The events of one request bound for one shard, with their request indexes.
#[derive(Debug, Default, PartialEq)]
pub struct Part {
    /// Index in the request of each event.
    pub indexes: Vec<u32>,
    /// The events, encoded as they arrived.
    pub events: Vec<Bytes>,
}

/// A request's events sorted out: by shard, refused, and the merges asked for.
#[derive(Debug, Default)]
pub struct Split {
    /// The events of each shard, in request order.
    pub parts: BTreeMap<u32, Part>,
    /// Events refused here, by index: no user, or not a well-formed event.
    pub rejected: Vec<pb::RejectedEvent>,
    /// The identity merges the events ask for, in request order.
    pub merges: Vec<Merge>,
}

/// Groups encoded events by shard, keeping request order within each shard.
/// Each event is read in place for its user (and a merge it may ask for);
/// the events themselves are passed on as they are, and their nodes check
/// the rest (see [`RouteView`]).
pub fn split(events: Vec<Bytes>, shard_count: u32) -> Split {
    let mut split = Split::default();
    for (index, event) in events.into_iter().enumerate() {
        let index = index as u32;
        let shard = match RouteView::parse(&event) {
            Ok(view) => match view.user_key() {
                Some(user) => {
                    if may_merge(&view) {
                        // Rare: read in full for the ids a merge names (an
                        // event that is not UTF-8 asks for none; its node
                        // refuses it).
                        if let Ok(full) = EventView::parse(&event) {
                            split.merges.extend(merge_of(index, &full));
                        }
                    }
                    Ok(shard_for_bytes(user, shard_count))
                }
                None => Err("an event needs a user_id or an anonymous_id".to_owned()),
            },
            Err(e) => Err(e.0),
        };
        match shard {
            Ok(shard) => {
                let part = split.parts.entry(shard).or_default();
                part.indexes.push(index);
                part.events.push(event);
            }
            Err(reason) => split.rejected.push(pb::RejectedEvent { index, reason }),
        }
    }
    split
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

    /// Ingests encoded `events` and returns the merged reply, rejected
    /// indexes as in the request.
    pub async fn ingest(&self, events: Vec<Bytes>) -> Result<pb::IngestReply, GatewayError> {
        let started = Instant::now();
        let count = events.len();
        let outcome = self.route(events).await;
        crate::metrics::record_ingest(started, count, &outcome);
        outcome
    }

    async fn route(&self, events: Vec<Bytes>) -> Result<pb::IngestReply, GatewayError> {
        let shard_count = self.shard_count().await?;
        let Split {
            parts,
            mut rejected,
            merges,
        } = split(events, shard_count);
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
            node.and_then(|node| self.routing.borrow().encoded.get(node).cloned())
        {
            // Shared (each event's bytes are reference-counted): a part the
            // node refuses is resent on its own.
            let batches = encoded::ShardBatches {
                batches: parts
                    .iter()
                    .map(|(shard, epoch, part)| encoded::EventBatch {
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

    async fn send(&self, shard: u32, events: &[Bytes]) -> Result<pb::IngestResponse, GatewayError> {
        let ingest_client = |table: &Routing, node: &str| table.encoded.get(node).cloned();
        self.call_owner_with(shard, ingest_client, |epoch, mut client| {
            let batch = encoded::EventBatch {
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
    pub(crate) async fn call_owner<T, F, Fut>(&self, shard: u32, call: F) -> Result<T, GatewayError>
    where
        F: FnMut(u64, NodeClient<Conn>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let api_client = |table: &Routing, node: &str| table.nodes.get(node).cloned();
        self.call_owner_with(shard, api_client, call).await
    }

    /// [`Ingestor::call_owner`] with the owner's client that `client` picks.
    async fn call_owner_with<C, T, F, Fut>(
        &self,
        shard: u32,
        client: impl Fn(&Routing, &str) -> Option<C>,
        mut call: F,
    ) -> Result<T, GatewayError>
    where
        F: FnMut(u64, C) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.retry_for;
        let mut routing = self.routing.clone();
        loop {
            let target = {
                let table = routing.borrow_and_update();
                table.placement(shard).and_then(|owner| {
                    let client = client(&table, &owner.node)?;
                    Some((owner.epoch, owner.node.clone(), client))
                })
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
    use dynseg_proto::shard_for;

    use super::*;

    fn event(user: &str, anonymous: &str) -> Bytes {
        encoded::encode(&pb::Event {
            user_id: user.into(),
            anonymous_id: anonymous.into(),
            ..Default::default()
        })
    }

    fn user_of(event: &[u8]) -> &str {
        EventView::parse(event).unwrap().user_id
    }

    #[test]
    fn split_groups_by_shard_keeps_indexes_and_refuses_anonymous_events() {
        let events = vec![
            event("alice", ""),
            event("", ""),
            event("", "anon-7"),
            event("alice", "ignored"),
            Bytes::from_static(&[0x12, 0x05, b'b', b'o', b'b']),
            // A message id that is not UTF-8: routed by its user, and its
            // node refuses it (the gateway reads only what routing needs).
            Bytes::from_static(&[0x0a, 0x02, 0xff, 0xfe, 0x12, 0x03, b'c', b'a', b't']),
        ];
        let Split {
            parts, rejected, ..
        } = split(events, 16);
        assert_eq!(rejected.len(), 2);
        assert_eq!(rejected[0].index, 1);
        // Cut short: the user id claims five bytes and has three.
        assert_eq!(rejected[1].index, 4);
        assert_eq!(
            rejected[1].reason,
            "malformed event: the bytes end inside a field"
        );
        let alice = &parts[&shard_for("alice", 16)];
        assert!(alice.indexes.starts_with(&[0]));
        assert!(alice.indexes.contains(&3));
        let anon = &parts[&shard_for("anon-7", 16)];
        assert!(anon.indexes.contains(&2));
        let cat = &parts[&shard_for("cat", 16)];
        assert!(cat.indexes.contains(&5));
        let total: usize = parts.values().map(|p| p.events.len()).sum();
        assert_eq!(total, 4);
    }

    /// A node in the same process that records what it is handed and
    /// refuses one shard's batch with `refuse`.
    struct Recording {
        seen: std::sync::Mutex<Vec<encoded::EventBatch>>,
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
                    self.seen.lock().unwrap().push(encoded::EventBatch {
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
        let (api, ingest) = crate::routing::node_clients("127.0.0.1:9", &routing.credentials)
            .expect("a lazy client");
        routing.nodes.insert(node.into(), api);
        routing.encoded.insert(node.into(), ingest);
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
        let events: Vec<Bytes> = users.iter().map(|u| event(u, "")).collect();
        let reply = ingestor.ingest(events).await.unwrap();
        assert_eq!(reply.accepted, 6);
        let seen = local.seen.lock().unwrap();
        let mut handed: Vec<&str> = seen
            .iter()
            .flat_map(|b| b.events.iter().map(|e| user_of(e)))
            .collect();
        handed.sort_unstable();
        assert_eq!(handed, users);
        for batch in seen.iter() {
            assert_eq!(batch.epoch, 7);
            assert!(
                batch
                    .events
                    .iter()
                    .all(|e| shard_for(user_of(e), 4) == batch.shard)
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
