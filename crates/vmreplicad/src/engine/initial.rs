//! Initial replication on offline media: `StartReplication` type 2 (export) on the primary and
//! `ImportInitialReplica` on the replica.
//!
//! Export reads every disk of the (turned-off) VM — raw images directly, other formats from the
//! files `qemu-img map` points at, or through a read-only qemu-nbd when that cannot be done — and
//! writes one full-image replication log,
//! `<location>/<VMName>_<VMID>/initial-replica.vrlog` (written under a temporary name, fsynced,
//! renamed), plus the block-hash map and the file fingerprint of each disk under
//! `<data-dir>/tracking/<VMID>/`, the baseline of the next delta. The relationship stays in 2 (waiting for the import).
//!
//! Import verifies that log and applies it as recovery point 1 of the replica's point store
//! (`<ReplicaStorageLocation of the bound authorization entry, or <data-dir>/replicas>/<VMID>/`),
//! mirrors the store's points into the catalog, and moves the relationship to 3 with
//! LastReplicationTime (the point's time) and LastApplyTime (now).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use disk::export::{ExportSpec, NbdExport};
use disk::points::{PointInfo, PointKind, PointStore};
use disk::scan::mapped::MappedImage;
use disk::scan::{hashmap, Source, DEFAULT_BLOCK_SIZE};
use uuid::Uuid;
use wire::{Compression, DiskInfo, Expect, LogHeader, LogWriter, PointType};

use crate::claims::VmClaim;
use crate::clock::now;
use crate::jobs::{JobContext, JobFailure};
use crate::power;
use crate::replication::client::LogMode;
use crate::store::{PointRow, RelationshipRow, Store, VmRow};

/// File name of the initial replica inside the VM's export folder.
pub const INITIAL_LOG: &str = "initial-replica.vrlog";

/// The folder an export writes for `vm` below `location` (`<VMName>_<VMID>`). A path separator in
/// the name (a replica's name comes from its primary) becomes `_`: the folder stays one level
/// below `location`, never above or elsewhere.
pub fn export_folder(location: &Path, vm: &VmRow) -> PathBuf {
    let name: String = vm
        .name
        .chars()
        .map(|c| {
            if matches!(c, '/' | '\\' | '\0') {
                '_'
            } else {
                c
            }
        })
        .collect();
    location.join(format!("{name}_{}", vm.id.to_string().to_uppercase()))
}

/// Where the replica's recovery points of `vm` live.
pub fn replica_root(store: &Store, data_dir: &Path, rel: &RelationshipRow) -> PathBuf {
    let bound = rel.authorization_entry.as_deref().and_then(|host| {
        store
            .authorization_entries()
            .ok()?
            .into_iter()
            .find(|e| e.allowed_primary_host_system.eq_ignore_ascii_case(host))
    });
    match bound {
        Some(entry) => PathBuf::from(entry.replica_storage_location),
        None => data_dir.join("replicas"),
    }
}

fn fail(message: impl Into<String>, action: &str) -> JobFailure {
    JobFailure::failed(message, action)
}

/// The format and virtual size of an image, from `qemu-img info`.
fn image_info(path: &str) -> Result<(String, u64), JobFailure> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U", path])
        .output()
        .map_err(|e| {
            fail(
                format!("cannot run qemu-img info on {path}: {e}"),
                "Install qemu-utils.",
            )
        })?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(fail(
            format!("cannot read the disk image {path}: {why}"),
            "Check the VM's disk paths.",
        ));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        fail(
            format!("qemu-img info of {path} is not JSON: {e}"),
            "Check qemu-utils.",
        )
    })?;
    let format = info["format"].as_str().unwrap_or("raw").to_string();
    let size = info["virtual-size"].as_u64().unwrap_or(0);
    Ok((format, size))
}

/// A full-image log written to a file (or sent from memory), and the baseline it leaves once the
/// replica has it.
pub struct FullLog {
    pub path: PathBuf,
    pub summary: wire::LogSummary,
    /// (temporary, final) block-hash map of each disk.
    maps: Vec<(PathBuf, PathBuf)>,
    tracking: PathBuf,
}

pub use crate::replication::growing::LogOut;

