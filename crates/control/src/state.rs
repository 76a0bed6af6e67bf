//! The replicated state machine: segments, nodes, gateways, shard placement and
//! the control-plane members. Pure and deterministic: every member applies the
//! same committed commands in the same order and reaches the same state.

use std::collections::BTreeMap;
use std::sync::Arc;

use dynseg_rules::check::{Schema, check_rule, check_set};
use dynseg_rules::syntax::parse_rule;
use dynseg_rules::{Limits, SegmentDef, SegmentId};
use serde::{Deserialize, Serialize};

use crate::error::ControlError;
use crate::moves::{self, DEFAULT_MAX_MOVES, MAX_MAX_MOVES, ShardMove};
use crate::placement::{MAX_WEIGHT, ShardPlacement};

/// The shard count a cluster gets unless set before the first node registers.
pub const DEFAULT_SHARD_COUNT: u32 = 256;
/// The largest shard count accepted.
pub const MAX_SHARD_COUNT: u32 = 65_536;

/// A stored segment and the rule-set version that last wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSegment {
    /// Segment id.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Rule text.
    pub rule: String,
    /// The rule-set version that last wrote this segment.
    pub version: u64,
    /// The segments its rule reads with `in_segment`.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Where its changes are delivered.
    #[serde(default)]
    pub webhooks: Vec<WebhookSpec>,
}

/// An HTTP endpoint receiving a segment's changes (docs/webhooks.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookSpec {
    /// `http://` or `https://` URL.
    pub url: String,
    /// The environment variable on the nodes holding the signing secret.
    pub secret_env: String,
}

impl StoredSegment {
    /// The rule engine's view of this segment.
    pub fn def(&self) -> SegmentDef {
        SegmentDef {
            id: SegmentId::from(self.id.as_str()),
            name: self.name.clone(),
            description: self.description.clone(),
            rule: self.rule.clone(),
        }
    }
}

/// A segment as a write carries it (before it has a version).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSpec {
    /// Segment id.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Rule text.
    pub rule: String,
    /// Where its changes are delivered.
    #[serde(default)]
    pub webhooks: Vec<WebhookSpec>,
}

/// Which kind of cluster member a registration is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberKind {
    /// A shard node: it receives shards.
    Node,
    /// A gateway: it routes, it owns nothing.
    Gateway,
}

/// A registered node or gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Where it serves gRPC.
    pub address: String,
    /// Relative share of shards (nodes only), 1 to [`MAX_WEIGHT`].
    pub weight: u32,
    /// A draining node is given no shards and hands its own to the others.
    #[serde(default)]
    pub draining: bool,
}

/// What a node last reported: when, and how its incoming moves are going.
/// Not part of any revision: heartbeats are frequent and watchers do not need
/// them; readers of the topology get them with it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Liveness {
    /// The control member's clock when the heartbeat arrived (ms since the epoch).
    pub at_ms: i64,
    /// Progress of the moves into this node.
    pub moves: Vec<MoveProgress>,
}

/// How far the copy of one incoming shard has got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveProgress {
    /// The shard.
    pub shard: u32,
    /// The move's attempt.
    pub attempt: u64,
    /// Bytes copied so far.
    pub bytes_done: u64,
    /// Bytes of the shard's snapshot.
    pub bytes_total: u64,
}

