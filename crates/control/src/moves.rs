//! Shard moves: how the control plane gets shards from where they are to where
//! the ring says they should be, a few at a time, without ever handing a shard
//! to a node that does not hold its data.
//!
//! Pure like the rest of the state machine. A move names its source, its
//! destination and an attempt number unique in the cluster's history. The
//! destination copies the shard while the source serves, then asks the control
//! plane to commit the move *for that attempt*; the source, if the destination
//! goes quiet while writes are fenced, asks to abort it *for that attempt*.
//! Both are Raft commands, so exactly one of them wins, and a node never has to
//! guess whether a move it took part in committed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::placement;
use crate::state::Topology;

/// Moves in flight at once unless an operator sets another limit. One keeps
/// ingest at about 70% of its steady rate during a rebalance on a loaded
/// two-core machine; four brought it to about a third (docs/performance.md).
pub const DEFAULT_MAX_MOVES: u32 = 1;
/// The highest limit an operator may set.
pub const MAX_MAX_MOVES: u32 = 64;

/// A shard on its way from one node to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMove {
    /// The node serving the shard until the move commits.
    pub from: String,
    /// The node that copies it and serves it after.
    pub to: String,
    /// Unique per try: an aborted try is retried under a new number.
    pub attempt: u64,
}

/// The owner the ring gives each shard among the nodes that are not draining.
pub fn targets(topology: &Topology) -> Vec<Option<String>> {
    let active: BTreeMap<String, u32> = topology
        .nodes
        .iter()
        .filter(|(_, e)| !e.draining)
        .map(|(id, e)| (id.clone(), e.weight))
        .collect();
    placement::plan(topology.shard_count, &active)
}

/// Brings placement and moves in line with the nodes:
/// - a shard with no owner goes straight to its target (no node holds data
///   for it, so there is nothing to copy);
/// - a move whose source no longer owns the shard, or whose destination is no
///   longer the target, is dropped (its attempt can no longer commit);
/// - moves start, in shard order, until `max_moves` are in flight.
///
/// Returns whether anything changed.
pub fn schedule(topology: &mut Topology) -> bool {
    let count = topology.shard_count as usize;
    let mut changed = false;
    if topology.placement.len() != count {
        topology.placement.resize(count, Default::default());
        changed = true;
    }
    let targets = targets(topology);
    for (place, target) in topology.placement.iter_mut().zip(&targets) {
        if place.node.is_none() && target.is_some() {
            place.node = target.clone();
            place.epoch += 1;
            changed = true;
        }
    }
    let placement = &topology.placement;
    let before = topology.moves.len();
    topology.moves.retain(|shard, m| {
        let shard = *shard as usize;
        placement.get(shard).and_then(|p| p.node.as_deref()) == Some(m.from.as_str())
            && targets.get(shard).and_then(|t| t.as_deref()) == Some(m.to.as_str())
    });
    changed |= topology.moves.len() != before;
    for (shard, target) in targets.iter().enumerate() {
        if topology.moves.len() >= topology.max_moves.max(1) as usize {
            break;
        }
        let (Some(to), Some(from)) = (target, &topology.placement[shard].node) else {
            continue;
        };
        if to == from || topology.moves.contains_key(&(shard as u32)) {
            continue;
        }
        topology.next_attempt += 1;
        topology.moves.insert(
            shard as u32,
            ShardMove {
                from: from.clone(),
                to: to.clone(),
                attempt: topology.next_attempt,
            },
        );
        changed = true;
    }
    changed
}

/// Shards whose owner differs from their target: what is left to move.
pub fn pending(topology: &Topology) -> usize {
    targets(topology)
        .iter()
        .zip(&topology.placement)
        .filter(|(target, place)| target.is_some() && **target != place.node)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Endpoint;
    use proptest::prelude::*;

    fn topology(nodes: &BTreeMap<String, u32>, shards: u32, max_moves: u32) -> Topology {
        Topology {
            nodes: nodes
                .iter()
                .map(|(id, w)| {
                    (
                        id.clone(),
                        Endpoint {
                            address: format!("{id}:1"),
                            weight: *w,
                            draining: false,
                        },
                    )
                })
                .collect(),
            gateways: BTreeMap::new(),
            shard_count: shards,
            placement: Vec::new(),
            moves: BTreeMap::new(),
            next_attempt: 0,
            max_moves,
        }
    }

    /// Commits moves (lowest shard first) until none is left; returns the
    /// shards that changed owner, in commit order.
    fn run(t: &mut Topology) -> Vec<u32> {
        let mut moved = Vec::new();
        while let Some((&shard, m)) = t.moves.iter().next() {
            assert!(t.moves.len() <= t.max_moves as usize);
            let place = &mut t.placement[shard as usize];
            assert_eq!(place.node.as_deref(), Some(m.from.as_str()));
            place.node = Some(m.to.clone());
            place.epoch += 1;
            t.moves.remove(&shard);
            moved.push(shard);
            schedule(t);
        }
        moved
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Whatever the node set and the limit, running the scheduled moves
        /// ends exactly at the ring's plan for the new set, each shard moving
        /// at most once and only if its target changed.
        #[test]
        fn moves_reach_the_plan_minimally(
            weights in prop::collection::vec(1u32..=4, 1..=5),
            added in 1u32..=4,
            drain_first in any::<bool>(),
            max_moves in 1u32..=8,
            shards in 1u32..=128,
        ) {
            let nodes: BTreeMap<String, u32> = weights
                .iter()
                .enumerate()
                .map(|(i, w)| (format!("n{i}"), *w))
                .collect();
            let mut t = topology(&nodes, shards, max_moves);
            schedule(&mut t);
            prop_assert!(t.moves.is_empty(), "a new cluster places without moves");
            let before: Vec<Option<String>> = t.placement.iter().map(|p| p.node.clone()).collect();

            t.nodes.insert("new".into(), Endpoint { address: "new:1".into(), weight: added, draining: false });
            if drain_first && nodes.len() > 1 {
                t.nodes.get_mut("n0").unwrap().draining = true;
            }
            schedule(&mut t);
            let target = targets(&t);
            let moved = run(&mut t);
            let owners: Vec<Option<String>> = t.placement.iter().map(|p| p.node.clone()).collect();
            prop_assert_eq!(&owners, &target);
            let changed: Vec<u32> = (0..shards).filter(|s| before[*s as usize] != target[*s as usize]).collect();
            let mut sorted = moved.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, changed, "exactly the shards whose target changed move, once each");
            prop_assert_eq!(pending(&t), 0);
        }
    }
}
