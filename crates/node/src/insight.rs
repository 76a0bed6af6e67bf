//! Segment insight on a node: size history read from its shards' change logs,
//! and explanations of one user's membership.

use dynseg_proto::history::{self, Intervals, Tally};
use dynseg_proto::pb;
use dynseg_rules::{SegmentId, UserId};

use crate::error::NodeError;
use crate::runtime::{Command, Node};

/// A segment's history over this node's shards: per shard, the size as of its
/// last published change, then the changes since the first interval counted
/// backwards from it.
pub(crate) async fn history(
    node: &Node,
    request: pb::SegmentHistoryRequest,
) -> Result<pb::SegmentHistoryResponse, NodeError> {
    let segment = known_segment(node, &request.segment)?;
    let interval = request.interval();
    let now = node.now().millis();
    let retained_from = now - node.config().shard.change_retention.millis();
    let since = match (request.since_ms, request.last_ms) {
        (0, last) if last > 0 => now.saturating_sub(last),
        (0, _) => retained_from,
        (since, _) => since,
    };
    let intervals =
        Intervals::new(since, now, history::interval_ms(interval)).map_err(NodeError::Invalid)?;
    let mut parts = Vec::new();
    for (_, handle) in node.handles() {
        let wanted = segment.clone();
        let (size, through) = node
            .ask(&handle, |reply| Command::HistoryBase {
                segment: wanted,
                reply,
            })
            .await?;
        let log = handle.log.clone();
        let wanted = segment.clone();
        // The scan reads the store: off the async workers.
        let tally = tokio::task::spawn_blocking(move || {
            let mut tally = Tally::new(intervals);
            let enter = pb::ChangeKind::Enter as i32;
            log.visit_since(intervals.first, through, |change| {
                if change.segment == wanted.as_str() {
                    tally.add(change.at_ms, change.kind == enter);
                }
            })
            .map(|()| tally)
        })
        .await
        .map_err(|e| NodeError::Unavailable(format!("history scan stopped: {e}")))??;
        parts.push(tally.points(size));
    }
    let threshold = history::threshold(request.volatility_threshold);
    let mut points = if parts.is_empty() {
        Tally::new(intervals).points(0)
    } else {
        history::sum(parts)
    };
    history::flag(&mut points, threshold);
    Ok(pb::SegmentHistoryResponse {
        segment: segment.to_string(),
        interval: interval as i32,
        points,
        now_ms: now,
        volatility_threshold: threshold,
        retained_from_ms: retained_from,
        webhooks: crate::webhooks::status(node, segment.as_str()),
    })
}

/// A segment's rule evaluated for one user, on the shard that owns the user.
pub(crate) async fn explain(
    node: &Node,
    request: pb::ExplainRequest,
) -> Result<pb::ExplainResponse, NodeError> {
    if request.user_id.is_empty() {
        return Err(NodeError::Invalid("user_id is empty".into()));
    }
    let segment = known_segment(node, &request.segment)?;
    let shard = dynseg_proto::shard_for(&request.user_id, node.config().shard_count);
    let handle = node.handle(shard)?;
    let user = UserId::new(request.user_id.clone());
    let explained = node
        .ask(&handle, |reply| Command::Explain {
            user,
            segment,
            reply,
        })
        .await?
        .ok_or_else(|| NodeError::NotFound(format!("no user {:?}", request.user_id)))?;
    Ok(pb::ExplainResponse {
        user_id: request.user_id,
        rule_version: node.rule_version(),
        shard,
        ..(&explained).into()
    })
}

/// `segment` when the node's rules define it.
fn known_segment(node: &Node, segment: &str) -> Result<SegmentId, NodeError> {
    let id = SegmentId::from(segment);
    if node.plan().segment_ids().any(|s| *s == id) {
        Ok(id)
    } else {
        Err(NodeError::NotFound(format!("no segment {segment:?}")))
    }
}
