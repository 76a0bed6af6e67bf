//! One endpoint's deliveries from one shard: follow the change log from the
//! endpoint's cursor, POST batches in order, retry each until it is
//! acknowledged, then move the cursor.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dynseg_proto::pb;
use dynseg_rules::Timestamp;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::{Endpoint, StatusBoard, endpoint_id, lock, post};
use crate::changelog::{ChangeLog, SegmentFilter};
use crate::store::ShardStore;

/// Changes one POST carries at most.
pub(crate) const MAX_BATCH: usize = 100;
/// The first retry waits this long; each next one twice as long, up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub(crate) struct Delivery {
    pub(crate) shard: u32,
    pub(crate) endpoint: Endpoint,
    pub(crate) log: Arc<ChangeLog>,
    pub(crate) store: ShardStore,
    pub(crate) status: StatusBoard,
    pub(crate) tls: Arc<rustls::ClientConfig>,
}

fn sequence(change: &pb::MembershipChange) -> u64 {
    change.cursor.as_ref().map_or(0, |c| c.sequence)
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The wait before retry `attempt` (0 for the first retry).
pub(crate) fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << attempt.min(16))
        .min(MAX_BACKOFF)
}

impl Delivery {
    fn key(&self) -> (Endpoint, u32) {
        (self.endpoint.clone(), self.shard)
    }

    fn update(&self, f: impl FnOnce(&mut super::DeliveryStatus)) {
        let mut board = lock(&self.status);
        f(board.entry(self.key()).or_default());
    }

    /// Runs until `stop`, or until the shard is no longer served here.
    pub(crate) async fn run(self, mut stop: oneshot::Receiver<()>) {
        let id = endpoint_id(&self.endpoint.segment, &self.endpoint.url);
        // A new endpoint starts from now: it receives the changes from its
        // first start on.
        let cursor = match self.store.webhook_cursor(&id) {
            Ok(Some(cursor)) => Ok(cursor),
            Ok(None) => {
                let now = self.log.last();
                self.store.set_webhook_cursor(&id, now).map(|()| now)
            }
            Err(e) => Err(e),
        };
        let cursor = match cursor {
            Ok(cursor) => cursor,
            Err(e) => {
                self.update(|s| {
                    s.last_error = format!("cannot read the cursor: {e}");
                    s.last_error_ms = wall_ms();
                });
                return;
            }
        };
        self.update(|s| s.through = s.through.max(cursor));
        let (tx, mut rx) = mpsc::channel(MAX_BATCH * 4);
        let follower = {
            let log = self.log.clone();
            let filter = SegmentFilter::new([self.endpoint.segment.clone()]);
            tokio::spawn(async move { log.follow(cursor, &filter, &tx, |c| c).await })
        };
        loop {
            let first = tokio::select! {
                _ = &mut stop => break,
                change = rx.recv() => match change {
                    Some(change) => change,
                    None => break, // the shard left this node
                },
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(change) => batch.push(change),
                    Err(_) => break,
                }
            }
            if !self.deliver(&id, &batch, &mut stop).await {
                break;
            }
            let through = batch.last().map_or(cursor, sequence);
            if let Err(e) = self.store.set_webhook_cursor(&id, through) {
                tracing::warn!(shard = self.shard, error = %e, "cannot store a webhook cursor; it may redeliver");
            }
            self.update(|s| {
                s.delivered += batch.len() as u64;
                s.through = through;
                s.last_delivered_ms = wall_ms();
                s.last_error.clear();
            });
        }
        follower.abort();
        let _ = follower.await;
    }

    /// POSTs `batch` until it is acknowledged (true) or `stop` comes (false).
    async fn deliver(
        &self,
        id: &str,
        batch: &[pb::MembershipChange],
        stop: &mut oneshot::Receiver<()>,
    ) -> bool {
        let body = payload(&self.endpoint.segment, batch).to_string();
        let first = batch.first().map_or(0, sequence);
        let last = batch.last().map_or(0, sequence);
        let delivery = format!("{id}/{}/{first}-{last}", self.shard);
        let mut attempt = 0;
        loop {
            let sent = match std::env::var(&self.endpoint.secret_env) {
                Ok(secret) if !secret.is_empty() => {
                    post::post(&self.endpoint.url, &body, &secret, &delivery, &self.tls).await
                }
                _ => Err(format!(
                    "the signing secret's variable {} is not set on this node",
                    self.endpoint.secret_env
                )),
            };
            match sent {
                Ok(()) => return true,
                Err(e) => {
                    tracing::debug!(shard = self.shard, url = %self.endpoint.url, error = %e, "webhook delivery failed");
                    self.update(|s| {
                        s.failed_attempts += 1;
                        s.last_error = e;
                        s.last_error_ms = wall_ms();
                    });
                }
            }
            let wait = backoff(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = &mut *stop => return false,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// The JSON body of a delivery (docs/webhooks.md).
pub(crate) fn payload(segment: &str, batch: &[pb::MembershipChange]) -> serde_json::Value {
    let changes: Vec<serde_json::Value> = batch
        .iter()
        .map(|c| {
            let cursor = c.cursor.unwrap_or_default();
            let kind = match c.kind() {
                pb::ChangeKind::Enter => "enter",
                pb::ChangeKind::Exit => "exit",
                pb::ChangeKind::Unspecified => "unknown",
            };
            let cause = match c.cause() {
                pb::ChangeCause::Event => "event",
                pb::ChangeCause::Time => "time",
                pb::ChangeCause::Rule => "rule",
                pb::ChangeCause::Unspecified => "unknown",
            };
            json!({
                "id": format!("{}-{}", cursor.shard, cursor.sequence),
                "user_id": c.user_id,
                "segment": c.segment,
                "kind": kind,
                "at": Timestamp(c.at_ms).to_string(),
                "cause": cause,
                "rule_version": c.rule_version,
                "shard": cursor.shard,
                "sequence": cursor.sequence,
            })
        })
        .collect();
    json!({ "segment": segment, "changes": changes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_ceiling() {
        let waits: Vec<u128> = (0..10).map(|a| backoff(a).as_millis()).collect();
        assert_eq!(
            waits,
            vec![200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn a_payload_names_each_change_by_its_cursor() {
        let change = pb::MembershipChange {
            user_id: "ann".into(),
            segment: "vip".into(),
            kind: pb::ChangeKind::Exit as i32,
            at_ms: 1_772_366_400_000,
            cause: pb::ChangeCause::Time as i32,
            rule_version: 3,
            cursor: Some(pb::Cursor {
                shard: 5,
                epoch: 1,
                sequence: 42,
            }),
        };
        assert_eq!(
            payload("vip", &[change]),
            json!({"segment": "vip", "changes": [{
                "id": "5-42", "user_id": "ann", "segment": "vip", "kind": "exit",
                "at": "2026-03-01T12:00:00Z", "cause": "time", "rule_version": 3,
                "shard": 5, "sequence": 42,
            }]})
        );
    }
}
