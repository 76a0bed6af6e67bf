//! Persistent state in sled: shard checkpoints, retained events, the change log.
//!
//! Each shard is one sled tree, `s<shard>`, so a shard's data can be exported,
//! imported and dropped as a unit, and a checkpoint is one atomic sled batch.
//! Keys start with a byte naming what they hold:
//!
//! | key | value |
//! |---|---|
//! | `m` name | [`ShardMeta`] field (u64 LE) |
//! | `p` page (u32 BE) | a [page](page) of users: id → [`UserRecord`] |
//! | `e` day (u32 BE), first batch sequence (u64 BE) | a [block](block) of retained batches: their write-ahead log records (protobuf) |
//! | `l` day (u32 BE), first batch sequence (u64 BE) | retained batches left in the write-ahead log: per batch, its sequence, log segment and offset (u64 LE each) |
//! | `c` first change sequence (u64 BE) | a [block](block) of changes with their cursors (protobuf) |
//!
//! Users, events and changes are grouped (pages, blocks) because sled's cost is
//! per write: one write per user made checkpoints at a million users take
//! seconds. After a checkpoint, [`Store::sync`] makes sled's files durable with
//! `fdatasync` (sled's own flush is not an fsync); only then may the write-ahead
//! log before the checkpoint be deleted.
//!
//! A batch of events is retained (for backfill and shard export) as its
//! write-ahead log record. A batch this node logged stays where the log wrote
//! it, and the checkpoint stores only its position (`l`): the bytes are
//! written once, by the log, rather than again through sled, which rewrites
//! each value about three times as its leaves fill and split (measured: half of
//! a checkpoint's bytes went to retained events). The log keeps a segment while
//! any stored shard's positions point into it ([`ShardStore::first_logged`]).
//! Batches that never went through this node's log (a shard's copy received
//! in a move) are stored as blocks (`e`); so are logged ones in an export,
//! which carries the records themselves.

mod block;
pub use block::ChangeRecords;
mod page;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use dynseg_proto::encoded::ChangeView;
use dynseg_proto::pb;
use dynseg_rules::{SegmentDef, StateDecodeError, UserState};
use prost::Message;

use crate::record::WalRecord;
use crate::wal::{LogReader, Lsn, WalError};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    /// A file could not be synced.
    #[error("storage sync of {path}: {source}")]
    Sync {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A retained batch could not be read back from the write-ahead log.
    #[error("retained events: {0}")]
    Log(#[from] WalError),
    /// Stored bytes do not decode: corruption or a format from another version.
    #[error("stored {what} is invalid: {reason}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// Why it does not decode.
        reason: String,
    },
}

impl From<StateDecodeError> for StoreError {
    fn from(e: StateDecodeError) -> Self {
        StoreError::Corrupt {
            what: "user state",
            reason: e.to_string(),
        }
    }
}

impl StoreError {
    /// A stored change that does not read as one.
    pub(crate) fn corrupt_change(e: dynseg_proto::ConvertError) -> StoreError {
        StoreError::Corrupt {
            what: "change",
            reason: e.0,
        }
    }
}

impl From<prost::DecodeError> for StoreError {
    fn from(e: prost::DecodeError) -> Self {
        StoreError::Corrupt {
            what: "record",
            reason: e.to_string(),
        }
    }
}

/// One user as stored: the engine state and the recent message ids (for
/// dedupe), each a 96-bit hash of the id with the day it first arrived.
#[derive(Clone, Debug, PartialEq)]
pub struct UserRecord {
    /// The engine's state.
    pub state: UserState,
    /// `hash << 32 | day`, see `shard::Seen`.
    pub seen: Vec<u128>,
}

impl UserRecord {
    /// Bytes: `[state length: u32 LE][state][seen: u128 LE...]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut state = Vec::with_capacity(64);
        self.state.encode(&mut state);
        UserRecord::encode_parts(&state, self.seen.iter().copied())
    }

    /// [`UserRecord::encode`] from an already encoded state.
    pub fn encode_parts(state: &[u8], seen: impl Iterator<Item = u128>) -> Vec<u8> {
        let ids = seen.size_hint().1.unwrap_or(0);
        let mut out = Vec::with_capacity(4 + state.len() + 16 * ids);
        // A state is a few hundred bytes; u32 is far from its bound.
        out.extend_from_slice(&(state.len() as u32).to_le_bytes());
        out.extend_from_slice(state);
        for s in seen {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out
    }

    /// Restores what [`UserRecord::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<UserRecord, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            what: "user record",
            reason: reason.into(),
        };
        let (len, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or_else(|| corrupt("truncated"))?;
        let len = u32::from_le_bytes(*len) as usize;
        let state_bytes = rest.get(..len).ok_or_else(|| corrupt("truncated state"))?;
        let seen_bytes = &rest[len..];
        if seen_bytes.len() % 16 != 0 {
            return Err(corrupt("truncated message ids"));
        }
        let seen = seen_bytes
            .chunks_exact(16)
            .map(|c| {
                let mut w = [0u8; 16];
                w.copy_from_slice(c);
                u128::from_le_bytes(w)
            })
            .collect();
        Ok(UserRecord {
            state: UserState::decode(state_bytes)?,
            seen,
        })
    }
}

/// A shard's bookkeeping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardMeta {
    /// Ownership epoch.
    pub epoch: u64,
    /// Replay the write-ahead log from here (the first record not in this
    /// checkpoint).
    pub replay_from: Lsn,
    /// The next change sequence.
    pub next_sequence: u64,
    /// The next retained-batch sequence.
    pub next_event: u64,
    /// Rule-set version the states are under.
    pub rule_version: u64,
}

