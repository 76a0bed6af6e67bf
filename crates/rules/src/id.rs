//! [`InlineStr`]: an immutable string that stores up to `N` bytes inline, and
//! [`IdStr`], the one of 24 bytes that stores up to 22.
//!
//! User ids, event names and segment ids are short and are hashed and compared
//! on every event. Stored inline they need no allocation and no pointer chase:
//! in a map of millions of users, looking a user up touches the map's bucket
//! and not also a separately allocated key. Longer strings share one `Arc<str>`.
//!
//! Message ids are longer (a UUID is 36 bytes; analytics.js sends 40 to 41)
//! and live only while their event is applied: [`MessageStr`] keeps up to 46
//! inline, in 48 bytes, so that converting an event allocates nothing for it.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// An immutable string; see the module documentation. Strings of at most `N`
/// bytes (`N` below 256) are always inline and longer ones always shared, so
/// equal strings have equal representations.
#[derive(Clone)]
pub struct InlineStr<const N: usize>(Repr<N>);

/// Ids: up to 22 bytes inline, 24 bytes in all.
pub type IdStr = InlineStr<22>;

/// Message ids: up to 46 bytes inline, 48 bytes in all.
pub type MessageStr = InlineStr<46>;

#[derive(Clone)]
enum Repr<const N: usize> {
    Inline { len: u8, bytes: [u8; N] },
    Shared(Arc<str>),
}

impl<const N: usize> InlineStr<N> {
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

impl<const N: usize> From<&str> for InlineStr<N> {
    fn from(s: &str) -> Self {
        const { assert!(N < 256, "the inline length is a u8") };
        if s.len() <= N {
            let mut bytes = [0u8; N];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            InlineStr(Repr::Inline {
                len: s.len() as u8,
                bytes,
            })
        } else {
            InlineStr(Repr::Shared(s.into()))
        }
    }
}

impl<const N: usize> From<String> for InlineStr<N> {
    fn from(s: String) -> Self {
        if s.len() <= N {
            InlineStr::from(s.as_str())
        } else {
            InlineStr(Repr::Shared(s.into()))
        }
    }
}

impl<const N: usize> From<Box<str>> for InlineStr<N> {
    fn from(s: Box<str>) -> Self {
        if s.len() <= N {
            InlineStr::from(&*s)
        } else {
            InlineStr(Repr::Shared(s.into()))
        }
    }
}

impl<const N: usize> From<Arc<str>> for InlineStr<N> {
    fn from(s: Arc<str>) -> Self {
        if s.len() <= N {
            InlineStr::from(&*s)
        } else {
            InlineStr(Repr::Shared(s))
        }
    }
}

impl<const N: usize> PartialEq for InlineStr<N> {
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

impl<const N: usize> Eq for InlineStr<N> {}

impl<const N: usize> InlineStr<N> {
    fn bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Shared(s) => s.as_bytes(),
        }
    }
}

impl<const N: usize> Hash for InlineStr<N> {
    /// Hashes as `str` does (its bytes, then `0xff`), so that maps keyed by ids can
    /// be queried with `&str`; written out to skip re-checking UTF-8 on every hash.
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.bytes());
        state.write_u8(0xff);
    }
}

impl<const N: usize> PartialOrd for InlineStr<N> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<const N: usize> Ord for InlineStr<N> {
    /// Byte order, which for UTF-8 is the order of `str`.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.bytes().cmp(other.bytes())
    }
}

impl<const N: usize> fmt::Debug for InlineStr<N> {
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
        assert_eq!(std::mem::size_of::<MessageStr>(), 48);
        let uuid = "9b2f6a7e-3c1d-4f8a-b5e2-0d4c6e8f1a3b";
        assert!(matches!(MessageStr::from(uuid).0, Repr::Inline { .. }));
        assert!(matches!(IdStr::from(uuid).0, Repr::Shared(_)));
        assert_eq!(MessageStr::from(uuid).as_str(), uuid);
        let long = "m".repeat(47);
        assert!(matches!(MessageStr::from(long.as_str()).0, Repr::Shared(_)));
        assert_eq!(MessageStr::from(long.as_str()).as_str(), long);
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
