//! One client stream merging every shard's change stream, resumable from a token.
//!
//! A [`Position`] holds the last sequence delivered per shard; every change goes
//! out with the token of the position right after it, so a client resumes from
//! any change it received, on any gateway: each shard continues after its
//! cursor, nothing repeats, nothing is skipped. When placement changes or a node
//! stream fails, the merge resubscribes every node from the position.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dynseg_proto::client::Conn;
use dynseg_proto::pb;
use dynseg_proto::pb::node_client::NodeClient;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::Status;

use crate::error::GatewayError;
use crate::routing::Routing;

const TOKEN_PREFIX: &str = "v1:";

/// The last sequence delivered for each shard that has delivered any, with
/// each shard's `shard.sequence` text kept ready: a token goes out with every
/// change, and formatting every shard's numbers for each one cost about a tenth
/// of the dev cluster's CPU at full load (perf).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Position {
    last: BTreeMap<u32, u64>,
    rendered: BTreeMap<u32, String>,
}

impl Position {
    /// The resume token: `v1:` then `shard.sequence` pairs joined by `-`.
    pub fn token(&self) -> String {
        let length: usize = self.rendered.values().map(|p| p.len() + 1).sum();
        let mut token = String::with_capacity(TOKEN_PREFIX.len() + length);
        token.push_str(TOKEN_PREFIX);
        for (i, pair) in self.rendered.values().enumerate() {
            if i > 0 {
                token.push('-');
            }
            token.push_str(pair);
        }
        token
    }

    fn set(&mut self, shard: u32, sequence: u64) {
        self.last.insert(shard, sequence);
        self.rendered.insert(shard, format!("{shard}.{sequence}"));
    }

    /// Reads a token; an empty one is the start.
    pub fn parse(token: &str) -> Result<Position, GatewayError> {
        if token.is_empty() {
            return Ok(Position::default());
        }
        let bad = || GatewayError::InvalidArgument(format!("malformed resume token {token:?}"));
        let body = token.strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
        let mut position = Position::default();
        for pair in body.split('-').filter(|p| !p.is_empty()) {
            let (shard, sequence) = pair.split_once('.').ok_or_else(bad)?;
            let shard = shard.parse().map_err(|_| bad())?;
            let sequence = sequence.parse().map_err(|_| bad())?;
            if position.last.contains_key(&shard) {
                return Err(bad());
            }
            position.set(shard, sequence);
        }
        Ok(position)
    }

    /// Records a delivered change.
    pub fn advance(&mut self, cursor: &pb::Cursor) {
        let last = self.last.get(&cursor.shard).copied().unwrap_or(0);
        if cursor.sequence > last {
            self.set(cursor.shard, cursor.sequence);
        }
    }

    fn cursors(&self, shards: &[u32]) -> Vec<pb::Cursor> {
        shards
            .iter()
            .filter_map(|s| {
                self.last.get(s).map(|q| pb::Cursor {
                    shard: *s,
                    epoch: 0,
                    sequence: *q,
                })
            })
            .collect()
    }
}

/// Feeds `out` with the merged changes for `request` until the client goes
/// away or the gateway stops (the routing channel closes).
pub async fn merge(
    mut routing: watch::Receiver<Arc<Routing>>,
    request: pb::GatewaySubscribeRequest,
    mut position: Position,
    out: mpsc::Sender<Result<pb::GatewayChange, Status>>,
) {
    let Ok(first) = routing
        .wait_for(|r| r.shard_count > 0)
        .await
        .map(|r| r.clone())
    else {
        return;
    };
    if request.resume_token.is_empty() && request.from_now {
        // "Now" is each shard's last sequence at this moment: resubscribing
        // later continues from there instead of from a later "now".
        for (node, shards) in first.shards_by_node() {
            if let Some(client) = first.nodes.get(&node)
                && let Ok(status) = client.clone().status(pb::StatusRequest {}).await
            {
                for shard in status.into_inner().shards {
                    if shards.contains(&shard.shard) && shard.last_sequence > 0 {
                        position.set(shard.shard, shard.last_sequence);
                    }
                }
            }
        }
    }
    loop {
        let table = routing.borrow_and_update().clone();
        let layout = table.shards_by_node();
        let (tx, mut changes) = mpsc::channel(1024);
        let mut readers = JoinSet::new();
        for (node, shards) in &layout {
            let Some(client) = table.nodes.get(node) else {
                continue;
            };
            let node_request = pb::SubscribeRequest {
                shards: shards.clone(),
                after: position.cursors(shards),
                from_now: false,
                segments: request.segments.clone(),
            };
            readers.spawn(read_node(client.clone(), node_request, tx.clone()));
        }
        drop(tx);
        let resubscribe_after = loop {
            tokio::select! {
                () = out.closed() => return,
                changed = routing.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if routing.borrow().shards_by_node() != layout {
                        break Duration::ZERO;
                    }
                }
                item = changes.recv() => match item {
                    Some(Ok(change)) => {
                        if let Some(cursor) = &change.cursor {
                            position.advance(cursor);
                        }
                        let token = position.token();
                        let sent = out.send(Ok(pb::GatewayChange { change: Some(change), resume_token: token })).await;
                        if sent.is_err() {
                            return;
                        }
                    }
                    Some(Err(status)) => {
                        tracing::debug!(%status, "node change stream failed; resubscribing");
                        break Duration::from_millis(200);
                    }
                    None => break Duration::from_millis(200),
                },
            }
        };
        readers.abort_all();
        if !resubscribe_after.is_zero() {
            tokio::select! {
                () = out.closed() => return,
                () = tokio::time::sleep(resubscribe_after) => {}
            }
        }
    }
}

async fn read_node(
    mut client: NodeClient<Conn>,
    request: pb::SubscribeRequest,
    tx: mpsc::Sender<Result<pb::MembershipChange, Status>>,
) {
    // Batches: a message carries whatever the node has ready, so a busy
    // stream costs one message per many changes rather than one each.
    let mut stream = match client.subscribe_batches(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let _ = tx.send(Err(status)).await;
            return;
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(batch)) => {
                for change in batch.changes {
                    if tx.send(Ok(change)).await.is_err() {
                        return;
                    }
                }
            }
            Ok(None) => {
                let _ = tx
                    .send(Err(Status::unavailable("node ended the stream")))
                    .await;
                return;
            }
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_malformed_ones_are_refused() {
        let mut position = Position::default();
        assert_eq!(position.token(), "v1:");
        assert_eq!(Position::parse("").unwrap(), position);
        for (shard, sequence) in [(3, 10), (250, 7), (3, 12)] {
            position.advance(&pb::Cursor {
                shard,
                epoch: 1,
                sequence,
            });
        }
        assert_eq!(position.token(), "v1:3.12-250.7");
        assert_eq!(Position::parse(&position.token()).unwrap(), position);
        for bad in ["3.12", "v1:3", "v1:x.1", "v1:3.1-3.2", "v2:1.1"] {
            assert!(Position::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            position.cursors(&[250, 9]),
            vec![pb::Cursor {
                shard: 250,
                epoch: 0,
                sequence: 7
            }]
        );
    }
}