/// What one checkpoint writes.
#[derive(Debug, Default)]
pub struct Checkpoint {
    /// Users changed since the last checkpoint, encoded.
    pub users: Vec<(Vec<u8>, Vec<u8>)>,
    /// Batches applied since the last checkpoint: (arrival day, sequence, the
    /// batch), in sequence order.
    pub events: Vec<(u32, u64, Retained)>,
    /// Changes published since the last checkpoint, in sequence order.
    pub changes: ChangeRecords,
    /// Bookkeeping as of this checkpoint.
    pub meta: ShardMeta,
    /// Retained events of days before this one are deleted.
    pub expire_events_before_day: u32,
    /// Changes before this time (milliseconds) are deleted, a whole block at a
    /// time: a block goes once its latest change is older.
    pub expire_changes_before_ms: i64,
    /// Identity merges taken out since the last checkpoint: (merge id, what
    /// the repeat of that merge answers).
    pub merged_out: Vec<(String, MergedOut)>,
    /// When set, merges taken out before this time (milliseconds) are deleted
    /// (a scan of all of them: the shard asks once a day).
    pub expire_merged_before_ms: Option<i64>,
}

/// A retained batch of events: its write-ahead log record, or where this
/// node's log holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Retained {
    /// The record's bytes (not, or not yet, durable in this node's log).
    Record(bytes::Bytes),
    /// The record's position in this node's log, where it is durable.
    Logged(Lsn),
}

impl Retained {
    /// The record's bytes, if held.
    fn record(&self) -> Option<&[u8]> {
        match self {
            Retained::Record(bytes) => Some(bytes),
            Retained::Logged(_) => None,
        }
    }

    /// The record's position in the log, if logged.
    fn position(&self) -> Option<Lsn> {
        match self {
            Retained::Logged(at) => Some(*at),
            Retained::Record(_) => None,
        }
    }
}

/// What an identity merge took out of a shard, kept so that a repeat of the
/// merge gets the same answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergedOut {
    /// When (milliseconds).
    pub at_ms: i64,
    /// The profile existed.
    pub found: bool,
    /// Its state, under `rule_version`.
    pub state: Vec<u8>,
    /// The rule-set version the state is encoded under.
    pub rule_version: u64,
}

impl MergedOut {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17 + self.state.len());
        out.push(u8::from(self.found));
        out.extend_from_slice(&self.at_ms.to_le_bytes());
        out.extend_from_slice(&self.rule_version.to_le_bytes());
        out.extend_from_slice(&self.state);
        out
    }

    fn decode(bytes: &[u8]) -> Result<MergedOut, StoreError> {
        let (head, state) = bytes
            .split_at_checked(17)
            .ok_or_else(|| corrupt("merged-out record", format!("{} bytes", bytes.len())))?;
        let word = |range: std::ops::Range<usize>| {
            <[u8; 8]>::try_from(&head[range]).map_err(|_| corrupt("merged-out record", "short"))
        };
        Ok(MergedOut {
            found: head[0] != 0,
            at_ms: i64::from_le_bytes(word(1..9)?),
            rule_version: u64::from_le_bytes(word(9..17)?),
            state: state.to_vec(),
        })
    }
}

impl Checkpoint {
    /// The last change sequence this checkpoint stores, if any.
    pub fn last_change(&self) -> Option<u64> {
        self.changes.last_sequence()
    }
}

/// The node's sled database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    path: PathBuf,
    /// The write-ahead log's directory, where logged retained batches are read.
    log_dir: Arc<Path>,
}

/// How long [`Store::open`] waits for another holder's lock.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// sled's error for a directory locked by another open store (sled 0.34 has
/// no kind of its own for it: an `Other` I/O error with this message).
fn is_lock_conflict(error: &sled::Error) -> bool {
    matches!(error, sled::Error::Io(e)
        if e.kind() == std::io::ErrorKind::Other
            && e.to_string().starts_with("could not acquire lock"))
}

