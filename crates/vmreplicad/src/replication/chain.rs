//! What a primary remembers of each VM's chain of shipped logs (the last sequence the recovery
//! server committed, when the next cycle is due, its retries) and the statistics counters of
//! spec §10 that the protocol feeds (docs/protocol.md §9).

use rusqlite::{params, OptionalExtension};
use uuid::Uuid;

use crate::store::{Store, StoreError, StoreResult};

/// The primary's chain of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRow {
    pub vm: Uuid,
    /// The last sequence the recovery server committed (1 after initial replication).
    pub last_sequence: u64,
    pub last_log_hash: String,
    /// Unix seconds when the next cycle is due.
    pub next_due: i64,
    /// Failed cycles in a row (back-off step).
    pub retries: u32,
    /// Unix seconds before which no retry starts.
    pub retry_at: i64,
    pub last_error: Option<String>,
}

/// Counters of the monitoring window (reset by ResetReplicationStatistics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsRow {
    pub success: u32,
    pub size: u64,
    pub max_size: u64,
    pub latency: u32,
    pub max_latency: u32,
    pub misses: u32,
    pub network_failures: u32,
    pub failures: u32,
    pub pending_size: u64,
}

/// One change to the counters.
#[derive(Debug, Clone, Copy)]
pub enum StatEvent {
    Success { bytes: u64, latency_secs: u32 },
    Miss,
    NetworkFailure,
    Failure,
}

impl StatEvent {
    /// A log of `bytes` replicated now, its point taken at `point_time_micros` (Unix): the latency
    /// is the point's age.
    pub fn replicated(bytes: u64, point_time_micros: i64) -> StatEvent {
        let latency = (crate::clock::now() - point_time_micros / 1_000_000).max(0);
        StatEvent::Success {
            bytes,
            latency_secs: u32::try_from(latency).unwrap_or(u32::MAX),
        }
    }
}

fn to_i64(v: u64) -> StoreResult<i64> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("value {v}")))
}