/// Refuses a running VM: a full image is read from disks that do not change.
pub fn require_off(vm: &VmRow, alternative: &str) -> Result<(), JobFailure> {
    if power::enabled_state(&vm.power) == power::ENABLED {
        return Err(fail(
            format!(
                "'{}' is running; initial replication reads its disks while they do not change",
                vm.name
            ),
            &format!("Turn the VM off and start again{alternative}."),
        ));
    }
    Ok(())
}

/// The disk table of `vm` (format and virtual size of each image).
pub fn disk_table(vm: &VmRow) -> Result<Vec<(String, u64)>, JobFailure> {
    vm.disks.iter().map(|p| image_info(p)).collect()
}

/// A log header's disk table for a [`disk_table`]: `disk<i>` and the virtual sizes.
pub fn log_disks(table: &[(String, u64)]) -> Vec<DiskInfo> {
    table
        .iter()
        .enumerate()
        .map(|(i, (_, size))| DiskInfo {
            id: format!("disk{i}"),
            virtual_size: *size,
        })
        .collect()
}

/// Hashes `images` (path, format; in disk-table order, `disks` their table) into block-hash maps
/// `tracking/disk<i>.<name>` and returns the temporary files for `hashmap::commit`; nothing else is
/// kept. Checks `ctx` for a cancel between disks.
pub async fn hash_images(
    ctx: Option<&JobContext>,
    vm: Uuid,
    images: &[(String, String)],
    disks: Vec<DiskInfo>,
    tracking: &Path,
    name: &str,
    data_dir: &Path,
) -> Result<Vec<PathBuf>, JobFailure> {
    std::fs::create_dir_all(tracking).map_err(|e| {
        fail(
            format!("cannot create {}: {e}", tracking.display()),
            "Check the data directory.",
        )
    })?;
    let header = LogHeader {
        vm,
        relationship: 0,
        sequence: 1,
        parent: 0,
        point_time_micros: now() * 1_000_000,
        point_type: PointType::Standard,
        full_image: true,
        disks,
    };
    let mut sink = LogWriter::new(std::io::sink(), header, Compression::Off)
        .map_err(|e| fail(e.to_string(), "Report this as a bug."))?;
    let mut tmps = Vec::new();
    for (i, (image, format)) in images.iter().enumerate() {
        let scanned = match ctx.map(JobContext::check_cancelled).transpose() {
            Err(e) => Err(e),
            Ok(_) => {
                let map = tracking.join(format!("disk{i}.{name}"));
                scan_image(image, format, i, None, &map, data_dir, &mut sink)
                    .await
                    .map_err(JobFailure::from)
            }
        };
        match scanned {
            Ok(tmp) => tmps.push(tmp),
            Err(e) => {
                for t in &tmps {
                    let _ = std::fs::remove_file(t);
                }
                return Err(e);
            }
        }
    }
    Ok(tmps)
}