impl Store {
    /// Opens (creating) the store at `path`, with sled's page cache bounded by
    /// `cache_bytes`; retained batches left in the log are read from the
    /// write-ahead log in `log_dir`.
    ///
    /// A store another holder has locked is waited for, up to
    /// [`LOCK_WAIT`]: a store closed a moment ago in this process (a node
    /// restarted in place) keeps its lock until sled's background threads
    /// let go. Held longer (another process on the same directory), it is an
    /// error.
    pub fn open(path: &Path, cache_bytes: u64, log_dir: &Path) -> Result<Store, StoreError> {
        let config = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(cache_bytes)
            // Log items over a quarter of a segment become blob files, one
            // file per write: 8 MiB segments keep a leaf of 16 pages or blocks
            // in the log.
            .segment_size(8 << 20);
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(e) if is_lock_conflict(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(Store {
            db,
            path: path.to_owned(),
            log_dir: log_dir.into(),
        })
    }

    /// The tree of shard `shard`.
    pub fn shard(&self, shard: u32) -> Result<ShardStore, StoreError> {
        Ok(ShardStore {
            tree: self.db.open_tree(format!("s{shard}"))?,
            log_dir: self.log_dir.clone(),
        })
    }

    /// The shards that have data here.
    pub fn stored_shards(&self) -> Vec<u32> {
        let mut shards: Vec<u32> = self
            .db
            .tree_names()
            .iter()
            .filter_map(|name| {
                let name = std::str::from_utf8(name).ok()?;
                name.strip_prefix('s')?.parse().ok()
            })
            .collect();
        shards.sort_unstable();
        shards
    }

    /// The rule set the node last applied: (version, segments).
    pub fn rules(&self) -> Result<Option<(u64, Vec<SegmentDef>)>, StoreError> {
        let Some(bytes) = self.db.get("rules")? else {
            return Ok(None);
        };
        let request = pb::ApplyRulesRequest::decode(&*bytes)?;
        let defs = request
            .segments
            .into_iter()
            .map(SegmentDef::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt {
                what: "rule set",
                reason: e.0,
            })?;
        Ok(Some((request.version, defs)))
    }

    /// Records the rule set as the current one, and under its version (a shard
    /// restarting from an older checkpoint needs the version it was under).
    /// Durable at the next [`Store::sync`].
    pub fn set_rules(&self, version: u64, defs: &[SegmentDef]) -> Result<(), StoreError> {
        let request = pb::ApplyRulesRequest {
            version,
            segments: defs.iter().map(pb::SegmentDef::from).collect(),
        };
        let bytes = request.encode_to_vec();
        self.db
            .insert(format!("rules/{version:020}"), bytes.clone())?;
        self.db.insert("rules", bytes)?;
        Ok(())
    }

    /// Records the rule set of `version` (not as the current one): a shard
    /// moved here may be under a version this node never applied.
    pub fn put_rules_version(&self, version: u64, defs: &[SegmentDef]) -> Result<(), StoreError> {
        let request = pb::ApplyRulesRequest {
            version,
            segments: defs.iter().map(pb::SegmentDef::from).collect(),
        };
        self.db
            .insert(format!("rules/{version:020}"), request.encode_to_vec())?;
        Ok(())
    }

    /// Deletes everything of shard `shard` (after it moved away, or an
    /// incomplete copy).
    pub fn drop_shard(&self, shard: u32) -> Result<(), StoreError> {
        self.db.drop_tree(format!("s{shard}"))?;
        Ok(())
    }

    /// The rule set of `version`, if it was ever applied here.
    pub fn rules_version(&self, version: u64) -> Result<Option<Vec<SegmentDef>>, StoreError> {
        let Some(bytes) = self.db.get(format!("rules/{version:020}"))? else {
            return Ok(None);
        };
        let request = pb::ApplyRulesRequest::decode(&*bytes)?;
        let defs = request
            .segments
            .into_iter()
            .map(SegmentDef::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt {
                what: "rule set",
                reason: e.0,
            })?;
        Ok(Some(defs))
    }

    /// The webhooks last configured (segments with only their ids and
    /// webhooks), so deliveries resume after a restart before the control plane
    /// is reached.
    pub fn webhooks(&self) -> Result<Vec<pb::SegmentDef>, StoreError> {
        match self.db.get("webhooks")? {
            None => Ok(Vec::new()),
            Some(bytes) => Ok(pb::ApplyRulesRequest::decode(bytes.as_ref())?.segments),
        }
    }

    /// Records the webhooks configured.
    pub fn set_webhooks(&self, segments: &[pb::SegmentDef]) -> Result<(), StoreError> {
        let request = pb::ApplyRulesRequest {
            version: 0,
            segments: segments.to_vec(),
        };
        self.db.insert("webhooks", request.encode_to_vec())?;
        Ok(())
    }

    /// The manual clock's last recorded time (milliseconds).
    pub fn clock(&self) -> Result<Option<i64>, StoreError> {
        Ok(self
            .db
            .get("clock")?
            .and_then(|b| b.as_ref().try_into().ok().map(i64::from_le_bytes)))
    }

    /// Records the manual clock's time (durable at the next sync).
    pub fn set_clock(&self, ms: i64) -> Result<(), StoreError> {
        self.db.insert("clock", &ms.to_le_bytes())?;
        Ok(())
    }

    /// Makes everything written so far durable: sled's flush, then `fdatasync` on
    /// each of its files and directories.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        sync_tree(&self.path)
    }
}

fn sync_tree(path: &Path) -> Result<(), StoreError> {
    let failed = |source| StoreError::Sync {
        path: path.to_owned(),
        source,
    };
    // sled deletes files as it compacts; one gone since it was listed needs
    // no sync.
    let meta = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other.map_err(failed)?,
    };
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(failed)? {
            sync_tree(&entry.map_err(failed)?.path())?;
        }
        sync_file(path, File::sync_all).map_err(failed)
    } else {
        sync_file(path, File::sync_data).map_err(failed)
    }
}

fn sync_file(path: &Path, sync: fn(&File) -> std::io::Result<()>) -> std::io::Result<()> {
    match File::open(path) {
        Ok(file) => sync(&file),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A stored key and its value.
type KeyValue = (Vec<u8>, Vec<u8>);

/// One shard's tree.
#[derive(Clone)]
pub struct ShardStore {
    tree: sled::Tree,
    log_dir: Arc<Path>,
}

const META: u8 = b'm';
const PAGE: u8 = b'p';
const EVENTS: u8 = b'e';
const LOGGED: u8 = b'l';
const CHANGES: u8 = b'c';
const MERGED: u8 = b'x';

fn merged_key(merge_id: &str) -> Vec<u8> {
    let mut key = vec![MERGED];
    key.extend_from_slice(merge_id.as_bytes());
    key
}

fn meta_key(name: &str) -> Vec<u8> {
    let mut key = vec![META];
    key.extend_from_slice(name.as_bytes());
    key
}

/// Meta entries that record a move as this node sees it: whether its copy is
/// incomplete (`incoming`), awaits a commit (`pending`), or is fenced
/// (`fenced`). They never travel with the shard. A source's values loaded over
/// a destination's would mark an incomplete copy complete, and a restart would
/// then serve it at the source's epoch while the source still owned it.
const MOVE_MARKS: [&str; 3] = ["incoming", "pending", "fenced"];

fn is_move_mark(key: &[u8]) -> bool {
    key.split_first().is_some_and(|(&kind, name)| {
        kind == META && MOVE_MARKS.iter().any(|mark| mark.as_bytes() == name)
    })
}

fn page_key(page: u32) -> [u8; 5] {
    let mut key = [PAGE; 5];
    key[1..].copy_from_slice(&page.to_be_bytes());
    key
}

fn events_key(day: u32, first: u64) -> [u8; 13] {
    retained_key(EVENTS, day, first)
}

fn logged_key(day: u32, first: u64) -> [u8; 13] {
    retained_key(LOGGED, day, first)
}

fn retained_key(kind: u8, day: u32, first: u64) -> [u8; 13] {
    let mut key = [kind; 13];
    key[1..5].copy_from_slice(&day.to_be_bytes());
    key[5..].copy_from_slice(&first.to_be_bytes());
    key
}

fn changes_key(first: u64) -> [u8; 9] {
    let mut key = [CHANGES; 9];
    key[1..].copy_from_slice(&first.to_be_bytes());
    key
}

fn corrupt(what: &'static str, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        what,
        reason: reason.into(),
    }
}

/// Most batches in one `l` value (24 bytes each).
const LOGGED_PER_VALUE: usize = 4096;

/// An `l` value: per batch, its sequence and its position in the log.
fn encode_logged<'a>(batches: impl Iterator<Item = &'a (u64, Lsn)>) -> Vec<u8> {
    let mut value = Vec::new();
    for (sequence, at) in batches {
        value.extend_from_slice(&sequence.to_le_bytes());
        value.extend_from_slice(&at.segment.to_le_bytes());
        value.extend_from_slice(&at.offset.to_le_bytes());
    }
    value
}

