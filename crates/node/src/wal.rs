//! The write-ahead log: the node's own append-only, segmented, checksummed log.
//!
//! Every input a shard applies (a batch of events, a clock tick, a rule change) is
//! a record here first; a batch is acknowledged only once its record is on disk
//! with `fdatasync`. (sled's flush is not enough: sled 0.34 calls
//! `sync_file_range`, which does not make data durable.) Recovery replays the
//! records after each shard's last checkpoint.
//!
//! Layout: files `wal-<segment>.log` in one directory, each a sequence of records
//!
//! ```text
//! [payload length: u32 LE][CRC-32 of the payload: u32 LE][payload]
//! ```
//!
//! A new segment starts when the current one passes the segment size. A torn
//! write (a crash mid-append) leaves a short or mismatching record at the end of
//! the last segment; opening the log cuts the file there. A bad record anywhere
//! else is corruption, reported as an error (by replay, or by [`LogReader`])
//! rather than silently skipped.
//!
//! Segments outlive the checkpoints that cover them while shards still retain
//! the event batches in them: a batch's record is its retained copy, read back
//! by position ([`LogReader`]) for backfill and shard export. Opening the log
//! therefore reads only the last segment, not the whole retention.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A position in the log: a segment and a byte offset in it. Records are ordered
/// by position; a record's position is where its header starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn {
    /// Segment number.
    pub segment: u64,
    /// Byte offset inside the segment.
    pub offset: u64,
}

/// Largest payload accepted, so a corrupt length cannot make recovery allocate
/// gigabytes.
pub const MAX_RECORD: usize = 256 << 20;

const HEADER: usize = 8;

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// An I/O call failed.
    #[error("write-ahead log I/O at {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// A record before the last segment's tail does not check: not a torn write.
    #[error("write-ahead log corrupt at segment {segment} offset {offset}: {reason}")]
    Corrupt {
        /// Segment number.
        segment: u64,
        /// Byte offset.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A payload over [`MAX_RECORD`].
    #[error("write-ahead log record of {0} bytes is over the limit of {MAX_RECORD}")]
    TooLarge(usize),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What opening the log found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Bytes cut from the end of the last segment (a torn write), if any.
    pub torn_bytes: u64,
}

/// An open log, ready to append. Not shared: one writer owns it.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    segment_size: u64,
    segment: u64,
    /// Where the next record goes: the file's length plus `unwritten`.
    offset: u64,
    file: File,
    /// Records appended since the last write to the file. A group of
    /// records goes to the file in one `write`, just before its sync.
    unwritten: Vec<u8>,
    /// A write since the last sync failed: records appended before it were
    /// dropped, so the next sync must fail too rather than vouch for them.
    lost: Option<String>,
}

/// Unwritten bytes past which an append writes them out (it does not sync).
const WRITE_AT: usize = 1 << 20;

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("wal-{segment:020}.log"))
}

/// The segment numbers present in `dir`, ascending.
fn segments(dir: &Path) -> Result<Vec<u64>, WalError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix("wal-")
            .and_then(|n| n.strip_suffix(".log"))
            && let Ok(n) = n.parse()
        {
            found.push(n);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Reads one record at the reader's position: `Ok(None)` at a clean end,
/// `Err(reason)` for a short or mismatching record.
fn read_record(
    reader: &mut impl Read,
    buf: &mut Vec<u8>,
) -> io::Result<Result<Option<usize>, String>> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match reader.read(&mut header[got..])? {
            0 if got == 0 => return Ok(Ok(None)),
            0 => return Ok(Err(format!("short header ({got} of {HEADER} bytes)"))),
            n => got += n,
        }
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD {
        return Ok(Err(format!("record length {len} over the limit")));
    }
    buf.clear();
    buf.resize(len, 0);
    let mut got = 0;
    while got < len {
        match reader.read(&mut buf[got..])? {
            0 => return Ok(Err(format!("short payload ({got} of {len} bytes)"))),
            n => got += n,
        }
    }
    if crc32fast::hash(buf) != crc {
        return Ok(Err("checksum mismatch".into()));
    }
    Ok(Ok(Some(HEADER + len)))
}

