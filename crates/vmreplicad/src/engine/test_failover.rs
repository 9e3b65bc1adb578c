//! Test failover (spec §3.2 `TestReplicaSystem`, §13.4): a test VM `<name> - Test`
//! (ReplicationMode 3) whose disks are writable overlays of one retained recovery point of a
//! replica VM, created in O(1) (`PointStore::create_overlay`). The replica stays in its state and
//! keeps receiving, applying and pruning: the overlay pins its point, so what the test VM sees
//! never changes. One test VM per replica at a time; `DestroySystem` removes it with everything
//! written into it.
//!
//! The test VM and its `test_systems` row are written before the method answers, so
//! `ResultingSystem` names a VM that exists; the job then creates the overlay, and removes both
//! rows again if that fails.

use std::path::PathBuf;

use disk::points::{OverlayError, PointStore};
use rusqlite::{params, OptionalExtension};
use uuid::Uuid;
use vmreplica_core::codes::ReturnCode;
use vmreplica_core::command::{CommandError, PowerControl};
use vmreplica_core::state::ReplicationMode;

use super::{EngineRequest, LocalEngine};
use crate::clock::now;
use crate::jobs::JobFailure;
use crate::store::{JobRow, Store, StoreResult, VmRow};
use crate::wbem::objects::recovery_point_id;

/// A test VM and what it was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestSystemRow {
    pub test_vm: Uuid,
    pub replica_vm: Uuid,
    /// The overlay's name in the replica's point store.
    pub overlay: String,
    /// The recovery point the overlay is based on.
    pub point: u64,
    pub created: i64,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String, i64, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn into_row(raw: (String, String, String, i64, i64)) -> StoreResult<TestSystemRow> {
    let (test_vm, replica_vm, overlay, point, created) = raw;
    Ok(TestSystemRow {
        test_vm: crate::store::parse_uuid(&test_vm)?,
        replica_vm: crate::store::parse_uuid(&replica_vm)?,
        overlay,
        point: u64::try_from(point).unwrap_or(0),
        created,
    })
}

const COLUMNS: &str = "test_vm, replica_vm, overlay, point, created";

impl Store {
    /// Writes the test VM and its row in one transaction; fails if the replica has one already.
    pub fn create_test_system(&self, vm: &VmRow, t: &TestSystemRow) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        crate::store::insert_vm_in(&tx, vm)?;
        tx.execute(
            &format!("INSERT INTO test_systems ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
            params![
                t.test_vm.to_string(),
                t.replica_vm.to_string(),
                t.overlay,
                i64::try_from(t.point).unwrap_or(i64::MAX),
                t.created
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The test VM made from replica `replica`, if any.
    pub fn test_system_of(&self, replica: Uuid) -> StoreResult<Option<TestSystemRow>> {
        let raw = self
            .conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM test_systems WHERE replica_vm = ?1"),
                [replica.to_string()],
                row,
            )
            .optional()?;
        raw.map(into_row).transpose()
    }

    /// The row of test VM `test_vm`, if it is one.
    pub fn test_system(&self, test_vm: Uuid) -> StoreResult<Option<TestSystemRow>> {
        let raw = self
            .conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM test_systems WHERE test_vm = ?1"),
                [test_vm.to_string()],
                row,
            )
            .optional()?;
        raw.map(into_row).transpose()
    }

    pub fn test_systems(&self) -> StoreResult<Vec<TestSystemRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM test_systems"))?;
        let raw = stmt.query_map([], row)?.collect::<Result<Vec<_>, _>>()?;
        raw.into_iter().map(into_row).collect()
    }

    /// Deletes the test VM and its row.
    pub fn remove_test_system(&self, test_vm: Uuid) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM test_systems WHERE test_vm = ?1",
            [test_vm.to_string()],
        )?;
        tx.execute("DELETE FROM vms WHERE id = ?1", [test_vm.to_string()])?;
        tx.commit()?;
        Ok(())
    }

    /// `LastTestFailoverTime` of replica `vm`.
    pub fn last_test_failover(&self, vm: Uuid) -> StoreResult<Option<i64>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT time FROM test_failover_times WHERE vm = ?1",
                [vm.to_string()],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn set_last_test_failover(&self, vm: Uuid, time: i64) -> StoreResult<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO test_failover_times (vm, time) VALUES (?1, ?2)",
            params![vm.to_string(), time],
        )?;
        Ok(())
    }
}

pub(super) fn refused(code: ReturnCode, message: impl Into<String>) -> CommandError {
    CommandError::new(code, message)
}

/// The sequence of the point `InstanceID` names (or the sequence number itself, as the CLI
/// sends it), which must be one of `vm`'s.
pub(super) fn point_of(vm: Uuid, instance_id: &str, known: &[u64]) -> Result<u64, CommandError> {
    let number = instance_id.trim().parse::<u64>().ok();
    known
        .iter()
        .copied()
        .find(|&seq| {
            number == Some(seq) || recovery_point_id(vm, seq).eq_ignore_ascii_case(instance_id)
        })
        .ok_or_else(|| {
            refused(
                ReturnCode::InvalidParameter,
                format!("SnapshotSettingData '{instance_id}' is not a recovery point of this VM"),
            )
        })
}

