//! What the recovery server remembers of its placeholders and their logs (docs/protocol.md §5):
//! the disk table and store root of each replica VM, the verified upload waiting for its commit,
//! and `received_logs`, the (sequence, hash) of every committed log, which answers re-sent logs
//! after pruning.

use rusqlite::{params, OptionalExtension};
use uuid::Uuid;
use wire::protocol::DiskSpec;

use crate::store::{Store, StoreError, StoreResult};

/// The replica side of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaVmRow {
    pub vm: Uuid,
    pub disks: Vec<DiskSpec>,
    /// The canonical storage location fixed at first binding; the point store lives in
    /// `<store_root>/<vm-guid>/`.
    pub store_root: String,
    pub resync_required: bool,
}

/// A log whose trailer verified, waiting for its commit (transfer state 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRow {
    pub vm: Uuid,
    pub sequence: u64,
    pub upload_id: Uuid,
    pub log_hash: String,
    pub log_bytes: u64,
    pub point_time: i64,
    pub point_type: u16,
}

/// What [`Store::commit_upload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    Yes,
    /// Nothing: the relationship is gone.
    NoRelationship,
    /// Nothing: the upload row is gone.
    NoUpload,
}

/// A committed log (transfer state 3, or 4 once applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedLog {
    pub vm: Uuid,
    pub sequence: u64,
    pub log_hash: String,
    pub log_bytes: u64,
    pub point_time: i64,
    pub applied: bool,
}

fn seq_sql(s: u64) -> StoreResult<i64> {
    i64::try_from(s).map_err(|_| StoreError::Corrupt(format!("sequence {s}")))
}

fn seq_rust(s: i64) -> rusqlite::Result<u64> {
    u64::try_from(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Integer, Box::new(e))
    })
}