/// Writes log `sequence` 1 of `vm`, a full image of every disk as of `point_time_micros`, to `path`
/// (under a temporary name, fsynced, renamed), reporting progress from 0 to `progress_to` percent.
/// The block-hash maps become the baseline only with [`commit_baseline`].
#[allow(clippy::too_many_arguments)]
pub async fn write_full_log(
    ctx: &JobContext,
    vm: &VmRow,
    path: &Path,
    point_time_micros: i64,
    mode: LogMode,
    data_dir: &Path,
    progress_to: u16,
    running: Option<&super::running::RunningPoint>,
    growing: Option<std::sync::Arc<crate::replication::client::GrowingLog>>,
) -> Result<FullLog, JobFailure> {
    let result = write_full_log_inner(
        ctx,
        vm,
        path,
        point_time_micros,
        mode,
        data_dir,
        progress_to,
        running,
        growing.clone(),
    )
    .await;
    if let Some(g) = growing {
        match &result {
            Ok(log) => g.finish(hex::encode(log.summary.hash), log.summary.bytes),
            Err(f) => g.fail(f.message.clone()),
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn write_full_log_inner(
    ctx: &JobContext,
    vm: &VmRow,
    path: &Path,
    point_time_micros: i64,
    mode: LogMode,
    data_dir: &Path,
    progress_to: u16,
    running: Option<&super::running::RunningPoint>,
    growing: Option<std::sync::Arc<crate::replication::client::GrowingLog>>,
) -> Result<FullLog, JobFailure> {
    let disks = disk_table(vm)?;
    let header = LogHeader {
        vm: vm.id,
        relationship: 0,
        sequence: 1,
        parent: 0,
        point_time_micros,
        point_type: PointType::Standard,
        full_image: true,
        disks: log_disks(&disks),
    };
    // A log sent while it is written goes to memory (or to its file, if the growing log is one); an
    // export is written under a temporary name and renamed when complete.
    let tmp_log = match growing {
        Some(_) => path.to_path_buf(),
        None => path.with_extension("vrlog.tmp"),
    };
    let out = LogOut::create(&tmp_log, growing).map_err(|e| {
        fail(
            format!("cannot write {}: {e}", tmp_log.display()),
            "Check free space and permissions.",
        )
    })?;
    let mut log = mode
        .writer(
            BufWriter::with_capacity(crate::replication::growing::WRITE_BUFFER, out),
            header,
        )
        .map_err(|e| {
            fail(
                format!("cannot start the log: {e}"),
                "Report this as a bug.",
            )
        })?;
    let tracking = data_dir
        .join("tracking")
        .join(vm.id.to_string().to_uppercase());
    std::fs::create_dir_all(&tracking).map_err(|e| {
        fail(
            format!("cannot create {}: {e}", tracking.display()),
            "Check the data directory.",
        )
    })?;
    let mut maps = Vec::new();
    for (i, (format, _)) in disks.iter().enumerate() {
        ctx.check_cancelled()?;
        let map = tracking.join(format!("disk{i}.hashes"));
        let tmp = match running {
            Some(r) => r.read_disk(i, None, &map, &mut log).await.map_err(|e| {
                fail(
                    format!("reading {} failed: {}", vm.disks[i], e.message()),
                    "Check the VM's QEMU process and its QMP socket.",
                )
            })?,
            None => scan_one(&vm.disks[i], format, i, &map, data_dir, &mut log).await?,
        };
        maps.push((tmp, map));
        let done = ((i + 1) * usize::from(progress_to) / disks.len().max(1)) as u16;
        ctx.progress(done.min(progress_to))?;
    }
    let (writer, summary) = log
        .finish()
        .map_err(|e| fail(format!("cannot finish the log: {e}"), "Check free space."))?;
    let out = writer
        .into_inner()
        .map_err(|e| fail(format!("cannot write the log: {e}"), "Check free space."))?;
    // A log being sent needs no fsync (after a crash it is built again); an export does.
    let durable = matches!(out, LogOut::File(_));
    if let LogOut::File(file) = out {
        file.sync_all().map_err(|e| {
            fail(
                format!("cannot sync the log: {e}"),
                "Check the disk holding the log.",
            )
        })?;
    }
    if tmp_log != path {
        std::fs::rename(&tmp_log, path).map_err(|e| {
            fail(
                format!("cannot rename the log: {e}"),
                "Check the disk holding the log.",
            )
        })?;
    }
    if durable {
        // Its name, and the export folder's own (made for it), survive a power cut too: the
        // primary records the export as done next.
        let folder = path.parent().unwrap_or(Path::new("."));
        // (A file system that cannot sync a directory, some network ones, is not an error.)
        let sync = |dir: &Path| match crate::durable::sync_dir(dir) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP)) => Ok(()),
            other => other,
        };
        let synced = sync(folder).and_then(|()| match folder.parent() {
            Some(above) if !above.as_os_str().is_empty() => sync(above),
            _ => Ok(()),
        });
        synced.map_err(|e| {
            fail(
                format!("cannot sync the folder of the log: {e}"),
                "Check the disk holding the log.",
            )
        })?;
    }
    Ok(FullLog {
        path: path.to_path_buf(),
        summary,
        maps,
        tracking,
    })
}

