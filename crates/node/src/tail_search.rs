//! A search that starts from the end of a sorted run.
//!
//! What a shard looks up in its runs is nearly always among their last few
//! entries: the batch that just became durable (the oldest still in flight),
//! the changes after a follower's cursor (the follower is nearly caught up).
//! A binary search over the whole run, which holds everything since the last
//! checkpoint, touched a cold cache line at each of its steps: about 4% of
//! the dev cluster's CPU at 256 shards (perf). Probing the last 1, 2, 4, ...
//! entries first keeps the search in the run's warm tail.

/// The partition point of `len` entries where `is_before` holds for a prefix
/// and not after: the first index at which it does not hold (`len` when it
/// holds for all). Takes O(log d) probes, `d` being the answer's distance
/// from the end.
pub(crate) fn partition_point_from_end(len: usize, is_before: impl Fn(usize) -> bool) -> usize {
    // Every index at or past `hi` is not before.
    let mut hi = len;
    let mut step = 1;
    let mut lo = loop {
        if hi == 0 {
            break 0;
        }
        let probe = len.saturating_sub(step).min(hi - 1);
        if is_before(probe) {
            break probe + 1;
        }
        hi = probe;
        step = step.saturating_mul(2);
    };
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if is_before(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(proptest::test_runner::Config {
            rng_seed: proptest::test_runner::RngSeed::Fixed(20_261_130),
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        })]
        /// The same answer as the standard library's binary search, for every
        /// threshold from below the first entry to past the last.
        #[test]
        fn it_finds_what_a_binary_search_finds(
            mut run in prop::collection::vec(0u64..1_000, 0..300),
            threshold in 0u64..1_002,
        ) {
            run.sort_unstable();
            let want = run.partition_point(|v| *v < threshold);
            prop_assert_eq!(partition_point_from_end(run.len(), |i| run[i] < threshold), want);
        }
    }

    #[test]
    fn a_near_end_answer_takes_few_probes() {
        let run: Vec<u64> = (0..1_000_000).collect();
        let probes = std::cell::Cell::new(0);
        let at = partition_point_from_end(run.len(), |i| {
            probes.set(probes.get() + 1);
            run[i] < 999_997
        });
        assert_eq!(at, 999_997);
        assert!(probes.get() <= 6, "{} probes", probes.get());
    }
}
