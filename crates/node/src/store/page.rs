//! User pages: a shard's users are stored a page at a time, each page holding
//! the users whose id hashes to it.
//!
//! One sled write per page rather than per user: a checkpoint that touches a
//! million users writes a few thousand values, which sled does in a fraction of
//! the time (measured: 64 pages per shard, 1M users of 400 bytes, ~0.3 s against
//! ~4 s for one insert per user). Loading one passivated user reads its page,
//! about 60 users at a million users per node.
//!
//! A page is a sequence of entries `[id length: u16 LE][record length: u32 LE]
//! [id][record]`, in no particular order.

use super::StoreError;

/// Pages per shard: part of the on-disk format.
pub(super) const PAGES_PER_SHARD: u32 = 64;

/// The page of `user` among `pages`. Independent of the shard hash (which uses
/// FNV-1a's low bits): a multiplicative mix picks from the high bits.
pub(super) fn page_of(user: &[u8], pages: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in user {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mixed = hash.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
    (mixed % u64::from(pages.max(1))) as u32
}

fn corrupt(reason: &str) -> StoreError {
    StoreError::Corrupt {
        what: "user page",
        reason: reason.into(),
    }
}

/// The entries of a stored page, as (id, record) slices.
pub(super) fn entries(page: &[u8]) -> impl Iterator<Item = Result<(&[u8], &[u8]), StoreError>> {
    let mut rest = page;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let entry = (|| {
            let (head, tail) = rest
                .split_first_chunk::<6>()
                .ok_or_else(|| corrupt("truncated entry header"))?;
            let id_len = usize::from(u16::from_le_bytes([head[0], head[1]]));
            let record_len = u32::from_le_bytes([head[2], head[3], head[4], head[5]]) as usize;
            if tail.len() < id_len + record_len {
                return Err(corrupt("truncated entry"));
            }
            let (id, tail) = tail.split_at(id_len);
            let (record, tail) = tail.split_at(record_len);
            rest = tail;
            Ok((id, record))
        })();
        if entry.is_err() {
            rest = &[];
        }
        Some(entry)
    })
}

/// The record of `user` in `page`.
pub(super) fn find<'a>(page: &'a [u8], user: &[u8]) -> Result<Option<&'a [u8]>, StoreError> {
    for entry in entries(page) {
        let (id, record) = entry?;
        if id == user {
            return Ok(Some(record));
        }
    }
    Ok(None)
}

fn push_entry(out: &mut Vec<u8>, id: &[u8], record: &[u8]) -> Result<(), StoreError> {
    let id_len = u16::try_from(id.len()).map_err(|_| corrupt("user id over 64 KiB"))?;
    let record_len = u32::try_from(record.len()).map_err(|_| corrupt("user record over 4 GiB"))?;
    out.extend_from_slice(&id_len.to_le_bytes());
    out.extend_from_slice(&record_len.to_le_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(record);
    Ok(())
}

/// A user's new record: (id, record).
pub(super) type Update<'a> = (&'a [u8], &'a [u8]);

/// `stored` with the records of `updates` (sorted by id, unique) replacing or
/// joining its entries.
pub(super) fn merge(stored: Option<&[u8]>, updates: &[Update<'_>]) -> Result<Vec<u8>, StoreError> {
    let size = stored.map_or(0, <[u8]>::len)
        + updates
            .iter()
            .map(|(id, r)| 6 + id.len() + r.len())
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    let mut replaced = vec![false; updates.len()];
    for entry in entries(stored.unwrap_or_default()) {
        let (id, record) = entry?;
        match updates.binary_search_by(|(u, _)| (*u).cmp(id)) {
            Ok(i) => {
                replaced[i] = true;
                push_entry(&mut out, id, updates[i].1)?;
            }
            Err(_) => push_entry(&mut out, id, record)?,
        }
    }
    for ((id, record), done) in updates.iter().zip(replaced) {
        if !done {
            push_entry(&mut out, id, record)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update<'a>(pairs: &[(&'a str, &'a str)]) -> Vec<Update<'a>> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
            .collect()
    }

    fn listed(page: &[u8]) -> Vec<(String, String)> {
        entries(page)
            .map(|e| {
                let (id, record) = e.unwrap();
                (
                    String::from_utf8(id.to_vec()).unwrap(),
                    String::from_utf8(record.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn merging_replaces_keeps_and_appends() {
        let first = merge(None, &update(&[("alice", "a1"), ("bob", "b1")])).unwrap();
        let second = merge(Some(&first), &update(&[("bob", "b2"), ("carol", "c1")])).unwrap();
        let s = |x: &str| x.to_owned();
        assert_eq!(
            listed(&second),
            vec![
                (s("alice"), s("a1")),
                (s("bob"), s("b2")),
                (s("carol"), s("c1"))
            ]
        );
        assert_eq!(find(&second, b"bob").unwrap(), Some(&b"b2"[..]));
        assert_eq!(find(&second, b"dave").unwrap(), None);
    }

    #[test]
    fn truncated_pages_are_errors() {
        let page = merge(None, &update(&[("alice", "record")])).unwrap();
        for cut in 1..page.len() {
            assert!(find(&page[..cut], b"zed").is_err(), "cut at {cut}");
            assert!(merge(Some(&page[..cut]), &[]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn pages_spread_users_evenly() {
        let mut counts = [0u32; PAGES_PER_SHARD as usize];
        // The users of one shard, as a node sees them.
        let users = (0..)
            .map(|u| format!("user-{u}"))
            .filter(|u| dynseg_proto::shard_for(u, 16) == 5)
            .take(32_000);
        for user in users {
            counts[page_of(user.as_bytes(), PAGES_PER_SHARD) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(
            *min > 400 && *max < 600,
            "pages hold {min}..{max} of 500 expected"
        );
    }
}
