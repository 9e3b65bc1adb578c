//! Failback as the recovery servers see it (docs/protocol.md §5.8).
//!
//! On the **old primary** A (which runs `InitiateFailback`): when the new primary B sends
//! `PUT vms/{vm}` with `reverse: {F, resync, failback}`, A works out, disk by disk, which blocks may
//! differ from the failover point F — the blocks of its logs F+1…L that B never applied
//! (`replication::journal`) and what it wrote since log L (nothing if the file is unchanged since
//! that point was read, else a local hash scan against L's map) — and keeps them with the
//! block-hash map of its disks as they are under `<data>/failback/<VMID>/`. Its disks then become
//! the base point (adopted without a copy when they are standalone qcow2 files on the store's file
//! system, else copied), and B's failback compare (kind 3) reads that base with
//! `GET …/compare/{id}/base/{disk}`.
//!
//! On the **new primary** B: `POST vms/{vm}/failback` from A starts B's failback job
//! (`engine::failback`), and `GET` reports it.

use std::path::{Path, PathBuf};

use disk::points::{AdoptError, PointDisk, PointInfo, PointKind, PointStore};
use hyper::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vmreplica_core::settings::AuthorizationEntry;
use wire::protocol::{DiskSpec, ErrorCode, FailbackBase, StartFailback};

use super::body::WireBody;
use super::journal::{self, Runs};
use super::records::ReceivedLog;
use super::replica::{json, ApiError, ApiResult, Compare, ReplicaSide};
use crate::clock::now;

/// `<data>/failback/<VMID>/`: what the old primary offers a failback compare.
pub fn base_dir(data_dir: &Path, vm: Uuid) -> PathBuf {
    data_dir
        .join("failback")
        .join(vm.to_string().to_uppercase())
}

/// `base.json` in [`base_dir`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BaseRecord {
    /// The point the disks were taken in as.
    pub sequence: u64,
    /// Per disk: the blocks that may differ from the failover point, or None when unknown.
    pub candidates: Vec<Option<Runs>>,
    /// What the job log should say about how they were found.
    pub notes: Vec<String>,
}

fn internal(why: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Internal, why)
}

