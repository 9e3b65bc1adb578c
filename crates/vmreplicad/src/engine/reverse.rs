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

use std::path::PathBuf;

use disk::scan::hashmap;
use vmreplica_core::codes::ReturnCode;
use vmreplica_core::command::CommandError;
use vmreplica_core::state::ReplicationType;
use wire::protocol::{ReplicaVm, ReverseFrom, Route};
use wire::{Compression, DiskInfo, LogHeader, LogWriter, PointType};

use super::failover::FailoverRow;
use super::initial::{disk_table, scan_image};
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

                // 1. The baseline of the next delta: this host's disks, hashed once.
                let disks = disk_table(&vm)?;
                let tracking = data_dir
                    .join("tracking")
                    .join(vm.id.to_string().to_uppercase());
                std::fs::create_dir_all(&tracking)
                    .map_err(|e| failed(format!("{}: {e}", tracking.display()), "Check the data directory."))?;
                let header = LogHeader {
                    vm: vm.id,
                    relationship: 0,
                    sequence: common.point,
                    parent: 0,
                    point_time_micros: now() * 1_000_000,
                    point_type: PointType::Standard,
                    full_image: true,
                    disks: disks
                        .iter()
                        .enumerate()
                        .map(|(i, (_, size))| DiskInfo {
                            id: format!("disk{i}"),
                            virtual_size: *size,
                        })
                        .collect(),
                };
                let mut sink = LogWriter::new(std::io::sink(), header, Compression::Off)
                    .map_err(|e| failed(e.to_string(), "Report this as a bug."))?;
                let mut maps: Vec<(PathBuf, PathBuf)> = Vec::new();
                for (i, (format, _)) in disks.iter().enumerate() {
                    ctx.check_cancelled()?;
                    let map = tracking.join(format!("disk{i}.hashes"));
                    let tmp = scan_image(&vm.disks[i], format, i, None, &map, &data_dir, &mut sink).await?;
                    maps.push((tmp, map));
                }
                ctx.progress(60)?;

                // 2. The old primary takes its own disks as point N and becomes the replica.
                let target = target(&reversed);
                let mut put = put_vm(&vm, &reversed, &peers.host, 1)?;
                put.reverse = Some(ReverseFrom {
                    sequence: common.point,
                    log_hash: common.log_hash.clone(),
                    resync: false,
                });
                let answer = async {
                    let mut session = peers.connect(&target).await?;
                    session
                        .json::<_, ReplicaVm>(Route::PutVm(vm.id), Some(&put))
                        .await
                        .map(|(_, r)| r)
                }
                .await;
                let replica = match answer {
                    Ok(r) => r,
                    Err(e) => {
                        for (tmp, _) in &maps {
                            let _ = std::fs::remove_file(tmp);
                        }
                        return Err(e.into_failure("making the old primary the replica"));
                    }
                };
                if replica.last_committed.sequence != common.point
                    || replica.last_committed.log_hash != common.log_hash
                {
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
                store.remove_failover(vm.id)?;
                reversed.last_replication_type = ReplicationType::Planned.as_u16();
                tracing::info!(vm = %vm.id, point = common.point, replica = %target.host, "replication reversed");
                Ok(reversed)
            },
        )
    }
}
