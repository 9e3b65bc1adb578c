//! Failover of a replica VM (spec §3.2, §13.3; DESIGN §4 "Failover family"):
//!
//! - `InitiateFailover` (3/7/10/15 → 12 → 5): the VM's disks become a writable overlay
//!   (`failover`) of the chosen retained point, made in O(1) whatever the disk size; the apply task
//!   leaves the VM's queued logs alone while the `failovers` row exists; `FailedOverReplicationType`
//!   says which kind of point it was.
//! - `RevertFailover` (5 → 3): the overlay and everything written into it are dropped, the VM's
//!   disks are what they were, and the queued logs are applied (DESIGN §6).
//! - `CommitFailover` (5 → 6): the overlay is flattened into standalone images beside the point
//!   store (`<store root>/<vm-guid>.failed-over/disk<i>.qcow2`), which become the VM's disks; then
//!   every recovery point and every received log is deleted, as Hyper-V does. The `failovers` row
//!   stays: its point is where a reverse after a planned failover continues the chain.

use std::path::{Path, PathBuf};

use disk::points::{OverlayError, PointStore};
use rusqlite::{params, OptionalExtension};
use uuid::Uuid;
use vmreplica_core::codes::ReturnCode;
use vmreplica_core::command::CommandError;
use vmreplica_core::state::ReplicationType;

use super::test_failover::{choose_point, refused};
use super::{EngineRequest, LocalEngine};
use crate::jobs::{JobContext, JobFailure};
use crate::store::{JobRow, Store, StoreResult, VmRow};

/// The overlay a failed-over VM runs on.
pub const OVERLAY: &str = "failover";

/// A failed-over replica VM: its point (sequence and the hash of that log, the common point of a
/// later reverse) and the disks it had before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverRow {
    pub vm: Uuid,
    pub point: u64,
    pub log_hash: String,
    pub disks_before: Vec<String>,
}

impl FailoverRow {
    /// The `PutVm::reverse` that makes the old primary take its disks as they are after this
    /// unplanned failover (a resync follows; with `failback`, a failback's compare).
    pub fn resync_reverse(&self, failback: bool) -> wire::protocol::ReverseFrom {
        wire::protocol::ReverseFrom {
            sequence: self.point.max(1),
            log_hash: if self.log_hash.is_empty() {
                "0".repeat(64)
            } else {
                self.log_hash.clone()
            },
            resync: true,
            failback,
        }
    }
}

/// Deletes `vm`'s failover row, within the caller's transaction if it has one.
pub(super) fn forget_in(conn: &rusqlite::Connection, vm: Uuid) -> StoreResult<()> {
    conn.execute("DELETE FROM failovers WHERE vm = ?1", [vm.to_string()])?;
    Ok(())
}

impl Store {
    pub fn failover(&self, vm: Uuid) -> StoreResult<Option<FailoverRow>> {
        let raw: Option<(i64, String, String)> = self
            .conn()
            .query_row(
                "SELECT point, log_hash, disks_before FROM failovers WHERE vm = ?1",
                [vm.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        raw.map(|(point, log_hash, disks)| {
            Ok(FailoverRow {
                vm,
                point: u64::try_from(point).unwrap_or(0),
                log_hash,
                disks_before: serde_json::from_str(&disks)?,
            })
        })
        .transpose()
    }

    pub(super) fn put_failover(&self, f: &FailoverRow) -> StoreResult<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO failovers (vm, point, log_hash, disks_before)
             VALUES (?1, ?2, ?3, ?4)",
            params![
                f.vm.to_string(),
                i64::try_from(f.point).unwrap_or(i64::MAX),
                f.log_hash,
                serde_json::to_string(&f.disks_before)?
            ],
        )?;
        Ok(())
    }

    pub fn remove_failover(&self, vm: Uuid) -> StoreResult<()> {
        forget_in(&self.conn(), vm)
    }

