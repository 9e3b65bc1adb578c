//! Noticing that a disk image changed while nothing tracked it.
//!
//! A dirty bitmap records the writes of the QEMU process that holds the image. While the VM is off
//! nothing records anything: a tool that writes the raw data file directly, a restore from backup,
//! or a copy over the image leaves the bitmap consistent but blind. So when the VM stops (or a
//! point is taken of a stopped VM) the primary records each image's [`Fingerprint`] — size,
//! modification and change times, inode and device — and before tracking resumes it compares:
//! any difference means the bitmap cannot be trusted and that disk needs one hash scan
//! ([`check`] says why). QEMU opening the image read-write also changes the times, so a VM started
//! outside the daemon's knowledge is caught too; the cost of a false alarm is one scan, never a
//! wrong delta.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What identifies the content of an image file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub inode: u64,
    pub device: u64,
}

impl Fingerprint {
    pub fn of(path: &Path) -> std::io::Result<Fingerprint> {
        let m = std::fs::metadata(path)?;
        let ns = |secs: i64, nsec: i64| i128::from(secs) * 1_000_000_000 + i128::from(nsec);
        Ok(Fingerprint {
            size: m.len(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
            inode: m.ino(),
            device: m.dev(),
        })
    }
}

/// Why tracking of an image cannot be trusted since `recorded`, if it cannot.
pub fn check(path: &Path, recorded: &Fingerprint) -> Result<(), String> {
    let now =
        Fingerprint::of(path).map_err(|e| format!("{} cannot be read: {e}", path.display()))?;
    let why = if now.inode != recorded.inode || now.device != recorded.device {
        "the image file was replaced"
    } else if now.size != recorded.size {
        "the image's size changed"
    } else if now.mtime_ns != recorded.mtime_ns || now.ctime_ns != recorded.ctime_ns {
        "the image was modified while nothing tracked it"
    } else {
        return Ok(());
    };
    Err(format!("{}: {why}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn writes_replacement_and_resizing_are_noticed_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 8192]).expect("write");
        let fp = Fingerprint::of(&path).expect("fp");
        assert_eq!(check(&path, &fp), Ok(()));
        let _ = std::fs::read(&path).expect("reading changes nothing");
        assert_eq!(check(&path, &fp), Ok(()));

        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open")
            .write_all_at(b"x", 100)
            .expect("w");
        assert!(check(&path, &fp).is_err_and(|w| w.contains("modified")));

        let fp = Fingerprint::of(&path).expect("fp");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open")
            .set_len(16384)
            .expect("grow");
        assert!(check(&path, &fp).is_err_and(|w| w.contains("size")));

        let fp = Fingerprint::of(&path).expect("fp");
        let other = dir.path().join("other.raw");
        std::fs::write(&other, vec![0u8; 16384]).expect("write");
        std::fs::rename(&other, &path).expect("replace");
        assert!(check(&path, &fp).is_err_and(|w| w.contains("replaced")));
        let json = serde_json::to_string(&fp).expect("json");
        assert_eq!(
            serde_json::from_str::<Fingerprint>(&json).expect("back"),
            fp
        );
    }
}
