//! This host's limits as a primary (docs/protocol.md §8): the upload bandwidth cap and how many
//! replication cycles transfer at once. The daemon's flags give them; `vmreplica host set` (the
//! JSON API's `SetHostSettings`) replaces them at run time and stores them, so they hold over the
//! flags after a restart until `vmreplica host reset`.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use vmreplica_core::command::HostSettings;

use super::bandwidth::{parse_rate, Bandwidth, Window};

/// Most cycles that may transfer at once.
pub const MAX_PARALLEL_TRANSFERS: u16 = 64;

/// How many replication cycles of this host transfer at once.
#[derive(Debug)]
pub struct Transfers {
    sem: Arc<Semaphore>,
    size: Mutex<usize>,
}

impl Transfers {
    pub fn new(n: usize) -> Transfers {
        Transfers {
            sem: Arc::new(Semaphore::new(n)),
            size: Mutex::new(n),
        }
    }

    /// Waits for a turn.
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.sem.clone().acquire_owned().await.ok()
    }

    /// Changes how many at once: more start at once; with fewer, running ones finish first.
    pub fn set(&self, n: usize) {
        let mut size = self.size.lock().unwrap_or_else(|p| p.into_inner());
        if n > *size {
            self.sem.add_permits(n - *size);
        } else if n < *size {
            let fewer = *size - n;
            let rest = fewer - self.sem.forget_permits(fewer);
            if rest > 0 {
                // Taken from cycles still running, as they end.
                let sem = self.sem.clone();
                tokio::spawn(async move {
                    if let Ok(p) = sem
                        .acquire_many_owned(u32::try_from(rest).unwrap_or(u32::MAX))
                        .await
                    {
                        p.forget();
                    }
                });
            }
        }
        *size = n;
    }
}

/// The limits in force and where they came from.
#[derive(Debug)]
pub struct HostLimits {
    pub bandwidth: Arc<Bandwidth>,
    pub transfers: Arc<Transfers>,
    flags: HostSettings,
    current: Mutex<HostSettings>,
}

/// Checks `s` and parses its windows.
pub fn validate(s: &HostSettings) -> Result<Vec<Window>, String> {
    if !(1..=MAX_PARALLEL_TRANSFERS).contains(&s.max_parallel_transfers) {
        return Err(format!(
            "max_parallel_transfers must be 1 to {MAX_PARALLEL_TRANSFERS}, not {}",
            s.max_parallel_transfers
        ));
    }
    s.bandwidth_windows
        .iter()
        .map(|w| Window::parse(w, parse_rate))
        .collect()
}

impl HostLimits {
    /// The limits the daemon's flags give (`flags`, already valid), then `stored` over them.
    pub fn new(flags: HostSettings, stored: Option<HostSettings>) -> HostLimits {
        let flags = HostSettings {
            source: "flags".into(),
            ..flags
        };
        let windows = validate(&flags).unwrap_or_default();
        let limits = HostLimits {
            bandwidth: Bandwidth::new(flags.bandwidth_limit, windows),
            transfers: Arc::new(Transfers::new(usize::from(flags.max_parallel_transfers))),
            current: Mutex::new(flags.clone()),
            flags,
        };
        if let Some(s) = stored {
            if let Err(why) = limits.apply(s) {
                tracing::warn!("the stored host settings are not used: {why}");
            }
        }
        limits
    }

    /// The limits in force.
    pub fn current(&self) -> HostSettings {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `s` in force (checked first).
    pub fn apply(&self, s: HostSettings) -> Result<(), String> {
        let windows = validate(&s)?;
        self.bandwidth.set(s.bandwidth_limit, windows);
        self.transfers.set(usize::from(s.max_parallel_transfers));
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = HostSettings {
            source: "stored".into(),
            ..s
        };
        Ok(())
    }

    /// Puts the flags' limits in force again.
    pub fn reset(&self) {
        let flags = self.flags.clone();
        let windows = validate(&flags).unwrap_or_default();
        self.bandwidth.set(flags.bandwidth_limit, windows);
        self.transfers
            .set(usize::from(flags.max_parallel_transfers));
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = flags;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fewer_transfers_take_effect_as_running_ones_end() {
        let t = Transfers::new(3);
        let a = t.acquire().await;
        let b = t.acquire().await;
        t.set(1);
        // Two run; none may start until both ended and one turn is free again.
        assert!(t.sem.clone().try_acquire_owned().is_err());
        drop(a);
        tokio::task::yield_now().await;
        assert!(t.sem.clone().try_acquire_owned().is_err());
        drop(b);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let c = t.sem.clone().try_acquire_owned();
        assert!(c.is_ok());
        assert!(t.sem.clone().try_acquire_owned().is_err());
        drop(c);
        t.set(4);
        assert_eq!(t.sem.available_permits(), 4);
    }

    #[test]
    fn bad_settings_say_why() {
        let ok = HostSettings {
            bandwidth_limit: 0,
            bandwidth_windows: vec!["Mon-Fri 08:00-18:00=10M".into()],
            max_parallel_transfers: 3,
            source: String::new(),
        };
        assert_eq!(validate(&ok).map(|w| w.len()), Ok(1));
        let zero = HostSettings {
            max_parallel_transfers: 0,
            ..ok.clone()
        };
        assert!(validate(&zero).unwrap_err().contains("1 to 64"));
        let window = HostSettings {
            bandwidth_windows: vec!["Mon 8-18=1".into()],
            ..ok
        };
        assert!(validate(&window).unwrap_err().contains("bandwidth window"));
    }
}
