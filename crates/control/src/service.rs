//! The gRPC services of a control member: `Control` (admin API, watch) and
//! `RaftPeer` (raft messages from other members). Handlers are thin: convert,
//! ask the replica, convert back.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use dynseg_proto::auth::{CLUSTER_SECRET_HEADER, constant_time_eq};
use dynseg_proto::pb;
use dynseg_proto::pb::control_server::Control;
use dynseg_proto::pb::raft_peer_server::RaftPeer;
use dynseg_rules::Limits;
use protobuf::Message as _;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::ControlError;
use crate::replica::{MemberChange, ReplicaHandle, View};
use crate::state::{Command, MemberKind, MoveProgress, Revised, SegmentSpec};
use crate::wire;

/// Events buffered per watcher before the stream waits for the client.
const WATCH_BUFFER: usize = 256;

/// The `Control` and `RaftPeer` services of one member.
#[derive(Clone)]
pub struct ControlService {
    replica: ReplicaHandle,
    /// Who may send raft messages while this member's state names no members
    /// yet (a joining member before its first snapshot): the configured peers.
    initial_peers: Arc<BTreeSet<u64>>,
    /// The secret raft senders must present, when the cluster has one.
    secret: Option<Arc<str>>,
    /// The segment writes this member proposes must fit these.
    rule_limits: Arc<Limits>,
}

impl ControlService {
    /// Services answering from `replica`; `initial_peers` are trusted until the
    /// replicated state names the group's members.
    pub fn new(
        replica: ReplicaHandle,
        initial_peers: BTreeSet<u64>,
        secret: Option<&str>,
        rule_limits: Limits,
    ) -> ControlService {
        ControlService {
            replica,
            initial_peers: Arc::new(initial_peers),
            secret: secret.map(Arc::from),
            rule_limits: Arc::new(rule_limits),
        }
    }

    async fn view(&self, stale: bool) -> Result<Arc<View>, ControlError> {
        if stale {
            Ok(self.replica.view())
        } else {
            self.replica.read().await
        }
    }

    async fn write(&self, command: Command) -> Result<Response<pb::WriteResult>, Status> {
        let revised = self.replica.propose(command).await?;
        let view = self.replica.view();
        Ok(Response::new(write_result(&revised, &view)))
    }
}

fn write_result(revised: &[Revised], view: &View) -> pb::WriteResult {
    match revised.last() {
        Some(last) => pb::WriteResult {
            revision: last.revision,
            rules_version: last.rules_version,
        },
        // A write that changed nothing (re-registering unchanged).
        None => pb::WriteResult {
            revision: view.state.revision,
            rules_version: view.state.rules_version,
        },
    }
}

