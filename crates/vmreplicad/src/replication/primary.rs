//! The primary's delta cycles (docs/protocol.md §6, first diagram; §8 back-off; §9 statistics).
//!
//! A scheduler task looks at every primary VM once a second. A VM in state 3 whose cycle is due and
//! which has no cycle in flight gets one; a due tick that finds a cycle in flight or in back-off is
//! a miss. At most `max_parallel_transfers` cycles of this host run at once (3 by default,
//! `replication::limits`), and at most 4 to one recovery server (what it accepts from one primary).
//!
//! One cycle: connect and say hello; ask the replica what it committed last (`c`); write log `c+1`
//! (parent `c`) with the changes since the baseline; upload; commit. Only the commit's 200 makes
//! the new block-hash maps the baseline. If the commit answer was lost, the replica is ahead of the
//! primary's record: the maps of the log it holds, kept until its outcome is known
//! (`replication::sent`), become the baseline, and the chain moves to `c`; a replica ahead with a
//! log this host kept no maps of needs a resynchronization (a log built against the older baseline
//! would skip a block written back to its older bytes).
//!
//! Change tracking: a running VM's point is frozen in its QEMU process and read through its dirty
//! bitmaps (`engine::running`); a turned-off VM's disk files are hash-scanned (BLAKE3 per block)
//! against the last shipped map. Both leave an exact map, so either may follow the other.
//!
//! A VM whose initial replication went out on offline media waits in state 2 until the replica
//! reports log 1 committed with the exported hash; then it goes to 3.

use std::collections::HashMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;
use vmreplica_core::state::{ReplicationMode, ReplicationState};
use wire::protocol::TransferState;
use wire::protocol::{ErrorCode, ReplicaVm, Route};
use wire::{LogHeader, PointType};

use super::chain::{ChainRow, StatEvent};
use super::client::{GrowingLog, PeerError, Peers};
use crate::claims::VmClaims;
use crate::clock::now;
use crate::engine::initial::LogOut;
use crate::engine::initial::{disk_table, scan_image};
use crate::engine::network::target;
use crate::engine::running::RunningPoint;
use crate::power;
use crate::store::{RelationshipRow, Store, VmRow};

/// Cycles of this host in flight at once (Hyper-V's `MaximumActiveTransfers` default).
/// Back-off of failed cycle `k` (1-based), at least the interval; then 30 minutes each time.
const BACKOFF_SECS: [i64; 5] = [60, 120, 240, 480, 600];
const BACKOFF_LAST: i64 = 1800;
/// How often the tracked size of a running VM is asked from its QEMU process between cycles.
const PENDING_SAMPLE_SECS: i64 = 10;

/// The VMs with a cycle in flight; a suspend waits here until the VM's cycle ended. A cycle is
/// first queued (waiting for its turns) and only then sending; waiting for a VM to be idle cancels
/// its queued cycle at once instead of waiting for the turns of other VMs' cycles, and a removal
/// of the relationship also stops the upload of a sending one ([`Stop`]).
#[derive(Default)]
pub struct InFlight {
    /// Each VM's cycle, with the number of its queueing (so a guard ends only its own).
    vms: Mutex<HashMap<Uuid, (u64, Flight)>>,
    queued: std::sync::atomic::AtomicU64,
    ended: tokio::sync::Notify,
}

enum Flight {
    /// Waiting for its turns; told to give up through its [`Stop`].
    Queued(Arc<Stop>),
    /// Told to give up; ends without sending.
    Cancelled,
    /// Its [`Stop`] ends the upload (the relationship was removed).
    Sending(Arc<Stop>),
}

/// Tells one cycle to give up: before its turns came, or (the relationship removed) while it
/// uploads its log.
#[derive(Default)]
pub(crate) struct Stop {
    notify: tokio::sync::Notify,
    fired: std::sync::atomic::AtomicBool,
}

impl Stop {
    fn fire(&self) {
        self.fired.store(true, std::sync::atomic::Ordering::Release);
        self.notify.notify_one();
    }

    /// Whether the cycle was told to give up.
    pub(crate) fn fired(&self) -> bool {
        self.fired.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once the cycle is told to give up (at once if it already was).
    pub(crate) async fn wait(&self) {
        if !self.fired() {
            self.notify.notified().await;
        }
    }
}

impl InFlight {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (u64, Flight)>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a cycle of `vm` is queued or sending.
    pub fn contains(&self, vm: Uuid) -> bool {
        self.map().contains_key(&vm)
    }

    /// Queues a cycle of `vm`; the [`Stop`] tells it to give up. Ended by [`Flying`]'s drop.
    fn queue(self: &Arc<Self>, vm: Uuid) -> (Flying, Arc<Stop>) {
        let cancel = Arc::new(Stop::default());
        let n = self
            .queued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.map().insert(vm, (n, Flight::Queued(cancel.clone())));
        (
            Flying {
                all: self.clone(),
                vm,
                n,
            },
            cancel,
        )
    }

    /// The queued cycle of `vm` starts sending; false if it was cancelled meanwhile.
    fn start_sending(&self, vm: Uuid) -> bool {
        let mut map = self.map();
        match map.get_mut(&vm) {
            Some((_, f @ Flight::Queued(_))) => {
                if let Flight::Queued(stop) = f {
                    *f = Flight::Sending(stop.clone());
                }
                true
            }
            _ => false,
        }
    }

    /// Ends the cycle `n` of `vm` (not a later one).
    fn end(&self, vm: Uuid, n: u64) {
        let mut map = self.map();
        if map.get(&vm).is_some_and(|(m, _)| *m == n) {
            map.remove(&vm);
        }
        drop(map);
        self.ended.notify_waiters();
    }

    /// Waits until no cycle of `vm` is in flight (at most `limit`); false on timeout. A cycle
    /// still waiting for its turns is cancelled.
    pub async fn wait_idle(&self, vm: Uuid, limit: Duration) -> bool {
        self.wait_ended(vm, limit, false).await
    }

