//! The node's gRPC service: thin handlers that validate and convert requests,
//! then hand them to the shard tasks.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use dynseg_proto::BatchRef;
use dynseg_proto::encoded::{self, EventView, node_server};
use dynseg_proto::pb;
use dynseg_rules::{Plan, RuleVersion, SegmentDef, SegmentId, Span, Timestamp, UserId, UserState};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::changelog::SegmentFilter;
use crate::error::NodeError;
use crate::runtime::{Command, Node};
use crate::{metrics, moves, transfer};

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Batches one ingest stream may have in flight before it stops reading more.
const STREAM_WINDOW: usize = 64;

/// Changes in one `SubscribeBatches` message, at most.
const MAX_CHANGE_BATCH: usize = 1024;

/// Changes of a subscription, encoded, in batches as its shards' followers
/// send them (each shard's in order).
type ChangeFeed = mpsc::Receiver<Result<Vec<Bytes>, Status>>;

/// A [`ChangeFeed`]'s changes one at a time (`Subscribe`).
struct OneByOne {
    feed: ChangeFeed,
    batch: std::vec::IntoIter<Bytes>,
}

impl Stream for OneByOne {
    type Item = Result<encoded::EncodedChange, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        loop {
            if let Some(change) = self.batch.next() {
                return std::task::Poll::Ready(Some(Ok(encoded::EncodedChange(change))));
            }
            match std::task::ready!(self.feed.poll_recv(cx)) {
                Some(Ok(batch)) => self.batch = batch.into_iter(),
                Some(Err(status)) => return std::task::Poll::Ready(Some(Err(status))),
                None => return std::task::Poll::Ready(None),
            }
        }
    }
}

/// `first` and the batches ready after it, joined until they reach
/// [`MAX_CHANGE_BATCH`]; a failure met on the way comes back beside what came
/// before it.
fn batch_ready(
    first: Result<Vec<Bytes>, Status>,
    changes: &mut ChangeFeed,
) -> (Vec<Bytes>, Option<Status>) {
    let mut batch = Vec::new();
    let mut next = Some(first);
    while let Some(item) = next.take() {
        match item {
            Ok(more) if batch.is_empty() => batch = more,
            Ok(more) => batch.extend(more),
            Err(status) => return (batch, Some(status)),
        }
        if batch.len() < MAX_CHANGE_BATCH {
            next = changes.try_recv().ok();
        }
    }
    (batch, None)
}

/// The gRPC face of a [`Node`].
#[derive(Clone)]
pub struct NodeService {
    node: Node,
}

impl NodeService {
    /// Serves `node`.
    pub fn new(node: Node) -> NodeService {
        NodeService { node }
    }

    /// Wraps the service for tonic.
    pub fn into_server(self) -> node_server::NodeServer<NodeService> {
        let limit = self.node.config().event_limits.max_message_bytes;
        node_server::NodeServer::new(self).max_decoding_message_size(limit)
    }

    /// Starts following the shards `request` names (every served shard when
    /// none): their changes, each shard's in order, on one channel; a
    /// follower's failure ends with its status.
    fn follow(&self, request: pb::SubscribeRequest) -> Result<ChangeFeed, Status> {
        let handles = self.node.handles();
        let shards: Vec<u32> = if request.shards.is_empty() {
            handles.iter().map(|(id, _)| *id).collect()
        } else {
            request.shards.clone()
        };
        let plan = self.plan();
        for segment in &request.segments {
            if !plan.segment_ids().any(|s| s.as_str() == segment) {
                return Err(NodeError::NotFound(format!("no segment {segment}")).into());
            }
        }
        let filter = Arc::new(SegmentFilter::new(request.segments));
        let (tx, rx) = mpsc::channel(STREAM_WINDOW);
        for shard in shards {
            let handle = self.node.handle(shard)?;
            let after = match request.after.iter().find(|c| c.shard == shard) {
                Some(cursor) => cursor.sequence,
                None if request.from_now => handle.log.last(),
                None => 0,
            };
            let (tx, filter) = (tx.clone(), filter.clone());
            tokio::spawn(async move {
                let tx = &tx;
                let deliver = move |batch| async move { Ok(tx.send(Ok(batch)).await.is_ok()) };
                if let Err(e) = handle
                    .log
                    .clone()
                    .follow_batches(after, &filter, deliver)
                    .await
                {
                    let _ = tx.send(Err(Status::from(NodeError::from(e)))).await;
                }
            });
        }
        Ok(rx)
    }