/// The recovery point a failover or test failover uses: the one `wanted` names (its InstanceID or
/// sequence number), else the latest.
pub(super) fn choose_point(
    store: &Store,
    vm: &VmRow,
    wanted: Option<&str>,
) -> Result<u64, CommandError> {
    let known: Vec<u64> = store
        .recovery_points(vm.id)?
        .iter()
        .map(|p| p.sequence)
        .collect();
    match wanted {
        Some(id) => point_of(vm.id, id, &known),
        None => known.last().copied().ok_or_else(|| {
            refused(
                ReturnCode::InvalidState,
                format!("'{}' has no recovery point yet", vm.name),
            )
        }),
    }
}

impl LocalEngine {
    /// TestReplicaSystem on a replica VM.
    pub(super) fn test_failover(&self, req: EngineRequest) -> Result<JobRow, CommandError> {
        let EngineRequest {
            vm,
            args,
            transition,
            claim,
            ..
        } = req;
        let replica = self.store.replica_vm(vm.id)?.ok_or_else(|| {
            refused(
                ReturnCode::InvalidState,
                format!("'{}' holds no replicated disks on this host", vm.name),
            )
        })?;
        let point = choose_point(&self.store, &vm, args.recovery_point.as_deref())?;
        let name = format!("{} - Test", vm.name);
        if self.store.find_vm_by_name(&name)?.is_some() {
            return Err(refused(
                ReturnCode::SystemInUse,
                format!("a VM named '{name}' exists already"),
            ));
        }
        let test_id = Uuid::new_v4();
        let overlay = format!("test-{}", test_id.simple());
        let root = PathBuf::from(&replica.store_root);
        let disks = PointStore::overlay_disk_paths(&root, vm.id, &overlay, replica.disks.len())
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let test_vm = VmRow {
            id: test_id,
            name: name.clone(),
            disks,
            power: PowerControl::default(),
            mode: ReplicationMode::TestReplica.as_u16(),
        };
        let entry = TestSystemRow {
            test_vm: test_id,
            replica_vm: vm.id,
            overlay: overlay.clone(),
            point,
            created: now(),
        };
        self.store.create_test_system(&test_vm, &entry)?;
        let store = self.store.clone();
        let description = format!("Test failover of '{}' to recovery point {point}", vm.name);
        let spawned = self.jobs.spawn(
            transition.job_type,
            Some(vm.id),
            description,
            false,
            move |_ctx| async move {
                let _claim = claim;
                let made = async {
                    let points = PointStore::open(&root, vm.id).await?;
                    points.create_overlay(point, &overlay).await?;
                    Ok::<_, OverlayError>(())
                }
                .await;
                match made {
                    Ok(()) => {
                        store.set_last_test_failover(vm.id, now())?;
                        tracing::info!(vm = %vm.id, test_vm = %test_id, point, "test VM created");
                        Ok(())
                    }
                    Err(e) => {
                        store.remove_test_system(test_id)?;
                        Err(JobFailure::failed(
                            format!(
                                "cannot create the test VM's disks on recovery point {point}: {}",
                                crate::error_chain(&e)
                            ),
                            "Check the replica's storage location; pick another recovery point.",
                        ))
                    }
                }
            },
        );
        spawned.map_err(|e| {
            let _ = self.store.remove_test_system(test_id);
            CommandError::from(e)
        })
    }
}

/// DestroySystem of a test VM: deletes its overlay (and everything written into it) and the VM.
pub async fn destroy(store: &Store, test_vm: &VmRow) -> Result<(), CommandError> {
    let Some(entry) = store.test_system(test_vm.id)? else {
        return Err(refused(
            ReturnCode::InvalidState,
            format!(
                "'{}' is not a test VM; DestroySystem removes only VMs made by TestReplicaSystem",
                test_vm.name
            ),
        ));
    };
    if crate::power::enabled_state(&test_vm.power) == crate::power::ENABLED {
        return Err(refused(
            ReturnCode::InvalidState,
            format!("'{}' is running; turn it off first", test_vm.name),
        ));
    }
    if let Some(replica) = store.replica_vm(entry.replica_vm)? {
        let failed = |e: &dyn std::error::Error| {
            refused(
                ReturnCode::Failed,
                format!(
                    "cannot delete the test VM's disks: {}",
                    crate::error_chain(e)
                ),
            )
        };
        let points = PointStore::open(std::path::Path::new(&replica.store_root), entry.replica_vm)
            .await
            .map_err(|e| failed(&e))?;
        match points.remove_overlay(&entry.overlay).await {
            Ok(()) | Err(OverlayError::Unknown(_)) => {}
            Err(e) => return Err(failed(&e)),
        }
    }
    store.remove_test_system(test_vm.id)?;
    tracing::info!(test_vm = %test_vm.id, replica = %entry.replica_vm, "test VM removed");
    Ok(())
}
