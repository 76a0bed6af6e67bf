//! Persistent state in sled: shard checkpoints, retained events, the change log.
//!
//! Each shard has four trees, so a shard's data can be exported, imported and
//! dropped as a unit:
//!
//! | tree | key | value |
//! |---|---|---|
//! | `s<shard>/users` | user id | [`UserRecord`]: engine state + recent message ids |
//! | `s<shard>/events` | day (u32 BE) + event sequence (u64 BE) | the event (protobuf) |
//! | `s<shard>/changes` | change sequence (u64 BE) | the change with its cursor (protobuf) |
//! | `s<shard>/meta` | name | [`ShardMeta`] fields |
//!
//! A checkpoint writes all four in one sled transaction, then makes sled's files
//! durable with `fdatasync` (sled's own flush is not an fsync); only then may the
//! write-ahead log before the checkpoint be deleted.

use std::fs::File;
use std::path::{Path, PathBuf};

use dynseg_proto::pb;
use dynseg_rules::{SegmentDef, StateDecodeError, UserState};
use prost::Message;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::wal::Lsn;

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
        let mut out = Vec::with_capacity(4 + state.len() + 16 * self.seen.len());
        out.extend_from_slice(&(state.len() as u32).to_le_bytes());
        out.extend_from_slice(&state);
        for s in &self.seen {
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
    /// The next retained-event sequence.
    pub next_event: u64,
    /// Rule-set version the states are under.
    pub rule_version: u64,
}

/// What one checkpoint writes.
#[derive(Debug, Default)]
pub struct Checkpoint {
    /// Users changed since the last checkpoint, encoded.
    pub users: Vec<(Vec<u8>, Vec<u8>)>,
    /// Events applied since the last checkpoint: (day, sequence, event bytes).
    pub events: Vec<(u32, u64, Vec<u8>)>,
    /// Changes published since the last checkpoint: (sequence, change bytes).
    pub changes: Vec<(u64, Vec<u8>)>,
    /// Bookkeeping as of this checkpoint.
    pub meta: ShardMeta,
}

/// The node's sled database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    path: PathBuf,
}

impl Store {
    /// Opens (creating) the store at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Ok(Store {
            db,
            path: path.to_owned(),
        })
    }

    /// The trees of shard `shard`.
    pub fn shard(&self, shard: u32) -> Result<ShardStore, StoreError> {
        let tree = |name: &str| self.db.open_tree(format!("s{shard}/{name}"));
        Ok(ShardStore {
            users: tree("users")?,
            events: tree("events")?,
            changes: tree("changes")?,
            meta: tree("meta")?,
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
                name.strip_prefix('s')?.strip_suffix("/meta")?.parse().ok()
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
    let meta = std::fs::metadata(path).map_err(failed)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(failed)? {
            sync_tree(&entry.map_err(failed)?.path())?;
        }
        File::open(path).and_then(|d| d.sync_all()).map_err(failed)
    } else {
        File::open(path).and_then(|f| f.sync_data()).map_err(failed)
    }
}

/// One shard's trees.
#[derive(Clone)]
pub struct ShardStore {
    users: sled::Tree,
    events: sled::Tree,
    changes: sled::Tree,
    meta: sled::Tree,
}

fn read_u64(tree: &sled::Tree, key: &str) -> Result<u64, StoreError> {
    match tree.get(key)? {
        None => Ok(0),
        Some(bytes) => {
            let bytes: [u8; 8] = bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                what: "shard meta",
                reason: format!("{key} is {} bytes, not 8", bytes.len()),
            })?;
            Ok(u64::from_le_bytes(bytes))
        }
    }
}