/// A write to the state machine: the payload of one Raft entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create or replace segments, as one new rule-set version.
    PutSegments(Vec<SegmentSpec>),
    /// Delete a segment (one new rule-set version).
    DeleteSegment(String),
    /// Register or update a node or gateway.
    Register {
        /// Node or gateway.
        kind: MemberKind,
        /// Its id.
        id: String,
        /// Its gRPC address.
        address: String,
        /// Its weight (nodes).
        weight: u32,
    },
    /// Remove a node or gateway.
    Deregister {
        /// Node or gateway.
        kind: MemberKind,
        /// Its id.
        id: String,
    },
    /// Set the shard count (only while no node is registered).
    SetShardCount(u32),
    /// Give a registered node (by id or address) shards again, optionally with
    /// a new weight (0 keeps it).
    AddNode {
        /// Its id or address.
        node: String,
        /// Its new weight, or 0.
        weight: u32,
    },
    /// Move every shard off a node (by id or address).
    DrainNode(String),
    /// Recompute the plan, optionally with a new limit of concurrent moves (0
    /// keeps it).
    Rebalance {
        /// Moves in flight at once.
        max_moves: u32,
    },
    /// The destination of a move has the shard's data and has fenced the
    /// source: hand it the shard at the next epoch.
    CommitMove {
        /// The shard.
        shard: u32,
        /// The attempt the destination copied under.
        attempt: u64,
    },
    /// The source gives up on an attempt (its destination went quiet); the move
    /// is retried under a new attempt.
    AbortMove {
        /// The shard.
        shard: u32,
        /// The attempt to give up.
        attempt: u64,
    },
    /// A node is alive.
    Heartbeat {
        /// The node.
        id: String,
        /// The receiving member's clock.
        at_ms: i64,
        /// Its incoming moves.
        moves: Vec<MoveProgress>,
    },
}

/// One committed change, as watchers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta {
    /// A segment was created or replaced.
    SegmentPut(StoredSegment),
    /// A segment was deleted.
    SegmentDeleted(String),
    /// Nodes, gateways, the shard count or the placement changed: the new topology.
    Topology(Arc<Topology>),
    /// The control-plane members changed: the new members.
    ControlMembers(BTreeMap<u64, String>),
}

/// A delta with the revision it created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revised {
    /// Revision (one per delta; increases by one each time).
    pub revision: u64,
    /// The rule-set version after it.
    pub rules_version: u64,
    /// What changed.
    pub delta: Delta,
}

/// Where shards live and who serves: what nodes and gateways watch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Shard nodes by id.
    pub nodes: BTreeMap<String, Endpoint>,
    /// Gateways by id.
    pub gateways: BTreeMap<String, Endpoint>,
    /// Number of shards.
    pub shard_count: u32,
    /// One entry per shard.
    pub placement: Vec<ShardPlacement>,
    /// Moves in flight, by shard.
    #[serde(default)]
    pub moves: BTreeMap<u32, ShardMove>,
    /// The last move attempt number handed out.
    #[serde(default)]
    pub next_attempt: u64,
    /// How many moves may be in flight at once.
    #[serde(default = "default_max_moves")]
    pub max_moves: u32,
}

fn default_max_moves() -> u32 {
    DEFAULT_MAX_MOVES
}

/// Everything the control plane replicates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Increases by one with every committed change.
    pub revision: u64,
    /// The cluster-wide rule-set version; increases with every segment change.
    pub rules_version: u64,
    /// Segments by id.
    pub segments: BTreeMap<String, StoredSegment>,
    /// Nodes, gateways and shard placement.
    pub topology: Arc<Topology>,
    /// Raft members of the control plane and their addresses.
    pub control_members: BTreeMap<u64, String>,
    /// Nodes' last heartbeats, by node id.
    #[serde(default)]
    pub liveness: BTreeMap<String, Liveness>,
}

impl Default for ClusterState {
    fn default() -> Self {
        let mut state = ClusterState {
            revision: 0,
            rules_version: 0,
            segments: BTreeMap::new(),
            topology: Arc::new(Topology {
                nodes: BTreeMap::new(),
                gateways: BTreeMap::new(),
                shard_count: DEFAULT_SHARD_COUNT,
                placement: Vec::new(),
                moves: BTreeMap::new(),
                next_attempt: 0,
                max_moves: DEFAULT_MAX_MOVES,
            }),
            control_members: BTreeMap::new(),
            liveness: BTreeMap::new(),
        };
        state.replace_shards();
        state
    }
}

