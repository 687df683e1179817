//! 5-field cron expressions and their slots in an IANA time zone (pure, no clock).
//!
//! Semantics (those of Vixie cron, made exact for daylight-saving changes):
//! - fields: `minute hour day-of-month month day-of-week`, each a list of `*`, `N`,
//!   `N-M`, optionally `/step` (`N/step` means `N-max/step`); day-of-week 0 or 7 is
//!   Sunday; when both day fields are restricted a day matching either runs.
//! - a local time that does not exist (the hour skipped when clocks go forward) runs
//!   at the first local minute after the gap, so a 02:30 daily job still runs once on
//!   that day;
//! - a local time that exists twice (the hour repeated when clocks go back) runs
//!   once, at its first occurrence.
//!
//! A slot is a UTC instant; the mapping from local wall time to instant is monotone,
//! so the first candidate after an instant (or the last one before) is the answer.

use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// A parsed cron expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    days_any: bool,
    weekdays_any: bool,
}

/// The five fields: name, lowest and highest value.
const FIELDS: [(&str, u32, u32); 5] = [
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 7),
];

/// A number of at most two digits.
fn number(s: &str) -> Option<u32> {
    (!s.is_empty() && s.len() <= 2 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Parses one field into a bit set of the values in `min..=max`, or says what is wrong.
fn field(s: &str, (name, min, max): (&str, u32, u32)) -> Result<u64, String> {
    let num = |v: &str| match number(v) {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        Some(n) => Err(format!("{name} field {s:?}: {n} is out of {min}-{max}")),
        None => Err(format!("{name} field {s:?}: {v:?} is not a number")),
    };
    let mut bits = 0u64;
    for item in s.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, st)) => match number(st) {
                // A step longer than the field would only ever match its first value.
                Some(n) if (1..=max - min + 1).contains(&n) => (r, Some(n)),
                _ => {
                    return Err(format!(
                        "{name} field {s:?}: step {st:?} is not within 1-{}",
                        max - min + 1
                    ))
                }
            },
            None => (item, None),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err(format!("{name} field {s:?}: range {a}-{b} is backwards"));
            }
            (a, b)
        } else {
            let a = num(range)?;
            // `N/step` runs from N to the end of the range.
            (a, if step.is_some() { max } else { a })
        };
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step.unwrap_or(1);
        }
    }
    Ok(bits)
}

impl Cron {
    /// Parses a 5-field expression, or says which field is wrong and why.
    pub fn parse(s: &str) -> Result<Cron, String> {
        let f: Vec<&str> = s.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = f[..] else {
            return Err(format!("{} fields, not 5", f.len()));
        };
        let narrow = |bits: u64| -> Result<u32, String> {
            u32::try_from(bits).map_err(|_| "field out of range".to_string())
        };
        let weekdays = field(dow, FIELDS[4])?;
        Ok(Cron {
            minutes: field(minute, FIELDS[0])?,
            hours: narrow(field(hour, FIELDS[1])?)?,
            days: narrow(field(dom, FIELDS[2])?)?,
            months: u16::try_from(field(month, FIELDS[3])?)
                .map_err(|_| "month out of range".to_string())?,
            // 7 is Sunday too.
            weekdays: u8::try_from((weekdays | (weekdays >> 7)) & 0x7f)
                .map_err(|_| "day-of-week out of range".to_string())?,
            days_any: dom.starts_with('*'),
            weekdays_any: dow.starts_with('*'),
        })
    }

