//! Running a child process and measuring its wall time and peak memory (wait4 rusage).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Wall time and peak resident memory of one finished child process.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub wall: Duration,
    pub max_rss_kib: u64,
}

/// Runs `cmd` to completion; fails if it exits non-zero.
pub fn run(cmd: &mut Command) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let pid = i32::try_from(child.id()).context("pid")?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child, with valid pointers to locals.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = started.elapsed();
    std::mem::forget(child); // reaped by wait4 above
    if rc != pid {
        bail!("wait4 failed for {cmd:?}");
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("{cmd:?} failed (status {status})");
    }
    Ok(Measured {
        wall,
        max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
    })
}
