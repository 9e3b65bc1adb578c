//! What a turned-off VM's qcow2 disks record of the writes made to them after a point was read
//! from their files, for a failback after an unplanned failover (`replication::failback`).
//!
//! A primary reads a turned-off VM's points straight from its files, so nothing of its own sees
//! what QEMU, qemu-io or qemu-nbd write to them between points. A persistent dirty bitmap inside
//! each qcow2 file does: QEMU and its tools load it, record every write in it while it is
//! enabled, and flag it `in-use` while the file is open (so one a crash left behind is known to
//! be untrustworthy, `failback::read_bitmap`).
//!
//! For a failback, the bitmap must have been recording since **before** the last point was read:
//! then every write the point lacks is in it. So bitmaps are never cleared, they rotate:
//! - before a point is read (at most every [`ROTATE_SECS`]; always for an initial replication),
//!   a new bitmap `vmr-offline-writes-<nanoseconds>` is added, enabled ([`Rotation::before_read`]);
//!   the fingerprint of the file taken for the point comes after that;
//! - once the point is committed, it becomes the record (`tracking/<VMID>/disk<i>.offline-bitmap.json`)
//!   and the older ones are removed ([`Rotation::after_commit`]); the file changed then, so a
//!   failback reads the bitmap rather than trusting the fingerprint, until the next point;
//! - between rotations the recorded bitmap, enabled since before an earlier point was read, holds
//!   a superset (the failback reads those blocks again and compares their hashes);
//! - a rotation that cannot add (a tool holds the file open) keeps the record as it was, still a
//!   superset; a cycle that fails removes what it added ([`Rotation::abandon`]), and bitmaps a
//!   crash left go at the next rotation.
//!
//! (Before, one bitmap was cleared after the point was committed, if the file's fingerprint had
//! not changed: a write in the instant between that check and the clear was in neither the point
//! nor the bitmap, and a failback would have missed it.)
//!
//! A bitmap only grows while QEMU and its tools write the file. Something else that rewrites it in
//! place — an older copy restored over it, same inode — brings back an older bitmap that looks
//! consistent but lacks the blocks the copy undid. So once a point is committed, what the recorded
//! bitmap marks is remembered ([`remember_marked`], `disk<i>.offline-marked.json`), and a failback
//! trusts the bitmap only if it still marks all of that ([`check_marked`]); else it hash-scans.
//! The marks are tied to the point they were read at: a running VM's are read from its QEMU
//! process while its point is frozen ([`marked_live`]); after a point nothing was remembered for
//! (a resynchronization's, a seeded one's) the failback hash-scans.
//! (The new primary's `vmr-failback-writes-<n>` needs no such check: its reference is the disk as
//! CommitFailover left it, which that bitmap's every later copy describes exactly; a copy from
//! before, of an earlier failover too, has no bitmap of that name.)

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::replication::journal::{self, Runs};

/// The names of these bitmaps start with this. (Not `vmreplica-*`: those are the running-VM
/// tracker's, `disk::bitmap`; not `vmr-failback-writes`: CommitFailover's.)
pub const PREFIX: &str = "vmr-offline-writes";

/// How often a turned-off VM's bitmaps rotate. Each rotation writes the image for a moment
/// (`qemu-img bitmap`), which a tool writing it at that instant would find locked, so it is
/// rare; between rotations the recorded bitmap holds everything written since the rotation
/// before the last point, of which a failback reads only those blocks again.
pub const ROTATE_SECS: i64 = 600;

/// The bitmap that records disk `i`'s writes since a point at or before its last one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub bitmap: String,
    /// When it became the record (Unix seconds).
    pub since: i64,
}

fn record_file(tracking: &Path, disk: usize) -> PathBuf {
    tracking.join(format!("disk{disk}.offline-bitmap.json"))
}