    /// [`InFlight::wait_idle`] for a removed relationship: a cycle sending its log also stops (its
    /// log is of no use any more), so the removal does not wait for the whole upload.
    pub async fn stop_and_wait(&self, vm: Uuid, limit: Duration) -> bool {
        self.wait_ended(vm, limit, true).await
    }

    async fn wait_ended(&self, vm: Uuid, limit: Duration, stop_sending: bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let ended = self.ended.notified();
            {
                let mut map = self.map();
                match map.get_mut(&vm) {
                    None => return true,
                    Some((_, f @ Flight::Queued(_))) => {
                        if let Flight::Queued(cancel) = f {
                            cancel.fire();
                        }
                        *f = Flight::Cancelled;
                    }
                    Some((_, Flight::Sending(stop))) => {
                        if stop_sending && !stop.fired() {
                            stop.fire();
                        }
                    }
                    Some((_, Flight::Cancelled)) => {}
                }
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return !self.contains(vm);
            }
        }
    }
}

/// A cycle of one VM in flight: it ends when this is dropped, however the cycle's task ended.
struct Flying {
    all: Arc<InFlight>,
    vm: Uuid,
    n: u64,
}

impl Drop for Flying {
    fn drop(&mut self) {
        self.all.end(self.vm, self.n);
    }
}

pub struct PrimarySide {
    pub store: Arc<Store>,
    pub data_dir: PathBuf,
    pub peers: Arc<Peers>,
    pub claims: VmClaims,
    /// Run cycles this often instead of each relationship's ReplicationInterval (tests, demos).
    pub interval_override: Option<u64>,
    transfers: Arc<super::limits::Transfers>,
    /// Turns per recovery server (`limits::PER_SERVER_TRANSFERS`).
    servers: super::limits::ServerTurns,
    pub in_flight: Arc<InFlight>,
    /// When each running VM's tracked size was last asked for (a sample in progress counts).
    sampled: Mutex<HashMap<Uuid, i64>>,
    /// Starts a Resynchronize of a VM through the management plane (AutoResynchronize), once wired.
    pub auto_resync: std::sync::OnceLock<AutoResync>,
    /// How long a VM waits in 9 before an automatic resynchronization, and between two attempts.
    pub auto_resync_delay: i64,
    /// Since when (or since the last automatic attempt) each VM waits in 9.
    waiting: Mutex<HashMap<Uuid, i64>>,
}

/// Starts a Resynchronize of a VM (the management plane's command, state machine and claims).
pub type AutoResync = Box<dyn Fn(Uuid) + Send + Sync>;

/// Whether `now` (seconds since local midnight) is inside the window `start`..`end`, which may
/// pass midnight (AutoResynchronizeIntervalStart/End, 18:30–06:00 by default).
pub fn in_window(now: u32, start: u32, end: u32) -> bool {
    if start <= end {
        start <= now && now < end
    } else {
        now >= start || now < end
    }
}

/// Why a cycle failed, and what that means for the relationship (§10).
#[derive(Debug)]
enum CycleError {
    /// Network trouble: back off and retry, health Critical meanwhile.
    Network(String),
    /// Any other failed attempt: back off and retry.
    Failed(String),
    /// Nothing to do now, not a failure (replica suspended, the VM busy with an operation).
    Skipped(String),
    /// The chain cannot continue: relationship → 9 (resynchronization required).
    Resync(String),
    /// An operator must act: relationship → 8.
    Critical(String),
}

impl From<PeerError> for CycleError {
    fn from(e: PeerError) -> Self {
        let text = crate::error_chain(&e);
        match &e {
            PeerError::Resolve(_)
            | PeerError::Connect { .. }
            | PeerError::Timeout(_)
            | PeerError::Http(_) => CycleError::Network(text),
            PeerError::Refused(d) => match d.error_code() {
                Some(ErrorCode::Suspended | ErrorCode::Busy) => CycleError::Skipped(text),
                Some(
                    ErrorCode::ResyncRequired
                    | ErrorCode::SequenceConflict
                    | ErrorCode::OutOfSequence
                    | ErrorCode::DiskTableMismatch,
                ) => CycleError::Resync(text),
                Some(ErrorCode::Timeout) => CycleError::Network(text),
                Some(
                    ErrorCode::ChecksumMismatch
                    | ErrorCode::StorageFull
                    | ErrorCode::StorageUnavailable
                    | ErrorCode::Internal
                    | ErrorCode::Incomplete
                    | ErrorCode::OffsetMismatch
                    | ErrorCode::UnknownLog,
                ) => CycleError::Failed(text),
                _ => CycleError::Critical(text),
            },
            PeerError::Tls { .. } | PeerError::Certificate(_) => CycleError::Critical(text),
            PeerError::Protocol(_) | PeerError::Local(_) => CycleError::Failed(text),
        }
    }
}

