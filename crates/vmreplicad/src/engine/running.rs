//! Points of a running VM: one crash-consistent frozen view of all its disks, taken in the QEMU
//! process that holds them (the VM's QMP socket) with dirty bitmaps and image fleecing
//! (`disk::bitmap`), read over NBD while the guest keeps writing.
//!
//! Each disk is read in one of two ways:
//! - **bitmap**: the disk has been tracked since the last shipped point: only the blocks its bitmap
//!   marks dirty are read, hashed and compared with the last shipped map (`scan_disk_ranges`), so a
//!   block rewritten with the same bytes is not shipped and the map stays exact;
//! - **scan**: tracking is missing or cannot be trusted (QEMU was killed, the VM was started after
//!   the last point, initial replication): tracking restarts just before the freeze and the whole
//!   frozen view is hash-scanned against the last shipped map (or, for initial replication, in
//!   full). Writes between the restart and the freeze are in the frozen view, so nothing is lost.
//!   A restarted bitmap holds only what was written since its restart, so until a log read that
//!   way is committed, the disk stays one to scan: a marker (`tracking/<VM>/disk<i>.scan`, durable
//!   before the restart) says so to the cycles that follow a failed one, and to this daemon after
//!   a crash, instead of the bitmap a failed cycle merged back. A bitmap whose generation is
//!   below the one recorded when the last point was frozen came back with an older copy of the
//!   file and is not trusted either (`disk<i>.generation`). A copy taken after the last running
//!   point has the expected generation, but if turned-off points were committed since (reading
//!   the files), what the bitmap marked then is remembered (`disk<i>.running-marked.json`,
//!   [`remember_offline_marks`]) and must still be marked at the next freeze: bitmaps only grow,
//!   so one that lost marks came back with an older copy (and the disk is scanned).
//!
//! Because every cycle leaves an exact block-hash map, a VM may be replicated running or turned off
//! from one cycle to the next. Only the consumer's confirmation ([`RunningPoint::finish`] with
//! `durable`) drops the old bitmaps; otherwise they are merged into the new ones.

use std::io::Write;
use std::path::{Path, PathBuf};

use disk::bitmap::{BitmapStatus, BitmapTracker, FrozenPoint};
use disk::scan::{scan_disk_ranges, Source, DEFAULT_BLOCK_SIZE};
use wire::LogWriter;

use crate::store::VmRow;

/// Why a running VM's point could not be read.
#[derive(Debug)]
pub enum RunningError {
    /// The chain cannot continue from what this host knows: a resynchronization is needed.
    Resync(String),
    /// Anything else (QMP, NBD, the log): the cycle failed and is retried.
    Failed(String),
}

impl RunningError {
    pub fn message(&self) -> &str {
        match self {
            RunningError::Resync(m) | RunningError::Failed(m) => m,
        }
    }
}

fn failed(e: impl std::error::Error) -> RunningError {
    RunningError::Failed(crate::error_chain(&e))
}

/// The marker of disk `index` of the VM whose tracking directory is `tracking`: present while the
/// disk's bitmap started after the last shipped point (see the module's doc).
fn scan_marker(tracking: &Path, index: usize) -> PathBuf {
    tracking.join(format!("disk{index}.scan"))
}

/// Writes `marker` durably (file and directory).
fn mark_for_scan(marker: &Path) -> std::io::Result<()> {
    let dir = marker.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    std::fs::File::create(marker)?.sync_all()?;
    crate::durable::sync_dir(dir)
}

/// Drops the scan markers of a VM's disks once a log that read them whole is committed (any log
/// after a marker was written did: [`RunningPoint::freeze`] reads a marked disk whole).
pub fn scans_committed(tracking: &Path, disks: usize) {
    for i in 0..disks {
        let _ = std::fs::remove_file(scan_marker(tracking, i));
    }
}

/// The record of the generation of disk `index`'s bitmap that records since the last point was
/// frozen (`disk<i>.generation`). Generations only grow, from one tracking restart to the next
/// too, so a bitmap below it came back with an older copy of the file (a backup restored while
/// the VM was off): it lacks writes the replica holds and the copy undid, and is not trusted.
fn generation_record(tracking: &Path, index: usize) -> PathBuf {
    tracking.join(format!("disk{index}.generation"))
}

