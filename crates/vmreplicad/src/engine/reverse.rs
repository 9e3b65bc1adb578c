//! `ReverseReplicationRelationship` after a planned failover (spec §13.2 step 4; DESIGN §6): the
//! failed-over replica becomes the primary and the old primary its replica, and delta replication
//! goes on in the new direction from the planned point N, with no resynchronization.
//!
//! This host (the new primary) hashes its disks once (the overlay of point N, or the committed
//! images) into the block-hash maps its next delta is computed against, then asks the old primary
//! (`PUT vms/{vm}` with `reverse: {N, hash}`, docs/protocol.md §5.7) to take its own disks as
//! point N. Only when that answered does this host become the primary: chain at N, the next cycle
//! one interval later. The relationship's new settings are the `ReplicationSettingData` given,
//! whose `RecoveryConnectionPoint` names the old primary.

use std::path::{Path, PathBuf};

use disk::points::PointStore;

use disk::scan::hashmap;
use vmreplica_core::codes::ReturnCode;
use vmreplica_core::command::CommandError;
use vmreplica_core::state::ReplicationType;
use wire::protocol::{ReplicaVm, ReverseFrom, Route};

use super::failover::FailoverRow;
use super::initial::{disk_table, hash_images, log_disks};
use super::network::{put_vm, target};
use super::test_failover::refused;
use super::{EngineRequest, LocalEngine};
use crate::clock::now;
use crate::jobs::JobFailure;
use crate::replication::chain::ChainRow;
use crate::store::JobRow;

fn failed(message: impl Into<String>, action: &str) -> JobFailure {
    JobFailure::failed(message, action)
}

/// How long the old primary may take to answer a reverse: it reads its whole disks meanwhile.
pub const REVERSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// The maps of a committed planned failover's point, kept for a later reverse
/// (`tracking/<VMID>/disk<i>.<this>`).
pub const COMMITTED_BASELINE: &str = "failover-hashes";

/// `tracking/<VMID>/` of `vm`: its block-hash maps.
pub fn tracking_dir(data_dir: &Path, vm: uuid::Uuid) -> PathBuf {
    data_dir
        .join("tracking")
        .join(vm.to_string().to_uppercase())
}