    fn day_matches(&self, d: NaiveDate) -> bool {
        use chrono::Datelike;
        if self.months & (1 << d.month()) == 0 {
            return false;
        }
        let dom = self.days & (1 << d.day()) != 0;
        let dow = self.weekdays & (1 << d.weekday().num_days_from_sunday()) != 0;
        if self.days_any || self.weekdays_any {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// The matching local times of one day, in order.
    fn times(&self, d: NaiveDate) -> impl DoubleEndedIterator<Item = NaiveDateTime> + '_ {
        (0..24u32)
            .filter(|h| self.hours & (1 << h) != 0)
            .flat_map(move |h| {
                (0..60u32)
                    .filter(|m| self.minutes & (1 << m) != 0)
                    .filter_map(move |m| d.and_hms_opt(h, m, 0))
            })
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// The first slot strictly after `after`, in `tz`; `None` if none within 5 years
    /// (e.g. `0 0 31 2 *`).
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let start = after.with_timezone(&tz).date_naive().pred_opt()?;
        for day in start.iter_days().take(366 * 5 + 2) {
            if !self.day_matches(day) {
                continue;
            }
            for t in self.times(day) {
                let at = resolve(tz, t)?;
                if at > after {
                    return Some(at);
                }
            }
        }
        None
    }

    /// The last slot at or before `at`, in `tz`; `None` if none within 5 years.
    pub fn last_at_or_before(&self, at: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let start = at.with_timezone(&tz).date_naive().succ_opt()?;
        let mut day = start;
        for _ in 0..(366 * 5 + 2) {
            if self.day_matches(day) {
                for t in self.times(day).rev() {
                    let slot = resolve(tz, t)?;
                    if slot <= at {
                        return Some(slot);
                    }
                }
            }
            day = day.pred_opt()?;
        }
        None
    }
}

/// The instant of local time `t` in `tz`: the earlier one when it exists twice, the
/// first existing minute after the gap when it does not exist.
fn resolve(tz: Tz, t: NaiveDateTime) -> Option<DateTime<Utc>> {
    let mut t = t;
    // Gaps are at most a few hours (a day when a zone skipped one, e.g. Samoa 2011).
    for _ in 0..(26 * 60) {
        if let Some(d) = tz.from_local_datetime(&t).earliest() {
            return Some(d.with_timezone(&Utc));
        }
        t += Duration::minutes(1);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(c: &str, after: &str, tz: &str) -> String {
        let tz: Tz = tz.parse().unwrap();
        Cron::parse(c)
            .unwrap()
            .next_after(utc(after), tz)
            .unwrap()
            .to_rfc3339()
    }

    #[test]
    fn parse_rules() {
        for good in [
            "* * * * *",
            "0 0 1 1 0",
            "*/5 0-6,22-23 * 1-12/2 7",
            "59 23 31 12 6",
            "5/15 * * * *",
        ] {
            assert!(Cron::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "* * * *",
            "* * * * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * * 13 *",
            "* * * * 8",
            "*/0 * * * *",
            "*/61 * * * *",
            "0 */25 * * *",
            "5-1 * * * *",
            "a * * * *",
            "1,,2 * * * *",
            "@daily",
        ] {
            assert!(Cron::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Cron::parse("*/61 * * * *").unwrap_err(),
            "minute field \"*/61\": step \"61\" is not within 1-60"
        );
        assert_eq!(
            Cron::parse("0 0 32 * *").unwrap_err(),
            "day-of-month field \"32\": 32 is out of 1-31"
        );
    }

    #[test]
    fn simple_slots() {
        assert_eq!(
            next("* * * * *", "2026-12-01T08:10:30Z", "UTC"),
            "2026-12-01T08:11:00+00:00"
        );
        assert_eq!(
            next("* * * * *", "2026-12-01T08:10:00Z", "UTC"),
            "2026-12-01T08:11:00+00:00"
        );
        assert_eq!(
            next("30 2 * * *", "2026-12-01T08:10:00Z", "UTC"),
            "2026-12-02T02:30:00+00:00"
        );
        // Paris is UTC+1 in winter.
        assert_eq!(
            next("30 2 * * *", "2026-12-01T08:10:00Z", "Europe/Paris"),
            "2026-12-02T01:30:00+00:00"
        );
        // Day of month OR day of week when both are restricted: the 1st, or a Monday.
        assert_eq!(
            next("0 0 1 * 1", "2026-12-01T08:00:00Z", "UTC"),
            "2026-12-07T00:00:00+00:00"
        );
        // Only a day of week restricted: Sundays (0 and 7).
        assert_eq!(
            next("0 12 * * 7", "2026-12-01T08:00:00Z", "UTC"),
            "2026-12-06T12:00:00+00:00"
        );
        let tz: Tz = "UTC".parse().unwrap();
        assert_eq!(
            Cron::parse("0 0 31 2 *")
                .unwrap()
                .next_after(utc("2026-01-01T00:00:00Z"), tz),
            None
        );
    }

    #[test]
    fn spring_forward_gap_runs_once_after_the_gap() {
        // Europe/Paris 2026-03-29: 02:00 CET -> 03:00 CEST (01:00Z).
        assert_eq!(
            next("30 2 * * *", "2026-03-28T12:00:00Z", "Europe/Paris"),
            "2026-03-29T01:00:00+00:00"
        );
        // The day after: 02:30 CEST = 00:30Z.
        assert_eq!(
            next("30 2 * * *", "2026-03-29T01:00:00Z", "Europe/Paris"),
            "2026-03-30T00:30:00+00:00"
        );
        // Every 15 minutes across the gap: 01:45 CET, then 03:00 CEST once (the
        // skipped 02:xx slots collapse onto it), then 03:15.
        let tz: Tz = "Europe/Paris".parse().unwrap();
        let c = Cron::parse("*/15 * * * *").unwrap();
        let mut t = utc("2026-03-29T00:30:00Z");
        let mut got = Vec::new();
        for _ in 0..4 {
            t = c.next_after(t, tz).unwrap();
            got.push(t.to_rfc3339());
        }
        assert_eq!(
            got,
            [
                "2026-03-29T00:45:00+00:00",
                "2026-03-29T01:00:00+00:00",
                "2026-03-29T01:15:00+00:00",
                "2026-03-29T01:30:00+00:00"
            ]
        );
    }

    #[test]
    fn fall_back_repeated_hour_runs_once() {
        // Europe/Paris 2026-10-25: 03:00 CEST -> 02:00 CET (01:00Z); 02:30 exists twice.
        assert_eq!(
            next("30 2 * * *", "2026-10-24T12:00:00Z", "Europe/Paris"),
            "2026-10-25T00:30:00+00:00"
        );
        // After the first 02:30, the second one (01:30Z) does not run again.
        assert_eq!(
            next("30 2 * * *", "2026-10-25T00:30:00Z", "Europe/Paris"),
            "2026-10-26T01:30:00+00:00"
        );
        // Hourly: 02:00 CEST (00:00Z), 03:00 CET (02:00Z): the repeated 02:00 is skipped.
        assert_eq!(
            next("0 * * * *", "2026-10-25T00:00:00Z", "Europe/Paris"),
            "2026-10-25T02:00:00+00:00"
        );
        // America/New_York 2026-11-01 01:30 exists twice: first at 05:30Z.
        assert_eq!(
            next("30 1 * * *", "2026-10-31T12:00:00Z", "America/New_York"),
            "2026-11-01T05:30:00+00:00"
        );
    }

    #[test]
    fn last_at_or_before_mirrors_next_after() {
        let tz: Tz = "Europe/Paris".parse().unwrap();
        for c in ["*/15 * * * *", "30 2 * * *", "0 * * * *", "0 0 1 * 1"] {
            let c = Cron::parse(c).unwrap();
            let mut t = utc("2026-03-27T00:00:00Z");
            for _ in 0..50 {
                let n = c.next_after(t, tz).unwrap();
                assert_eq!(c.last_at_or_before(n, tz), Some(n));
                assert!(c
                    .last_at_or_before(n - Duration::seconds(1), tz)
                    .is_none_or(|p| p < n));
                t = n;
            }
        }
        let c = Cron::parse("30 2 * * *").unwrap();
        assert_eq!(
            c.last_at_or_before(utc("2026-10-25T01:45:00Z"), tz),
            Some(utc("2026-10-25T00:30:00Z"))
        );
    }
}
