//! The control member's Prometheus metrics, read from its latest view at every
//! scrape: its Raft status (role, term, commit and applied index) and the
//! placement it knows (shards per node, moves in flight).

use std::sync::LazyLock;

use dynseg_telemetry::metrics::{ScrapeHook, on_scrape};
use prometheus::{IntGauge, IntGaugeVec, Opts, register_int_gauge, register_int_gauge_vec};

use crate::replica::{ReplicaHandle, Role};

// Registration fails only for a malformed or duplicate definition: a bug
// caught by the first test that touches the metric, not a runtime condition.
const DEFINED: &str = "metric definitions are valid and unique";

static ROLE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        Opts::new(
            "dynseg_raft_role",
            "1 for this member's current Raft role, 0 for the others."
        ),
        &["role"]
    )
    .expect(DEFINED)
});

static TERM: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("dynseg_raft_term", "This member's current Raft term.").expect(DEFINED)
});

static COMMIT: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "dynseg_raft_commit_index",
        "Highest Raft log index this member knows committed."
    )
    .expect(DEFINED)
});

static APPLIED: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "dynseg_raft_applied_index",
        "Highest Raft log index applied to this member's state."
    )
    .expect(DEFINED)
});

static LEADER: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "dynseg_raft_leader_id",
        "The leader this member knows of (0: none)."
    )
    .expect(DEFINED)
});

static PLACED: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        Opts::new(
            "dynseg_placement_shards",
            "Shards each node owns, by the placement this member has applied."
        ),
        &["node"]
    )
    .expect(DEFINED)
});

static MOVES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("dynseg_placement_moves_in_flight", "Shard moves in flight.")
        .expect(DEFINED)
});

/// Refreshes the member's gauges at every scrape, until the hook is dropped.
pub(crate) fn hook(replica: ReplicaHandle) -> ScrapeHook {
    on_scrape(move || {
        refresh(&replica);
        std::future::ready(())
    })
}

fn refresh(replica: &ReplicaHandle) {
    let view = replica.view();
    let raft = &view.raft;
    for role in [
        Role::Follower,
        Role::Candidate,
        Role::PreCandidate,
        Role::Leader,
    ] {
        ROLE.with_label_values(&[role.as_str()])
            .set(i64::from(role == raft.role));
    }
    TERM.set(raft.term as i64);
    COMMIT.set(raft.commit as i64);
    APPLIED.set(raft.applied as i64);
    LEADER.set(raft.leader_id as i64);
    let topology = &view.state.topology;
    PLACED.reset();
    for node in topology.nodes.keys() {
        PLACED.with_label_values(&[node]).set(0);
    }
    for shard in &topology.placement {
        if let Some(node) = &shard.node {
            PLACED.with_label_values(&[node]).inc();
        }
    }
    MOVES.set(topology.moves.len() as i64);
}
