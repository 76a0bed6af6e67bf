//! Conversions between the control plane's types and its gRPC messages.

use std::collections::BTreeMap;

use dynseg_proto::pb;

use crate::error::ControlError;
use crate::moves;
use crate::replica::View;
use crate::state::{
    ClusterState, Delta, Endpoint, MemberKind, MoveProgress, Revised, SegmentSpec, StoredSegment,
    Topology, WebhookSpec,
};

impl TryFrom<pb::SegmentDef> for SegmentSpec {
    type Error = ControlError;

    fn try_from(def: pb::SegmentDef) -> Result<Self, ControlError> {
        if !dynseg_rules::segment::is_valid_segment_id(&def.id) {
            return Err(ControlError::InvalidArgument(format!(
                "invalid segment id {:?}: use 1 to 128 of A-Z a-z 0-9 _ . -",
                def.id
            )));
        }
        let name = if def.name.is_empty() {
            def.id.clone()
        } else {
            def.name
        };
        if def.webhooks.len() > MAX_WEBHOOKS {
            return Err(ControlError::InvalidArgument(format!(
                "segment {}: {} webhooks, at most {MAX_WEBHOOKS}",
                def.id,
                def.webhooks.len()
            )));
        }
        let webhooks = def
            .webhooks
            .into_iter()
            .map(|w| webhook(&def.id, w))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SegmentSpec {
            id: def.id,
            name,
            description: def.description,
            rule: def.rule,
            webhooks,
        })
    }
}

/// Webhooks a segment may have.
pub const MAX_WEBHOOKS: usize = 8;

/// A webhook, checked: an `http://` or `https://` URL with a host, at most
/// 2048 bytes, and the name of an environment variable for its secret.
fn webhook(segment: &str, w: pb::Webhook) -> Result<WebhookSpec, ControlError> {
    let invalid = |why: String| {
        ControlError::InvalidArgument(format!("segment {segment}: webhook {:?}: {why}", w.url))
    };
    let rest = w
        .url
        .strip_prefix("http://")
        .or_else(|| w.url.strip_prefix("https://"))
        .ok_or_else(|| invalid("the URL must start with http:// or https://".into()))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || w.url.len() > 2048 || w.url.chars().any(char::is_whitespace) {
        return Err(invalid(
            "the URL needs a host, no spaces, and at most 2048 bytes".into(),
        ));
    }
    let env_ok = w.secret_env.len() <= 128
        && w.secret_env
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && w.secret_env
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !env_ok {
        return Err(invalid(format!(
            "secret_env {:?} must name an environment variable ([A-Za-z_][A-Za-z0-9_]*) holding the signing secret",
            w.secret_env
        )));
    }
    Ok(WebhookSpec {
        url: w.url,
        secret_env: w.secret_env,
    })
}

impl TryFrom<i32> for MemberKind {
    type Error = ControlError;

    fn try_from(kind: i32) -> Result<Self, ControlError> {
        match pb::MemberKind::try_from(kind) {
            Ok(pb::MemberKind::Node) => Ok(MemberKind::Node),
            Ok(pb::MemberKind::Gateway) => Ok(MemberKind::Gateway),
            _ => Err(ControlError::InvalidArgument(
                "kind must be MEMBER_KIND_NODE or MEMBER_KIND_GATEWAY".into(),
            )),
        }
    }
}

impl From<&StoredSegment> for pb::SegmentRecord {
    fn from(s: &StoredSegment) -> Self {
        pb::SegmentRecord {
            def: Some(pb::SegmentDef {
                id: s.id.clone(),
                name: s.name.clone(),
                description: s.description.clone(),
                rule: s.rule.clone(),
                webhooks: s
                    .webhooks
                    .iter()
                    .map(|w| pb::Webhook {
                        url: w.url.clone(),
                        secret_env: w.secret_env.clone(),
                    })
                    .collect(),
            }),
            version: s.version,
        }
    }
}

/// The topology part of a state.
pub fn topology(state: &Topology) -> pb::Topology {
    let members = |map: &BTreeMap<String, Endpoint>| {
        map.iter()
            .map(|(id, e)| pb::ClusterMember {
                id: id.clone(),
                address: e.address.clone(),
                weight: e.weight,
                draining: e.draining,
                ..Default::default()
            })
            .collect()
    };
    pb::Topology {
        shard_count: state.shard_count,
        nodes: members(&state.nodes),
        gateways: members(&state.gateways),
        shards: state
            .placement
            .iter()
            .enumerate()
            .map(|(shard, p)| pb::ShardPlacement {
                shard: shard as u32,
                node_id: p.node.clone().unwrap_or_default(),
                epoch: p.epoch,
            })
            .collect(),
        moves: state
            .moves
            .iter()
            .map(|(shard, m)| pb::ShardMove {
                shard: *shard,
                from_node: m.from.clone(),
                to_node: m.to.clone(),
                attempt: m.attempt,
            })
            .collect(),
        max_moves: state.max_moves,
        pending_moves: moves::pending(state) as u32,
    }
}