fn decode_logged(value: &[u8]) -> Result<Vec<(u64, Lsn)>, StoreError> {
    if !value.len().is_multiple_of(24) {
        return Err(corrupt(
            "retained batch positions",
            format!("{} bytes", value.len()),
        ));
    }
    Ok(value
        .chunks_exact(24)
        .map(|c| {
            let word = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&c[8 * i..8 * i + 8]);
                u64::from_le_bytes(w)
            };
            let at = Lsn {
                segment: word(1),
                offset: word(2),
            };
            (word(0), at)
        })
        .collect())
}

/// The arrival day in a retained-batch key.
fn key_day(key: &[u8]) -> Result<u32, StoreError> {
    key.get(1..5)
        .and_then(|d| <[u8; 4]>::try_from(d).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| corrupt("retained batch key", format!("{} bytes", key.len())))
}

/// The change sequence a change block key starts at.
fn block_first(key: &[u8]) -> Result<u64, StoreError> {
    key.get(1..)
        .and_then(|k| <[u8; 8]>::try_from(k).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt("change block key", format!("{} bytes", key.len())))
}

impl ShardStore {
    fn read_u64(&self, name: &str) -> Result<u64, StoreError> {
        match self.tree.get(meta_key(name))? {
            None => Ok(0),
            Some(bytes) => {
                let bytes: [u8; 8] = bytes.as_ref().try_into().map_err(|_| {
                    corrupt(
                        "shard meta",
                        format!("{name} is {} bytes, not 8", bytes.len()),
                    )
                })?;
                Ok(u64::from_le_bytes(bytes))
            }
        }
    }

    /// Overwrites every page of users' records with bytes that do not
    /// decode, as a damaged disk might (tests of what reading them does).
    #[cfg(test)]
    pub(crate) fn damage_pages(&self) -> Result<(), StoreError> {
        for item in self.tree.scan_prefix([PAGE]) {
            let (key, _) = item?;
            self.tree.insert(key, &b"\xff damaged"[..])?;
        }
        Ok(())
    }

    /// The shard's bookkeeping (zeroes for a new shard).
    pub fn meta(&self) -> Result<ShardMeta, StoreError> {
        Ok(ShardMeta {
            epoch: self.read_u64("epoch")?,
            replay_from: Lsn {
                segment: self.read_u64("replay_segment")?,
                offset: self.read_u64("replay_offset")?,
            },
            next_sequence: self.read_u64("next_sequence")?,
            next_event: self.read_u64("next_event")?,
            rule_version: self.read_u64("rule_version")?,
        })
    }

    /// The move attempt this shard is fenced for (0: none). A fence outlives a
    /// crash: the destination may commit the move after it.
    pub fn fenced(&self) -> Result<u64, StoreError> {
        self.read_u64("fenced")
    }

    /// Sets or (with 0) clears the fence, durable at the next sync.
    pub fn set_fenced(&self, attempt: u64) -> Result<(), StoreError> {
        self.tree
            .insert(meta_key("fenced"), &attempt.to_le_bytes())?;
        Ok(())
    }

    /// The last change sequence webhook `endpoint` acknowledged on this
    /// shard, if it ever started here (kept with the shard, so it moves with it).
    pub fn webhook_cursor(&self, endpoint: &str) -> Result<Option<u64>, StoreError> {
        let key = meta_key(&format!("webhook/{endpoint}"));
        match self.tree.get(key)? {
            None => Ok(None),
            Some(bytes) => {
                let bytes: [u8; 8] = bytes.as_ref().try_into().map_err(|_| {
                    corrupt("webhook cursor", format!("{} bytes, not 8", bytes.len()))
                })?;
                Ok(Some(u64::from_le_bytes(bytes)))
            }
        }
    }

    /// Records webhook `endpoint`'s cursor (durable with the store's next sync:
    /// a crash before it redelivers, never skips).
    pub fn set_webhook_cursor(&self, endpoint: &str, sequence: u64) -> Result<(), StoreError> {
        let key = meta_key(&format!("webhook/{endpoint}"));
        self.tree.insert(key, &sequence.to_le_bytes())?;
        Ok(())
    }

    /// The move attempt this complete copy awaits the commit of (0: none).
    pub fn pending(&self) -> Result<u64, StoreError> {
        self.read_u64("pending")
    }

    /// Sets or (with 0) clears the pending attempt, durable at the next sync.
    pub fn set_pending(&self, attempt: u64) -> Result<(), StoreError> {
        self.tree
            .insert(meta_key("pending"), &attempt.to_le_bytes())?;
        Ok(())
    }

    /// Whether this is an incomplete copy of a shard moving here.
    pub fn incoming(&self) -> Result<bool, StoreError> {
        Ok(self.read_u64("incoming")? != 0)
    }

    /// Marks the shard as an incomplete copy, or (false) as complete.
    pub fn set_incoming(&self, incoming: bool) -> Result<(), StoreError> {
        self.tree
            .insert(meta_key("incoming"), &u64::from(incoming).to_le_bytes())?;
        Ok(())
    }

    /// Sets the epoch alone (assignment), durable at the next sync.
    pub fn set_epoch(&self, epoch: u64) -> Result<(), StoreError> {
        self.tree.insert(meta_key("epoch"), &epoch.to_le_bytes())?;
        Ok(())
    }

    /// What identity merge `merge_id` took out of this shard, if it ran here.
    pub fn merged_out(&self, merge_id: &str) -> Result<Option<MergedOut>, StoreError> {
        self.tree
            .get(merged_key(merge_id))?
            .map(|bytes| MergedOut::decode(&bytes))
            .transpose()
    }

