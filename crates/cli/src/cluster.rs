//! `dynseg cluster ...`: what operators scale with. Every change is a command
//! committed by the control plane; nodes carry out the moves it plans.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::{Duration, Instant};

use dynseg_proto::client::Conn;
use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use serde_json::json;

use crate::args::Args;
use crate::commands::control;
use crate::error::CliError;
use crate::output::{self, Output};
use crate::say;

/// `dynseg cluster add-node NODE [--weight W] [--wait]`: a registered node (by
/// id or address) takes shards again, optionally with a new weight.
pub async fn add_node(args: &Args, out: Output) -> Result<(), CliError> {
    let node = node_arg(args, "add-node NODE|ADDR [--weight W] [--wait]")?;
    let mut client = control(args).await?;
    let written = client
        .add_node(pb::AddNodeRequest {
            node: node.clone(),
            weight: args.number("weight", 0)?,
        })
        .await?
        .into_inner();
    report(
        &mut client,
        args,
        out,
        &format!("node {node} takes shards"),
        written,
    )
    .await
}

/// `dynseg cluster drain NODE [--wait]`: move every shard off a node.
pub async fn drain(args: &Args, out: Output) -> Result<(), CliError> {
    let node = node_arg(args, "drain NODE|ADDR [--wait]")?;
    let mut client = control(args).await?;
    let written = client
        .drain_node(pb::DrainNodeRequest { node: node.clone() })
        .await?
        .into_inner();
    report(
        &mut client,
        args,
        out,
        &format!("node {node} is draining"),
        written,
    )
    .await
}

/// `dynseg cluster remove NODE`: forget a drained node.
pub async fn remove(args: &Args, out: Output) -> Result<(), CliError> {
    let node = node_arg(args, "remove NODE")?;
    let mut client = control(args).await?;
    let topology = topology(&mut client).await?;
    // Accept an address as the other commands do.
    let id = topology
        .nodes
        .iter()
        .find(|n| n.id == node || n.address == node)
        .map(|n| n.id.clone())
        .unwrap_or(node);
    let written = client
        .deregister_member(pb::DeregisterMemberRequest {
            kind: pb::MemberKind::Node as i32,
            id: id.clone(),
        })
        .await?
        .into_inner();
    match out {
        Output::Json => output::json(&json!({"removed": id, "revision": written.revision})),
        Output::Table => say!("node {id} removed (revision {})", written.revision),
    }
    Ok(())
}

/// `dynseg cluster rebalance [--max-moves N] [--wait]`: recompute the plan.
pub async fn rebalance(args: &Args, out: Output) -> Result<(), CliError> {
    let mut client = control(args).await?;
    let written = client
        .rebalance(pb::RebalanceRequest {
            max_moves: args.number("max-moves", 0)?,
        })
        .await?
        .into_inner();
    report(&mut client, args, out, "plan recomputed", written).await
}

/// The node named on the command line, else `DYNSEG_NODE_ID` (a node's own
/// pod: its preStop hook drains it that way).
fn node_arg(args: &Args, usage: &str) -> Result<String, CliError> {
    args.positional
        .get(2)
        .cloned()
        .or_else(|| {
            std::env::var("DYNSEG_NODE_ID")
                .ok()
                .filter(|n| !n.is_empty())
        })
        .ok_or_else(|| CliError::User(format!("usage: dynseg cluster {usage}")))
}

async fn topology(client: &mut ControlClient<Conn>) -> Result<pb::Topology, CliError> {
    Ok(client
        .get_topology(pb::ReadOptions { stale: false })
        .await?
        .into_inner()
        .topology
        .unwrap_or_default())
}