impl PrimarySide {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<Store>,
        data_dir: PathBuf,
        peers: Arc<Peers>,
        claims: VmClaims,
        interval_override: Option<u64>,
        in_flight: Arc<InFlight>,
        auto_resync_delay: i64,
        transfers: Arc<super::limits::Transfers>,
    ) -> PrimarySide {
        PrimarySide {
            store,
            data_dir,
            peers,
            claims,
            interval_override,
            transfers,
            servers: super::limits::ServerTurns::default(),
            in_flight,
            sampled: Mutex::default(),
            auto_resync: std::sync::OnceLock::new(),
            auto_resync_delay,
            waiting: Mutex::default(),
        }
    }

    /// AutoResynchronize: a VM that lost track of its changes (9, not after a failover: that one
    /// waits for Resynchronize or InitiateFailback by hand) and has waited `auto_resync_delay`
    /// gets a Resynchronize when its relationship allows it and the local time is inside its
    /// window; a failed one is tried again one delay later.
    fn consider_auto_resync(&self, vm: &VmRow, rel: &RelationshipRow, now: i64) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if rel.state != ReplicationState::WaitingToStartResynchronization.as_u16() {
            waiting.remove(&vm.id);
            return;
        }
        let since = *waiting.entry(vm.id).or_insert(now);
        let s = &rel.settings;
        if !s.auto_resynchronize_enabled || now - since < self.auto_resync_delay {
            return;
        }
        let local = u32::from(super::bandwidth::local_now().1) * 60;
        let window = (
            s.auto_resynchronize_interval_start,
            s.auto_resynchronize_interval_end,
        );
        if !in_window(local, window.0, window.1)
            || self.store.failover(vm.id).ok().flatten().is_some()
        {
            return;
        }
        waiting.insert(vm.id, now);
        if let Some(start) = self.auto_resync.get() {
            tracing::info!(vm = %vm.id, "automatic resynchronization (AutoResynchronizeEnabled, inside its window)");
            start(vm.id);
        }
    }

    fn interval(&self, rel: &RelationshipRow) -> i64 {
        self.interval_override
            .map_or(i64::from(rel.settings.replication_interval), |s| s as i64)
            .max(1)
    }

    /// Called once a second: starts the cycles that are due.
    fn tick(self: &Arc<Self>) -> Result<(), crate::store::StoreError> {
        let now = now();
        for vm in self.store.list_vms()? {
            if vm.mode != ReplicationMode::Primary.as_u16() {
                continue;
            }
            let (Some(rel), Some(mut chain)) = (
                self.store.get_relationship(vm.id)?,
                self.store.chain(vm.id)?,
            ) else {
                continue;
            };
            self.consider_auto_resync(&vm, &rel, now);
            let waiting_for_import =
                rel.state == ReplicationState::WaitingToCompleteInitialReplication.as_u16();
            let tracking = [
                ReplicationState::Replicating,
                ReplicationState::Suspended,
                ReplicationState::Critical,
            ]
            .map(ReplicationState::as_u16)
            .contains(&rel.state);
            if tracking && !self.in_flight.contains(vm.id) {
                self.sample_pending(&vm, now);
            }
            if rel.state != ReplicationState::Replicating.as_u16() && !waiting_for_import {
                continue;
            }
            let interval = self.interval(&rel);
            if now < chain.next_due {
                // A due time set under a longer interval (settings changed, the override) moves in.
                if chain.next_due > now + interval {
                    self.store.set_next_due(vm.id, now + interval)?;
                }
                continue;
            }
            if self.in_flight.contains(vm.id) || now < chain.retry_at {
                // A tick while the last log is still in flight or backing off: a miss; its
                // changes stay tracked and go with the next log.
                if !waiting_for_import {
                    self.store.record_stat(vm.id, StatEvent::Miss)?;
                }
                self.store.set_next_due(vm.id, now + interval)?;
                continue;
            }
            chain.next_due = now + interval;
            self.store.set_next_due(vm.id, chain.next_due)?;
            let (flying, cancel) = self.in_flight.queue(vm.id);
            let me = self.clone();
            tokio::spawn(async move {
                let _flying = flying;
                let id = vm.id;
                // The turns: for an import check (one GET, no upload) only the host's; else the
                // server's first, so a cycle waiting for a busy server holds no turn of the
                // host's that a cycle to another server could use.
                let turns = async {
                    let server = match waiting_for_import {
                        true => None,
                        false => {
                            let to = target(&rel);
                            me.servers.acquire(&to.host, to.port).await
                        }
                    };
                    (server, me.transfers.acquire().await)
                };
                let _turns = tokio::select! {
                    t = turns => t,
                    _ = cancel.wait() => return,
                };
                if !me.in_flight.start_sending(id) {
                    return;
                }
                if waiting_for_import {
                    me.check_import(vm, rel).await;
                } else if let Some((vm, rel, chain)) = me.still_replicating(id) {
                    // The turns may have taken several cycles of other VMs: what was read at
                    // the tick may be stale (suspended, failed over, settings changed meanwhile).
                    me.cycle(vm, rel, chain, &cancel).await;
                }
            });
        }
        Ok(())
    }

    /// The VM, its relationship and chain as they are now, if it is still a primary replicating.
    fn still_replicating(&self, id: Uuid) -> Option<(VmRow, RelationshipRow, ChainRow)> {
        let read = || -> Result<_, crate::store::StoreError> {
            Ok((
                self.store.get_vm(id)?,
                self.store.get_relationship(id)?,
                self.store.chain(id)?,
            ))
        };
        match read() {
            Ok((Some(vm), Some(rel), Some(chain)))
                if vm.mode == ReplicationMode::Primary.as_u16()
                    && rel.state == ReplicationState::Replicating.as_u16() =>
            {
                Some((vm, rel, chain))
            }
            Ok(_) => {
                tracing::info!(vm = %id, "cycle not started: the VM stopped replicating while it waited for its turn");
                None
            }
            Err(e) => {
                tracing::warn!(vm = %id, "cycle not started: {}", crate::error_chain(&e));
                None
            }
        }
    }

    /// Every [`PENDING_SAMPLE_SECS`], asks the QEMU process of a running VM how much its bitmaps
    /// hold and records it as `PendingReplicationSize`. A turned-off VM's changes are known only
    /// when a cycle scans it; its pending size stays what the last cycle left (0 after a success).
    fn sample_pending(self: &Arc<Self>, vm: &VmRow, now: i64) {
        if vm.power.qmp_socket.is_none() {
            return;
        }
        {
            let mut sampled = self.sampled.lock().unwrap_or_else(|p| p.into_inner());
            let last = sampled.entry(vm.id).or_insert(0);
            if now < *last + PENDING_SAMPLE_SECS {
                return;
            }
            *last = i64::MAX; // in progress
        }
        let (me, vm) = (self.clone(), vm.clone());
        tokio::spawn(async move {
            let quick = Duration::from_secs(5);
            let bytes = tokio::time::timeout(
                quick,
                crate::engine::running::pending_bytes(&vm, &me.data_dir),
            )
            .await
            .ok()
            .flatten();
            // A cycle that started meanwhile owns the number (it sets 0 when it succeeds).
            if let (Some(bytes), false) = (bytes, me.in_flight.contains(vm.id)) {
                let _ = me.store.set_pending(vm.id, bytes);
            }
            let mut sampled = me.sampled.lock().unwrap_or_else(|p| p.into_inner());
            sampled.insert(vm.id, now);
        });
    }

    /// The final log of a planned failover (docs/protocol.md §5.6), for RRSC(4) on a primary whose
    /// VM is off and whose state already shows 4 (so the scheduler starts no cycle): waits for the
    /// cycle in flight, ships every change since the last point as a `PlannedFailover` point and
    /// returns (sequence, point time in s) once the replica applied it. On failure nothing of the
    /// tracking is lost: the next log is built against the same baseline.
    pub async fn final_log(&self, vm: &VmRow) -> Result<(u64, i64), String> {
        if !self
            .in_flight
            .wait_idle(vm.id, Duration::from_secs(600))
            .await
        {
            return Err("the VM's replication cycle did not end within 600 s".into());
        }
        let describe = |e: crate::store::StoreError| crate::error_chain(&e);
        let (Some(rel), Some(from)) = (
            self.store.get_relationship(vm.id).map_err(describe)?,
            self.store.chain(vm.id).map_err(describe)?,
        ) else {
            return Err("the VM has no replication chain yet".into());
        };
        let mut from = from;
        let started = std::time::Instant::now();
        let shipped = self
            .ship(vm, &rel, &mut from, PointType::PlannedFailover, None)
            .await;
        let mut chain = from.clone();
        let (seq, hash, bytes, point_time) = shipped.map_err(|e| match e {
            CycleError::Network(m)
            | CycleError::Failed(m)
            | CycleError::Skipped(m)
            | CycleError::Resync(m)
            | CycleError::Critical(m) => m,
        })?;
        chain.last_sequence = seq;
        chain.last_log_hash = hash;
        chain.retries = 0;
        chain.retry_at = 0;
        chain.last_error = None;
        if !self
            .store
            .end_cycle(&chain, from.last_sequence, &from.last_log_hash)
            .map_err(describe)?
        {
            return Err(
                "the replication relationship changed while the final log was in flight".into(),
            );
        }
        let _ = self
            .store
            .record_stat(vm.id, StatEvent::replicated(bytes, point_time));
        tracing::info!(vm = %vm.id, sequence = seq, bytes, ms = started.elapsed().as_millis() as u64, "final log of the planned failover applied");
        Ok((seq, point_time / 1_000_000))
    }

    /// Export IR: the primary goes 2 → 3 once the replica committed log 1 with the exported hash.
    async fn check_import(&self, vm: VmRow, rel: RelationshipRow) {
        let Ok(Some(chain)) = self.store.chain(vm.id) else {
            return;
        };
        let result = async {
            let mut session = self.peers.connect(&target(&rel)).await?;
            let (_, replica) = session
                .json::<(), ReplicaVm>(Route::GetVm(vm.id), None)
                .await?;
            Ok::<_, PeerError>(replica)
        }
        .await;
        match result {
            Ok(r) if r.last_committed.sequence >= 1 => {
                if r.last_committed.sequence == 1
                    && r.last_committed.log_hash != chain.last_log_hash
                {
                    tracing::warn!(vm = %vm.id, "the replica imported another initial replica than this host exported");
                    self.set_state(
                        vm.id,
                        ReplicationState::WaitingToStartResynchronization,
                        None,
                    )
                    .await;
                    return;
                }
                let time = r.last_committed.point_time / 1_000_000;
                self.set_state(vm.id, ReplicationState::Replicating, Some(time))
                    .await;
                tracing::info!(vm = %vm.id, "the replica imported the initial replica; replicating");
            }
            Ok(_) => tracing::debug!(vm = %vm.id, "the initial replica is not imported yet"),
            Err(e) => {
                tracing::debug!(vm = %vm.id, "cannot ask the replica about the import: {}", crate::error_chain(&e))
            }
        }
    }

    /// Records the replication time, then writes a new state if the relationship is still in 2 or
    /// 3 and in another one, under the VM's claim so that no command's write is lost.
    async fn set_state(
        &self,
        vm: Uuid,
        state: ReplicationState,
        replicated_at: Option<i64>,
    ) -> bool {
        if let Some(t) = replicated_at {
            // Recorded whatever the state past the initial replication: a suspend that came while
            // this log was in flight holds the claim until it ends, and the log did replicate.
            let regular = vmreplica_core::state::ReplicationType::Regular.as_u16();
            if let Err(e) = self.store.note_replication(vm, t, regular) {
                tracing::warn!(%vm, "cannot record the replication time: {e}");
            }
        }
        let live = [
            ReplicationState::WaitingToCompleteInitialReplication.as_u16(),
            ReplicationState::Replicating.as_u16(),
        ];
        // A command changed the state meanwhile (suspend, remove, ...): it wins, and may be
        // holding the claim while it waits for this cycle to end.
        match self.store.get_relationship(vm) {
            Ok(Some(rel)) if rel.state == state.as_u16() => return true,
            Ok(Some(rel)) if live.contains(&rel.state) => {}
            _ => return false,
        }
        let Some(_claim) = self.claim(vm).await else {
            return false;
        };
        let (Ok(Some(v)), Ok(Some(mut rel))) =
            (self.store.get_vm(vm), self.store.get_relationship(vm))
        else {
            return false;
        };
        if !live.contains(&rel.state) {
            return false;
        }
        rel.state = state.as_u16();
        if let Some(t) = replicated_at {
            // From 2, which the note above leaves alone.
            rel.last_replication_time = Some(t);
            rel.last_replication_type = vmreplica_core::state::ReplicationType::Regular.as_u16();
        }
        self.store.put_relationship(&rel, v.mode).is_ok()
    }

    /// The VM's claim, waiting briefly for a command that holds it.
    async fn claim(&self, vm: Uuid) -> Option<crate::claims::VmClaim> {
        for _ in 0..250 {
            if let Some(c) = self.claims.claim(vm) {
                return Some(c);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(%vm, "the VM stayed busy; the replication result is recorded at the next cycle");
        None
    }

    /// Writes the cycle's outcome to the chain it started from; false (and says so) when the
    /// relationship was removed, and maybe enabled again, while the log was in flight.
    fn end_cycle(&self, chain: &ChainRow, from: &ChainRow) -> bool {
        match self
            .store
            .end_cycle(chain, from.last_sequence, &from.last_log_hash)
        {
            Ok(true) => true,
            Ok(false) => {
                tracing::info!(vm = %chain.vm, sequence = chain.last_sequence, "the cycle's outcome is dropped: the replication relationship changed while its log was in flight");
                false
            }
            Err(e) => {
                tracing::warn!(vm = %chain.vm, "cannot record the cycle's outcome: {}", crate::error_chain(&e));
                false
            }
        }
    }

    async fn cycle(&self, vm: VmRow, rel: RelationshipRow, from: ChainRow, stop: &Stop) {
        let started = std::time::Instant::now();
        // `ship` moves `from` to the log the replica holds when it adopts that log's maps.
        let mut from = from;
        let shipped = self
            .ship(&vm, &rel, &mut from, PointType::Standard, Some(stop))
            .await;
        let mut chain = from.clone();
        match shipped {
            Ok((seq, hash, bytes, point_time)) => {
                chain.last_sequence = seq;
                chain.last_log_hash = hash;
                chain.retries = 0;
                chain.retry_at = 0;
                chain.last_error = None;
                if !self.end_cycle(&chain, &from) {
                    return;
                }
                let _ = self
                    .store
                    .record_stat(vm.id, StatEvent::replicated(bytes, point_time));
                self.set_state(
                    vm.id,
                    ReplicationState::Replicating,
                    Some(point_time / 1_000_000),
                )
                .await;
                tracing::info!(vm = %vm.id, sequence = seq, bytes, ms = started.elapsed().as_millis() as u64, "delta replicated");
            }
            Err(CycleError::Skipped(why)) => {
                tracing::info!(vm = %vm.id, "cycle skipped: {why}");
            }
            // The relationship was removed: nothing of this cycle counts.
            Err(_) if stop.fired() => {
                tracing::info!(vm = %vm.id, "cycle stopped: the VM's replication was removed while its log was sent");
            }
            Err(e) => {
                let (event, message) = match &e {
                    CycleError::Network(m) => (StatEvent::NetworkFailure, m.clone()),
                    CycleError::Failed(m) | CycleError::Resync(m) | CycleError::Critical(m) => {
                        (StatEvent::Failure, m.clone())
                    }
                    CycleError::Skipped(_) => unreachable!("handled above"),
                };
                chain.retries += 1;
                let k = chain.retries as usize;
                let wait = match self.interval_override {
                    Some(s) => s as i64,
                    None => BACKOFF_SECS
                        .get(k - 1)
                        .copied()
                        .unwrap_or(BACKOFF_LAST)
                        .max(self.interval(&rel)),
                };
                chain.retry_at = now() + wait;
                chain.last_error = Some(message.clone());
                if !self.end_cycle(&chain, &from) {
                    return;
                }
                let _ = self.store.record_stat(vm.id, event);
                match e {
                    CycleError::Resync(_) => {
                        tracing::error!(vm = %vm.id, "replication needs a resynchronization: {message}");
                        self.set_state(
                            vm.id,
                            ReplicationState::WaitingToStartResynchronization,
                            None,
                        )
                        .await;
                    }
                    CycleError::Critical(_) => {
                        tracing::error!(vm = %vm.id, "replication stopped: {message}");
                        self.set_state(vm.id, ReplicationState::Critical, None)
                            .await;
                    }
                    _ => {
                        tracing::warn!(vm = %vm.id, retry_in_secs = wait, "replication cycle failed: {message}")
                    }
                }
            }
        }
    }

    /// One log from building to commit; returns (sequence, hash, bytes, point time in µs). A
    /// fired `stop` ends the upload as if its connection broke for good. A replica found holding
    /// the log this host sent last without learning its outcome moves `chain` (and its row) to it.
    async fn ship(
        &self,
        vm: &VmRow,
        rel: &RelationshipRow,
        chain: &mut ChainRow,
        point_type: PointType,
        stop: Option<&Stop>,
    ) -> Result<(u64, String, u64, i64), CycleError> {
        // The final log of a planned failover is confirmed only once the replica applied it.
        let planned = point_type == PointType::PlannedFailover;
        let stopped = || CycleError::Skipped("the VM's replication was removed".into());
        let reach = async {
            let mut session = self.peers.connect(&target(rel)).await?;
            if planned {
                session.require("planned-failover")?;
            }
            let (_, replica) = session
                .json::<(), ReplicaVm>(Route::GetVm(vm.id), None)
                .await?;
            Ok::<_, PeerError>((session, replica))
        };
        // A stop before anything was frozen or read needs no cleanup: it ends the cycle at once,
        // even while an unreachable recovery server is still being tried.
        let (mut session, replica) = match stop {
            None => reach.await?,
            Some(stop) => tokio::select! {
                biased;
                () = stop.wait() => return Err(stopped()),
                reached = reach => reached?,
            },
        };
        if replica.resync_required {
            return Err(CycleError::Resync(
                "the replica cannot continue its chain".into(),
            ));
        }
        if replica.state == ReplicationState::Suspended.as_u16() {
            return Err(CycleError::Skipped(
                "replication is paused on the replica".into(),
            ));
        }
        let c = replica.last_committed.sequence;
        if c < chain.last_sequence {
            return Err(CycleError::Resync(format!(
                "the replica holds log {c}, but log {} was committed there",
                chain.last_sequence
            )));
        }
        if c > chain.last_sequence {
            self.adopt_sent(vm, chain, &replica.last_committed)?;
        }
        let seq = c + 1;
        if stop.is_some_and(Stop::fired) {
            return Err(stopped());
        }
        let running = if power::enabled_state(&vm.power) == power::ENABLED {
            Some(
                RunningPoint::freeze(vm, &self.data_dir, false)
                    .await
                    .map_err(running_error)?,
            )
        } else {
            None
        };
        // A turned-off VM's qcow2 disks record what is written to them from before they are
        // read (engine::offline), for a failback.
        let tracking = crate::engine::reverse::tracking_dir(&self.data_dir, vm.id);
        let rotation = match running {
            None => {
                crate::engine::offline::Rotation::before_read(&vm.disks, &tracking, false).await
            }
            Some(_) => crate::engine::offline::Rotation::none(),
        };
        // The log is sent from memory while it is written (replication::growing): reading the
        // changes and the transfer overlap, and no spool is written; this path only names it.
        let path = self
            .data_dir
            .join("outgoing")
            .join(vm.id.to_string().to_uppercase())
            .join(format!("{seq:020}.vrlog"));
        let growing = Arc::new(GrowingLog::in_memory(super::growing::KEEP));
        let progress: super::client::Progress = Arc::new(|_, _| {});
        let target = target(rel);
        let mode = session.log_mode(rel.settings.compression_enabled);
        let build = disk::scan::paced(
            growing.clone(),
            self.build_delta(
                vm,
                mode,
                (seq, c, point_type),
                running.as_ref(),
                &path,
                growing.clone(),
            ),
        );
        let send = self.peers.deliver(
            &target,
            &mut session,
            vm.id,
            seq,
            &path,
            growing.clone(),
            progress,
            super::client::CommitAs {
                wait_applied: planned,
                resync: false,
            },
            super::client::Patience::quick(),
            (None, false),
        );
        let send = async {
            let Some(stop) = stop else {
                return send.await;
            };
            tokio::select! {
                // A log the replica committed in the same poll is taken as delivered.
                biased;
                delivered = send => delivered,
                () = stop.wait() => {
                    // The build stops after its next read or write (`Pace::room`).
                    growing.close();
                    Err(PeerError::Local(format!("the upload of log {seq} was stopped")))
                }
            }
        };
        let (built, delivered) = tokio::join!(build, send);
        let (hash, bytes, point_time, maps, prints) = match built {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                if let Some(r) = running {
                    let _ = r.finish(false).await;
                }
                rotation.abandon(&vm.disks).await;
                // A build stopped because the upload gave up: the upload's error says why.
                return match delivered {
                    Err(d) if growing.closed_first() => Err(CycleError::from(d)),
                    _ => Err(e),
                };
            }
        };
        let result = match delivered {
            Ok(d) => {
                for _ in 0..d.broken_connections {
                    let _ = self.store.record_stat(vm.id, StatEvent::NetworkFailure);
                }
                if d.status.log_hash.as_deref() != Some(hash.as_str()) {
                    Err(CycleError::Resync(format!(
                        "the replica committed log {seq} with another hash"
                    )))
                } else if planned && d.status.state != TransferState::Applied as u16 {
                    Err(CycleError::Failed(format!(
                        "the replica committed the final log {seq} but did not apply it within 600 s"
                    )))
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(CycleError::from(e)),
        };
        let _ = std::fs::remove_file(&path);
        // What a running VM's offline bitmaps mark, read while its point is still frozen and
        // remembered once the point is committed here (engine::offline).
        let live = match (&running, &result) {
            (Some(r), Ok(())) => {
                Some(crate::engine::offline::marked_live(r, &tracking, vm.disks.len()).await)
            }
            _ => None,
        };
        if let Some(r) = running {
            // Old bitmaps go only once the replica committed; else they are merged into the new.
            if let Err(e) = r.finish(result.is_ok()).await {
                tracing::warn!(vm = %vm.id, "ending the frozen point: {}", e.message());
            }
        }
        match result {
            Ok(()) => {
                self.record_sent_blocks(vm.id, seq, &maps);
                for (tmp, map) in &maps {
                    if let Err(e) = disk::scan::hashmap::commit(tmp, map) {
                        rotation.abandon(&vm.disks).await;
                        return Err(CycleError::Failed(crate::error_chain(&e)));
                    }
                }
                crate::engine::running::scans_committed(&tracking, vm.disks.len());
                rotation.after_commit(&vm.disks, &tracking).await;
                match live {
                    Some(live) => {
                        crate::engine::offline::remember_marked_live(&tracking, seq, live);
                        crate::engine::running::forget_offline_marks(&tracking, vm.disks.len());
                    }
                    None => {
                        crate::engine::offline::remember_marked(
                            &self.data_dir,
                            vm.id,
                            &vm.disks,
                            &tracking,
                            seq,
                        )
                        .await;
                        crate::engine::running::remember_offline_marks(
                            &self.data_dir,
                            vm.id,
                            &vm.disks,
                        )
                        .await;
                    }
                }
                super::journal::record_fingerprints(&tracking, prints.as_deref(), maps.len());
                Ok((seq, hash, bytes, point_time))
            }
            Err(e) => {
                // The maps stay kept (replication::sent): the replica may have committed the log
                // and its answer be what was lost.
                rotation.abandon(&vm.disks).await;
                Err(e)
            }
        }
    }

    /// Records what log `seq` changed, from each disk's (new, baseline) maps, for a failback after
    /// an unplanned failover (replication::journal); a disk whose record cannot be made is simply
    /// unknown.
    fn record_sent_blocks(&self, vm: Uuid, seq: u64, maps: &[(PathBuf, PathBuf)]) {
        let changed: Result<Vec<_>, String> = maps
            .iter()
            .map(|(new, map)| super::journal::map_diff(map, new))
            .collect();
        if let Ok(changed) = changed {
            if let Err(e) = self.store.record_sent_blocks(vm, seq, &changed) {
                tracing::warn!(%vm, "cannot record the blocks of log {seq}: {e}");
            }
        }
    }

    /// The replica holds log `held.sequence` above `chain`: the log this host sent last, whose
    /// commit answer was lost. Its kept maps become the baseline (and its blocks the journal's)
    /// and the chain moves to it, on its row too. Any other log needs a resynchronization.
    fn adopt_sent(
        &self,
        vm: &VmRow,
        chain: &mut ChainRow,
        held: &wire::protocol::LastCommitted,
    ) -> Result<(), CycleError> {
        let c = held.sequence;
        let tracking = crate::engine::reverse::tracking_dir(&self.data_dir, vm.id);
        let Some(kept) = super::sent::record(&tracking).filter(|k| {
            k.sequence == c
                && c == chain.last_sequence + 1
                && k.log_hash.eq_ignore_ascii_case(&held.log_hash)
        }) else {
            return Err(CycleError::Resync(format!(
                "the replica holds log {c}, but this host recorded log {} as the last it sent and \
                 kept nothing of log {c}",
                chain.last_sequence
            )));
        };
        let maps: Vec<(PathBuf, PathBuf)> = (0..vm.disks.len())
            .map(|i| {
                let map = tracking.join(format!("disk{i}.hashes"));
                (super::sent::sent_map(&map, c), map)
            })
            .collect();
        // Adopted once already up to some disk (cut off): the journal was written first.
        if maps.iter().all(|(sent, _)| sent.is_file()) {
            self.record_sent_blocks(vm.id, c, &maps);
        }
        for (sent, map) in &maps {
            if sent.is_file() {
                disk::scan::hashmap::commit(sent, map)
                    .map_err(|e| CycleError::Failed(crate::error_chain(&e)))?;
            }
        }
        // What the files looked like before an older read: no longer this point's.
        super::journal::record_fingerprints(&tracking, None, maps.len());
        // Log `c` was read after any scan marker was written (engine::running).
        crate::engine::running::scans_committed(&tracking, maps.len());
        let mut adopted = chain.clone();
        adopted.last_sequence = c;
        adopted.last_log_hash = kept.log_hash;
        let moved = self
            .store
            .end_cycle(&adopted, chain.last_sequence, &chain.last_log_hash)
            .map_err(|e| CycleError::Failed(crate::error_chain(&e)))?;
        if !moved {
            return Err(CycleError::Skipped(
                "the replication relationship changed meanwhile".into(),
            ));
        }
        tracing::info!(vm = %vm.id, sequence = c, "the replica committed log {c}, whose answer was lost: its block-hash maps are now the baseline");
        // It did replicate: counted as the success it was (its cycle counted a failure).
        if kept.point_time > 0 {
            let _ = self.store.record_stat(
                vm.id,
                StatEvent::replicated(kept.log_bytes, kept.point_time),
            );
        }
        *chain = adopted;
        Ok(())
    }

    /// Writes log `seq` with the changes of every disk since its last shipped map: read from the
    /// frozen point of a running VM, or hash-scanned from the files of a turned-off one.
    #[allow(clippy::type_complexity)]
    #[allow(clippy::too_many_arguments)]
    async fn build_delta(
        &self,
        vm: &VmRow,
        mode: super::client::LogMode,
        point: (u64, u64, PointType),
        running: Option<&RunningPoint>,
        path: &Path,
        growing: Arc<GrowingLog>,
    ) -> Result<BuiltDelta, CycleError> {
        let mut result = self
            .build_delta_inner(vm, mode, point, running, path, growing.clone())
            .await;
        // Kept before the upload can send its end (and so its commit): see replication::sent.
        if let Ok((hash, bytes, point_time, maps, _)) = &mut result {
            let tracking = crate::engine::reverse::tracking_dir(&self.data_dir, vm.id);
            let log = (point.0, hash.as_str(), *bytes, *point_time);
            if let Err(e) = super::sent::keep(&tracking, log, maps) {
                cleanup(maps, path);
                result = Err(CycleError::Failed(format!(
                    "keeping the block-hash maps of log {}: {e}",
                    point.0
                )));
            }
        }
        match &result {
            Ok((hash, bytes, _, _, _)) => growing.finish(hash.clone(), *bytes),
            Err(e) => growing.fail(format!("the log could not be written: {e:?}")),
        }
        result
    }

    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    async fn build_delta_inner(
        &self,
        vm: &VmRow,
        mode: super::client::LogMode,
        (seq, parent, point_type): (u64, u64, PointType),
        running: Option<&RunningPoint>,
        path: &Path,
        growing: Arc<GrowingLog>,
    ) -> Result<BuiltDelta, CycleError> {
        let local = |e: crate::jobs::JobFailure| CycleError::Failed(e.message);
        let disks = disk_table(vm).map_err(local)?;
        let tracking = self
            .data_dir
            .join("tracking")
            .join(vm.id.to_string().to_uppercase());
        let path = path.to_path_buf();
        let point_time = now() * 1_000_000;
        let header = LogHeader {
            vm: vm.id,
            relationship: 0,
            sequence: seq,
            parent,
            point_time_micros: point_time,
            point_type,
            full_image: false,
            disks: crate::engine::initial::log_disks(&disks),
        };
        let file = LogOut::create(&path, Some(growing))
            .map_err(|e| CycleError::Failed(format!("{}: {e}", path.display())))?;
        let mut log = mode
            .writer(
                BufWriter::with_capacity(crate::replication::growing::WRITE_BUFFER, file),
                header,
            )
            .map_err(|e| CycleError::Failed(e.to_string()))?;
        let mut maps = Vec::new();
        // A turned-off VM's files, as they were before they were read (replication::journal).
        let prints = running
            .is_none()
            .then(|| super::journal::fingerprints_before_read(&vm.disks));
        for (i, (format, _)) in disks.iter().enumerate() {
            let map = tracking.join(format!("disk{i}.hashes"));
            if !map.is_file() {
                cleanup(&maps, &path);
                return Err(CycleError::Resync(format!(
                    "the block-hash map of disk {i} ({}) is missing",
                    map.display()
                )));
            }
            let read = match running {
                Some(r) => r
                    .read_disk(i, Some(&map), &map, &mut log)
                    .await
                    .map_err(running_error),
                None => scan_image(
                    &vm.disks[i],
                    format,
                    i,
                    Some(&map),
                    &map,
                    &self.data_dir,
                    &mut log,
                )
                .await
                .map_err(|f| {
                    if f.resync {
                        CycleError::Resync(f.failure.message)
                    } else {
                        CycleError::Failed(f.failure.message)
                    }
                }),
            };
            match read {
                Ok(tmp) => maps.push((tmp, map)),
                Err(e) => {
                    cleanup(&maps, &path);
                    return Err(e);
                }
            }
        }
        let (writer, summary) = log
            .finish()
            .map_err(|e| CycleError::Failed(e.to_string()))?;
        // Hands the last buffered bytes to the upload (the log is in memory: nothing to sync).
        writer
            .into_inner()
            .map_err(|e| CycleError::Failed(e.to_string()))?;
        Ok((
            hex::encode(summary.hash),
            summary.bytes,
            point_time,
            maps,
            prints,
        ))
    }
}

/// A written delta: its hash, bytes, point time, (new map, map) per disk, and the fingerprints of a
/// turned-off VM's files taken before they were read.
type BuiltDelta = (
    String,
    u64,
    i64,
    Vec<(PathBuf, PathBuf)>,
    Option<Vec<Option<disk::fingerprint::Fingerprint>>>,
);

fn running_error(e: crate::engine::running::RunningError) -> CycleError {
    match e {
        crate::engine::running::RunningError::Resync(m) => CycleError::Resync(m),
        crate::engine::running::RunningError::Failed(m) => CycleError::Failed(m),
    }
}

fn cleanup(maps: &[(PathBuf, PathBuf)], log: &Path) {
    for (tmp, _) in maps {
        let _ = std::fs::remove_file(tmp);
    }
    let _ = std::fs::remove_file(log);
}

/// Runs the scheduler until the process ends.
pub fn spawn_scheduler(primary: Arc<PrimarySide>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = primary.tick() {
                tracing::error!("replication scheduler: {}", crate::error_chain(&e));
            }
        }
    });
}