    /// A stored user.
    pub fn load_user(&self, user: &str) -> Result<Option<UserRecord>, StoreError> {
        let key = page_key(page::page_of(user.as_bytes(), page::PAGES_PER_SHARD));
        let Some(bytes) = self.tree.get(key)? else {
            return Ok(None);
        };
        page::find(&bytes, user.as_bytes())?
            .map(UserRecord::decode)
            .transpose()
    }

    /// Calls `visit` with every stored user (page by page, in no useful order).
    pub fn visit_users(
        &self,
        mut visit: impl FnMut(&str, UserRecord) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        for entry in self.tree.scan_prefix([PAGE]) {
            let (_, bytes) = entry?;
            for user in page::entries(&bytes) {
                let (id, record) = user?;
                let id = std::str::from_utf8(id).map_err(|_| corrupt("user id", "not UTF-8"))?;
                visit(id, UserRecord::decode(record)?)?;
            }
        }
        Ok(())
    }

    /// Number of stored users.
    pub fn user_count(&self) -> Result<u64, StoreError> {
        let mut count = 0;
        for entry in self.tree.scan_prefix([PAGE]) {
            let (_, bytes) = entry?;
            for user in page::entries(&bytes) {
                user?;
                count += 1;
            }
        }
        Ok(count)
    }

    /// Writes a checkpoint as one atomic batch. Checkpoints of a shard must be
    /// written one at a time, in the order they were taken: each page is read,
    /// merged and rewritten.
    pub fn write_checkpoint(&self, cp: &Checkpoint) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();

        let mut pages: BTreeMap<u32, Vec<page::Update<'_>>> = BTreeMap::new();
        for (id, record) in &cp.users {
            pages
                .entry(page::page_of(id, page::PAGES_PER_SHARD))
                .or_default()
                .push((id, record));
        }
        for (number, mut updates) in pages {
            updates.sort_unstable_by(|a, b| a.0.cmp(b.0));
            updates.dedup_by(|later, earlier| later.0 == earlier.0);
            let key = page_key(number);
            let stored = self.tree.get(key)?;
            batch.insert(&key[..], page::merge(stored.as_deref(), &updates)?);
        }

        // Runs of one day, all logged or all held as records.
        let same_run = |a: &(u32, u64, Retained), b: &(u32, u64, Retained)| {
            a.0 == b.0 && a.2.position().is_some() == b.2.position().is_some()
        };
        for run in cp.events.chunk_by(same_run) {
            let day = run[0].0;
            let logged: Vec<(u64, Lsn)> = run
                .iter()
                .filter_map(|(_, sequence, r)| Some((*sequence, r.position()?)))
                .collect();
            if logged.is_empty() {
                let size = |(_, _, r): &(u32, u64, Retained)| r.record().map_or(0, <[u8]>::len);
                for blocked in block::split(run, size) {
                    let records = blocked.iter().filter_map(|(_, _, r)| r.record());
                    let key = events_key(day, blocked[0].1);
                    batch.insert(&key[..], block::encode(0, records));
                }
            } else {
                for chunk in logged.chunks(LOGGED_PER_VALUE) {
                    let key = logged_key(day, chunk[0].0);
                    batch.insert(&key[..], encode_logged(chunk.iter()));
                }
            }
        }
        let expire = cp.expire_events_before_day;
        for range in [
            events_key(0, 0)..events_key(expire, 0),
            logged_key(0, 0)..logged_key(expire, 0),
        ] {
            for entry in self.tree.range(range) {
                batch.remove(entry?.0);
            }
        }

        for (first, block) in cp.changes.blocks() {
            batch.insert(&changes_key(first)[..], block);
        }
        for entry in self.tree.scan_prefix([CHANGES]) {
            let (key, bytes) = entry?;
            if block::header(&bytes)? >= cp.expire_changes_before_ms {
                break;
            }
            batch.remove(key);
        }

        for (merge_id, merged) in &cp.merged_out {
            batch.insert(merged_key(merge_id), merged.encode());
        }
        if let Some(before) = cp.expire_merged_before_ms {
            for entry in self.tree.scan_prefix([MERGED]) {
                let (key, bytes) = entry?;
                if MergedOut::decode(&bytes).is_ok_and(|m| m.at_ms < before) {
                    batch.remove(key);
                }
            }
        }

        let m = &cp.meta;
        for (name, value) in [
            ("epoch", m.epoch),
            ("replay_segment", m.replay_from.segment),
            ("replay_offset", m.replay_from.offset),
            ("next_sequence", m.next_sequence),
            ("next_event", m.next_event),
            ("rule_version", m.rule_version),
        ] {
            batch.insert(meta_key(name), &value.to_le_bytes());
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Stored changes with sequence > `after`, in order, each with its
    /// sequence and still encoded (a slice of its block, not a copy): whole
    /// blocks, until `limit` is reached or passed (the block that reaches it
    /// is finished, so that reading on reads no block twice).
    pub fn changes_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Bytes)>, StoreError> {
        let wanted = after.saturating_add(1);
        // The block holding `wanted` starts at or before it.
        let start = match self
            .tree
            .range(changes_key(0)..=changes_key(wanted))
            .next_back()
        {
            Some(entry) => entry?.0,
            None => changes_key(0).as_slice().into(),
        };
        let mut out = Vec::new();
        for entry in self
            .tree
            .range(start..=sled::IVec::from(&changes_key(u64::MAX)[..]))
        {
            let (_, block) = entry?;
            // sled's value is reference counted: the changes share it.
            let block = Bytes::from_owner(block);
            for record in block::records(&block) {
                let record = record?;
                let sequence = ChangeView::parse(record)
                    .map_err(StoreError::corrupt_change)?
                    .sequence;
                if sequence >= wanted {
                    out.push((sequence, block.slice_ref(record)));
                }
            }
            if out.len() >= limit {
                return Ok(out);
            }
        }
        Ok(out)
    }

