//! Names of everything under a VM's directory. Only this file knows them.
//!
//! ```text
//! <root>/<vm-guid>/
//!   .lock                              flock(2): held by apply, prune, recovery, overlay changes
//!   p<seq:020>.json                    the point's metadata: the point is committed iff it exists
//!   disk<i>/p<seq:020>.qcow2           one immutable layer per point and disk
//!   overlays/<name>/overlay.json       the overlay exists iff this exists (names its base point)
//!   overlays/<name>/disk<i>.qcow2      writable overlay on the base point's layer
//!   run/                               sockets and pid files of the qemu-nbd helpers
//!   adopted.json                       an adoption's old image names, until they are removed
//!   *.tmp                              not part of the store; recovery deletes them
//! ```

use std::path::{Path, PathBuf};

/// Paths of one VM's store.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) vm_dir: PathBuf,
}

impl Layout {
    /// The store of `vm` under `root`.
    pub(crate) fn of(root: &Path, vm: uuid::Uuid) -> Layout {
        Layout {
            vm_dir: root.join(vm.hyphenated().to_string()),
        }
    }

    pub(crate) fn lock_file(&self) -> PathBuf {
        self.vm_dir.join(".lock")
    }

    pub(crate) fn run_dir(&self) -> PathBuf {
        self.vm_dir.join("run")
    }

    pub(crate) fn overlays_dir(&self) -> PathBuf {
        self.vm_dir.join("overlays")
    }

    pub(crate) fn overlay_dir(&self, name: &str) -> PathBuf {
        self.overlays_dir().join(name)
    }

    pub(crate) fn overlay_meta(&self, name: &str) -> PathBuf {
        self.overlay_dir(name).join("overlay.json")
    }

    pub(crate) fn overlay_disk(&self, name: &str, disk: usize) -> PathBuf {
        self.overlay_dir(name).join(format!("disk{disk}.qcow2"))
    }

    pub(crate) fn adopted(&self) -> PathBuf {
        self.vm_dir.join("adopted.json")
    }

    pub(crate) fn point_meta(&self, seq: u64) -> PathBuf {
        self.vm_dir.join(format!("p{seq:020}.json"))
    }

    pub(crate) fn disk_dir(&self, disk: usize) -> PathBuf {
        self.vm_dir.join(format!("disk{disk}"))
    }

    pub(crate) fn layer(&self, seq: u64, disk: usize) -> PathBuf {
        self.disk_dir(disk).join(layer_name(seq))
    }
}

/// File name of a layer; backing references use it relative to the layer's own directory.
pub(crate) fn layer_name(seq: u64) -> String {
    format!("p{seq:020}.qcow2")
}

/// The sequence of a committed-name file `p<seq:020>.<ext>`, or None for anything else.
pub(crate) fn parse_seq(name: &str, ext: &str) -> Option<u64> {
    let digits = name
        .strip_prefix('p')?
        .strip_suffix(ext)?
        .strip_suffix('.')?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Directory names `disk<i>` under the VM directory, as indexes.
pub(crate) fn parse_disk_dir(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("disk")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// An overlay name is a single path component a person can type: 1 to 64 of `[A-Za-z0-9_-]`.
pub(crate) fn valid_overlay_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub(crate) fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_strangers_are_ignored() {
        assert_eq!(parse_seq(&layer_name(42), "qcow2"), Some(42));
        assert_eq!(parse_seq("p00000000000000000042.json", "json"), Some(42));
        for other in [
            "p42.qcow2",
            "p00000000000000000042.qcow2.tmp",
            "x00000000000000000042.qcow2",
            "p0000000000000000004x.qcow2",
        ] {
            assert_eq!(parse_seq(other, "qcow2"), None, "{other}");
        }
        assert_eq!(parse_disk_dir("disk12"), Some(12));
        assert_eq!(parse_disk_dir("disk"), None);
        assert!(valid_overlay_name("test-failover_1"));
        assert!(!valid_overlay_name("../x") && !valid_overlay_name(""));
    }
}