impl Wal {
    /// Opens (creating) the log in `dir`, cutting a torn tail, and positions it for
    /// appending after the last good record.
    pub fn open(dir: &Path, segment_size: u64) -> Result<(Wal, Recovery), WalError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let existing = segments(dir)?;
        let mut recovery = Recovery::default();
        let (segment, offset) = match existing.last() {
            None => (0, 0),
            Some(&last) => {
                // Only the last segment may end torn. Earlier ones are checked
                // when read: replay and LogReader report a bad record there.
                let path = segment_path(dir, last);
                let good = Self::good_prefix(&path)?;
                let len = fs::metadata(&path).map_err(io_err(&path))?.len();
                if good < len {
                    recovery.torn_bytes = len - good;
                    let file = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io_err(&path))?;
                    file.set_len(good).map_err(io_err(&path))?;
                    file.sync_all().map_err(io_err(&path))?;
                }
                (last, good)
            }
        };
        let path = segment_path(dir, segment);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if existing.is_empty() {
            sync_dir(dir)?;
        }
        Ok((
            Wal {
                dir: dir.to_owned(),
                segment_size,
                segment,
                offset,
                file,
                unwritten: Vec::new(),
                lost: None,
            },
            recovery,
        ))
    }

    /// Length of the readable prefix of a segment.
    fn good_prefix(path: &Path) -> Result<u64, WalError> {
        let file = File::open(path).map_err(io_err(path))?;
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        let mut offset = 0u64;
        loop {
            match read_record(&mut reader, &mut buf).map_err(io_err(path))? {
                Ok(Some(n)) => offset += n as u64,
                Ok(None) | Err(_) => return Ok(offset),
            }
        }
    }

    /// Calls `f(position, payload)` for every record of `segment` at or after
    /// `from`, stopping at the segment's end. A bad record is corruption.
    fn scan(
        dir: &Path,
        segment: u64,
        from: Lsn,
        mut f: impl FnMut(Lsn, &[u8]) -> Result<(), WalError>,
    ) -> Result<(), WalError> {
        let path = segment_path(dir, segment);
        let file = File::open(&path).map_err(io_err(&path))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut buf = Vec::new();
        let mut offset = 0u64;
        loop {
            match read_record(&mut reader, &mut buf).map_err(io_err(&path))? {
                Ok(Some(n)) => {
                    let at = Lsn { segment, offset };
                    if at >= from {
                        f(at, &buf)?;
                    }
                    offset += n as u64;
                }
                Ok(None) => return Ok(()),
                Err(reason) => {
                    return Err(WalError::Corrupt {
                        segment,
                        offset,
                        reason,
                    });
                }
            }
        }
    }

    /// Calls `f(position, payload)` for every record at or after `from`, in order.
    /// Call it on a log that [`Wal::open`] has repaired.
    pub fn replay(
        dir: &Path,
        from: Lsn,
        mut f: impl FnMut(Lsn, &[u8]) -> Result<(), WalError>,
    ) -> Result<(), WalError> {
        for segment in segments(dir)?.into_iter().filter(|s| *s >= from.segment) {
            Self::scan(dir, segment, from, &mut f)?;
        }
        Ok(())
    }

    /// The position the next record will get.
    pub fn tail(&self) -> Lsn {
        Lsn {
            segment: self.segment,
            offset: self.offset,
        }
    }

    /// Appends a record (not yet durable, and not yet in the file: see
    /// [`Wal::sync`]) and returns its position.
    pub fn append(&mut self, payload: &[u8]) -> Result<Lsn, WalError> {
        if payload.len() > MAX_RECORD {
            return Err(WalError::TooLarge(payload.len()));
        }
        if self.offset >= self.segment_size {
            self.roll()?;
        }
        let at = self.tail();
        self.unwritten
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.unwritten
            .extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        self.unwritten.extend_from_slice(payload);
        self.offset += (HEADER + payload.len()) as u64;
        if self.unwritten.len() >= WRITE_AT {
            self.write_out()?;
        }
        Ok(at)
    }

    /// Writes the records appended since the last write to the file. If the
    /// write fails they are dropped (none was acknowledged: that waits for the
    /// sync) and the file is cut back to where they began, so that the next
    /// record's position is still where it lands.
    fn write_out(&mut self) -> Result<(), WalError> {
        if self.unwritten.is_empty() {
            return Ok(());
        }
        let path = segment_path(&self.dir, self.segment);
        let start = self.offset - self.unwritten.len() as u64;
        let written = self.file.write_all(&self.unwritten).map_err(io_err(&path));
        self.unwritten.clear();
        if let Err(e) = &written {
            let _ = self.file.set_len(start);
            self.offset = start;
            self.lost = Some(e.to_string());
        }
        written
    }

    /// Makes everything appended so far durable: one `write` of what is not
    /// in the file yet, then `fdatasync`. Fails if any record appended since
    /// the last sync was dropped by a failed write.
    pub fn sync(&mut self) -> Result<(), WalError> {
        let written = self.write_out();
        if let Some(reason) = self.lost.take() {
            return Err(WalError::Io {
                path: segment_path(&self.dir, self.segment),
                source: io::Error::other(format!(
                    "records since the last sync were lost: {reason}"
                )),
            });
        }
        written?;
        let path = segment_path(&self.dir, self.segment);
        self.file.sync_data().map_err(io_err(&path))
    }

    /// Starts the next segment (after making the current one durable). A
    /// failed write leaves `lost` set for the sync of the group it cut short.
    fn roll(&mut self) -> Result<(), WalError> {
        self.write_out()?;
        let path = segment_path(&self.dir, self.segment);
        self.file.sync_data().map_err(io_err(&path))?;
        self.segment += 1;
        self.offset = 0;
        let path = segment_path(&self.dir, self.segment);
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        sync_dir(&self.dir)
    }

    /// Deletes the segments that end before `lsn` (every record in them is older):
    /// called once all shards have checkpointed past `lsn`.
    pub fn truncate_before(&mut self, lsn: Lsn) -> Result<usize, WalError> {
        let mut removed = 0;
        for segment in segments(&self.dir)? {
            if segment < lsn.segment && segment < self.segment {
                let path = segment_path(&self.dir, segment);
                fs::remove_file(&path).map_err(io_err(&path))?;
                removed += 1;
            }
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }
}

