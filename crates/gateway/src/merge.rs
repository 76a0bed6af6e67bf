//! Identity merge through the gateway (docs/identity.md): an `alias` (user id
//! and previous id) or an `identify` carrying both a user id and an anonymous
//! id folds the other profile into the user's, across shards, exactly once.
//!
//! Two steps, each idempotent, so a client's retry of the event completes a
//! merge a crash interrupted and repeats nothing: the other profile's shard
//! takes its state out (a repeat of the merge id answers the same state), then
//! the user's shard folds it in (once per merge id, which it keeps with the
//! user's message ids).

use dynseg_proto::encoded::{EventView, RouteView};
use dynseg_proto::pb;
use dynseg_proto::shard_for;

use crate::error::GatewayError;
use crate::ingest::Ingestor;

/// One merge an event asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merge {
    /// Index of the event in its request.
    pub index: u32,
    /// The profile kept.
    pub user: String,
    /// The profile folded into it.
    pub from: String,
    /// Names the merge: the same event always gives the same id.
    pub merge_id: String,
}

/// Whether `event` may ask for a merge: an alias, or an identify with two
/// different ids. Only those are read in full ([`merge_of`] decides).
pub fn may_merge(event: &RouteView<'_>) -> bool {
    match event.kind() {
        Some(pb::EventType::Alias) => true,
        Some(pb::EventType::Identify) => {
            let (user, anonymous) = event.ids();
            !user.is_empty() && !anonymous.is_empty() && user != anonymous
        }
        _ => false,
    }
}

/// The merge `event` asks for, if any: an alias from `previous_id` to
/// `user_id`, or an identify with both `user_id` and `anonymous_id`.
pub fn merge_of(index: u32, event: &EventView<'_>) -> Option<Merge> {
    let from = match event.kind() {
        Some(pb::EventType::Alias) => event.previous_id,
        Some(pb::EventType::Identify) => event.anonymous_id,
        _ => return None,
    };
    if event.user_id.is_empty() || from.is_empty() || from == event.user_id {
        return None;
    }
    Some(Merge {
        index,
        user: event.user_id.to_owned(),
        from: from.to_owned(),
        merge_id: format!("{}\u{1f}{from}\u{1f}{}", event.message_id, event.user_id),
    })
}

impl Ingestor {
    /// Runs `merge` to completion: takes the other profile out of its shard,
    /// then folds it into the user's (nothing when it does not exist).
    pub async fn merge(&self, merge: &Merge) -> Result<(), GatewayError> {
        let shard_count = self.shard_count().await?;
        let from_shard = shard_for(&merge.from, shard_count);
        let out = self
            .call_owner(from_shard, |epoch, mut client| {
                let request = pb::MergeOutRequest {
                    shard: from_shard,
                    epoch,
                    user_id: merge.from.clone(),
                    into: merge.user.clone(),
                    merge_id: merge.merge_id.clone(),
                };
                async move { client.merge_out(request).await }
            })
            .await?;
        if !out.found {
            return Ok(());
        }
        let user_shard = shard_for(&merge.user, shard_count);
        self.call_owner(user_shard, |epoch, mut client| {
            let request = pb::MergeInRequest {
                shard: user_shard,
                epoch,
                user_id: merge.user.clone(),
                from: merge.from.clone(),
                merge_id: merge.merge_id.clone(),
                state: out.state.clone(),
                rule_version: out.rule_version,
            };
            async move { client.merge_in(request).await }
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: pb::EventType, user: &str, anonymous: &str, previous: &str) -> bytes::Bytes {
        dynseg_proto::encoded::encode(&pb::Event {
            message_id: "m1".into(),
            r#type: kind as i32,
            user_id: user.into(),
            anonymous_id: anonymous.into(),
            previous_id: previous.into(),
            ..Default::default()
        })
    }

    /// The merge `event` asks for, checking that the gateway would read it
    /// in full to find it: `may_merge` picks every event that asks.
    fn merge_of(index: u32, event: &[u8]) -> Option<Merge> {
        let merge = super::merge_of(index, &EventView::parse(event).unwrap());
        let picked = may_merge(&RouteView::parse(event).unwrap());
        assert!(merge.is_none() || picked, "{merge:?} not picked");
        merge
    }

    #[test]
    fn aliases_and_identifies_with_both_ids_ask_for_merges() {
        let alias = merge_of(3, &event(pb::EventType::Alias, "ann", "", "anon-1")).unwrap();
        assert_eq!(
            (alias.index, alias.user.as_str(), alias.from.as_str()),
            (3, "ann", "anon-1")
        );
        assert_eq!(alias.merge_id, "m1\u{1f}anon-1\u{1f}ann");
        let identify = merge_of(0, &event(pb::EventType::Identify, "ann", "anon-1", "")).unwrap();
        assert_eq!(identify.from, "anon-1");
        for none in [
            event(pb::EventType::Track, "ann", "anon-1", ""),
            event(pb::EventType::Identify, "ann", "", ""),
            event(pb::EventType::Identify, "", "anon-1", ""),
            event(pb::EventType::Identify, "ann", "ann", ""),
            event(pb::EventType::Alias, "", "x", "anon-1"),
        ] {
            assert_eq!(merge_of(0, &none), None, "{none:?}");
        }
        // Tracks and identifies with one id are not read in full.
        for skipped in [
            event(pb::EventType::Track, "ann", "anon-1", ""),
            event(pb::EventType::Identify, "ann", "", ""),
            event(pb::EventType::Identify, "ann", "ann", ""),
        ] {
            assert!(!may_merge(&RouteView::parse(&skipped).unwrap()));
        }
    }
}