impl ShardStore {
    /// The shard's bookkeeping (zeroes for a new shard).
    pub fn meta(&self) -> Result<ShardMeta, StoreError> {
        Ok(ShardMeta {
            epoch: read_u64(&self.meta, "epoch")?,
            replay_from: Lsn {
                segment: read_u64(&self.meta, "replay_segment")?,
                offset: read_u64(&self.meta, "replay_offset")?,
            },
            next_sequence: read_u64(&self.meta, "next_sequence")?,
            next_event: read_u64(&self.meta, "next_event")?,
            rule_version: read_u64(&self.meta, "rule_version")?,
        })
    }

    /// Sets the epoch alone (assignment), durable at the next sync.
    pub fn set_epoch(&self, epoch: u64) -> Result<(), StoreError> {
        self.meta.insert("epoch", &epoch.to_le_bytes())?;
        Ok(())
    }

    /// A stored user.
    pub fn load_user(&self, user: &str) -> Result<Option<UserRecord>, StoreError> {
        self.users
            .get(user)?
            .map(|bytes| UserRecord::decode(&bytes))
            .transpose()
    }

    /// Every stored user, in id order.
    pub fn users(&self) -> impl Iterator<Item = Result<(String, UserRecord), StoreError>> + '_ {
        self.users.iter().map(|entry| {
            let (key, value) = entry?;
            let user = String::from_utf8(key.to_vec()).map_err(|_| StoreError::Corrupt {
                what: "user id",
                reason: "not UTF-8".into(),
            })?;
            Ok((user, UserRecord::decode(&value)?))
        })
    }

    /// Number of stored users.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Writes a checkpoint atomically.
    pub fn checkpoint(&self, cp: &Checkpoint) -> Result<(), StoreError> {
        let result = (&self.users, &self.events, &self.changes, &self.meta).transaction(
            |(users, events, changes, meta)| {
                for (key, value) in &cp.users {
                    users.insert(key.as_slice(), value.as_slice())?;
                }
                for (day, seq, value) in &cp.events {
                    events.insert(&event_key(*day, *seq)[..], value.as_slice())?;
                }
                for (seq, value) in &cp.changes {
                    changes.insert(&seq.to_be_bytes()[..], value.as_slice())?;
                }
                let m = &cp.meta;
                for (key, value) in [
                    ("epoch", m.epoch),
                    ("replay_segment", m.replay_from.segment),
                    ("replay_offset", m.replay_from.offset),
                    ("next_sequence", m.next_sequence),
                    ("next_event", m.next_event),
                    ("rule_version", m.rule_version),
                ] {
                    meta.insert(key, &value.to_le_bytes())?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            },
        );
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(e.into()),
            Err(TransactionError::Abort(())) => Err(StoreError::Corrupt {
                what: "checkpoint",
                reason: "transaction aborted".into(),
            }),
        }
    }

    /// Stored changes with sequence > `after`, at most `limit`, in order.
    pub fn changes_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<pb::MembershipChange>, StoreError> {
        let start = after.saturating_add(1).to_be_bytes();
        let mut out = Vec::new();
        for entry in self.changes.range(start..).take(limit) {
            let (_, value) = entry?;
            out.push(pb::MembershipChange::decode(&*value)?);
        }
        Ok(out)
    }

    /// The first stored change sequence (what a subscriber without a cursor
    /// starts from), if any.
    pub fn first_change(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .changes
            .first()?
            .and_then(|(k, _)| k.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// Deletes stored changes that happened before `before_ms`: the change log
    /// is in time order, so this stops at the first newer one.
    pub fn expire_changes(&self, before_ms: i64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for entry in self.changes.iter() {
            let (key, value) = entry?;
            if pb::MembershipChange::decode(&*value)?.at_ms >= before_ms {
                break;
            }
            self.changes.remove(key)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Retained events, in arrival order, from `since_day` on.
    pub fn events_since(
        &self,
        since_day: u32,
    ) -> impl Iterator<Item = Result<pb::Event, StoreError>> + '_ {
        self.events
            .range(&since_day.to_be_bytes()[..]..)
            .map(|entry| {
                let (_, value) = entry?;
                Ok(pb::Event::decode(&*value)?)
            })
    }

    /// Deletes retained events of days before `day`.
    pub fn expire_events(&self, day: u32) -> Result<usize, StoreError> {
        let mut removed = 0;
        for entry in self.events.range(..&day.to_be_bytes()[..]) {
            let (key, _) = entry?;
            self.events.remove(key)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Removes everything of this shard.
    pub fn clear(&self) -> Result<(), StoreError> {
        for tree in [&self.users, &self.events, &self.changes, &self.meta] {
            tree.clear()?;
        }
        Ok(())
    }

    /// Every (tree, key, value) of the shard, for export.
    pub fn dump(&self) -> impl Iterator<Item = Result<(u8, Vec<u8>, Vec<u8>), StoreError>> + '_ {
        [&self.meta, &self.users, &self.events, &self.changes]
            .into_iter()
            .enumerate()
            .flat_map(|(i, tree)| {
                tree.iter().map(move |entry| {
                    let (k, v) = entry?;
                    Ok((i as u8, k.to_vec(), v.to_vec()))
                })
            })
    }

    /// Writes one exported (tree, key, value).
    pub fn load(&self, tree: u8, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let tree = match tree {
            0 => &self.meta,
            1 => &self.users,
            2 => &self.events,
            3 => &self.changes,
            other => {
                return Err(StoreError::Corrupt {
                    what: "shard export",
                    reason: format!("unknown tree {other}"),
                });
            }
        };
        tree.insert(key, value)?;
        Ok(())
    }
}

fn event_key(day: u32, seq: u64) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..4].copy_from_slice(&day.to_be_bytes());
    key[4..].copy_from_slice(&seq.to_be_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let shard = store.shard(7).unwrap();
        assert_eq!(shard.meta().unwrap(), ShardMeta::default());
        let record = UserRecord {
            state: dynseg_rules::Plan::compile(
                &[],
                dynseg_rules::RuleVersion(1),
                &Default::default(),
            )
            .unwrap()
            .new_state(),
            seen: vec![1, u128::MAX],
        };
        let change = pb::MembershipChange {
            user_id: "alice".into(),
            segment: "vip".into(),
            at_ms: 100,
            ..Default::default()
        };
        let event = pb::Event {
            message_id: "m1".into(),
            user_id: "alice".into(),
            ..Default::default()
        };
        let meta = ShardMeta {
            epoch: 3,
            replay_from: Lsn {
                segment: 2,
                offset: 99,
            },
            next_sequence: 2,
            next_event: 1,
            rule_version: 5,
        };
        shard
            .checkpoint(&Checkpoint {
                users: vec![(b"alice".to_vec(), record.encode())],
                events: vec![(20_000, 0, event.encode_to_vec())],
                changes: vec![(1, change.encode_to_vec())],
                meta,
            })
            .unwrap();
        store.sync().unwrap();
        drop((shard, store));
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.stored_shards(), vec![7]);
        let shard = store.shard(7).unwrap();
        assert_eq!(shard.meta().unwrap(), meta);
        assert_eq!(shard.load_user("alice").unwrap(), Some(record));
        assert_eq!(shard.load_user("bob").unwrap(), None);
        assert_eq!(shard.changes_after(0, 10).unwrap(), vec![change.clone()]);
        assert!(shard.changes_after(1, 10).unwrap().is_empty());
        assert_eq!(
            shard
                .events_since(19_000)
                .map(Result::unwrap)
                .collect::<Vec<_>>(),
            vec![event]
        );
        assert_eq!(shard.expire_events(20_001).unwrap(), 1);
        assert_eq!(shard.expire_changes(101).unwrap(), 1);
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        for bad in [&[][..], &[5, 0, 0, 0, 1][..], &[0, 0, 0, 0, 1][..]] {
            assert!(UserRecord::decode(bad).is_err());
        }
    }
}
