//! The replica's side of a resynchronization (docs/protocol.md §5.5 kind 2).
//!
//! The primary lost track of what changed (its maps or bitmaps are gone, or an unplanned failover
//! was reversed): it compares the block hashes of its disks with this host's latest recovery point
//! and sends only the blocks that differ, as the next log of the chain. That log is applied like
//! any delta, as a new layer over the latest point, so a resync cut off before its commit changes
//! nothing here. Once it is applied, every other recovery point is deleted (as Hyper-V does, spec
//! §13.6 step 6): the older points may not agree with what the primary now calls its past.

use std::sync::Arc;

use disk::points::{PointStore, RetentionPolicy};
use rusqlite::{params, OptionalExtension};
use uuid::Uuid;
use vmreplica_core::settings::AuthorizationEntry;
use vmreplica_core::state::ReplicationState;
use wire::protocol::{self, ErrorCode, ErrorDetail};

use super::replica::{json, ApiError, ApiResult, Compare, ReplicaSide};
use crate::clock::now;
use crate::store::{Store, StoreResult};

/// [`Store::drop_unapplied`] through `conn` (a caller's transaction too).
pub(crate) fn drop_unapplied_in(conn: &rusqlite::Connection, vm: Uuid) -> StoreResult<Vec<u64>> {
    let mut stmt = conn.prepare(
        "SELECT sequence FROM received_logs WHERE vm = ?1 AND applied = 0 ORDER BY sequence",
    )?;
    let seqs = stmt
        .query_map([vm.to_string()], |r| r.get::<_, i64>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    conn.execute(
        "DELETE FROM received_logs WHERE vm = ?1 AND applied = 0",
        [vm.to_string()],
    )?;
    // Their sequences will be other logs' (a mark of one would make it a resync's).
    for seq in &seqs {
        conn.execute(
            "DELETE FROM resync_points WHERE vm = ?1 AND sequence = ?2",
            params![vm.to_string(), seq],
        )?;
    }
    // Uploads past them would collide with the resync's log.
    conn.execute("DELETE FROM uploads WHERE vm = ?1", [vm.to_string()])?;
    Ok(seqs
        .into_iter()
        .filter_map(|s| u64::try_from(s).ok())
        .collect())
}

/// Drops the committed logs of `vm` that were never applied, with their files (in its store's
/// incoming folder); returns their sequences.
pub(crate) fn drop_unapplied_logs(store: &Store, vm: Uuid) -> StoreResult<Vec<u64>> {
    let seqs = store.drop_unapplied(vm)?;
    remove_log_files(store, vm, &seqs);
    Ok(seqs)
}

/// Deletes the files of `vm`'s committed logs `seqs` (forgotten, never to be applied), as far as
/// it can.
pub(crate) fn remove_log_files(store: &Store, vm: Uuid, seqs: &[u64]) {
    if let Ok(Some(replica)) = store.replica_vm(vm) {
        for seq in seqs {
            super::replica::remove_committed(std::path::Path::new(&replica.store_root), vm, *seq);
        }
    }
}

impl Store {
    /// Marks log `sequence` of `vm` as the result of a resynchronization.
    pub(super) fn mark_resync_point(&self, vm: Uuid, sequence: u64) -> StoreResult<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO resync_points (vm, sequence) VALUES (?1, ?2)",
            params![vm.to_string(), i64::try_from(sequence).unwrap_or(i64::MAX)],
        )?;
        Ok(())
    }

    /// Forgets the committed logs of `vm` that were never applied; returns their sequences.
    fn drop_unapplied(&self, vm: Uuid) -> StoreResult<Vec<u64>> {
        drop_unapplied_in(&self.conn(), vm)
    }

    /// Whether log `sequence` of `vm` is a resynchronization's (.0), and whether one before it is
    /// still marked (.1): its apply ended before its prune, which forgets the mark last.
    pub(super) fn resync_points(&self, vm: Uuid, sequence: u64) -> StoreResult<(bool, bool)> {
        let seq = i64::try_from(sequence).unwrap_or(i64::MAX);
        let (this, before): (i64, i64) = self.conn().query_row(
            "SELECT count(*) FILTER (WHERE sequence = ?2), count(*) FILTER (WHERE sequence < ?2)
             FROM resync_points WHERE vm = ?1",
            params![vm.to_string(), seq],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((this > 0, before > 0))
    }

    /// Forgets the marks of `vm`'s logs up to `sequence` (once its apply pruned).
    pub(super) fn forget_resync_points(&self, vm: Uuid, sequence: u64) -> StoreResult<()> {
        self.conn().execute(
            "DELETE FROM resync_points WHERE vm = ?1 AND sequence <= ?2",
            params![vm.to_string(), i64::try_from(sequence).unwrap_or(i64::MAX)],
        )?;
        Ok(())
    }

    /// Whether log `sequence` of `vm` is a resynchronization's; forgets the mark.
    pub(super) fn take_resync_point(&self, vm: Uuid, sequence: u64) -> StoreResult<bool> {
        let seq = i64::try_from(sequence).unwrap_or(i64::MAX);
        let found: Option<i64> = self
            .conn()
            .query_row(
                "SELECT sequence FROM resync_points WHERE vm = ?1 AND sequence = ?2",
                params![vm.to_string(), seq],
                |r| r.get(0),
            )
            .optional()?;
        if found.is_some() {
            self.conn().execute(
                "DELETE FROM resync_points WHERE vm = ?1 AND sequence = ?2",
                params![vm.to_string(), seq],
            )?;
        }
        Ok(found.is_some())
    }
}

