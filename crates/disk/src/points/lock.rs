//! The per-VM store lock: `flock(2)` on `<vm>/.lock`. The kernel drops it when its holder dies,
//! so a killed apply never leaves the store locked.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

/// Held while the store changes; released on drop (closing the file releases the flock).
#[derive(Debug)]
pub(crate) struct StoreLock {
    _file: File,
}

impl StoreLock {
    /// Waits (asynchronously, polling) for the exclusive lock.
    pub(crate) async fn acquire(path: &Path) -> io::Result<StoreLock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        loop {
            // SAFETY: flock on a descriptor we own, with constant flags; no memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(StoreLock { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK)
                && err.kind() != io::ErrorKind::Interrupted
            {
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_holder_waits_until_the_first_drops() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(".lock");
        let first = StoreLock::acquire(&path).await.expect("first");
        let waiting =
            tokio::time::timeout(Duration::from_millis(100), StoreLock::acquire(&path)).await;
        assert!(waiting.is_err(), "the lock is exclusive");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(2), StoreLock::acquire(&path)).await;
        assert!(matches!(second, Ok(Ok(_))));
    }
}
