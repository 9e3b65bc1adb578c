//! This host's limits as a primary (docs/protocol.md §8): the upload bandwidth cap and how many
//! replication cycles transfer at once. The daemon's flags give them; `vmreplica host set` (the
//! JSON API's `SetHostSettings`) replaces them at run time and stores them, so they hold over the
//! flags after a restart until `vmreplica host reset`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use vmreplica_core::command::HostSettings;

use super::bandwidth::{parse_rate, Bandwidth, Window};

/// Most cycles that may transfer at once.
pub const MAX_PARALLEL_TRANSFERS: u16 = 64;

/// The lowest cap (bytes/s, besides 0 = none): an upload takes the cap in slices of 256 KiB, and a
/// slice must leave well within the replica's 60 s idle limit.
pub const MIN_RATE: u64 = 64 << 10;

/// How many replication cycles of this host transfer at once.
#[derive(Debug)]
pub struct Transfers {
    sem: Arc<Semaphore>,
    size: Mutex<usize>,
    /// Turns to take away as running cycles end (a shrink below what runs now).
    debt: Arc<AtomicUsize>,
}

/// One cycle's turn; given back when dropped, or forgotten while the limit shrinks.
pub struct Turn {
    permit: Option<OwnedSemaphorePermit>,
    debt: Arc<AtomicUsize>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let owed = self
            .debt
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| d.checked_sub(1))
            .is_ok();
        if let (true, Some(p)) = (owed, self.permit.take()) {
            p.forget();
        }
    }
}

impl Transfers {
    pub fn new(n: usize) -> Transfers {
        Transfers {
            sem: Arc::new(Semaphore::new(n)),
            size: Mutex::new(n),
            debt: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Waits for a turn.
    pub async fn acquire(&self) -> Option<Turn> {
        let permit = self.sem.clone().acquire_owned().await.ok()?;
        Some(Turn {
            permit: Some(permit),
            debt: self.debt.clone(),
        })
    }

    /// Changes how many at once: more start at once; with fewer, free turns go at once and the
    /// rest as running cycles end (waiting ones do not start meanwhile).
    pub fn set(&self, n: usize) {
        let mut size = self.size.lock().unwrap_or_else(|p| p.into_inner());
        if n > *size {
            let grow = n - *size;
            let paid = self
                .debt
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| {
                    Some(d.saturating_sub(grow))
                })
                .unwrap_or(0)
                .min(grow);
            self.sem.add_permits(grow - paid);
        } else if n < *size {
            let fewer = *size - n;
            let now = self.sem.forget_permits(fewer);
            self.debt.fetch_add(fewer - now, Ordering::SeqCst);
        }
        *size = n;
    }
}

/// Cycles to one recovery server at once: what a replica accepts from one primary host
/// (`max_parallel_uploads`, docs/protocol.md §8). Beyond it a cycle would only meet `Busy` and wait
/// for the next interval; it waits here for its turn instead, as under `max_parallel_transfers`.
pub const PER_SERVER_TRANSFERS: usize = 4;

/// One turn queue per recovery server (by name and port, case-insensitive; a name and an address
/// of the same server are two queues).
#[derive(Debug, Default)]
pub struct ServerTurns {
    servers: Mutex<std::collections::HashMap<String, Arc<Semaphore>>>,
}

impl ServerTurns {
    /// Waits for a turn to send to `host`:`port`.
    pub async fn acquire(&self, host: &str, port: u16) -> Option<OwnedSemaphorePermit> {
        let sem = {
            let mut servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
            servers
                .entry(format!(
                    "{}:{port}",
                    host.trim_end_matches('.').to_ascii_lowercase()
                ))
                .or_insert_with(|| Arc::new(Semaphore::new(PER_SERVER_TRANSFERS)))
                .clone()
        };
        sem.acquire_owned().await.ok()
    }
}

/// The limits in force and where they came from.
#[derive(Debug)]
pub struct HostLimits {
    pub bandwidth: Arc<Bandwidth>,
    pub transfers: Arc<Transfers>,
    flags: HostSettings,
    current: Mutex<HostSettings>,
    /// Held by a change from storing to applying, so two changes cannot interleave.
    changing: Mutex<()>,
}

/// Checks `s` and parses its windows.
pub fn validate(s: &HostSettings) -> Result<Vec<Window>, String> {
    if !(1..=MAX_PARALLEL_TRANSFERS).contains(&s.max_parallel_transfers) {
        return Err(format!(
            "max_parallel_transfers must be 1 to {MAX_PARALLEL_TRANSFERS}, not {}",
            s.max_parallel_transfers
        ));
    }
    let rate = |text: &str| {
        parse_rate(text).and_then(|r| {
            (r == 0 || r >= MIN_RATE)
                .then_some(r)
                .ok_or_else(|| format!("a cap is 0 (none) or at least 64K, not {text}"))
        })
    };
    if s.bandwidth_limit != 0 && s.bandwidth_limit < MIN_RATE {
        return Err(format!(
            "bandwidth_limit is 0 (none) or at least 65536 bytes/s, not {}",
            s.bandwidth_limit
        ));
    }
    s.bandwidth_windows
        .iter()
        .map(|w| Window::parse(w, rate))
        .collect()
}

impl HostLimits {
    /// The limits the daemon's flags give (`flags`: an error says what is wrong with them), then
    /// `stored` over them.
    pub fn new(flags: HostSettings, stored: Option<HostSettings>) -> Result<HostLimits, String> {
        let flags = HostSettings {
            source: "flags".into(),
            ..flags
        };
        let windows = validate(&flags)?;
        let limits = HostLimits {
            bandwidth: Bandwidth::new(flags.bandwidth_limit, windows),
            transfers: Arc::new(Transfers::new(usize::from(flags.max_parallel_transfers))),
            current: Mutex::new(flags.clone()),
            flags,
            changing: Mutex::new(()),
        };
        if let Some(s) = stored {
            if let Err(why) = limits.apply(s) {
                tracing::warn!("the stored host settings are not used: {why}");
            }
        }
        Ok(limits)
    }

