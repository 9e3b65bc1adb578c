//! The old primary's side of a reverse after a planned failover (docs/protocol.md §5.7).
//!
//! The new primary (the replica that failed over to the planned point N) sends `PUT vms/{vm}` with
//! `reverse: {sequence: N, log_hash}`. This host still holds the VM as a primary prepared for
//! failover (state 4, locked from starting since its final log N was applied over there). It
//! accepts only if the peer is the host it replicated to, log N with that hash is the last one it
//! committed, and its disks, read once, still match block by block the hash maps its final log left
//! (a disk changed behind the lock is refused with `ResyncRequired` before anything is created).
//! Then its own disks become point N of its point store (read again and written locally: nothing
//! crosses the network). The VM becomes a replica (mode 2, state 3) of the new primary,
//! whose next log is N+1.
//!
//! After an unplanned failover (`reverse.resync`) the two sides may differ anywhere: the VM must be
//! off, its disks are taken as they are (as the point after the last log it sent) without the
//! common-point checks, and the new primary resynchronizes right after (compare kind 2), sending
//! only the blocks that differ.

use std::path::{Path, PathBuf};

use disk::points::{OverlayError, PointStore};
use disk::scan::hashmap::MapReader;
use uuid::Uuid;
use vmreplica_core::settings::AuthorizationEntry;
use vmreplica_core::state::{ReplicationMode, ReplicationState};
use wire::protocol::{DiskSpec, ErrorCode, PutVm, ReverseFrom};

use super::replica::{json, ApiError, ApiResult, ReplicaSide};
use crate::engine::failover::OVERLAY as FAILOVER_OVERLAY;
use crate::store::{Store, StoreResult, VmRow};

fn refused(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::new(code, message)
}

/// A log header's disk table for a placeholder's disks.
pub(super) fn spec_disks(disks: &[DiskSpec]) -> Vec<wire::DiskInfo> {
    disks
        .iter()
        .map(|d| wire::DiskInfo {
            id: d.id.clone(),
            virtual_size: d.virtual_size,
        })
        .collect()
}

/// Whether two block-hash maps hold the same hashes.
fn same_map(a: &Path, b: &Path) -> Result<bool, String> {
    let mut a = MapReader::open(a).map_err(|e| e.to_string())?;
    let mut b = MapReader::open(b).map_err(|e| e.to_string())?;
    if a.block_size != b.block_size || a.disk_size != b.disk_size {
        return Ok(false);
    }
    loop {
        match (
            a.next_hash().map_err(|e| e.to_string())?,
            b.next_hash().map_err(|e| e.to_string())?,
        ) {
            (None, None) => return Ok(true),
            (Some(x), Some(y)) if x == y => {}
            _ => return Ok(false),
        }
    }
}

impl ReplicaSide {
    /// Whether `images` hold, block for block, what the maps of the last log this host sent say
    /// (`tracking/disk<i>.hashes`).
    async fn disks_match_maps(
        &self,
        vm: Uuid,
        images: &[(String, String, u64)],
        disks: &[DiskSpec],
        tracking: &Path,
    ) -> Result<bool, ApiError> {
        let listed: Vec<(String, String)> = images
            .iter()
            .map(|(image, format, _)| (image.clone(), format.clone()))
            .collect();
        let tmps = crate::engine::initial::hash_images(
            None,
            vm,
            &listed,
            spec_disks(disks),
            tracking,
            "reverse-check",
            &self.data_dir,
        )
        .await
        .map_err(|f| refused(ErrorCode::StorageUnavailable, f.message))?;
        let mut same = true;
        for (i, tmp) in tmps.iter().enumerate() {
            same &= same_map(tmp, &tracking.join(format!("disk{i}.hashes"))).unwrap_or(false);
            let _ = std::fs::remove_file(tmp);
        }
        Ok(same)
    }

