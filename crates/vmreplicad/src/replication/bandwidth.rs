//! The host's bandwidth cap for everything it uploads (docs/protocol.md §8): a token bucket shared
//! by every upload to every recovery server, whose rate may follow a weekly schedule of the host's
//! local time (`vmreplicad --bandwidth-limit` and `--bandwidth-window`, or `vmreplica host set` at
//! run time: [`Bandwidth::set`]).
//!
//! Uploads take it in slices of at most [`SLICE`] bytes, in turn (the lock is fair), so parallel
//! transfers share it evenly. TLS and HTTP/2 framing are not counted. The burst is
//! max(1 s of tokens, 4 MiB) of the rate in force.

use std::sync::Arc;
use std::time::Duration;

/// Largest piece an upload takes from the bandwidth cap at once.
pub const SLICE: usize = 256 << 10;

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const MINUTES_PER_DAY: u16 = 24 * 60;

/// One window of the schedule: on the days in `days` (bit 0 = Monday … bit 6 = Sunday), from
/// `start` to `end` (minutes after local midnight; `end` ≤ `start` runs past midnight into the next
/// day), uploads are capped at `rate` bytes/s (0 = no cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    days: u8,
    start: u16,
    end: u16,
    rate: u64,
}

impl Window {
    /// Parses `[DAYS ]HH:MM-HH:MM=RATE`, DAYS being `Mon-Fri`, `Sat,Sun`, `Mon` … (every day when
    /// left out), `RATE` parsed by `rate`.
    pub fn parse(text: &str, rate: impl Fn(&str) -> Result<u64, String>) -> Result<Window, String> {
        let bad = |why: &str| {
            format!("{text:?} is not a bandwidth window like \"Mon-Fri 08:00-18:00=10M\": {why}")
        };
        let (when, rate_text) = text.rsplit_once('=').ok_or_else(|| bad("no =RATE"))?;
        let rate = rate(rate_text.trim()).map_err(|e| bad(&e))?;
        let when = when.trim();
        let (days_text, hours) = match when.rsplit_once(char::is_whitespace) {
            Some((d, h)) => (Some(d.trim()), h),
            None => (None, when),
        };
        let days = match days_text {
            None => 0x7f,
            Some(d) => {
                parse_days(d).ok_or_else(|| bad("days are Mon … Sun, as Mon-Fri or Sat,Sun"))?
            }
        };
        let (from, to) = hours.split_once('-').ok_or_else(|| bad("no HH:MM-HH:MM"))?;
        let start = parse_minute(from).ok_or_else(|| bad("a time is HH:MM, 00:00 to 24:00"))?;
        let end = parse_minute(to).ok_or_else(|| bad("a time is HH:MM, 00:00 to 24:00"))?;
        if start == end || start == MINUTES_PER_DAY {
            return Err(bad("the window is empty"));
        }
        Ok(Window {
            days,
            start,
            end,
            rate,
        })
    }

    /// Whether the window holds minute `minute` of weekday `day` (0 = Monday).
    fn holds(&self, day: u8, minute: u16) -> bool {
        let on = |d: u8| self.days & (1 << d) != 0;
        if self.start < self.end {
            on(day) && (self.start..self.end).contains(&minute)
        } else {
            // Past midnight: the evening of a listed day, or the early hours after it.
            (on(day) && minute >= self.start) || (on((day + 6) % 7) && minute < self.end)
        }
    }
}

fn parse_days(text: &str) -> Option<u8> {
    let day = |name: &str| {
        DAY_NAMES
            .iter()
            .position(|d| name.eq_ignore_ascii_case(d))
            .map(|i| i as u8)
    };
    let mut bits = 0u8;
    for part in text.split(',') {
        match part.trim().split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a.trim())?, day(b.trim())?);
                let mut d = a;
                loop {
                    bits |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => bits |= 1 << day(part.trim())?,
        }
    }
    Some(bits)
}

fn parse_minute(text: &str) -> Option<u16> {
    let (h, m) = text.trim().split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && (h < 24 || m == 0)).then(|| h * 60 + m)
}

/// The local weekday (0 = Monday) and minute of the day now.
pub(crate) fn local_now() -> (u8, u16) {
    let t: libc::time_t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    let mut tm = std::mem::MaybeUninit::<libc::tm>::zeroed();
    // SAFETY: localtime_r only reads `t` and fills the `tm` it is given; it is thread-safe.
    let tm = unsafe {
        if libc::localtime_r(&t, tm.as_mut_ptr()).is_null() {
            return (0, 0);
        }
        tm.assume_init()
    };
    (
        ((tm.tm_wday + 6) % 7) as u8,
        (tm.tm_hour * 60 + tm.tm_min) as u16,
    )
}

pub use vmreplica_core::command::parse_rate;

/// The cap: a default rate and the windows that override it (the first that holds wins).
#[derive(Debug)]
pub struct Bandwidth {
    schedule: std::sync::RwLock<(u64, Vec<Window>)>,
    /// Tokens and when they were last counted.
    bucket: tokio::sync::Mutex<(f64, tokio::time::Instant)>,
}

fn burst(rate: u64) -> f64 {
    (rate as f64).max(4.0 * 1024.0 * 1024.0)
}