    pub fn set_vm_disks(&self, vm: Uuid, disks: &[String]) -> StoreResult<()> {
        self.conn().execute(
            "UPDATE vms SET disks = ?2 WHERE id = ?1",
            params![vm.to_string(), serde_json::to_string(disks)?],
        )?;
        Ok(())
    }

    /// After a committed failover: the VM keeps no recovery point and no received log (its
    /// `failovers` row stays: the common point of a reverse).
    pub(super) fn forget_replica_data(&self, vm: Uuid) -> StoreResult<()> {
        self.delete_vm_rows(
            vm,
            &[
                "recovery_points",
                "received_logs",
                "uploads",
                "resync_points",
            ],
        )
    }
}

fn failed(what: &str, e: &dyn std::error::Error, action: &str) -> JobFailure {
    JobFailure::failed(format!("{what}: {}", crate::error_chain(e)), action)
}

/// The replica VM's point store root.
pub(super) fn store_root(store: &Store, vm: &VmRow) -> Result<PathBuf, CommandError> {
    let replica = store.replica_vm(vm.id)?.ok_or_else(|| {
        refused(
            ReturnCode::InvalidState,
            format!("'{}' holds no replicated disks on this host", vm.name),
        )
    })?;
    Ok(PathBuf::from(replica.store_root))
}

fn paths(list: &[PathBuf]) -> Vec<String> {
    list.iter().map(|p| p.display().to_string()).collect()
}

impl LocalEngine {
    /// InitiateFailover on a replica VM.
    pub(super) fn failover(&self, req: EngineRequest) -> Result<JobRow, CommandError> {
        let root = store_root(&self.store, &req.vm)?;
        let point = choose_point(&self.store, &req.vm, req.args.recovery_point.as_deref())?;
        let failed_over_type = point_kind(&self.store, req.vm.id, point)?;
        // Written first, so the apply task leaves the queued logs alone from now on.
        let vm_id = req.vm.id;
        let log_hash = self
            .store
            .received_log(vm_id, point)?
            .map(|l| l.log_hash)
            .unwrap_or_default();
        self.store.put_failover(&FailoverRow {
            vm: req.vm.id,
            point,
            log_hash,
            disks_before: req.vm.disks.clone(),
        })?;
        let store = self.store.clone();
        let what = format!("Fail over to recovery point {point}");
        let started = self.spawn_with_outcome(
            req,
            None,
            &what,
            false,
            move |_ctx, vm, mut rel, _, claim| async move {
                // The failovers row keeps the next apply off; one already running (its point,
                // its prune) ends before the overlay is made.
                claim.apply_ended().await;
                let _claim = claim;
                if let Err(e) = forget_flattened(&root, vm.id) {
                    store.remove_failover(vm.id)?;
                    return Err(failed(
                        "cannot forget an earlier failover's images",
                        &e,
                        "Check the replica's storage location.",
                    ));
                }
                let made = async {
                    let points = PointStore::open(&root, vm.id).await?;
                    points.create_overlay(point, OVERLAY).await
                }
                .await;
                match made {
                    Ok(disks) => {
                        store.set_vm_disks(vm.id, &paths(&disks))?;
                        rel.failed_over_type = failed_over_type.as_u16();
                        tracing::info!(vm = %vm.id, point, "failed over");
                        Ok(rel)
                    }
                    Err(e) => {
                        store.remove_failover(vm.id)?;
                        Err(failed(
                            &format!("cannot create the disks of recovery point {point}"),
                            &e,
                            "Check the replica's storage location; pick another recovery point.",
                        ))
                    }
                }
            },
        );
        if started.is_err() {
            // Nothing runs: the apply task may go on.
            let _ = self.store.remove_failover(vm_id);
        }
        started
    }