    /// `PUT vms/{vm}` with `reverse` on the prepared old primary `existing`.
    pub(super) async fn accept_reverse(
        &self,
        entry: &AuthorizationEntry,
        sender: &[String],
        existing: VmRow,
        put: &PutVm,
        from: &ReverseFrom,
    ) -> ApiResult {
        let vm = existing.id;
        // InitiateFailback's job on this host holds the VM's claim and waits for exactly this
        // request (state 13 is only ever its own).
        let failback_here = from.failback
            && self
                .store
                .get_relationship(vm)?
                .is_some_and(|r| r.state == ReplicationState::FailbackInProgress.as_u16());
        if from.failback && !failback_here {
            return Err(refused(
                ErrorCode::InvalidState,
                format!(
                    "no failback of '{}' runs here (InitiateFailback shows 13 while it does)",
                    existing.name
                ),
            ));
        }
        let claim = self.claims.claim(vm);
        if claim.is_none() && !failback_here {
            return Err(refused(
                ErrorCode::Busy,
                format!(
                    "'{}' is busy with an operation here; ask again shortly",
                    existing.name
                ),
            ));
        }
        let _claim = claim;
        let mut rel = self
            .store
            .get_relationship(vm)?
            .ok_or_else(|| refused(ErrorCode::UnknownVm, "the VM has no relationship here"))?;
        if from.resync {
            if crate::power::enabled_state(&existing.power) == crate::power::ENABLED {
                return Err(refused(
                    ErrorCode::InvalidState,
                    format!("'{}' is running here; turn it off first", existing.name),
                ));
            }
        } else if rel.state != ReplicationState::SyncedReplicationComplete.as_u16() {
            return Err(refused(
                ErrorCode::InvalidState,
                format!(
                    "'{}' is in state {} here, not prepared for a planned failover (4)",
                    existing.name, rel.state
                ),
            ));
        }
        // The sender is who its certificate names, not what its request says (§5.7).
        let ours = rel.settings.recovery_connection_point.trim_end_matches('.');
        let named = sender
            .iter()
            .any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(ours));
        if !named || !ours.eq_ignore_ascii_case(put.primary_connection_point.trim_end_matches('.'))
        {
            return Err(super::server::refusal(
                wire::protocol::RefusalReason::NotAuthorizedForVm,
                format!(
                    "'{}' replicates to {}, not to {} (whose request names {})",
                    existing.name,
                    rel.settings.recovery_connection_point,
                    sender.join(", "),
                    put.primary_connection_point
                ),
            ));
        }
        let chain = self.store.chain(vm)?;
        if !from.resync
            && chain
                .as_ref()
                .map(|c| (c.last_sequence, c.last_log_hash.as_str()))
                != Some((from.sequence, from.log_hash.as_str()))
        {
            return Err(refused(
                ErrorCode::ResyncRequired,
                format!(
                    "log {} with that hash is not the last log this host sent; a resynchronization is needed",
                    from.sequence
                ),
            ));
        }
        let table = crate::engine::initial::disk_table(&existing)
            .map_err(|f| refused(ErrorCode::StorageUnavailable, f.message))?;
        let ours: Vec<DiskSpec> = table
            .iter()
            .enumerate()
            .map(|(i, (_, size))| DiskSpec {
                id: format!("disk{i}"),
                virtual_size: *size,
            })
            .collect();
        if ours != put.disks {
            return Err(refused(
                ErrorCode::DiskTableMismatch,
                "the disks differ from this host's; a resynchronization is needed",
            ));
        }

        let images: Vec<(String, String, u64)> = existing
            .disks
            .iter()
            .zip(&table)
            .map(|(path, (format, size))| (path.clone(), format.clone(), *size))
            .collect();
        let tracking = crate::engine::reverse::tracking_dir(&self.data_dir, vm);
        // A planned reverse: the disks must still be point N, block for block, before anything
        // is created (a refusal leaves this host as it was).
        if !from.resync
            && !self
                .disks_match_maps(vm, &images, &put.disks, &tracking)
                .await?
        {
            return Err(refused(
                ErrorCode::ResyncRequired,
                format!(
                    "the disks of '{}' changed after its final log {}; a resynchronization is needed",
                    existing.name, from.sequence
                ),
            ));
        }

