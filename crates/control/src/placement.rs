//! Shard → node placement with a consistent hash ring (virtual nodes, weights).
//!
//! Pure and deterministic: every control member computes the same placement from
//! the same registered nodes (the ring hashes with FNV, which is stable across
//! processes), so placement needs no extra coordination beyond the Raft log.

use std::collections::BTreeMap;

use consistent_hash_ring::RingBuilder;
use serde::{Deserialize, Serialize};

/// Virtual nodes per unit of weight: enough that 3 equal nodes get shares within
/// a few percent of a third of 256 shards.
pub const VNODES_PER_WEIGHT: usize = 64;

/// The highest weight a node may have (it bounds the ring's size).
pub const MAX_WEIGHT: u32 = 64;

/// Where one shard lives.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlacement {
    /// The owning node, or `None` while no node is registered.
    pub node: Option<String>,
    /// Increases every time the owner changes; a node must present it to write.
    pub epoch: u64,
}

/// Recomputes the owner of every shard from the registered nodes (`id → weight`),
/// bumping the epoch of each shard whose owner changed. Returns how many moved.
pub fn replace(
    placement: &mut Vec<ShardPlacement>,
    shard_count: u32,
    nodes: &BTreeMap<String, u32>,
) -> usize {
    placement.resize(shard_count as usize, ShardPlacement::default());
    let mut moved = 0;
    for (place, owner) in placement.iter_mut().zip(plan(shard_count, nodes)) {
        if owner != place.node {
            place.node = owner;
            place.epoch += 1;
            moved += 1;
        }
    }
    moved
}

/// The owner each shard should have for the nodes `id → weight`, in shard
/// order (`None` for every shard when there is no node).
pub fn plan(shard_count: u32, nodes: &BTreeMap<String, u32>) -> Vec<Option<String>> {
    let ring = RingBuilder::default()
        .weighted_nodes_iter(
            nodes
                .iter()
                .map(|(id, weight)| (id.clone(), VNODES_PER_WEIGHT * (*weight).max(1) as usize)),
        )
        .build();
    (0..shard_count)
        .map(|shard| ring.try_get(ring_key(shard)).cloned())
        .collect()
}

fn ring_key(shard: u32) -> u64 {
    let mut z = u64::from(shard).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(list: &[(&str, u32)]) -> BTreeMap<String, u32> {
        list.iter().map(|(id, w)| ((*id).to_owned(), *w)).collect()
    }

    fn share(placement: &[ShardPlacement], node: &str) -> usize {
        placement
            .iter()
            .filter(|p| p.node.as_deref() == Some(node))
            .count()
    }

    #[test]
    fn no_nodes_means_no_owner() {
        let mut placement = Vec::new();
        assert_eq!(replace(&mut placement, 8, &BTreeMap::new()), 0);
        assert_eq!(placement.len(), 8);
        assert!(placement.iter().all(|p| p.node.is_none() && p.epoch == 0));
    }

    #[test]
    fn adding_a_node_moves_about_its_share_and_bumps_only_moved_epochs() {
        let mut placement = Vec::new();
        let two = nodes(&[("a", 1), ("b", 1)]);
        assert_eq!(replace(&mut placement, 256, &two), 256);
        let before = placement.clone();
        let moved = replace(&mut placement, 256, &nodes(&[("a", 1), ("b", 1), ("c", 1)]));
        // A consistent ring moves only what the new node takes: about a third.
        assert_eq!(moved, share(&placement, "c"));
        assert!((50..=120).contains(&moved), "moved {moved}");
        for (old, new) in before.iter().zip(&placement) {
            if old.node == new.node {
                assert_eq!(old.epoch, new.epoch);
            } else {
                assert_eq!(new.node.as_deref(), Some("c"));
                assert_eq!(new.epoch, old.epoch + 1);
            }
        }
    }

    #[test]
    fn weights_skew_the_shares_and_placement_is_deterministic() {
        let weighted = nodes(&[("a", 1), ("b", 3)]);
        let mut first = Vec::new();
        replace(&mut first, 256, &weighted);
        let mut second = Vec::new();
        replace(&mut second, 256, &weighted);
        assert_eq!(first, second);
        assert!(share(&first, "b") > 2 * share(&first, "a"));
        assert_eq!(share(&first, "a") + share(&first, "b"), 256);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Up to 8 nodes named n0.. with weights 1 to 4.
        fn node_sets() -> impl Strategy<Value = BTreeMap<String, u32>> {
            prop::collection::vec(1u32..=4, 1..=8).prop_map(|weights| {
                weights
                    .into_iter()
                    .enumerate()
                    .map(|(i, w)| (format!("n{i}"), w))
                    .collect()
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

            /// The same node set always gives the same placement, whatever
            /// placement came before it (the epochs aside).
            #[test]
            fn placement_is_a_function_of_the_node_set(nodes in node_sets(), shards in 1u32..=512) {
                let mut fresh = Vec::new();
                replace(&mut fresh, shards, &nodes);
                let mut via_another = Vec::new();
                let mut first: BTreeMap<String, u32> = nodes.clone();
                first.insert("other".into(), 2);
                replace(&mut via_another, shards, &first);
                replace(&mut via_another, shards, &nodes);
                let owners = |p: &[ShardPlacement]| p.iter().map(|s| s.node.clone()).collect::<Vec<_>>();
                prop_assert_eq!(owners(&fresh), owners(&via_another));
            }

            /// Adding a node moves shards only onto it, and bumps the epochs of
            /// exactly those; removing it moves exactly those back.
            #[test]
            fn adding_or_removing_a_node_moves_only_its_shards(nodes in node_sets(), weight in 1u32..=4) {
                let mut placement = Vec::new();
                replace(&mut placement, 256, &nodes);
                let before = placement.clone();
                let mut grown = nodes.clone();
                grown.insert("new".into(), weight);
                let moved = replace(&mut placement, 256, &grown);
                let mut moved_seen = 0;
                for (old, new) in before.iter().zip(&placement) {
                    if old.node == new.node {
                        prop_assert_eq!(old.epoch, new.epoch);
                    } else {
                        prop_assert_eq!(new.node.as_deref(), Some("new"));
                        prop_assert_eq!(new.epoch, old.epoch + 1);
                        moved_seen += 1;
                    }
                }
                prop_assert_eq!(moved, moved_seen);
                let grown_placement = placement.clone();
                replace(&mut placement, 256, &nodes);
                for ((old, mid), back) in before.iter().zip(&grown_placement).zip(&placement) {
                    prop_assert_eq!(&old.node, &back.node);
                    if mid.node.as_deref() != Some("new") {
                        prop_assert_eq!(mid.epoch, back.epoch);
                    }
                }
            }

            /// Shares follow weights: no node gets more than twice its weighted
            /// share of 1,024 shards plus a margin for hashing.
            #[test]
            fn shares_follow_weights(nodes in node_sets()) {
                let mut placement = Vec::new();
                replace(&mut placement, 1024, &nodes);
                let total: u32 = nodes.values().sum();
                for (node, weight) in &nodes {
                    let expected = 1024.0 * f64::from(*weight) / f64::from(total);
                    let got = share(&placement, node) as f64;
                    prop_assert!(got <= 2.0 * expected + 24.0, "{node}: {got} of 1024, expected about {expected:.0}");
                }
            }
        }
    }
}