/// The retention after a resynchronization: only the new latest point (and pinned ones).
pub(super) const AFTER_RESYNC: RetentionPolicy = RetentionPolicy {
    recovery_history: 0,
    keep_app_consistent: false,
};

impl ReplicaSide {
    /// `POST …/compare` kind 2: the primary's hashes are compared with the latest point here.
    pub(super) async fn begin_resync(
        self: &Arc<Self>,
        _entry: &AuthorizationEntry,
        vm: Uuid,
        begin: &protocol::BeginCompare,
        state: u16,
    ) -> ApiResult {
        // 14: the failback's log applied here, the new primary's job perhaps not told (it gave
        // up asking, or was cancelled, and waits in 9): its resync is how both go on.
        let usable = [
            ReplicationState::Replicating,
            ReplicationState::Suspended,
            ReplicationState::Critical,
            ReplicationState::WaitingToStartResynchronization,
            ReplicationState::FailbackComplete,
        ]
        .map(ReplicationState::as_u16);
        let failback = begin.kind == 3;
        // A failback compares with the base its PUT prepared (replication::failback).
        // ... and only on the point that base describes (the one its PUT took in).
        let failback_ok = failback
            && state == ReplicationState::FailbackInProgress.as_u16()
            && super::failback::load_base(&self.data_dir, vm)
                .is_some_and(|b| self.store.last_applied(vm).ok() == Some(b.sequence));
        if failback && !failback_ok {
            let mut d = ErrorDetail::new(
                ErrorCode::InvalidState,
                format!(
                    "a failback compare needs a failback in progress here (13), not state {state}"
                ),
            );
            d.replica_state = Some(state);
            return Err(ApiError(Box::new(d)));
        }
        if !usable.contains(&state) && !failback_ok {
            let mut d = ErrorDetail::new(
                ErrorCode::InvalidState,
                format!("the replica is in state {state} and cannot be resynchronized"),
            );
            d.replica_state = Some(state);
            return Err(ApiError(Box::new(d)));
        }
        let replica = self
            .store
            .replica_vm(vm)?
            .ok_or_else(|| ApiError::new(ErrorCode::UnknownVm, "no placeholder record"))?;
        if self.store.pending_apply()?.iter().any(|l| l.vm == vm) {
            // Not while one of them is being applied (dropped, it would land anyway).
            let applying = self.claims.try_applying(vm);
            if !replica.resync_required || applying.is_none() {
                return Err(ApiError::new(
                    ErrorCode::Busy,
                    "the replica is still applying logs; ask again shortly",
                ));
            }
            // Logs that cannot be applied (why a resync is needed): the resync replaces them.
            for seq in drop_unapplied_logs(&self.store, vm)? {
                tracing::info!(%vm, sequence = seq, "a log that was never applied is dropped for the resynchronization");
            }
        }
        let baseline = self.store.last_applied(vm)?;
        if baseline == 0 {
            return Err(ApiError::new(
                ErrorCode::InvalidState,
                "the replica holds no recovery point yet; start an initial replication",
            ));
        }
        if replica.disks != begin.disks {
            let mut d = ErrorDetail::new(
                ErrorCode::DiskTableMismatch,
                "the disks differ from the replica's; a new relationship is needed",
            );
            d.expected = Some(replica.disks.clone());
            return Err(ApiError(Box::new(d)));
        }
        let compare = self
            .compare_point(vm, &replica, baseline, begin, (true, failback))
            .await?;
        // The resync itself is what a "resynchronization required" mark asked for.
        if replica.resync_required {
            let mut r = replica.clone();
            r.resync_required = false;
            self.store.put_replica_vm(&r)?;
        }
        tracing::info!(%vm, compare = %compare.id(), baseline, at = now(), "resynchronization comparison begun");
        Ok(json(201, &compare.session()))
    }