    /// RevertFailover on a failed-over replica VM.
    pub(super) fn revert_failover(&self, req: EngineRequest) -> Result<JobRow, CommandError> {
        let root = store_root(&self.store, &req.vm)?;
        let store = self.store.clone();
        self.spawn_with_outcome(
            req,
            None,
            "Revert the failover",
            false,
            move |_ctx, vm, mut rel, _, claim| async move {
                let _claim = claim;
                let before = store
                    .failover(vm.id)?
                    .map(|f| f.disks_before)
                    .unwrap_or_default();
                let points = PointStore::open(&root, vm.id).await.map_err(|e| {
                    failed(
                        "cannot open the recovery points",
                        &e,
                        "Check the replica's storage location.",
                    )
                })?;
                forget_flattened(&root, vm.id).map_err(|e| {
                    failed(
                        "cannot forget a cut commit's images",
                        &e,
                        "Check the replica's storage location.",
                    )
                })?;
                match points.remove_overlay(OVERLAY).await {
                    Ok(()) | Err(OverlayError::Unknown(_)) => {}
                    Err(e) => {
                        return Err(failed(
                            "cannot delete the failover disks",
                            &e,
                            "Check the replica's storage location.",
                        ))
                    }
                }
                store.set_vm_disks(vm.id, &before)?;
                rel.failed_over_type = ReplicationType::None.as_u16();
                tracing::info!(vm = %vm.id, "failover reverted");
                // The queued logs are the apply task's again once the state is written.
                Ok(super::Done {
                    rel,
                    failover_over: true,
                    wake_apply: true,
                })
            },
        )
    }

    /// CommitFailover on a failed-over replica VM.
    pub(super) fn commit_failover(&self, req: EngineRequest) -> Result<JobRow, CommandError> {
        let root = store_root(&self.store, &req.vm)?;
        if self.store.test_system_of(req.vm.id)?.is_some() {
            return Err(refused(
                ReturnCode::SystemInUse,
                format!(
                    "'{}' has a test VM; remove it (DestroySystem) before committing the failover",
                    req.vm.name
                ),
            ));
        }
        if crate::power::enabled_state(&req.vm.power) == crate::power::ENABLED {
            return Err(refused(
                ReturnCode::InvalidState,
                format!(
                    "'{}' is running; turn it off before committing the failover",
                    req.vm.name
                ),
            ));
        }
        let store = self.store.clone();
        let data_dir = self.data_dir.clone();
        self.spawn_with_outcome(
            req,
            None,
            "Commit the failover",
            false,
            move |ctx, vm, rel, _, claim| async move {
                let _claim = claim;
                let planned = rel.failed_over_type == ReplicationType::Planned.as_u16();
                let points = flatten(&ctx, &store, &data_dir, &root, &vm, planned).await?;
                ctx.progress(90)?;
                // From here the flattened images are the VM's disks; the recovery points go.
                drop_points(&store, vm.id, points.dir())?;
                tracing::info!(vm = %vm.id, "failover committed; recovery points deleted");
                Ok(rel)
            },
        )
    }
}