fn expected_generation(tracking: &Path, index: usize) -> Option<u64> {
    std::fs::read_to_string(generation_record(tracking, index))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Written once a point is frozen. (A crash before leaves the record of the point before: lower,
/// never higher than what the disk holds.)
fn expect_generation(tracking: &Path, index: usize, generation: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(tracking)?;
    crate::durable::write_file(
        &generation_record(tracking, index),
        format!("{generation}\n").as_bytes(),
    )
}

fn marks_record(tracking: &Path, index: usize) -> PathBuf {
    tracking.join(format!("disk{index}.running-marked.json"))
}

/// What bitmap `vmreplica-<generation>` of a disk marked once a turned-off point was committed.
#[derive(serde::Serialize, serde::Deserialize)]
struct Marks {
    generation: u64,
    runs: crate::replication::journal::Runs,
    /// The file's fingerprint before the bitmap was read: unchanged, so are the marks.
    print: Option<disk::fingerprint::Fingerprint>,
}

fn read_marks(tracking: &Path, index: usize) -> Option<Marks> {
    std::fs::read(marks_record(tracking, index))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// After a turned-off VM's delta point was committed: what each qcow2 disk's tracker bitmap (the
/// one recording since the last running point, which QEMU's tools keep recording in) marks now,
/// for the next freeze to check ([`RunningPoint::freeze`]); one never tracked running has nothing
/// to remember. Where the bitmap cannot be read (the VM was started meanwhile and QEMU holds it in
/// use, or it is gone), what was remembered of that generation stays: a subset of what it marks,
/// since bitmaps only grow. (A bitmap gone or left inconsistent is not trusted at the freeze.)
pub async fn remember_offline_marks(data_dir: &Path, vm: uuid::Uuid, images: &[String]) {
    let tracking = super::reverse::tracking_dir(data_dir, vm);
    for (i, image) in images.iter().enumerate() {
        let Some(generation) = expected_generation(&tracking, i) else {
            continue;
        };
        if !super::offline::is_qcow2(Path::new(image)) {
            continue; // a raw disk's bitmaps end with its QEMU process
        }
        let before = read_marks(&tracking, i);
        let now = disk::fingerprint::Fingerprint::of(Path::new(image)).ok();
        if before
            .as_ref()
            .is_some_and(|m| m.generation == generation && m.print.is_some() && m.print == now)
        {
            continue; // the file is as it was when these marks were read
        }
        let print = crate::replication::journal::settled_fingerprint(Path::new(image));
        let size = disk::scan::hashmap::MapReader::open(&tracking.join(format!("disk{i}.hashes")))
            .map(|m| m.disk_size);
        let name = format!("{}{generation}", disk::bitmap::PREFIX);
        let read = match size {
            Ok(size) => super::failback::read_bitmap(data_dir, vm, i, image, size, &name).await,
            Err(e) => Err(e.to_string()),
        };
        let kept = read.and_then(|runs| {
            let marks = Marks {
                generation,
                runs,
                print,
            };
            let json = serde_json::to_vec(&marks).map_err(|e| e.to_string())?;
            crate::durable::write_file(&marks_record(&tracking, i), &json)
                .map_err(|e| e.to_string())
        });
        if let Err(why) = kept {
            if before.is_none_or(|m| m.generation != generation) {
                let _ = std::fs::remove_file(marks_record(&tracking, i));
            }
            tracing::info!(%vm, disk = %image, "what its bitmap {name} marks now is not remembered: {why}");
        }
    }
}

/// Once a running point was committed: the marks remembered at turned-off points describe a bitmap
/// that is gone.
pub fn forget_offline_marks(tracking: &Path, disks: usize) {
    for i in 0..disks {
        let _ = std::fs::remove_file(marks_record(tracking, i));
    }
}

/// A frozen point of a running VM, until [`RunningPoint::finish`].
pub struct RunningPoint {
    tracker: BitmapTracker,
    point: FrozenPoint,
    /// Per disk: read through its bitmap (true) or hash-scanned whole (false).
    by_bitmap: Vec<bool>,
    /// Per disk read through its bitmap: what it must still mark ([`remember_offline_marks`]).
    must_mark: Vec<Option<crate::replication::journal::Runs>>,
    /// Where the VM's scan markers are.
    tracking: PathBuf,
    /// When the point was frozen (Unix microseconds): its recovery point's time.
    frozen_at_micros: i64,
}

/// The per-VM working directory (fleecing images) and NBD socket in the VM's QEMU process.
fn work_paths(data_dir: &Path, vm: &VmRow) -> (PathBuf, PathBuf) {
    let id = vm.id.simple().to_string();
    let work = data_dir.join("run").join(format!("vm-{id}"));
    let natural = work.join("fleece.sock");
    // A unix socket path must stay under 108 bytes.
    let socket = if natural.as_os_str().len() <= 107 {
        natural
    } else {
        std::env::temp_dir().join(format!("vmreplica-{id}.sock"))
    };
    (work, socket)
}

/// A tracker of `vm`'s QEMU process (QMP socket `qmp`), whose frozen points are exported by the
/// NBD server the VM's definition names, else by one it starts at the VM's own socket.
async fn tracker(vm: &VmRow, qmp: &str, data_dir: &Path) -> Result<BitmapTracker, RunningError> {
    let (work, socket) = work_paths(data_dir, vm);
    let tracker = BitmapTracker::connect(Path::new(qmp), &work)
        .await
        .map_err(failed)?;
    Ok(match vm.power.nbd_socket.as_deref() {
        Some(existing) => tracker.with_nbd_server(Path::new(existing)),
        None => tracker.with_nbd_socket(&socket),
    })
}

/// What the QEMU process of `vm` tracked on its disks since the last shipped point, in bytes
/// (`PendingReplicationSize`); None when any disk is not tracked (its changes are unknown until the
/// next cycle scans it) or the process cannot be asked.
pub async fn pending_bytes(vm: &VmRow, data_dir: &Path) -> Option<u64> {
    let qmp = vm.power.qmp_socket.as_deref()?;
    let (work, _) = work_paths(data_dir, vm);
    let mut tracker = BitmapTracker::connect(Path::new(qmp), &work).await.ok()?;
    let mut total = 0u64;
    for path in &vm.disks {
        let node = tracker.node_for_image(Path::new(path)).await.ok()?;
        total = total.saturating_add(tracker.tracked_bytes(&node).await.ok()??);
    }
    Some(total)
}

/// Ends what replication of `vm` keeps in its running QEMU process, once its relationship is
/// removed: a frozen point an interrupted cycle left (its fleecing export, job and overlay), the
/// tracker's bitmaps and the other `vmr-*` ones named in `also`, and the NBD server a cycle
/// started; then the per-VM working directory ([`remove_work`]).
pub async fn stop_tracking(vm: &VmRow, data_dir: &Path, also: &[&str]) -> Result<(), RunningError> {
    let Some(qmp) = vm.power.qmp_socket.as_deref() else {
        return Ok(());
    };
    let mut tracker = tracker(vm, qmp, data_dir).await?;
    let mut problems = Vec::new();
    for path in &vm.disks {
        let stopped = match tracker.node_for_image(Path::new(path)).await {
            Ok(node) => tracker.stop_tracking(&node, also).await,
            Err(disk::bitmap::BitmapError::NoSuchNode(_)) => continue,
            Err(e) => Err(e),
        };
        if let Err(e) = stopped {
            problems.push(format!("{path}: {}", crate::error_chain(&e)));
        }
    }
    if let Err(e) = tracker.stop_own_nbd_server().await {
        problems.push(format!("its NBD server: {}", crate::error_chain(&e)));
    }
    if !problems.is_empty() {
        return Err(RunningError::Failed(problems.join("; ")));
    }
    remove_work(data_dir, vm);
    Ok(())
}

/// Removes the per-VM working directory and NBD socket of a VM no longer replicated, whose QEMU
/// process uses neither (it ended, or [`stop_tracking`] ended what used them).
pub fn remove_work(data_dir: &Path, vm: &VmRow) {
    let (work, socket) = work_paths(data_dir, vm);
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_dir_all(work);
}

impl RunningPoint {
    /// Freezes every disk of `vm`. `full`: initial replication (tracking restarts on every disk and
    /// every disk is read whole).
    pub async fn freeze(
        vm: &VmRow,
        data_dir: &Path,
        full: bool,
    ) -> Result<RunningPoint, RunningError> {
        let Some(qmp) = vm.power.qmp_socket.as_deref() else {
            return Err(RunningError::Failed(format!(
                "'{}' has no QMP socket in its definition",
                vm.name
            )));
        };
        // Below, `recover` ends any point an earlier session left in the process: a recorded
        // delivery of an initial replication read from one must not find another later.
        super::network::forget_delivery(data_dir, vm.id);
        let mut tracker = tracker(vm, qmp, data_dir).await?;
        let mut nodes = Vec::new();
        let mut by_bitmap = Vec::new();
        let mut must_mark = Vec::new();
        let tracking = super::reverse::tracking_dir(data_dir, vm.id);
        for (i, path) in vm.disks.iter().enumerate() {
            let node = tracker.node_for_image(Path::new(path)).await.map_err(|e| {
                RunningError::Failed(format!(
                    "the QEMU process of '{}' does not hold {path} as a block node: {}",
                    vm.name,
                    crate::error_chain(&e)
                ))
            })?;
            tracker.recover(&node).await.map_err(failed)?;
            let status = tracker.status(&node).await.map_err(failed)?;
            let expected = expected_generation(&tracking, i);
            let (tracked, found) = match status {
                BitmapStatus::Tracking(g) => (true, g),
                BitmapStatus::Inconsistent(g) => (false, g),
                BitmapStatus::Missing => (false, 0),
            };
            let older = tracked && expected.is_some_and(|e| found < e);
            let marker = scan_marker(&tracking, i);
            if older && !full {
                tracing::warn!(vm = %vm.id, disk = %path, found, expected = expected.unwrap_or_default(), "this disk's bitmap is older than the one recording since the last point (was the file replaced by an older copy of itself?): hash-scanning it once, tracking restarts");
            } else if !tracked && !full {
                tracing::info!(vm = %vm.id, disk = %path, ?status, "changes of this disk were not tracked since the last point: hash-scanning it once, tracking restarts");
            } else if tracked && !full && marker.exists() {
                tracing::info!(vm = %vm.id, disk = %path, "tracking of this disk restarted after the last shipped point and no scan of it was committed yet: hash-scanning it");
            }
            let trusted = tracked && !older;
            if !trusted && !full {
                mark_for_scan(&marker)
                    .map_err(|e| RunningError::Failed(format!("{}: {e}", marker.display())))?;
            }
            if full || !trusted {
                // Above every generation this disk had: an older copy's bitmap stays below.
                let next = found.max(expected.unwrap_or(0)) + 1;
                tracker.start_tracking(&node, next).await.map_err(failed)?;
            }
            let by = trusted && !full && !marker.exists();
            by_bitmap.push(by);
            // (Of this generation only: a record left by a crash before a running point's commit
            // forgot it describes a bitmap that is gone.)
            must_mark.push(if by {
                read_marks(&tracking, i)
                    .filter(|m| m.generation == found)
                    .map(|m| m.runs)
            } else {
                None
            });
            if full {
                // A new lineage of bitmaps begins with this point.
                let _ = std::fs::remove_file(marks_record(&tracking, i));
            }
            nodes.push(node);
        }
        let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let point = tracker.freeze(&names).await.map_err(|e| match e {
            disk::bitmap::BitmapError::ResyncRequired { .. } => {
                RunningError::Resync(crate::error_chain(&e))
            }
            other => failed(other),
        })?;
        let frozen_at_micros = crate::clock::now() * 1_000_000;
        for (i, g) in point.generations().into_iter().enumerate() {
            if let Err(e) = expect_generation(&tracking, i, g + 1) {
                tracing::warn!(vm = %vm.id, disk = i, "cannot record the generation of its bitmap: {e}");
            }
        }
        Ok(RunningPoint {
            tracker,
            point,
            by_bitmap,
            must_mark,
            tracking,
            frozen_at_micros,
        })
    }

    /// The frozen point of an initial replication (every disk read whole) that an earlier run of
    /// this daemon took of `vm` and left in its QEMU process when it stopped, each disk's changes
    /// in bitmap `generations[i]` ([`RunningPoint::generations`]); None when the process no longer
    /// holds all of it (it restarted, or the point was ended).
    pub async fn adopt(
        vm: &VmRow,
        data_dir: &Path,
        generations: &[u64],
    ) -> Result<Option<RunningPoint>, RunningError> {
        let Some(qmp) = vm.power.qmp_socket.as_deref() else {
            return Ok(None);
        };
        let mut tracker = tracker(vm, qmp, data_dir).await?;
        let mut nodes = Vec::new();
        for path in &vm.disks {
            match tracker.node_for_image(Path::new(path)).await {
                Ok(node) => nodes.push(node),
                Err(disk::bitmap::BitmapError::NoSuchNode(_)) => return Ok(None),
                Err(e) => return Err(failed(e)),
            }
        }
        let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let point = tracker.adopt(&names, generations).await.map_err(failed)?;
        Ok(point.map(|point| RunningPoint {
            tracker,
            point,
            by_bitmap: vec![false; vm.disks.len()],
            must_mark: vec![None; vm.disks.len()],
            tracking: super::reverse::tracking_dir(data_dir, vm.id),
            // (Its delivery record keeps the time it was frozen.)
            frozen_at_micros: crate::clock::now() * 1_000_000,
        }))
    }

    /// When the point was frozen (Unix microseconds): the time of the recovery point it becomes,
    /// however long the reading that follows takes.
    pub fn frozen_at_micros(&self) -> i64 {
        self.frozen_at_micros
    }

    /// Each disk's bitmap generation of this point, for [`RunningPoint::adopt`].
    pub fn generations(&self) -> Vec<u64> {
        self.point.generations()
    }

    /// Reads disk `index` of the point into `log`: the changes since `previous` (the last shipped
    /// map), or everything when `previous` is None. Writes the new map to `<map>.tmp`.
    pub async fn read_disk<W: Write>(
        &self,
        index: usize,
        previous: Option<&Path>,
        map: &Path,
        log: &mut LogWriter<W>,
    ) -> Result<PathBuf, RunningError> {
        self.read_disk_ranges(index, previous, map, log, None).await
    }

    /// The byte ranges bitmap `name` (`vmr-*`, kept in the image by vmreplica) of disk `index`
    /// marks, read from the VM's QEMU process; None when that disk has no consistent such bitmap.
    pub async fn other_bitmap(
        &self,
        index: usize,
        name: &str,
    ) -> Result<Option<Vec<(u64, u64)>>, RunningError> {
        self.point.other_bitmap(index, name).await.map_err(failed)
    }

    /// [`RunningPoint::read_disk`], looking only at `ranges` (byte ranges) when given instead of
    /// what the disk's bitmap or a full scan would choose.
    pub async fn read_disk_ranges<W: Write>(
        &self,
        index: usize,
        previous: Option<&Path>,
        map: &Path,
        log: &mut LogWriter<W>,
        ranges: Option<&[(u64, u64)]>,
    ) -> Result<PathBuf, RunningError> {
        let mut nbd = self.point.connect(index).await.map_err(failed)?;
        let size = self.point.disks[index].size;
        let candidates = if let Some(ranges) = ranges {
            Some(ranges.to_vec())
        } else if self.by_bitmap[index] && previous.is_some() {
            let context = self.point.dirty_context(index);
            let dirty: Vec<(u64, u64)> = nbd
                .map(&context, 0, size)
                .await
                .map_err(failed)?
                .iter()
                .filter(|e| e.is_dirty())
                .map(|e| (e.offset, e.length))
                .collect();
            let marked = super::failback::block_runs(dirty.iter().copied());
            let lost = self.must_mark[index]
                .as_ref()
                .is_some_and(|must| crate::replication::journal::union(&marked, must) != marked);
            if lost {
                // Until a scan of it is committed (the bitmap merged back after a failed cycle
                // still lacks those marks, but the record may be gone by then).
                tracing::warn!(disk = index, "this disk's bitmap lost blocks it marked when the last turned-off point was committed (was the file replaced by an older copy of itself?): hash-scanning it");
                mark_for_scan(&scan_marker(&self.tracking, index))
                    .map_err(|e| RunningError::Failed(format!("the scan marker: {e}")))?;
                None
            } else {
                Some(dirty)
            }
        } else {
            None
        };
        let disk = u32::try_from(index).unwrap_or(u32::MAX);
        let result = scan_disk_ranges(
            &mut Source::Nbd(&mut nbd),
            disk,
            previous,
            map,
            DEFAULT_BLOCK_SIZE,
            log,
            candidates.as_deref(),
        )
        .await;
        let _ = nbd.disconnect().await;
        match result {
            Ok((tmp, _)) => Ok(tmp),
            Err(disk::scan::ScanError::ResyncRequired(why)) => Err(RunningError::Resync(why)),
            Err(e) => Err(failed(e)),
        }
    }

    /// Ends the point: `durable` drops the old bitmaps (the replica committed the log), otherwise
    /// they are merged into the new ones so that the next point ships these changes again.
    pub async fn finish(self, durable: bool) -> Result<(), RunningError> {
        let RunningPoint {
            mut tracker, point, ..
        } = self;
        if durable {
            point.commit(&mut tracker).await.map_err(failed)
        } else {
            point.abort(&mut tracker).await.map_err(failed)
        }
    }
}