impl LocalEngine {
    /// ReverseReplicationRelationship on a replica failed over to a planned point.
    pub(super) fn reverse(&self, req: EngineRequest) -> Result<JobRow, CommandError> {
        let settings = req.args.settings.clone().ok_or_else(|| {
            CommandError::new(
                ReturnCode::InvalidParameter,
                "ReplicationSettingData is required",
            )
        })?;
        let common: FailoverRow = self.store.failover(req.vm.id)?.ok_or_else(|| {
            refused(
                ReturnCode::InvalidState,
                format!("'{}' has not failed over", req.vm.name),
            )
        })?;
        if common.log_hash.is_empty() {
            return Err(refused(
                ReturnCode::InvalidState,
                format!(
                    "the log of recovery point {} of '{}' is not known; resynchronize instead",
                    common.point, req.vm.name
                ),
            ));
        }
        let (store, peers, data_dir) = (
            self.store.clone(),
            self.peers.clone(),
            self.data_dir.clone(),
        );
        self.spawn_with_outcome(
            req,
            None,
            "Reverse the replication",
            false,
            move |ctx, vm, rel, _, claim| async move {
                let _claim = claim;
                let mut reversed = rel.clone();
                reversed.settings = settings;
                reversed.primary_connection_point = Some(peers.host.clone());
                reversed.authorization_entry = None;

                // 1. The baseline of the next delta: point N itself (not the disks, which the
                // VM may have changed since the failover: those changes go with the next delta).
                let disks = disk_table(&vm)?;
                let tracking = tracking_dir(&data_dir, vm.id);
                let root = PathBuf::from(
                    store
                        .replica_vm(vm.id)?
                        .map(|r| r.store_root)
                        .unwrap_or_default(),
                );
                let mut maps: Vec<(PathBuf, PathBuf)> = Vec::new();
                let in_store = match PointStore::open(&root, vm.id).await {
                    Ok(points) => points.point_path(common.point, 0).ok().filter(|p| p.exists()).map(|_| points),
                    Err(_) => None,
                };
                match in_store {
                    // Failed over, not committed: the point is still in the store.
                    Some(points) => {
                        let layers = (0..disks.len())
                            .map(|i| points.point_path(common.point, i))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|e| failed(crate::error_chain(&e), "Check the replica's storage location."))?;
                        let layers: Vec<(String, String)> = layers
                            .iter()
                            .map(|l| (l.display().to_string(), "qcow2".to_string()))
                            .collect();
                        let tmps = hash_images(Some(&ctx), vm.id, &layers, log_disks(&disks), &tracking, "hashes", &data_dir).await?;
                        for (i, tmp) in tmps.into_iter().enumerate() {
                            maps.push((tmp, tracking.join(format!("disk{i}.hashes"))));
                        }
                    }
                    // Committed: the commit kept the point's maps.
                    None => {
                        for i in 0..disks.len() {
                            let kept = tracking.join(format!("disk{i}.{COMMITTED_BASELINE}"));
                            if !kept.is_file() {
                                return Err(failed(
                                    format!("the block-hash map of recovery point {} is missing", common.point),
                                    "Remove replication and enable it again in the new direction.",
                                ));
                            }
                            maps.push((kept, tracking.join(format!("disk{i}.hashes"))));
                        }
                    }
                }
                ctx.progress(60)?;
                let drop_maps = |maps: &[(PathBuf, PathBuf)]| {
                    for (tmp, _) in maps {
                        if tmp.extension().is_some_and(|e| e == "tmp") {
                            let _ = std::fs::remove_file(tmp);
                        }
                    }
                };

                // 2. The old primary takes its own disks as point N and becomes the replica.
                let target = target(&reversed);
                let mut put = put_vm(&vm, &reversed, &peers.host, 1)?;
                put.reverse = Some(ReverseFrom {
                    failback: false,
                    sequence: common.point,
                    log_hash: common.log_hash.clone(),
                    resync: false,
                });
                let answer = async {
                    let mut session = peers.connect(&target).await?;
                    session.require("reverse")?;
                    // The old primary reads its disks while it answers.
                    session
                        .json_within::<_, ReplicaVm>(Route::PutVm(vm.id), Some(&put), REVERSE_LIMIT)
                        .await
                        .map(|(_, r)| r)
                }
                .await;
                let replica = match answer {
                    Ok(r) => r,
                    Err(e) => {
                        drop_maps(&maps);
                        return Err(e.into_failure("making the old primary the replica"));
                    }
                };
                if replica.last_committed.sequence != common.point
                    || replica.last_committed.log_hash != common.log_hash
                {
                    drop_maps(&maps);
                    return Err(failed(
                        format!(
                            "{} answered with log {} as its last, not {}",
                            target.host, replica.last_committed.sequence, common.point
                        ),
                        "Resynchronize the VM.",
                    ));
                }

                // 3. This host is the primary from point N on.
                for (tmp, map) in &maps {
                    hashmap::commit(tmp, map)
                        .map_err(|e| failed(crate::error_chain(&e), "Check the data directory."))?;
                }
                store.put_chain(&ChainRow {
                    vm: vm.id,
                    last_sequence: common.point,
                    last_log_hash: common.log_hash.clone(),
                    next_due: now() + i64::from(reversed.settings.replication_interval),
                    retries: 0,
                    retry_at: 0,
                    last_error: None,
                })?;
                reversed.last_replication_type = ReplicationType::Planned.as_u16();
                tracing::info!(vm = %vm.id, point = common.point, replica = %target.host, "replication reversed");
                // The failover ends with the switch to primary, in one transaction: the apply task
                // never sees a replica that is not failed over in between.
                Ok(super::Done {
                    rel: reversed,
                    failover_over: true,
                    wake_apply: false,
                })
            },
        )
    }
}