        // The VM's own disks become point N.
        let replica = self.new_store_root(entry, vm, &put.disks)?;
        let store_dir = Path::new(&replica.store_root).join(vm.hyphenated().to_string());
        let fresh = !store_dir.join("disk0").exists();
        self.store.put_replica_vm(&replica)?;
        let undo = |why: String| {
            let _ = self.store.forget_replica_vm(vm);
            // Only what this call made: an older store there may hold the disks the VM runs on.
            if fresh {
                let _ = std::fs::remove_dir_all(&store_dir);
            }
            why
        };
        // After an unplanned failover the disks are taken as they are, as the point after the
        // last log this host sent; the resync that follows sends what differs.
        let (sequence, recorded) = match (from.resync, &chain) {
            (false, _) => (from.sequence, Some(from.log_hash.as_str())),
            (true, Some(c)) => (c.last_sequence.max(1), None),
            (true, None) => (from.sequence, None),
        };
        if from.failback {
            // Which blocks may differ from the failover point, before the disks are taken in
            // (replication::failback).
            let mut record = self
                .failback_base(
                    vm,
                    &images,
                    from.sequence,
                    chain.as_ref().map(|c| c.last_sequence),
                )
                .await
                .inspect_err(|_| {
                    undo(String::new());
                })?;
            record.sequence = sequence;
            super::failback::save_base(&self.data_dir, vm, &record).inspect_err(|_| {
                undo(String::new());
            })?;
            let adopted = self
                .take_disks(
                    vm,
                    Path::new(&replica.store_root),
                    sequence,
                    &images,
                    &put.disks,
                    &mut record.notes,
                )
                .await;
            match adopted {
                Ok(adopted) => {
                    if adopted {
                        record
                            .notes
                            .push("the disks were taken in as they are, without a copy".into());
                    }
                    // The notes only: the base itself was saved above.
                    if super::failback::save_base(&self.data_dir, vm, &record).is_err() {
                        tracing::warn!(%vm, "cannot save the failback notes");
                    }
                    tracing::info!(%vm, point = sequence, adopted, notes = ?record.notes, "failback base prepared");
                }
                Err(why) => {
                    return Err(refused(
                        ErrorCode::Internal,
                        undo(format!("cannot take in the disks: {why}")),
                    ))
                }
            }
        } else {
            let imported = self
                .import_point(vm, sequence, &images, &put.disks, recorded)
                .await
                .map_err(|why| {
                    refused(
                        ErrorCode::Internal,
                        undo(format!("cannot import the disks: {why}")),
                    )
                })?;
            if from.resync {
                // The resync that follows compares with these disks: their hashes, made while
                // they were copied, spare it reading them again (replication::prehash).
                let identity = self
                    .store
                    .received_log(vm, sequence)
                    .ok()
                    .flatten()
                    .map(|l| l.log_hash)
                    .unwrap_or_default();
                super::prehash::keep_maps(&self.data_dir, vm, sequence, &identity, imported.maps);
            } else {
                for map in imported.maps {
                    let _ = std::fs::remove_file(map);
                }
            }
        }

        crate::crash::point("reverse-disks-taken");
        let mode = ReplicationMode::Replica.as_u16();
        // InitiateFailback's job here waits for the failback's log (13 → 14 at its apply); cut
        // off, it leaves a replica that can run the failback again (9).
        let (state, restore) = if from.failback {
            (
                ReplicationState::FailbackInProgress,
                Some(ReplicationState::WaitingToStartResynchronization.as_u16()),
            )
        } else {
            (ReplicationState::Replicating, None)
        };
        rel.state = state.as_u16();
        rel.primary_connection_point = Some(put.primary_connection_point.clone());
        rel.authorization_entry = Some(entry.allowed_primary_host_system.clone());
        rel.settings.replication_interval = put.settings.replication_interval;
        rel.settings.recovery_history = u16::from(put.settings.recovery_history);
        rel.settings.application_consistent_snapshot_interval =
            u16::from(put.settings.application_consistent_snapshot_interval);
        rel.settings.compression_enabled = put.settings.compression_enabled;
        rel.failed_over_type = 0;
        rel.settings.recovery_connection_point = self.host.clone();
        self.store.switch_to_replica(&rel, mode, restore)?;
        crate::crash::point("reverse-switched");
        if !existing.disks.is_empty() {
            tracing::info!(%vm, disks = ?existing.disks, "the VM's former disks are no longer used");
        }
        // Only now, with nothing naming them any more, do the disk files the VM ran on go: the
        // names of adopted disks (the point holds them), the overlay of an earlier failover (taken
        // in as point N); original image files that were copied are left where they are. A stop
        // before this: both at the next start (`finish_cut_off_reverses`).
        // A task of its own: a dropped request (the peer gone) must not cut it off halfway.
        let root = PathBuf::from(&replica.store_root);
        let _ = tokio::spawn(async move { finish_switch(vm, &root).await }).await;
        let now_replica = VmRow {
            mode,
            disks: Vec::new(),
            ..existing
        };
        tracing::info!(%vm, point = sequence, resync = from.resync, primary = %put.primary_connection_point, "reversed: this VM is now the replica");
        Ok(json(200, &self.describe(&now_replica, &rel)?))
    }
}