/// Prints what was committed and, with `--wait`, follows the moves until none
/// is left.
async fn report(
    client: &mut ControlClient<Conn>,
    args: &Args,
    out: Output,
    what: &str,
    written: pb::WriteResult,
) -> Result<(), CliError> {
    let t = topology(client).await?;
    match out {
        Output::Json if !args.has("wait") => output::json(&json!({
            "revision": written.revision, "moves_in_flight": t.moves.len(), "shards_to_move": t.pending_moves,
        })),
        Output::Json => {}
        Output::Table => say!(
            "{what} (revision {}): {} shards to move, {} moving now",
            written.revision,
            t.pending_moves,
            t.moves.len()
        ),
    }
    if !args.has("wait") {
        return Ok(());
    }
    let started = Instant::now();
    let mut last = u32::MAX;
    loop {
        let t = topology(client).await?;
        if t.pending_moves == 0 && t.moves.is_empty() {
            match out {
                Output::Json => output::json(&json!({
                    "revision": written.revision, "shards_to_move": 0,
                    "seconds": started.elapsed().as_secs_f64(),
                })),
                Output::Table => say!("done in {:.1} s", started.elapsed().as_secs_f64()),
            }
            return Ok(());
        }
        if t.pending_moves != last && out == Output::Table {
            say!("{} shards to move", t.pending_moves);
            last = t.pending_moves;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A text progress bar: `[#####.....]  50%`.
fn bar(done: u64, total: u64) -> String {
    const WIDTH: u64 = 20;
    let filled = (done.min(total) * WIDTH).checked_div(total).unwrap_or(0);
    let percent = (done.min(total) * 100).checked_div(total).unwrap_or(0);
    format!(
        "[{}{}] {percent:>3}%",
        "#".repeat(filled as usize),
        ".".repeat((WIDTH - filled) as usize)
    )
}

/// `dynseg cluster status`: the control plane, nodes with their liveness and
/// shares, moves in flight with their progress, and shards unavailable
/// because their node is down.
pub async fn status(args: &Args, out: Output) -> Result<(), CliError> {
    let mut client = control(args).await?;
    let status = client
        .get_control_status(pb::ControlStatusRequest {})
        .await?
        .into_inner();
    let t = topology(&mut client).await?;
    let shards_of = |node: &str| t.shards.iter().filter(|s| s.node_id == node).count();
    let epochs_of = |node: &str| {
        let epochs = t
            .shards
            .iter()
            .filter(|s| s.node_id == node)
            .map(|s| s.epoch);
        (epochs.clone().min().unwrap_or(0), epochs.max().unwrap_or(0))
    };
    let progress = |m: &pb::ShardMove| {
        t.nodes
            .iter()
            .find(|n| n.id == m.to_node)
            .and_then(|n| {
                n.moves_in
                    .iter()
                    .find(|p| p.shard == m.shard && p.attempt == m.attempt)
            })
            .map_or((0, 0), |p| (p.bytes_done, p.bytes_total))
    };
    let down: Vec<&pb::ClusterMember> = t.nodes.iter().filter(|n| !n.alive).collect();
    let unavailable: usize = down.iter().map(|n| shards_of(&n.id)).sum();
    match out {
        Output::Json => output::json(&json!({
            "control": {"member": status.id, "role": status.role, "leader": status.leader_id, "term": status.term,
                        "commit_index": status.commit_index, "revision": status.revision, "rules_version": status.rules_version,
                        "members": status.members.iter().map(|m| json!({"id": m.id, "address": m.address})).collect::<Vec<_>>()},
            "shard_count": t.shard_count,
            "nodes": t.nodes.iter().map(|n| json!({
                "id": n.id, "address": n.address, "weight": n.weight, "draining": n.draining,
                "alive": n.alive, "last_heartbeat_ms": n.last_heartbeat_ms, "shards": shards_of(&n.id),
            })).collect::<Vec<_>>(),
            "gateways": t.gateways.iter().map(|g| json!({"id": g.id, "address": g.address})).collect::<Vec<_>>(),
            "shards": t.shards.iter().map(|s| json!({"shard": s.shard, "node": s.node_id, "epoch": s.epoch})).collect::<Vec<_>>(),
            "moves": t.moves.iter().map(|m| {
                let (done, total) = progress(m);
                json!({"shard": m.shard, "from": m.from_node, "to": m.to_node, "attempt": m.attempt,
                       "bytes_done": done, "bytes_total": total})
            }).collect::<Vec<_>>(),
            "max_moves": t.max_moves,
            "shards_to_move": t.pending_moves,
            "unavailable_shards": unavailable,
        })),
        Output::Table => {
            say!(
                "control plane: member {} is {}, leader {}, term {}, {} member(s), rule-set version {}",
                status.id,
                status.role,
                status.leader_id,
                status.term,
                status.members.len(),
                status.rules_version
            );
            say!(
                "{} shards; {} to move, {} moving (at most {} at once)\n",
                t.shard_count,
                t.pending_moves,
                t.moves.len(),
                t.max_moves
            );
            let rows: Vec<Vec<String>> = t
                .nodes
                .iter()
                .map(|n| {
                    let (low, high) = epochs_of(&n.id);
                    vec![
                        n.id.clone(),
                        n.address.clone(),
                        n.weight.to_string(),
                        if n.draining { "draining" } else { "active" }.to_owned(),
                        if n.alive { "up" } else { "DOWN" }.to_owned(),
                        shards_of(&n.id).to_string(),
                        if low == high {
                            low.to_string()
                        } else {
                            format!("{low}-{high}")
                        },
                    ]
                })
                .collect();
            output::table(
                &[
                    "NODE", "ADDRESS", "WEIGHT", "STATE", "LIVE", "SHARDS", "EPOCHS",
                ],
                &rows,
            );
            if !t.moves.is_empty() {
                say!("");
                let rows: Vec<Vec<String>> = t
                    .moves
                    .iter()
                    .map(|m| {
                        let (done, total) = progress(m);
                        vec![
                            m.shard.to_string(),
                            m.from_node.clone(),
                            m.to_node.clone(),
                            m.attempt.to_string(),
                            bar(done, total),
                            format!("{:.1}/{:.1} MiB", mib(done), mib(total)),
                        ]
                    })
                    .collect();
                output::table(
                    &["SHARD", "FROM", "TO", "ATTEMPT", "SNAPSHOT", "COPIED"],
                    &rows,
                );
            }
            if unavailable > 0 {
                let names: Vec<&str> = down.iter().map(|n| n.id.as_str()).collect();
                say!(
                    "\n{unavailable} shards unavailable: their node is down ({})",
                    names.join(", ")
                );
            }
        }
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::bar;

    #[test]
    fn bars_fill_in_proportion_and_survive_an_unknown_total() {
        assert_eq!(bar(0, 100), "[....................]   0%");
        assert_eq!(bar(50, 100), "[##########..........]  50%");
        assert_eq!(bar(200, 100), "[####################] 100%");
        assert_eq!(bar(5, 0), "[....................]   0%");
    }
}