    /// A session comparing with point `baseline`'s layers, ready at once, remembered as `vm`'s
    /// session. It leads to a resynchronization's log with `resync`; with `failback`, to a
    /// failback's (the old primary's base). Otherwise this side hashes its point in the background
    /// (§5.5), going on from the hashes that sessions on this point recorded before.
    pub(super) async fn compare_point(
        &self,
        vm: Uuid,
        replica: &super::records::ReplicaVmRow,
        baseline: u64,
        begin: &protocol::BeginCompare,
        (resync, failback): (bool, bool),
    ) -> Result<Arc<Compare>, ApiError> {
        let points = PointStore::open(std::path::Path::new(&replica.store_root), vm)
            .await
            .map_err(|e| ApiError::new(ErrorCode::StorageUnavailable, crate::error_chain(&e)))?;
        let mut images = Vec::new();
        for (i, d) in begin.disks.iter().enumerate() {
            let layer = points.point_path(baseline, i).map_err(|e| {
                ApiError::new(ErrorCode::StorageUnavailable, crate::error_chain(&e))
            })?;
            images.push((
                layer.display().to_string(),
                "qcow2".to_string(),
                d.virtual_size,
            ));
        }
        let mut compare = Compare::ready(baseline, begin.block_size, images, resync);
        if failback {
            compare = compare.for_failback();
        } else {
            // The replica hashes its point while the primary hashes its disks (§5.5), or takes
            // the hashes its copy made when a reverse just took in its own disks as that point.
            let identity = self
                .store
                .received_log(vm, baseline)?
                .map(|l| l.log_hash)
                .unwrap_or_default();
            // And the hashes sessions on this point made before (a paused resynchronization
            // keeps its progress, spec §13.6; one cut off by a restart of this daemon too); this
            // one records its own after them as it goes. The session it replaces stops first.
            self.stop_compare_hashing(vm);
            let sizes: Vec<u64> = begin.disks.iter().map(|d| d.virtual_size).collect();
            let tag = super::prehash::prefix_tag(baseline, &identity, begin.block_size, &sizes);
            // Reading what was kept (up to 16 bytes per block of every disk) and syncing the new
            // journal is file I/O: not on an async worker.
            let (data_dir, disks) = (self.data_dir.clone(), begin.disks.len());
            let (kept, (prefixes, journal)) = tokio::task::spawn_blocking(move || {
                (
                    super::prehash::take_kept(&data_dir, vm, baseline, &identity, disks),
                    super::prehash::Journal::take_and_open(&data_dir, vm, &tag, disks),
                )
            })
            .await
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
            compare.start_prehash(kept, prefixes, journal);
        }
        let compare = Arc::new(compare);
        self.remember_compare(vm, compare.clone());
        Ok(compare)
    }
}

#[cfg(test)]
mod tests {
    use crate::store::tests::temp_store;
    use uuid::Uuid;

    #[test]
    fn a_resync_mark_stays_until_its_apply_pruned_and_then_shows_before_the_next_log() {
        let (_d, store) = temp_store();
        let vm = Uuid::new_v4();
        store.mark_resync_point(vm, 5).expect("mark");
        // The resync's own log, applied again after a crash before its prune: still marked.
        assert_eq!(store.resync_points(vm, 5).expect("ask"), (true, false));
        assert_eq!(store.resync_points(vm, 5).expect("ask"), (true, false));
        // Its apply counted it applied, then a crash came before the prune: the next log sees it.
        assert_eq!(store.resync_points(vm, 6).expect("ask"), (false, true));
        store.forget_resync_points(vm, 6).expect("forget");
        assert_eq!(store.resync_points(vm, 6).expect("ask"), (false, false));
        assert_eq!(store.resync_points(vm, 7).expect("ask"), (false, false));
        // Another VM's marks are its own; a later mark is not "before".
        store.mark_resync_point(vm, 9).expect("mark");
        assert_eq!(store.resync_points(vm, 8).expect("ask"), (false, false));
        assert_eq!(
            store.resync_points(Uuid::new_v4(), 9).expect("ask"),
            (false, false)
        );
    }

    /// Logs a resynchronization drops, and a removed relationship, take their marks along: their
    /// sequences will be other logs'.
    #[test]
    fn dropped_logs_and_a_removed_relationship_leave_no_resync_mark() {
        let (_d, store) = temp_store();
        let vm = Uuid::new_v4();
        for (seq, applied) in [(4, 1), (5, 0), (6, 0)] {
            store
                .conn()
                .execute(
                    "INSERT INTO received_logs (vm, sequence, log_hash, log_bytes, point_time, applied)
                     VALUES (?1, ?2, 'h', 1, 1, ?3)",
                    rusqlite::params![vm.to_string(), seq, applied],
                )
                .expect("log");
            store.mark_resync_point(vm, seq).expect("mark");
        }
        assert_eq!(store.drop_unapplied(vm).expect("drop"), vec![5, 6]);
        // Mark 4 stays (its log was applied), 5 and 6 went with their logs.
        assert_eq!(store.resync_points(vm, 5).expect("ask"), (false, true));
        assert_eq!(store.resync_points(vm, 6).expect("ask"), (false, true));
        store.forget_resync_points(vm, 4).expect("forget");
        assert_eq!(store.resync_points(vm, 6).expect("ask"), (false, false));
        store.mark_resync_point(vm, 7).expect("mark");
        store.remove_relationship(vm).expect("remove");
        assert_eq!(store.resync_points(vm, 7).expect("ask"), (false, false));
        assert_eq!(store.resync_points(vm, 8).expect("ask"), (false, false));
    }
}