impl Bandwidth {
    /// A cap of `default` bytes/s (0 = none) outside `windows`.
    pub fn new(default: u64, windows: Vec<Window>) -> Arc<Bandwidth> {
        Arc::new(Bandwidth {
            schedule: std::sync::RwLock::new((default, windows)),
            bucket: tokio::sync::Mutex::new((0.0, tokio::time::Instant::now())),
        })
    }

    /// Replaces the cap; uploads under way follow it within a second.
    pub fn set(&self, default: u64, windows: Vec<Window>) {
        *self.schedule.write().unwrap_or_else(|p| p.into_inner()) = (default, windows);
    }

    /// Whether anything is ever capped.
    pub fn capped(&self) -> bool {
        let s = self.schedule.read().unwrap_or_else(|p| p.into_inner());
        s.0 > 0 || s.1.iter().any(|w| w.rate > 0)
    }

    /// The rate in force at weekday `day`, minute `minute` (0 = none).
    fn rate_at(&self, day: u8, minute: u16) -> u64 {
        let s = self.schedule.read().unwrap_or_else(|p| p.into_inner());
        s.1.iter()
            .find(|w| w.holds(day, minute))
            .map_or(s.0, |w| w.rate)
    }

    /// Waits until `n` bytes may be sent.
    pub async fn take(&self, n: usize) {
        let mut b = self.bucket.lock().await;
        loop {
            let (day, minute) = local_now();
            let rate = self.rate_at(day, minute);
            let now = tokio::time::Instant::now();
            if rate == 0 {
                // Uncapped now; a cap that starts later begins with a full bucket.
                *b = (f64::INFINITY, now);
                return;
            }
            let refill = now.duration_since(b.1).as_secs_f64() * rate as f64;
            b.0 = (b.0 + refill).min(burst(rate));
            b.1 = now;
            if b.0 >= n as f64 {
                b.0 -= n as f64;
                return;
            }
            // At most a second per wait, so a window that opens or closes meanwhile is noticed.
            let wait = ((n as f64 - b.0) / rate as f64).min(1.0);
            // The lock is held while waiting: the next upload's slice comes after this one.
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(t: &str) -> Result<u64, String> {
        t.strip_suffix('M')
            .unwrap_or(t)
            .parse::<u64>()
            .map(|n| if t.ends_with('M') { n << 20 } else { n })
            .map_err(|e| e.to_string())
    }

    fn w(text: &str) -> Window {
        Window::parse(text, rate).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn windows_parse_and_hold_the_right_minutes() {
        let office = w("Mon-Fri 08:00-18:00=10M");
        assert_eq!(office.days, 0b001_1111);
        assert_eq!(
            (office.start, office.end, office.rate),
            (480, 1080, 10 << 20)
        );
        assert!(office.holds(0, 480) && office.holds(4, 1079));
        assert!(!office.holds(0, 479) && !office.holds(0, 1080) && !office.holds(5, 600));

        let night = w("Fri 22:00-06:00=0");
        assert!(night.holds(4, 23 * 60) && night.holds(5, 5 * 60 + 59));
        assert!(!night.holds(5, 6 * 60) && !night.holds(4, 5 * 60) && !night.holds(3, 23 * 60));

        let weekend = w("Sat,Sun 00:00-24:00=1M");
        assert!(weekend.holds(5, 0) && weekend.holds(6, 1439) && !weekend.holds(0, 0));
        assert_eq!(w("Sat-Mon 10:00-11:00=5").days, 0b110_0001);
        assert_eq!(w("00:00-24:00=5").days, 0x7f);
    }

    #[test]
    fn bad_windows_say_why() {
        for bad in [
            "08:00-18:00",
            "Mon-Fri 08:00-18:00=fast",
            "Mon-Xyz 08:00-18:00=1",
            "Mon 8-18=1",
            "Mon 08:00-08:00=1",
            "Mon 24:00-08:00=1",
            "Mon 08:60-09:00=1",
            "Mon 25:00-26:00=1",
            "Mon 24:30-01:00=1",
            "Mon 1093:04-01:00=1",
        ] {
            let e = Window::parse(bad, rate).expect_err(bad);
            assert!(e.contains("bandwidth window"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_first_window_that_holds_sets_the_rate() {
        let b = Bandwidth::new(
            100,
            vec![w("Mon-Fri 08:00-18:00=10"), w("Mon 00:00-24:00=20")],
        );
        assert!(b.capped());
        assert_eq!(b.rate_at(0, 9 * 60), 10);
        assert_eq!(b.rate_at(0, 19 * 60), 20);
        assert_eq!(b.rate_at(2, 19 * 60), 100);
        assert!(!Bandwidth::new(0, vec![w("Mon 00:00-24:00=0")]).capped());
        let off_hours = Bandwidth::new(0, vec![w("Sat,Sun 00:00-24:00=10")]);
        assert!(off_hours.capped());
        assert_eq!(off_hours.rate_at(0, 0), 0);
        // Replaced at run time (vmreplica host set).
        off_hours.set(0, Vec::new());
        assert!(!off_hours.capped());
        off_hours.set(7, Vec::new());
        assert_eq!(off_hours.rate_at(5, 0), 7);
    }
}