/// Reads single records back by position, from a log another thread may be
/// appending to (only positions already returned by a durable append are
/// asked for). Keeps the last segment it read open.
#[derive(Debug)]
pub struct LogReader {
    dir: PathBuf,
    open: Option<(u64, File)>,
    buf: Vec<u8>,
}

impl LogReader {
    /// A reader of the log in `dir`.
    pub fn new(dir: &Path) -> LogReader {
        LogReader {
            dir: dir.to_owned(),
            open: None,
            buf: Vec::new(),
        }
    }

    /// The payload of the record at `at`, checksum checked.
    pub fn read(&mut self, at: Lsn) -> Result<&[u8], WalError> {
        let path = segment_path(&self.dir, at.segment);
        let mut file = match self.open.take() {
            Some((segment, file)) if segment == at.segment => file,
            _ => File::open(&path).map_err(io_err(&path))?,
        };
        file.seek(SeekFrom::Start(at.offset))
            .map_err(io_err(&path))?;
        let read = read_record(&mut file, &mut self.buf).map_err(io_err(&path))?;
        self.open = Some((at.segment, file));
        let reason = match read {
            Ok(Some(_)) => return Ok(&self.buf),
            Ok(None) => "no record at this position".to_owned(),
            Err(reason) => reason,
        };
        Err(WalError::Corrupt {
            segment: at.segment,
            offset: at.offset,
            reason,
        })
    }
}