/// CommitFailover's work, up to the flattened images becoming the VM's disks: the overlay is
/// flattened into `<root>/<vm-guid>.failed-over/`, with the records a failback needs (what the
/// overlay held, a bitmap of what is written after) and, after a `planned` failover, the point's
/// maps for a reverse. Returns the point store, whose points the caller then drops
/// ([`drop_points`]). Run again after a cut, it finishes (the images made, the overlay gone).
pub(super) async fn flatten(
    ctx: &JobContext,
    store: &Store,
    data_dir: &Path,
    root: &Path,
    vm: &VmRow,
    planned: bool,
) -> Result<PointStore, JobFailure> {
    let dest = root.join(format!("{}.failed-over", vm.id.hyphenated()));
    let points = PointStore::open(root, vm.id).await.map_err(|e| {
        failed(
            "cannot open the recovery points",
            &e,
            "Check the replica's storage location.",
        )
    })?;
    let overlays = PointStore::overlay_disk_paths(root, vm.id, OVERLAY, vm.disks.len());
    let overlay_gone = !overlays.iter().all(|o| o.is_file());
    let tracking = super::reverse::tracking_dir(data_dir, vm.id);
    // Which failover the images about to be made in `dest` are of, so that a run after a cut
    // (the overlay gone) takes only its own: an earlier failover's commit left images there too.
    let current = store.failover(vm.id)?;
    let marker = dest.join(FLATTENED_FOR);
    let found = flattened_for(&marker);
    let ours = |f: &FailoverRow, found: &FlattenedFor| {
        found.point == f.point && found.log_hash == f.log_hash
    };
    // After a planned failover, the point's maps are kept for a reverse, which must send
    // everything the VM wrote since (docs/protocol.md §5.7). A run after a cut that removed the
    // overlay (and maybe the points) took them before it made the images, as its record says.
    let maps_taken =
        overlay_gone && matches!((&current, &found), (Some(f), Some(m)) if ours(f, m) && m.maps);
    if let (Some(f), true) = (&current, planned && !maps_taken) {
        let table = super::initial::disk_table(vm)?;
        let layers = (0..table.len())
            .map(|i| points.point_path(f.point, i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                failed(
                    "cannot find the failover point",
                    &e,
                    "Check the replica's storage location.",
                )
            })?;
        let name = super::reverse::COMMITTED_BASELINE;
        let layers: Vec<(String, String)> = layers
            .iter()
            .map(|l| (l.display().to_string(), "qcow2".to_string()))
            .collect();
        let tmps = super::initial::hash_images(
            Some(ctx),
            vm.id,
            &layers,
            super::initial::log_disks(&table),
            &tracking,
            name,
            data_dir,
        )
        .await?;
        for (i, tmp) in tmps.iter().enumerate() {
            disk::scan::hashmap::commit(tmp, &tracking.join(format!("disk{i}.{name}"))).map_err(
                |e| {
                    failed(
                        "cannot keep the point's block-hash map",
                        &e,
                        "Check the data directory.",
                    )
                },
            )?;
        }
    }
    // What the VM wrote since the failover point, for a failback (engine::failback); when this
    // finishes a cut commit (the overlay gone), the first run's records stay.
    if !overlay_gone {
        if let Some(f) = &current {
            let record = FlattenedFor {
                point: f.point,
                log_hash: f.log_hash.clone(),
                maps: planned,
            };
            let json = serde_json::to_vec(&record).unwrap_or_default();
            std::fs::create_dir_all(&dest)
                .and_then(|()| crate::durable::write_file(&marker, &json))
                .map_err(|e| {
                    failed(
                        "cannot record which failover the flattened disks are of",
                        &e,
                        "Check the replica's storage location.",
                    )
                })?;
        }
        // Never an earlier failover's records.
        super::failback::forget_records(data_dir, vm.id, vm.disks.len());
        if let Err(why) = super::failback::record_overlay_writes(data_dir, vm.id, &overlays).await {
            tracing::warn!(vm = %vm.id, "a failback will compare every block: {why}");
        }
    }
    let disks = match points.commit_overlay(OVERLAY, &dest).await {
        Ok(disks) => disks,
        // A commit cut off after the images were made and the overlay removed: images of this
        // failover, not ones an earlier failover's commit left.
        Err(OverlayError::Unknown(_))
            if matches!((&current, &found), (Some(f), Some(m)) if ours(f, m))
                && vm
                    .disks
                    .iter()
                    .enumerate()
                    .all(|(i, _)| dest.join(format!("disk{i}.qcow2")).is_file()) =>
        {
            (0..vm.disks.len())
                .map(|i| dest.join(format!("disk{i}.qcow2")))
                .collect()
        }
        Err(e) => {
            return Err(failed(
                "cannot flatten the failover disks",
                &e,
                "Check free space in the replica's storage location.",
            ))
        }
    };
    // And what it writes from now on.
    if let Err(why) = super::failback::track_after_commit(data_dir, vm.id, &disks).await {
        tracing::warn!(vm = %vm.id, "a failback will compare every block: {why}");
    }
    store.set_vm_disks(vm.id, &paths(&disks))?;
    Ok(points)
}

