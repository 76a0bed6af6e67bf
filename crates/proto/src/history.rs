//! Segment size history: intervals, the points of one shard's change log, and
//! the sum of many shards' or nodes' points. Shared by the node (which reads
//! its shards' change logs) and the gateway (which sums the nodes).
//!
//! A point's size is derived backwards from the size now: the size at the end
//! of an interval is the size now less the enters and plus the exits of every
//! later interval. So sizes are exact as far back as the change log reaches.

use crate::pb;

/// Intervals whose (enters + exits) / size exceed this are volatile unless a
/// request says otherwise.
pub const DEFAULT_VOLATILITY_THRESHOLD: f64 = 0.5;

/// Points one answer holds at most (a week of minutes).
pub const MAX_POINTS: usize = 7 * 24 * 60;

/// The intervals of one history request, aligned to UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Intervals {
    /// Start of the first interval (ms since the epoch).
    pub first: i64,
    /// Length of each.
    pub step: i64,
    /// How many, the last holding now.
    pub count: usize,
}

/// The length of `interval` in milliseconds (unspecified: an hour).
pub fn interval_ms(interval: pb::HistoryInterval) -> i64 {
    match interval {
        pb::HistoryInterval::Minute => 60_000,
        pb::HistoryInterval::Unspecified | pb::HistoryInterval::Hour => 3_600_000,
        pb::HistoryInterval::Day => 86_400_000,
    }
}

impl Intervals {
    /// The intervals from the one holding `since_ms` to the one holding
    /// `now_ms`; an error when there would be more than [`MAX_POINTS`].
    pub fn new(since_ms: i64, now_ms: i64, step: i64) -> Result<Intervals, String> {
        let first = since_ms.min(now_ms).div_euclid(step) * step;
        let last = now_ms.div_euclid(step) * step;
        let count = ((last - first) / step) as usize + 1;
        if count > MAX_POINTS {
            return Err(format!(
                "{count} intervals asked, over the limit of {MAX_POINTS}: use a longer interval or a later --since"
            ));
        }
        Ok(Intervals { first, step, count })
    }

    /// The interval holding `at_ms` (the last for anything after it; `None`
    /// before the first).
    pub fn index(&self, at_ms: i64) -> Option<usize> {
        if at_ms < self.first {
            return None;
        }
        Some((((at_ms - self.first) / self.step) as usize).min(self.count - 1))
    }
}

/// Enters and exits per interval, counted from a change log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tally {
    intervals: Intervals,
    enters: Vec<u64>,
    exits: Vec<u64>,
}

impl Tally {
    /// No changes yet.
    pub fn new(intervals: Intervals) -> Tally {
        Tally {
            intervals,
            enters: vec![0; intervals.count],
            exits: vec![0; intervals.count],
        }
    }

    /// Counts one change at `at_ms` (changes before the first interval are
    /// ignored).
    pub fn add(&mut self, at_ms: i64, enter: bool) {
        if let Some(i) = self.intervals.index(at_ms) {
            if enter {
                self.enters[i] += 1;
            } else {
                self.exits[i] += 1;
            }
        }
    }

    /// The points, given the size at the end of the last interval (now).
    pub fn points(&self, size_now: u64) -> Vec<pb::HistoryPoint> {
        let mut points = vec![pb::HistoryPoint::default(); self.intervals.count];
        let mut size = size_now as i64;
        for i in (0..self.intervals.count).rev() {
            points[i] = pb::HistoryPoint {
                start_ms: self.intervals.first + i as i64 * self.intervals.step,
                enters: self.enters[i],
                exits: self.exits[i],
                size: size.max(0) as u64,
                ..Default::default()
            };
            size = size - self.enters[i] as i64 + self.exits[i] as i64;
        }
        points
    }
}

/// Sums the points of several shards or nodes. Parts may end one interval
/// apart (nodes' clocks differ): a part's size carries on past its end.
pub fn sum(parts: Vec<Vec<pb::HistoryPoint>>) -> Vec<pb::HistoryPoint> {
    let mut by_start: std::collections::BTreeMap<i64, pb::HistoryPoint> = Default::default();
    for part in &parts {
        for p in part {
            let total = by_start
                .entry(p.start_ms)
                .or_insert_with(|| pb::HistoryPoint {
                    start_ms: p.start_ms,
                    ..Default::default()
                });
            total.enters += p.enters;
            total.exits += p.exits;
        }
    }
    for part in &parts {
        let mut own = part.iter().peekable();
        let mut size = 0;
        for (start, total) in by_start.iter_mut() {
            while let Some(p) = own.next_if(|p| p.start_ms <= *start) {
                size = p.size;
            }
            total.size += size;
        }
    }
    by_start.into_values().collect()
}

