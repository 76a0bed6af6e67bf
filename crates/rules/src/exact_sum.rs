//! An exact running sum of f64 values that also supports removal.
//!
//! A sliding-window sum that adds new values and subtracts expired ones in f64
//! drifts: `((a + b) + c) - a` is not always `b + c`, so a sum compared with a
//! threshold could flip differently from a sum computed afresh. [`ExactSum`] keeps
//! the sum as a list of non-overlapping f64 partials whose exact total is the exact
//! mathematical sum (Shewchuk's expansion arithmetic), and rounds once when read.
//! The rounded value therefore depends only on the multiset of values added and
//! removed, never on their order: the incremental engine and the reference
//! evaluator get the same f64 bit for bit.
//!
//! Inputs must be finite and well inside the f64 range (event validation bounds
//! numbers to |x| <= 1e300); then no intermediate sum overflows.

/// Partials kept inline before spilling to the heap: sums of everyday values need
/// one to three, so reading a stored sum or summing a window never allocates.
const INLINE: usize = 8;

/// An exact sum; see the module documentation.
#[derive(Clone, Debug, Default)]
pub struct ExactSum {
    /// Number of partials in `inline` (when `spill` is empty).
    len: usize,
    inline: [f64; INLINE],
    /// All partials, once there are more than `INLINE`.
    spill: Vec<f64>,
}

impl PartialEq for ExactSum {
    fn eq(&self, other: &Self) -> bool {
        self.partials() == other.partials()
    }
}

impl ExactSum {
    /// The empty sum (zero).
    pub const fn new() -> Self {
        ExactSum {
            len: 0,
            inline: [0.0; INLINE],
            spill: Vec::new(),
        }
    }

    /// The partials: non-overlapping, increasing in magnitude, summing exactly to
    /// the total. [`ExactSum::from_partials`] restores a sum from them.
    pub fn partials(&self) -> &[f64] {
        if self.spill.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spill
        }
    }

    fn partials_mut(&mut self) -> &mut [f64] {
        if self.spill.is_empty() {
            &mut self.inline[..self.len]
        } else {
            &mut self.spill
        }
    }

    fn truncate(&mut self, n: usize) {
        if self.spill.is_empty() {
            self.len = self.len.min(n);
        } else {
            self.spill.truncate(n);
        }
    }

    fn push(&mut self, x: f64) {
        if !self.spill.is_empty() {
            self.spill.push(x);
        } else if self.len < INLINE {
            self.inline[self.len] = x;
            self.len += 1;
        } else {
            self.spill.extend_from_slice(&self.inline);
            self.spill.push(x);
        }
    }

    /// Restores a sum from partials that [`ExactSum::partials`] returned.
    pub fn from_partials(partials: impl IntoIterator<Item = f64>) -> Self {
        let mut sum = ExactSum::new();
        for p in partials {
            sum.push(p);
        }
        sum
    }

    /// Adds `x` exactly.
    pub fn add(&mut self, x: f64) {
        let mut x = x;
        let mut kept = 0;
        let parts = self.partials_mut();
        for j in 0..parts.len() {
            let mut y = parts[j];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            // Two-sum: hi + lo == x + y exactly.
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                parts[kept] = lo;
                kept += 1;
            }
            x = hi;
        }
        self.truncate(kept);
        // Zero partials carry nothing; dropping them keeps "empty" meaning "zero".
        if x != 0.0 {
            self.push(x);
        }
    }

    /// Removes `x` exactly (adds `-x`).
    pub fn remove(&mut self, x: f64) {
        self.add(-x);
    }

    /// The exact sum rounded to the nearest f64 (ties to even).
    pub fn value(&self) -> f64 {
        let p = self.partials();
        let Some(&top) = p.last() else {
            return 0.0;
        };
        let mut hi = top;
        let mut lo = 0.0;
        let mut j = p.len() - 1;
        // Add partials from the largest down until the sum becomes inexact.
        while j > 0 {
            j -= 1;
            let x = hi;
            let y = p[j];
            hi = x + y;
            let y_rounded = hi - x;
            lo = y - y_rounded;
            if lo != 0.0 {
                break;
            }
        }
        // Half-way case: the remaining partials decide whether to round away.
        if j > 0 && ((lo < 0.0 && p[j - 1] < 0.0) || (lo > 0.0 && p[j - 1] > 0.0)) {
            let y = lo * 2.0;
            let x = hi + y;
            if y == x - hi {
                hi = x;
            }
        }
        hi
    }

    /// True when nothing (or values summing to exactly zero) has been added.
    pub fn is_zero(&self) -> bool {
        self.partials().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sliding_removal_is_exact_where_plain_f64_drifts() {
        let mut sum = ExactSum::new();
        sum.add(1e16);
        sum.add(1.0);
        sum.add(1.0);
        sum.remove(1e16);
        assert_eq!(sum.value(), 2.0);
        // Plain f64 loses both ones.
        assert_eq!(1e16 + 1.0 + 1.0 - 1e16, 0.0);
    }

    #[test]
    fn decimal_cents_sum_like_a_fresh_sum() {
        let mut sum = ExactSum::new();
        for v in [0.1, 0.2, 0.3] {
            sum.add(v);
        }
        sum.remove(0.1);
        let mut fresh = ExactSum::new();
        fresh.add(0.2);
        fresh.add(0.3);
        assert_eq!(sum.value(), fresh.value());
        assert_eq!(fresh.value(), 0.5);
    }

    #[test]
    fn many_partials_spill_to_the_heap_and_stay_exact() {
        // Powers of two far apart cannot merge: each needs its own partial.
        let values: Vec<f64> = (0..20).map(|i| 2f64.powi(i * 60 - 600)).collect();
        let mut sum = ExactSum::new();
        for v in &values {
            sum.add(*v);
        }
        assert!(sum.partials().len() > INLINE);
        for v in values.iter().skip(1) {
            sum.remove(*v);
        }
        assert_eq!(sum.value(), values[0]);
        assert_eq!(ExactSum::from_partials(sum.partials().iter().copied()), sum);
    }

    #[test]
    fn empty_and_cancelled_sums_are_zero() {
        let mut sum = ExactSum::new();
        assert!(sum.is_zero());
        assert_eq!(sum.value(), 0.0);
        sum.add(0.1);
        sum.add(0.7);
        sum.remove(0.1);
        sum.remove(0.7);
        assert!(sum.is_zero());
    }

    /// Values that are multiples of 2^-10 below 2^40 sum exactly in i128 fixed point,
    /// which is an independent oracle for the exact sum.
    fn fixed_point(values: &[i64]) -> f64 {
        let total: i128 = values.iter().map(|v| i128::from(*v)).sum();
        total as f64 / 1024.0
    }

    proptest! {
        #[test]
        fn value_equals_fixed_point_oracle_in_any_order(
            values in prop::collection::vec(-(1i64 << 50)..(1i64 << 50), 0..40),
            removed in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let mut kept = values.clone();
            let mut sum = ExactSum::new();
            for v in &values {
                sum.add(*v as f64 / 1024.0);
            }
            for idx in removed {
                if kept.is_empty() {
                    break;
                }
                let v = kept.remove(idx.index(kept.len()));
                sum.remove(v as f64 / 1024.0);
            }
            prop_assert_eq!(sum.value(), fixed_point(&kept));
            let mut reversed = ExactSum::new();
            for v in kept.iter().rev() {
                reversed.add(*v as f64 / 1024.0);
            }
            prop_assert_eq!(reversed.value(), sum.value());
        }
    }
}