impl Store {
    pub fn put_chain(&self, c: &ChainRow) -> StoreResult<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO primary_chains (vm, last_sequence, last_log_hash, next_due, retries, retry_at, last_error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                c.vm.to_string(),
                to_i64(c.last_sequence)?,
                c.last_log_hash,
                c.next_due,
                c.retries,
                c.retry_at,
                c.last_error
            ],
        )?;
        Ok(())
    }

    /// Writes the outcome of a cycle (sequence, hash, retries, retry time, error; not the due
    /// time, which the scheduler owns) only if the chain is still the one the cycle started from:
    /// at sequence `from_sequence` with hash `from_hash`. False when it is not: the relationship
    /// was removed (and maybe enabled again, with a new chain) while the cycle's log was in flight,
    /// and nothing of the old cycle may land on the new chain.
    pub fn end_cycle(
        &self,
        c: &ChainRow,
        from_sequence: u64,
        from_hash: &str,
    ) -> StoreResult<bool> {
        let changed = self.conn().execute(
            "UPDATE primary_chains SET last_sequence = ?2, last_log_hash = ?3, retries = ?4,
                retry_at = ?5, last_error = ?6
             WHERE vm = ?1 AND last_sequence = ?7 AND last_log_hash = ?8",
            params![
                c.vm.to_string(),
                to_i64(c.last_sequence)?,
                c.last_log_hash,
                c.retries,
                c.retry_at,
                c.last_error,
                to_i64(from_sequence)?,
                from_hash
            ],
        )?;
        Ok(changed == 1)
    }

    /// Sets when the next cycle of `vm` is due, and nothing else of its chain.
    pub fn set_next_due(&self, vm: Uuid, next_due: i64) -> StoreResult<()> {
        self.conn().execute(
            "UPDATE primary_chains SET next_due = ?2 WHERE vm = ?1",
            params![vm.to_string(), next_due],
        )?;
        Ok(())
    }

    /// Makes the next cycle of `vm` due at `now`, with no back-off.
    pub fn due_now(&self, vm: Uuid, now: i64) -> StoreResult<()> {
        self.conn().execute(
            "UPDATE primary_chains SET next_due = ?2, retry_at = 0 WHERE vm = ?1",
            params![vm.to_string(), now],
        )?;
        Ok(())
    }

    pub fn chain(&self, vm: Uuid) -> StoreResult<Option<ChainRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT last_sequence, last_log_hash, next_due, retries, retry_at, last_error
                 FROM primary_chains WHERE vm = ?1",
                [vm.to_string()],
                |r| {
                    Ok(ChainRow {
                        vm,
                        last_sequence: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                        last_log_hash: r.get(1)?,
                        next_due: r.get(2)?,
                        retries: r.get(3)?,
                        retry_at: r.get(4)?,
                        last_error: r.get(5)?,
                    })
                },
            )
            .optional()?)
    }

    pub fn remove_chain(&self, vm: Uuid) -> StoreResult<()> {
        let conn = self.conn();
        conn.execute("DELETE FROM primary_chains WHERE vm = ?1", [vm.to_string()])?;
        conn.execute(
            "DELETE FROM replication_stats WHERE vm = ?1",
            [vm.to_string()],
        )?;
        Ok(())
    }

    pub fn stats(&self, vm: Uuid) -> StoreResult<StatsRow> {
        Ok(self
            .conn()
            .query_row(
                "SELECT success, size, max_size, latency, max_latency, misses, network_failures,
                        failures, pending_size FROM replication_stats WHERE vm = ?1",
                [vm.to_string()],
                |r| {
                    Ok(StatsRow {
                        success: r.get(0)?,
                        size: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                        max_size: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                        latency: r.get(3)?,
                        max_latency: r.get(4)?,
                        misses: r.get(5)?,
                        network_failures: r.get(6)?,
                        failures: r.get(7)?,
                        pending_size: u64::try_from(r.get::<_, i64>(8)?).unwrap_or(0),
                    })
                },
            )
            .optional()?
            .unwrap_or_default())
    }

    pub fn record_stat(&self, vm: Uuid, e: StatEvent) -> StoreResult<()> {
        // Into the window it happened in.
        self.roll_statistics(vm, crate::clock::now())?;
        let conn = self.conn();
        conn.execute(
            "INSERT OR IGNORE INTO replication_stats (vm) VALUES (?1)",
            [vm.to_string()],
        )?;
        let id = vm.to_string();
        match e {
            StatEvent::Success {
                bytes,
                latency_secs,
            } => conn.execute(
                "UPDATE replication_stats SET success = success + 1, size = size + ?2,
                 max_size = MAX(max_size, ?2), latency = latency + ?3,
                 max_latency = MAX(max_latency, ?3), pending_size = 0 WHERE vm = ?1",
                params![id, to_i64(bytes)?, latency_secs],
            )?,
            StatEvent::Miss => conn.execute(
                "UPDATE replication_stats SET misses = misses + 1 WHERE vm = ?1",
                [id],
            )?,
            StatEvent::NetworkFailure => conn.execute(
                "UPDATE replication_stats SET network_failures = network_failures + 1 WHERE vm = ?1",
                [id],
            )?,
            StatEvent::Failure => conn.execute(
                "UPDATE replication_stats SET failures = failures + 1 WHERE vm = ?1",
                [id],
            )?,
        };
        Ok(())
    }

    /// Sets what is tracked but not yet sent (`PendingReplicationSize`).
    pub fn set_pending(&self, vm: Uuid, bytes: u64) -> StoreResult<()> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR IGNORE INTO replication_stats (vm) VALUES (?1)",
            [vm.to_string()],
        )?;
        conn.execute(
            "UPDATE replication_stats SET pending_size = ?2 WHERE vm = ?1",
            params![vm.to_string(), to_i64(bytes)?],
        )?;
        Ok(())
    }

    /// Once the monitoring window the counters of `vm` cover has ended (spec §10), zeroes them and
    /// starts the window `now` falls in; else leaves them.
    pub fn roll_statistics(&self, vm: Uuid, now: i64) -> StoreResult<()> {
        let settings = self.service_settings()?;
        let Some(rel) = self.get_relationship(vm)? else {
            return Ok(());
        };
        let counted_from = rel.statistics_reset_time;
        if now < settings.monitoring_window(counted_from).1 {
            return Ok(());
        }
        let start = settings.monitoring_window(now).0;
        let rolled = std::cell::Cell::new(false);
        self.update_relationship_and(
            vm,
            None,
            |r| {
                // Only once, by whoever comes first; the counters in the same transaction.
                if r.statistics_reset_time == counted_from {
                    r.statistics_reset_time = start;
                    rolled.set(true);
                }
            },
            |tx| {
                if rolled.get() {
                    tx.execute(ZERO_COUNTERS, [vm.to_string()])?;
                }
                Ok(())
            },
        )?;
        Ok(())
    }

    /// Zeroes the counters (ResetReplicationStatistics); the pending size is a state, not a count.
    pub fn reset_stats(&self, vm: Uuid) -> StoreResult<()> {
        self.conn().execute(ZERO_COUNTERS, [vm.to_string()])?;
        Ok(())
    }
}

