//! The `Gateway` gRPC service: thin handlers over the ingestor, the merged
//! subscription and the routing table.

use std::pin::Pin;
use std::sync::Arc;

use dynseg_proto::client::Conn;
use dynseg_proto::encoded::{self, gateway_server::Gateway};
use dynseg_proto::history;
use dynseg_proto::pb;
use dynseg_proto::pb::node_client::NodeClient;
use dynseg_proto::shard_for;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::error::GatewayError;
use crate::ingest::Ingestor;
use crate::routing::Routing;
use crate::subscribe::{self, Position};

/// Node batches of changes (each at most about 2,000) buffered per subscriber
/// before the merge waits for the client: a slow client holds a few MiB here
/// at most, whatever the number of shards (tokens are written as changes go
/// out).
const SUBSCRIBE_BUFFER: usize = 8;

/// The gateway's service.
#[derive(Clone)]
pub struct GatewayService {
    routing: watch::Receiver<Arc<Routing>>,
    ingestor: Ingestor,
}

impl GatewayService {
    /// A service routing by `routing`.
    pub fn new(routing: watch::Receiver<Arc<Routing>>, ingestor: Ingestor) -> GatewayService {
        GatewayService { routing, ingestor }
    }

    fn table(&self) -> Result<Arc<Routing>, GatewayError> {
        let table = self.routing.borrow().clone();
        if table.shard_count == 0 {
            return Err(GatewayError::Unavailable(
                "no shard placement from the control plane yet".into(),
            ));
        }
        Ok(table)
    }

    /// The client of the node that owns `user`'s shard.
    fn user_owner(&self, user: &str) -> Result<NodeClient<Conn>, GatewayError> {
        let table = self.table()?;
        let shard = shard_for(user, table.shard_count);
        table
            .owner(shard)
            .map(|(_, client)| client)
            .ok_or_else(|| GatewayError::Unavailable(format!("shard {shard} has no owner yet")))
    }

