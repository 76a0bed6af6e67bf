//! One client stream merging every shard's change stream, resumable from a token.
//!
//! A [`Position`] holds the last sequence delivered per shard; every change goes
//! out with the token of the position right after it, so a client resumes from
//! any change it received, on any gateway: each shard continues after its
//! cursor, nothing repeats, nothing is skipped. When placement changes or a node
//! stream fails, the merge resubscribes every node from the position.
//!
//! Changes pass through as their node encoded them; the merge reads only each
//! one's cursor. They move between the tasks here a node's batch at a time:
//! each hop through a channel costs a turn of the scheduler, and at one change
//! per hop a busy gateway delivered a few tens of thousands of changes a
//! second, seconds behind the nodes (docs/performance.md). Tokens are written
//! by the client's stream ([`ChangeStream`]) as each change goes out, so what
//! waits for a slow client is the changes alone, not a token of every shard's
//! position each.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dynseg_proto::encoded::{self, ChangeView, EncodedChange};
use dynseg_proto::pb;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::Stream;
use tonic::Status;

use crate::error::GatewayError;
use crate::routing::{EncodedClient, Routing};

const TOKEN_PREFIX: &str = "v1:";

/// The last sequence delivered for each shard that has delivered any, with
/// the token's text kept ready: a token goes out with every change.
/// Formatting every shard's numbers for each change cost about a tenth of the
/// dev cluster's CPU at full load (perf); joining each shard's kept text
/// still cost 2% at 256 shards. Now a change rewrites only its shard's part
/// of the text, and a token is one copy of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// `(shard, sequence)` in shard order.
    entries: Vec<(u32, u64)>,
    /// Where each entry's `shard.sequence` starts in `text`.
    starts: Vec<usize>,
    /// The token: `v1:` then the entries' `shard.sequence` joined by `-`.
    text: String,
}

impl Default for Position {
    fn default() -> Position {
        Position {
            entries: Vec::new(),
            starts: Vec::new(),
            text: TOKEN_PREFIX.to_owned(),
        }
    }
}

impl Position {
    /// The resume token: `v1:` then `shard.sequence` pairs joined by `-`.
    pub fn token(&self) -> String {
        self.text.clone()
    }

    /// Where entry `i`'s text ends (before the next one's `-`).
    fn end(&self, i: usize) -> usize {
        self.starts
            .get(i + 1)
            .map_or(self.text.len(), |next| next - 1)
    }

    fn set(&mut self, shard: u32, sequence: u64) {
        use std::fmt::Write;
        let mut part = String::with_capacity(24);
        let _ = write!(part, "{shard}.{sequence}");
        match self.entries.binary_search_by_key(&shard, |(s, _)| *s) {
            Ok(i) => {
                self.entries[i].1 = sequence;
                let (start, end) = (self.starts[i], self.end(i));
                let grown = part.len() as isize - (end - start) as isize;
                self.text.replace_range(start..end, &part);
                for later in &mut self.starts[i + 1..] {
                    *later = later.wrapping_add_signed(grown);
                }
            }
            Err(i) => {
                let start = match self.starts.get(i) {
                    // Before entry `i`: the part and its `-`.
                    Some(&at) => {
                        part.push('-');
                        self.text.insert_str(at, &part);
                        for later in &mut self.starts[i..] {
                            *later += part.len();
                        }
                        at
                    }
                    // Last: a `-` (unless first), then the part.
                    None => {
                        if !self.entries.is_empty() {
                            self.text.push('-');
                        }
                        self.text.push_str(&part);
                        self.text.len() - part.len()
                    }
                };
                self.entries.insert(i, (shard, sequence));
                self.starts.insert(i, start);
            }
        }
    }

