//! Moving a shard between nodes: export its stored data (meta, users, retained
//! events, change log) as chunks, import them elsewhere, and serve it there at a
//! new epoch. The change log travels with the shard, so subscribers' cursors stay
//! valid after the move.
//!
//! Export reads a shard that is not being served (release it first), so the copy
//! is exact; moving a shard that keeps serving during the copy (snapshot, then
//! the log tail) builds on this.

use dynseg_proto::pb;
use prost::Message;

use crate::error::NodeError;
use crate::runtime::Node;

/// Entries per chunk (of a released shard's export).
const CHUNK_ENTRIES: usize = 1024;

/// One stored key/value of a shard.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportEntry {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// The value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// The payload of one chunk.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportEntries {
    /// Entries in this chunk.
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<ExportEntry>,
}

/// Exports a shard this node holds but does not serve.
pub async fn export(node: &Node, shard: u32) -> Result<Vec<pb::ShardChunk>, NodeError> {
    if node.handle(shard).is_ok() {
        return Err(NodeError::Invalid(format!(
            "shard {shard} is being served: release it before exporting it"
        )));
    }
    let store = node.shard_store(shard)?;
    let epoch = store.meta()?.epoch;
    let mut chunks = Vec::new();
    let mut entries = Vec::with_capacity(CHUNK_ENTRIES);
    for item in store.dump() {
        let (key, value) = item?;
        entries.push(ExportEntry { key, value });
        if entries.len() == CHUNK_ENTRIES {
            let data = ExportEntries {
                entries: std::mem::take(&mut entries),
            }
            .encode_to_vec();
            chunks.push(pb::ShardChunk {
                shard,
                epoch,
                data,
                last: false,
            });
        }
    }
    let data = ExportEntries { entries }.encode_to_vec();
    chunks.push(pb::ShardChunk {
        shard,
        epoch,
        data,
        last: true,
    });
    Ok(chunks)
}

/// Imports an exported shard and serves it at the epoch after the exported one.
pub async fn import(
    node: &Node,
    chunks: Vec<pb::ShardChunk>,
) -> Result<pb::ImportShardResponse, NodeError> {
    let Some(first) = chunks.first() else {
        return Err(NodeError::Invalid("no chunks".into()));
    };
    let (shard, epoch) = (first.shard, first.epoch);
    if shard >= node.config().shard_count {
        return Err(NodeError::Invalid(format!(
            "shard {shard} is not below the shard count"
        )));
    }
    if !chunks.last().is_some_and(|c| c.last) {
        return Err(NodeError::Invalid(
            "the export is incomplete: no last chunk".into(),
        ));
    }
    if chunks.iter().any(|c| c.shard != shard) {
        return Err(NodeError::Invalid("chunks of more than one shard".into()));
    }
    if node.handle(shard).is_ok() {
        return Err(NodeError::Invalid(format!(
            "shard {shard} is already served here"
        )));
    }
    let store = node.shard_store(shard)?;
    store.clear()?;
    for chunk in &chunks {
        let entries = ExportEntries::decode(chunk.data.as_slice())
            .map_err(|e| NodeError::Invalid(format!("undecodable chunk: {e}")))?;
        for entry in entries.entries {
            store.load(&entry.key, &entry.value)?;
        }
    }
    let users = store.user_count()?;
    store.set_epoch(epoch)?;
    node.sync_store().await?;
    node.assign_shard(shard, epoch + 1).await?;
    Ok(pb::ImportShardResponse { shard, users })
}
