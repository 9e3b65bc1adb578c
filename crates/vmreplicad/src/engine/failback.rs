//! `InitiateFailback` (DESIGN §6; docs/protocol.md §5.8): after an unplanned failover from A to
//! B, bring A's disks to a point of B by reading and sending only the blocks that may differ.
//!
//! **On A** (the old primary, where the method is called; [`LocalEngine::failback`]): the VM shows
//! 13; A asks B (`POST vms/{vm}/failback`, A being B's primary so far) to fail back to it and
//! follows B's job (`GET`, percent mirrored; a cancel here sends `DELETE`). When B's job completed
//! and A applied its log, A shows 14 and is B's replica; the relationship B → A then replicates
//! deltas, so a planned failover and a reverse complete the return.
//!
//! **On B** (the new primary; [`NewPrimary`]): the job makes B the primary of A if it is not yet
//! (CommitFailover must have run, or A named one of B's recovery points: then B's failover first
//! moves to that point, dropping what was written on the failover's disks, and is committed, so
//! that point becomes the failover point F and B wrote nothing since), then, as a Resynchronize would, asks A to take its own disks as
//! the base point (`PUT` with `reverse.failback`; A also works out which of its blocks may differ
//! from the failover point F and the exact block-hash map of its disks, `replication::failback`),
//! and compares in kind 3:
//! - the candidate blocks are A's (its logs after F, its writes since its last log) united with
//!   B's (what the failover overlay held when CommitFailover flattened it, and what was written to
//!   the flattened images since: their persistent dirty bitmap `vmr-failback-writes`, read from
//!   the VM's QEMU process while it runs);
//! - B fetches A's map and reads, hashes and compares only its candidate blocks against it; the
//!   blocks that differ are the log (A applies it as a layer over its base, so a cut leaves A's
//!   disks as they were and a rerun starts over); B's next maps are A's map with B's hashes there.
//!
//! When either side cannot tell what it wrote (a journal gap, a missing record, an inconsistent
//! bitmap), B compares every block against A's map instead — A still reads nothing more — and the
//! job's log says so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use disk::scan::hashmap::MapReader;
use disk::scan::DEFAULT_BLOCK_SIZE;
use uuid::Uuid;
use vmreplica_core::codes::ReturnCode;
use vmreplica_core::command::CommandError;
use vmreplica_core::job::{JobState, JobType};
use vmreplica_core::settings::AuthorizationEntry;
use vmreplica_core::state::{ReplicationMode, ReplicationState};
use wire::protocol::{
    BeginCompare, CompareSession, ErrorCode, FailbackBase, FailbackStatus, Route, StartFailback,
};
use wire::{LogHeader, PointType};

use super::initial::{disk_table, log_disks, scan_image_ranges, LogOut};
use super::network::{freeze_if_running, put_vm, running_failed, target, NetworkIr};
use super::reverse::{tracking_dir, REVERSE_LIMIT};
use super::seeded::{fail, local};
use super::test_failover::refused;
use super::{EngineRequest, LocalEngine};
use crate::clock::now;
use crate::jobs::{JobContext, JobEngine, JobFailure};
use crate::replication::client::{GrowingLog, PeerError};
use crate::replication::journal::{self, Runs};
use crate::replication::replica::ApiError;
use crate::store::{JobRow, RelationshipRow, Store, VmRow};

/// The persistent dirty bitmap CommitFailover adds to the flattened images: what B writes after,
/// named `vmr-failback-writes-<nanoseconds>` per commit (so a copy of the image from an earlier
/// failover, restored over it, does not bring back a bitmap that looks like this one).
/// (Not `vmreplica-*`: those are the running-VM tracker's, `disk::bitmap`.)
pub const FAILBACK_BITMAP: &str = "vmr-failback-writes";

/// What CommitFailover recorded of each flattened image (`disk<i>.failover-print.json`): which
/// file it is, and the name of its failback bitmap.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CommitRecord {
    print: disk::fingerprint::Fingerprint,
    bitmap: String,
}

fn commit_record(data_dir: &Path, vm: Uuid, i: usize) -> Result<CommitRecord, String> {
    std::fs::read(print_file(data_dir, vm, i))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| "the record of the image at commit is missing".to_string())
}

/// `tracking/<VMID>/disk<i>.failover-writes`: blocks the failover overlay held at commit.
fn writes_file(data_dir: &Path, vm: Uuid, disk: usize) -> PathBuf {
    tracking_dir(data_dir, vm).join(format!("disk{disk}.failover-writes"))
}

/// `tracking/<VMID>/disk<i>.failover-print.json`: the flattened image's fingerprint at commit.
fn print_file(data_dir: &Path, vm: Uuid, disk: usize) -> PathBuf {
    tracking_dir(data_dir, vm).join(format!("disk{disk}.failover-print.json"))
}

fn encode_runs(runs: &[(u64, u64)]) -> Vec<u8> {
    FailbackBase {
        disk: 0,
        candidates: Some(runs.to_vec()),
        map: Vec::new(),
    }
    .encode()
}

/// Block runs (of [`DEFAULT_BLOCK_SIZE`]) covering byte ranges `(offset, length)`.
pub(crate) fn block_runs(ranges: impl IntoIterator<Item = (u64, u64)>) -> Runs {
    let bs = u64::from(DEFAULT_BLOCK_SIZE);
    let blocks: Vec<(u64, u64)> = ranges
        .into_iter()
        .filter(|(_, len)| *len > 0)
        .map(|(off, len)| {
            let (first, end) = (off / bs, (off + len).div_ceil(bs));
            (first, end - first)
        })
        .collect();
    // One sort and merge, whatever the number of extents.
    journal::union(&blocks, &[])
}

/// Byte ranges of block runs, clipped to `size`.
pub(crate) fn byte_ranges(runs: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let bs = u64::from(DEFAULT_BLOCK_SIZE);
    runs.iter()
        .filter_map(|(f, c)| {
            let start = f.saturating_mul(bs);
            let end = (f.saturating_add(*c)).saturating_mul(bs).min(size);
            (start < end).then_some((start, end - start))
        })
        .collect()
}