    fn last(&self, shard: u32) -> Option<u64> {
        self.entries
            .binary_search_by_key(&shard, |(s, _)| *s)
            .ok()
            .map(|i| self.entries[i].1)
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
            if position.last(shard).is_some() {
                return Err(bad());
            }
            position.set(shard, sequence);
        }
        Ok(position)
    }

    /// Records a delivered change: `sequence` on `shard`.
    pub fn advance(&mut self, shard: u32, sequence: u64) {
        let last = self.last(shard).unwrap_or(0);
        if sequence > last {
            self.set(shard, sequence);
        }
    }

    fn cursors(&self, shards: &[u32]) -> Vec<pb::Cursor> {
        shards
            .iter()
            .filter_map(|s| {
                self.last(*s).map(|q| pb::Cursor {
                    shard: *s,
                    epoch: 0,
                    sequence: q,
                })
            })
            .collect()
    }
}

/// What the merge sends the client's stream.
#[derive(Debug)]
pub enum Merged {
    /// The position the stream starts from (sent first).
    From(Position),
    /// A node's batch of changes, in the order to deliver them.
    Changes(NodeBatch),
    /// The nodes keep refusing the subscription: the stream ends with this.
    Failed(Status),
}

/// How long nodes may refuse a subscription (see
/// [`dynseg_proto::client::is_refusal`]) before the client's stream ends with
/// their answer: long enough for a segment just created to reach every node.
const REFUSAL_GRACE: Duration = Duration::from_secs(5);

/// The first wait before resubscribing after a node's stream failed; it
/// doubles while failures follow each other, up to [`MOST_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MOST_BACKOFF: Duration = Duration::from_secs(2);

/// When to resubscribe after failures, and when to give up: transient ones
/// are retried without end, less and less often; refusals that persist past
/// [`REFUSAL_GRACE`] end the stream. A subscription that ran for the grace
/// without failing starts afresh.
#[derive(Debug, Default)]
struct Retry {
    backoff: Duration,
    refused_since: Option<Instant>,
}

impl Retry {
    /// What to do after a subscription that ran for `ran` ended with
    /// `failure` at `now`: wait this long, or give up with this status.
    fn after(&mut self, failure: Status, ran: Duration, now: Instant) -> Result<Duration, Status> {
        if ran >= REFUSAL_GRACE {
            *self = Retry::default();
        }
        if dynseg_proto::client::is_refusal(failure.code()) {
            let since = *self.refused_since.get_or_insert(now);
            if now.duration_since(since) >= REFUSAL_GRACE {
                return Err(failure);
            }
            tracing::warn!(status = %failure, "a node refused a subscription; retrying");
        } else {
            tracing::debug!(status = %failure, "node change stream failed; resubscribing");
        }
        self.backoff = (self.backoff * 2).clamp(FIRST_BACKOFF, MOST_BACKOFF);
        Ok(self.backoff)
    }
}