/// Makes the block-hash maps of `log` the baseline of the next delta, with each disk's file
/// fingerprint taken before it was read (`prints`: None for a running VM), which a failback
/// compares (replication::journal::record_fingerprints).
pub fn commit_baseline(
    vm: &VmRow,
    log: &FullLog,
    prints: Option<&[Option<disk::fingerprint::Fingerprint>]>,
) -> Result<(), JobFailure> {
    for (tmp, map) in &log.maps {
        hashmap::commit(tmp, map).map_err(|e| fail(e.to_string(), "Check the data directory."))?;
    }
    crate::replication::journal::record_fingerprints(&log.tracking, prints, vm.disks.len());
    Ok(())
}

/// The export job's work.
pub async fn export(
    ctx: JobContext,
    vm: VmRow,
    location: PathBuf,
    compression: bool,
    data_dir: PathBuf,
    _claim: VmClaim,
) -> Result<String, JobFailure> {
    require_off(&vm, ", or replicate over the network")?;
    let folder = export_folder(&location, &vm);
    std::fs::create_dir_all(&folder).map_err(|e| {
        fail(
            format!("cannot create {}: {e}", folder.display()),
            "Check the export location.",
        )
    })?;
    let final_log = folder.join(INITIAL_LOG);
    // Its qcow2 disks record what is written to them from before they are read (engine::offline).
    let tracking = super::reverse::tracking_dir(&data_dir, vm.id);
    let rotation = super::offline::Rotation::before_read(&vm.disks, &tracking, true).await;
    let prints = crate::replication::journal::fingerprints_before_read(&vm.disks);
    let written = write_full_log(
        &ctx,
        &vm,
        &final_log,
        now() * 1_000_000,
        LogMode::local(compression),
        &data_dir,
        99,
        None,
        None,
    )
    .await;
    let log = match written.and_then(|log| commit_baseline(&vm, &log, Some(&prints)).map(|()| log))
    {
        Ok(log) => log,
        Err(f) => {
            rotation.abandon(&vm.disks).await;
            return Err(f);
        }
    };
    rotation.after_commit(&vm.disks, &tracking).await;
    super::offline::remember_marked(&data_dir, vm.id, &vm.disks, &tracking, 1).await;
    tracing::info!(vm = %vm.id, bytes = log.summary.bytes, log = %final_log.display(), "initial replica exported");
    Ok(hex::encode(log.summary.hash))
}

/// A disk that could not be scanned: `resync` when its tracking data cannot be trusted (size or
/// block size changed, baseline map unreadable) rather than an I/O problem.
pub struct ScanFailure {
    pub failure: JobFailure,
    pub resync: bool,
}

impl From<JobFailure> for ScanFailure {
    fn from(failure: JobFailure) -> Self {
        ScanFailure {
            failure,
            resync: false,
        }
    }
}

impl From<ScanFailure> for JobFailure {
    fn from(f: ScanFailure) -> Self {
        f.failure
    }
}

async fn scan_one<W: Write>(
    image: &str,
    format: &str,
    index: usize,
    map: &Path,
    data_dir: &Path,
    log: &mut LogWriter<W>,
) -> Result<PathBuf, JobFailure> {
    Ok(scan_image(image, format, index, None, map, data_dir, log).await?)
}

/// Hash-scans disk image `image` into `log` as disk `index`: every block when `previous` is None
/// (a full image), else only the blocks whose hash differs from the map `previous`. Writes the new
/// map to `<map>.tmp` and returns that path for [`hashmap::commit`].
pub async fn scan_image<W: Write>(
    image: &str,
    format: &str,
    index: usize,
    previous: Option<&Path>,
    map: &Path,
    data_dir: &Path,
    log: &mut LogWriter<W>,
) -> Result<PathBuf, ScanFailure> {
    scan_image_ranges(image, format, index, previous, map, data_dir, log, None)
        .await
        .map(|(tmp, _)| tmp)
}