#[cfg(test)]
mod window_tests {
    #[test]
    fn windows_may_pass_midnight() {
        use super::in_window;
        let (start, end) = (18 * 3600 + 1800, 6 * 3600);
        assert!(in_window(23 * 3600, start, end));
        assert!(in_window(3600, start, end));
        assert!(!in_window(12 * 3600, start, end));
        assert!(in_window(12 * 3600, 0, 86_399));
        assert!(!in_window(86_399, 0, 86_399));
    }
}

#[cfg(test)]
mod in_flight_tests {
    use super::*;

    #[tokio::test]
    async fn waiting_for_idle_cancels_a_queued_cycle_and_waits_for_a_sending_one() {
        let all = Arc::new(InFlight::default());
        let vm = Uuid::new_v4();

        // Queued (waiting for its turns): cancelled at once, and it sends nothing.
        let (flying, cancel) = all.queue(vm);
        assert!(all.contains(vm));
        let task = tokio::spawn(async move {
            let _flying = flying;
            cancel.wait().await; // stands for the turns that never come
        });
        assert!(all.wait_idle(vm, Duration::from_secs(5)).await);
        assert!(!all.contains(vm));
        task.await.expect("task");

        // Sending: waited for until its task ends, however it ends (here a panic).
        let (flying, _cancel) = all.queue(vm);
        assert!(all.start_sending(vm));
        assert!(!all.wait_idle(vm, Duration::from_millis(100)).await);
        let task = tokio::spawn(async move {
            let _flying = flying;
            tokio::time::sleep(Duration::from_millis(200)).await;
            panic!("a cycle that panics still ends");
        });
        assert!(all.wait_idle(vm, Duration::from_secs(5)).await);
        assert!(task.await.is_err());

        // Cancelled before it had its turns: it may not start sending.
        let (flying, _cancel) = all.queue(vm);
        let waiter = {
            let all = all.clone();
            tokio::spawn(async move { all.wait_idle(vm, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!all.start_sending(vm));
        drop(flying);
        assert!(waiter.await.expect("waiter"));

        // Sending, when the relationship is removed: its upload is told to stop, and a wait
        // for idle alone never tells it.
        let (flying, stop) = all.queue(vm);
        assert!(all.start_sending(vm));
        assert!(!all.wait_idle(vm, Duration::from_millis(100)).await);
        assert!(!stop.fired());
        let task = tokio::spawn(async move {
            let _flying = flying;
            stop.wait().await; // stands for the upload
            stop.fired()
        });
        assert!(all.stop_and_wait(vm, Duration::from_secs(5)).await);
        assert!(task.await.expect("task"));

        // A guard ends only its own cycle, not a later one of the same VM.
        let (old, _) = all.queue(vm);
        let (new, _) = all.queue(vm);
        drop(old);
        assert!(all.contains(vm));
        drop(new);
        assert!(!all.contains(vm));
    }
}
