//! Segment insight commands: `dynseg segment overlap A B ...`.

use dynseg_proto::pb;
use serde_json::json;

use crate::args::Args;
use crate::commands::gateway;
use crate::error::CliError;
use crate::output::{self, Output};
use crate::say;

/// `dynseg segment overlap A B [C...]`: the pairwise overlap matrix (members
/// of both segments of each pair; the diagonal is each size) and the members
/// of all of them.
pub async fn overlap(args: &Args, out: Output) -> Result<(), CliError> {
    let segments: Vec<String> = args.positional.iter().skip(2).cloned().collect();
    if segments.len() < 2 {
        return Err(CliError::User(
            "usage: dynseg segment overlap SEGMENT SEGMENT [SEGMENT...]".into(),
        ));
    }
    let reply = gateway(args)
        .await?
        .segment_overlap(pb::SegmentOverlapRequest { segments })
        .await?
        .into_inner();
    let n = reply.segments.len();
    let cell = |i: usize, j: usize| reply.pairwise.get(i * n + j).copied().unwrap_or(0);
    match out {
        Output::Json => output::json(&json!({
            "segments": reply.segments,
            "sizes": (0..n).map(|i| cell(i, i)).collect::<Vec<_>>(),
            "pairwise": (0..n).map(|i| (0..n).map(|j| cell(i, j)).collect::<Vec<_>>()).collect::<Vec<_>>(),
            "all": reply.all,
        })),
        Output::Table => {
            let mut header = vec![""];
            header.extend(reply.segments.iter().map(String::as_str));
            let rows: Vec<Vec<String>> = (0..n)
                .map(|i| {
                    let mut row = vec![reply.segments[i].clone()];
                    row.extend((0..n).map(|j| cell(i, j).to_string()));
                    row
                })
                .collect();
            output::table(&header, &rows);
            say!("in all {n}: {}", reply.all);
        }
    }
    Ok(())
}
