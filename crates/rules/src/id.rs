//! [`IdStr`]: an immutable string that stores up to 22 bytes inline.
//!
//! User ids, event names and segment ids are short and are hashed and compared
//! on every event. Stored inline they need no allocation and no pointer chase:
//! in a map of millions of users, looking a user up touches the map's bucket
//! and not also a separately allocated key. Longer strings share one `Arc<str>`.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

const INLINE: usize = 22;

/// An immutable string; see the module documentation. Strings of at most 22
/// bytes are always inline and longer ones always shared, so equal strings have
/// equal representations.
#[derive(Clone)]
pub struct IdStr(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Shared(Arc<str>),
}

impl IdStr {
    /// The string.
    #[allow(unsafe_code)] // One block; see its SAFETY comment.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline { len, bytes } => {
                let bytes = &bytes[..usize::from(*len)];
                // Checking again on every use cost 2% of a node's ingest
                // (user ids are read per event: hashing, lookups, logging).
                debug_assert!(std::str::from_utf8(bytes).is_ok());
                // SAFETY: an inline string is only made by `From<&str>`, which
                // copies a whole `&str` and records its length, so these bytes
                // are exactly that valid UTF-8 string.
                unsafe { std::str::from_utf8_unchecked(bytes) }
            }
            Repr::Shared(s) => s,
        }
    }
}

impl From<&str> for IdStr {
    fn from(s: &str) -> Self {
        if s.len() <= INLINE {
            let mut bytes = [0u8; INLINE];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            IdStr(Repr::Inline {
                len: s.len() as u8,
                bytes,
            })
        } else {
            IdStr(Repr::Shared(s.into()))
        }
    }
}

impl From<String> for IdStr {
    fn from(s: String) -> Self {
        if s.len() <= INLINE {
            IdStr::from(s.as_str())
        } else {
            IdStr(Repr::Shared(s.into()))
        }
    }
}

impl From<Box<str>> for IdStr {
    fn from(s: Box<str>) -> Self {
        if s.len() <= INLINE {
            IdStr::from(&*s)
        } else {
            IdStr(Repr::Shared(s.into()))
        }
    }
}

impl From<Arc<str>> for IdStr {
    fn from(s: Arc<str>) -> Self {
        if s.len() <= INLINE {
            IdStr::from(&*s)
        } else {
            IdStr(Repr::Shared(s))
        }
    }
}

impl PartialEq for IdStr {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Repr::Inline { len: a, bytes: x }, Repr::Inline { len: b, bytes: y }) => {
                a == b && x == y
            }
            (Repr::Shared(a), Repr::Shared(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for IdStr {}

impl IdStr {
    fn bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Shared(s) => s.as_bytes(),
        }
    }
}

impl Hash for IdStr {
    /// Hashes as `str` does (its bytes, then `0xff`), so that maps keyed by ids can
    /// be queried with `&str`; written out to skip re-checking UTF-8 on every hash.
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.bytes());
        state.write_u8(0xff);
    }
}

impl PartialOrd for IdStr {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for IdStr {
    /// Byte order, which for UTF-8 is the order of `str`.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.bytes().cmp(other.bytes())
    }
}

impl fmt::Debug for IdStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn short_and_long_strings_round_trip_and_compare() {
        for s in [
            "",
            "a",
            "user-000000123",
            "exactly-22-bytes-long!",
            "twenty-three bytes long",
            "é".repeat(20).as_str(),
        ] {
            let id = IdStr::from(s);
            assert_eq!(id.as_str(), s);
            assert_eq!(id, IdStr::from(s.to_owned()));
            assert_eq!(id, IdStr::from(Arc::<str>::from(s)));
        }
        assert_ne!(IdStr::from("a"), IdStr::from("b"));
        assert!(IdStr::from("a") < IdStr::from("b"));
        assert_eq!(std::mem::size_of::<IdStr>(), 24);
    }

    #[test]
    fn hashes_like_str_for_borrowed_lookups() {
        let set: HashSet<IdStr> = ["short", "a rather longer identifier than inline"]
            .into_iter()
            .map(IdStr::from)
            .collect();
        assert!(set.iter().any(|id| id.as_str() == "short"));
        use std::hash::BuildHasher;
        for text in ["short", "a rather longer identifier than inline", ""] {
            let std_hasher = std::collections::hash_map::RandomState::new();
            assert_eq!(
                std_hasher.hash_one(IdStr::from(text)),
                std_hasher.hash_one(text)
            );
            let fold = foldhash::fast::RandomState::default();
            assert_eq!(fold.hash_one(IdStr::from(text)), fold.hash_one(text));
        }
    }
}