/// Makes a directory's entries (created or removed files) durable.
fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(dir: &Path, from: Lsn) -> Vec<(Lsn, Vec<u8>)> {
        let mut out = Vec::new();
        Wal::replay(dir, from, |at, payload| {
            out.push((at, payload.to_vec()));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn records_survive_reopening_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 1 << 20).unwrap();
        let a = wal.append(b"first").unwrap();
        let b = wal.append(b"").unwrap();
        let c = wal.append(&[7u8; 1000]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (wal, recovery) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(recovery.torn_bytes, 0);
        let records = read_all(dir.path(), Lsn::default());
        assert_eq!(
            records.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![a, b, c]
        );
        assert_eq!(records[0].1, b"first");
        assert_eq!(records[2].1, vec![7u8; 1000]);
        assert!(wal.tail() > c);
        assert_eq!(
            read_all(dir.path(), b).len(),
            2,
            "replay starts at a position"
        );
    }

    #[test]
    fn a_group_of_records_reaches_the_file_in_one_write_at_its_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 1 << 30).unwrap();
        let path = segment_path(dir.path(), 0);
        let file_len = || fs::metadata(&path).unwrap().len();
        let first = wal.append(b"one").unwrap();
        let second = wal.append(b"two").unwrap();
        assert_eq!(second.offset, first.offset + (HEADER + 3) as u64);
        assert_eq!(file_len(), 0, "appends wait for the sync");
        wal.sync().unwrap();
        assert_eq!(file_len(), 2 * (HEADER + 3) as u64);
        assert_eq!(wal.tail().offset, file_len());
        // A group past the write threshold is written before its sync, in
        // whole records, and positions still match the file.
        let big = vec![9u8; WRITE_AT];
        let at = wal.append(&big).unwrap();
        assert_eq!(file_len(), at.offset + (HEADER + WRITE_AT) as u64);
        let after = wal.append(b"three").unwrap();
        wal.sync().unwrap();
        let records = read_all(dir.path(), Lsn::default());
        assert_eq!(
            records.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![first, second, at, after]
        );
        assert_eq!(records[3].1, b"three");
    }

    #[test]
    fn a_failed_write_fails_the_sync_of_every_record_it_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 1 << 30).unwrap();
        wal.append(b"kept").unwrap();
        wal.sync().unwrap();
        let path = segment_path(dir.path(), 0);
        let writable = std::mem::replace(&mut wal.file, File::open(&path).unwrap());
        // Buffered, then dropped by the failed write of the next one.
        let dropped = wal.append(b"dropped").unwrap();
        assert!(wal.append(&vec![1u8; WRITE_AT]).is_err());
        wal.file = writable;
        assert!(wal.sync().is_err(), "the dropped record was never written");
        assert_eq!(wal.tail(), dropped, "the next record goes where it began");
        let after = wal.append(b"after").unwrap();
        wal.sync().unwrap();
        let records = read_all(dir.path(), Lsn::default());
        assert_eq!(
            records.iter().map(|r| r.1.as_slice()).collect::<Vec<_>>(),
            [&b"kept"[..], b"after"]
        );
        assert_eq!(records[1].0, after);
    }

    #[test]
    fn segments_roll_and_old_ones_are_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 100).unwrap();
        let positions: Vec<Lsn> = (0..10).map(|i| wal.append(&[i; 60]).unwrap()).collect();
        wal.sync().unwrap();
        assert!(positions.last().unwrap().segment >= 4);
        assert_eq!(read_all(dir.path(), Lsn::default()).len(), 10);
        let keep = positions[6];
        wal.truncate_before(keep).unwrap();
        let left = read_all(dir.path(), Lsn::default());
        assert!(left.iter().all(|(at, _)| at.segment >= keep.segment));
        assert!(left.iter().any(|(at, _)| *at == keep));
    }

    #[test]
    fn a_torn_tail_is_cut_at_any_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 1 << 20).unwrap();
        for i in 0..5u8 {
            wal.append(&[i; 50]).unwrap();
        }
        wal.sync().unwrap();
        drop(wal);
        let path = segment_path(dir.path(), 0);
        let full = fs::read(&path).unwrap();
        let record = HEADER + 50;
        for cut in 1..record {
            // Rewrite four whole records plus `cut` bytes of the fifth.
            fs::write(&path, &full[..4 * record + cut]).unwrap();
            let (mut wal, recovery) = Wal::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(recovery.torn_bytes, cut as u64);
            assert_eq!(read_all(dir.path(), Lsn::default()).len(), 4);
            // The log keeps working after the cut.
            wal.append(b"after").unwrap();
            wal.sync().unwrap();
            drop(wal);
            let records = read_all(dir.path(), Lsn::default());
            assert_eq!(records.len(), 5);
            assert_eq!(records[4].1, b"after");
        }
    }

    #[test]
    fn records_are_read_back_by_position() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 100).unwrap();
        let positions: Vec<Lsn> = (0..6u8).map(|i| wal.append(&[i; 60]).unwrap()).collect();
        wal.sync().unwrap();
        let mut reader = LogReader::new(dir.path());
        for (i, at) in positions.iter().enumerate().rev() {
            assert_eq!(reader.read(*at).unwrap(), &[i as u8; 60][..]);
        }
        let between = Lsn {
            segment: positions[0].segment,
            offset: positions[0].offset + 3,
        };
        assert!(matches!(
            reader.read(between),
            Err(WalError::Corrupt { .. })
        ));
        let gone = Lsn {
            segment: 999,
            offset: 0,
        };
        assert!(matches!(reader.read(gone), Err(WalError::Io { .. })));
    }

    #[test]
    fn a_flipped_bit_in_the_tail_is_cut_and_in_an_older_segment_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 100).unwrap();
        for i in 0..4u8 {
            wal.append(&[i; 60]).unwrap();
        }
        wal.sync().unwrap();
        drop(wal);
        let last = *segments(dir.path()).unwrap().last().unwrap();
        let path = segment_path(dir.path(), last);
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER + 3] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let (_, recovery) = Wal::open(dir.path(), 100).unwrap();
        assert!(recovery.torn_bytes > 0);
        let first = segment_path(dir.path(), 0);
        let mut bytes = fs::read(&first).unwrap();
        bytes[HEADER + 3] ^= 1;
        fs::write(&first, &bytes).unwrap();
        // Opening reads only the last segment; replay and reads by position
        // report the bad record.
        Wal::open(dir.path(), 100).unwrap();
        assert!(matches!(
            LogReader::new(dir.path()).read(Lsn::default()),
            Err(WalError::Corrupt { .. })
        ));
        match Wal::replay(dir.path(), Lsn::default(), |_, _| Ok(())) {
            Err(WalError::Corrupt {
                segment: 0,
                offset: 0,
                reason,
            }) => assert_eq!(reason, "checksum mismatch"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn oversized_records_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert!(matches!(
            wal.append(&vec![0; MAX_RECORD + 1]),
            Err(WalError::TooLarge(_))
        ));
    }
}