/// What follows a reverse's switch to replica in `vm`'s store under `root`, which alone holds the
/// VM's data now: the old names of the disks a failback adopted go (those a committed layer names
/// too), and so does the overlay of an earlier failover. A failure is logged: the names stay,
/// the store's data is whole.
async fn finish_switch(vm: Uuid, root: &Path) {
    let points = match PointStore::open(root, vm).await {
        Ok(points) => points,
        Err(e) => {
            tracing::warn!(%vm, "cannot open the point store to finish the reverse: {}", crate::error_chain(&e));
            return;
        }
    };
    release_names(vm, &points).await;
    match points.remove_overlay(FAILOVER_OVERLAY).await {
        Ok(()) | Err(OverlayError::Unknown(_)) => {}
        Err(e) => {
            tracing::warn!(%vm, "cannot delete the old failover disks: {}", crate::error_chain(&e))
        }
    }
}

/// At the daemon's start, before anything uses a point store: finishes the reverses a stop cut off
/// after the switch to replica.
/// - An adoption still recorded (its old names there) of a VM now a replica: the names go. One
///   of a VM still a primary (cut off before the switch, its disks those names) is left as it is:
///   the failback run again takes the adopted point as it is.
/// - The overlay of an earlier failover (`failover`) in the store of a replica VM that is not
///   failed over (no `failovers` row: a failed-over replica always has one) and runs on no disks
///   of its own: deleted (it would pin its base point and refuse the next failover).
pub async fn finish_cut_off_reverses(store: &Store) {
    for (vm, root) in store.replica_stores().unwrap_or_default() {
        let root = Path::new(&root);
        let Ok(Some(row)) = store.get_vm(vm) else {
            continue;
        };
        let replica = row.mode == ReplicationMode::Replica.as_u16();
        let adopted = PointStore::adoption_recorded(root, vm);
        if adopted && !replica {
            tracing::warn!(%vm, "a failback was cut off before this VM became a replica; its disks keep their names until the failback runs again");
        }
        let overlay = replica
            && row.disks.is_empty()
            && PointStore::overlay_exists(root, vm, FAILOVER_OVERLAY)
            && matches!(store.failover(vm), Ok(None));
        if !(replica && (adopted || overlay)) {
            continue;
        }
        tracing::warn!(%vm, "finishing a reverse's switch to replica that a stop cut off");
        finish_switch(vm, root).await;
    }
}

/// The release of the old names of the disks a failback adopted into `points`; logged.
async fn release_names(vm: Uuid, points: &PointStore) {
    match points.release_adopted().await {
        Ok(names) if names.is_empty() => {}
        Ok(names) => {
            tracing::info!(%vm, names = ?names, "the adopted disks' old names are removed (the recovery point holds them)")
        }
        Err(e) => {
            tracing::warn!(%vm, "cannot remove the adopted disks' old names: {}", crate::error_chain(&e))
        }
    }
}

impl Store {
    /// Undoes a replica record of `vm` that a failed reverse began: the placeholder row, its
    /// received logs and recovery points.
    fn forget_replica_vm(&self, vm: Uuid) -> StoreResult<()> {
        self.delete_vm_rows(
            vm,
            &[
                "replica_vms",
                "received_logs",
                "recovery_points",
                "resync_points",
            ],
        )
    }
}