/// [`scan_image`] limited to `candidates` (sorted byte ranges): see `scan_disk_ranges`. Also
/// returns the bytes it read from the disk.
#[allow(clippy::too_many_arguments)]
pub async fn scan_image_ranges<W: Write>(
    image: &str,
    format: &str,
    index: usize,
    previous: Option<&Path>,
    map: &Path,
    data_dir: &Path,
    log: &mut LogWriter<W>,
    candidates: Option<&[(u64, u64)]>,
) -> Result<(PathBuf, u64), ScanFailure> {
    let scan_err = |e: disk::scan::ScanError| ScanFailure {
        resync: matches!(e, disk::scan::ScanError::ResyncRequired(_)),
        failure: fail(
            format!("reading {image} failed: {}", crate::error_chain(&e)),
            "Check the disk image.",
        ),
    };
    let disk_index = u32::try_from(index).unwrap_or(u32::MAX);
    // Raw images are read directly; other formats from the files of the chain where `qemu-img map`
    // says the data is; images that cannot be read that way (compressed, encrypted, external data
    // file) go through qemu-nbd.
    let raw = match format {
        "raw" => Some(
            File::open(image)
                .map_err(|e| fail(format!("cannot open {image}: {e}"), "Check the disk path."))?,
        ),
        _ => None,
    };
    let mapped = match raw {
        Some(_) => None,
        None => MappedImage::open(Path::new(image), format)
            .map_err(|e| {
                tracing::info!(
                    image,
                    "reading through qemu-nbd: {}",
                    crate::error_chain(&e)
                )
            })
            .ok(),
    };
    let direct = match (&raw, &mapped) {
        (Some(file), _) => Some(Source::RawFile(file)),
        (None, Some(m)) => Some(Source::Mapped(m)),
        (None, None) => None,
    };
    if let Some(mut source) = direct {
        let (tmp, stats) = disk::scan::scan_disk_ranges(
            &mut source,
            disk_index,
            previous,
            map,
            DEFAULT_BLOCK_SIZE,
            log,
            candidates,
        )
        .await
        .map_err(scan_err)?;
        return Ok((tmp, stats.read_bytes));
    }
    let spec = ExportSpec::new(image, format);
    let export = NbdExport::start(
        &spec,
        &data_dir.join("run"),
        &format!("export-{}", Uuid::new_v4()),
    )
    .await
    .map_err(|e| {
        fail(
            format!("cannot open {image}: {}", crate::error_chain(&e)),
            "Check the disk image and that no other process holds it.",
        )
    })?;
    let mut nbd = export.connect(&["base:allocation"]).await.map_err(|e| {
        fail(
            format!("cannot read {image}: {}", crate::error_chain(&e)),
            "Check qemu-nbd.",
        )
    })?;
    let result = disk::scan::scan_disk_ranges(
        &mut Source::Nbd(&mut nbd),
        disk_index,
        previous,
        map,
        DEFAULT_BLOCK_SIZE,
        log,
        candidates,
    )
    .await;
    let _ = nbd.disconnect().await;
    export.stop().await;
    let (tmp, stats) = result.map_err(scan_err)?;
    Ok((tmp, stats.read_bytes))
}

pub(crate) fn point_row(vm: Uuid, p: &PointInfo) -> PointRow {
    let kind = match p.kind {
        PointKind::Standard => "Standard",
        PointKind::ApplicationConsistent => "ApplicationConsistent",
        PointKind::PlannedFailover => "PlannedFailover",
    };
    PointRow {
        vm,
        sequence: p.sequence,
        time_micros: p.time_micros,
        kind: kind.into(),
        full_image: p.full_image,
        log_hash: p.log_hash.clone(),
    }
}

/// What an import job needs.
pub struct Import {
    pub store: Arc<Store>,
    pub vm: VmRow,
    pub location: PathBuf,
    pub data_dir: PathBuf,
    /// Held until the job ends.
    pub claim: VmClaim,
}

