//! The control plane's `Control` API served by the gateway too: every call is
//! forwarded to the control-plane member the gateway follows, so clients need
//! one address for everything.

use std::pin::Pin;

use dynseg_proto::auth::Credentials;
use dynseg_proto::client::{self, Conn};
use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use dynseg_proto::pb::control_server::Control;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

/// Forwards `Control` calls to a control-plane member.
#[derive(Clone)]
pub struct AdminProxy {
    control: ControlClient<Conn>,
}

impl AdminProxy {
    /// A proxy to the member at `address` (connected on first use),
    /// presenting `credentials` (the gateway has checked the caller's).
    pub fn new(
        address: &str,
        credentials: Credentials,
    ) -> Result<AdminProxy, tonic::transport::Error> {
        let channel = client::lazy(client::endpoint(address, &credentials)?, credentials);
        Ok(AdminProxy {
            control: ControlClient::new(channel).max_decoding_message_size(64 << 20),
        })
    }

    fn client(&self) -> ControlClient<Conn> {
        self.control.clone()
    }
}

/// Forwards one unary call, keeping the caller's request metadata.
macro_rules! forward {
    ($self:ident, $method:ident, $request:ident) => {
        $self.client().$method($request).await
    };
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Control for AdminProxy {
    async fn validate_segments(
        &self,
        request: Request<pb::SegmentsRequest>,
    ) -> Result<Response<pb::ValidateSegmentsResponse>, Status> {
        forward!(self, validate_segments, request)
    }

    async fn apply_segments(
        &self,
        request: Request<pb::SegmentsRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        forward!(self, apply_segments, request)
    }

    async fn delete_segment(
        &self,
        request: Request<pb::DeleteSegmentRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        forward!(self, delete_segment, request)
    }

    async fn get_segment(
        &self,
        request: Request<pb::GetSegmentRequest>,
    ) -> Result<Response<pb::SegmentRecord>, Status> {
        forward!(self, get_segment, request)
    }

    async fn list_segments(
        &self,
        request: Request<pb::ReadOptions>,
    ) -> Result<Response<pb::ListSegmentsResponse>, Status> {
        forward!(self, list_segments, request)
    }

    async fn register_member(
        &self,
        request: Request<pb::RegisterMemberRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        forward!(self, register_member, request)
    }

    async fn deregister_member(
        &self,
        request: Request<pb::DeregisterMemberRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        forward!(self, deregister_member, request)
    }

    async fn set_shard_count(
        &self,
        request: Request<pb::SetShardCountRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        forward!(self, set_shard_count, request)
    }

    async fn get_topology(
        &self,
        request: Request<pb::ReadOptions>,
    ) -> Result<Response<pb::TopologyResponse>, Status> {
        forward!(self, get_topology, request)
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        forward!(self, add_node, request)
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        forward!(self, drain_node, request)
    }

    async fn rebalance(
        &self,
        request: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        forward!(self, rebalance, request)
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        forward!(self, heartbeat, request)
    }

    async fn commit_move(
        &self,
        request: Request<pb::MoveRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        forward!(self, commit_move, request)
    }

    async fn abort_move(
        &self,
        request: Request<pb::MoveRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        forward!(self, abort_move, request)
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let upstream: Streaming<pb::WatchEvent> = self.client().watch(request).await?.into_inner();
        Ok(Response::new(Box::pin(upstream)))
    }

    async fn add_control_member(
        &self,
        request: Request<pb::AddControlMemberRequest>,
    ) -> Result<Response<pb::ControlStatus>, Status> {
        forward!(self, add_control_member, request)
    }

    async fn remove_control_member(
        &self,
        request: Request<pb::RemoveControlMemberRequest>,
    ) -> Result<Response<pb::ControlStatus>, Status> {
        forward!(self, remove_control_member, request)
    }

    async fn get_control_status(
        &self,
        request: Request<pb::ControlStatusRequest>,
    ) -> Result<Response<pb::ControlStatus>, Status> {
        forward!(self, get_control_status, request)
    }
}
