//! Webhooks: each segment's enters and exits POSTed as JSON to the segment's
//! HTTP endpoints, signed with HMAC-SHA256 (docs/webhooks.md).
//!
//! One delivery task per (served shard, endpoint) follows the shard's change
//! log from the endpoint's cursor, which is kept in the shard's store: a batch
//! is retried with backoff until the endpoint answers 2xx, and only then does
//! the cursor move. So delivery is at least once, in change-log order (which
//! is each user's order: a user lives on one shard), resumes after a restart,
//! and moves with the shard when it moves.
//!
//! The [`Dispatcher`] owns the tasks: it starts and stops them as the
//! configuration (from the segment definitions) and the served shards change.

mod delivery;
mod post;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynseg_proto::pb;
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::runtime::Node;

pub use post::{client_tls, sign};

/// How often the dispatcher looks for shards that came or went.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);

/// Each segment's webhooks, from the segment definitions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WebhookConfig {
    /// Segment id to its endpoints.
    pub segments: BTreeMap<String, Vec<pb::Webhook>>,
}

impl WebhookConfig {
    /// The webhooks of `defs`.
    pub fn from_defs(defs: &[pb::SegmentDef]) -> WebhookConfig {
        WebhookConfig {
            segments: defs
                .iter()
                .filter(|d| !d.webhooks.is_empty())
                .map(|d| (d.id.clone(), d.webhooks.clone()))
                .collect(),
        }
    }

    /// As segment definitions holding only ids and webhooks (how it is stored).
    pub fn to_defs(&self) -> Vec<pb::SegmentDef> {
        self.segments
            .iter()
            .map(|(id, webhooks)| pb::SegmentDef {
                id: id.clone(),
                webhooks: webhooks.clone(),
                ..Default::default()
            })
            .collect()
    }
}

/// What identifies an endpoint: its segment, URL and secret's variable. The
/// cursor is kept under [`endpoint_id`] of these.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Endpoint {
    pub(crate) segment: String,
    pub(crate) url: String,
    pub(crate) secret_env: String,
}