/// The recorded bitmap of disk `disk`, if any.
pub fn recorded(tracking: &Path, disk: usize) -> Option<Record> {
    std::fs::read(record_file(tracking, disk))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// `qemu-img bitmap OP` (`--add` enabled, `--remove`) of bitmap `name` in qcow2 `image`; whether
/// it succeeded.
pub(crate) async fn qemu_img_bitmap(image: &str, op: &str, name: &str) -> bool {
    let mut c = tokio::process::Command::new("qemu-img");
    c.args(["bitmap", op]);
    if op == "--add" {
        c.arg("--enable");
    }
    c.args(["-f", "qcow2", image, name])
        .kill_on_drop(true)
        .output()
        .await
        .is_ok_and(|o| o.status.success())
}

/// The names of the persistent bitmaps of qcow2 `image` (none for a file that is not qcow2).
pub async fn bitmap_names(image: &Path) -> Vec<String> {
    let Ok(out) = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U", "-f", "qcow2"])
        .arg(image)
        .kill_on_drop(true)
        .output()
        .await
    else {
        return Vec::new();
    };
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|b| b["name"].as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The names of `image`'s bitmaps of this kind.
async fn listed(image: &str) -> Vec<String> {
    let mut names = bitmap_names(Path::new(image)).await;
    names.retain(|n| n.starts_with(PREFIX));
    names
}

/// `prefix-<nanoseconds now>`: a bitmap name no earlier copy of the file holds.
pub(crate) fn stamped(prefix: &str) -> String {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{stamp}")
}

/// Whether `image` is a qcow2 file (its magic), which alone can hold bitmaps.
pub(crate) fn is_qcow2(image: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(image)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"QFI\xfb"
}

/// The bitmaps one point's read added, per disk.
#[derive(Debug, Default)]
pub struct Rotation {
    added: Vec<Option<String>>,
}

impl Rotation {
    /// A point of a running VM: its QEMU process tracks the writes; nothing rotates.
    pub fn none() -> Rotation {
        Rotation::default()
    }

    /// Before a point is read from `images` (the turned-off VM's disk files): when due, or
    /// `force`, each qcow2 disk gets a new enabled bitmap (stale ones of this kind go first).
    pub async fn before_read(images: &[String], tracking: &Path, force: bool) -> Rotation {
        let now = crate::clock::now();
        let mut added = Vec::with_capacity(images.len());
        for (i, image) in images.iter().enumerate() {
            let record = recorded(tracking, i);
            if !is_qcow2(Path::new(image))
                || (!force && record.as_ref().is_some_and(|r| now - r.since < ROTATE_SECS))
            {
                added.push(None);
                continue;
            }
            let keep = record.map(|r| r.bitmap);
            for stale in listed(image).await {
                if keep.as_deref() != Some(stale.as_str()) {
                    qemu_img_bitmap(image, "--remove", &stale).await;
                }
            }
            let name = stamped(PREFIX);
            let ok = keep.as_deref() != Some(name.as_str())
                && qemu_img_bitmap(image, "--add", &name).await;
            added.push(ok.then_some(name));
        }
        Rotation { added }
    }

    /// After the point was committed: the bitmaps added before its read become the record, and
    /// the ones they replace are removed.
    pub async fn after_commit(self, images: &[String], tracking: &Path) {
        let now = crate::clock::now();
        for (i, added) in self.added.into_iter().enumerate() {
            let (Some(name), Some(image)) = (added, images.get(i)) else {
                continue;
            };
            let old = recorded(tracking, i);
            let record = Record {
                bitmap: name.clone(),
                since: now,
            };
            let written = serde_json::to_vec(&record).ok().is_some_and(|json| {
                crate::durable::write_file(&record_file(tracking, i), &json).is_ok()
            });
            if !written {
                // The old record still holds a superset; the new bitmap goes at the next rotation.
                continue;
            }
            if let Some(old) = old.filter(|o| o.bitmap != name) {
                qemu_img_bitmap(image, "--remove", &old.bitmap).await;
            }
        }
    }

    /// After the point failed: what was added is removed (the record stays).
    pub async fn abandon(self, images: &[String]) {
        for (added, image) in self.added.into_iter().zip(images) {
            if let Some(name) = added {
                qemu_img_bitmap(image, "--remove", &name).await;
            }
        }
    }
}

/// What disk `i`'s recorded bitmap marked once point `sequence` was committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Marked {
    sequence: u64,
    bitmap: String,
    runs: Runs,
    /// The file's fingerprint just before the bitmap was read, if it had been left alone long
    /// enough to be trusted (replication::journal::settled_fingerprint): while the file still has
    /// it, the bitmap inside is unchanged and the next point reuses these marks without reading.
    #[serde(default)]
    print: Option<disk::fingerprint::Fingerprint>,
}

fn marked_file(tracking: &Path, disk: usize) -> PathBuf {
    tracking.join(format!("disk{disk}.offline-marked.json"))
}

/// After a turned-off VM's point `sequence` was committed (and its rotation finished): what each
/// disk's recorded bitmap marks now. Where it cannot be read, nothing is remembered, and a failback
/// hash-scans that disk; so does one after a point nothing was remembered for (a
/// resynchronization's: the record names another point).
pub async fn remember_marked(
    data_dir: &Path,
    vm: Uuid,
    images: &[String],
    tracking: &Path,
    sequence: u64,
) {
    for (i, image) in images.iter().enumerate() {
        let file = marked_file(tracking, i);
        let before = read_marked(tracking, i);
        let _ = std::fs::remove_file(&file);
        let (Some(record), Ok(map)) = (
            recorded(tracking, i),
            disk::scan::hashmap::MapReader::open(&tracking.join(format!("disk{i}.hashes"))),
        ) else {
            continue;
        };
        // An untouched file holds the bitmap it held: no read, no lock taken on it. (Only on a
        // local file system: a network one may answer with cached attributes, and its times come
        // from another clock.)
        let local = local_fs(Path::new(image));
        let now = disk::fingerprint::Fingerprint::of(Path::new(image)).ok();
        if let Some(m) = before
            .filter(|m| local && m.bitmap == record.bitmap && m.print.is_some() && m.print == now)
        {
            write_marked(tracking, i, sequence, m.bitmap, m.runs, m.print);
            continue;
        }
        let print = crate::replication::journal::settled_fingerprint(Path::new(image));
        let read =
            super::failback::read_bitmap(data_dir, vm, i, image, map.disk_size, &record.bitmap)
                .await;
        match read {
            Ok(runs) => write_marked(tracking, i, sequence, record.bitmap, runs, print),
            Err(why) => {
                tracing::warn!(%vm, disk = i, "a failback would hash-scan this disk: {why}")
            }
        }
    }
}

/// The recorded bitmaps of a running VM, as its QEMU process holds them while point `sequence`
/// is frozen (the QEMU loaded them from the files when it opened them, and records every write in
/// them): per disk, the bitmap's name and the byte ranges it marks, when it has a consistent one.
pub async fn marked_live(
    point: &super::running::RunningPoint,
    tracking: &Path,
    disks: usize,
) -> Vec<Option<(String, Runs)>> {
    let mut out = Vec::with_capacity(disks);
    for i in 0..disks {
        let live = match recorded(tracking, i) {
            Some(r) => match point.other_bitmap(i, &r.bitmap).await {
                Ok(Some(ranges)) => Some((r.bitmap, super::failback::block_runs(ranges))),
                _ => None,
            },
            None => None,
        };
        out.push(live);
    }
    out
}

/// Once a running VM's point `sequence` was committed: what [`marked_live`] found is remembered,
/// as [`remember_marked`] does for a turned-off VM.
pub fn remember_marked_live(tracking: &Path, sequence: u64, live: Vec<Option<(String, Runs)>>) {
    for (i, l) in live.into_iter().enumerate() {
        match l {
            Some((bitmap, runs)) => write_marked(tracking, i, sequence, bitmap, runs, None),
            None => {
                let _ = std::fs::remove_file(marked_file(tracking, i));
            }
        }
    }
}

/// Whether `path` lies on a local file system (not NFS, SMB/CIFS or FUSE), whose `stat` is never
/// answered from a cache another host's write bypasses.
fn local_fs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const NETWORK: [i64; 5] = [0x6969, 0x517B, 0xFF53_4D42, 0xFE53_4D42, 0x6573_5546];
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: a valid NUL-terminated path and a buffer of the right type, which statfs fills.
    if unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: statfs succeeded, so the buffer is initialised.
    #[allow(clippy::unnecessary_cast)] // (its type differs between C libraries)
    let kind = unsafe { st.assume_init() }.f_type as i64;
    !NETWORK.contains(&kind)
}