impl ClusterState {
    /// Checks that `specs`, together with the stored segments they do not replace,
    /// form a valid rule set, and returns each spec's `in_segment` references.
    /// Rule errors carry `line:column`.
    ///
    /// The stored set is valid already, so only the new rules and what they
    /// reach through `in_segment` are checked: a write costs what it touches,
    /// not the size of the whole rule set. (Segments that read a replaced one
    /// stay valid: `in_segment` is a boolean whatever the rule behind it.)
    pub fn validate_put(
        &self,
        specs: &[SegmentSpec],
        limits: &Limits,
    ) -> Result<Vec<Vec<String>>, ControlError> {
        if specs.is_empty() {
            return Err(ControlError::InvalidArgument("no segments given".into()));
        }
        let mut given: BTreeMap<&str, &SegmentSpec> = BTreeMap::new();
        for spec in specs {
            if given.insert(spec.id.as_str(), spec).is_some() {
                return Err(ControlError::InvalidArgument(format!(
                    "segment {} is given twice",
                    spec.id
                )));
            }
        }
        let added = given
            .keys()
            .filter(|id| !self.segments.contains_key(**id))
            .count();
        if self.segments.len() + added > limits.max_segments {
            return Err(ControlError::InvalidRule(format!(
                "{} segments exceed the limit of {}",
                self.segments.len() + added,
                limits.max_segments
            )));
        }
        // The new rules' references, then everything they reach. A rule in
        // error reads nothing here: `check_set` below reports it, with every
        // other rule in error (one answer names every rule to fix).
        let references: Vec<Vec<String>> = specs
            .iter()
            .map(|spec| {
                parse_rule(&spec.rule, limits)
                    .and_then(|rule| check_rule(&rule, limits, &Schema::default()))
                    .map(|refs| {
                        refs.into_iter()
                            .map(|(id, _)| id.as_str().to_owned())
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect();
        let mut reached: BTreeMap<&str, SegmentDef> = BTreeMap::new();
        let mut queue: Vec<&str> = references
            .iter()
            .flat_map(|refs: &Vec<String>| refs.iter().map(String::as_str))
            .collect();
        while let Some(id) = queue.pop() {
            if given.contains_key(id) || reached.contains_key(id) {
                continue;
            }
            if let Some(stored) = self.segments.get(id) {
                reached.insert(id, stored.def());
                queue.extend(stored.depends_on.iter().map(String::as_str));
            }
            // An unknown id is reported by check_set, with its position.
        }
        let mut defs: Vec<SegmentDef> = reached.into_values().collect();
        defs.extend(specs.iter().map(|spec| SegmentDef {
            id: SegmentId::from(spec.id.as_str()),
            name: spec.name.clone(),
            description: spec.description.clone(),
            rule: spec.rule.clone(),
        }));
        check_set(&defs, limits, None).map_err(|e| ControlError::InvalidRule(e.to_string()))?;
        Ok(references)
    }

    /// Checks that deleting `id` leaves a valid rule set (no segment references it).
    pub fn validate_delete(&self, id: &str) -> Result<(), ControlError> {
        if !self.segments.contains_key(id) {
            return Err(ControlError::SegmentNotFound(id.to_owned()));
        }
        let readers: Vec<&str> = self
            .segments
            .values()
            .filter(|s| s.depends_on.iter().any(|d| d == id))
            .map(|s| s.id.as_str())
            .collect();
        if readers.is_empty() {
            Ok(())
        } else {
            Err(ControlError::FailedPrecondition(format!(
                "cannot delete segment {id}: in_segment(\"{id}\") is read by {}",
                readers.join(", ")
            )))
        }
    }

    /// Applies one committed command. On error nothing changed; every member
    /// reaches the same verdict, because the checks read only this state.
    pub fn apply(&mut self, command: &Command) -> Result<Vec<Revised>, ControlError> {
        let mut deltas = Vec::new();
        match command {
            Command::PutSegments(specs) => {
                // The ceiling, the same on every member: each member's own
                // policy was checked when the write was proposed.
                let references = self.validate_put(specs, &Limits::ceiling())?;
                self.rules_version += 1;
                for (spec, depends_on) in specs.iter().zip(references) {
                    let stored = StoredSegment {
                        id: spec.id.clone(),
                        name: spec.name.clone(),
                        description: spec.description.clone(),
                        rule: spec.rule.clone(),
                        version: self.rules_version,
                        depends_on,
                        webhooks: spec.webhooks.clone(),
                    };
                    self.segments.insert(spec.id.clone(), stored.clone());
                    deltas.push(Delta::SegmentPut(stored));
                }
            }
            Command::DeleteSegment(id) => {
                self.validate_delete(id)?;
                self.rules_version += 1;
                self.segments.remove(id);
                deltas.push(Delta::SegmentDeleted(id.clone()));
            }
            Command::Register {
                kind,
                id,
                address,
                weight,
            } => {
                validate_member(id, address, *weight)?;
                let topology = Arc::make_mut(&mut self.topology);
                let members = match kind {
                    MemberKind::Node => &mut topology.nodes,
                    MemberKind::Gateway => &mut topology.gateways,
                };
                // A node restarting after a drain stays drained.
                let endpoint = Endpoint {
                    address: address.clone(),
                    weight: (*weight).max(1),
                    draining: members.get(id).is_some_and(|e| e.draining),
                };
                if members.get(id) == Some(&endpoint) {
                    return Ok(Vec::new()); // Re-registering unchanged is a no-op.
                }
                members.insert(id.clone(), endpoint);
                if *kind == MemberKind::Node {
                    self.replace_shards();
                }
                deltas.push(Delta::Topology(self.topology.clone()));
            }
            Command::Deregister { kind, id } => {
                if *kind == MemberKind::Node {
                    self.check_removable(id)?;
                    self.liveness.remove(id);
                }
                let topology = Arc::make_mut(&mut self.topology);
                let members = match kind {
                    MemberKind::Node => &mut topology.nodes,
                    MemberKind::Gateway => &mut topology.gateways,
                };
                if members.remove(id).is_none() {
                    return Err(ControlError::MemberNotFound(format!("{kind:?} {id}")));
                }
                if *kind == MemberKind::Node {
                    self.replace_shards();
                }
                deltas.push(Delta::Topology(self.topology.clone()));
            }
            Command::SetShardCount(count) => {
                if !(1..=MAX_SHARD_COUNT).contains(count) {
                    return Err(ControlError::InvalidArgument(format!(
                        "shard count must be 1 to {MAX_SHARD_COUNT}, not {count}"
                    )));
                }
                if !self.topology.nodes.is_empty() {
                    return Err(ControlError::FailedPrecondition(
                        "the shard count is fixed once a node has registered".into(),
                    ));
                }
                let topology = Arc::make_mut(&mut self.topology);
                topology.shard_count = *count;
                topology.placement.clear();
                self.replace_shards();
                deltas.push(Delta::Topology(self.topology.clone()));
            }
            Command::AddNode { node, weight } => {
                if *weight > MAX_WEIGHT {
                    return Err(ControlError::InvalidArgument(format!(
                        "weight {weight} is over the limit of {MAX_WEIGHT}"
                    )));
                }
                let id = self.node_id(node)?;
                let topology = Arc::make_mut(&mut self.topology);
                let endpoint = topology
                    .nodes
                    .get_mut(&id)
                    .ok_or_else(|| ControlError::MemberNotFound(format!("node {node}")))?;
                endpoint.draining = false;
                if *weight > 0 {
                    endpoint.weight = *weight;
                }
                self.replace_shards();
                deltas.push(Delta::Topology(self.topology.clone()));
            }
            Command::DrainNode(node) => {
                let id = self.node_id(node)?;
                let others = self
                    .topology
                    .nodes
                    .iter()
                    .filter(|(other, e)| **other != id && !e.draining)
                    .count();
                if others == 0 {
                    return Err(ControlError::FailedPrecondition(format!(
                        "node {id} is the only node taking shards: add another before draining it"
                    )));
                }
                let topology = Arc::make_mut(&mut self.topology);
                if let Some(endpoint) = topology.nodes.get_mut(&id) {
                    endpoint.draining = true;
                }
                self.replace_shards();
                deltas.push(Delta::Topology(self.topology.clone()));
            }
            Command::Rebalance { max_moves } => {
                if *max_moves > MAX_MAX_MOVES {
                    return Err(ControlError::InvalidArgument(format!(
                        "at most {MAX_MAX_MOVES} moves may be in flight, not {max_moves}"
                    )));
                }
                let topology = Arc::make_mut(&mut self.topology);
                if *max_moves > 0 {
                    topology.max_moves = *max_moves;
                }
                self.replace_shards();
                deltas.push(Delta::Topology(self.topology.clone()));
            }
            Command::CommitMove { shard, attempt } => {
                let current = self.topology.moves.get(shard);
                let Some(m) = current.filter(|m| m.attempt == *attempt).cloned() else {
                    return Err(ControlError::FailedPrecondition(format!(
                        "move of shard {shard} attempt {attempt} is no longer in flight"
                    )));
                };
                let topology = Arc::make_mut(&mut self.topology);
                topology.moves.remove(shard);
                if let Some(place) = topology.placement.get_mut(*shard as usize) {
                    place.node = Some(m.to);
                    place.epoch += 1;
                }
                self.replace_shards();
                deltas.push(Delta::Topology(self.topology.clone()));
            }
            Command::AbortMove { shard, attempt } => {
                // Whatever this finds, `attempt` can no longer commit once it
                // is applied: that is all the caller needs to know.
                if self
                    .topology
                    .moves
                    .get(shard)
                    .is_some_and(|m| m.attempt == *attempt)
                {
                    let topology = Arc::make_mut(&mut self.topology);
                    topology.next_attempt += 1;
                    let next = topology.next_attempt;
                    if let Some(m) = topology.moves.get_mut(shard) {
                        m.attempt = next;
                    }
                    deltas.push(Delta::Topology(self.topology.clone()));
                }
            }
            Command::Heartbeat { id, at_ms, moves } => {
                if !self.topology.nodes.contains_key(id) {
                    return Err(ControlError::MemberNotFound(format!("node {id}")));
                }
                self.liveness.insert(
                    id.clone(),
                    Liveness {
                        at_ms: *at_ms,
                        moves: moves.clone(),
                    },
                );
            }
        }
        Ok(self.revise(deltas))
    }

    /// Records a control-plane membership change (from a Raft conf change).
    pub fn set_control_member(&mut self, id: u64, address: Option<String>) -> Vec<Revised> {
        match address {
            Some(address) => self.control_members.insert(id, address),
            None => self.control_members.remove(&id),
        };
        self.revise(vec![Delta::ControlMembers(self.control_members.clone())])
    }

    fn revise(&mut self, deltas: Vec<Delta>) -> Vec<Revised> {
        deltas
            .into_iter()
            .map(|delta| {
                self.revision += 1;
                Revised {
                    revision: self.revision,
                    rules_version: self.rules_version,
                    delta,
                }
            })
            .collect()
    }

    /// Places unowned shards and schedules the moves the node set calls for.
    fn replace_shards(&mut self) {
        moves::schedule(Arc::make_mut(&mut self.topology));
    }

    /// The id of the node named by id or address.
    fn node_id(&self, node: &str) -> Result<String, ControlError> {
        if self.topology.nodes.contains_key(node) {
            return Ok(node.to_owned());
        }
        let by_address =
            |address: &str| address == node || address.rsplit("://").next() == Some(node);
        self.topology
            .nodes
            .iter()
            .find(|(_, e)| by_address(&e.address))
            .map(|(id, _)| id.clone())
            .ok_or_else(|| ControlError::MemberNotFound(format!("node {node}")))
    }

    /// A node may leave only once it owns nothing and takes part in no move.
    fn check_removable(&self, id: &str) -> Result<(), ControlError> {
        let owned = self
            .topology
            .placement
            .iter()
            .filter(|p| p.node.as_deref() == Some(id))
            .count();
        let moving = self
            .topology
            .moves
            .values()
            .filter(|m| m.from == id || m.to == id)
            .count();
        if owned > 0 || moving > 0 {
            return Err(ControlError::FailedPrecondition(format!(
                "node {id} still owns {owned} shards ({moving} moves in flight): drain it and wait for the moves first"
            )));
        }
        Ok(())
    }
}

fn validate_member(id: &str, address: &str, weight: u32) -> Result<(), ControlError> {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ControlError::InvalidArgument(format!(
            "member id {id:?} must be 1 to 128 printable ASCII characters"
        )));
    }
    if address.is_empty() || address.len() > 256 {
        return Err(ControlError::InvalidArgument(format!(
            "member {id}: address must be 1 to 256 characters"
        )));
    }
    if weight > MAX_WEIGHT {
        return Err(ControlError::InvalidArgument(format!(
            "member {id}: weight {weight} is over the limit of {MAX_WEIGHT}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, rule: &str) -> SegmentSpec {
        SegmentSpec {
            id: id.into(),
            name: id.into(),
            description: String::new(),
            rule: rule.into(),
            webhooks: Vec::new(),
        }
    }

    fn node(id: &str) -> Command {
        Command::Register {
            kind: MemberKind::Node,
            id: id.into(),
            address: format!("{id}:7000"),
            weight: 1,
        }
    }

    #[test]
    fn every_segment_write_is_a_new_rule_version_and_each_delta_a_revision() {
        let mut state = ClusterState::default();
        let out = state
            .apply(&Command::PutSegments(vec![
                spec("buyers", "count(order_completed) in last 90d >= 2"),
                spec("vip", "in_segment(\"buyers\") and plan == \"pro\""),
            ]))
            .unwrap();
        assert_eq!(
            out.iter().map(|r| r.revision).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert!(out.iter().all(|r| r.rules_version == 1));
        let out = state
            .apply(&Command::PutSegments(vec![spec(
                "buyers",
                "exists(order_completed)",
            )]))
            .unwrap();
        assert_eq!((out[0].revision, out[0].rules_version), (3, 2));
        assert_eq!(state.segments["buyers"].version, 2);
        assert_eq!(state.segments["vip"].version, 1);
    }

    #[test]
    fn invalid_rules_carry_line_and_column_and_change_nothing() {
        let mut state = ClusterState::default();
        let before = state.clone();
        let err = state
            .apply(&Command::PutSegments(vec![spec(
                "bad",
                "count(order_completed) >=",
            )]))
            .unwrap_err();
        assert!(matches!(err, ControlError::InvalidRule(_)));
        assert!(err.to_string().contains("1:"), "{err}");
        let err = state
            .apply(&Command::PutSegments(vec![spec(
                "dangling",
                "in_segment(\"nope\")",
            )]))
            .unwrap_err();
        assert!(matches!(err, ControlError::InvalidRule(_)), "{err}");
        assert_eq!(state, before);
    }

    #[test]
    fn every_rule_in_error_is_reported_a_line_each_in_the_order_given() {
        let mut state = ClusterState::default();
        let before = state.clone();
        let err = state
            .apply(&Command::PutSegments(vec![
                spec("first", "count(order_completed) >="),
                spec("fine", "exists(login)"),
                spec("second", "sum(order_completed.revenue) in last 30 > 5"),
                spec("third", "in_segment(\"nope\")"),
            ]))
            .unwrap_err();
        let ControlError::InvalidRule(message) = &err else {
            panic!("{err}");
        };
        let lines: Vec<&str> = message.lines().collect();
        assert_eq!(lines.len(), 3, "{message}");
        assert!(lines[0].starts_with("segment first: 1:"), "{message}");
        assert!(lines[1].starts_with("segment second: 1:"), "{message}");
        assert!(lines[2].starts_with("segment third: 1:"), "{message}");
        assert!(lines[2].contains("not defined"), "{message}");
        assert_eq!(state, before);
    }

    #[test]
    fn a_put_is_checked_against_the_stored_segments_it_reaches() {
        let mut state = ClusterState::default();
        state
            .apply(&Command::PutSegments(vec![
                spec("a", "exists(order_completed)"),
                spec("b", "in_segment(\"a\")"),
            ]))
            .unwrap();
        // Closing a cycle through a stored segment is caught, at its position.
        let err = state
            .apply(&Command::PutSegments(vec![spec("a", "in_segment(\"b\")")]))
            .unwrap_err();
        assert!(err.to_string().contains("cycle"), "{err}");
        // Reading a stored segment is fine; reading an unknown one is not.
        state
            .apply(&Command::PutSegments(vec![spec(
                "c",
                "in_segment(\"b\") and exists(login)",
            )]))
            .unwrap();
        assert_eq!(state.segments["c"].depends_on, vec!["b".to_owned()]);
        let err = state
            .apply(&Command::PutSegments(vec![spec("d", "in_segment(\"zz\")")]))
            .unwrap_err();
        assert!(err.to_string().contains("d: 1:"), "{err}");
        // Given twice in one write.
        assert!(matches!(
            state.apply(&Command::PutSegments(vec![
                spec("e", "exists(x)"),
                spec("e", "exists(y)")
            ])),
            Err(ControlError::InvalidArgument(_))
        ));
        // The incremental check agrees with checking the whole set.
        let all: Vec<SegmentDef> = state.segments.values().map(StoredSegment::def).collect();
        assert!(check_set(&all, &Limits::default(), None).is_ok());
    }

    #[test]
    fn deleting_needs_the_segment_and_no_reference_to_it() {
        let mut state = ClusterState::default();
        state
            .apply(&Command::PutSegments(vec![
                spec("a", "exists(order_completed)"),
                spec("b", "in_segment(\"a\")"),
            ]))
            .unwrap();
        assert!(matches!(
            state.apply(&Command::DeleteSegment("zzz".into())),
            Err(ControlError::SegmentNotFound(_))
        ));
        assert!(matches!(
            state.apply(&Command::DeleteSegment("a".into())),
            Err(ControlError::FailedPrecondition(_))
        ));
        state.apply(&Command::DeleteSegment("b".into())).unwrap();
        state.apply(&Command::DeleteSegment("a".into())).unwrap();
        assert!(state.segments.is_empty());
        assert_eq!(state.rules_version, 3);
    }

    #[test]
    fn registering_nodes_places_every_shard_and_fixes_the_shard_count() {
        let mut state = ClusterState::default();
        state.apply(&Command::SetShardCount(16)).unwrap();
        assert!(state.topology.placement.iter().all(|p| p.node.is_none()));
        state.apply(&node("n1")).unwrap();
        assert!(
            state
                .topology
                .placement
                .iter()
                .all(|p| p.node.as_deref() == Some("n1") && p.epoch == 1)
        );
        // Re-registering unchanged is not a change.
        assert!(state.apply(&node("n1")).unwrap().is_empty());
        assert!(matches!(
            state.apply(&Command::SetShardCount(32)),
            Err(ControlError::FailedPrecondition(_))
        ));
        // A second node gets its shards through moves, a few at a time; the
        // placement changes only as moves commit.
        state.apply(&node("n2")).unwrap();
        assert!(
            state
                .topology
                .placement
                .iter()
                .all(|p| p.node.as_deref() == Some("n1"))
        );
        assert!(!state.topology.moves.is_empty());
        assert!(state.topology.moves.values().all(|m| m.to == "n2"));
        assert!(matches!(
            state.apply(&Command::Deregister {
                kind: MemberKind::Node,
                id: "n2".into(),
            }),
            Err(ControlError::FailedPrecondition(_))
        ));
        assert!(matches!(
            state.apply(&Command::Deregister {
                kind: MemberKind::Gateway,
                id: "g9".into()
            }),
            Err(ControlError::MemberNotFound(_))
        ));
    }

    /// Commits every move in flight, as destinations would, until none is left.
    fn run_moves(state: &mut ClusterState) -> usize {
        let mut committed = 0;
        while let Some((&shard, m)) = state.topology.moves.iter().next() {
            let attempt = m.attempt;
            state
                .apply(&Command::CommitMove { shard, attempt })
                .unwrap();
            committed += 1;
        }
        committed
    }

    fn owned(state: &ClusterState, id: &str) -> usize {
        state
            .topology
            .placement
            .iter()
            .filter(|p| p.node.as_deref() == Some(id))
            .count()
    }

    #[test]
    fn moves_respect_the_limit_and_commit_only_for_their_attempt() {
        let mut state = ClusterState::default();
        state.apply(&node("n1")).unwrap();
        state.apply(&Command::Rebalance { max_moves: 3 }).unwrap();
        state.apply(&node("n2")).unwrap();
        assert_eq!(state.topology.moves.len(), 3);
        let (&shard, first) = state.topology.moves.iter().next().unwrap();
        let (attempt, epoch) = (
            first.attempt,
            state.topology.placement[shard as usize].epoch,
        );

        // The source gives up: the attempt can no longer commit, the move stays
        // with a new attempt.
        state.apply(&Command::AbortMove { shard, attempt }).unwrap();
        assert!(matches!(
            state.apply(&Command::CommitMove { shard, attempt }),
            Err(ControlError::FailedPrecondition(_))
        ));
        let retried = state.topology.moves[&shard].attempt;
        assert!(retried > attempt);
        // Aborting a stale attempt again changes nothing.
        assert!(
            state
                .apply(&Command::AbortMove { shard, attempt })
                .unwrap()
                .is_empty()
        );
        state
            .apply(&Command::CommitMove {
                shard,
                attempt: retried,
            })
            .unwrap();
        let place = &state.topology.placement[shard as usize];
        assert_eq!(place.node.as_deref(), Some("n2"));
        assert_eq!(place.epoch, epoch + 1);
        // Another move took the freed slot.
        assert_eq!(state.topology.moves.len(), 3);

        let moved = 1 + run_moves(&mut state);
        assert_eq!(moved, owned(&state, "n2"));
        assert_eq!(moves::pending(&state.topology), 0);
        let mut fresh = ClusterState::default();
        fresh.apply(&node("n1")).unwrap();
        fresh.apply(&node("n2")).unwrap();
        run_moves(&mut fresh);
        let owners = |s: &ClusterState| {
            s.topology
                .placement
                .iter()
                .map(|p| p.node.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(owners(&state), owners(&fresh), "the plan is the ring's");
    }

    #[test]
    fn a_drained_node_owns_nothing_and_only_then_can_leave() {
        let mut state = ClusterState::default();
        state.apply(&node("n1")).unwrap();
        assert!(matches!(
            state.apply(&Command::DrainNode("n1".into())),
            Err(ControlError::FailedPrecondition(_))
        ));
        state.apply(&node("n2")).unwrap();
        run_moves(&mut state);
        assert!(owned(&state, "n2") > 0);
        // By address works as well as by id.
        state.apply(&Command::DrainNode("n2:7000".into())).unwrap();
        assert!(state.topology.nodes["n2"].draining);
        assert!(matches!(
            state.apply(&Command::Deregister {
                kind: MemberKind::Node,
                id: "n2".into(),
            }),
            Err(ControlError::FailedPrecondition(_))
        ));
        // Re-registering (a restart) keeps it drained.
        state.apply(&node("n2")).unwrap();
        assert!(state.topology.nodes["n2"].draining);
        run_moves(&mut state);
        assert_eq!(owned(&state, "n2"), 0);
        state
            .apply(&Command::Deregister {
                kind: MemberKind::Node,
                id: "n2".into(),
            })
            .unwrap();
        assert_eq!(owned(&state, "n1"), 256);
        assert!(matches!(
            state.apply(&Command::AddNode {
                node: "n2".into(),
                weight: 0
            }),
            Err(ControlError::MemberNotFound(_))
        ));
    }

    #[test]
    fn heartbeats_are_recorded_without_a_revision() {
        let mut state = ClusterState::default();
        state.apply(&node("n1")).unwrap();
        let revision = state.revision;
        let beat = Command::Heartbeat {
            id: "n1".into(),
            at_ms: 42,
            moves: Vec::new(),
        };
        assert!(state.apply(&beat).unwrap().is_empty());
        assert_eq!(state.revision, revision);
        assert_eq!(state.liveness["n1"].at_ms, 42);
        assert!(matches!(
            state.apply(&Command::Heartbeat {
                id: "zz".into(),
                at_ms: 1,
                moves: Vec::new()
            }),
            Err(ControlError::MemberNotFound(_))
        ));
    }
}