/// A node is alive when its last heartbeat is at most this old.
pub const ALIVE_WITHIN_MS: i64 = 5_000;

/// The topology with each node's liveness as of `now_ms` (for readers; watch
/// events carry the topology alone).
pub fn topology_with_liveness(state: &ClusterState, now_ms: i64) -> pb::Topology {
    let mut out = topology(&state.topology);
    for node in &mut out.nodes {
        if let Some(live) = state.liveness.get(&node.id) {
            node.last_heartbeat_ms = live.at_ms;
            node.alive = now_ms.saturating_sub(live.at_ms) <= ALIVE_WITHIN_MS;
            node.moves_in = live.moves.iter().map(move_progress).collect();
        }
    }
    out
}

/// Progress, as the API shows it.
pub fn move_progress(p: &MoveProgress) -> pb::MoveProgress {
    pb::MoveProgress {
        shard: p.shard,
        attempt: p.attempt,
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
    }
}

/// The control members, as the API lists them.
pub fn control_members(members: &BTreeMap<u64, String>) -> pb::ControlMembers {
    pb::ControlMembers {
        members: members
            .iter()
            .map(|(id, address)| pb::ControlMember {
                id: *id,
                address: address.clone(),
            })
            .collect(),
    }
}

/// A whole state as one watch event.
pub fn snapshot_event(state: &ClusterState) -> pb::WatchEvent {
    pb::WatchEvent {
        revision: state.revision,
        rules_version: state.rules_version,
        kind: Some(pb::watch_event::Kind::Snapshot(pb::ClusterSnapshot {
            rules_version: state.rules_version,
            segments: state.segments.values().map(Into::into).collect(),
            topology: Some(topology(&state.topology)),
            control_members: Some(control_members(&state.control_members)),
        })),
    }
}

/// One committed change as a watch event.
pub fn delta_event(revised: &Revised) -> pb::WatchEvent {
    use pb::watch_event::Kind;
    let kind = match &revised.delta {
        Delta::SegmentPut(segment) => Kind::SegmentPut(segment.into()),
        Delta::SegmentDeleted(id) => Kind::SegmentDeleted(id.clone()),
        Delta::Topology(state) => Kind::Topology(topology(state)),
        Delta::ControlMembers(members) => Kind::ControlMembers(control_members(members)),
    };
    pb::WatchEvent {
        revision: revised.revision,
        rules_version: revised.rules_version,
        kind: Some(kind),
    }
}

/// The status of a member.
pub fn status(view: &View) -> pb::ControlStatus {
    pb::ControlStatus {
        id: view.raft.id,
        role: view.raft.role.as_str().into(),
        leader_id: view.raft.leader_id,
        term: view.raft.term,
        commit_index: view.raft.commit,
        applied_index: view.raft.applied,
        revision: view.state.revision,
        rules_version: view.state.rules_version,
        members: control_members(&view.state.control_members).members,
        snapshot_index: view.raft.snapshot_index,
        snapshots_installed: view.raft.snapshots_installed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(webhooks: &[(&str, &str)]) -> pb::SegmentDef {
        pb::SegmentDef {
            id: "vip".into(),
            rule: "exists(order)".into(),
            webhooks: webhooks
                .iter()
                .map(|(url, env)| pb::Webhook {
                    url: (*url).into(),
                    secret_env: (*env).into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn webhooks_need_an_http_url_and_a_secret_variable() {
        let spec =
            SegmentSpec::try_from(def(&[("https://crm.example/hook", "CRM_SECRET")])).unwrap();
        assert_eq!(
            spec.webhooks,
            vec![WebhookSpec {
                url: "https://crm.example/hook".into(),
                secret_env: "CRM_SECRET".into()
            }]
        );
        for (url, env, needle) in [
            ("ftp://x/", "S", "must start with http:// or https://"),
            ("http:///path", "S", "needs a host"),
            ("http://a b/", "S", "no spaces"),
            ("http://ok/", "", "must name an environment variable"),
            ("http://ok/", "1ABC", "must name an environment variable"),
            ("http://ok/", "A-B", "must name an environment variable"),
        ] {
            let err = SegmentSpec::try_from(def(&[(url, env)])).unwrap_err();
            assert!(err.to_string().contains(needle), "{url} {env}: {err}");
        }
        let many = vec![("http://ok/", "S"); MAX_WEBHOOKS + 1];
        let err = SegmentSpec::try_from(def(&many)).unwrap_err();
        assert!(err.to_string().contains("at most 8"), "{err}");
    }
}
