//! Instants and spans of time, at millisecond precision.
//!
//! Every time in dynseg is a [`Timestamp`]: milliseconds since the Unix epoch,
//! UTC. Windows and offsets are [`Span`]s. Both are plain integers so that the
//! window arithmetic of SPEC.md section 3 (`now - D < timestamp <= now`) is exact.

use std::fmt;

/// Milliseconds in one second, minute, hour, day and week.
const SECOND: i64 = 1_000;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;
const WEEK: i64 = 7 * DAY;

/// An instant: milliseconds since 1970-01-01T00:00:00Z.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

/// A length of time in milliseconds (may be negative in arithmetic, never in a window).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Span(pub i64);

impl Timestamp {
    /// The earliest representable instant; used as "no lower bound".
    pub const MIN: Timestamp = Timestamp(i64::MIN);
    /// The latest representable instant; used as "never".
    pub const MAX: Timestamp = Timestamp(i64::MAX);

    /// Milliseconds since the epoch.
    pub const fn millis(self) -> i64 {
        self.0
    }

    /// `self + span`, saturating at the ends of the range.
    pub const fn plus(self, span: Span) -> Timestamp {
        Timestamp(self.0.saturating_add(span.0))
    }

    /// `self - span`, saturating at the ends of the range.
    pub const fn minus(self, span: Span) -> Timestamp {
        Timestamp(self.0.saturating_sub(span.0))
    }

    /// The instant one millisecond later (saturating).
    pub const fn next(self) -> Timestamp {
        Timestamp(self.0.saturating_add(1))
    }

    /// Parses RFC 3339 (`2026-01-31T12:00:00Z`, `2026-01-31T12:00:00.250+02:00`) or a
    /// bare date (`2026-01-31`, midnight UTC). Digits past milliseconds are truncated.
    pub fn parse_rfc3339(text: &str) -> Result<Timestamp, TimeParseError> {
        parse_rfc3339(text)
    }
}

impl Span {
    /// Zero length.
    pub const ZERO: Span = Span(0);

    /// A span of `n` whole seconds.
    pub const fn seconds(n: i64) -> Span {
        Span(n * SECOND)
    }

    /// A span of `n` whole minutes.
    pub const fn minutes(n: i64) -> Span {
        Span(n * MINUTE)
    }

    /// A span of `n` whole hours.
    pub const fn hours(n: i64) -> Span {
        Span(n * HOUR)
    }

    /// A span of `n` whole days.
    pub const fn days(n: i64) -> Span {
        Span(n * DAY)
    }

    /// Milliseconds in the span.
    pub const fn millis(self) -> i64 {
        self.0
    }

    /// The span for `amount` of `unit` (`s`, `m`, `h`, `d` or `w`), or `None` for an
    /// unknown unit or an overflow.
    pub fn from_unit(amount: i64, unit: &str) -> Option<Span> {
        let per = match unit {
            "s" => SECOND,
            "m" => MINUTE,
            "h" => HOUR,
            "d" => DAY,
            "w" => WEEK,
            _ => return None,
        };
        amount.checked_mul(per).map(Span)
    }
}

impl fmt::Display for Span {
    /// Prints the span in the largest unit up to days that divides it exactly
    /// (`90d`, `36h`), which is also how the rule language spells it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        if ms == 0 {
            return f.write_str("0s");
        }
        for (per, unit) in [(DAY, "d"), (HOUR, "h"), (MINUTE, "m"), (SECOND, "s")] {
            if ms != 0 && ms % per == 0 {
                return write!(f, "{}{unit}", ms / per);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC; milliseconds are printed only when they are not zero.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.0.div_euclid(DAY);
        let in_day = self.0.rem_euclid(DAY);
        let (year, month, day) = civil_from_days(days);
        let (h, m, s, ms) = (
            in_day / HOUR,
            in_day % HOUR / MINUTE,
            in_day % MINUTE / SECOND,
            in_day % SECOND,
        );
        write!(f, "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}")?;
        if ms != 0 {
            write!(f, ".{ms:03}")?;
        }
        f.write_str("Z")
    }
}

/// Why a timestamp text did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid timestamp {text:?}: {reason}")]
pub struct TimeParseError {
    /// The text that was given.
    pub text: String,
    /// What was wrong with it.
    pub reason: &'static str,
}

