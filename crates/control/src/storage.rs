//! raft-rs's `Storage` on sled: the raft log, hard state, conf state and the
//! latest snapshot of the state machine, all in one sled tree.
//!
//! Keys: `h` hard state, `c` conf state, `s` snapshot (metadata and data),
//! `e` + index (u64 big-endian) one log entry. Writes go through `&mut self`
//! (the raft task owns the `RawNode`, which owns this storage) and become durable
//! at [`RaftStorage::sync`], which the `Ready` loop calls before it sends the
//! messages that depend on them.

use std::collections::VecDeque;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use crate::error::ControlError;

const HARD_STATE: &[u8] = b"h";
const CONF_STATE: &[u8] = b"c";
const SNAPSHOT: &[u8] = b"s";

fn entry_key(index: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b'e';
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}

fn store_error(e: impl std::error::Error + Send + Sync + 'static) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

fn decode<M: protobuf::Message>(bytes: &[u8], what: &str) -> Result<M, ControlError> {
    M::parse_from_bytes(bytes).map_err(|e| ControlError::Corrupt(format!("{what}: {e}")))
}

fn encode<M: protobuf::Message>(message: &M) -> Result<Vec<u8>, ControlError> {
    message
        .write_to_bytes()
        .map_err(|e| ControlError::Corrupt(format!("encode: {e}")))
}

/// How long [`open_db`] waits for another holder's lock.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Opens (creating) the member's sled database at `path`.
///
/// A database another holder has locked is waited for, up to [`LOCK_WAIT`]:
/// sled 0.34 lets go of its lock only when its background threads have
/// stopped, a moment after the last handle drops, so a member restarted in
/// place (in-process clusters, tests) would otherwise fail to start. Held
/// longer (another process on the same directory), it is an error.
pub fn open_db(path: &std::path::Path) -> Result<sled::Db, ControlError> {
    open_db_within(path, LOCK_WAIT)
}

fn open_db_within(
    path: &std::path::Path,
    lock_wait: std::time::Duration,
) -> Result<sled::Db, ControlError> {
    let config = sled::Config::new().path(path).cache_capacity(16 << 20);
    let deadline = std::time::Instant::now() + lock_wait;
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            Err(e) if is_lock_conflict(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// sled's error for a directory locked by another open database (sled 0.34
/// has no kind of its own for it: an `Other` I/O error with this message).
fn is_lock_conflict(error: &sled::Error) -> bool {
    matches!(error, sled::Error::Io(e)
        if e.kind() == std::io::ErrorKind::Other
            && e.to_string().starts_with("could not acquire lock"))
}

/// The raft log and its metadata, persisted in a sled tree.
pub struct RaftStorage {
    db: sled::Db,
    tree: sled::Tree,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: SnapshotMetadata,
    /// Terms of the entries in the log, from `snapshot.index + 1` on.
    terms: VecDeque<u64>,
}

impl RaftStorage {
    /// Opens (or creates) the raft storage in `db`, reading what it holds.
    pub fn open(db: &sled::Db) -> Result<RaftStorage, ControlError> {
        let tree = db.open_tree("raft")?;
        let hard_state = match tree.get(HARD_STATE)? {
            Some(bytes) => decode(&bytes, "hard state")?,
            None => HardState::default(),
        };
        let conf_state = match tree.get(CONF_STATE)? {
            Some(bytes) => decode(&bytes, "conf state")?,
            None => ConfState::default(),
        };
        let snapshot = match tree.get(SNAPSHOT)? {
            Some(bytes) => decode::<Snapshot>(&bytes, "snapshot")?.take_metadata(),
            None => SnapshotMetadata::default(),
        };
        let mut terms = VecDeque::new();
        let first = snapshot.index + 1;
        let log = tree.range(entry_key(first)..=entry_key(u64::MAX));
        for (expected, item) in (first..).zip(log) {
            let (_, bytes) = item?;
            let entry: Entry = decode(&bytes, "log entry")?;
            if entry.index != expected {
                return Err(ControlError::Corrupt(format!(
                    "raft log has a gap: expected entry {expected}, found {}",
                    entry.index
                )));
            }
            terms.push_back(entry.term);
        }
        Ok(RaftStorage {
            db: db.clone(),
            tree,
            hard_state,
            conf_state,
            snapshot,
            terms,
        })
    }

    /// True once this member has a configuration (bootstrapped or received).
    pub fn is_initialized(&self) -> bool {
        !self.conf_state.voters.is_empty() || self.snapshot.index > 0 || !self.terms.is_empty()
    }

    /// Gives a new member of a founding group its first configuration: every
    /// founding member must be bootstrapped with the same voters.
    pub fn bootstrap(&mut self, voters: Vec<u64>) -> Result<(), ControlError> {
        self.set_conf_state(ConfState {
            voters,
            ..Default::default()
        })?;
        self.sync()
    }

    /// The metadata of the latest snapshot (index 0 when there is none).
    pub fn snapshot_metadata(&self) -> &SnapshotMetadata {
        &self.snapshot
    }

    /// The stored snapshot's data, if any.
    pub fn snapshot_data(&self) -> Result<Option<Vec<u8>>, ControlError> {
        match self.tree.get(SNAPSHOT)? {
            Some(bytes) => Ok(Some(decode::<Snapshot>(&bytes, "snapshot")?.data.to_vec())),
            None => Ok(None),
        }
    }

    fn first(&self) -> u64 {
        self.snapshot.index + 1
    }

    fn last(&self) -> u64 {
        self.snapshot.index + self.terms.len() as u64
    }

    /// Appends entries, replacing any conflicting tail of the log.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), ControlError> {
        let Some(head) = entries.first() else {
            return Ok(());
        };
        if head.index < self.first() || head.index > self.last() + 1 {
            return Err(ControlError::Corrupt(format!(
                "append at {} outside the log [{}, {}]",
                head.index,
                self.first(),
                self.last() + 1
            )));
        }
        let mut batch = sled::Batch::default();
        for index in head.index..=self.last() {
            batch.remove(&entry_key(index));
        }
        self.terms.truncate((head.index - self.first()) as usize);
        for entry in entries {
            batch.insert(&entry_key(entry.index), encode(entry)?);
            self.terms.push_back(entry.term);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Records the hard state (term, vote, commit).
    pub fn set_hard_state(&mut self, hard_state: HardState) -> Result<(), ControlError> {
        self.tree.insert(HARD_STATE, encode(&hard_state)?)?;
        self.hard_state = hard_state;
        Ok(())
    }

    /// Records a new commit index.
    pub fn set_commit(&mut self, commit: u64) -> Result<(), ControlError> {
        let mut hard_state = self.hard_state.clone();
        hard_state.commit = commit;
        self.set_hard_state(hard_state)
    }

    /// Records the configuration after a conf change.
    pub fn set_conf_state(&mut self, conf_state: ConfState) -> Result<(), ControlError> {
        self.tree.insert(CONF_STATE, encode(&conf_state)?)?;
        self.conf_state = conf_state;
        Ok(())
    }

    /// Installs a snapshot received from the leader: the log before and at it goes.
    pub fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), ControlError> {
        let meta = snapshot.get_metadata();
        if meta.index < self.snapshot.index {
            return Err(ControlError::Corrupt(format!(
                "snapshot at {} is older than the one held at {}",
                meta.index, self.snapshot.index
            )));
        }
        let mut batch = sled::Batch::default();
        for index in self.first()..=self.last() {
            batch.remove(&entry_key(index));
        }
        batch.insert(SNAPSHOT, encode(snapshot)?);
        let mut hard_state = self.hard_state.clone();
        hard_state.term = hard_state.term.max(meta.term);
        hard_state.commit = meta.index;
        batch.insert(HARD_STATE, encode(&hard_state)?);
        batch.insert(CONF_STATE, encode(meta.get_conf_state())?);
        self.tree.apply_batch(batch)?;
        self.hard_state = hard_state;
        self.conf_state = meta.get_conf_state().clone();
        self.snapshot = meta.clone();
        self.terms.clear();
        Ok(())
    }

    /// Stores a snapshot of the state machine at `index` (applied) and drops the
    /// log up to it: followers further behind will be sent this snapshot.
    pub fn compact_to_snapshot(
        &mut self,
        index: u64,
        conf_state: ConfState,
        data: Vec<u8>,
    ) -> Result<(), ControlError> {
        if index <= self.snapshot.index || index > self.last() {
            return Ok(());
        }
        let term = self.terms[(index - self.first()) as usize];
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf_state);
        snapshot.data = data.into();
        let mut batch = sled::Batch::default();
        for i in self.first()..=index {
            batch.remove(&entry_key(i));
        }
        batch.insert(SNAPSHOT, encode(&snapshot)?);
        self.tree.apply_batch(batch)?;
        self.terms.drain(..(index - self.first() + 1) as usize);
        self.snapshot = snapshot.take_metadata();
        Ok(())
    }

    /// Makes every write so far durable.
    pub fn sync(&self) -> Result<(), ControlError> {
        self.db.flush()?;
        Ok(())
    }
}

impl Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let mut entries = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for item in self.tree.range(entry_key(low)..entry_key(high)) {
            let (_, bytes) = item.map_err(store_error)?;
            size += bytes.len() as u64;
            if !entries.is_empty() && size > max_size {
                break;
            }
            entries.push(Entry::parse_from_bytes(&bytes).map_err(store_error)?);
        }
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        if index < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.terms[(index - self.first()) as usize])
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let bytes = self.tree.get(SNAPSHOT).map_err(store_error)?;
        let snapshot = match bytes {
            Some(bytes) => Snapshot::parse_from_bytes(&bytes).map_err(store_error)?,
            None => {
                return Err(raft::Error::Store(
                    StorageError::SnapshotTemporarilyUnavailable,
                ));
            }
        };
        if snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("entry {index}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    #[test]
    fn log_survives_reopen_and_conflicting_tails_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let mut s = RaftStorage::open(&db).unwrap();
            assert!(!s.is_initialized());
            s.bootstrap(vec![1, 2, 3]).unwrap();
            s.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
            // A new leader's entries at 2.. replace the old tail.
            s.append(&[entry(2, 2)]).unwrap();
            s.set_hard_state(HardState {
                term: 2,
                vote: 3,
                commit: 2,
                ..Default::default()
            })
            .unwrap();
            s.sync().unwrap();
        }
        // Reopened at once, as a member restarted in place: sled may still
        // hold the lock from the database dropped above.
        let db = open_db(dir.path()).unwrap();
        let s = RaftStorage::open(&db).unwrap();
        assert!(s.is_initialized());
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 2));
        assert_eq!(s.term(2).unwrap(), 2);
        let state = s.initial_state().unwrap();
        assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
        assert_eq!((state.hard_state.term, state.hard_state.vote), (2, 3));
        let got = s.entries(1, 3, None, ctx()).unwrap();
        assert_eq!(
            got.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
            vec![(1, 1), (2, 2)]
        );
        assert!(s.entries(1, 4, None, ctx()).is_err());
        // A size limit still returns at least one entry.
        assert_eq!(s.entries(1, 3, Some(1), ctx()).unwrap().len(), 1);
    }

    #[test]
    fn a_database_let_go_of_while_opening_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let held = open_db(dir.path()).unwrap();
        // The lock is held: a bare open fails at once.
        let bare = sled::Config::new().path(dir.path()).open();
        assert!(bare.is_err_and(|e| is_lock_conflict(&e)));
        let holder = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            drop(held);
        });
        let db = open_db(dir.path());
        holder.join().unwrap();
        assert!(db.is_ok(), "{:?}", db.err());
    }

    #[test]
    fn a_database_held_past_the_wait_is_an_error_naming_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let _held = open_db(dir.path()).unwrap();
        let started = std::time::Instant::now();
        let error = open_db_within(dir.path(), std::time::Duration::from_millis(50)).unwrap_err();
        assert!(started.elapsed() >= std::time::Duration::from_millis(50));
        assert!(
            error.to_string().contains("could not acquire lock"),
            "{error}"
        );
    }

    #[test]
    fn compaction_keeps_the_term_at_the_snapshot_and_serves_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut s = RaftStorage::open(&db).unwrap();
        s.bootstrap(vec![1]).unwrap();
        s.append(&(1..=10).map(|i| entry(i, 1 + i / 5)).collect::<Vec<_>>())
            .unwrap();
        let conf = ConfState {
            voters: vec![1],
            ..Default::default()
        };
        s.compact_to_snapshot(6, conf, b"state at 6".to_vec())
            .unwrap();
        assert_eq!(s.first_index().unwrap(), 7);
        assert_eq!(s.term(6).unwrap(), 2);
        assert_eq!(
            s.entries(5, 8, None, ctx()).unwrap_err(),
            raft::Error::Store(StorageError::Compacted)
        );
        assert_eq!(
            s.term(3).unwrap_err(),
            raft::Error::Store(StorageError::Compacted)
        );
        let snap = s.snapshot(0, 2).unwrap();
        assert_eq!(
            (snap.get_metadata().index, &snap.data[..]),
            (6, &b"state at 6"[..])
        );
        drop(s);
        let s = RaftStorage::open(&db).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (7, 10));
        assert_eq!(s.snapshot_data().unwrap().unwrap(), b"state at 6");
    }

    #[test]
    fn installing_a_snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut s = RaftStorage::open(&db).unwrap();
        s.append(&[entry(1, 1), entry(2, 1)]).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 4;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        s.apply_snapshot(&snap).unwrap();
        assert_eq!(
            (s.first_index().unwrap(), s.last_index().unwrap()),
            (21, 20)
        );
        assert_eq!(s.term(20).unwrap(), 4);
        let state = s.initial_state().unwrap();
        assert_eq!((state.hard_state.commit, state.hard_state.term), (20, 4));
        assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
        s.append(&[entry(21, 4)]).unwrap();
        assert_eq!(s.last_index().unwrap(), 21);
    }
}