/// A stable name for an endpoint of a segment (hex of a SHA-256 prefix).
pub(crate) fn endpoint_id(segment: &str, url: &str) -> String {
    let digest = Sha256::digest(format!("{segment}\n{url}").as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// How one (shard, endpoint) delivery is doing.
#[derive(Clone, Debug, Default)]
pub(crate) struct DeliveryStatus {
    pub(crate) delivered: u64,
    pub(crate) failed_attempts: u64,
    /// The last change sequence acknowledged.
    pub(crate) through: u64,
    pub(crate) last_delivered_ms: i64,
    pub(crate) last_error: String,
    pub(crate) last_error_ms: i64,
}

/// Every delivery's status, by (endpoint, shard): written by the delivery
/// tasks, read by stats. A std lock, never held across an await.
pub(crate) type StatusBoard = Arc<Mutex<BTreeMap<(Endpoint, u32), DeliveryStatus>>>;

pub(crate) fn lock(
    board: &StatusBoard,
) -> std::sync::MutexGuard<'_, BTreeMap<(Endpoint, u32), DeliveryStatus>> {
    // Writers only assign fields: a poisoned lock is still consistent.
    board
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The delivery status of `segment`'s webhooks on this node, per URL.
pub(crate) fn status(node: &Node, segment: &str) -> Vec<pb::WebhookStatus> {
    let lasts: HashMap<u32, u64> = node
        .handles()
        .into_iter()
        .map(|(shard, handle)| (shard, handle.log.last()))
        .collect();
    let board = lock(&node.inner.webhook_status);
    let mut by_url: BTreeMap<String, pb::WebhookStatus> = BTreeMap::new();
    for ((endpoint, shard), s) in board.iter() {
        if endpoint.segment != segment {
            continue;
        }
        let total = by_url
            .entry(endpoint.url.clone())
            .or_insert_with(|| pb::WebhookStatus {
                url: endpoint.url.clone(),
                ..Default::default()
            });
        total.shards += 1;
        total.delivered += s.delivered;
        total.failed_attempts += s.failed_attempts;
        if let Some(last) = lasts.get(shard) {
            total.behind += last.saturating_sub(s.through);
        }
        total.last_delivered_ms = total.last_delivered_ms.max(s.last_delivered_ms);
        if s.last_error_ms > total.last_error_ms && !s.last_error.is_empty() {
            total.last_error_ms = s.last_error_ms;
            total.last_error = format!("shard {shard}: {}", s.last_error);
        }
    }
    by_url.into_values().collect()
}

/// Owns the delivery tasks of a node.
pub struct Dispatcher {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Dispatcher {
    /// Starts delivering for `node`, with `tls` for https endpoints.
    pub fn spawn(node: Node, tls: Arc<rustls::ClientConfig>) -> Dispatcher {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(node, tls, stopped));
        Dispatcher {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops every delivery (a batch in flight is redelivered later).
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

async fn run(node: Node, tls: Arc<rustls::ClientConfig>, mut stopped: oneshot::Receiver<()>) {
    let mut config = node.inner.webhooks.subscribe();
    let mut running: HashMap<(u32, Endpoint), Running> = HashMap::new();
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    loop {
        let current = config.borrow_and_update().clone();
        reconcile(&node, &current, &tls, &mut running).await;
        tokio::select! {
            _ = &mut stopped => break,
            changed = config.changed() => if changed.is_err() { break },
            _ = tick.tick() => {}
        }
    }
    for (_, r) in running.drain() {
        stop(r).await;
    }
}

async fn stop(running: Running) {
    let _ = running.stop.send(());
    let _ = running.task.await;
}

/// Starts the deliveries wanted and not running; stops the others.
async fn reconcile(
    node: &Node,
    config: &WebhookConfig,
    tls: &Arc<rustls::ClientConfig>,
    running: &mut HashMap<(u32, Endpoint), Running>,
) {
    let handles = node.handles();
    let mut wanted = HashMap::new();
    for (shard, handle) in &handles {
        for (segment, hooks) in &config.segments {
            for hook in hooks {
                let endpoint = Endpoint {
                    segment: segment.clone(),
                    url: hook.url.clone(),
                    secret_env: hook.secret_env.clone(),
                };
                wanted.insert((*shard, endpoint), handle);
            }
        }
    }
    let gone: Vec<(u32, Endpoint)> = running
        .iter()
        .filter(|(key, r)| !wanted.contains_key(*key) || r.task.is_finished())
        .map(|(key, _)| key.clone())
        .collect();
    for key in gone {
        if let Some(r) = running.remove(&key) {
            stop(r).await;
        }
        if !wanted.contains_key(&key) {
            lock(&node.inner.webhook_status).remove(&(key.1, key.0));
        }
    }
    for ((shard, endpoint), handle) in wanted {
        let key = (shard, endpoint);
        if running.contains_key(&key) {
            continue;
        }
        let store = match node.shard_store(shard) {
            Ok(store) => store,
            Err(_) => continue, // released meanwhile
        };
        let (stop, stopped) = oneshot::channel();
        let delivery = delivery::Delivery {
            shard,
            endpoint: key.1.clone(),
            log: handle.log.clone(),
            store,
            status: node.inner.webhook_status.clone(),
            tls: tls.clone(),
        };
        let task = tokio::spawn(delivery.run(stopped));
        running.insert(key, Running { stop, task });
    }
}

/// Publishes a new configuration to the dispatcher and stores it.
pub(crate) fn configure(node: &Node, config: WebhookConfig) {
    if *node.inner.webhooks.borrow() == config {
        return;
    }
    if let Err(e) = node.inner.store.set_webhooks(&config.to_defs()) {
        tracing::warn!(error = %e, "cannot store the webhook configuration; it applies until restart");
    }
    node.inner.webhooks.send_replace(config);
}

/// Watches configuration changes: the dispatcher's input.
pub(crate) fn channel(initial: WebhookConfig) -> watch::Sender<WebhookConfig> {
    watch::Sender::new(initial)
}
