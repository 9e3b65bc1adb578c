//! DSP0004 datetime values: timestamps `yyyymmddHHMMSS.mmmmmmsUUU` (`s` is `+` or `-`, `UUU` the
//! offset from UTC in minutes) and intervals `ddddddddHHMMSS.mmmmmm:000`.

use std::fmt;

/// A CIM datetime: an absolute timestamp or an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CimDateTime {
    Timestamp {
        year: u16,
        month: u8,
        day: u8,
        hour: u8,
        minute: u8,
        second: u8,
        micros: u32,
        utc_offset_minutes: i16,
    },
    Interval {
        days: u32,
        hours: u8,
        minutes: u8,
        seconds: u8,
        micros: u32,
    },
}

/// A datetime string that is not in either DSP0004 form.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum DateTimeError {
    #[error("a CIM datetime has 25 characters, '{0}' has {1}")]
    Length(String, usize),
    #[error(
        "'{0}' is not a CIM datetime: expected digits, '.', and '+', '-' or ':' at fixed positions"
    )]
    Shape(String),
    #[error("the {field} of '{text}' is out of range")]
    Range { field: &'static str, text: String },
}

fn digits(s: &[u8], from: usize, to: usize) -> u32 {
    s[from..to]
        .iter()
        .fold(0, |acc, b| acc * 10 + u32::from(b - b'0'))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    let leap = matches!((year % 4, year % 100, year % 400), (_, _, 0) | (0, 1.., _));
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 for a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl CimDateTime {
    /// Parses the 25-character form, checking every field's range.
    pub fn parse(s: &str) -> Result<CimDateTime, DateTimeError> {
        let b = s.as_bytes();
        if b.len() != 25 {
            return Err(DateTimeError::Length(s.to_string(), s.chars().count()));
        }
        let shape_ok = b[..14].iter().all(u8::is_ascii_digit)
            && b[14] == b'.'
            && b[15..21].iter().all(u8::is_ascii_digit)
            && matches!(b[21], b'+' | b'-' | b':')
            && b[22..].iter().all(u8::is_ascii_digit);
        if !shape_ok {
            return Err(DateTimeError::Shape(s.to_string()));
        }
        let range = |field| DateTimeError::Range {
            field,
            text: s.to_string(),
        };
        let micros = digits(b, 15, 21);
        let (hh, mm, ss) = (digits(b, 8, 10), digits(b, 10, 12), digits(b, 12, 14));
        if hh > 23 {
            return Err(range("hour"));
        }
        if mm > 59 {
            return Err(range("minute"));
        }
        if ss > 59 {
            return Err(range("second"));
        }
        if b[21] == b':' {
            if &b[22..] != b"000" {
                return Err(DateTimeError::Shape(s.to_string()));
            }
            return Ok(CimDateTime::Interval {
                days: digits(b, 0, 8),
                hours: hh as u8,
                minutes: mm as u8,
                seconds: ss as u8,
                micros,
            });
        }
        let (year, month, day) = (digits(b, 0, 4), digits(b, 4, 6), digits(b, 6, 8));
        if !(1..=12).contains(&month) {
            return Err(range("month"));
        }
        if day == 0 || day > days_in_month(year, month) {
            return Err(range("day"));
        }
        let offset = digits(b, 22, 25) as i16;
        Ok(CimDateTime::Timestamp {
            year: year as u16,
            month: month as u8,
            day: day as u8,
            hour: hh as u8,
            minute: mm as u8,
            second: ss as u8,
            micros,
            utc_offset_minutes: if b[21] == b'-' { -offset } else { offset },
        })
    }

    /// A UTC timestamp (offset `+000`) for seconds since the Unix epoch. Years outside
    /// 0..=9999 are clamped to that range.
    pub fn from_unix(secs: i64, micros: u32) -> CimDateTime {
        const MIN: i64 = -62_167_219_200; // 0000-01-01T00:00:00Z
        const MAX: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
        let secs = secs.clamp(MIN, MAX);
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        CimDateTime::Timestamp {
            year: year as u16,
            month: month as u8,
            day: day as u8,
            hour: (rem / 3600) as u8,
            minute: (rem % 3600 / 60) as u8,
            second: (rem % 60) as u8,
            micros: micros.min(999_999),
            utc_offset_minutes: 0,
        }
    }

    /// Seconds since the Unix epoch and microseconds; `None` for intervals.
    pub fn to_unix(&self) -> Option<(i64, u32)> {
        match *self {
            CimDateTime::Timestamp {
                year,
                month,
                day,
                hour,
                minute,
                second,
                micros,
                utc_offset_minutes,
            } => {
                let days = days_from_civil(year.into(), month.into(), day.into());
                let local = days * 86_400
                    + i64::from(hour) * 3600
                    + i64::from(minute) * 60
                    + i64::from(second);
                Some((local - i64::from(utc_offset_minutes) * 60, micros))
            }
            CimDateTime::Interval { .. } => None,
        }
    }

    /// An interval of `total_secs` seconds; days saturate at 99 999 999.
    pub fn interval_from_secs(total_secs: u64) -> CimDateTime {
        let days = (total_secs / 86_400).min(99_999_999) as u32;
        let rem = total_secs % 86_400;
        CimDateTime::Interval {
            days,
            hours: (rem / 3600) as u8,
            minutes: (rem % 3600 / 60) as u8,
            seconds: (rem % 60) as u8,
            micros: 0,
        }
    }

    /// Whole seconds of an interval; `None` for timestamps.
    pub fn interval_total_secs(&self) -> Option<u64> {
        match *self {
            CimDateTime::Interval {
                days,
                hours,
                minutes,
                seconds,
                ..
            } => Some(
                u64::from(days) * 86_400
                    + u64::from(hours) * 3600
                    + u64::from(minutes) * 60
                    + u64::from(seconds),
            ),
            CimDateTime::Timestamp { .. } => None,
        }
    }
}

impl fmt::Display for CimDateTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CimDateTime::Timestamp {
                year,
                month,
                day,
                hour,
                minute,
                second,
                micros,
                utc_offset_minutes,
            } => {
                let sign = if utc_offset_minutes < 0 { '-' } else { '+' };
                write!(
                    f,
                    "{year:04}{month:02}{day:02}{hour:02}{minute:02}{second:02}.{:06}{sign}{:03}",
                    micros % 1_000_000,
                    utc_offset_minutes.unsigned_abs() % 1000
                )
            }
            CimDateTime::Interval {
                days,
                hours,
                minutes,
                seconds,
                micros,
            } => write!(
                f,
                "{:08}{hours:02}{minutes:02}{seconds:02}.{:06}:000",
                days % 100_000_000,
                micros % 1_000_000
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_an_interval_from_the_spec() {
        let d = CimDateTime::parse("00000000183000.000000:000").expect("valid interval");
        assert_eq!(d.interval_total_secs(), Some(18 * 3600 + 30 * 60));
        assert_eq!(d.to_string(), "00000000183000.000000:000");
    }

    #[test]
    fn parses_a_timestamp_with_negative_offset() {
        let d = CimDateTime::parse("20240229235959.123456-300").expect("valid timestamp");
        // 2024-02-29T23:59:59 at UTC-5 is 2024-03-01T04:59:59Z = 1709269199.
        assert_eq!(d.to_unix(), Some((1_709_269_199, 123_456)));
    }

    #[test]
    fn rejects_bad_fields() {
        assert!(matches!(
            CimDateTime::parse("20230229000000.000000+000"),
            Err(DateTimeError::Range { field: "day", .. })
        ));
        assert!(matches!(
            CimDateTime::parse("20231301000000.000000+000"),
            Err(DateTimeError::Range { field: "month", .. })
        ));
        assert!(matches!(
            CimDateTime::parse("00000000240000.000000:000"),
            Err(DateTimeError::Range { field: "hour", .. })
        ));
        assert!(CimDateTime::parse("20000229000000.000000+000").is_ok());
        assert!(CimDateTime::parse("19000229000000.000000+000").is_err());
        assert!(CimDateTime::parse("00000000000000.000000:001").is_err());
        assert!(CimDateTime::parse("2023").is_err());
        assert!(CimDateTime::parse("2023010100000a.000000+000").is_err());
        assert!(CimDateTime::parse("20230101000000.000000+00é").is_err());
    }

    #[test]
    fn unix_epoch() {
        let d = CimDateTime::from_unix(0, 0);
        assert_eq!(d.to_string(), "19700101000000.000000+000");
        assert_eq!(
            CimDateTime::interval_from_secs(90061).to_string(),
            "00000001010101.000000:000"
        );
    }

    proptest! {
        #[test]
        fn unix_round_trip(secs in -62_167_219_200i64..253_402_300_799, micros in 0u32..1_000_000) {
            let d = CimDateTime::from_unix(secs, micros);
            prop_assert_eq!(d.to_unix(), Some((secs, micros)));
            prop_assert_eq!(CimDateTime::parse(&d.to_string()), Ok(d));
        }

        #[test]
        fn format_parse_round_trip(
            y in 0u16..10000, mo in 1u8..13, day in 1u8..29, h in 0u8..24, mi in 0u8..60,
            s in 0u8..60, us in 0u32..1_000_000, off in -999i16..1000,
            days in 0u32..100_000_000,
        ) {
            let ts = CimDateTime::Timestamp { year: y, month: mo, day, hour: h, minute: mi, second: s, micros: us, utc_offset_minutes: off };
            prop_assert_eq!(CimDateTime::parse(&ts.to_string()), Ok(ts));
            let iv = CimDateTime::Interval { days, hours: h, minutes: mi, seconds: s, micros: us };
            prop_assert_eq!(CimDateTime::parse(&iv.to_string()), Ok(iv));
        }
    }
}