fn parse_rfc3339(text: &str) -> Result<Timestamp, TimeParseError> {
    let fail = |reason| TimeParseError {
        text: text.to_owned(),
        reason,
    };
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Result<i64, TimeParseError> {
        let part = b.get(range).ok_or_else(|| fail("too short"))?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return Err(fail("expected digits"));
        }
        Ok(part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let expect = |at: usize, what: &[u8], reason| match b.get(at) {
        Some(c) if what.contains(c) => Ok(()),
        _ => Err(fail(reason)),
    };
    let year = digits(0..4)?;
    expect(4, b"-", "expected '-' after the year")?;
    let month = digits(5..7)?;
    expect(7, b"-", "expected '-' after the month")?;
    let day = digits(8..10)?;
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(fail("no such date"));
    }
    let date_ms = days_from_civil(year, month, day) * DAY;
    if b.len() == 10 {
        return Ok(Timestamp(date_ms));
    }
    expect(10, b"Tt ", "expected 'T' between date and time")?;
    let hour = digits(11..13)?;
    expect(13, b":", "expected ':' after the hour")?;
    let minute = digits(14..16)?;
    expect(16, b":", "expected ':' after the minute")?;
    let second = digits(17..19)?;
    if hour > 23 || minute > 59 || second > 59 {
        return Err(fail("time of day out of range"));
    }
    let mut at = 19;
    let mut millis = 0;
    if b.get(at) == Some(&b'.') {
        let start = at + 1;
        at = start;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
        if at == start {
            return Err(fail("expected digits after '.'"));
        }
        // Keep the first three digits (milliseconds); finer digits are truncated.
        for i in 0..3 {
            let d = b
                .get(start + i)
                .filter(|_| start + i < at)
                .map_or(0, |d| i64::from(d - b'0'));
            millis = millis * 10 + d;
        }
    }
    let offset_ms = match b.get(at) {
        Some(b'Z' | b'z') if b.len() == at + 1 => 0,
        Some(sign @ (b'+' | b'-')) if b.len() == at + 6 => {
            let oh = digits(at + 1..at + 3)?;
            expect(at + 3, b":", "expected ':' in the UTC offset")?;
            let om = digits(at + 4..at + 6)?;
            if oh > 23 || om > 59 {
                return Err(fail("UTC offset out of range"));
            }
            let offset = oh * HOUR + om * MINUTE;
            if *sign == b'+' { offset } else { -offset }
        }
        _ => return Err(fail("expected 'Z' or a UTC offset like +02:00 at the end")),
    };
    let ms = date_ms + hour * HOUR + minute * MINUTE + second * SECOND + millis - offset_ms;
    Ok(Timestamp(ms))
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date, by counting whole 400-year
/// eras (146097 days each) from year 0 with March as the first month, so that the
/// leap day falls at the end of the counted year.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> Timestamp {
        Timestamp::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn epoch_and_known_instants() {
        assert_eq!(ts("1970-01-01T00:00:00Z"), Timestamp(0));
        assert_eq!(ts("1970-01-02"), Timestamp(DAY));
        // 2026-01-01T00:00:00Z is 20454 days after the epoch.
        assert_eq!(ts("2026-01-01T00:00:00Z"), Timestamp(20_454 * DAY));
        assert_eq!(ts("2000-02-29T12:30:15.250Z"), Timestamp(951_827_415_250));
        assert_eq!(ts("1969-12-31T23:59:59.999Z"), Timestamp(-1));
    }

    #[test]
    fn offsets_and_fractions() {
        assert_eq!(ts("2026-01-01T02:00:00+02:00"), ts("2026-01-01T00:00:00Z"));
        assert_eq!(ts("2025-12-31T19:00:00-05:00"), ts("2026-01-01T00:00:00Z"));
        assert_eq!(ts("2026-01-01T00:00:00.123456Z").millis() % 1000, 123);
        assert_eq!(ts("2026-01-01T00:00:00.5Z").millis() % 1000, 500);
    }

    #[test]
    fn display_round_trips_over_a_wide_range() {
        let mut t = -3_000_000_000_000i64;
        while t < 5_000_000_000_000 {
            let stamp = Timestamp(t);
            assert_eq!(ts(&stamp.to_string()), stamp, "{stamp}");
            t += 7_777_777_777;
        }
        assert_eq!(Timestamp(1).to_string(), "1970-01-01T00:00:00.001Z");
    }

    #[test]
    fn rejects_malformed_text_with_a_reason() {
        for bad in [
            "",
            "2026",
            "2026-13-01",
            "2026-02-30",
            "2026-01-01T25:00:00Z",
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00.Z",
            "2026-01-01T00:00:00+2",
            "2026-01-01x",
            "２０２６-01-01",
        ] {
            let err = Timestamp::parse_rfc3339(bad).unwrap_err();
            assert_eq!(err.text, bad);
        }
    }

    #[test]
    fn spans_print_in_their_largest_exact_unit() {
        assert_eq!(Span::days(90).to_string(), "90d");
        assert_eq!(Span::days(14).to_string(), "14d");
        assert_eq!(Span::from_unit(2, "w"), Some(Span::days(14)));
        assert_eq!(Span::hours(36).to_string(), "36h");
        assert_eq!(Span(1500).to_string(), "1500ms");
        assert_eq!(Span::ZERO.to_string(), "0s");
        assert_eq!(Span::from_unit(5, "m"), Some(Span::minutes(5)));
        assert_eq!(Span::from_unit(i64::MAX, "d"), None);
        assert_eq!(Span::from_unit(1, "y"), None);
    }
}