/// The import job's work: applies the log and returns the relationship with its replication and
/// apply times set (the caller writes the state).
pub async fn import(
    ctx: JobContext,
    job: Import,
    mut rel: RelationshipRow,
) -> Result<RelationshipRow, JobFailure> {
    let Import {
        store,
        vm,
        location,
        data_dir,
        claim: _claim,
    } = job;
    let candidates = [
        export_folder(&location, &vm).join(INITIAL_LOG),
        location.join(INITIAL_LOG),
    ];
    let Some(log) = candidates.iter().find(|p| p.is_file()) else {
        return Err(fail(
            format!(
                "no initial replica of '{}' in {} (looked for {})",
                vm.name,
                location.display(),
                candidates[0].display()
            ),
            "Give the folder that StartReplication exported (it holds <VMName>_<VMID>/initial-replica.vrlog).",
        ));
    };
    // A replica VM kept from an earlier relationship: its store, wherever that is.
    let root = match store.replica_vm(vm.id)? {
        Some(kept) => PathBuf::from(kept.store_root),
        None => replica_root(&store, &data_dir, &rel),
    };
    let points = PointStore::open(&root, vm.id).await.map_err(|e| {
        fail(
            format!(
                "cannot open the replica store in {}: {}",
                root.display(),
                crate::error_chain(&e)
            ),
            "Check the replica storage location.",
        )
    })?;
    // A replica VM kept from an earlier relationship holds its points: an exported initial
    // replica (log 1, a whole new chain) cannot go on top of them. (Point 1 alone may be this very
    // log's, imported by a run cut off before it recorded so: the apply tells.)
    let kept = |latest: u64| {
        fail(
            format!(
                "'{}' already holds recovery points (the latest is {latest}) of an earlier relationship; an exported initial replica starts a new chain and cannot go on top of them",
                vm.name
            ),
            "Start the initial replication as seeded on the primary (StartReplication type 3): it sends only what differs from the latest point. Or delete this replica VM and import into a new one.",
        )
    };
    let latest = points.latest_point().map_err(|e| {
        fail(
            crate::error_chain(&e),
            "Check the replica storage location.",
        )
    })?;
    match latest.map(|p| p.sequence) {
        Some(n) if n > 1 => return Err(kept(n)),
        _ => {}
    }
    ctx.progress(5)?;
    let expect = Expect {
        vm: vm.id,
        relationship: 0,
        sequence: 1,
        parent: 0,
    };
    let point = points.apply(log, &expect).await.map_err(|e| match e {
        disk::points::ApplyError::SequenceTaken { .. } => kept(1),
        disk::points::ApplyError::Superseded { latest, .. } => kept(latest),
        e => fail(
            format!(
                "the initial replica could not be imported: {}",
                crate::error_chain(&e)
            ),
            "Export the initial replica again on the primary.",
        ),
    })?;
    let all = points.list_points().map_err(|e| {
        fail(
            crate::error_chain(&e),
            "Check the replica storage location.",
        )
    })?;
    let rows: Vec<PointRow> = all.iter().map(|p| point_row(vm.id, p)).collect();
    store.put_recovery_points(vm.id, &rows)?;
    // The primary learns of the import by asking for this VM (docs/protocol.md §10), and its
    // deltas continue the chain from log 1: the replica records both like a network IR's.
    let store_root = std::fs::canonicalize(&root).unwrap_or_else(|_| root.clone());
    store.put_replica_vm(&crate::replication::records::ReplicaVmRow {
        vm: vm.id,
        disks: point
            .disks
            .iter()
            .map(|d| wire::protocol::DiskSpec {
                id: d.id.clone(),
                virtual_size: d.virtual_size,
            })
            .collect(),
        store_root: store_root.display().to_string(),
        resync_required: false,
    })?;
    store.record_applied_log(&crate::replication::records::ReceivedLog {
        vm: vm.id,
        sequence: point.sequence,
        log_hash: point.log_hash.clone(),
        log_bytes: point.log_bytes,
        point_time: point.time_micros,
        applied: true,
    })?;
    rel.last_replication_time = Some(point.time_micros / 1_000_000);
    rel.last_apply_time = Some(now());
    rel.last_replication_type = vmreplica_core::state::ReplicationType::Regular.as_u16();
    tracing::info!(vm = %vm.id, sequence = point.sequence, "initial replica imported");
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_folder_stays_one_level_below_its_location() {
        let location = Path::new("/srv/exports");
        for name in ["web01", "../../etc", "/etc/cron.d/x", "a\\b", ".."] {
            let vm = crate::store::tests::vm(name);
            let folder = export_folder(location, &vm);
            assert_eq!(folder.parent(), Some(location), "{name}");
            assert!(folder
                .file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.ends_with(&vm.id.to_string().to_uppercase())));
        }
    }
}