    /// Visits the stored changes with `at_ms >= since_ms` and a sequence
    /// below `before`, in sequence order. Blocks whose latest change is older
    /// than `since_ms` are skipped without being decoded.
    pub fn visit_changes_since(
        &self,
        since_ms: i64,
        before: u64,
        mut visit: impl FnMut(&pb::MembershipChange),
    ) -> Result<(), StoreError> {
        for entry in self.tree.range(changes_key(0)..changes_key(before)) {
            let (_, bytes) = entry?;
            if block::header(&bytes)? < since_ms {
                continue;
            }
            for record in block::records(&bytes) {
                let change = pb::MembershipChange::decode(record?)?;
                let sequence = change.cursor.as_ref().map_or(0, |c| c.sequence);
                if change.at_ms >= since_ms && sequence < before {
                    visit(&change);
                }
            }
        }
        Ok(())
    }

    /// The first stored change sequence (what a subscriber without a cursor
    /// starts from), if any.
    pub fn first_change(&self) -> Result<Option<u64>, StoreError> {
        match self.tree.scan_prefix([CHANGES]).next() {
            Some(entry) => Ok(Some(block_first(&entry?.0)?)),
            None => Ok(None),
        }
    }

    /// Retained batches of events (their write-ahead log records), in arrival
    /// order, from `since_day` on: stored blocks and batches left in the log,
    /// merged by (day, batch sequence).
    pub fn retained_since(&self, since_day: u32) -> Result<Vec<WalRecord>, StoreError> {
        let mut runs = Vec::new();
        for kind in [EVENTS, LOGGED] {
            let range = retained_key(kind, since_day, 0)..=retained_key(kind, u32::MAX, u64::MAX);
            for entry in self.tree.range(range) {
                let (key, value) = entry?;
                runs.push((key.get(1..).map(<[u8]>::to_vec), kind, value));
            }
        }
        runs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut reader = LogReader::new(&self.log_dir);
        let mut out = Vec::new();
        for (_, kind, value) in runs {
            if kind == LOGGED {
                for (_, at) in decode_logged(&value)? {
                    out.push(WalRecord::from_slice(reader.read(at)?)?);
                }
            } else {
                for record in block::records(&value) {
                    out.push(WalRecord::from_slice(record?)?);
                }
            }
        }
        Ok(out)
    }

    /// The arrival day of the newest retained batch left in the log.
    pub fn last_retained_day(&self) -> Result<Option<u32>, StoreError> {
        match self.tree.scan_prefix([LOGGED]).next_back() {
            Some(entry) => Ok(Some(key_day(&entry?.0)?)),
            None => Ok(None),
        }
    }

    /// Where this shard reads retained batches left in the log.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// The oldest position of a retained batch left in the log: the log must
    /// keep that segment and the later ones. (A shard's batches are logged in
    /// sequence order and their days never go back, so it is the first `l`
    /// entry's first position.)
    pub fn first_logged(&self) -> Result<Option<Lsn>, StoreError> {
        match self.tree.scan_prefix([LOGGED]).next() {
            Some(entry) => Ok(decode_logged(&entry?.1)?.first().map(|(_, at)| *at)),
            None => Ok(None),
        }
    }

    /// Removes everything of this shard.
    pub fn clear(&self) -> Result<(), StoreError> {
        self.tree.clear()?;
        Ok(())
    }