fn read_marked(tracking: &Path, disk: usize) -> Option<Marked> {
    std::fs::read(marked_file(tracking, disk))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn write_marked(
    tracking: &Path,
    disk: usize,
    sequence: u64,
    bitmap: String,
    runs: Runs,
    print: Option<disk::fingerprint::Fingerprint>,
) {
    let marked = Marked {
        sequence,
        bitmap,
        runs,
        print,
    };
    if let Ok(json) = serde_json::to_vec(&marked) {
        let _ = crate::durable::write_file(&marked_file(tracking, disk), &json);
    }
}

/// Whether bitmap `bitmap` of disk `disk`, marking `now`, still marks everything it marked when
/// the last point, `last`, was committed (else the file was rewritten by something other than
/// QEMU).
pub fn check_marked(
    tracking: &Path,
    disk: usize,
    bitmap: &str,
    now: &[(u64, u64)],
    last: u64,
) -> Result<(), String> {
    let marked = read_marked(tracking, disk)
        .filter(|m| m.bitmap == bitmap && m.sequence == last)
        .ok_or("what its bitmap marked at its last point is not recorded")?;
    if journal::union(now, &marked.runs) != journal::union(now, &[]) {
        return Err(
            "its bitmap lost blocks it had marked at its last point: something other than QEMU rewrote the file (a copy restored over it?)"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    const MIB: u64 = 1 << 20;

    fn run(args: &[&str]) {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// qemu-io writes `len` bytes at `offset` of `image`, as a tool would behind the primary.
    fn write(image: &str, offset: u64, len: u64) {
        run(&[
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            &format!("write {offset} {len}"),
            image,
        ]);
    }

    /// The blocks the recorded bitmap of disk 0 marks, as a failback reads them.
    async fn marked(dir: &Path, image: &str) -> Vec<(u64, u64)> {
        let name = recorded(dir, 0).expect("a record").bitmap;
        crate::engine::failback::read_bitmap(dir, Uuid::new_v4(), 0, image, 16 * MIB, &name)
            .await
            .expect("a trusted bitmap")
    }

    #[tokio::test]
    async fn a_write_at_any_moment_after_the_read_began_is_in_the_recorded_bitmap() {
        let dir = std::env::temp_dir().join(format!("vmr-offline-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let image = dir.join("disk0.qcow2").display().to_string();
        run(&["qemu-img", "create", "-q", "-f", "qcow2", &image, "16M"]);
        let images = vec![image.clone()];
        let block = |mib: u64| (mib * MIB / (64 << 10), 1);

        // Point 1 (forced, as an initial replication): a write during its read, one after.
        let r = Rotation::before_read(&images, &dir, true).await;
        write(&image, MIB, 64 << 10);
        r.after_commit(&images, &dir).await;
        write(&image, 2 * MIB, 64 << 10);
        assert_eq!(marked(&dir, &image).await, vec![block(1), block(2)]);
        let first = recorded(&dir, 0).expect("record").bitmap;

        // Not due: the same bitmap stays the record and keeps recording (a superset).
        let r = Rotation::before_read(&images, &dir, false).await;
        write(&image, 3 * MIB, 64 << 10);
        r.after_commit(&images, &dir).await;
        assert_eq!(recorded(&dir, 0).expect("record").bitmap, first);
        assert_eq!(
            marked(&dir, &image).await,
            vec![block(1), block(2), block(3)]
        );

        // A rotation: writes from just before its read on are in the new bitmap, the old goes.
        let r = Rotation::before_read(&images, &dir, true).await;
        write(&image, 4 * MIB, 64 << 10);
        r.after_commit(&images, &dir).await;
        write(&image, 5 * MIB, 64 << 10);
        assert_ne!(recorded(&dir, 0).expect("record").bitmap, first);
        assert_eq!(marked(&dir, &image).await, vec![block(4), block(5)]);
        assert_eq!(listed(&image).await.len(), 1);

        // A failed point: what it added is removed, the record stays and records on.
        let kept = recorded(&dir, 0).expect("record");
        let r = Rotation::before_read(&images, &dir, true).await;
        assert_eq!(listed(&image).await.len(), 2);
        write(&image, 6 * MIB, 64 << 10);
        r.abandon(&images).await;
        assert_eq!(recorded(&dir, 0), Some(kept));
        assert_eq!(listed(&image).await.len(), 1);
        assert_eq!(
            marked(&dir, &image).await,
            vec![block(4), block(5), block(6)]
        );

        // What the bitmap marks is remembered per point; read again only when the file changed.
        // (Beside the point's block-hash map, which gives the disk's size.)
        let map = dir.join("disk0.hashes");
        let mut w = disk::scan::hashmap::MapWriter::create(&map, 64 << 10, 16 * MIB).expect("map");
        for _ in 0..256 {
            w.push(&disk::scan::hashmap::ZERO).expect("push");
        }
        disk::scan::hashmap::commit(&w.finish().expect("finish"), &map).expect("commit");
        let vm = Uuid::new_v4();
        tokio::time::sleep(crate::replication::journal::SETTLE).await;
        remember_marked(&dir, vm, &images, &dir, 7).await;
        let first = read_marked(&dir, 0).expect("marked");
        assert!(
            first.print.is_some(),
            "a settled file's fingerprint is kept"
        );
        remember_marked(&dir, vm, &images, &dir, 8).await;
        let again = read_marked(&dir, 0).expect("marked");
        assert_eq!(
            (again.sequence, &again.runs, again.print),
            (8, &first.runs, first.print)
        );
        let bitmap = recorded(&dir, 0).expect("record").bitmap;
        assert!(check_marked(&dir, 0, &bitmap, &first.runs, 8).is_ok());
        assert!(
            check_marked(&dir, 0, &bitmap, &first.runs, 7).is_err(),
            "another point's"
        );
        assert!(
            check_marked(&dir, 0, &bitmap, &[block(4)], 8).is_err(),
            "lost marks"
        );
        write(&image, 7 * MIB, 64 << 10);
        remember_marked(&dir, vm, &images, &dir, 9).await;
        let changed = read_marked(&dir, 0).expect("marked");
        assert_eq!(changed.runs, vec![block(4), block(5), block(6), block(7)]);
        assert!(changed.print.is_none(), "just written: not trusted yet");

        // A bitmap a crash left behind goes at the next rotation.
        run(&[
            "qemu-img",
            "bitmap",
            "--add",
            "-f",
            "qcow2",
            &image,
            &format!("{PREFIX}-0"),
        ]);
        let r = Rotation::before_read(&images, &dir, true).await;
        r.after_commit(&images, &dir).await;
        assert_eq!(listed(&image).await.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