    /// Every node's client (for fan-out calls).
    fn all_nodes(
        &self,
    ) -> Result<
        Vec<dynseg_proto::pb::node_client::NodeClient<dynseg_proto::client::Conn>>,
        GatewayError,
    > {
        Ok(self.table()?.nodes.values().cloned().collect())
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn ingest(
        &self,
        request: Request<encoded::IngestRequest>,
    ) -> Result<Response<pb::IngestReply>, Status> {
        let reply = self.ingestor.ingest(request.into_inner().events).await?;
        Ok(Response::new(reply))
    }

    type IngestStreamStream = BoxStream<pb::IngestReply>;

    async fn ingest_stream(
        &self,
        request: Request<Streaming<encoded::IngestRequest>>,
    ) -> Result<Response<Self::IngestStreamStream>, Status> {
        let mut batches = request.into_inner();
        let ingestor = self.ingestor.clone();
        let (tx, rx) = mpsc::channel(16);
        // Lives as long as the call: ends when the client closes its side or
        // stops reading replies.
        tokio::spawn(async move {
            while let Some(batch) = batches.next().await {
                let reply = match batch {
                    Ok(batch) => ingestor.ingest(batch.events).await.map_err(Status::from),
                    Err(status) => Err(status),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn track(
        &self,
        request: Request<pb::Event>,
    ) -> Result<Response<pb::IngestReply>, Status> {
        let mut event = request.into_inner();
        if event.r#type == pb::EventType::Unspecified as i32 {
            event.r#type = pb::EventType::Track as i32;
        }
        let events = vec![encoded::encode(&event)];
        Ok(Response::new(self.ingestor.ingest(events).await?))
    }

    async fn identify(
        &self,
        request: Request<pb::Event>,
    ) -> Result<Response<pb::IngestReply>, Status> {
        let mut event = request.into_inner();
        event.r#type = pb::EventType::Identify as i32;
        let events = vec![encoded::encode(&event)];
        Ok(Response::new(self.ingestor.ingest(events).await?))
    }

    type SubscribeStream = subscribe::ChangeStream;

    async fn subscribe(
        &self,
        request: Request<pb::GatewaySubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let request = request.into_inner();
        let position = Position::parse(&request.resume_token)?;
        let (tx, rx) = mpsc::channel(SUBSCRIBE_BUFFER);
        // The merge task ends when the client goes away or the gateway stops.
        tokio::spawn(subscribe::merge(
            self.routing.clone(),
            request,
            position,
            tx,
        ));
        Ok(Response::new(subscribe::ChangeStream::new(rx)))
    }

    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        let request = request.into_inner();
        self.user_owner(&request.user_id)?.get_user(request).await
    }

    async fn list_members(
        &self,
        request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        // Nodes in id order, each paged in its own stable order; the token is
        // `node index/node token`.
        let request = request.into_inner();
        let nodes = self.all_nodes()?;
        let (mut index, mut inner) = match request.page_token.split_once('/') {
            Some((i, t)) => (
                i.parse::<usize>()
                    .map_err(|_| GatewayError::InvalidArgument("malformed page token".into()))?,
                t.to_owned(),
            ),
            None if request.page_token.is_empty() => (0, String::new()),
            None => return Err(GatewayError::InvalidArgument("malformed page token".into()).into()),
        };
        let page_size = if request.page_size == 0 {
            100
        } else {
            request.page_size.min(10_000)
        };
        let mut user_ids = Vec::new();
        while index < nodes.len() && user_ids.len() < page_size as usize {
            let mut client = nodes[index].clone();
            let page = client
                .list_members(pb::ListMembersRequest {
                    segment: request.segment.clone(),
                    page_size: page_size - user_ids.len() as u32,
                    page_token: inner.clone(),
                })
                .await?
                .into_inner();
            user_ids.extend(page.user_ids);
            if page.next_page_token.is_empty() {
                index += 1;
                inner.clear();
            } else {
                inner = page.next_page_token;
            }
        }
        let next_page_token = if index < nodes.len() {
            format!("{index}/{inner}")
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListMembersResponse {
            user_ids,
            next_page_token,
        }))
    }

    async fn segment_counts(
        &self,
        _request: Request<pb::SegmentCountsRequest>,
    ) -> Result<Response<pb::SegmentCountsResponse>, Status> {
        let mut totals: std::collections::BTreeMap<String, u64> = Default::default();
        let mut users = 0;
        for mut client in self.all_nodes()? {
            let counts = client
                .segment_counts(pb::SegmentCountsRequest {})
                .await?
                .into_inner();
            users += counts.users;
            for count in counts.counts {
                *totals.entry(count.segment).or_default() += count.members;
            }
        }
        Ok(Response::new(pb::SegmentCountsResponse {
            counts: totals
                .into_iter()
                .map(|(segment, members)| pb::SegmentCount { segment, members })
                .collect(),
            users,
        }))
    }

    async fn segment_overlap(
        &self,
        request: Request<pb::SegmentOverlapRequest>,
    ) -> Result<Response<pb::SegmentOverlapResponse>, Status> {
        let request = request.into_inner();
        let n = request.segments.len();
        let mut pairwise = vec![0u64; n * n];
        let mut all = 0;
        // Each node checks the segments and counts its own users; a user is
        // on exactly one node, so the sums are exact.
        for mut client in self.all_nodes()? {
            let part = client.segment_overlap(request.clone()).await?.into_inner();
            for (total, count) in pairwise.iter_mut().zip(part.pairwise) {
                *total += count;
            }
            all += part.all;
        }
        Ok(Response::new(pb::SegmentOverlapResponse {
            segments: request.segments,
            pairwise,
            all,
        }))
    }

    async fn segment_history(
        &self,
        request: Request<pb::SegmentHistoryRequest>,
    ) -> Result<Response<pb::SegmentHistoryResponse>, Status> {
        let mut request = request.into_inner();
        let (mut parts, mut webhooks) = (Vec::new(), Vec::new());
        let mut answer = pb::SegmentHistoryResponse::default();
        for mut client in self.all_nodes()? {
            let part = client.segment_history(request.clone()).await?.into_inner();
            // Every node counts from the same first interval: the first
            // node's, when the request leaves it to the retention.
            if let Some(first) = part.points.first() {
                request.since_ms = first.start_ms;
                request.last_ms = 0;
            }
            answer.retained_from_ms = answer.retained_from_ms.max(part.retained_from_ms);
            answer.now_ms = answer.now_ms.max(part.now_ms);
            answer.segment = part.segment;
            answer.interval = part.interval;
            answer.volatility_threshold = part.volatility_threshold;
            parts.push(part.points);
            webhooks.push(part.webhooks);
        }
        answer.points = history::sum(parts);
        answer.webhooks = history::sum_webhooks(webhooks);
        history::flag(&mut answer.points, answer.volatility_threshold);
        Ok(Response::new(answer))
    }

    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let request = request.into_inner();
        self.user_owner(&request.user_id)?.explain(request).await
    }

    async fn preview_segments(
        &self,
        request: Request<pb::PreviewSegmentsRequest>,
    ) -> Result<Response<pb::SegmentCountsResponse>, Status> {
        let request = request.into_inner();
        let mut totals: Vec<pb::SegmentCount> = Vec::new();
        let mut users = 0;
        for mut client in self.all_nodes()? {
            let counts = client.preview_segments(request.clone()).await?.into_inner();
            users += counts.users;
            if totals.is_empty() {
                totals = counts.counts;
            } else {
                for (total, count) in totals.iter_mut().zip(counts.counts) {
                    total.members += count.members;
                }
            }
        }
        Ok(Response::new(pb::SegmentCountsResponse {
            counts: totals,
            users,
        }))
    }

    async fn advance_clock(
        &self,
        request: Request<pb::AdvanceClockRequest>,
    ) -> Result<Response<pb::AdvanceClockResponse>, Status> {
        let request = request.into_inner();
        let mut now_ms = i64::MIN;
        for mut client in self.all_nodes()? {
            let reply = client.advance_clock(request).await?.into_inner();
            now_ms = now_ms.max(reply.now_ms);
        }
        Ok(Response::new(pb::AdvanceClockResponse { now_ms }))
    }
}