    /// Every (key, value) of the shard, for export. Batches left in this
    /// node's log travel as blocks of their records (`e`, at most
    /// [`block::BLOCK_BYTES`] each, keyed by day and first sequence):
    /// positions would mean nothing to another node. The move marks
    /// ([`MOVE_MARKS`]) stay here.
    pub fn dump(&self) -> impl Iterator<Item = Result<KeyValue, StoreError>> + '_ {
        let mut reader = LogReader::new(&self.log_dir);
        self.tree.iter().flat_map(move |entry| {
            let entries = match entry {
                Ok((k, v)) if k.first() == Some(&LOGGED) => {
                    self.logged_as_blocks(&mut reader, &k, &v)
                }
                Ok((k, _)) if is_move_mark(&k) => Ok(Vec::new()),
                Ok((k, v)) => Ok(vec![(k.to_vec(), v.to_vec())]),
                Err(e) => Err(e.into()),
            };
            match entries {
                Ok(entries) => entries.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            }
        })
    }

    /// An `l` entry as `e` entries holding the records it points to.
    fn logged_as_blocks(
        &self,
        reader: &mut LogReader,
        key: &[u8],
        value: &[u8],
    ) -> Result<Vec<KeyValue>, StoreError> {
        let day = key_day(key)?;
        let mut records = Vec::new();
        for (sequence, at) in decode_logged(value)? {
            records.push((sequence, reader.read(at)?.to_vec()));
        }
        Ok(block::split(&records, |(_, record)| record.len())
            .into_iter()
            .map(|run| {
                let block = block::encode(0, run.iter().map(|(_, r)| r.as_slice()));
                (events_key(day, run[0].0).to_vec(), block)
            })
            .collect())
    }

    /// Writes one exported (key, value). Move marks ([`MOVE_MARKS`]) are
    /// skipped, should an exporting node send them: this node's own stay.
    pub fn load(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if !matches!(
            key.first(),
            Some(&(META | PAGE | EVENTS | CHANGES | MERGED))
        ) {
            return Err(corrupt("shard export", "a key of unknown kind"));
        }
        if is_move_mark(key) {
            return Ok(());
        }
        self.tree.insert(key, value)?;
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn record(seen: u128) -> UserRecord {
        UserRecord {
            state: dynseg_rules::Plan::compile(
                &[],
                dynseg_rules::RuleVersion(1),
                &Default::default(),
            )
            .unwrap()
            .new_state(),
            seen: vec![seen, u128::MAX],
        }
    }

    fn change(sequence: u64, at_ms: i64) -> pb::MembershipChange {
        pb::MembershipChange {
            user_id: format!("user-{sequence}"),
            segment: "vip".into(),
            at_ms,
            cursor: Some(pb::Cursor {
                shard: 7,
                epoch: 3,
                sequence,
            }),
            ..Default::default()
        }
    }

    fn event(id: &str) -> WalRecord {
        let event = pb::Event {
            message_id: id.into(),
            user_id: "alice".into(),
            ..Default::default()
        };
        WalRecord {
            shard: 7,
            now_ms: 1,
            input: Some(crate::record::Input::Batch(
                dynseg_proto::encoded::EventBatch {
                    shard: 7,
                    epoch: 3,
                    events: vec![dynseg_proto::encoded::encode(&event)],
                },
            )),
        }
    }

    /// Stored changes decoded, each checked to carry the sequence it was
    /// read with.
    fn typed(stored: Vec<(u64, Bytes)>) -> Vec<pb::MembershipChange> {
        stored
            .into_iter()
            .map(|(sequence, bytes)| {
                let change = pb::MembershipChange::decode(bytes).unwrap();
                assert_eq!(change.cursor.unwrap().sequence, sequence);
                change
            })
            .collect()
    }

    fn held(changes: &[pb::MembershipChange]) -> ChangeRecords {
        let mut held = ChangeRecords::default();
        for c in changes {
            held.push(c.cursor.unwrap().sequence, c.at_ms, c);
        }
        held
    }

    fn checkpoint(
        users: &[(&str, &UserRecord)],
        events: &[(u32, u64, &WalRecord)],
        changes: &[pb::MembershipChange],
        meta: ShardMeta,
    ) -> Checkpoint {
        Checkpoint {
            users: users
                .iter()
                .map(|(id, r)| (id.as_bytes().to_vec(), r.encode()))
                .collect(),
            events: events
                .iter()
                .map(|(day, seq, e)| (*day, *seq, Retained::Record(e.encode_to_vec().into())))
                .collect(),
            changes: held(changes),
            meta,
            expire_events_before_day: 0,
            expire_changes_before_ms: i64::MIN,
            ..Default::default()
        }
    }

    #[test]
    fn a_store_still_locked_by_its_closing_holder_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path(), 1 << 20, &dir.path().join("wal")).unwrap();
        first.shard(0).unwrap();
        // Closed a moment later, on another thread, while the second open
        // is already waiting for the lock.
        let closing = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(first);
        });
        let second = Store::open(dir.path(), 1 << 20, &dir.path().join("wal"));
        closing.join().unwrap();
        assert!(second.is_ok(), "{:?}", second.err());
    }

    #[test]
    fn retained_batches_left_in_the_log_are_read_back_exported_and_expired() {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = dir.path().join("wal");
        let (mut wal, _) = crate::wal::Wal::open(&log_dir, 64).unwrap();
        let events: Vec<WalRecord> = (1..=4).map(|i| event(&format!("m{i}"))).collect();
        let at: Vec<Lsn> = events
            .iter()
            .map(|e| wal.append(&e.encode_to_vec()).unwrap())
            .collect();
        wal.sync().unwrap();
        assert!(at[3].segment > at[0].segment, "the batches span segments");

        let store = Store::open(&dir.path().join("store"), 1 << 20, &log_dir).unwrap();
        let shard = store.shard(1).unwrap();
        let mut cp = checkpoint(&[], &[], &[], ShardMeta::default());
        cp.events = vec![
            (20_000, 0, Retained::Logged(at[0])),
            // One that never went through this node's log (a moved copy).
            (
                20_000,
                1,
                Retained::Record(events[1].encode_to_vec().into()),
            ),
            (20_001, 2, Retained::Logged(at[2])),
            (20_001, 3, Retained::Logged(at[3])),
        ];
        shard.write_checkpoint(&cp).unwrap();
        assert_eq!(shard.retained_since(0).unwrap(), events);
        assert_eq!(shard.retained_since(20_001).unwrap(), events[2..]);
        assert_eq!(shard.first_logged().unwrap(), Some(at[0]));
        assert_eq!(shard.last_retained_day().unwrap(), Some(20_001));

        // An export carries the records, not positions in this node's log.
        let dumped: Vec<_> = shard.dump().map(Result::unwrap).collect();
        assert!(dumped.iter().all(|(k, _)| k[0] != LOGGED));
        let elsewhere = tempfile::tempdir().unwrap();
        let other = Store::open(elsewhere.path(), 1 << 20, &elsewhere.path().join("wal")).unwrap();
        let copy = other.shard(1).unwrap();
        for (key, value) in &dumped {
            copy.load(key, value).unwrap();
        }
        assert_eq!(copy.retained_since(0).unwrap(), events);
        assert_eq!(copy.first_logged().unwrap(), None);
        assert!(
            copy.load(&logged_key(1, 1), &encode_logged([(1, at[0])].iter()))
                .is_err()
        );

        // Expiry drops positions by day, and the log may go up to the oldest left.
        let mut expire = checkpoint(&[], &[], &[], ShardMeta::default());
        expire.expire_events_before_day = 20_001;
        shard.write_checkpoint(&expire).unwrap();
        assert_eq!(shard.retained_since(0).unwrap(), events[2..]);
        assert_eq!(shard.first_logged().unwrap(), Some(at[2]));

        // A long run of logged batches travels as several blocks of bounded size.
        let long = store.shard(2).unwrap();
        let big: Vec<WalRecord> = (0..40)
            .map(|i| event(&format!("{i}:{}", "x".repeat(4000))))
            .collect();
        let mut cp = checkpoint(&[], &[], &[], ShardMeta::default());
        for (i, e) in big.iter().enumerate() {
            let at = wal.append(&e.encode_to_vec()).unwrap();
            cp.events
                .push((20_002, 10 + i as u64, Retained::Logged(at)));
        }
        wal.sync().unwrap();
        long.write_checkpoint(&cp).unwrap();
        let dumped: Vec<_> = long.dump().map(Result::unwrap).collect();
        assert!(dumped.len() > 2, "{} blocks", dumped.len());
        assert!(
            dumped
                .iter()
                .all(|(_, block)| block.len() <= 8 + block::BLOCK_BYTES)
        );
        let copy = other.shard(2).unwrap();
        for (key, value) in &dumped {
            copy.load(key, value).unwrap();
        }
        assert_eq!(copy.retained_since(0).unwrap(), big);

        // A position the log no longer has is an error, not an empty answer.
        wal.truncate_before(at[3]).unwrap();
        assert!(matches!(shard.retained_since(0), Err(StoreError::Log(_))));
    }

    #[test]
    fn a_copy_keeps_its_own_move_marks_whatever_the_source_had() {
        // The source holds the shard after a move of its own: its marks say
        // complete, committed, not fenced.
        let dir = tempfile::tempdir().unwrap();
        let source = Store::open(dir.path(), 1 << 20, &dir.path().join("wal")).unwrap();
        let shard = source.shard(5).unwrap();
        shard.set_epoch(2).unwrap();
        shard.set_incoming(false).unwrap();
        shard.set_pending(0).unwrap();
        shard.set_fenced(0).unwrap();
        let dumped: Vec<_> = shard.dump().map(Result::unwrap).collect();
        assert!(dumped.iter().all(|(k, _)| !is_move_mark(k)), "{dumped:?}");
        assert!(dumped.iter().any(|(k, _)| *k == meta_key("epoch")));

        // A destination copying it, then one an older node sends marks to.
        let elsewhere = tempfile::tempdir().unwrap();
        let other = Store::open(elsewhere.path(), 1 << 20, &elsewhere.path().join("wal")).unwrap();
        let copy = other.shard(5).unwrap();
        copy.set_incoming(true).unwrap();
        copy.set_pending(9).unwrap();
        copy.set_fenced(3).unwrap();
        for (key, value) in &dumped {
            copy.load(key, value).unwrap();
        }
        for name in MOVE_MARKS {
            copy.load(&meta_key(name), &0u64.to_le_bytes()).unwrap();
        }
        assert!(copy.incoming().unwrap(), "still an incomplete copy");
        assert_eq!(copy.pending().unwrap(), 9);
        assert_eq!(copy.fenced().unwrap(), 3);
        assert_eq!(copy.meta().unwrap().epoch, 2, "the epoch travels");
    }

    #[test]
    fn checkpoints_round_trip_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, &dir.path().join("wal")).unwrap();
        let shard = store.shard(7).unwrap();
        assert_eq!(shard.meta().unwrap(), ShardMeta::default());
        let meta = ShardMeta {
            epoch: 3,
            replay_from: Lsn {
                segment: 2,
                offset: 99,
            },
            next_sequence: 4,
            next_event: 2,
            rule_version: 5,
        };
        let (alice, bob) = (record(1), record(2));
        let (e1, e2) = (event("m1"), event("m2"));
        let first = [change(1, 100), change(2, 100), change(3, 200)];
        shard
            .write_checkpoint(&checkpoint(
                &[("alice", &alice), ("bob", &bob)],
                &[(20_000, 0, &e1), (20_001, 1, &e2)],
                &first,
                meta,
            ))
            .unwrap();
        // A second checkpoint replaces alice, adds many users, and more changes.
        let alice2 = record(3);
        let many: Vec<(String, UserRecord)> =
            (0..500).map(|u| (format!("u{u}"), record(u))).collect();
        let mut users: Vec<(&str, &UserRecord)> =
            many.iter().map(|(id, r)| (id.as_str(), r)).collect();
        users.push(("alice", &alice2));
        let second = [change(4, 300), change(5, 400)];
        let meta2 = ShardMeta {
            next_sequence: 6,
            ..meta
        };
        shard
            .write_checkpoint(&checkpoint(&users, &[], &second, meta2))
            .unwrap();
        store.sync().unwrap();
        drop((shard, store));

        let store = Store::open(dir.path(), 1 << 20, &dir.path().join("wal")).unwrap();
        assert_eq!(store.stored_shards(), vec![7]);
        let shard = store.shard(7).unwrap();
        assert_eq!(shard.meta().unwrap(), meta2);
        assert_eq!(shard.load_user("alice").unwrap(), Some(alice2.clone()));
        assert_eq!(shard.load_user("bob").unwrap(), Some(bob));
        assert_eq!(shard.load_user("u499").unwrap(), Some(record(499)));
        assert_eq!(shard.load_user("carol").unwrap(), None);
        assert_eq!(shard.user_count().unwrap(), 502);
        let mut visited = 0;
        shard
            .visit_users(|id, r| {
                visited += 1;
                if id == "alice" {
                    assert_eq!(r, alice2);
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(visited, 502);

        let all: Vec<_> = first.iter().chain(&second).cloned().collect();
        for after in 0..=5 {
            assert_eq!(
                typed(shard.changes_after(after, 10).unwrap()),
                all[after as usize..],
                "after {after}"
            );
        }
        assert_eq!(typed(shard.changes_after(1, 2).unwrap()), all[1..3]);
        // A limit inside a block finishes the block, and stops there.
        assert_eq!(typed(shard.changes_after(0, 1).unwrap()), first);
        assert_eq!(shard.first_change().unwrap(), Some(1));
        assert_eq!(shard.retained_since(19_000).unwrap(), vec![e1, e2.clone()]);
        assert_eq!(shard.retained_since(20_001).unwrap(), vec![e2.clone()]);

        // Retention: events by day; changes by whole blocks whose last change is
        // older than the cut (the first block ends at 200).
        let mut expire = checkpoint(&[], &[], &[], meta2);
        expire.expire_events_before_day = 20_001;
        expire.expire_changes_before_ms = 250;
        shard.write_checkpoint(&expire).unwrap();
        assert_eq!(shard.retained_since(0).unwrap(), vec![e2]);
        assert_eq!(shard.first_change().unwrap(), Some(4));
        assert_eq!(typed(shard.changes_after(0, 10).unwrap()), second);
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        for bad in [&[][..], &[5, 0, 0, 0, 1][..], &[0, 0, 0, 0, 1][..]] {
            assert!(UserRecord::decode(bad).is_err());
        }
    }
}
