//! Sending raft messages to the other members over gRPC (`RaftPeer.Send`), one
//! task per peer so a slow or dead peer never holds up the others.
//!
//! The raft task owns the [`Transport`]; each peer task owns its connection and
//! ends when the transport drops its queue (peer removed, or shutdown). Sending
//! never blocks the raft task: a full queue loses the message, which Raft treats
//! like any network loss and retries.

use std::collections::BTreeMap;

use dynseg_proto::auth::CLUSTER_SECRET_HEADER;
use dynseg_proto::client::url;
use dynseg_proto::pb;
use dynseg_proto::pb::raft_peer_client::RaftPeerClient;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{ClientTlsConfig, Endpoint};

use crate::faults::{Faults, Verdict};

/// Messages queued per peer before new ones are lost.
const PEER_QUEUE: usize = 1024;
/// Messages sent in one `RaftPeer.Send` call at most.
const BATCH: usize = 256;

/// What a peer task tells the raft task about delivery.
#[derive(Debug)]
pub enum Report {
    /// The peer could not be reached.
    Unreachable(u64),
    /// A snapshot was delivered (`true`) or failed (`false`).
    Snapshot(u64, bool),
}

struct Peer {
    address: String,
    queue: mpsc::Sender<Message>,
}

/// The outbound side of raft messaging.
pub struct Transport {
    id: u64,
    secret: Option<MetadataValue<Ascii>>,
    /// With mutual TLS, this member's certificate goes with every call.
    tls: Option<ClientTlsConfig>,
    peers: BTreeMap<u64, Peer>,
    faults: Faults,
    reports: mpsc::Sender<Report>,
    tasks: JoinSet<()>,
}

impl Transport {
    /// A transport for member `id`, presenting `secret` (if any) with every
    /// batch; delivery problems go to `reports`.
    pub fn new(
        id: u64,
        secret: Option<MetadataValue<Ascii>>,
        tls: Option<ClientTlsConfig>,
        faults: Faults,
        reports: mpsc::Sender<Report>,
    ) -> Transport {
        Transport {
            id,
            secret,
            tls,
            peers: BTreeMap::new(),
            faults,
            reports,
            tasks: JoinSet::new(),
        }
    }

    /// Makes the peer set exactly `members` (minus this member), starting tasks
    /// for new or moved peers and ending those of removed ones.
    pub fn set_peers(&mut self, members: &BTreeMap<u64, String>) {
        self.peers
            .retain(|id, peer| members.get(id) == Some(&peer.address));
        for (&id, address) in members {
            if id == self.id || self.peers.contains_key(&id) {
                continue;
            }
            let (queue, rx) = mpsc::channel(PEER_QUEUE);
            self.tasks.spawn(send_loop(
                self.id,
                id,
                address.clone(),
                self.secret.clone(),
                self.tls.clone(),
                rx,
                self.faults.clone(),
                self.reports.clone(),
            ));
            self.peers.insert(
                id,
                Peer {
                    address: address.clone(),
                    queue,
                },
            );
        }
        // Reap tasks that ended because their queue was dropped.
        while self.tasks.try_join_next().is_some() {}
    }

    /// Queues messages for their peers.
    pub fn send(&mut self, messages: Vec<Message>) {
        for message in messages {
            let Some(peer) = self.peers.get(&message.to) else {
                tracing::debug!(to = message.to, "no address for raft peer; message dropped");
                continue;
            };
            if peer.queue.try_send(message).is_err() {
                tracing::debug!("raft peer queue full; message dropped");
            }
        }
    }

    /// Ends every peer task and waits for them.
    pub async fn shutdown(mut self) {
        self.peers.clear();
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn send_loop(
    from: u64,
    to: u64,
    address: String,
    secret: Option<MetadataValue<Ascii>>,
    tls: Option<ClientTlsConfig>,
    mut queue: mpsc::Receiver<Message>,
    faults: Faults,
    reports: mpsc::Sender<Report>,
) {
    let endpoint = Endpoint::from_shared(url(&address, tls.is_some())).and_then(|e| match tls {
        Some(tls) => e.tls_config(tls),
        None => Ok(e),
    });
    let client = match endpoint {
        Ok(endpoint) => RaftPeerClient::new(
            endpoint
                .connect_timeout(std::time::Duration::from_millis(500))
                .connect_lazy(),
        )
        .max_encoding_message_size(usize::MAX),
        Err(e) => {
            tracing::error!(peer = to, %address, error = %e, "invalid raft peer address");
            return;
        }
    };
    let mut batch = Vec::with_capacity(BATCH);
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        let mut delay = std::time::Duration::ZERO;
        let mut snapshots = 0usize;
        let mut messages = Vec::with_capacity(batch.len());
        for message in batch.drain(..) {
            match faults.verdict(from, to) {
                Verdict::Drop => continue,
                Verdict::Deliver(d) => delay = delay.max(d),
            }
            if message.get_msg_type() == MessageType::MsgSnapshot {
                snapshots += 1;
            }
            match message.write_to_bytes() {
                Ok(bytes) => messages.push(bytes),
                Err(e) => tracing::error!(error = %e, "cannot encode raft message"),
            }
        }
        if messages.is_empty() {
            continue;
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut request = tonic::Request::new(pb::RaftBatch { from, messages });
        if let Some(secret) = &secret {
            request
                .metadata_mut()
                .insert(CLUSTER_SECRET_HEADER, secret.clone());
        }
        let sent = client.clone().send(request).await;
        let delivered = match sent {
            Ok(_) => true,
            Err(status) => {
                tracing::debug!(peer = to, %status, "raft send failed");
                let _ = reports.try_send(Report::Unreachable(to));
                false
            }
        };
        for _ in 0..snapshots {
            let _ = reports.try_send(Report::Snapshot(to, delivered));
        }
    }
}
