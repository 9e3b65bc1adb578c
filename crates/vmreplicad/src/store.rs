//! The metadata store: one SQLite database per host (`<data-dir>/vmreplica.db`).
//!
//! It holds VMs and their disks, replication relationships with their settings, the recovery-server
//! settings, the authorization table and jobs. Everything the CIM classes show is read from here, so
//! every object survives a restart. Settings are stored as JSON of the core's typed settings.
//!
//! Locking: one connection behind a mutex; every public method is one short statement or one
//! transaction, so no caller ever holds the lock across an await point.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Row};
use uuid::Uuid;
use vmreplica_core::command::PowerControl;
use vmreplica_core::settings::{AuthorizationEntry, ReplicationSettings, ServiceSettings};
use vmreplica_core::state::{ReplicationMode, ReplicationState};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata database error")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored JSON could not be read")]
    Json(#[from] serde_json::Error),
    #[error("stored value is invalid: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A VM as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRow {
    pub id: Uuid,
    pub name: String,
    pub disks: Vec<String>,
    pub power: PowerControl,
    pub mode: u16,
}

/// The primary relationship (index 0) of a VM.
#[derive(Debug, Clone, PartialEq)]
pub struct RelationshipRow {
    pub vm: Uuid,
    pub state: u16,
    pub settings: ReplicationSettings,
    pub primary_connection_point: Option<String>,
    pub authorization_entry: Option<String>,
    pub last_replication_time: Option<i64>,
    pub last_apply_time: Option<i64>,
    pub last_app_consistent_time: Option<i64>,
    pub last_replication_type: u16,
    pub failed_over_type: u16,
    pub statistics_reset_time: i64,
}

impl RelationshipRow {
    /// A relationship in state 0 with default settings, nothing replicated yet, and a statistics
    /// window starting at `now`.
    pub fn new(vm: Uuid, now: i64) -> RelationshipRow {
        RelationshipRow {
            vm,
            state: 0,
            settings: ReplicationSettings::default(),
            primary_connection_point: None,
            authorization_entry: None,
            last_replication_time: None,
            last_apply_time: None,
            last_app_consistent_time: None,
            last_replication_type: 0,
            failed_over_type: 0,
            statistics_reset_time: now,
        }
    }

    /// Takes from `done` every field that differs from `given` (what a job changed of the row it
    /// was given) and keeps its own elsewhere (what others wrote meanwhile: an apply's time, a
    /// cycle's replication). The replication's time and type go together; an apply's time only
    /// moves forward.
    pub fn rebase(&mut self, given: &RelationshipRow, done: &RelationshipRow) {
        // Every field named, so a new one cannot be forgotten here.
        let RelationshipRow {
            vm: _,
            state,
            settings,
            primary_connection_point,
            authorization_entry,
            last_replication_time,
            last_apply_time,
            last_app_consistent_time,
            last_replication_type,
            failed_over_type,
            statistics_reset_time,
        } = done;
        fn take<T: PartialEq + Clone>(mine: &mut T, given: &T, done: &T) {
            if given != done {
                *mine = done.clone();
            }
        }
        take(&mut self.state, &given.state, state);
        take(&mut self.settings, &given.settings, settings);
        take(
            &mut self.primary_connection_point,
            &given.primary_connection_point,
            primary_connection_point,
        );
        take(
            &mut self.authorization_entry,
            &given.authorization_entry,
            authorization_entry,
        );
        // The replication's time and type are one: both or neither (write_relationship still
        // keeps a later time from the row).
        if (last_replication_time, last_replication_type)
            != (&given.last_replication_time, &given.last_replication_type)
        {
            self.last_replication_time = *last_replication_time;
            self.last_replication_type = *last_replication_type;
        }
        // An apply's time never goes back to one the job read before an apply since.
        if last_apply_time != &given.last_apply_time && *last_apply_time > self.last_apply_time {
            self.last_apply_time = *last_apply_time;
        }
        take(
            &mut self.last_app_consistent_time,
            &given.last_app_consistent_time,
            last_app_consistent_time,
        );
        take(
            &mut self.failed_over_type,
            &given.failed_over_type,
            failed_over_type,
        );
        take(
            &mut self.statistics_reset_time,
            &given.statistics_reset_time,
            statistics_reset_time,
        );
    }
}

/// One retained recovery point of a replica VM: the catalog row that `Msvm_VirtualSystemSettingData`
/// recovery snapshots show. The point store's files are the truth; this mirrors them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointRow {
    pub vm: Uuid,
    pub sequence: u64,
    pub time_micros: i64,
    /// Standard, ApplicationConsistent or PlannedFailover.
    pub kind: String,
    pub full_image: bool,
    pub log_hash: String,
}

/// One `Msvm_Error` recorded on a failed job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobErrorInfo {
    pub message: String,
    pub recommended_action: String,
    /// `Msvm_Error.ErrorType` (4 Software, 10 Unsupported Operation, ...).
    pub error_type: u16,
}