fn uuid_col(s: String) -> rusqlite::Result<Uuid> {
    Uuid::parse_str(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

impl Store {
    /// Renames a VM (the primary renamed its VM; the replica follows).
    pub fn rename_vm(&self, vm: Uuid, name: &str) -> StoreResult<()> {
        self.conn().execute(
            "UPDATE vms SET name = ?2 WHERE id = ?1",
            params![vm.to_string(), name],
        )?;
        Ok(())
    }

    pub fn put_replica_vm(&self, r: &ReplicaVmRow) -> StoreResult<()> {
        let disks =
            serde_json::to_string(&r.disks).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn().execute(
            "INSERT INTO replica_vms (vm, disks, store_root, resync_required) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(vm) DO UPDATE SET disks = ?2, store_root = ?3, resync_required = ?4",
            params![r.vm.to_string(), disks, r.store_root, r.resync_required],
        )?;
        Ok(())
    }

    /// Every replica VM's id and store root.
    pub fn replica_stores(&self) -> StoreResult<Vec<(Uuid, String)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT vm, store_root FROM replica_vms")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (vm, root) = row?;
            if let Ok(vm) = Uuid::parse_str(&vm) {
                out.push((vm, root));
            }
        }
        Ok(out)
    }

    pub fn replica_vm(&self, vm: Uuid) -> StoreResult<Option<ReplicaVmRow>> {
        let row = self
            .conn()
            .query_row(
                "SELECT disks, store_root, resync_required FROM replica_vms WHERE vm = ?1",
                [vm.to_string()],
                |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((disks, store_root, resync_required)) = row else {
            return Ok(None);
        };
        let disks = serde_json::from_str(&disks).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(Some(ReplicaVmRow {
            vm,
            disks,
            store_root,
            resync_required,
        }))
    }

    /// Records a verified upload of `sequence`, replacing any earlier one of that sequence.
    pub fn put_upload(&self, u: &UploadRow) -> StoreResult<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO uploads (vm, sequence, upload_id, log_hash, log_bytes, point_time, point_type)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                u.vm.to_string(),
                seq_sql(u.sequence)?,
                u.upload_id.to_string(),
                u.log_hash,
                seq_sql(u.log_bytes)?,
                u.point_time,
                u.point_type
            ],
        )?;
        Ok(())
    }

    pub fn upload(&self, vm: Uuid, sequence: u64) -> StoreResult<Option<UploadRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT upload_id, log_hash, log_bytes, point_time, point_type FROM uploads
                 WHERE vm = ?1 AND sequence = ?2",
                params![vm.to_string(), seq_sql(sequence)?],
                |r| {
                    Ok(UploadRow {
                        vm,
                        sequence,
                        upload_id: uuid_col(r.get(0)?)?,
                        log_hash: r.get(1)?,
                        log_bytes: seq_rust(r.get(2)?)?,
                        point_time: r.get(3)?,
                        point_type: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    pub fn remove_uploads(&self, vm: Uuid) -> StoreResult<()> {
        self.conn()
            .execute("DELETE FROM uploads WHERE vm = ?1", [vm.to_string()])?;
        Ok(())
    }

    /// The commit: the upload row becomes a received log, and the relationship records the
    /// replication (its time unless a later one is recorded, of type `kind`; the time of an
    /// application-consistent point), in one transaction that writes nothing else of the
    /// relationship. False, and nothing written, when the upload row or the relationship is gone
    /// meanwhile (a removal, or a resynchronization's begin that dropped the upload).
    pub fn commit_upload(&self, u: &UploadRow, kind: u16) -> StoreResult<Committed> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let vm = u.vm.to_string();
        let time = u.point_time / 1_000_000;
        let recorded = tx.execute(
            "UPDATE relationships SET
                last_replication_type = CASE WHEN coalesce(last_replication_time, -1) <= ?2
                    THEN ?3 ELSE last_replication_type END,
                last_replication_time = max(coalesce(last_replication_time, -1), ?2),
                last_app_consistent_time = CASE WHEN ?4 THEN ?2 ELSE last_app_consistent_time END
             WHERE vm = ?1",
            params![vm, time, kind, u.point_type == 2],
        )?;
        let taken = tx.execute(
            "DELETE FROM uploads WHERE vm = ?1 AND sequence = ?2",
            params![vm, seq_sql(u.sequence)?],
        )?;
        if recorded != 1 {
            return Ok(Committed::NoRelationship);
        }
        if taken != 1 {
            return Ok(Committed::NoUpload);
        }
        tx.execute(
            "INSERT INTO received_logs (vm, sequence, log_hash, log_bytes, point_time, applied)
             VALUES (?1, ?2, ?3, ?4, ?5, 0)",
            params![
                u.vm.to_string(),
                seq_sql(u.sequence)?,
                u.log_hash,
                seq_sql(u.log_bytes)?,
                u.point_time
            ],
        )?;
        tx.commit()?;
        Ok(Committed::Yes)
    }

    /// Writes the settings, the primary's connection point and the authorization entry a `PUT`
    /// of the VM gives (and nothing else of the row); false when the relationship is gone.
    pub fn put_replica_binding(
        &self,
        vm: Uuid,
        settings: &vmreplica_core::settings::ReplicationSettings,
        primary_connection_point: &str,
        authorization_entry: &str,
    ) -> StoreResult<bool> {
        let n = self.conn().execute(
            "UPDATE relationships SET settings = ?2, primary_connection_point = ?3,
                authorization_entry = ?4 WHERE vm = ?1",
            params![
                vm.to_string(),
                serde_json::to_string(settings)?,
                primary_connection_point,
                authorization_entry
            ],
        )?;
        Ok(n == 1)
    }

    /// Binds replica `vm`, not bound yet, to authorization entry `entry`; whether it was unbound.
    pub fn bind_replica(&self, vm: Uuid, entry: &str) -> StoreResult<bool> {
        let n = self.conn().execute(
            "UPDATE relationships SET authorization_entry = ?2
             WHERE vm = ?1 AND authorization_entry IS NULL",
            params![vm.to_string(), entry],
        )?;
        Ok(n == 1)
    }

    /// Records a log applied without an upload (offline initial replication's import).
    pub fn record_applied_log(&self, l: &ReceivedLog) -> StoreResult<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO received_logs (vm, sequence, log_hash, log_bytes, point_time, applied)
             VALUES (?1, ?2, ?3, ?4, ?5, 1)",
            params![
                l.vm.to_string(),
                seq_sql(l.sequence)?,
                l.log_hash,
                seq_sql(l.log_bytes)?,
                l.point_time
            ],
        )?;
        Ok(())
    }

    pub fn received_log(&self, vm: Uuid, sequence: u64) -> StoreResult<Option<ReceivedLog>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT log_hash, log_bytes, point_time, applied FROM received_logs
                 WHERE vm = ?1 AND sequence = ?2",
                params![vm.to_string(), seq_sql(sequence)?],
                |r| {
                    Ok(ReceivedLog {
                        vm,
                        sequence,
                        log_hash: r.get(0)?,
                        log_bytes: seq_rust(r.get(1)?)?,
                        point_time: r.get(2)?,
                        applied: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// The last committed log of `vm`, if any.
    pub fn last_received_log(&self, vm: Uuid) -> StoreResult<Option<ReceivedLog>> {
        let seq: Option<i64> = self.conn().query_row(
            "SELECT MAX(sequence) FROM received_logs WHERE vm = ?1",
            [vm.to_string()],
            |r| r.get(0),
        )?;
        match seq {
            Some(s) => self.received_log(vm, seq_rust(s)?),
            None => Ok(None),
        }
    }

    /// Committed logs not applied yet, oldest first, of every VM.
    pub fn pending_apply(&self) -> StoreResult<Vec<ReceivedLog>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT vm, sequence, log_hash, log_bytes, point_time FROM received_logs
             WHERE applied = 0 ORDER BY vm, sequence",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ReceivedLog {
                vm: uuid_col(r.get(0)?)?,
                sequence: seq_rust(r.get(1)?)?,
                log_hash: r.get(2)?,
                log_bytes: seq_rust(r.get(3)?)?,
                point_time: r.get(4)?,
                applied: false,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn mark_applied(&self, vm: Uuid, sequence: u64) -> StoreResult<()> {
        self.conn().execute(
            "UPDATE received_logs SET applied = 1 WHERE vm = ?1 AND sequence = ?2",
            params![vm.to_string(), seq_sql(sequence)?],
        )?;
        Ok(())
    }

    /// The highest applied sequence of `vm` (0 = none).
    pub fn last_applied(&self, vm: Uuid) -> StoreResult<u64> {
        let seq: Option<i64> = self.conn().query_row(
            "SELECT MAX(sequence) FROM received_logs WHERE vm = ?1 AND applied = 1",
            [vm.to_string()],
            |r| r.get(0),
        )?;
        Ok(match seq {
            Some(s) => seq_rust(s)?,
            None => 0,
        })
    }
}