    /// Held while a change is stored and applied.
    pub fn changing(&self) -> MutexGuard<'_, ()> {
        self.changing.lock().unwrap_or_else(|p| p.into_inner())
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
    async fn one_server_gets_at_most_its_turns_and_others_are_not_held_up() {
        let turns = ServerTurns::default();
        let mut held = Vec::new();
        for i in 0..PER_SERVER_TRANSFERS {
            // The same server, however its name is written.
            let host = if i % 2 == 0 { "hv2.lab" } else { "HV2.Lab" };
            held.push(turns.acquire(host, 443).await.expect("turn"));
        }
        let wait = std::time::Duration::from_millis(100);
        assert!(
            tokio::time::timeout(wait, turns.acquire("hv2.lab", 443))
                .await
                .is_err(),
            "a fifth turn to one server must wait"
        );
        assert!(tokio::time::timeout(wait, turns.acquire("hv3.lab", 443))
            .await
            .is_ok());
        assert!(tokio::time::timeout(wait, turns.acquire("hv2.lab", 8443))
            .await
            .is_ok());
        held.pop();
        assert!(tokio::time::timeout(wait, turns.acquire("hv2.lab", 443))
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn fewer_transfers_take_effect_as_running_ones_end_and_waiting_ones_wait() {
        let t = Arc::new(Transfers::new(3));
        let a = t.acquire().await;
        let b = t.acquire().await;
        t.set(1);
        // Two run, one waits; it may not start until both ended and one turn is free again.
        let waiting = {
            let t = t.clone();
            tokio::spawn(async move { t.acquire().await.is_some() })
        };
        tokio::task::yield_now().await;
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(b);
        assert!(waiting.await.unwrap_or(false));
        assert_eq!(t.sem.available_permits(), 1);
        // Shrunk and grown again before the running ones ended: exactly what was asked.
        let c = t.acquire().await;
        t.set(0);
        t.set(2);
        drop(c);
        assert_eq!(t.sem.available_permits(), 2);
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
            ..ok.clone()
        };
        assert!(validate(&window).unwrap_err().contains("bandwidth window"));
        let slow = HostSettings {
            bandwidth_limit: 1000,
            ..ok.clone()
        };
        assert!(validate(&slow).unwrap_err().contains("at least 65536"));
        let slow_window = HostSettings {
            bandwidth_windows: vec!["Mon 08:00-18:00=1K".into()],
            ..ok
        };
        assert!(validate(&slow_window).unwrap_err().contains("at least 64K"));
    }
}