/// An `Msvm_ConcreteJob` as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub job_type: u16,
    pub state: u16,
    pub percent: u16,
    pub error_code: u16,
    pub error_description: Option<String>,
    pub errors: Vec<JobErrorInfo>,
    pub vm: Option<Uuid>,
    pub description: String,
    pub time_submitted: i64,
    pub start_time: Option<i64>,
    pub time_finished: Option<i64>,
    pub last_change: i64,
    pub cancellable: bool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE COLLATE NOCASE, disks TEXT NOT NULL,
    power TEXT NOT NULL, mode INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS relationships (
    vm TEXT PRIMARY KEY REFERENCES vms(id), state INTEGER NOT NULL, settings TEXT NOT NULL,
    primary_connection_point TEXT, authorization_entry TEXT,
    last_replication_time INTEGER, last_apply_time INTEGER, last_app_consistent_time INTEGER,
    last_replication_type INTEGER NOT NULL DEFAULT 0, failed_over_type INTEGER NOT NULL DEFAULT 0,
    statistics_reset_time INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS service_settings (id INTEGER PRIMARY KEY CHECK (id = 1), settings TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS host_settings (id INTEGER PRIMARY KEY CHECK (id = 1), settings TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS authorization_entries (
    host TEXT PRIMARY KEY COLLATE NOCASE, trust_group TEXT NOT NULL, storage_location TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS recovery_points (
    vm TEXT NOT NULL REFERENCES vms(id), sequence INTEGER NOT NULL, time_micros INTEGER NOT NULL,
    kind TEXT NOT NULL, full_image INTEGER NOT NULL, log_hash TEXT NOT NULL,
    PRIMARY KEY (vm, sequence));
CREATE TABLE IF NOT EXISTS replica_vms (
    vm TEXT PRIMARY KEY REFERENCES vms(id), disks TEXT NOT NULL, store_root TEXT NOT NULL,
    resync_required INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS uploads (
    vm TEXT NOT NULL, sequence INTEGER NOT NULL, upload_id TEXT NOT NULL, log_hash TEXT NOT NULL,
    log_bytes INTEGER NOT NULL, point_time INTEGER NOT NULL, point_type INTEGER NOT NULL,
    PRIMARY KEY (vm, sequence));
CREATE TABLE IF NOT EXISTS received_logs (
    vm TEXT NOT NULL, sequence INTEGER NOT NULL, log_hash TEXT NOT NULL, log_bytes INTEGER NOT NULL,
    point_time INTEGER NOT NULL, applied INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (vm, sequence));
CREATE TABLE IF NOT EXISTS primary_chains (
    vm TEXT PRIMARY KEY, last_sequence INTEGER NOT NULL, last_log_hash TEXT NOT NULL,
    next_due INTEGER NOT NULL, retries INTEGER NOT NULL DEFAULT 0, retry_at INTEGER NOT NULL DEFAULT 0,
    last_error TEXT);
CREATE TABLE IF NOT EXISTS replication_stats (
    vm TEXT PRIMARY KEY, success INTEGER NOT NULL DEFAULT 0, size INTEGER NOT NULL DEFAULT 0,
    max_size INTEGER NOT NULL DEFAULT 0, latency INTEGER NOT NULL DEFAULT 0,
    max_latency INTEGER NOT NULL DEFAULT 0, misses INTEGER NOT NULL DEFAULT 0,
    network_failures INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0,
    pending_size INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS test_systems (
    test_vm TEXT PRIMARY KEY REFERENCES vms(id), replica_vm TEXT NOT NULL UNIQUE REFERENCES vms(id),
    overlay TEXT NOT NULL, point INTEGER NOT NULL, created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS failovers (
    vm TEXT PRIMARY KEY REFERENCES vms(id), point INTEGER NOT NULL, log_hash TEXT NOT NULL,
    disks_before TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS resync_points (
    vm TEXT NOT NULL, sequence INTEGER NOT NULL, PRIMARY KEY (vm, sequence));
CREATE TABLE IF NOT EXISTS sent_blocks (
    vm TEXT NOT NULL, sequence INTEGER NOT NULL, disk INTEGER NOT NULL, runs BLOB NOT NULL,
    time INTEGER NOT NULL, PRIMARY KEY (vm, sequence, disk));
CREATE TABLE IF NOT EXISTS job_restores (
    job TEXT PRIMARY KEY, vm TEXT NOT NULL, state INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS test_failover_times (vm TEXT PRIMARY KEY, time INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS suspended_initial_replications (vm TEXT PRIMARY KEY, time INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS failover_network (
    vm TEXT NOT NULL, adapter INTEGER NOT NULL, protocol INTEGER NOT NULL, settings TEXT NOT NULL,
    PRIMARY KEY (vm, adapter, protocol));
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, job_type INTEGER NOT NULL, state INTEGER NOT NULL, percent INTEGER NOT NULL,
    error_code INTEGER NOT NULL, error_description TEXT, errors TEXT NOT NULL, vm TEXT,
    description TEXT NOT NULL, time_submitted INTEGER NOT NULL, start_time INTEGER,
    time_finished INTEGER, last_change INTEGER NOT NULL, cancellable INTEGER NOT NULL);
";

pub struct Store {
    conn: Mutex<Connection>,
    /// Bumped after every write of a job, for `jobs::watch` (only this daemon writes the file).
    jobs_changed: tokio::sync::watch::Sender<u64>,
}

impl Store {
    /// Opens (creating if needed) the database file and its schema.
    pub fn open(path: &Path) -> StoreResult<Store> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        // A relationship removed while its cycle was in flight loses its chain once the cycle
        // ended; a daemon that stopped meanwhile left it (and its counters): they go now.
        conn.execute_batch(
            "DELETE FROM primary_chains WHERE vm NOT IN (SELECT vm FROM relationships);
             DELETE FROM replication_stats WHERE vm NOT IN (SELECT vm FROM relationships);",
        )?;
        Ok(Store {
            conn: Mutex::new(conn),
            jobs_changed: tokio::sync::watch::Sender::new(0),
        })
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (statements are atomic),
        // so a poisoned lock is still safe to use.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // ---- VMs ----

    pub fn insert_vm(&self, vm: &VmRow) -> StoreResult<()> {
        insert_vm_in(&self.conn(), vm)
    }

    pub fn delete_vm(&self, vm: Uuid) -> StoreResult<()> {
        self.conn()
            .execute("DELETE FROM vms WHERE id = ?1", [vm.to_string()])?;
        Ok(())
    }

    pub fn set_vm_power(&self, vm: Uuid, power: &PowerControl) -> StoreResult<()> {
        self.conn().execute(
            "UPDATE vms SET power = ?2 WHERE id = ?1",
            params![vm.to_string(), serde_json::to_string(power)?],
        )?;
        Ok(())
    }

    /// Deletes every row of `vm` in `tables` (each with a `vm` column), in one transaction.
    pub(crate) fn delete_vm_rows(&self, vm: Uuid, tables: &[&str]) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for table in tables {
            tx.execute(
                &format!("DELETE FROM {table} WHERE vm = ?1"),
                [vm.to_string()],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn list_vms(&self) -> StoreResult<Vec<VmRow>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT id, name, disks, power, mode FROM vms ORDER BY name")?;
        let rows = stmt.query_map([], raw_vm)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(RawVm::into_row).collect()
    }

    pub fn get_vm(&self, id: Uuid) -> StoreResult<Option<VmRow>> {
        let raw = self
            .conn()
            .query_row(
                "SELECT id, name, disks, power, mode FROM vms WHERE id = ?1",
                [id.to_string()],
                raw_vm,
            )
            .optional()?;
        raw.map(RawVm::into_row).transpose()
    }

    pub fn find_vm_by_name(&self, name: &str) -> StoreResult<Option<VmRow>> {
        let raw = self
            .conn()
            .query_row(
                "SELECT id, name, disks, power, mode FROM vms WHERE name = ?1",
                [name],
                raw_vm,
            )
            .optional()?;
        raw.map(RawVm::into_row).transpose()
    }

    // ---- relationships ----

    pub fn get_relationship(&self, vm: Uuid) -> StoreResult<Option<RelationshipRow>> {
        read_relationship(&self.conn(), vm)
    }

    /// Changes `vm`'s relationship as `change` says, on the row as it is (read and written in one
    /// transaction, so a write of another column meanwhile, an apply's or a commit's, is kept),
    /// and sets the VM's mode to `mode` if given. False when there is no relationship.
    pub fn update_relationship(
        &self,
        vm: Uuid,
        mode: Option<u16>,
        change: impl FnOnce(&mut RelationshipRow),
    ) -> StoreResult<bool> {
        self.update_relationship_and(vm, mode, change, |_| Ok(()))
    }

    /// [`Store::update_relationship`], and `also` in the same transaction (when there is a
    /// relationship): a stop or a reader sees both or neither.
    pub fn update_relationship_and(
        &self,
        vm: Uuid,
        mode: Option<u16>,
        change: impl FnOnce(&mut RelationshipRow),
        also: impl FnOnce(&rusqlite::Transaction) -> StoreResult<()>,
    ) -> StoreResult<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let Some(mut rel) = read_relationship(&tx, vm)? else {
            return Ok(false);
        };
        change(&mut rel);
        also(&tx)?;
        let mode = match mode {
            Some(m) => m,
            None => tx.query_row(
                "SELECT mode FROM vms WHERE id = ?1",
                [vm.to_string()],
                |r| r.get(0),
            )?,
        };
        write_relationship(&tx, &rel, mode)?;
        tx.commit()?;
        Ok(true)
    }

    /// Writes the relationship and the VM's mode in one transaction.
    ///
    /// `last_replication_time` (with its `last_replication_type`) never goes back: a row read
    /// before a cycle recorded a later replication ([`Store::note_replication`]) and written after
    /// it keeps the later one.
    pub fn put_relationship(&self, rel: &RelationshipRow, mode: u16) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        write_relationship(&tx, rel, mode)?;
        tx.commit()?;
        Ok(())
    }

    /// A reverse's switch of `rel.vm` to a replica, in one transaction: the VM has no disks of its
    /// own any more, its relationship and mode are `rel`'s and `mode`, a job of it cut off by a stop
    /// restores `restore` (if given), and its chain and statistics as a primary are forgotten. A
    /// stop comes before all of it or after all of it.
    pub fn switch_to_replica(
        &self,
        rel: &RelationshipRow,
        mode: u16,
        restore: Option<u16>,
    ) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let vm = rel.vm.to_string();
        tx.execute("UPDATE vms SET disks = '[]' WHERE id = ?1", [&vm])?;
        write_relationship(&tx, rel, mode)?;
        if let Some(state) = restore {
            tx.execute(
                "UPDATE job_restores SET state = ?2 WHERE vm = ?1",
                params![vm, state],
            )?;
        }
        tx.execute("DELETE FROM primary_chains WHERE vm = ?1", [&vm])?;
        tx.execute("DELETE FROM replication_stats WHERE vm = ?1", [&vm])?;
        tx.commit()?;
        Ok(())
    }

    /// Sets `vm`'s relationship's state, and nothing else of it (no row: nothing).
    pub fn set_state(&self, vm: Uuid, state: u16) -> StoreResult<()> {
        self.conn().execute(
            "UPDATE relationships SET state = ?2 WHERE vm = ?1",
            params![vm.to_string(), state],
        )?;
        Ok(())
    }

    /// Moves `vm`'s relationship from state `from` to `to` in one statement (no write of a row
    /// read before can come between); false when it was not in `from`.
    pub fn move_state(&self, vm: Uuid, from: u16, to: u16) -> StoreResult<bool> {
        let n = self.conn().execute(
            "UPDATE relationships SET state = ?3 WHERE vm = ?1 AND state = ?2",
            params![vm.to_string(), from, to],
        )?;
        Ok(n == 1)
    }

    /// Records an apply at `time` on `vm`'s relationship and moves its state from `from` to `to`,
    /// in one statement that changes nothing else; false when it is no longer in `from`.
    pub fn note_apply(&self, vm: Uuid, from: u16, to: u16, time: i64) -> StoreResult<bool> {
        let n = self.conn().execute(
            "UPDATE relationships SET state = ?3, last_apply_time = ?4 WHERE vm = ?1 AND state = ?2",
            params![vm.to_string(), from, to, time],
        )?;
        Ok(n == 1)
    }

    /// Records a replication at `time` (of type `kind`) unless a later one is recorded, or the
    /// relationship is not past its initial replication (0, 1, 2: one removed and enabled again
    /// while the log was in flight): one statement, so it needs no claim on the VM and no
    /// command's write of the row loses it.
    pub fn note_replication(&self, vm: Uuid, time: i64, kind: u16) -> StoreResult<()> {
        self.conn().execute(
            "UPDATE relationships SET last_replication_time = ?2, last_replication_type = ?3
             WHERE vm = ?1 AND coalesce(last_replication_time, -1) <= ?2
                AND state NOT IN (0, 1, 2)",
            params![vm.to_string(), time, kind],
        )?;
        Ok(())
    }

    /// Removes the relationship and sets the VM's mode to None, in one transaction; the logs it
    /// received and had not applied go with it (never applied now: only a replica's are, and the
    /// chain they continue ends here). Returns their sequences (their files are the caller's).
    pub fn remove_relationship(&self, vm: Uuid) -> StoreResult<Vec<u64>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let dropped = crate::replication::resync::drop_unapplied_in(&tx, vm)?;
        tx.execute("DELETE FROM relationships WHERE vm = ?1", [vm.to_string()])?;
        // A failover of it is over too: a later relationship of the VM (a seeded replication, a
        // resynchronization) must not take itself for that failover's reverse.
        tx.execute("DELETE FROM failovers WHERE vm = ?1", [vm.to_string()])?;
        // Marks of resynchronization logs: a later chain numbers its logs from 1 again.
        tx.execute("DELETE FROM resync_points WHERE vm = ?1", [vm.to_string()])?;
        tx.execute(
            "DELETE FROM suspended_initial_replications WHERE vm = ?1",
            [vm.to_string()],
        )?;
        tx.execute("UPDATE vms SET mode = 0 WHERE id = ?1", [vm.to_string()])?;
        tx.commit()?;
        Ok(dropped)
    }

    // ---- recovery-server settings and authorization ----

    pub fn service_settings(&self) -> StoreResult<ServiceSettings> {
        let text: Option<String> = self
            .conn()
            .query_row(
                "SELECT settings FROM service_settings WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        match text {
            Some(text) => Ok(serde_json::from_str(&text)?),
            None => Ok(ServiceSettings::default()),
        }
    }

    pub fn put_service_settings(&self, settings: &ServiceSettings) -> StoreResult<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO service_settings (id, settings) VALUES (1, ?1)",
            [serde_json::to_string(settings)?],
        )?;
        Ok(())
    }

    /// The host limits `vmreplica host set` stored, if any.
    pub fn host_settings(&self) -> StoreResult<Option<vmreplica_core::command::HostSettings>> {
        let text: Option<String> = self
            .conn()
            .query_row("SELECT settings FROM host_settings WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(text.map(|t| serde_json::from_str(&t)).transpose()?)
    }

    /// Stores host limits (None: forgets them).
    pub fn put_host_settings(
        &self,
        settings: Option<&vmreplica_core::command::HostSettings>,
    ) -> StoreResult<()> {
        match settings {
            Some(s) => self.conn().execute(
                "INSERT OR REPLACE INTO host_settings (id, settings) VALUES (1, ?1)",
                [serde_json::to_string(s)?],
            )?,
            None => self
                .conn()
                .execute("DELETE FROM host_settings WHERE id = 1", [])?,
        };
        Ok(())
    }

    /// The failover IP settings of `vm` (SetFailoverNetworkAdapterSettings), by adapter and
    /// protocol.
    pub fn failover_network(
        &self,
        vm: Uuid,
    ) -> StoreResult<Vec<vmreplica_core::settings::FailoverNetworkSettings>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT settings FROM failover_network WHERE vm = ?1 ORDER BY adapter, protocol",
        )?;
        let rows = stmt
            .query_map([vm.to_string()], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows
            .iter()
            .map(|t| serde_json::from_str(t))
            .collect::<Result<_, _>>()?)
    }

    /// Stores each of `settings` for its adapter and protocol, in one transaction; settings that
    /// ask for nothing (DHCP, no addresses) clear what was stored for them.
    pub fn put_failover_network(
        &self,
        vm: Uuid,
        settings: &[vmreplica_core::settings::FailoverNetworkSettings],
    ) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for s in settings {
            let key = params![vm.to_string(), s.adapter, s.protocol_if_type];
            if s.is_clear() {
                tx.execute(
                    "DELETE FROM failover_network WHERE vm = ?1 AND adapter = ?2 AND protocol = ?3",
                    key,
                )?;
            } else {
                tx.execute(
                    "INSERT OR REPLACE INTO failover_network (vm, adapter, protocol, settings) \
                     VALUES (?1, ?2, ?3, ?4)",
                    params![
                        vm.to_string(),
                        s.adapter,
                        s.protocol_if_type,
                        serde_json::to_string(s)?
                    ],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn authorization_entries(&self) -> StoreResult<Vec<AuthorizationEntry>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT host, trust_group, storage_location FROM authorization_entries ORDER BY host",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(AuthorizationEntry {
                allowed_primary_host_system: r.get(0)?,
                trust_group: r.get(1)?,
                replica_storage_location: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Inserts a new entry; returns false when an entry for that host already exists.
    pub fn add_authorization_entry(&self, e: &AuthorizationEntry) -> StoreResult<bool> {
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO authorization_entries (host, trust_group, storage_location)
             VALUES (?1, ?2, ?3)",
            params![
                e.allowed_primary_host_system,
                e.trust_group,
                e.replica_storage_location
            ],
        )?;
        Ok(n == 1)
    }

    /// Changes an existing entry; returns false when there is none for that host.
    pub fn modify_authorization_entry(&self, e: &AuthorizationEntry) -> StoreResult<bool> {
        let n = self.conn().execute(
            "UPDATE authorization_entries SET trust_group = ?2, storage_location = ?3 WHERE host = ?1",
            params![e.allowed_primary_host_system, e.trust_group, e.replica_storage_location],
        )?;
        Ok(n == 1)
    }

    /// Deletes an entry and, in the same transaction, moves the relationships of `bound` VMs whose
    /// state is one of `from` to `to`. Returns false (and changes nothing) when there was no entry.
    pub fn remove_authorization_entry(
        &self,
        host: &str,
        bound: &[Uuid],
        from: &[u16],
        to: u16,
    ) -> StoreResult<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if tx.execute("DELETE FROM authorization_entries WHERE host = ?1", [host])? == 0 {
            return Ok(false);
        }
        for vm in bound {
            for state in from {
                tx.execute(
                    "UPDATE relationships SET state = ?3 WHERE vm = ?1 AND state = ?2",
                    params![vm.to_string(), state, to],
                )?;
            }
        }
        tx.commit()?;
        Ok(true)
    }

    // ---- recovery points ----

    /// Replaces the catalog rows of `vm` with `points` (the store's current list).
    pub fn put_recovery_points(&self, vm: Uuid, points: &[PointRow]) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM recovery_points WHERE vm = ?1",
            [vm.to_string()],
        )?;
        for p in points {
            let seq = i64::try_from(p.sequence)
                .map_err(|_| StoreError::Corrupt(format!("sequence {}", p.sequence)))?;
            tx.execute(
                "INSERT INTO recovery_points (vm, sequence, time_micros, kind, full_image, log_hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![vm.to_string(), seq, p.time_micros, p.kind, p.full_image, p.log_hash],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn recovery_points(&self, vm: Uuid) -> StoreResult<Vec<PointRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT sequence, time_micros, kind, full_image, log_hash FROM recovery_points
             WHERE vm = ?1 ORDER BY sequence",
        )?;
        let rows = stmt.query_map([vm.to_string()], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, time_micros, kind, full_image, log_hash) = row?;
            let sequence =
                u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("sequence {seq}")))?;
            out.push(PointRow {
                vm,
                sequence,
                time_micros,
                kind,
                full_image,
                log_hash,
            });
        }
        Ok(out)
    }

    // ---- jobs ----

    /// Records the state a relationship returns to if job `job` is cut off by a stop of the daemon.
    pub fn put_job_restore(&self, job: &str, vm: Uuid, state: u16) -> StoreResult<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO job_restores (job, vm, state) VALUES (?1, ?2, ?3)",
            params![job, vm.to_string(), state],
        )?;
        Ok(())
    }

    /// Marks (or unmarks) `vm`'s network initial replication as suspended while it ran: a resume
    /// runs it again (`service::relationships`).
    pub fn set_initial_suspended(&self, vm: Uuid, suspended: bool) -> StoreResult<()> {
        let conn = self.conn();
        if suspended {
            conn.execute(
                "INSERT OR REPLACE INTO suspended_initial_replications (vm, time) VALUES (?1, ?2)",
                params![vm.to_string(), crate::clock::now()],
            )?;
        } else {
            conn.execute(
                "DELETE FROM suspended_initial_replications WHERE vm = ?1",
                [vm.to_string()],
            )?;
        }
        Ok(())
    }

    /// The suspend of a network initial replication whose job ended (`service::relationships`),
    /// in one transaction: from 1 (the job stopped) to 7, remembered as suspended; from 3 (it
    /// completed meanwhile) to 7, an ordinary suspend. Returns the state found (None without a
    /// relationship); any other is left as it is.
    pub fn suspend_ended_initial_replication(&self, vm: Uuid) -> StoreResult<Option<u16>> {
        let (ready, replicating) = (
            ReplicationState::ReadyForReplication.as_u16(),
            ReplicationState::Replicating.as_u16(),
        );
        let found = std::cell::Cell::new(None);
        self.update_relationship_and(
            vm,
            None,
            |rel| {
                found.set(Some(rel.state));
                if rel.state == ready || rel.state == replicating {
                    rel.state = ReplicationState::Suspended.as_u16();
                }
            },
            |tx| {
                if found.get() == Some(ready) {
                    tx.execute(
                        "INSERT OR REPLACE INTO suspended_initial_replications (vm, time) VALUES (?1, ?2)",
                        params![vm.to_string(), crate::clock::now()],
                    )?;
                }
                Ok(())
            },
        )?;
        Ok(found.get())
    }

    /// True when `vm`'s network initial replication was suspended while it ran.
    pub fn initial_suspended(&self, vm: Uuid) -> StoreResult<bool> {
        Ok(self.conn().query_row(
            "SELECT EXISTS (SELECT 1 FROM suspended_initial_replications WHERE vm = ?1)",
            [vm.to_string()],
            |r| r.get(0),
        )?)
    }

    /// Forgets the restore record of job `job` (it ended).
    pub fn forget_job_restore(&self, job: &str) -> StoreResult<()> {
        self.conn()
            .execute("DELETE FROM job_restores WHERE job = ?1", [job])?;
        Ok(())
    }

    /// At start: puts back the state of every relationship whose job the last stop cut off (its
    /// job is not finished), and forgets every record. Returns the VMs restored.
    ///
    /// A relationship whose failback's log arrived is kept: in FailbackComplete (14), which only
    /// the apply of that log sets, or still in 13 with that log committed and not yet applied
    /// (a log marked as a resynchronization's, as the failback's is: the apply task moves 13 to
    /// 14 at it; an ordinary delta's would leave 13 for good). That log is what the InitiateFailback job cut off there
    /// was waiting for; its restore state 9 would have the failback run again, and the replica
    /// refuse the new primary's deltas until then.
    pub fn restore_interrupted_states(&self) -> StoreResult<Vec<Uuid>> {
        let rows: Vec<(String, String, u16)> = {
            let conn = self.conn();
            let mut stmt = conn.prepare("SELECT job, vm, state FROM job_restores")?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            rows
        };
        let mut restored = Vec::new();
        for (job, vm, state) in rows {
            let unfinished = self.get_job(&job)?.is_some_and(|j| {
                !vmreplica_core::job::JobState::from_u16(j.state).is_some_and(|s| s.is_terminal())
            });
            let vm = parse_uuid(&vm)?;
            if unfinished {
                if let (Some(v), Some(mut rel)) = (self.get_vm(vm)?, self.get_relationship(vm)?) {
                    let arrived = rel.state == ReplicationState::FailbackComplete.as_u16()
                        || (rel.state == ReplicationState::FailbackInProgress.as_u16()
                            && v.mode == ReplicationMode::Replica.as_u16()
                            && self.conn().query_row(
                                "SELECT EXISTS (SELECT 1 FROM received_logs r JOIN resync_points p
                                    ON p.vm = r.vm AND p.sequence = r.sequence
                                    WHERE r.vm = ?1 AND r.applied = 0)",
                                [vm.to_string()],
                                |r| r.get::<_, bool>(0),
                            )?);
                    if arrived {
                        continue;
                    }
                    rel.state = state;
                    self.put_relationship(&rel, v.mode)?;
                    restored.push(vm);
                }
            }
        }
        self.conn().execute("DELETE FROM job_restores", [])?;
        Ok(restored)
    }

    pub fn put_job(&self, job: &JobRow) -> StoreResult<()> {
        self.conn().execute(
            "INSERT INTO jobs (id, job_type, state, percent, error_code, error_description,
                errors, vm, description, time_submitted, start_time, time_finished, last_change, cancellable)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
             ON CONFLICT(id) DO UPDATE SET job_type = excluded.job_type, state = excluded.state,
                percent = excluded.percent, error_code = excluded.error_code,
                error_description = excluded.error_description, errors = excluded.errors, vm = excluded.vm,
                description = excluded.description, time_submitted = excluded.time_submitted,
                start_time = excluded.start_time, time_finished = excluded.time_finished,
                last_change = excluded.last_change, cancellable = excluded.cancellable",
            params![
                job.id,
                job.job_type,
                job.state,
                job.percent,
                job.error_code,
                job.error_description,
                serde_json::to_string(&job.errors)?,
                job.vm.map(|v| v.to_string()),
                job.description,
                job.time_submitted,
                job.start_time,
                job.time_finished,
                job.last_change,
                job.cancellable
            ],
        )?;
        self.jobs_changed.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// Changes after each write of a job.
    pub fn job_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.jobs_changed.subscribe()
    }

    /// Sets a running job's PercentComplete, Description (when given) and last change, only while it
    /// is still running (4): a progress report racing the job's end never brings it back.
    pub fn update_running_job(
        &self,
        id: &str,
        percent: Option<u16>,
        description: Option<&str>,
        at: i64,
    ) -> StoreResult<()> {
        let n = self.conn().execute(
            "UPDATE jobs SET percent = coalesce(?2, percent), description = coalesce(?3, description),
                last_change = ?4 WHERE id = ?1 AND state = 4",
            params![id, percent, description, at],
        )?;
        if n > 0 {
            self.jobs_changed.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(())
    }

    pub fn get_job(&self, id: &str) -> StoreResult<Option<JobRow>> {
        let raw = self
            .conn()
            .query_row(&format!("{JOB_SELECT} WHERE id = ?1"), [id], raw_job)
            .optional()?;
        raw.map(RawJob::into_row).transpose()
    }

    pub fn list_jobs(&self) -> StoreResult<Vec<JobRow>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("{JOB_SELECT} ORDER BY time_submitted, rowid"))?;
        let rows = stmt
            .query_map([], raw_job)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(RawJob::into_row).collect()
    }

    /// Deletes finished jobs that finished before `cutoff` (Unix seconds).
    pub fn purge_jobs(&self, cutoff: i64) -> StoreResult<usize> {
        Ok(self.conn().execute(
            "DELETE FROM jobs WHERE time_finished IS NOT NULL AND time_finished < ?1",
            [cutoff],
        )?)
    }
}