/// At CommitFailover, before the overlay is flattened: the blocks it holds (everything the VM
/// wrote since the failover point), kept for a failback.
pub async fn record_overlay_writes(
    data_dir: &Path,
    vm: Uuid,
    overlays: &[PathBuf],
) -> Result<(), String> {
    std::fs::create_dir_all(tracking_dir(data_dir, vm)).map_err(|e| e.to_string())?;
    for (i, overlay) in overlays.iter().enumerate() {
        let out = tokio::process::Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "qcow2"])
            .arg(overlay)
            .output()
            .await
            .map_err(|e| format!("qemu-img map: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "qemu-img map {}: {}",
                overlay.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let entries: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).map_err(|e| format!("qemu-img map: {e}"))?;
        let top = entries
            .iter()
            .filter(|e| e["depth"].as_u64() == Some(0))
            .filter_map(|e| Some((e["start"].as_u64()?, e["length"].as_u64()?)));
        let runs = block_runs(top);
        std::fs::write(writes_file(data_dir, vm, i), encode_runs(&runs))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// At CommitFailover, once the images are flattened: a persistent dirty bitmap in each (QEMU and
/// its tools record every later write in it), and which file each is (its fingerprint).
pub async fn track_after_commit(
    data_dir: &Path,
    vm: Uuid,
    images: &[PathBuf],
) -> Result<(), String> {
    use super::offline::qemu_img_bitmap;
    for (i, image) in images.iter().enumerate() {
        let _ = std::fs::remove_file(print_file(data_dir, vm, i));
        let shown = image.display().to_string();
        // An earlier one (a cut commit run again, an earlier failover) goes first.
        for old in super::offline::bitmap_names(image).await {
            if old.starts_with(FAILBACK_BITMAP) {
                qemu_img_bitmap(&shown, "--remove", &old).await;
            }
        }
        let bitmap = super::offline::stamped(FAILBACK_BITMAP);
        if !qemu_img_bitmap(&shown, "--add", &bitmap).await {
            return Err(format!("qemu-img bitmap --add {bitmap} failed on {shown}"));
        }
        // Which file this is: its times, taken right after that write, could not say "unchanged"
        // (a write later in the same clock tick may not move them), so `own_writes` always reads
        // the bitmap, and this only tells it whether the file was replaced.
        let print = disk::fingerprint::Fingerprint::of(image).map_err(|e| e.to_string())?;
        let record = CommitRecord { print, bitmap };
        std::fs::write(
            print_file(data_dir, vm, i),
            serde_json::to_vec(&record).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The blocks B wrote since the failover point on disk `i` (image `image`, VM off), or why that
/// is not known.
async fn own_writes(
    data_dir: &Path,
    vm: Uuid,
    i: usize,
    image: &str,
    size: u64,
) -> Result<Runs, String> {
    let at_commit = failover_writes(data_dir, vm, i)?;
    let record = commit_record(data_dir, vm, i)?;
    let now = disk::fingerprint::Fingerprint::of(Path::new(image))
        .map_err(|e| format!("{image} cannot be read: {e}"))?;
    if (now.inode, now.device) != (record.print.inode, record.print.device) {
        return Err(format!(
            "{image}: the image file was replaced since the commit"
        ));
    }
    // Written since the commit: its bitmap says where, if QEMU closed it cleanly.
    let since = read_bitmap(data_dir, vm, i, image, size, &record.bitmap).await?;
    Ok(journal::union(&at_commit, &since))
}

/// For a failback to the committed failover's point `p`: the VM (off) wrote nothing since, on
/// any disk, as far as the records tell.
async fn unchanged_since_commit(data_dir: &Path, vm: &VmRow, p: u64) -> Result<(), JobFailure> {
    let later = "Leave RecoveryPointIdentifier empty to fail back to the VM's current disks here.";
    if crate::power::enabled_state(&vm.power) == crate::power::ENABLED {
        return Err(fail(
            format!(
                "'{}' is running here; a failback to recovery point {p} needs it off",
                vm.name
            ),
            "Turn the VM off, or leave RecoveryPointIdentifier empty.",
        ));
    }
    for (i, (_, size)) in disk_table(vm)?.iter().enumerate() {
        match own_writes(data_dir, vm.id, i, &vm.disks[i], *size).await {
            Ok(r) if r.is_empty() => {}
            Ok(r) => {
                return Err(fail(
                    format!(
                        "disk {i} here holds {} blocks of 64 KiB written after recovery point {p}",
                        journal::blocks(&r)
                    ),
                    later,
                ))
            }
            Err(why) => {
                return Err(fail(
                    format!("whether disk {i} here was written after recovery point {p} is not known: {why}"),
                    later,
                ))
            }
        }
    }
    Ok(())
}

/// The blocks the failover overlay held when CommitFailover flattened it.
fn failover_writes(data_dir: &Path, vm: Uuid, i: usize) -> Result<Runs, String> {
    let recorded = std::fs::read(writes_file(data_dir, vm, i))
        .map_err(|_| "the failover's writes were not recorded when it was committed".to_string())?;
    FailbackBase::parse(&recorded)
        .ok()
        .and_then(|b| b.candidates)
        .ok_or_else(|| "the record of the failover's writes is unreadable".to_string())
}

/// The blocks persistent dirty bitmap `name` of qcow2 `image` (not open elsewhere) marks, or why
/// it cannot be trusted.
pub async fn read_bitmap(
    data_dir: &Path,
    vm: Uuid,
    i: usize,
    image: &str,
    size: u64,
    name: &str,
) -> Result<Runs, String> {
    let info = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U", "-f", "qcow2", image])
        .output()
        .await
        .map_err(|e| format!("qemu-img info: {e}"))?;
    let info: serde_json::Value =
        serde_json::from_slice(&info.stdout).map_err(|e| format!("qemu-img info: {e}"))?;
    let bitmap = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .and_then(|l| l.iter().find(|b| b["name"] == name))
        .ok_or_else(|| format!("{image} changed and has no {name} bitmap"))?;
    let flags: Vec<&str> = bitmap["flags"]
        .as_array()
        .map(|f| f.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if flags.contains(&"in-use") || !flags.contains(&"auto") {
        return Err(format!(
            "the {name} bitmap of {image} cannot be trusted (flags {flags:?}: QEMU did not close it cleanly)"
        ));
    }
    // Without the image's locks: a tool writing the file meanwhile is not refused. A bitmap it
    // holds open is flagged in use, and qemu-nbd then refuses to load it.
    let spec = disk::export::ExportSpec {
        bitmap: Some(name.to_string()),
        force_share: true,
        ..disk::export::ExportSpec::new(image, "qcow2")
    };
    let run = data_dir.join("run");
    let export =
        disk::export::NbdExport::start(&spec, &run, &format!("bitmap-{}-{i}", vm.simple()))
            .await
            .map_err(|e| crate::error_chain(&e))?;
    let context = format!("qemu:dirty-bitmap:{name}");
    let dirty = async {
        let mut nbd = export.connect(&[context.as_str()]).await?;
        let map = nbd.map(&context, 0, size).await?;
        nbd.disconnect().await?;
        Ok::<_, disk::export::ExportError>(map)
    }
    .await;
    export.stop().await;
    let dirty = dirty.map_err(|e| crate::error_chain(&e))?;
    Ok(block_runs(
        dirty
            .iter()
            .filter(|e| e.is_dirty())
            .map(|e| (e.offset, e.length)),
    ))
}

/// Asks the kernel to read the candidate blocks of `image` into the page cache now, all at once
/// (`posix_fadvise` WILLNEED on their places in the file, from `qemu-img map`), so the scan that
/// reads them one after the other finds them there instead of waiting for each random read.
/// Best effort: nothing fails if it cannot.
pub(crate) async fn prefetch(image: &str, format: &str, ranges: &[(u64, u64)]) {
    let places: Vec<(u64, u64)> = if format == "raw" {
        ranges.to_vec()
    } else {
        let Ok(out) = tokio::process::Command::new("qemu-img")
            .args(["map", "--output=json", "-U", "-f", format, image])
            .output()
            .await
        else {
            return;
        };
        let Ok(entries) = serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout) else {
            return;
        };
        let mapped: Vec<(u64, u64, u64)> = entries
            .iter()
            .filter(|e| e["depth"].as_u64() == Some(0) && e["data"].as_bool() == Some(true))
            .filter_map(|e| {
                Some((
                    e["start"].as_u64()?,
                    e["length"].as_u64()?,
                    e["offset"].as_u64()?,
                ))
            })
            .collect();
        let mut places = Vec::new();
        let mut k = 0;
        for (off, len) in ranges {
            while mapped.get(k).is_some_and(|(s, l, _)| s + l <= *off) {
                k += 1;
            }
            let mut j = k;
            while let Some((s, l, host)) = mapped.get(j).filter(|(s, _, _)| *s < off + len) {
                let (a, b) = ((*off).max(*s), (off + len).min(s + l));
                if a < b {
                    places.push((host + (a - s), b - a));
                }
                j += 1;
            }
        }
        places
    };
    let path = image.to_string();
    let _ = tokio::task::spawn_blocking(move || {
        use std::os::fd::AsRawFd;
        let Ok(file) = std::fs::File::open(&path) else {
            return;
        };
        for (off, len) in places {
            let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
                continue;
            };
            // SAFETY: a valid open descriptor and plain integers; the call only gives advice.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), o, l, libc::POSIX_FADV_WILLNEED) };
        }
    })
    .await;
}

/// Drops the failback records of `vm` (its bitmaps stay in the images, harmless).
pub(crate) fn forget_records(data_dir: &Path, vm: Uuid, disks: usize) {
    for i in 0..disks {
        let _ = std::fs::remove_file(writes_file(data_dir, vm, i));
        let _ = std::fs::remove_file(print_file(data_dir, vm, i));
    }
}

/// What B's failback job did, for A's `GET`.
#[derive(Clone)]
struct Run {
    peer: String,
    job: String,
    sequence: u64,
    bytes: u64,
}

/// The failbacks this host runs as a new primary, started by old primaries.
pub struct NewPrimary {
    pub store: Arc<Store>,
    pub jobs: Arc<JobEngine>,
    pub peers: Arc<crate::replication::client::Peers>,
    pub data_dir: PathBuf,
    pub claims: crate::claims::VmClaims,
    runs: Mutex<HashMap<Uuid, Run>>,
}

fn api(code: ErrorCode, why: impl Into<String>) -> ApiError {
    ApiError::new(code, why)
}

impl NewPrimary {
    pub fn new(
        store: Arc<Store>,
        jobs: Arc<JobEngine>,
        peers: Arc<crate::replication::client::Peers>,
        data_dir: PathBuf,
        claims: crate::claims::VmClaims,
    ) -> NewPrimary {
        NewPrimary {
            store,
            jobs,
            peers,
            data_dir,
            claims,
            runs: Mutex::new(HashMap::new()),
        }
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Run>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The status of `vm`'s failback as `peer` may see it; `cancel` also cancels a running one.
    pub fn status(&self, peer: &str, vm: Uuid, cancel: bool) -> Result<FailbackStatus, ApiError> {
        let run = self
            .runs()
            .get(&vm)
            .filter(|r| r.peer.eq_ignore_ascii_case(peer))
            .cloned()
            .ok_or_else(|| {
                api(
                    ErrorCode::UnknownResource,
                    format!("no failback of {vm} for {peer} here"),
                )
            })?;
        if cancel {
            let _ = self.jobs.cancel(&run.job);
        }
        let job = self
            .store
            .get_job(&run.job)?
            .ok_or_else(|| api(ErrorCode::UnknownResource, "the failback's job is gone"))?;
        let state = match JobState::from_u16(job.state) {
            Some(JobState::Completed) => 2,
            Some(s) if s.is_terminal() => 3,
            _ => 1,
        };
        let message: String = match state {
            3 => job
                .error_description
                .clone()
                .unwrap_or_else(|| "failed".into()),
            _ => job.description.clone(),
        }
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
        Ok(FailbackStatus {
            state,
            percent: job.percent,
            job: job.id,
            message: message.chars().take(4000).collect(),
            sequence: run.sequence,
            bytes: run.bytes,
        })
    }

    /// `POST vms/{vm}/failback` from old primary `peer` (authorized by `entry`).
    pub async fn start(
        self: &Arc<Self>,
        _entry: &AuthorizationEntry,
        peer: &str,
        vm: Uuid,
        req: StartFailback,
    ) -> Result<(FailbackStatus, u16), ApiError> {
        if !peer.eq_ignore_ascii_case(&req.host) {
            return Err(api(
                ErrorCode::AccessDenied,
                format!("the certificate names {peer}, not {}", req.host),
            ));
        }
        // One at a time: asked again while it runs, the answer is its status.
        if self.runs().contains_key(&vm) {
            if let Ok(st) = self.status(peer, vm, false) {
                if st.state == 1 {
                    return Ok((st, 200));
                }
            }
        }
        let unknown = || api(ErrorCode::UnknownVm, format!("no VM {vm} here"));
        let vm_row = self.store.get_vm(vm)?.ok_or_else(unknown)?;
        let rel = self.store.get_relationship(vm)?.ok_or_else(unknown)?;
        let failover = self.store.failover(vm)?;
        let replica = vm_row.mode == ReplicationMode::Replica.as_u16();
        let primary = vm_row.mode == ReplicationMode::Primary.as_u16();
        // The VM must have failed over from `peer`, been committed, and not be replicating yet.
        let from_peer = if replica {
            rel.primary_connection_point
                .as_deref()
                .is_some_and(|p| p.eq_ignore_ascii_case(peer))
        } else {
            rel.settings
                .recovery_connection_point
                .eq_ignore_ascii_case(peer)
        };
        if !from_peer {
            return Err(api(
                ErrorCode::AccessDenied,
                format!("'{}' does not replicate with {peer}", vm_row.name),
            ));
        }
        if primary && rel.state == ReplicationState::Replicating.as_u16() && failover.is_none() {
            // Done already (A asks again after a restart): report the last run if known.
            if let Ok(st) = self.status(peer, vm, false) {
                return Ok((st, 200));
            }
        }
        let committed = replica && rel.state == ReplicationState::Committed.as_u16();
        let waiting = primary
            && failover.is_some()
            && [
                ReplicationState::WaitingToStartResynchronization.as_u16(),
                ReplicationState::ResynchronizationSuspended.as_u16(),
            ]
            .contains(&rel.state);
        // Failed over, not committed: a failback to a named recovery point moves the failover
        // there and commits it first.
        let recovered = replica
            && failover.is_some()
            && rel.state == ReplicationState::Recovered.as_u16()
            && !req.point.is_empty();
        if !committed && !waiting && !recovered {
            let why = if replica && rel.state == ReplicationState::Recovered.as_u16() {
                format!(
                    "'{}' is failed over but not committed here; run CommitFailover first, or name one of its recovery points (RecoveryPointIdentifier)",
                    vm_row.name
                )
            } else {
                format!(
                    "'{}' is in state {} (mode {}) here; a failback needs an unplanned failover",
                    vm_row.name, rel.state, vm_row.mode
                )
            };
            let mut d = wire::protocol::ErrorDetail::new(ErrorCode::InvalidState, why);
            d.replica_state = Some(rel.state);
            return Err(ApiError(Box::new(d)));
        }
        // A named point: its sequence, and this host's VM must stay off while its disks are
        // brought to exactly that point.
        let exact = if req.point.is_empty() {
            None
        } else {
            let f = failover.as_ref().map_or(0, |f| f.point);
            let known: Vec<u64> = if recovered {
                self.store
                    .recovery_points(vm)?
                    .iter()
                    .map(|p| p.sequence)
                    .collect()
            } else {
                vec![f]
            };
            let point = super::test_failover::point_of(vm, &req.point, &known).map_err(|_| {
                api(
                    ErrorCode::BadRequest,
                    if recovered {
                        format!("'{}' is not a recovery point of '{}' here", req.point, vm_row.name)
                    } else {
                        format!(
                            "'{}' is not a recovery point of '{}' here: a committed failover keeps only the point it was committed to ({f}); leave RecoveryPointIdentifier empty to fail back to the VM's current disks",
                            req.point, vm_row.name
                        )
                    },
                )
            })?;
            if crate::power::enabled_state(&vm_row.power) == crate::power::ENABLED {
                return Err(api(
                    ErrorCode::InvalidState,
                    format!(
                        "'{}' is running here; turn it off to fail back to recovery point {point}",
                        vm_row.name
                    ),
                ));
            }
            if recovered && self.store.test_system_of(vm)?.is_some() {
                return Err(api(
                    ErrorCode::InvalidState,
                    format!(
                        "'{}' has a test VM here; remove it (DestroySystem) first",
                        vm_row.name
                    ),
                ));
            }
            Some(point)
        };
        let claim = self.claims.claim(vm).ok_or_else(|| {
            api(
                ErrorCode::Busy,
                format!(
                    "'{}' is busy with an operation here; ask again shortly",
                    vm_row.name
                ),
            )
        })?;
        let this = self.clone();
        let description = format!("Failback of '{}' to {}", vm_row.name, req.host);
        let job = self.jobs.spawn(
            JobType::InitiateFailback,
            Some(vm),
            description,
            true,
            move |ctx| async move {
                let _claim = claim;
                this.work(ctx, vm_row, rel, req, exact).await
            },
        )?;
        self.runs().insert(
            vm,
            Run {
                peer: peer.to_string(),
                job: job.id.clone(),
                sequence: 0,
                bytes: 0,
            },
        );
        tracing::info!(%vm, job = %job.id, %peer, "failback started for the old primary");
        Ok((self.status(peer, vm, false)?, 202))
    }

    /// Before B's job makes its replica VM the primary: in 5 with a named recovery point, the
    /// failover moves to that point (what was written on its disks is dropped, as RevertFailover
    /// would) and is committed as CommitFailover does, so the VM's disks are exactly the point and
    /// nothing was written since; in 6, points a commit cut off before dropping them are dropped.
    ///
    /// Nothing is dropped before the old primary (`towards`: the relationship reversed) answered
    /// as a peer that can fail back, and the VM is checked again under the job's claim.
    async fn commit_for_failback(
        &self,
        ctx: &JobContext,
        vm: &mut VmRow,
        rel: &mut RelationshipRow,
        exact: Option<u64>,
        towards: &RelationshipRow,
    ) -> Result<(), JobFailure> {
        let root = super::failover::store_root(&self.store, vm);
        if rel.state == ReplicationState::Committed.as_u16() {
            // A commit cut off before its points were dropped.
            if let Ok(root) = &root {
                let dir = root.join(vm.id.hyphenated().to_string());
                if dir.exists() || !self.store.recovery_points(vm.id)?.is_empty() {
                    super::failover::drop_points(&self.store, vm.id, &dir)?;
                }
            }
            return Ok(());
        }
        let root = root.map_err(|e| fail(e.message, "Check the replica's storage location."))?;
        let point = exact.ok_or_else(|| {
            fail(
                format!("'{}' is failed over but not committed here", vm.name),
                "Run CommitFailover first, or name one of its recovery points.",
            )
        })?;
        // Under the claim now: what start() saw may have changed before it was taken.
        let now = self.store.get_vm(vm.id)?;
        let now_rel = self.store.get_relationship(vm.id)?;
        let still = now.as_ref().is_some_and(|v| {
            v.mode == ReplicationMode::Replica.as_u16()
                && crate::power::enabled_state(&v.power) != crate::power::ENABLED
        }) && now_rel
            .as_ref()
            .is_some_and(|r| r.state == ReplicationState::Recovered.as_u16())
            && self.store.failover(vm.id)?.is_some()
            && self.store.test_system_of(vm.id)?.is_none();
        if !still {
            return Err(fail(
                format!(
                    "'{}' changed here meanwhile (started, a test VM, or no longer failed over)",
                    vm.name
                ),
                "Turn the VM off, remove its test VM, and run InitiateFailback again.",
            ));
        }
        if let (Some(v), Some(r)) = (now, now_rel) {
            *vm = v;
            *rel = r;
        }
        // The old primary must be able to take part before anything is dropped here.
        drop(old_primary(&self.peers, towards).await?);
        ctx.check_cancelled()?;
        let kind = super::failover::move_failover(&self.store, &root, vm, point).await?;
        let reload = |vm: &mut VmRow| -> Result<(), JobFailure> {
            if let Some(now) = self.store.get_vm(vm.id)? {
                vm.disks = now.disks;
            }
            Ok(())
        };
        reload(vm)?;
        ctx.note(&format!(
            "Failed over to recovery point {point} here (whatever was written on the failover's disks dropped) and committed"
        ))?;
        let points =
            super::failover::flatten(ctx, &self.store, &self.data_dir, &root, vm, false).await?;
        reload(vm)?;
        rel.state = ReplicationState::Committed.as_u16();
        // (A failover to a planned failover's point is still not a planned failover.)
        rel.failed_over_type = match kind {
            vmreplica_core::state::ReplicationType::Planned => {
                vmreplica_core::state::ReplicationType::Regular
            }
            k => k,
        }
        .as_u16();
        self.store.put_relationship(rel, vm.mode)?;
        super::failover::drop_points(&self.store, vm.id, points.dir())?;
        tracing::info!(vm = %vm.id, point, "failover moved to the failback's point and committed");
        Ok(())
    }

    /// B's failback job; `exact`: the recovery point named, which A's disks must equal.
    async fn work(
        self: Arc<Self>,
        ctx: JobContext,
        mut vm: VmRow,
        mut rel: RelationshipRow,
        req: StartFailback,
        exact: Option<u64>,
    ) -> Result<(), JobFailure> {
        let primary = ReplicationMode::Primary.as_u16();
        if vm.mode == ReplicationMode::Replica.as_u16() {
            // The reverse of the unplanned failover (what ReverseReplicationRelationship does):
            // this host is the primary of the old one from now on.
            let service = self.store.service_settings()?;
            let reverse = |rel: &mut RelationshipRow| {
                rel.settings.recovery_connection_point = req.host.clone();
                rel.settings.recovery_server_port_number = req.port;
                rel.settings.authentication_type = 2;
                rel.settings.certificate_thumbprint = service.certificate_thumbprint.clone();
                rel.primary_connection_point = Some(self.peers.host.clone());
                rel.authorization_entry = None;
            };
            let mut towards = rel.clone();
            reverse(&mut towards);
            self.commit_for_failback(&ctx, &mut vm, &mut rel, exact, &towards)
                .await?;
            reverse(&mut rel);
            rel.state = ReplicationState::WaitingToStartResynchronization.as_u16();
        }
        rel.settings.replication_interval = req.settings.replication_interval;
        rel.settings.recovery_history = u16::from(req.settings.recovery_history);
        rel.settings.application_consistent_snapshot_interval =
            u16::from(req.settings.application_consistent_snapshot_interval);
        rel.settings.compression_enabled = req.settings.compression_enabled;
        let mut during = rel.clone();
        during.state = ReplicationState::Resynchronizing.as_u16();
        self.store.put_relationship(&during, primary)?;
        self.store.put_job_restore(
            ctx.id(),
            vm.id,
            ReplicationState::WaitingToStartResynchronization.as_u16(),
        )?;
        let vm = VmRow {
            mode: primary,
            ..vm
        };
        let job = NetworkIr {
            store: self.store.clone(),
            peers: self.peers.clone(),
            data_dir: self.data_dir.clone(),
        };
        let result = send(&ctx, &job, &vm, &mut rel, exact).await;
        let _ = self.store.forget_job_restore(ctx.id());
        match result {
            Ok((sequence, bytes)) => {
                rel.state = ReplicationState::Replicating.as_u16();
                self.store.put_relationship(&rel, primary)?;
                self.store.remove_failover(vm.id)?;
                // Its failback bitmap is not needed any more (a running VM's QEMU keeps it,
                // harmless: the next commit removes it).
                if crate::power::enabled_state(&vm.power) != crate::power::ENABLED {
                    for (i, image) in vm.disks.iter().enumerate() {
                        if let Ok(r) = commit_record(&self.data_dir, vm.id, i) {
                            super::offline::qemu_img_bitmap(image, "--remove", &r.bitmap).await;
                        }
                    }
                }
                forget_records(&self.data_dir, vm.id, vm.disks.len());
                if let Some(r) = self.runs().get_mut(&vm.id) {
                    r.sequence = sequence;
                    r.bytes = bytes;
                }
                Ok(())
            }
            Err(f) => {
                rel.state = ReplicationState::WaitingToStartResynchronization.as_u16();
                self.store.put_relationship(&rel, primary)?;
                Err(f)
            }
        }
    }
}

/// A session with the old primary `rel` (reversed) names, which must offer `failback`.
async fn old_primary(
    peers: &crate::replication::client::Peers,
    rel: &RelationshipRow,
) -> Result<crate::replication::client::Session, JobFailure> {
    let session = peers
        .connect(&target(rel))
        .await
        .map_err(|e| e.into_failure("connecting to the old primary"))?;
    session
        .require("failback")
        .map_err(|e| e.into_failure("failing back to the old primary"))?;
    Ok(session)
}

/// Waits (s) before each new connection to the old primary after a broken one, within one step
/// of B's failback (the begin, each disk's base); the log's upload has its own retries.
const RECONNECTS: [u64; 4] = [1, 2, 4, 8];

/// After `err` from the old primary: a new connection, once this step's next wait passed (a
/// cancel ends it), when the connection broke and the step has waits left; else `err` as the
/// job's failure (`what` was being done).
async fn connect_again(
    ctx: &JobContext,
    peers: &crate::replication::client::Peers,
    rel: &RelationshipRow,
    breaks: &mut usize,
    mut err: PeerError,
    what: &str,
) -> Result<crate::replication::client::Session, JobFailure> {
    loop {
        let secs = match RECONNECTS.get(*breaks) {
            Some(&secs) if err.is_network() => secs,
            _ => return Err(err.into_failure(what)),
        };
        *breaks += 1;
        tracing::warn!(vm = %rel.vm, "{what}: {err}; connecting again in {secs} s");
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        while tokio::time::Instant::now() < until {
            ctx.check_cancelled()?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ctx.check_cancelled()?;
        match peers.connect(&target(rel)).await {
            Ok(session) => {
                session
                    .require("failback")
                    .map_err(|e| e.into_failure("failing back to the old primary"))?;
                tracing::info!(vm = %rel.vm, "{what}: goes on over a new connection");
                return Ok(session);
            }
            Err(e) => err = e,
        }
    }
}

/// Fetches the old primary's base of disk `i` (`blocks` blocks) into `file`, from its start:
/// its head (the candidates) is returned, its map written to `file` as it arrives.
async fn fetch_base(
    session: &mut crate::replication::client::Session,
    vm: Uuid,
    compare: Uuid,
    i: usize,
    blocks: u64,
    file: &Path,
) -> Result<Option<FailbackBase>, PeerError> {
    use std::io::Write;
    let local = |e: std::io::Error| PeerError::Local(format!("writing {}: {e}", file.display()));
    let mut out =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(file).map_err(local)?);
    let mut head: Option<FailbackBase> = None;
    let mut pending = Vec::new();
    session
        .fetch_into(
            Route::CompareBase(vm, compare, i as u32),
            64 + blocks.saturating_mul(48),
            |data| {
                if head.is_some() {
                    return out.write_all(data).map_err(local);
                }
                pending.extend_from_slice(data);
                match FailbackBase::parse_head(&pending) {
                    Ok(None) => Ok(()),
                    Ok(Some((h, _))) if h.disk != i as u32 => Err(PeerError::Protocol(format!(
                        "the base of disk {} for disk {i}",
                        h.disk
                    ))),
                    Ok(Some((h, len))) => {
                        head = Some(h);
                        out.write_all(&pending[len..]).map_err(local)?;
                        pending = Vec::new();
                        Ok(())
                    }
                    Err(e) => Err(PeerError::Protocol(format!("an unreadable base: {e}"))),
                }
            },
        )
        .await?;
    out.flush().map_err(local)?;
    Ok(head)
}

/// The data of B's failback: A takes its disks in, candidates, comparison, the log.
async fn send(
    ctx: &JobContext,
    job: &NetworkIr,
    vm: &VmRow,
    rel: &mut RelationshipRow,
    exact: Option<u64>,
) -> Result<(u64, u64), JobFailure> {
    let f = job.store.failover(vm.id)?.ok_or_else(|| {
        fail(
            format!("'{}' has no failover to fail back from", vm.name),
            "Fail over first.",
        )
    })?;
    let mut session = old_primary(&job.peers, rel).await?;
    if let Some(p) = exact {
        // A named point: the disks here must still be exactly that point (checked before the
        // old primary changes anything).
        unchanged_since_commit(&job.data_dir, vm, p).await?;
    }
    ctx.check_cancelled()?;
    // 1. The old primary takes its disks in as they are and prepares its base.
    let mut put = put_vm(vm, rel, &job.peers.host, 1)?;
    put.reverse = Some(f.resync_reverse(true));
    session
        .json_within::<_, wire::protocol::ReplicaVm>(Route::PutVm(vm.id), Some(&put), REVERSE_LIMIT)
        .await
        .map_err(|e| e.into_failure("making the old primary the replica"))?;
    put.reverse = None;
    ctx.progress(20)?;
    ctx.check_cancelled()?;

    // 2. Its base: candidates and the exact map of its disks, disk by disk.
    let begin = BeginCompare {
        kind: 3,
        block_size: DEFAULT_BLOCK_SIZE,
        disks: put.disks.clone(),
    };
    // A begin whose answer a broken connection lost is sent again: the old primary's new session
    // replaces the old one, on the same base.
    let mut breaks = 0;
    let cs = loop {
        match session
            .json::<_, CompareSession>(Route::BeginCompare(vm.id), Some(&begin))
            .await
        {
            Ok((_, cs)) => break cs,
            Err(e) => {
                let what = "beginning the failback comparison";
                session = connect_again(ctx, &job.peers, rel, &mut breaks, e, what).await?;
            }
        }
    };
    let disks = disk_table(vm)?;
    let tracking = tracking_dir(&job.data_dir, vm.id);
    std::fs::create_dir_all(&tracking).map_err(local)?;
    let running = freeze_if_running(vm, &job.data_dir).await?;
    let result = async {
        let mut notes = Vec::new();
        let mut bases = Vec::new();
        let mut candidates: Vec<Option<Runs>> = Vec::new();
        for (i, (_, size)) in disks.iter().enumerate() {
            ctx.check_cancelled()?;
            let blocks = disk::scan::hashmap::block_count(*size, DEFAULT_BLOCK_SIZE);
            // The base arrives as a stream: its head (the old primary's candidates), then its map,
            // written to a file as it comes (never held: 256 MiB for a 1 TiB disk). A fetch cut
            // off by a broken connection starts again over a new one.
            let file = tracking.join(format!("disk{i}.failback-base"));
            let mut breaks = 0;
            let head = loop {
                match fetch_base(&mut session, vm.id, cs.id, i, blocks, &file).await {
                    Ok(head) => break head,
                    Err(e) => {
                        let what = "reading the old primary's base";
                        session = connect_again(ctx, &job.peers, rel, &mut breaks, e, what).await?;
                    }
                }
            };
            let Some(base) = head else {
                return Err(fail(
                    "the old primary sent an empty base",
                    "Check the old primary.",
                ));
            };
            let reader = MapReader::open(&file).map_err(|e| {
                fail(
                    format!("the old primary's map of disk {i}: {e}"),
                    "Check the old primary.",
                )
            })?;
            if reader.block_size != DEFAULT_BLOCK_SIZE || reader.disk_size != *size {
                return Err(fail(
                    format!("the old primary's map of disk {i} describes another disk"),
                    "Check the old primary.",
                ));
            }
            let theirs = match base.candidates {
                Some(c) => Some(c),
                None => {
                    notes.push(format!(
                        "disk {i}: the old primary cannot tell which blocks it changed"
                    ));
                    None
                }
            };
            let ours = if let Some(r) = running.as_ref() {
                // The VM runs: its QEMU process holds the bitmap of what it wrote since the commit.
                let record = commit_record(&job.data_dir, vm.id, i);
                let live = match &record {
                    Ok(c) => r
                        .other_bitmap(i, &c.bitmap)
                        .await
                        .map_err(|e| running_failed(vm, &e))?,
                    Err(_) => None,
                };
                match (
                    failover_writes(&job.data_dir, vm.id, i).and_then(|w| record.map(|_| w)),
                    live,
                ) {
                    (Ok(at_commit), Some(ranges)) => {
                        Some(journal::union(&at_commit, &block_runs(ranges)))
                    }
                    (Err(why), _) => {
                        notes.push(format!("disk {i}: {why}"));
                        None
                    }
                    (Ok(_), None) => {
                        notes.push(format!(
                            "disk {i}: the running VM's QEMU process holds no consistent {FAILBACK_BITMAP} bitmap"
                        ));
                        None
                    }
                }
            } else {
                match own_writes(&job.data_dir, vm.id, i, &vm.disks[i], *size).await {
                    Ok(r) => Some(r),
                    Err(why) => {
                        notes.push(format!("disk {i}: {why}"));
                        None
                    }
                }
            };
            candidates.push(match (theirs, ours) {
                (Some(a), Some(b)) => Some(journal::union(&a, &b)),
                _ => None,
            });
            bases.push(file);
        }
        let total: u64 = disks
            .iter()
            .map(|(_, s)| disk::scan::hashmap::block_count(*s, DEFAULT_BLOCK_SIZE))
            .sum();
        let asked: u64 = candidates
            .iter()
            .zip(&disks)
            .map(|(c, (_, s))| {
                c.as_deref().map_or(
                    disk::scan::hashmap::block_count(*s, DEFAULT_BLOCK_SIZE),
                    journal::blocks,
                )
            })
            .sum();
        if candidates.iter().all(Option::is_some) {
            ctx.note(&format!(
                "Only the blocks either side wrote since the failover point {} are read and compared: {asked} of {total} blocks of 64 KiB",
                f.point
            ))?;
        } else {
            ctx.note(&format!(
                "Full hash compare of {asked} of {total} blocks against the old primary's map: {}",
                notes.join("; ")
            ))?;
        }
        for n in notes
            .iter()
            .filter(|n| n.contains("hash-scanned") || n.contains("copied"))
        {
            ctx.note(n)?;
        }
        ctx.progress(40)?;

        // 3. The blocks that differ, as the next log.
        let outgoing = job
            .data_dir
            .join("outgoing")
            .join(vm.id.to_string().to_uppercase());
        std::fs::create_dir_all(&outgoing).map_err(local)?;
        let spool = outgoing.join(format!("{:020}.vrlog", cs.next_sequence));
        let file = std::fs::File::create(&spool).map_err(local)?;
        let header = LogHeader {
            vm: vm.id,
            relationship: 0,
            sequence: cs.next_sequence,
            parent: cs.baseline_sequence,
            // A running VM's point is its frozen view (see engine::seeded).
            point_time_micros: running.as_ref().map_or(
                now() * 1_000_000,
                super::running::RunningPoint::frozen_at_micros,
            ),
            point_type: PointType::Standard,
            full_image: false,
            disks: log_disks(&disks),
        };
        // The log is sent while it is written, as a cycle's is.
        let growing = Arc::new(GrowingLog::default());
        let mut log = session
            .log_mode(rel.settings.compression_enabled)
            .writer(
                std::io::BufWriter::with_capacity(
                    1 << 20,
                    LogOut::Growing(crate::replication::client::GrowingFile {
                        file,
                        log: growing.clone(),
                    }),
                ),
                header,
            )
            .map_err(|e| fail(e.to_string(), "Report this as a bug."))?;
        if running.is_none() {
            for (i, (format, size)) in disks.iter().enumerate() {
                if let Some(c) = candidates[i].as_deref() {
                    prefetch(&vm.disks[i], format, &byte_ranges(c, *size)).await;
                }
            }
        }
        let build = async {
            let mut maps = Vec::new();
            let mut changed = Vec::new();
            let mut read = 0u64;
            for (i, (format, size)) in disks.iter().enumerate() {
                ctx.check_cancelled()?;
                let map = tracking.join(format!("disk{i}.hashes"));
                let ranges = candidates[i].as_deref().map(|c| byte_ranges(c, *size));
                let tmp = match running.as_ref() {
                    Some(r) => {
                        // Through its frozen point: exactly the ranges, or the whole disk.
                        read += ranges
                            .as_deref()
                            .map_or(*size, |r| r.iter().map(|(_, l)| l).sum());
                        r.read_disk_ranges(i, Some(&bases[i]), &map, &mut log, ranges.as_deref())
                            .await
                            .map_err(|e| running_failed(vm, &e))?
                    }
                    None => {
                        let (tmp, n) = scan_image_ranges(
                            &vm.disks[i],
                            format,
                            i,
                            Some(&bases[i]),
                            &map,
                            &job.data_dir,
                            &mut log,
                            ranges.as_deref(),
                        )
                        .await
                        .map_err(|f| f.failure)?;
                        read += n;
                        tmp
                    }
                };
                changed.push(
                    journal::map_diff(&bases[i], &tmp)
                        .map_err(|e| fail(e, "Check the data directory."))?,
                );
                maps.push((tmp, map));
                ctx.progress(40 + u16::try_from(50 * (i + 1) / disks.len()).unwrap_or(50))?;
            }
            let (w, summary) = log
                .finish()
                .map_err(|e| fail(e.to_string(), "Check free space."))?;
            w.into_inner()
                .map_err(|e| fail(e.to_string(), "Check free space."))?;
            Ok::<_, JobFailure>((summary, maps, changed, read))
        };
        let build = async {
            let built = build.await;
            match &built {
                Ok((summary, _, _, _)) => growing.finish(hex::encode(summary.hash), summary.bytes),
                Err(f) => growing.fail(f.message.clone()),
            }
            built
        };
        let to = target(rel);
        let send = job.peers.deliver(
            &to,
            &mut session,
            vm.id,
            cs.next_sequence,
            &spool,
            growing.clone(),
            Arc::new(|_, _| {}),
            crate::replication::client::CommitAs::default(),
            // A lost commit answer is asked about for minutes: given up, the old primary could be
            // complete with this host waiting to resynchronize, and neither could go on.
            crate::replication::client::Patience::quick_asking_after_commit({
                let ctx = ctx.clone();
                Arc::new(move || ctx.is_cancelled())
            }),
            (None, false),
        );
        let (built, delivered) = tokio::join!(build, send);
        let _ = std::fs::remove_file(&spool);
        for base in &bases {
            let _ = std::fs::remove_file(base);
        }
        let (summary, maps, changed, read) = built?;
        let done = match delivered {
            Ok(d) => d,
            Err(e) => {
                for (tmp, _) in &maps {
                    let _ = std::fs::remove_file(tmp);
                }
                return Err(e.into_failure("sending the differing blocks"));
            }
        };
        super::seeded::commit_sent(job, vm, rel, &summary, &done, &maps, &changed, true)?;
        let differing: u64 = changed.iter().map(|c| journal::blocks(c)).sum();
        ctx.note(&format!(
            "{differing} blocks differed; {:.1} MiB of the disks read here; log {} of {} bytes sent",
            read as f64 / f64::from(1u32 << 20),
            cs.next_sequence,
            summary.bytes
        ))?;
        Ok((cs.next_sequence, summary.bytes))
    };
    // A cancel stops the transfer at once (the old primary keeps its base; a partial upload is
    // dropped there), and a frozen point of a running VM is still released below.
    let result = tokio::select! {
        r = result => r,
        () = async {
            while ctx.check_cancelled().is_ok() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        } => ctx.check_cancelled().map(|()| (0, 0)),
    };
    // The old primary's maps fetched (16 bytes per block), whatever the outcome.
    for i in 0..disks.len() {
        let _ = std::fs::remove_file(tracking.join(format!("disk{i}.failback-base")));
    }
    if let Some(r) = running {
        if let Err(e) = r.finish(result.is_ok()).await {
            tracing::warn!(vm = %vm.id, "ending the frozen point: {}", e.message());
        }
    }
    result
}

/// How long the old primary waits for its own apply of the failback's log.
const APPLY_LIMIT: Duration = Duration::from_secs(3600);

impl LocalEngine {
    /// InitiateFailback on the old primary.
    pub(super) fn failback(&self, req: EngineRequest) -> Result<JobRow, CommandError> {
        let settings = req.args.settings.clone().ok_or_else(|| {
            CommandError::new(
                ReturnCode::InvalidParameter,
                "ReplicationSettingData is required",
            )
        })?;
        let rel = req.relationship.clone().ok_or_else(|| {
            refused(
                ReturnCode::InvalidState,
                "the VM has no replication relationship",
            )
        })?;
        // A first run cut off after this host became the replica runs again from 9: the new
        // primary is then its primary, reached on the port and with the certificate it had.
        let again = req.vm.mode == ReplicationMode::Replica.as_u16();
        let new_primary = if again {
            rel.primary_connection_point.clone().unwrap_or_default()
        } else {
            rel.settings.recovery_connection_point.clone()
        };
        let mut to = target(&rel);
        to.host = new_primary.clone();
        // (A replica's own settings name this host: accepted for a run again.)
        let named = &settings.recovery_connection_point;
        let accepted = named.is_empty()
            || named.eq_ignore_ascii_case(&new_primary)
            || (again && named.eq_ignore_ascii_case(&self.peers.host));
        if !accepted {
            return Err(CommandError::new(
                ReturnCode::InvalidParameter,
                format!(
                    "RecoveryConnectionPoint must name the host '{}' failed over to ({new_primary}), not {}",
                    req.vm.name, settings.recovery_connection_point
                ),
            ));
        }
        let service = self.store.service_settings()?;
        if !service.recovery_server_enabled || service.certificate_thumbprint.is_none() {
            return Err(refused(
                ReturnCode::InvalidState,
                format!(
                    "this host must be a recovery server (certificate authentication, with an authorization entry for {new_primary}) so that '{}' can replicate back to it",
                    req.vm.name
                ),
            ));
        }
        let start = StartFailback {
            host: self.peers.host.clone(),
            port: service.https_port,
            settings: wire::protocol::VmSettings {
                replication_interval: settings.replication_interval,
                recovery_history: u8::try_from(settings.recovery_history).unwrap_or(24),
                application_consistent_snapshot_interval: u8::try_from(
                    settings.application_consistent_snapshot_interval,
                )
                .unwrap_or(12),
                compression_enabled: settings.compression_enabled,
            },
            point: req.args.recovery_point.clone().unwrap_or_default(),
        };
        let (store, peers, data_dir) = (
            self.store.clone(),
            self.peers.clone(),
            self.data_dir.clone(),
        );
        let EngineRequest {
            vm,
            relationship,
            transition,
            claim,
            ..
        } = req;
        let mut rel = relationship.unwrap_or(rel);
        let before = rel.state;
        if let Some(during) = transition.during {
            // Only the state: on a replica run again from 3, an apply may write its row meanwhile.
            rel.state = during.as_u16();
            self.store
                .update_relationship(vm.id, Some(vm.mode), |cur| cur.state = rel.state)?;
        }
        let description = format!("Failback of '{}' from {new_primary}", vm.name);
        let (vm_id, mode) = (vm.id, vm.mode);
        let in_flight = self.primary.in_flight.clone();
        let job = self.jobs.spawn(
            transition.job_type,
            Some(vm_id),
            description,
            true,
            move |ctx| async move {
                let _claim = claim;
                // A cycle of this host still running (it started before the failover) ends first:
                // its files and bitmaps are this job's from now on.
                let outcome = match idle(&ctx, &in_flight, vm.id).await {
                    Ok(()) => follow(&ctx, &store, &peers, &vm, &to, &start, &data_dir).await,
                    Err(f) => Err(f),
                };
                let _ = store.forget_job_restore(ctx.id());
                let now_mode = store.get_vm(vm.id)?.map_or(mode, |v| v.mode);
                match outcome {
                    // The failback's log is applied here. Its apply moved 13 to 14 (and a delta
                    // perhaps on to 3) before counting it applied, unless an earlier run's log it
                    // was (the new primary answered "done already" to a run again): then nothing
                    // moves the 13 this run showed.
                    // (One statement: a delta's apply writing its row meanwhile keeps its own.)
                    Ok(()) => {
                        if now_mode == ReplicationMode::Replica.as_u16() {
                            store.move_state(
                                vm.id,
                                ReplicationState::FailbackInProgress.as_u16(),
                                ReplicationState::FailbackComplete.as_u16(),
                            )?;
                        }
                        Ok(())
                    }
                    Err(failure) => {
                        // Made the new primary's replica by this run: it may run the failback
                        // again from 9; otherwise its state before.
                        let back = if now_mode == ReplicationMode::Replica.as_u16()
                            && mode == ReplicationMode::Primary.as_u16()
                        {
                            ReplicationState::WaitingToStartResynchronization.as_u16()
                        } else {
                            before
                        };
                        if now_mode == ReplicationMode::Replica.as_u16() {
                            // Only from the 13 this run showed: the failback's log may have
                            // arrived and been applied all the same (13 → 14, and a delta's
                            // apply on to 3), which a failure of the job here must not undo.
                            store.move_state(
                                vm.id,
                                ReplicationState::FailbackInProgress.as_u16(),
                                back,
                            )?;
                        } else {
                            store.update_relationship(vm.id, Some(now_mode), |cur| {
                                cur.state = back
                            })?;
                        }
                        Err(failure)
                    }
                }
            },
        )?;
        self.store.put_job_restore(&job.id, vm_id, before)?;
        Ok(job)
    }
}

/// Waits (at most 10 minutes, cancellable) until no replication cycle of `vm` runs here.
async fn idle(
    ctx: &JobContext,
    in_flight: &crate::replication::primary::InFlight,
    vm: Uuid,
) -> Result<(), JobFailure> {
    for _ in 0..600 {
        ctx.check_cancelled()?;
        if in_flight.wait_idle(vm, Duration::from_secs(1)).await {
            return Ok(());
        }
    }
    Err(fail(
        "a replication cycle of this VM is still running here",
        "Run InitiateFailback again once it ended.",
    ))
}

/// Waits before A connects to B again after the connection it followed B's job on broke: a short
/// outage is ridden out, while a B that stopped (its job is then gone) fails A's job soon.
const FOLLOW_RETRIES: [u64; 4] = [1, 2, 4, 8];

/// A new connection to B after `err` broke the one A followed B's job on (B's job goes on
/// meanwhile), tried again after [`FOLLOW_RETRIES`] (each attempt within the connection's own
/// timeouts); a cancel of A's job ends the wait, and is sent to B if B can be reached.
async fn reconnect(
    ctx: &JobContext,
    peers: &crate::replication::client::Peers,
    to: &crate::replication::client::Target,
    vm: &VmRow,
    err: PeerError,
) -> Result<crate::replication::client::Session, JobFailure> {
    let what = "following the new primary's failback job";
    let mut last = err;
    for secs in FOLLOW_RETRIES {
        tracing::warn!(vm = %vm.id, "{what}: {last}; connecting again in {secs} s");
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        while tokio::time::Instant::now() < until {
            if let Err(cancelled) = ctx.check_cancelled() {
                // B's job is cancelled too when B can be reached now (once, 15 s at most).
                let tell = async {
                    let mut s = peers.connect(to).await.ok()?;
                    s.json::<(), FailbackStatus>(Route::CancelFailback(vm.id), None)
                        .await
                        .ok()
                };
                let _ = tokio::time::timeout(Duration::from_secs(15), tell).await;
                return Err(cancelled);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        match peers.connect(to).await {
            Ok(session) => {
                tracing::info!(vm = %vm.id, "following the new primary's failback job over a new connection");
                return Ok(session);
            }
            Err(e) if e.is_network() => last = e,
            Err(e) => return Err(e.into_failure(what)),
        }
    }
    Err(last.into_failure(what))
}

/// A's job: asks B and follows its job, then waits for its own apply of the log.
async fn follow(
    ctx: &JobContext,
    store: &Store,
    peers: &crate::replication::client::Peers,
    vm: &VmRow,
    to: &crate::replication::client::Target,
    start: &StartFailback,
    data_dir: &Path,
) -> Result<(), JobFailure> {
    let t = std::time::Instant::now();
    let mut session = peers
        .connect(to)
        .await
        .map_err(|e| e.into_failure("connecting to the new primary"))?;
    session
        .require("failback")
        .map_err(|e| e.into_failure("asking the new primary to fail back"))?;
    let (_, mut status) = session
        .json::<_, FailbackStatus>(Route::StartFailback(vm.id), Some(start))
        .await
        .map_err(|e| e.into_failure("asking the new primary to fail back"))?;
    while status.state == 1 {
        if ctx.check_cancelled().is_err() {
            let _ = session
                .json::<(), FailbackStatus>(Route::CancelFailback(vm.id), None)
                .await;
            ctx.check_cancelled()?;
        }
        ctx.progress(status.percent.min(95))?;
        tokio::time::sleep(Duration::from_millis(150)).await;
        status = match session
            .json::<(), FailbackStatus>(Route::FailbackStatus(vm.id), None)
            .await
        {
            Ok((_, s)) => s,
            // B's job goes on without this connection: follow it on a new one.
            Err(e) if e.is_network() => {
                session = reconnect(ctx, peers, to, vm, e).await?;
                continue;
            }
            Err(e) => return Err(e.into_failure("following the new primary's failback job")),
        };
    }
    if status.state != 2 {
        return Err(fail(
            format!("the new primary's failback job failed: {}", status.message),
            "Fix the cause on the new primary and run InitiateFailback again; the VM's disks here are unchanged until it completes.",
        ));
    }
    // The log is committed here; the apply task makes it the disks (13 → 14).
    let deadline = std::time::Instant::now() + APPLY_LIMIT;
    loop {
        // Applied (a delta right after it may already have moved 14 on to 3).
        if store.last_applied(vm.id)? >= status.sequence {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(fail(
                "the failback's log was not applied here within an hour",
                "Check this host's replica storage and log.",
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What this host found about its own blocks (replication::failback).
    let base = crate::replication::failback::base_dir(data_dir, vm.id).join("base.json");
    let notes = std::fs::read(&base)
        .ok()
        .and_then(|b| serde_json::from_slice::<crate::replication::failback::BaseRecord>(&b).ok())
        .map(|r| r.notes)
        .unwrap_or_default();
    ctx.note(&format!(
        "Here: {}. The new primary's job: {}. Failback done in {:.1} s",
        notes.join("; "),
        status.message,
        t.elapsed().as_secs_f64()
    ))?;
    Ok(())
}
