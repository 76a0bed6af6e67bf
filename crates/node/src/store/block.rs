//! Blocks: retained events and published changes are stored many to a sled
//! value, so a checkpoint costs a sled write per [`BLOCK_BYTES`] of them rather
//! than one per event.
//!
//! A block is `[header: 8 bytes]` then records `[length: u32 LE][bytes]`. The
//! header of a change block is the time of its latest change (milliseconds, i64
//! LE), which retention compares without decoding the block; event blocks leave
//! it zero.

use super::StoreError;

const HEADER: usize = 8;

/// Bytes of records a block holds at most (one record may exceed it alone).
/// sled writes a leaf of up to 16 values as one log item and moves items over
/// a quarter of its segment to separate blob files; small blocks keep leaves
/// in its log.
pub(super) const BLOCK_BYTES: usize = 64 << 10;

/// `items` cut into consecutive runs of at most [`BLOCK_BYTES`] (by `size`),
/// each with at least one item.
pub(super) fn split<T>(items: &[T], size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let len = 4 + size(item);
        if i > start && bytes + len > BLOCK_BYTES {
            runs.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < items.len() {
        runs.push(&items[start..]);
    }
    runs
}

/// Published changes waiting for a checkpoint, in sequence order, held in the
/// blocks' record format: one buffer rather than an allocation per change,
/// and a checkpoint makes each block from one copy of a run of records.
#[derive(Debug, Default)]
pub struct ChangeRecords {
    /// `[length: u32 LE][change]` per change.
    records: Vec<u8>,
    /// Per change: (sequence, time in milliseconds, end of its record).
    index: Vec<(u64, i64, usize)>,
}

impl ChangeRecords {
    /// Appends a change (encoded here) with its sequence and time.
    pub fn push(&mut self, sequence: u64, at_ms: i64, change: &impl prost::Message) {
        let len = change.encoded_len();
        self.records.reserve(4 + len);
        // A change is a few ids and numbers, far below 4 GiB.
        self.records.extend_from_slice(&(len as u32).to_le_bytes());
        change.encode_raw(&mut self.records);
        self.index.push((sequence, at_ms, self.records.len()));
    }

    /// Puts `later` after these.
    pub fn append(&mut self, later: ChangeRecords) {
        let base = self.records.len();
        self.records.extend_from_slice(&later.records);
        self.index.extend(
            later
                .index
                .into_iter()
                .map(|(seq, at, end)| (seq, at, base + end)),
        );
    }

    /// How many changes are held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// No change is held.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The last sequence held, if any.
    pub fn last_sequence(&self) -> Option<u64> {
        self.index.last().map(|(seq, _, _)| *seq)
    }

    /// The changes as blocks of at most [`BLOCK_BYTES`] of records (a change
    /// larger alone is a block alone): (first sequence, block), in order. A
    /// block's header is the time of its latest change.
    pub(super) fn blocks(&self) -> impl Iterator<Item = (u64, Vec<u8>)> + '_ {
        let mut next = 0;
        std::iter::from_fn(move || {
            let first = next;
            let (sequence, _, _) = *self.index.get(first)?;
            let start = first.checked_sub(1).map_or(0, |i| self.index[i].2);
            let mut latest = i64::MIN;
            while let Some(&(_, at, end)) = self.index.get(next) {
                if next > first && end - start > BLOCK_BYTES {
                    break;
                }
                latest = latest.max(at);
                next += 1;
            }
            let end = self.index[next - 1].2;
            let mut block = Vec::with_capacity(HEADER + end - start);
            block.extend_from_slice(&latest.to_le_bytes());
            block.extend_from_slice(&self.records[start..end]);
            Some((sequence, block))
        })
    }
}

fn corrupt(reason: &str) -> StoreError {
    StoreError::Corrupt {
        what: "record block",
        reason: reason.into(),
    }
}

/// A block of `records` with `header`.
pub(super) fn encode<'a>(header: i64, records: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = header.to_le_bytes().to_vec();
    for record in records {
        // Records are single events or changes, far below 4 GiB.
        out.extend_from_slice(&(record.len() as u32).to_le_bytes());
        out.extend_from_slice(record);
    }
    out
}