const JOB_SELECT: &str =
    "SELECT id, job_type, state, percent, error_code, error_description, errors, vm,
    description, time_submitted, start_time, time_finished, last_change, cancellable FROM jobs";

/// Column values before the fallible JSON/UUID decoding (rusqlite closures can only return its error).
struct RawVm(String, String, String, String, u16);

fn raw_vm(r: &Row<'_>) -> rusqlite::Result<RawVm> {
    Ok(RawVm(r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

impl RawVm {
    fn into_row(self) -> StoreResult<VmRow> {
        Ok(VmRow {
            id: parse_uuid(&self.0)?,
            name: self.1,
            disks: serde_json::from_str(&self.2)?,
            power: serde_json::from_str(&self.3)?,
            mode: self.4,
        })
    }
}

type RawRelationship = (
    String,
    u16,
    String,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    u16,
    u16,
    i64,
);

fn raw_relationship(r: &Row<'_>) -> rusqlite::Result<RawRelationship> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
    ))
}

trait IntoRow<T> {
    fn into_row(self) -> StoreResult<T>;
}

impl IntoRow<RelationshipRow> for RawRelationship {
    fn into_row(self) -> StoreResult<RelationshipRow> {
        Ok(RelationshipRow {
            vm: parse_uuid(&self.0)?,
            state: self.1,
            settings: serde_json::from_str(&self.2)?,
            primary_connection_point: self.3,
            authorization_entry: self.4,
            last_replication_time: self.5,
            last_apply_time: self.6,
            last_app_consistent_time: self.7,
            last_replication_type: self.8,
            failed_over_type: self.9,
            statistics_reset_time: self.10,
        })
    }
}

struct RawJob(JobRow, String, Option<String>);

fn raw_job(r: &Row<'_>) -> rusqlite::Result<RawJob> {
    Ok(RawJob(
        JobRow {
            id: r.get(0)?,
            job_type: r.get(1)?,
            state: r.get(2)?,
            percent: r.get(3)?,
            error_code: r.get(4)?,
            error_description: r.get(5)?,
            errors: Vec::new(),
            vm: None,
            description: r.get(8)?,
            time_submitted: r.get(9)?,
            start_time: r.get(10)?,
            time_finished: r.get(11)?,
            last_change: r.get(12)?,
            cancellable: r.get(13)?,
        },
        r.get(6)?,
        r.get(7)?,
    ))
}

impl RawJob {
    fn into_row(self) -> StoreResult<JobRow> {
        let RawJob(mut job, errors, vm) = self;
        job.errors = serde_json::from_str(&errors)?;
        job.vm = vm.as_deref().map(parse_uuid).transpose()?;
        Ok(job)
    }
}

/// `vm`'s relationship read through `conn` (a caller's transaction too).
fn read_relationship(conn: &Connection, vm: Uuid) -> StoreResult<Option<RelationshipRow>> {
    let raw = conn
        .query_row(
            "SELECT vm, state, settings, primary_connection_point, authorization_entry,
                    last_replication_time, last_apply_time, last_app_consistent_time,
                    last_replication_type, failed_over_type, statistics_reset_time
             FROM relationships WHERE vm = ?1",
            [vm.to_string()],
            raw_relationship,
        )
        .optional()?;
    raw.map(RawRelationship::into_row).transpose()
}

/// Writes `rel` and the VM's `mode` through `conn` (a caller's transaction); see
/// [`Store::put_relationship`].
fn write_relationship(conn: &Connection, rel: &RelationshipRow, mode: u16) -> StoreResult<()> {
    conn.execute(
        "INSERT INTO relationships (vm, state, settings, primary_connection_point,
            authorization_entry, last_replication_time, last_apply_time, last_app_consistent_time,
            last_replication_type, failed_over_type, statistics_reset_time)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT(vm) DO UPDATE SET state = excluded.state, settings = excluded.settings,
            primary_connection_point = excluded.primary_connection_point,
            authorization_entry = excluded.authorization_entry,
            last_apply_time = excluded.last_apply_time,
            last_app_consistent_time = excluded.last_app_consistent_time,
            failed_over_type = excluded.failed_over_type,
            statistics_reset_time = excluded.statistics_reset_time,
            last_replication_time = CASE
                WHEN last_replication_time > coalesce(excluded.last_replication_time, -1)
                THEN last_replication_time ELSE excluded.last_replication_time END,
            last_replication_type = CASE
                WHEN last_replication_time > coalesce(excluded.last_replication_time, -1)
                THEN last_replication_type ELSE excluded.last_replication_type END",
        params![
            rel.vm.to_string(),
            rel.state,
            serde_json::to_string(&rel.settings)?,
            rel.primary_connection_point,
            rel.authorization_entry,
            rel.last_replication_time,
            rel.last_apply_time,
            rel.last_app_consistent_time,
            rel.last_replication_type,
            rel.failed_over_type,
            rel.statistics_reset_time
        ],
    )?;
    // A VM whose role changes (a replica failed over and reversed or failed back to become the
    // primary, and the other way) starts its counters anew: what it counted received is not what
    // it sends. (Its `statistics_reset_time` is the row's: a job writes its row more than once.)
    let before: Option<u16> = conn
        .query_row(
            "SELECT mode FROM vms WHERE id = ?1",
            [rel.vm.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    // (Not when a relationship begins or ends: mode None, 0, on one side.)
    if before.is_some_and(|b| b != mode && b != 0 && mode != 0) {
        conn.execute(
            "DELETE FROM replication_stats WHERE vm = ?1",
            [rel.vm.to_string()],
        )?;
    }
    conn.execute(
        "UPDATE vms SET mode = ?2 WHERE id = ?1",
        params![rel.vm.to_string(), mode],
    )?;
    Ok(())
}

/// Inserts `vm` through `conn` (a connection or a transaction).
pub(crate) fn insert_vm_in(conn: &Connection, vm: &VmRow) -> StoreResult<()> {
    conn.execute(
        "INSERT INTO vms (id, name, disks, power, mode) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            vm.id.to_string(),
            vm.name,
            serde_json::to_string(&vm.disks)?,
            serde_json::to_string(&vm.power)?,
            vm.mode
        ],
    )?;
    Ok(())
}

pub(crate) fn parse_uuid(text: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(text).map_err(|_| StoreError::Corrupt(format!("'{text}' is not a GUID")))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn temp_store() -> (tempdir::Dir, Store) {
        let dir = tempdir::Dir::new();
        let store = Store::open(&dir.path.join("test.db")).expect("open");
        (dir, store)
    }

    pub(crate) mod tempdir {
        pub struct Dir {
            pub path: std::path::PathBuf,
        }
        impl Dir {
            pub fn new() -> Dir {
                let path = std::env::temp_dir().join(format!("vmr-store-{}", uuid::Uuid::new_v4()));
                std::fs::create_dir_all(&path).expect("mkdir");
                Dir { path }
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.path);
            }
        }
    }

    pub(crate) fn vm(name: &str) -> VmRow {
        VmRow {
            id: Uuid::new_v4(),
            name: name.into(),
            disks: vec!["/d/a.qcow2".into()],
            power: PowerControl::default(),
            mode: 0,
        }
    }

    #[test]
    fn vm_round_trips_and_names_are_unique_ignoring_case() {
        let (_d, store) = temp_store();
        let a = vm("web01");
        store.insert_vm(&a).expect("insert");
        assert_eq!(store.get_vm(a.id).expect("get"), Some(a.clone()));
        assert_eq!(store.find_vm_by_name("WEB01").expect("find"), Some(a));
        assert!(store.insert_vm(&vm("Web01")).is_err());
    }

    #[test]
    fn a_vm_whose_role_changes_starts_its_statistics_anew() {
        let (_d, store) = temp_store();
        let a = vm("rev01");
        store.insert_vm(&a).expect("insert");
        let rel = RelationshipRow::new(a.id, 5);
        store.put_relationship(&rel, 2).expect("a replica");
        let received = crate::replication::chain::StatEvent::Success {
            bytes: 4096,
            latency_secs: 3,
        };
        store.record_stat(a.id, received).expect("stat");
        let counted = store.stats(a.id).expect("stats");
        store
            .put_relationship(&store.get_relationship(a.id).unwrap().unwrap(), 2)
            .unwrap();
        assert_eq!(store.stats(a.id).expect("stats"), counted); // the same role: kept
        let rel = store.get_relationship(a.id).unwrap().unwrap();
        store.put_relationship(&rel, 1).expect("now the primary");
        assert_eq!(store.stats(a.id).expect("stats").success, 0);
    }

    #[test]
    fn relationship_write_sets_mode_and_remove_clears_it() {
        let (_d, store) = temp_store();
        let a = vm("db01");
        store.insert_vm(&a).expect("insert");
        let mut rel = RelationshipRow::new(a.id, 5);
        rel.state = 3;
        rel.primary_connection_point = Some("p".into());
        rel.authorization_entry = Some("*.example.org".into());
        rel.last_replication_time = Some(100);
        rel.last_apply_time = Some(101);
        rel.last_app_consistent_time = Some(90);
        rel.last_replication_type = 2;
        rel.failed_over_type = 3;
        rel.settings.replication_interval = 30;
        store.put_relationship(&rel, 1).expect("put");
        assert_eq!(
            store.get_relationship(a.id).expect("get"),
            Some(rel.clone())
        );
        assert_eq!(store.get_vm(a.id).expect("vm").map(|v| v.mode), Some(1));

        // The replication time never goes back: a cycle's note wins over a row read before it.
        let stale = rel;
        store.note_replication(a.id, 130, 1).expect("note");
        store.note_replication(a.id, 120, 2).expect("an older note");
        let mut suspended = stale.clone();
        suspended.state = 7;
        store.put_relationship(&suspended, 1).expect("put");
        let got = store.get_relationship(a.id).expect("get").expect("row");
        assert_eq!(
            (
                got.state,
                got.last_replication_time,
                got.last_replication_type
            ),
            (7, Some(130), 1)
        );
        let mut later = stale;
        later.last_replication_time = Some(140);
        later.last_replication_type = 2;
        store.put_relationship(&later, 1).expect("put");
        let got = store.get_relationship(a.id).expect("get").expect("row");
        assert_eq!(
            (got.last_replication_time, got.last_replication_type),
            (Some(140), 2)
        );

        store.remove_relationship(a.id).expect("remove");
        assert_eq!(store.get_relationship(a.id).expect("get"), None);
        assert_eq!(store.get_vm(a.id).expect("vm").map(|v| v.mode), Some(0));

        // Enabled again (1) while a log of the old relationship was in flight: its note is not
        // this relationship's replication.
        let mut again = RelationshipRow::new(a.id, 6);
        again.state = 1;
        store.put_relationship(&again, 1).expect("put");
        store.note_replication(a.id, 150, 1).expect("note");
        let got = store.get_relationship(a.id).expect("get").expect("row");
        assert_eq!(got.last_replication_time, None);
    }

    #[test]
    fn authorization_entries_are_keyed_by_host() {
        let (_d, store) = temp_store();
        let e = AuthorizationEntry {
            allowed_primary_host_system: "*.example.org".into(),
            trust_group: "DEFAULT".into(),
            replica_storage_location: "/srv/replica".into(),
        };
        assert!(store.add_authorization_entry(&e).expect("add"));
        assert!(!store.add_authorization_entry(&e).expect("add twice"));
        let mut changed = e.clone();
        changed.trust_group = "G2".into();
        assert!(store.modify_authorization_entry(&changed).expect("modify"));
        assert_eq!(store.authorization_entries().expect("list"), vec![changed]);
        assert!(store
            .remove_authorization_entry("*.EXAMPLE.org", &[], &[], 8)
            .expect("remove"));
        assert!(!store
            .remove_authorization_entry("*.example.org", &[], &[], 8)
            .expect("remove again"));
    }

    #[test]
    fn jobs_round_trip_and_purge_only_finished_ones() {
        let (_d, store) = temp_store();
        let mut job = JobRow {
            id: "j1".into(),
            job_type: 91,
            state: 4,
            percent: 10,
            error_code: 0,
            error_description: None,
            errors: vec![JobErrorInfo {
                message: "m".into(),
                recommended_action: "a".into(),
                error_type: 4,
            }],
            vm: Some(Uuid::new_v4()),
            description: "d".into(),
            time_submitted: 100,
            start_time: Some(100),
            time_finished: None,
            last_change: 100,
            cancellable: true,
        };
        store.put_job(&job).expect("put");
        assert_eq!(store.get_job("j1").expect("get"), Some(job.clone()));
        assert_eq!(store.purge_jobs(1000).expect("purge"), 0);
        job.time_finished = Some(200);
        store.put_job(&job).expect("put");
        assert_eq!(store.purge_jobs(150).expect("purge"), 0);
        assert_eq!(store.purge_jobs(201).expect("purge"), 1);
        assert!(store.list_jobs().expect("list").is_empty());
    }

    /// A VM "a" with a relationship in `state` (`more` changed too), the VM in `mode`.
    fn related(
        store: &Store,
        state: u16,
        mode: u16,
        more: impl FnOnce(&mut RelationshipRow),
    ) -> (VmRow, RelationshipRow) {
        let v = vm("a");
        store.insert_vm(&v).expect("insert");
        let mut rel = RelationshipRow::new(v.id, 5);
        rel.state = state;
        more(&mut rel);
        store.put_relationship(&rel, mode).expect("put");
        (v, rel)
    }

    /// A job of `vm` in `state`.
    fn job_of(id: &str, vm: Uuid, state: u16) -> JobRow {
        JobRow {
            id: id.into(),
            job_type: 94,
            state,
            percent: 0,
            error_code: 0,
            error_description: None,
            errors: Vec::new(),
            vm: Some(vm),
            description: "d".into(),
            time_submitted: 100,
            start_time: Some(100),
            time_finished: None,
            last_change: 100,
            cancellable: false,
        }
    }

    #[test]
    fn a_cut_off_jobs_state_is_put_back_unless_its_failback_completed() {
        let (_d, store) = temp_store();
        // (state when the daemon stopped, its job's state, a log committed and not applied, that
        // log marked as a resynchronization's): the failback's log not come, come and applied,
        // come; only a delta come (a run again from 3); a job that completed.
        let cases = [
            (13, 4, false, false),
            (14, 4, false, false),
            (13, 4, true, true),
            (13, 4, true, false),
            (13, 7, false, false),
        ];
        let mut vms = Vec::new();
        for (i, (now, job_state, unapplied, marked)) in cases.into_iter().enumerate() {
            let v = vm(&format!("vm{i}"));
            store.insert_vm(&v).expect("insert");
            let mut rel = RelationshipRow::new(v.id, 5);
            rel.state = now;
            store.put_relationship(&rel, 2).expect("put");
            store
                .conn()
                .execute(
                    "INSERT INTO received_logs (vm, sequence, log_hash, log_bytes, point_time, applied)
                     VALUES (?1, 7, 'h', 1, 1, ?2)",
                    params![v.id.to_string(), !unapplied],
                )
                .expect("log");
            if marked {
                store
                    .conn()
                    .execute(
                        "INSERT INTO resync_points (vm, sequence) VALUES (?1, 7)",
                        [v.id.to_string()],
                    )
                    .expect("mark");
            }
            let id = format!("j{i}");
            store.put_job(&job_of(&id, v.id, job_state)).expect("job");
            store.put_job_restore(&id, v.id, 9).expect("restore");
            vms.push(v.id);
        }
        assert_eq!(
            store.restore_interrupted_states().expect("restore"),
            vec![vms[0], vms[3]]
        );
        let states: Vec<u16> = vms
            .iter()
            .map(|v| store.get_relationship(*v).expect("get").expect("row").state)
            .collect();
        assert_eq!(states, vec![9, 14, 13, 9, 13]);
        // Every record is forgotten: a second start restores nothing.
        assert!(store
            .restore_interrupted_states()
            .expect("again")
            .is_empty());
    }

    #[test]
    fn a_commit_records_the_log_and_the_replication_only_while_the_relationship_exists() {
        use crate::replication::records::{Committed, UploadRow};
        let (_d, store) = temp_store();
        let (v, _) = related(&store, 3, 2, |r| r.settings.replication_interval = 300);
        let upload = |sequence: u64, secs: i64, point_type: u16| UploadRow {
            vm: v.id,
            sequence,
            upload_id: Uuid::new_v4(),
            log_hash: "h".into(),
            log_bytes: 1,
            point_time: secs * 1_000_000,
            point_type,
        };
        let u = upload(2, 100, 2);
        store.put_upload(&u).expect("upload");
        assert_eq!(store.commit_upload(&u, 1).expect("commit"), Committed::Yes);
        let row = store.get_relationship(v.id).expect("get").expect("row");
        assert_eq!(
            (
                row.last_replication_time,
                row.last_replication_type,
                row.last_app_consistent_time
            ),
            (Some(100), 1, Some(100))
        );
        assert_eq!(row.settings.replication_interval, 300);
        assert!(store.received_log(v.id, 2).expect("log").is_some());
        // An earlier point committed later does not move the time back.
        let u = upload(3, 90, 1);
        store.put_upload(&u).expect("upload");
        assert_eq!(store.commit_upload(&u, 1).expect("commit"), Committed::Yes);
        let row = store.get_relationship(v.id).expect("get").expect("row");
        assert_eq!(
            (row.last_replication_time, row.last_app_consistent_time),
            (Some(100), Some(100))
        );
        // Removed meanwhile: nothing is written, and the relationship does not come back.
        let u = upload(4, 200, 1);
        store.put_upload(&u).expect("upload");
        // Dropped by a resynchronization's begin: nothing either.
        let dropped = upload(5, 200, 1);
        store.put_upload(&dropped).expect("upload");
        store.remove_uploads(v.id).expect("drop");
        assert_eq!(
            store.commit_upload(&dropped, 1).expect("commit"),
            Committed::NoUpload
        );
        assert!(store.received_log(v.id, 5).expect("log").is_none());
        assert_eq!(
            store
                .get_relationship(v.id)
                .expect("get")
                .expect("row")
                .last_replication_time,
            Some(100)
        );
        store.put_upload(&u).expect("upload");
        store.remove_relationship(v.id).expect("remove");
        assert_eq!(
            store.commit_upload(&u, 1).expect("commit"),
            Committed::NoRelationship
        );
        assert!(store.get_relationship(v.id).expect("get").is_none());
        assert!(store.received_log(v.id, 4).expect("log").is_none());
    }

    #[test]
    fn an_update_changes_the_row_as_it_is_and_keeps_what_others_wrote() {
        let (_d, store) = temp_store();
        let (v, _) = related(&store, 2, 2, |_| {});
        // An apply writes its columns after the command read the row.
        assert!(store.note_apply(v.id, 2, 3, 70).expect("note"));
        assert!(store
            .update_relationship(v.id, None, |r| r.statistics_reset_time = 99)
            .expect("update"));
        let row = store.get_relationship(v.id).expect("get").expect("row");
        assert_eq!(
            (row.state, row.last_apply_time, row.statistics_reset_time),
            (3, Some(70), 99)
        );
        assert_eq!(store.get_vm(v.id).expect("vm").expect("row").mode, 2);
        store.remove_relationship(v.id).expect("remove");
        assert!(!store
            .update_relationship(v.id, Some(2), |r| r.state = 3)
            .expect("update"));
        assert!(store.get_relationship(v.id).expect("get").is_none());
    }

    #[test]
    fn a_jobs_outcome_goes_on_the_row_as_it_is_with_what_goes_with_it_or_not_at_all() {
        let (_d, store) = temp_store();
        let (v, given) = related(&store, 12, 2, |_| {});
        let failover_rows = |store: &Store| -> i64 {
            store
                .conn()
                .query_row("SELECT count(*) FROM failovers", [], |r| r.get(0))
                .expect("count")
        };
        store
            .conn()
            .execute(
                "INSERT INTO failovers (vm, point, log_hash, disks_before) VALUES (?1, 3, 'h', '[]')",
                [v.id.to_string()],
            )
            .expect("failover");
        // An apply wrote its time after the job read the row; the job changed other fields.
        assert!(store.note_apply(v.id, 12, 12, 70).expect("note"));
        let mut done = given.clone();
        done.state = 3;
        done.failed_over_type = 1;
        done.primary_connection_point = Some("b".into());
        done.last_apply_time = Some(60); // the job's own, before the apply's
        let forget = |tx: &rusqlite::Transaction| -> StoreResult<()> {
            tx.execute("DELETE FROM failovers WHERE vm = ?1", [v.id.to_string()])?;
            Ok(())
        };
        // What goes with it fails: nothing is written.
        let failed = store.update_relationship_and(
            v.id,
            Some(1),
            |cur| cur.rebase(&given, &done),
            |tx| {
                forget(tx)?;
                Err(StoreError::Corrupt("no".into()))
            },
        );
        assert!(failed.is_err());
        assert_eq!(failover_rows(&store), 1);
        let row = store.get_relationship(v.id).expect("get").expect("row");
        assert_eq!((row.state, row.failed_over_type), (12, 0));
        assert_eq!(store.get_vm(v.id).expect("vm").expect("row").mode, 2);

        assert!(store
            .update_relationship_and(v.id, Some(1), |cur| cur.rebase(&given, &done), forget)
            .expect("update"));
        let row = store.get_relationship(v.id).expect("get").expect("row");
        assert_eq!(
            (row.state, row.failed_over_type, row.last_apply_time),
            (3, 1, Some(70))
        );
        assert_eq!(row.primary_connection_point.as_deref(), Some("b"));
        assert_eq!(failover_rows(&store), 0);
        assert_eq!(store.get_vm(v.id).expect("vm").expect("row").mode, 1);
    }

    #[test]
    fn an_apply_is_noted_only_over_the_state_it_read() {
        let (_d, store) = temp_store();
        let (v, _) = related(&store, 13, 2, |r| {
            r.primary_connection_point = Some("p".into())
        });
        // Moved meanwhile (13 → 14): the apply that read 13 writes nothing.
        assert!(store.move_state(v.id, 13, 14).expect("move"));
        assert!(!store.note_apply(v.id, 13, 13, 50).expect("note"));
        let row = store.get_relationship(v.id).expect("get").expect("row");
        assert_eq!((row.state, row.last_apply_time), (14, None));
        assert!(store.note_apply(v.id, 14, 3, 60).expect("note"));
        let row = store.get_relationship(v.id).expect("get").expect("row");
        assert_eq!((row.state, row.last_apply_time), (3, Some(60)));
        assert_eq!(row.primary_connection_point.as_deref(), Some("p"));
    }

    #[test]
    fn a_switch_to_replica_writes_the_disks_relationship_mode_restore_and_chain_at_once() {
        let (_d, store) = temp_store();
        let (v, rel) = related(&store, 13, 1, |_| {});
        store.put_job(&job_of("j", v.id, 4)).expect("job");
        store.put_job_restore("j", v.id, 3).expect("restore");
        store
            .put_chain(&crate::replication::chain::ChainRow {
                vm: v.id,
                last_sequence: 4,
                last_log_hash: "h".into(),
                next_due: 0,
                retries: 0,
                retry_at: 0,
                last_error: None,
            })
            .expect("chain");
        store.switch_to_replica(&rel, 2, Some(9)).expect("switch");
        let row = store.get_vm(v.id).expect("get").expect("row");
        assert_eq!((row.mode, row.disks.len()), (2, 0));
        assert!(store.chain(v.id).expect("chain").is_none());
        assert_eq!(
            store.restore_interrupted_states().expect("restore"),
            vec![v.id]
        );
        assert_eq!(
            store
                .get_relationship(v.id)
                .expect("get")
                .expect("row")
                .state,
            9
        );
    }
}