impl ReplicaSide {
    /// The old primary's candidate blocks and maps for a failback from point `f`, its disks
    /// `images` (path, format, size) as they are, its last sent log `last`.
    pub(super) async fn failback_base(
        &self,
        vm: Uuid,
        images: &[(String, String, u64)],
        f: u64,
        last: Option<u64>,
    ) -> Result<BaseRecord, ApiError> {
        let dir = base_dir(&self.data_dir, vm);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| internal(format!("{}: {e}", dir.display())))?;
        let tracking = crate::engine::reverse::tracking_dir(&self.data_dir, vm);
        let mut record = BaseRecord::default();
        for (i, (image, format, size)) in images.iter().enumerate() {
            let last_map = tracking.join(format!("disk{i}.hashes"));
            let out = dir.join(format!("disk{i}.hashes"));
            // (a) the logs after F.
            let sent = match last {
                Some(l) if last_map.is_file() => self.store.sent_blocks_since(vm, f, l, i)?,
                _ => None,
            };
            if sent.is_none() {
                record.notes.push(format!(
                    "disk {i}: which blocks the logs after point {f} changed is not known here"
                ));
            }
            // (b) since the last log: nothing when the file is as it was read then.
            let print = tracking.join(format!("disk{i}.fingerprint.json"));
            let unchanged = std::fs::read(&print)
                .ok()
                .and_then(|b| serde_json::from_slice::<disk::fingerprint::Fingerprint>(&b).ok())
                .map(|fp| disk::fingerprint::check(Path::new(image), &fp));
            let since = match unchanged {
                Some(Ok(())) if last_map.is_file() => {
                    std::fs::copy(&last_map, &out)
                        .map_err(|e| internal(format!("{}: {e}", out.display())))?;
                    Some(Runs::new())
                }
                other => {
                    let why = match other {
                        Some(Err(why)) => why,
                        _ => format!("{image}: no record of its file after the last log"),
                    };
                    // What QEMU's tools wrote to the turned-off VM's qcow2 since: its bitmap.
                    // (engine::offline: enabled since before a point at or before the last.)
                    let bitmap = crate::engine::offline::recorded(&tracking, i);
                    let tracked = match (bitmap, last_map.is_file() && format == "qcow2") {
                        (Some(b), true) => match crate::engine::failback::read_bitmap(
                            &self.data_dir,
                            vm,
                            i,
                            image,
                            *size,
                            &b.bitmap,
                        )
                        .await
                        .and_then(|runs| {
                            crate::engine::offline::check_marked(
                                &tracking,
                                i,
                                &b.bitmap,
                                &runs,
                                last.unwrap_or(0),
                            )
                            .map(|()| runs)
                        }) {
                            Ok(runs) => Some(runs),
                            Err(not) => {
                                record.notes.push(format!("disk {i}: {not}"));
                                None
                            }
                        },
                        (None, true) => {
                            record.notes.push(format!(
                                "disk {i}: no bitmap of its writes since its last log is recorded"
                            ));
                            None
                        }
                        (_, false) => None,
                    };
                    if let Some(runs) = tracked {
                        // Only those blocks are read again, for an exact map (the bitmap may
                        // also hold blocks written before the last log, which are equal there).
                        self.rehash(image, format, i, *size, &last_map, &out, &runs)
                            .await?;
                        record.notes.push(format!(
                            "disk {i}: {} blocks of 64 KiB read again, as its bitmap says (written since its last log, or before it since the bitmap started)",
                            journal::blocks(&runs)
                        ));
                        record
                            .candidates
                            .push(sent.map(|a| journal::union(&a, &runs)));
                        continue;
                    }
                    let scanned = crate::engine::initial::hash_images(
                        None,
                        vm,
                        &[(image.clone(), format.clone())],
                        vec![wire::DiskInfo {
                            id: format!("disk{i}"),
                            virtual_size: *size,
                        }],
                        &dir,
                        &format!("scan{i}"),
                        &self.data_dir,
                    )
                    .await
                    .map_err(|f| ApiError::new(ErrorCode::StorageUnavailable, f.message))?;
                    let tmp = scanned
                        .into_iter()
                        .next()
                        .ok_or_else(|| internal("no map"))?;
                    std::fs::rename(&tmp, &out)
                        .map_err(|e| internal(format!("{}: {e}", out.display())))?;
                    record.notes.push(format!(
                        "disk {i}: {why}; its {} MiB were hash-scanned here",
                        size.div_ceil(1 << 20)
                    ));
                    last_map
                        .is_file()
                        .then(|| journal::map_diff(&last_map, &out).ok())
                        .flatten()
                }
            };
            record.candidates.push(match (sent, since) {
                (Some(a), Some(b)) => Some(journal::union(&a, &b)),
                _ => None,
            });
        }
        Ok(record)
    }

    /// Writes to `out` the map `previous` with blocks `runs` of `image` hashed again.
    #[allow(clippy::too_many_arguments)]
    async fn rehash(
        &self,
        image: &str,
        format: &str,
        i: usize,
        size: u64,
        previous: &Path,
        out: &Path,
        runs: &[(u64, u64)],
    ) -> Result<(), ApiError> {
        let ranges = crate::engine::failback::byte_ranges(runs, size);
        crate::engine::failback::prefetch(image, format, &ranges).await;
        let header = wire::LogHeader {
            vm: Uuid::nil(),
            relationship: 0,
            sequence: 2,
            parent: 1,
            point_time_micros: 0,
            point_type: wire::PointType::Standard,
            full_image: false,
            disks: (0..=i)
                .map(|d| wire::DiskInfo {
                    id: format!("disk{d}"),
                    virtual_size: size,
                })
                .collect(),
        };
        let mut sink = wire::LogWriter::new(std::io::sink(), header, wire::Compression::Off)
            .map_err(|e| internal(e.to_string()))?;
        let (tmp, _) = crate::engine::initial::scan_image_ranges(
            image,
            format,
            i,
            Some(previous),
            out,
            &self.data_dir,
            &mut sink,
            Some(&ranges),
        )
        .await
        .map_err(|f| ApiError::new(ErrorCode::StorageUnavailable, f.failure.message))?;
        std::fs::rename(&tmp, out).map_err(|e| internal(format!("{}: {e}", out.display())))
    }

    /// Takes the old primary's disks in as point `sequence` of its new point store: adopted
    /// without a copy when possible, else copied (`import_point`). Returns whether they were
    /// adopted; `notes` says why not.
    pub(super) async fn take_disks(
        &self,
        vm: Uuid,
        root: &Path,
        sequence: u64,
        images: &[(String, String, u64)],
        disks: &[DiskSpec],
        notes: &mut Vec<String>,
    ) -> Result<bool, String> {
        let points = PointStore::open(root, vm)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        let info = PointInfo {
            sequence,
            log_parent: 0,
            time_micros: now() * 1_000_000,
            kind: PointKind::Standard,
            full_image: true,
            disks: disks
                .iter()
                .map(|d| PointDisk {
                    id: d.id.clone(),
                    virtual_size: d.virtual_size,
                })
                .collect(),
            // Not a log's: a hash of what names the disks taken in.
            log_hash: blake3::hash(format!("adopted {vm} {sequence} {images:?}").as_bytes())
                .to_hex()
                .to_string(),
            log_bytes: 0,
        };
        let paths: Vec<PathBuf> = images.iter().map(|(p, _, _)| PathBuf::from(p)).collect();
        let qcow2 = images.iter().all(|(_, f, _)| f == "qcow2");
        // Recorded first: once adopted, the store's layers are names of the VM's disks (their
        // only names once they are released after the switch), and no failure after that may make
        // the caller undo (delete) the store.
        let record = ReceivedLog {
            vm,
            sequence,
            log_hash: info.log_hash.clone(),
            log_bytes: 0,
            point_time: info.time_micros,
            applied: true,
        };
        let adopted = if qcow2 {
            self.store
                .record_applied_log(&record)
                .map_err(|e| crate::error_chain(&e))?;
            super::prehash::forget_prefixes(&self.data_dir, vm);
            match points.adopt(&info, &paths).await {
                Ok(()) => true,
                Err(AdoptError::NotAdoptable(why)) => {
                    notes.push(format!("the disks were copied into the store: {why}"));
                    false
                }
                Err(e) => return Err(crate::error_chain(&e)),
            }
        } else {
            notes.push("the disks were copied into the store: they are not qcow2".into());
            false
        };
        if !adopted {
            let imported = self.import_point(vm, sequence, images, disks, None).await?;
            for map in imported.maps {
                let _ = std::fs::remove_file(map);
            }
            return Ok(false);
        }
        // The catalog rows are refreshed by every apply; a failure here is only logged.
        let rows: Vec<_> = points
            .list_points()
            .unwrap_or_default()
            .iter()
            .map(|p| crate::engine::initial::point_row(vm, p))
            .collect();
        if let Err(e) = self.store.put_recovery_points(vm, &rows) {
            tracing::warn!(%vm, "cannot list the adopted point: {}", crate::error_chain(&e));
        }
        Ok(true)
    }

    /// `GET …/compare/{id}/base/{disk}` of a failback compare.
    pub(super) fn compare_base(&self, vm: Uuid, c: &Compare, disk: u32) -> ApiResult {
        if !c.failback() {
            return Err(ApiError::new(
                ErrorCode::InvalidState,
                "only a failback compare (kind 3) has a base",
            ));
        }
        let dir = base_dir(&self.data_dir, vm);
        let record = load_base(&self.data_dir, vm)
            .filter(|b| self.store.last_applied(vm).ok() == Some(b.sequence))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidState,
                    "no failback base was prepared here",
                )
            })?;
        let Some(candidates) = record.candidates.get(disk as usize) else {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("no disk {disk}"),
            ));
        };
        // The map (16 bytes per block: 256 MiB for 1 TiB) goes from its file to the connection as
        // it is read, a MiB at a time; the receiver writes it to its own file the same way.
        let path = dir.join(format!("disk{disk}.hashes"));
        let file = std::fs::File::open(&path)
            .map_err(|e| internal(format!("the map of disk {disk}: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| internal(format!("the map of disk {disk}: {e}")))?
            .len();
        let head = FailbackBase::encode_head(disk, candidates.as_deref());
        let total = head.len() as u64 + len;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            if tx.send(Ok(head.into())).await.is_err() {
                return;
            }
            let mut file = tokio::fs::File::from_std(file);
            let mut sent = 0u64;
            while sent < len {
                let mut chunk = vec![0u8; (len - sent).min(1 << 20) as usize];
                let read = match file.read_exact(&mut chunk).await {
                    Ok(_) => Ok(chunk.into()),
                    Err(e) => Err(std::io::Error::new(
                        e.kind(),
                        format!("reading {}: {e}", path.display()),
                    )),
                };
                let failed = read.is_err();
                sent += (len - sent).min(1 << 20);
                // An error resets the stream: the receiver sees a cut, never a short map.
                if tx.send(read).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/vnd.vmreplica.failback-base")
            .header("content-length", total)
            .body(WireBody::Stream(rx))
            .unwrap_or_else(|_| Response::new(WireBody::bytes(Vec::new()))))
    }

    /// `POST vms/{vm}/failback` on the new primary.
    pub(super) async fn start_failback(
        &self,
        entry: &AuthorizationEntry,
        name: &str,
        vm: Uuid,
        req: StartFailback,
    ) -> ApiResult {
        let engine = self.failback.get().ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnknownResource,
                "this host does not run failbacks",
            )
        })?;
        // A replica here answers only to the primaries its binding allows, as every other route
        // naming it does (§2.3): an entry removed since, or another trust group's, is refused.
        if let (Some(v), Some(rel)) = (self.store.get_vm(vm)?, self.store.get_relationship(vm)?) {
            if v.mode == vmreplica_core::state::ReplicationMode::Replica.as_u16() {
                self.check_binding(entry, &rel)?;
            }
        }
        let (status, code) = engine.start(entry, name, vm, req).await?;
        Ok(json(code, &status))
    }

    /// `GET vms/{vm}/failback` on the new primary; `DELETE` (`cancel`) also cancels it.
    pub(super) fn failback_status(&self, name: &str, vm: Uuid, cancel: bool) -> ApiResult {
        let engine = self.failback.get().ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnknownResource,
                "this host does not run failbacks",
            )
        })?;
        Ok(json(200, &engine.status(name, vm, cancel)?))
    }
}

/// `vm`'s failback base, if one was prepared.
pub(super) fn load_base(data_dir: &Path, vm: Uuid) -> Option<BaseRecord> {
    std::fs::read(base_dir(data_dir, vm).join("base.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Once the failback's log is applied: the maps go, and the record keeps only its notes (for the
/// job's log), describing no point.
pub(super) fn retire_base(data_dir: &Path, vm: Uuid) {
    let Some(mut record) = load_base(data_dir, vm) else {
        return;
    };
    record.sequence = 0;
    record.candidates.clear();
    let _ = save_base(data_dir, vm, &record);
    if let Ok(entries) = std::fs::read_dir(base_dir(data_dir, vm)) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".hashes") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Writes `record` as `base.json` of `vm`'s failback base.
pub(super) fn save_base(data_dir: &Path, vm: Uuid, record: &BaseRecord) -> Result<(), ApiError> {
    let file = base_dir(data_dir, vm).join("base.json");
    let json = serde_json::to_vec(record).map_err(|e| internal(e.to_string()))?;
    std::fs::write(&file, json).map_err(|e| internal(format!("{}: {e}", file.display())))
}