/// Feeds `out` with the merged changes for `request` until the client goes
/// away or the gateway stops (the routing channel closes).
pub async fn merge(
    mut routing: watch::Receiver<Arc<Routing>>,
    request: pb::GatewaySubscribeRequest,
    mut position: Position,
    out: mpsc::Sender<Merged>,
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
    if out.send(Merged::From(position.clone())).await.is_err() {
        return;
    }
    let mut retry = Retry::default();
    loop {
        let started = Instant::now();
        let table = routing.borrow_and_update().clone();
        let layout = table.shards_by_node();
        let (tx, mut changes) = mpsc::channel(NODE_BATCHES);
        let mut readers = JoinSet::new();
        for (node, shards) in &layout {
            let Some(client) = table.encoded.get(node) else {
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
                    Some(Ok(batch)) => {
                        for (shard, sequence, _) in &batch {
                            position.advance(*shard, *sequence);
                        }
                        if out.send(Merged::Changes(batch)).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(status)) => {
                        match retry.after(status, started.elapsed(), Instant::now()) {
                            Ok(wait) => break wait,
                            Err(status) => {
                                let _ = out.send(Merged::Failed(status)).await;
                                return;
                            }
                        }
                    }
                    None => break FIRST_BACKOFF,
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

/// Node batches buffered between the node readers and the merge.
const NODE_BATCHES: usize = 8;

/// A node's batch of changes, each with the shard and sequence of its cursor.
pub type NodeBatch = Vec<(u32, u64, Bytes)>;

/// The client's stream: the changes [`merge`] sends, one at a time, each with
/// the token of the position right after it.
pub struct ChangeStream {
    rx: mpsc::Receiver<Merged>,
    position: Position,
    ready: std::vec::IntoIter<(u32, u64, Bytes)>,
    /// Set once the stream gave its failure: it ends there.
    failed: bool,
}

impl ChangeStream {
    /// The changes `rx` receives, in order.
    pub fn new(rx: mpsc::Receiver<Merged>) -> ChangeStream {
        ChangeStream {
            rx,
            position: Position::default(),
            ready: Vec::new().into_iter(),
            failed: false,
        }
    }
}

impl Stream for ChangeStream {
    type Item = Result<encoded::GatewayChange, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        loop {
            if let Some((shard, sequence, change)) = self.ready.next() {
                self.position.advance(shard, sequence);
                return Poll::Ready(Some(Ok(encoded::GatewayChange {
                    change: Some(EncodedChange(change)),
                    resume_token: self.position.token(),
                })));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Merged::From(position))) => self.position = position,
                Poll::Ready(Some(Merged::Changes(batch))) => self.ready = batch.into_iter(),
                Poll::Ready(Some(Merged::Failed(status))) => {
                    self.failed = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

async fn read_node(
    mut client: EncodedClient,
    request: pb::SubscribeRequest,
    tx: mpsc::Sender<Result<NodeBatch, Status>>,
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
                let read = batch.changes.into_iter().map(|change| {
                    let (shard, sequence) = ChangeView::parse(&change)
                        .map(|view| (view.shard, view.sequence))
                        .map_err(|e| Status::data_loss(format!("a node sent {e}")))?;
                    Ok((shard, sequence, change))
                });
                let read: Result<NodeBatch, Status> = read.collect();
                let failed = read.is_err();
                if tx.send(read).await.is_err() || failed {
                    return;
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
    use std::collections::BTreeMap;

    use super::*;

    #[tokio::test]
    async fn the_client_stream_gives_each_change_in_order_with_its_token_then_ends() {
        use tokio_stream::StreamExt;
        let (tx, rx) = mpsc::channel(4);
        tx.send(Merged::From(Position::parse("v1:3.10-7.2").unwrap()))
            .await
            .unwrap();
        let batch = |changes: &[(u32, u64, &'static str)]| {
            Merged::Changes(
                changes
                    .iter()
                    .map(|&(shard, sequence, bytes)| (shard, sequence, Bytes::from(bytes)))
                    .collect(),
            )
        };
        tx.send(batch(&[(3, 11, "a"), (5, 1, "b")])).await.unwrap();
        tx.send(batch(&[])).await.unwrap();
        tx.send(batch(&[(7, 3, "c")])).await.unwrap();
        drop(tx);
        let got: Vec<(Bytes, String)> = ChangeStream::new(rx)
            .map(|item| {
                let change = item.unwrap();
                (change.change.unwrap().0, change.resume_token)
            })
            .collect()
            .await;
        let want = [
            ("a", "v1:3.11-7.2"),
            ("b", "v1:3.11-5.1-7.2"),
            ("c", "v1:3.11-5.1-7.3"),
        ];
        assert_eq!(
            got,
            want.map(|(bytes, token)| (Bytes::from(bytes), token.to_owned()))
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            rng_seed: proptest::test_runner::RngSeed::Fixed(20_261_130),
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        })]
        /// However shards advance (new ones first, last or between, numbers
        /// growing a digit or not), the kept text is the token written out
        /// afresh, and it reads back as the same position.
        #[test]
        fn the_kept_token_is_the_token_written_afresh(
            moves in proptest::collection::vec((0u32..40, 0u64..100_000), 0..60),
        ) {
            let mut position = Position::default();
            let mut want = BTreeMap::new();
            for (shard, sequence) in moves {
                position.advance(shard, sequence);
                let last = want.entry(shard).or_insert(0);
                *last = sequence.max(*last);
                // `advance` keeps a shard at 0 out until it moves past it.
                want.retain(|_, q| *q > 0);
                let fresh: Vec<String> = want.iter().map(|(s, q)| format!("{s}.{q}")).collect();
                proptest::prop_assert_eq!(position.token(), format!("v1:{}", fresh.join("-")));
            }
            proptest::prop_assert_eq!(Position::parse(&position.token()).unwrap(), position);
        }
    }

    #[test]
    fn transient_failures_are_retried_less_and_less_often_without_end() {
        let mut retry = Retry::default();
        let now = Instant::now();
        let waits: Vec<u64> = (0..8)
            .map(|i| {
                let at = now + Duration::from_secs(i * 60);
                let wait = retry.after(Status::unavailable("restarting"), Duration::ZERO, at);
                wait.unwrap().as_millis() as u64
            })
            .collect();
        assert_eq!(waits, [200, 400, 800, 1600, 2000, 2000, 2000, 2000]);
        // A subscription that held for the grace starts afresh.
        let wait = retry.after(Status::aborted("moved"), REFUSAL_GRACE, now);
        assert_eq!(wait.unwrap(), FIRST_BACKOFF);
    }

    #[test]
    fn refusals_end_the_stream_once_they_outlast_the_grace() {
        let mut retry = Retry::default();
        let now = Instant::now();
        let refused = || Status::not_found("no segment nope");
        assert!(retry.after(refused(), Duration::ZERO, now).is_ok());
        // Transient failures in between do not restart the grace.
        assert!(
            retry
                .after(
                    Status::unavailable("x"),
                    Duration::ZERO,
                    now + Duration::from_secs(2)
                )
                .is_ok()
        );
        let almost = now + REFUSAL_GRACE - Duration::from_millis(1);
        assert!(retry.after(refused(), Duration::ZERO, almost).is_ok());
        let given_up = retry.after(refused(), Duration::ZERO, now + REFUSAL_GRACE);
        assert_eq!(given_up.unwrap_err().message(), "no segment nope");
        // After a subscription that held for the grace, a refusal gets a new one.
        let mut retry = Retry::default();
        assert!(retry.after(refused(), Duration::ZERO, now).is_ok());
        let later = now + 2 * REFUSAL_GRACE;
        assert!(retry.after(refused(), REFUSAL_GRACE, later).is_ok());
    }

    #[tokio::test]
    async fn a_failure_ends_the_client_stream_after_the_changes_before_it() {
        let (tx, rx) = mpsc::channel(4);
        tx.send(Merged::From(Position::default())).await.unwrap();
        tx.send(Merged::Changes(vec![(1, 1, Bytes::from_static(b"a"))]))
            .await
            .unwrap();
        tx.send(Merged::Failed(Status::data_loss("a node sent garbage")))
            .await
            .unwrap();
        let mut stream = ChangeStream::new(rx);
        use tokio_stream::StreamExt;
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.resume_token, "v1:1.1");
        let failed = stream.next().await.unwrap().unwrap_err();
        assert_eq!(failed.code(), tonic::Code::DataLoss);
        // Ended, though the sender is still there.
        assert!(stream.next().await.is_none());
        drop(tx);
    }

    #[test]
    fn tokens_round_trip_and_malformed_ones_are_refused() {
        let mut position = Position::default();
        assert_eq!(position.token(), "v1:");
        assert_eq!(Position::parse("").unwrap(), position);
        for (shard, sequence) in [(3, 10), (250, 7), (3, 12), (3, 11)] {
            position.advance(shard, sequence);
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