/// Sums several nodes' webhook delivery statuses, per URL.
pub fn sum_webhooks(parts: Vec<Vec<pb::WebhookStatus>>) -> Vec<pb::WebhookStatus> {
    let mut by_url: std::collections::BTreeMap<String, pb::WebhookStatus> =
        std::collections::BTreeMap::new();
    for s in parts.into_iter().flatten() {
        let total = by_url
            .entry(s.url.clone())
            .or_insert_with(|| pb::WebhookStatus {
                url: s.url.clone(),
                ..Default::default()
            });
        total.shards += s.shards;
        total.delivered += s.delivered;
        total.failed_attempts += s.failed_attempts;
        total.behind += s.behind;
        total.last_delivered_ms = total.last_delivered_ms.max(s.last_delivered_ms);
        if s.last_error_ms > total.last_error_ms {
            total.last_error_ms = s.last_error_ms;
            total.last_error = s.last_error;
        }
    }
    by_url.into_values().collect()
}

/// Sets each point's volatility, (enters + exits) / max(size at the start,
/// size at the end, 1), and whether it exceeds `threshold`.
pub fn flag(points: &mut [pb::HistoryPoint], threshold: f64) {
    for p in points {
        let start = (p.size + p.exits).saturating_sub(p.enters);
        let churn = (p.enters + p.exits) as f64;
        p.volatility = churn / start.max(p.size).max(1) as f64;
        p.volatile = p.volatility > threshold;
    }
}

/// The threshold a request asks for (0 or less, or not a number: the default).
pub fn threshold(asked: f64) -> f64 {
    if asked > 0.0 && asked.is_finite() {
        asked
    } else {
        DEFAULT_VOLATILITY_THRESHOLD
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    fn point(start_ms: i64, enters: u64, exits: u64, size: u64) -> pb::HistoryPoint {
        pb::HistoryPoint {
            start_ms,
            enters,
            exits,
            size,
            ..Default::default()
        }
    }

    #[test]
    fn intervals_align_to_utc_and_end_at_now() {
        let i = Intervals::new(HOUR + 5, 3 * HOUR + 7, HOUR).unwrap();
        assert_eq!((i.first, i.count), (HOUR, 3));
        assert_eq!(i.index(HOUR - 1), None);
        assert_eq!(i.index(2 * HOUR), Some(1));
        assert_eq!(i.index(10 * HOUR), Some(2));
        assert!(Intervals::new(0, (MAX_POINTS as i64) * 60_000, 60_000).is_err());
    }

    #[test]
    fn sizes_are_derived_backwards_from_now() {
        let mut tally = Tally::new(Intervals::new(0, 2 * HOUR + 1, HOUR).unwrap());
        for (at, enter) in [
            (-5, true),
            (10, true),
            (20, true),
            (HOUR + 1, false),
            (2 * HOUR, true),
        ] {
            tally.add(at, enter);
        }
        // Now 2 members: the last hour added one, the one before removed one.
        assert_eq!(
            tally.points(2),
            vec![
                point(0, 2, 0, 2),
                point(HOUR, 0, 1, 1),
                point(2 * HOUR, 1, 0, 2)
            ]
        );
    }

    #[test]
    fn sums_carry_a_shorter_part_size_forward() {
        let a = vec![point(0, 1, 0, 1), point(HOUR, 1, 0, 2)];
        let b = vec![point(0, 3, 1, 5)];
        assert_eq!(
            sum(vec![a, b]),
            vec![point(0, 4, 1, 6), point(HOUR, 1, 0, 7)]
        );
    }

    #[test]
    fn volatility_is_churn_over_the_larger_size() {
        let mut points = vec![
            point(0, 2, 2, 4),
            point(HOUR, 1, 0, 10),
            point(2 * HOUR, 1, 1, 0),
        ];
        flag(&mut points, 0.5);
        // 4 changes over 4 members; 1 over 10 (9 at the start); 2 over none
        // (counted as 1).
        let got: Vec<(f64, bool)> = points.iter().map(|p| (p.volatility, p.volatile)).collect();
        assert_eq!(got, vec![(1.0, true), (0.1, false), (2.0, true)]);
        assert_eq!(threshold(0.0), DEFAULT_VOLATILITY_THRESHOLD);
        assert_eq!(threshold(f64::NAN), DEFAULT_VOLATILITY_THRESHOLD);
        assert_eq!(threshold(0.25), 0.25);
    }
}