const ZERO_COUNTERS: &str = "UPDATE replication_stats SET success = 0, size = 0, max_size = 0,
    latency = 0, max_latency = 0, misses = 0, network_failures = 0, failures = 0 WHERE vm = ?1";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::temp_store;

    fn chain(vm: Uuid, sequence: u64, hash: &str) -> ChainRow {
        ChainRow {
            vm,
            last_sequence: sequence,
            last_log_hash: hash.into(),
            next_due: 100,
            retries: 0,
            retry_at: 0,
            last_error: None,
        }
    }

    #[test]
    fn a_cycle_ends_only_on_the_chain_it_started_from() {
        let (_dir, store) = temp_store();
        let vm = Uuid::new_v4();
        store.put_chain(&chain(vm, 4, "h4")).unwrap();
        store.set_next_due(vm, 130).unwrap();
        // The cycle that shipped 5 from 4: written, the due time kept.
        assert!(store.end_cycle(&chain(vm, 5, "h5"), 4, "h4").unwrap());
        let now = store.chain(vm).unwrap().unwrap();
        assert_eq!((now.last_sequence, now.next_due), (5, 130));
        // A second writer of the same outcome finds the chain moved on.
        assert!(!store.end_cycle(&chain(vm, 5, "h5"), 4, "h4").unwrap());
        // A resume makes the next cycle due and leaves the rest as the cycle wrote it.
        let mut backing_off = chain(vm, 6, "h6");
        backing_off.retries = 2;
        backing_off.retry_at = 500;
        assert!(store.end_cycle(&backing_off, 5, "h5").unwrap());
        store.due_now(vm, 140).unwrap();
        let now = store.chain(vm).unwrap().unwrap();
        assert_eq!(
            (now.last_sequence, now.retries, now.retry_at, now.next_due),
            (6, 2, 0, 140)
        );
        // Removed and enabled again: the new initial replication's chain is at 1, and a cycle
        // of the old chain that was in flight (from 1, the old hash) leaves it alone.
        store.remove_chain(vm).unwrap();
        assert!(!store.end_cycle(&chain(vm, 7, "h7"), 6, "h6").unwrap());
        assert_eq!(store.chain(vm).unwrap(), None);
        store.put_chain(&chain(vm, 1, "new1")).unwrap();
        let mut failed = chain(vm, 1, "old1");
        failed.retries = 1;
        assert!(!store.end_cycle(&failed, 1, "old1").unwrap());
        assert_eq!(store.chain(vm).unwrap().unwrap(), chain(vm, 1, "new1"));
    }

    #[test]
    fn the_counters_cover_the_current_monitoring_window_only() {
        let (_dir, store) = temp_store();
        let with = crate::store::tests::vm("windowed");
        let vm = with.id;
        store.insert_vm(&with).unwrap();
        let settings = store.service_settings().unwrap(); // 12 h windows from 09:00 UTC
        let now = crate::clock::now();
        let (start, end) = settings.monitoring_window(now);
        let mut rel = crate::store::RelationshipRow::new(vm, start + 1);
        store.put_relationship(&rel, 1).unwrap();
        store.record_stat(vm, StatEvent::Miss).unwrap();
        store.roll_statistics(vm, end - 1).unwrap(); // still this window
        assert_eq!(store.stats(vm).unwrap().misses, 1);
        store.roll_statistics(vm, end + 5).unwrap();
        assert_eq!(store.stats(vm).unwrap().misses, 0);
        let rolled = store.get_relationship(vm).unwrap().unwrap();
        assert_eq!(rolled.statistics_reset_time, end);
        // Counted from a window long gone (a host off for days): the one `now` is in begins.
        rel.statistics_reset_time = start - 10 * 86_400;
        store.put_relationship(&rel, 1).unwrap();
        store.record_stat(vm, StatEvent::Failure).unwrap();
        assert_eq!(store.stats(vm).unwrap().failures, 1);
        let row = store.get_relationship(vm).unwrap().unwrap();
        // (`start`, unless the clock passed into the next window meanwhile.)
        assert!([start, end].contains(&row.statistics_reset_time));
    }

    #[test]
    fn a_chain_left_without_its_relationship_goes_at_the_next_start() {
        let (dir, store) = temp_store();
        let with = crate::store::tests::vm("kept");
        let (vm, kept) = (Uuid::new_v4(), with.id);
        store.insert_vm(&with).unwrap();
        store
            .put_relationship(&crate::store::RelationshipRow::new(kept, 0), 1)
            .unwrap();
        for id in [vm, kept] {
            store.put_chain(&chain(id, 3, "h3")).unwrap();
            store.record_stat(id, StatEvent::Miss).unwrap();
        }
        drop(store);
        let store = Store::open(&dir.path.join("test.db")).unwrap();
        assert_eq!(store.chain(vm).unwrap(), None);
        assert_eq!(store.stats(vm).unwrap(), StatsRow::default());
        assert_eq!(store.chain(kept).unwrap(), Some(chain(kept, 3, "h3")));
        assert_eq!(store.stats(kept).unwrap().misses, 1);
    }
}