    /// `IngestShards` for a caller in this process (`dynseg dev`'s gateway):
    /// the same checks, answers and errors, from borrowed batches.
    pub async fn ingest_batches(
        &self,
        batches: &[BatchRef<'_>],
    ) -> Result<pb::ShardBatchResults, Status> {
        let limit = self.node.config().event_limits.max_batch;
        let total: usize = batches.iter().map(|b| b.events.len()).sum();
        if total > limit {
            return Err(NodeError::Invalid(format!(
                "{total} events in one call, over the limit of {limit}"
            ))
            .into());
        }
        // Submit every batch before waiting for any: their records then share
        // the same group commits.
        let started = Instant::now();
        let mut submitted = Vec::with_capacity(batches.len());
        for batch in batches {
            submitted.push(self.submit(*batch).await);
        }
        let mut results = Vec::with_capacity(submitted.len());
        for waiting in submitted {
            let outcome = match waiting {
                Ok(rx) => answer(rx).await,
                Err(e) => Err(e),
            };
            metrics::record_ingest(started, &outcome);
            results.push(match outcome {
                Ok(response) => pb::ShardBatchResult {
                    response: Some(response),
                    ..Default::default()
                },
                Err(e) => {
                    let status = Status::from(e);
                    pb::ShardBatchResult {
                        response: None,
                        error_code: status.code() as i32,
                        error: status.message().to_owned(),
                    }
                }
            });
        }
        Ok(pb::ShardBatchResults { results })
    }

    /// Validates a batch and hands it to its shard; the receiver resolves with
    /// the response once the batch is durable.
    ///
    /// The accepted events are encoded here, as the batch the write-ahead log
    /// record carries: from the caller's events, with no copy of them made.
    async fn submit(
        &self,
        batch: BatchRef<'_>,
    ) -> Result<oneshot::Receiver<Result<pb::IngestResponse, NodeError>>, NodeError> {
        let limits = &self.node.config().event_limits;
        if batch.events.len() > limits.max_batch {
            return Err(NodeError::Invalid(format!(
                "batch of {} events, over the limit of {}",
                batch.events.len(),
                limits.max_batch
            )));
        }
        let handle = self.node.handle(batch.shard)?;
        let now = self.node.now();
        let shard_count = self.node.config().shard_count;
        let mut events = Vec::with_capacity(batch.events.len());
        // Room for every event and its key and length (at most 6 bytes for
        // any event a gRPC message can carry), so the record is one
        // allocation; refused events only leave room unused.
        let event_bytes = batch.events.iter().map(|e| e.len() + 6).sum();
        let mut accepted =
            crate::record::BatchEncoder::with_capacity(batch.shard, batch.epoch, event_bytes);
        let mut rejected = Vec::new();
        for (index, raw) in batch.events.iter().enumerate() {
            let decoded = EventView::parse(raw).and_then(|view| view.to_event_noting_unknown());
            let checked = decoded.map_err(|e| e.0).and_then(|(mut event, unknown)| {
                // No timestamp: the event happened when the node received it
                // (recorded in the log as filled in, so replay sees the same).
                let untimed = event.timestamp.millis() == 0;
                if untimed {
                    event.timestamp = now;
                }
                limits
                    .check(&event, now, batch.shard, shard_count)
                    .map(|()| (event, untimed, unknown))
            });
            match checked {
                // Fields this version does not know are not logged, where
                // they would stay for the whole retention: the log gets the
                // event as understood, encoded again (rare: clients send what
                // the schema has).
                Ok((event, _, true)) => {
                    accepted.push(&encoded::encode(&pb::Event::from(&event)));
                    events.push(event);
                }
                Ok((event, untimed, false)) => {
                    events.push(event);
                    if untimed {
                        accepted.push_at(raw, now.millis());
                    } else {
                        accepted.push(raw);
                    }
                }
                Err(reason) => rejected.push(pb::RejectedEvent {
                    index: index as u32,
                    reason,
                }),
            }
        }
        let (reply, answer) = oneshot::channel();
        let command = Command::Ingest {
            epoch: batch.epoch,
            events,
            batch: accepted.finish(),
            rejected,
            reply,
        };
        handle
            .tx
            .send(command)
            .await
            .map_err(|_| NodeError::Unavailable("the shard is stopping".into()))?;
        Ok(answer)
    }

    fn plan(&self) -> Arc<Plan> {
        self.node.plan()
    }

    /// A merge request names two different profiles and a merge id, and the
    /// shard of the profile it is sent for.
    fn check_merge(
        &self,
        shard: u32,
        user: &str,
        other: &str,
        merge_id: &str,
    ) -> Result<(), NodeError> {
        if user.is_empty() || other.is_empty() || merge_id.is_empty() {
            return Err(NodeError::Invalid(
                "a merge needs both profiles' ids and a merge_id".into(),
            ));
        }
        if user == other {
            return Err(NodeError::Invalid(
                "a profile cannot merge with itself".into(),
            ));
        }
        let expected = dynseg_proto::shard_for(user, self.node.config().shard_count);
        if shard != expected {
            return Err(NodeError::Invalid(format!(
                "{user:?} is on shard {expected}, not {shard}"
            )));
        }
        Ok(())
    }
}

async fn answer<T>(rx: oneshot::Receiver<Result<T, NodeError>>) -> Result<T, NodeError> {
    rx.await
        .map_err(|_| NodeError::Unavailable("the shard stopped".into()))?
}

/// Segments an overlap may ask about at most (the answer is n × n).
pub const MAX_OVERLAP_SEGMENTS: usize = 16;

/// The segments of an overlap request: two to [`MAX_OVERLAP_SEGMENTS`],
/// distinct, each defined.
fn overlap_segments(plan: &Plan, segments: &[String]) -> Result<Vec<SegmentId>, NodeError> {
    if segments.len() < 2 || segments.len() > MAX_OVERLAP_SEGMENTS {
        return Err(NodeError::Invalid(format!(
            "an overlap takes 2 to {MAX_OVERLAP_SEGMENTS} segments, not {}",
            segments.len()
        )));
    }
    let mut seen = BTreeSet::new();
    segments
        .iter()
        .map(|s| {
            let id = SegmentId::from(s.as_str());
            if !plan.segment_ids().any(|known| *known == id) {
                return Err(NodeError::NotFound(format!("no segment {s:?}")));
            }
            if !seen.insert(s.as_str()) {
                return Err(NodeError::Invalid(format!("segment {s:?} is given twice")));
            }
            Ok(id)
        })
        .collect()
}

#[tonic::async_trait]
impl node_server::Node for NodeService {
    async fn ingest(
        &self,
        request: Request<encoded::EventBatch>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        let started = Instant::now();
        let batch = request.into_inner();
        let outcome = match self.submit(BatchRef::of(&batch)).await {
            Ok(rx) => answer(rx).await,
            Err(e) => Err(e),
        };
        metrics::record_ingest(started, &outcome);
        Ok(Response::new(outcome?))
    }