/// In `<root>/<vm>.failed-over/`: which failover its images were flattened for ([`FlattenedFor`]).
const FLATTENED_FOR: &str = "flattened-for.json";

/// The failover (its point and the point's log hash) a commit flattened `<vm>.failed-over/`'s
/// images for, written before it began; `maps`: it had kept the point's block-hash maps first.
#[derive(serde::Serialize, serde::Deserialize)]
struct FlattenedFor {
    point: u64,
    log_hash: String,
    maps: bool,
}

fn flattened_for(marker: &Path) -> Option<FlattenedFor> {
    serde_json::from_slice(&std::fs::read(marker).ok()?).ok()
}

/// Forgets which failover `vm`'s `<root>/<vm>.failed-over/` images were flattened for: a failover
/// reverted or begun anew must never find an earlier one's images its own.
fn forget_flattened(root: &Path, vm: Uuid) -> std::io::Result<()> {
    let marker = root
        .join(format!("{}.failed-over", vm.hyphenated()))
        .join(FLATTENED_FOR);
    match std::fs::remove_file(&marker) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(()) => marker.parent().map_or(Ok(()), crate::durable::sync_dir),
    }
}

/// After [`flatten`]: the VM keeps no recovery point and no received log.
pub(super) fn drop_points(store: &Store, vm: Uuid, dir: &Path) -> Result<(), JobFailure> {
    store.forget_replica_data(vm)?;
    remove_point_store(dir);
    Ok(())
}

/// A failed-over VM moved to recovery point `point` of its replica store under `root`: the
/// failover overlay and everything written into it are dropped, and a new, empty one on `point`
/// becomes the VM's disks (what InitiateFailback to a named point does first on the new primary,
/// engine::failback). Each step can run again after a cut. Returns the kind of the point.
pub(super) async fn move_failover(
    store: &Store,
    root: &Path,
    vm: &VmRow,
    point: u64,
) -> Result<ReplicationType, JobFailure> {
    let before = store.failover(vm.id)?.ok_or_else(|| {
        JobFailure::failed(
            format!("'{}' is not failed over here", vm.name),
            "Fail over first.",
        )
    })?;
    let storage = |what: &str, e: &dyn std::error::Error| {
        failed(what, e, "Check the replica's storage location.")
    };
    let points = PointStore::open(root, vm.id)
        .await
        .map_err(|e| storage("cannot open the recovery points", &e))?;
    match points.remove_overlay(OVERLAY).await {
        Ok(()) | Err(OverlayError::Unknown(_)) => {}
        Err(e) => return Err(storage("cannot delete the failover disks", &e)),
    }
    // The row first: a cut after this leaves no overlay (a commit or a start fails; this runs
    // again), never an overlay of one point under a row naming another.
    let log_hash = store
        .received_log(vm.id, point)?
        .map(|l| l.log_hash)
        .unwrap_or_default();
    store.put_failover(&FailoverRow {
        point,
        log_hash,
        ..before
    })?;
    let disks = points.create_overlay(point, OVERLAY).await.map_err(|e| {
        storage(
            &format!("cannot create the disks of recovery point {point}"),
            &e,
        )
    })?;
    store.set_vm_disks(vm.id, &paths(&disks))?;
    Ok(point_kind(store, vm.id, point)?)
}

/// What kind of point `point` of `vm` is, as FailedOverReplicationType says it.
fn point_kind(store: &Store, vm: Uuid, point: u64) -> StoreResult<ReplicationType> {
    let kind = store
        .recovery_points(vm)?
        .into_iter()
        .find(|p| p.sequence == point)
        .map(|p| p.kind)
        .unwrap_or_default();
    Ok(match kind.as_str() {
        "ApplicationConsistent" => ReplicationType::ApplicationConsistent,
        "PlannedFailover" => ReplicationType::Planned,
        _ => ReplicationType::Regular,
    })
}

/// Deletes the point store's directory (points, layers, queued logs) after a commit.
fn remove_point_store(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), "cannot delete the recovery points: {e}");
    }
}