fn specs(request: pb::SegmentsRequest) -> Result<Vec<SegmentSpec>, ControlError> {
    request
        .segments
        .into_iter()
        .map(SegmentSpec::try_from)
        .collect()
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn validate_segments(
        &self,
        request: Request<pb::SegmentsRequest>,
    ) -> Result<Response<pb::ValidateSegmentsResponse>, Status> {
        let specs = specs(request.into_inner())?;
        let view = self.replica.view();
        view.state.validate_put(&specs, &self.rule_limits)?;
        Ok(Response::new(pb::ValidateSegmentsResponse {
            next_rules_version: view.state.rules_version + 1,
        }))
    }

    async fn apply_segments(
        &self,
        request: Request<pb::SegmentsRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let specs = specs(request.into_inner())?;
        // Checked here for a fast answer, and again when applied (deterministically,
        // on every member) against the state the write is ordered after.
        self.replica
            .view()
            .state
            .validate_put(&specs, &self.rule_limits)?;
        self.write(Command::PutSegments(specs)).await
    }

    async fn delete_segment(
        &self,
        request: Request<pb::DeleteSegmentRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let id = request.into_inner().id;
        self.write(Command::DeleteSegment(id)).await
    }

    async fn get_segment(
        &self,
        request: Request<pb::GetSegmentRequest>,
    ) -> Result<Response<pb::SegmentRecord>, Status> {
        let request = request.into_inner();
        let view = self.view(request.stale).await?;
        match view.state.segments.get(&request.id) {
            Some(segment) => Ok(Response::new(segment.into())),
            None => Err(ControlError::SegmentNotFound(request.id).into()),
        }
    }

    async fn list_segments(
        &self,
        request: Request<pb::ReadOptions>,
    ) -> Result<Response<pb::ListSegmentsResponse>, Status> {
        let view = self.view(request.into_inner().stale).await?;
        Ok(Response::new(pb::ListSegmentsResponse {
            revision: view.state.revision,
            rules_version: view.state.rules_version,
            segments: view.state.segments.values().map(Into::into).collect(),
        }))
    }

    async fn register_member(
        &self,
        request: Request<pb::RegisterMemberRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let request = request.into_inner();
        self.write(Command::Register {
            kind: MemberKind::try_from(request.kind)?,
            id: request.id,
            address: request.address,
            weight: request.weight,
        })
        .await
    }

    async fn deregister_member(
        &self,
        request: Request<pb::DeregisterMemberRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let request = request.into_inner();
        self.write(Command::Deregister {
            kind: MemberKind::try_from(request.kind)?,
            id: request.id,
        })
        .await
    }

    async fn set_shard_count(
        &self,
        request: Request<pb::SetShardCountRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        self.write(Command::SetShardCount(request.into_inner().shard_count))
            .await
    }

    async fn get_topology(
        &self,
        request: Request<pb::ReadOptions>,
    ) -> Result<Response<pb::TopologyResponse>, Status> {
        let view = self.view(request.into_inner().stale).await?;
        Ok(Response::new(pb::TopologyResponse {
            revision: view.state.revision,
            topology: Some(wire::topology_with_liveness(&view.state, now_ms())),
        }))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let request = request.into_inner();
        self.write(Command::AddNode {
            node: request.node,
            weight: request.weight,
        })
        .await
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        self.write(Command::DrainNode(request.into_inner().node))
            .await
    }

    async fn rebalance(
        &self,
        request: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        self.write(Command::Rebalance {
            max_moves: request.into_inner().max_moves,
        })
        .await
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let request = request.into_inner();
        self.write(Command::Heartbeat {
            id: request.node_id,
            at_ms: now_ms(),
            moves: request
                .moves_in
                .into_iter()
                .map(|p| MoveProgress {
                    shard: p.shard,
                    attempt: p.attempt,
                    bytes_done: p.bytes_done,
                    bytes_total: p.bytes_total,
                })
                .collect(),
        })
        .await
    }

    async fn commit_move(
        &self,
        request: Request<pb::MoveRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let request = request.into_inner();
        self.write(Command::CommitMove {
            shard: request.shard,
            attempt: request.attempt,
        })
        .await
    }

    async fn abort_move(
        &self,
        request: Request<pb::MoveRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let request = request.into_inner();
        self.write(Command::AbortMove {
            shard: request.shard,
            attempt: request.attempt,
        })
        .await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let from = request.into_inner().from_revision;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        // The task lives as long as the stream: it ends when the client goes
        // away (send fails) or the member shuts down (the view channel closes).
        tokio::spawn(feed_watcher(self.replica.subscribe(), from, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn add_control_member(
        &self,
        request: Request<pb::AddControlMemberRequest>,
    ) -> Result<Response<pb::ControlStatus>, Status> {
        let request = request.into_inner();
        if request.address.is_empty() {
            return Err(ControlError::InvalidArgument("address is required".into()).into());
        }
        self.replica
            .change_members(MemberChange::Add {
                id: request.id,
                address: request.address,
            })
            .await?;
        Ok(Response::new(wire::status(&self.replica.view())))
    }

    async fn remove_control_member(
        &self,
        request: Request<pb::RemoveControlMemberRequest>,
    ) -> Result<Response<pb::ControlStatus>, Status> {
        let id = request.into_inner().id;
        self.replica
            .change_members(MemberChange::Remove { id })
            .await?;
        Ok(Response::new(wire::status(&self.replica.view())))
    }

    async fn get_control_status(
        &self,
        _request: Request<pb::ControlStatusRequest>,
    ) -> Result<Response<pb::ControlStatus>, Status> {
        Ok(Response::new(wire::status(&self.replica.view())))
    }
}

/// Sends a watcher every change after `sent`: from the retained history when it
/// reaches back far enough, else a full snapshot first; then live changes.
async fn feed_watcher(
    mut views: tokio::sync::watch::Receiver<Arc<View>>,
    mut sent: u64,
    tx: mpsc::Sender<Result<pb::WatchEvent, Status>>,
) {
    loop {
        let view = views.borrow_and_update().clone();
        let state = &view.state;
        if state.revision > sent {
            let oldest = view.history.front().map_or(u64::MAX, |r| r.revision);
            if sent + 1 < oldest {
                if tx.send(Ok(wire::snapshot_event(state))).await.is_err() {
                    return;
                }
                sent = state.revision;
            } else {
                for revised in view.history.iter() {
                    if revised.revision <= sent {
                        continue;
                    }
                    if tx.send(Ok(wire::delta_event(revised))).await.is_err() {
                        return;
                    }
                    sent = revised.revision;
                }
            }
        }
        tokio::select! {
            changed = views.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

#[tonic::async_trait]
impl RaftPeer for ControlService {
    async fn send(&self, request: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
        if let Some(secret) = &self.secret {
            let given = request
                .metadata()
                .get(CLUSTER_SECRET_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !constant_time_eq(given, secret.as_bytes()) {
                return Err(ControlError::Unauthenticated.into());
            }
        }
        let batch = request.into_inner();
        let view = self.replica.view();
        // protobuf 2.28 (raft's codec) must only ever decode bytes from cluster
        // members (RUSTSEC-2024-0437): refuse senders outside the group unheard.
        // A member being added is not yet in our state: it only receives, the
        // leader never waits on its messages before the change commits.
        let members = &view.state.control_members;
        let known = if members.is_empty() {
            self.initial_peers.contains(&batch.from)
        } else {
            members.contains_key(&batch.from)
        };
        if !known {
            return Err(ControlError::BadPeerMessage(format!(
                "{} is not a member of this raft group",
                batch.from
            ))
            .into());
        }
        let me = view.raft.id;
        let mut messages = Vec::with_capacity(batch.messages.len());
        for bytes in &batch.messages {
            let message = raft::eraftpb::Message::parse_from_bytes(bytes)
                .map_err(|e| ControlError::BadPeerMessage(format!("undecodable: {e}")))?;
            if message.from != batch.from || message.to != me {
                return Err(ControlError::BadPeerMessage(format!(
                    "message from {} to {} arrived from {} at {me}",
                    message.from, message.to, batch.from
                ))
                .into());
            }
            messages.push(message);
        }
        for message in messages {
            self.replica.step(message)?;
        }
        Ok(Response::new(pb::RaftAck {}))
    }
}

/// This member's wall clock, in milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
