//! Crash points for labs: `--crash-at NAME` makes the daemon kill itself (SIGKILL, as `kill -9`
//! would) when it reaches point NAME, so a test can stop it exactly where what it wrote must be
//! recovered, in a window too short to hit from outside. Without the flag a point does nothing.

use std::sync::OnceLock;

/// The points a lab may name; each is a call of [`point`].
pub const POINTS: &[&str] = &[
    // The old primary's disks are point N of its new store, the VM still its primary.
    "reverse-disks-taken",
    // The VM is a replica with no disks of its own; the disks' old names are not removed yet.
    "reverse-switched",
    // A recovery server committed a log; its answer is not sent yet.
    "log-committed",
    // A recovery server renamed a log to its committed name; the row that commits it is not
    // written yet.
    "log-renamed",
];

static AT: OnceLock<&'static str> = OnceLock::new();

/// Arms point `name` (one of [`POINTS`]) for this process.
pub fn arm(name: &str) {
    if let Some(known) = POINTS.iter().find(|p| **p == name) {
        let _ = AT.set(known);
    }
}

/// Kills this process if point `name` is armed.
pub fn point(name: &str) {
    if AT.get().is_some_and(|at| *at == name) {
        tracing::error!(
            point = name,
            "crash point reached: killing this daemon (--crash-at)"
        );
        // SAFETY: kill(2) on our own pid; nothing else is touched.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
