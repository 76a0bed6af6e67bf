//! [`Words`]: the arena's one allocation behind a thin pointer.
//!
//! A `Box<[u64]>` is a pointer and a length: 16 bytes in every user's state,
//! with millions of states in a node's maps. Here the length lives in the
//! allocation itself, in the high half of its first word (whose low half is the
//! arena's `used` count), so the handle is one pointer and `UserState` is 32
//! bytes instead of 40. At a million users that is 8 bytes less in each of the
//! user map's buckets, about 17 bytes per user.
//!
//! The first word is only written through [`Words::set_low`], which keeps the
//! length: nothing else can make the length disagree with the allocation.

#![allow(unsafe_code)]

use std::ops::Deref;
use std::ptr::NonNull;

/// An owned run of `u64` words (empty: nothing allocated) whose first word's
/// high half holds the run's length; see the module documentation.
#[derive(Default)]
pub(crate) struct Words {
    /// The first of `len()` words, allocated as a `Box<[u64]>`; `None`: empty.
    ptr: Option<NonNull<u64>>,
}

// SAFETY: `Words` owns its allocation alone, like the `Box<[u64]>` it was made
// from; sharing `&Words` only gives shared access to plain words.
unsafe impl Send for Words {}
// SAFETY: as above: `&Words` allows reads only.
unsafe impl Sync for Words {}

const LOW: u64 = 0xffff_ffff;

impl Words {
    /// Takes `words`' allocation. The high half of its first word is replaced by
    /// the length; the low half is kept. Lengths past `u32::MAX` are refused
    /// (arenas are bounded far below by the rule limits).
    pub(crate) fn new(words: Box<[u64]>) -> Words {
        let len = words.len();
        if len == 0 {
            return Words::default();
        }
        assert!(u32::try_from(len).is_ok(), "an arena of {len} words");
        let raw = Box::into_raw(words);
        // SAFETY: `Box::into_raw` gives a non-null pointer to `len` initialised
        // words, now owned here and freed in `Drop` as the same boxed slice.
        let first = unsafe { NonNull::new_unchecked(raw.cast::<u64>()) };
        // SAFETY: `len >= 1`, so the first word exists and nobody else sees it.
        unsafe {
            let word = first.as_ptr();
            *word = (*word & LOW) | ((len as u64) << 32);
        }
        Words { ptr: Some(first) }
    }

    /// Where the words start, without reading them (`None`: empty).
    #[inline]
    pub(crate) fn first_ptr(&self) -> Option<*const u64> {
        self.ptr.map(|p| p.as_ptr().cast_const())
    }

    /// Number of words (the capacity, for the arena).
    #[inline]
    pub(crate) fn len(&self) -> usize {
        // SAFETY: a present pointer points at the first of at least one word.
        self.ptr
            .map_or(0, |p| unsafe { (*p.as_ptr() >> 32) as usize })
    }

    /// The first word's low half (0 when empty).
    #[inline]
    pub(crate) fn low(&self) -> u64 {
        self.first().map_or(0, |w| w & LOW)
    }

    /// Sets the first word's low half; the length stays. Empty words ignore it.
    #[inline]
    pub(crate) fn set_low(&mut self, value: u32) {
        if let Some(p) = self.ptr {
            // SAFETY: a present pointer points at the first of at least one
            // word, owned by `self`, borrowed mutably here.
            unsafe {
                let word = p.as_ptr();
                *word = (*word & !LOW) | u64::from(value);
            }
        }
    }

    /// Every word after the first, for writing.
    #[inline]
    pub(crate) fn tail_mut(&mut self) -> &mut [u64] {
        let len = self.len();
        match self.ptr {
            // SAFETY: `len` words are allocated from `p`; the tail starts one
            // word in and is borrowed mutably through `&mut self` alone.
            Some(p) => unsafe { std::slice::from_raw_parts_mut(p.as_ptr().add(1), len - 1) },
            None => &mut [],
        }
    }
}

impl Deref for Words {
    type Target = [u64];

    /// Every word, the first one with the length in its high half.
    #[inline]
    fn deref(&self) -> &[u64] {
        match self.ptr {
            // SAFETY: `len()` initialised words are allocated from `p`, alive as
            // long as `self`, and not written while this shared borrow lasts.
            Some(p) => unsafe { std::slice::from_raw_parts(p.as_ptr(), self.len()) },
            None => &[],
        }
    }
}

impl Drop for Words {
    fn drop(&mut self) {
        let len = self.len();
        if let Some(p) = self.ptr.take() {
            let slice = std::ptr::slice_from_raw_parts_mut(p.as_ptr(), len);
            // SAFETY: `p` and `len` are exactly what `Box::into_raw` gave in
            // `new`; the allocation is freed once, here.
            drop(unsafe { Box::from_raw(slice) });
        }
    }
}

impl Clone for Words {
    fn clone(&self) -> Self {
        Words::new(Box::from(&self[..]))
    }
}

impl std::fmt::Debug for Words {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Words")
            .field("len", &self.len())
            .field("low", &self.low())
            .field("tail", &&self[1.min(self.len())..])
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_and_low_half_share_the_first_word_without_mixing() {
        let words = Words::new(vec![7, 1, 2, 3].into_boxed_slice());
        assert_eq!(words.len(), 4);
        assert_eq!(words.low(), 7);
        assert_eq!(&words[1..], &[1, 2, 3]);
        let mut words = words;
        words.set_low(u32::MAX);
        assert_eq!((words.len(), words.low()), (4, u64::from(u32::MAX)));
        words.tail_mut()[2] = 30;
        let copy = words.clone();
        drop(words);
        assert_eq!(
            (copy.len(), copy.low(), &copy[1..]),
            (4, 0xffff_ffff, &[1, 2, 30][..])
        );
        // A stale high half in the input is replaced by the length.
        let words = Words::new(vec![(9 << 32) | 5, 0].into_boxed_slice());
        assert_eq!((words.len(), words.low()), (2, 5));
    }

    #[test]
    fn empty_words_allocate_nothing() {
        let mut words = Words::new(Box::default());
        assert_eq!(
            (words.len(), words.low(), words.tail_mut().len()),
            (0, 0, 0)
        );
        words.set_low(3);
        assert!(words.is_empty());
        assert_eq!(std::mem::size_of::<Words>(), 8);
    }
}