/// The header of a block.
pub(super) fn header(block: &[u8]) -> Result<i64, StoreError> {
    let head = block
        .first_chunk::<HEADER>()
        .ok_or_else(|| corrupt("no header"))?;
    Ok(i64::from_le_bytes(*head))
}

/// The records of a block.
pub(super) fn records(block: &[u8]) -> impl Iterator<Item = Result<&[u8], StoreError>> {
    let mut rest = block.get(HEADER..);
    let mut failed = rest.is_none();
    std::iter::from_fn(move || {
        if failed {
            failed = false;
            return Some(Err(corrupt("no header")));
        }
        let bytes = rest.take()?;
        if bytes.is_empty() {
            return None;
        }
        let Some((len, tail)) = bytes.split_first_chunk::<4>() else {
            return Some(Err(corrupt("truncated record length")));
        };
        let len = u32::from_le_bytes(*len) as usize;
        let Some((record, tail)) = tail.split_at_checked(len) else {
            return Some(Err(corrupt("truncated record")));
        };
        rest = Some(tail);
        Some(Ok(record))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip() {
        let block = encode(-7, [&b"one"[..], b"", b"three"]);
        assert_eq!(header(&block).unwrap(), -7);
        let got: Vec<&[u8]> = records(&block).map(Result::unwrap).collect();
        assert_eq!(got, vec![&b"one"[..], b"", b"three"]);
        assert_eq!(records(&encode(0, [])).count(), 0);
    }

    #[test]
    fn runs_stay_under_the_block_size() {
        let sizes = [10_000, 30_000, 20_000, 70_000, 1, 64_000, 5, 2_000];
        let runs: Vec<Vec<usize>> = split(&sizes, |s| *s).iter().map(|r| r.to_vec()).collect();
        // With each record's 4-byte length: 60,012; 70,004 alone; 64,013; 2,004.
        assert_eq!(
            runs,
            vec![
                vec![10_000, 30_000, 20_000],
                vec![70_000],
                vec![1, 64_000, 5],
                vec![2_000]
            ]
        );
        assert!(split(&[] as &[usize], |s| *s).is_empty());
    }

    #[test]
    fn held_changes_make_the_blocks_their_records_would() {
        // Records of 4 + 2 + len bytes (a message with one bytes field).
        let change = |len: usize| prost::bytes::Bytes::from(vec![7u8; len]);
        let lens = [10_000, 30_000, 20_000, 70_000, 1, 64_000, 5, 2_000];
        let mut held = ChangeRecords::default();
        let mut later = ChangeRecords::default();
        for (i, len) in lens.iter().enumerate() {
            let target = if i < 3 { &mut held } else { &mut later };
            target.push(100 + i as u64, (i as i64 - 4).pow(2), &change(*len));
        }
        held.append(later);
        assert_eq!((held.len(), held.last_sequence()), (8, Some(107)));

        let encoded: Vec<Vec<u8>> = lens
            .iter()
            .map(|l| prost::Message::encode_to_vec(&change(*l)))
            .collect();
        let sizes: Vec<usize> = encoded.iter().map(Vec::len).collect();
        let mut expected = Vec::new();
        let mut first = 0;
        for run in split(&sizes, |s| *s) {
            let latest = (first..first + run.len())
                .map(|i| (i as i64 - 4).pow(2))
                .max()
                .unwrap();
            let records = encoded[first..first + run.len()].iter().map(Vec::as_slice);
            expected.push((100 + first as u64, encode(latest, records)));
            first += run.len();
        }
        assert_eq!(expected.len(), 4, "the runs of the split test");
        assert_eq!(held.blocks().collect::<Vec<_>>(), expected);
        assert_eq!(ChangeRecords::default().blocks().count(), 0);
    }

    #[test]
    fn truncated_blocks_are_errors() {
        let block = encode(1, [&b"one"[..], b"three"]);
        for cut in 0..block.len() {
            let cut = &block[..cut];
            // A cut at a record boundary is a shorter valid block; anywhere else
            // reading fails.
            let boundary = [8, 15, 24].contains(&cut.len());
            assert_eq!(
                records(cut).any(|r| r.is_err()),
                !boundary,
                "cut at {}",
                cut.len()
            );
        }
    }
}