    async fn ingest_shards(
        &self,
        request: Request<encoded::ShardBatches>,
    ) -> Result<Response<pb::ShardBatchResults>, Status> {
        let batches = request.into_inner().batches;
        let refs: Vec<BatchRef<'_>> = batches.iter().map(BatchRef::of).collect();
        self.ingest_batches(&refs).await.map(Response::new)
    }

    type IngestStreamStream = Stream_<pb::IngestResponse>;

    async fn ingest_stream(
        &self,
        request: Request<Streaming<encoded::EventBatch>>,
    ) -> Result<Response<Self::IngestStreamStream>, Status> {
        let mut batches = request.into_inner();
        let (pending_tx, mut pending_rx) =
            mpsc::channel::<Result<oneshot::Receiver<_>, NodeError>>(STREAM_WINDOW);
        let (out_tx, out_rx) = mpsc::channel(STREAM_WINDOW);
        let service = self.clone();
        // Reads batches and submits them without waiting for durability; the
        // bounded queue stops reading when too many are in flight.
        tokio::spawn(async move {
            while let Ok(Some(batch)) = batches.message().await {
                let submitted = service.submit(BatchRef::of(&batch)).await;
                if pending_tx.send(submitted).await.is_err() {
                    return;
                }
            }
        });
        // Answers in order, as each batch becomes durable.
        tokio::spawn(async move {
            while let Some(submitted) = pending_rx.recv().await {
                let result = match submitted {
                    Ok(rx) => answer(rx).await,
                    Err(e) => Err(e),
                };
                if out_tx.send(result.map_err(Status::from)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    type SubscribeStream = Stream_<encoded::EncodedChange>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let changes = self.follow(request.into_inner())?;
        Ok(Response::new(Box::pin(OneByOne {
            feed: changes,
            batch: Vec::new().into_iter(),
        })))
    }

    type SubscribeBatchesStream = Stream_<encoded::ChangeBatch>;

    async fn subscribe_batches(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeBatchesStream>, Status> {
        let mut changes = self.follow(request.into_inner())?;
        let (tx, rx) = mpsc::channel(STREAM_WINDOW);
        // Ends when the subscriber goes (`tx` closed) or the followers do.
        tokio::spawn(async move {
            while let Some(first) = changes.recv().await {
                let (batch, failed) = batch_ready(first, &mut changes);
                if !batch.is_empty()
                    && tx
                        .send(Ok(encoded::ChangeBatch { changes: batch }))
                        .await
                        .is_err()
                {
                    return;
                }
                if let Some(status) = failed {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let user = request.into_inner().user_id;
        if user.is_empty() {
            return Err(NodeError::Invalid("user_id is empty".into()).into());
        }
        let shard = dynseg_proto::shard_for(&user, self.node.config().shard_count);
        let handle = self.node.handle(shard)?;
        let user = UserId::new(user);
        let segments = self
            .node
            .ask(&handle, |reply| Command::GetUser { user, reply })
            .await?;
        Ok(Response::new(pb::GetUserResponse {
            exists: segments.is_some(),
            segments: segments
                .unwrap_or_default()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            shard,
        }))
    }

    async fn list_members(
        &self,
        request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let request = request.into_inner();
        if !self
            .plan()
            .segment_ids()
            .any(|s| s.as_str() == request.segment)
        {
            return Err(NodeError::NotFound(format!("no segment {}", request.segment)).into());
        }
        let limit = request.page_size.clamp(1, 10_000) as usize;
        let mut all = Vec::new();
        for (_, handle) in self.node.handles() {
            let (segment, after) = (request.segment.clone(), request.page_token.clone());
            let members = self
                .node
                .ask(&handle, |reply| Command::Members {
                    segment,
                    after,
                    limit: limit + 1,
                    reply,
                })
                .await?;
            all.extend(members);
        }
        all.sort_unstable();
        let more = all.len() > limit;
        all.truncate(limit);
        let next_page_token = if more {
            all.last().map(|u| u.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListMembersResponse {
            user_ids: all.iter().map(|u| u.to_string()).collect(),
            next_page_token,
        }))
    }

    async fn segment_counts(
        &self,
        _: Request<pb::SegmentCountsRequest>,
    ) -> Result<Response<pb::SegmentCountsResponse>, Status> {
        let plan = self.plan();
        let mut counts: Vec<pb::SegmentCount> = plan
            .segment_ids()
            .map(|s| pb::SegmentCount {
                segment: s.to_string(),
                members: 0,
            })
            .collect();
        let mut users = 0;
        for (_, handle) in self.node.handles() {
            let (per_segment, shard_users) = self
                .node
                .ask(&handle, |reply| Command::Counts { reply })
                .await?;
            users += shard_users;
            for count in &mut counts {
                count.members += per_segment
                    .get(count.segment.as_str())
                    .copied()
                    .unwrap_or(0);
            }
        }
        Ok(Response::new(pb::SegmentCountsResponse { counts, users }))
    }

    async fn segment_overlap(
        &self,
        request: Request<pb::SegmentOverlapRequest>,
    ) -> Result<Response<pb::SegmentOverlapResponse>, Status> {
        let segments = request.into_inner().segments;
        let ids = overlap_segments(&self.plan(), &segments)?;
        let n = ids.len();
        let mut pairwise = vec![0u64; n * n];
        let mut all = 0;
        for (_, handle) in self.node.handles() {
            let (shard_pairs, shard_all) = self
                .node
                .ask(&handle, |reply| Command::Overlap {
                    segments: ids.clone(),
                    reply,
                })
                .await?;
            for (total, part) in pairwise.iter_mut().zip(shard_pairs) {
                *total += part;
            }
            all += shard_all;
        }
        Ok(Response::new(pb::SegmentOverlapResponse {
            segments,
            pairwise,
            all,
        }))
    }

    async fn merge_out(
        &self,
        request: Request<pb::MergeOutRequest>,
    ) -> Result<Response<pb::MergeOutResponse>, Status> {
        let request = request.into_inner();
        self.check_merge(
            request.shard,
            &request.user_id,
            &request.into,
            &request.merge_id,
        )?;
        let handle = self.node.handle(request.shard)?;
        let response = self
            .node
            .ask(&handle, |reply| Command::MergeOut { request, reply })
            .await?;
        Ok(Response::new(response))
    }

    async fn merge_in(
        &self,
        request: Request<pb::MergeInRequest>,
    ) -> Result<Response<pb::MergeInResponse>, Status> {
        let request = request.into_inner();
        self.check_merge(
            request.shard,
            &request.user_id,
            &request.from,
            &request.merge_id,
        )?;
        let state = UserState::decode(&request.state)
            .map_err(|e| NodeError::Invalid(format!("the merged state does not decode: {e}")))?;
        let handle = self.node.handle(request.shard)?;
        let response = self
            .node
            .ask(&handle, |reply| Command::MergeIn {
                request,
                state,
                reply,
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn segment_history(
        &self,
        request: Request<pb::SegmentHistoryRequest>,
    ) -> Result<Response<pb::SegmentHistoryResponse>, Status> {
        let response = crate::insight::history(&self.node, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let response = crate::insight::explain(&self.node, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn preview_segments(
        &self,
        request: Request<pb::PreviewSegmentsRequest>,
    ) -> Result<Response<pb::SegmentCountsResponse>, Status> {
        let defs = request
            .into_inner()
            .segments
            .into_iter()
            .map(SegmentDef::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        if defs.is_empty() {
            return Err(NodeError::Invalid("no segments to preview".into()).into());
        }
        let (counts, users) = self.node.preview(defs).await?;
        Ok(Response::new(pb::SegmentCountsResponse {
            counts: counts
                .into_iter()
                .map(|(segment, members)| pb::SegmentCount {
                    segment: segment.to_string(),
                    members,
                })
                .collect(),
            users,
        }))
    }

    type ApplyRulesStream = Stream_<pb::RuleProgress>;

    async fn apply_rules(
        &self,
        request: Request<pb::ApplyRulesRequest>,
    ) -> Result<Response<Self::ApplyRulesStream>, Status> {
        let request = request.into_inner();
        let webhooks = crate::webhooks::WebhookConfig::from_defs(&request.segments);
        let defs = request
            .segments
            .into_iter()
            .map(SegmentDef::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| NodeError::Invalid(e.0))?;
        // Refuse invalid rules before anything starts, with their line and column.
        Plan::compile(
            &defs,
            RuleVersion(request.version),
            &self.node.config().rule_limits,
        )
        .map_err(NodeError::from)?;
        let current = self.node.rule_version();
        if request.version <= current {
            return Err(NodeError::Invalid(format!(
                "rule version {} is not newer than the current {current}",
                request.version
            ))
            .into());
        }
        crate::webhooks::configure(&self.node, webhooks);
        let (progress_tx, mut progress_rx) = mpsc::channel(256);
        let (out_tx, out_rx) = mpsc::channel(256);
        let node = self.node.clone();
        let version = request.version;
        tokio::spawn(async move {
            let applying =
                tokio::spawn(async move { node.apply_rules(version, defs, progress_tx).await });
            while let Some(progress) = progress_rx.recv().await {
                let _ = out_tx.send(Ok(progress)).await;
            }
            match applying.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = out_tx.send(Err(Status::from(e))).await;
                }
                Err(e) => {
                    let _ = out_tx
                        .send(Err(Status::internal(format!(
                            "rule update task failed: {e}"
                        ))))
                        .await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn advance_clock(
        &self,
        request: Request<pb::AdvanceClockRequest>,
    ) -> Result<Response<pb::AdvanceClockResponse>, Status> {
        let to = match request.into_inner().target {
            Some(pb::advance_clock_request::Target::ToMs(ms)) => Timestamp(ms),
            Some(pb::advance_clock_request::Target::ByMs(ms)) if ms >= 0 => {
                self.node.now().plus(Span(ms))
            }
            Some(pb::advance_clock_request::Target::ByMs(_)) => {
                return Err(NodeError::Invalid("the clock only moves forwards".into()).into());
            }
            None => return Err(NodeError::Invalid("give to_ms or by_ms".into()).into()),
        };
        let now = self.node.advance_clock(to).await?;
        Ok(Response::new(pb::AdvanceClockResponse {
            now_ms: now.millis(),
        }))
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let mut shards = Vec::new();
        for (_, handle) in self.node.handles() {
            shards.push(
                self.node
                    .ask(&handle, |reply| Command::Status { reply })
                    .await?,
            );
        }
        Ok(Response::new(pb::StatusResponse {
            node_id: self.node.config().node_id.clone(),
            now_ms: self.node.now().millis(),
            rule_version: self.node.rule_version(),
            shard_count: self.node.config().shard_count,
            shards,
            moved_in_shards: self.node.inner.moves_in.moved().0,
            moved_in_bytes: self.node.inner.moves_in.moved().1,
        }))
    }

    async fn assign_shard(
        &self,
        request: Request<pb::AssignShardRequest>,
    ) -> Result<Response<pb::AssignShardResponse>, Status> {
        let request = request.into_inner();
        if request.shard >= self.node.config().shard_count {
            return Err(NodeError::Invalid(format!(
                "shard {} is not below the shard count {}",
                request.shard,
                self.node.config().shard_count
            ))
            .into());
        }
        self.node.assign_shard(request.shard, request.epoch).await?;
        Ok(Response::new(pb::AssignShardResponse {}))
    }

    async fn release_shard(
        &self,
        request: Request<pb::ReleaseShardRequest>,
    ) -> Result<Response<pb::ReleaseShardResponse>, Status> {
        let request = request.into_inner();
        let owner = (!request.new_owner.is_empty()).then_some(request.new_owner);
        self.node.release_shard(request.shard, owner).await?;
        Ok(Response::new(pb::ReleaseShardResponse {}))
    }

    async fn begin_move_out(
        &self,
        request: Request<pb::MoveOutRequest>,
    ) -> Result<Response<pb::MoveOutStarted>, Status> {
        let request = request.into_inner();
        let started = moves::begin_move_out(&self.node, request.shard, request.attempt).await?;
        Ok(Response::new(started))
    }

    type MoveOutSnapshotStream = Stream_<pb::ShardChunk>;

    async fn move_out_snapshot(
        &self,
        request: Request<pb::MoveOutRequest>,
    ) -> Result<Response<Self::MoveOutSnapshotStream>, Status> {
        let request = request.into_inner();
        let chunks = moves::move_out_snapshot(&self.node, request.shard, request.attempt)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(chunks))))
    }

    async fn move_out_tail(
        &self,
        request: Request<pb::MoveTailRequest>,
    ) -> Result<Response<pb::MoveTailResponse>, Status> {
        Ok(Response::new(
            moves::move_out_tail(&self.node, request.into_inner()).await?,
        ))
    }

    async fn end_move_out(
        &self,
        request: Request<pb::MoveOutRequest>,
    ) -> Result<Response<pb::MoveOutEnded>, Status> {
        let request = request.into_inner();
        moves::end_move_out(&self.node, request.shard, request.attempt);
        Ok(Response::new(pb::MoveOutEnded {}))
    }

    type ExportShardStream = Stream_<pb::ShardChunk>;

    async fn export_shard(
        &self,
        request: Request<pb::ExportShardRequest>,
    ) -> Result<Response<Self::ExportShardStream>, Status> {
        let chunks = transfer::export(&self.node, request.into_inner().shard).await?;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn import_shard(
        &self,
        request: Request<Streaming<pb::ShardChunk>>,
    ) -> Result<Response<pb::ImportShardResponse>, Status> {
        let mut stream = request.into_inner();
        let mut chunks = Vec::new();
        while let Some(chunk) = stream.message().await? {
            chunks.push(chunk);
        }
        Ok(Response::new(transfer::import(&self.node, chunks).await?))
    }
}
