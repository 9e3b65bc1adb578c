//! The seam where data-plane engines plug in.
//!
//! The service checks an operation's parameters and asks the core's state machine first; an allowed
//! operation whose [`Transition::moves_data`] is set (initial replication, failover, resync,
//! failback, test replica, connection test, ...) is then handed to a [`DataPlane`], which starts the
//! job that does the work. Until an engine exists, [`NoEngine`] answers 32770 (Not supported), so no
//! method claims a success it did not earn.

pub mod failback;
pub mod failover;
pub mod initial;
pub mod network;
pub mod offline;
pub mod reverse;
pub mod running;
pub mod seeded;
pub mod test_failover;

use std::path::PathBuf;
use std::sync::Arc;

use vmreplica_core::codes::ReturnCode;
use vmreplica_core::command::{CommandError, OperationArgs};
use vmreplica_core::machine::{Operation, RequestedState, Transition};
use vmreplica_core::state::InitialReplicationType;
use vmreplica_core::state::{ReplicationMode, ReplicationState};

use crate::claims::VmClaim;
use crate::jobs::{JobContext, JobEngine, JobFailure};
use crate::store::{JobRow, RelationshipRow, Store, VmRow};

/// An allowed operation, ready for an engine.
pub struct EngineRequest {
    pub vm: VmRow,
    pub relationship: Option<RelationshipRow>,
    pub operation: Operation,
    pub args: OperationArgs,
    pub transition: Transition,
    /// The VM's claim: the engine holds it until its job has written the result.
    pub claim: VmClaim,
}

pub trait DataPlane: Send + Sync {
    /// Starts the job that carries out `request`; the job moves the relationship to
    /// `transition.after` when its work is durable.
    fn start(&self, request: EngineRequest) -> Result<JobRow, CommandError>;

    /// Where this engine keeps its per-VM state (`tracking/`, `run/`), if it keeps any.
    fn data_dir(&self) -> Option<&std::path::Path> {
        None
    }
}

/// Once primary `vm`'s relationship is removed, ends what this host's replication of it keeps
/// beside the metadata store: a running VM's frozen point, bitmaps and NBD server in its QEMU
/// process, or a turned-off VM's bitmaps in its qcow2 files (the running-VM tracker's, the offline
/// rotation's, CommitFailover's), within [`RELEASE_LIMIT`]; then `tracking/<VMID>/` (block-hash
/// maps, records of deliveries and bitmaps). Best effort: returns what could not be undone.
pub async fn release(vm: &VmRow, data_dir: &std::path::Path) -> Vec<String> {
    let mut problems =
        match tokio::time::timeout(RELEASE_LIMIT, release_unbounded(vm, data_dir)).await {
            Ok(problems) => problems,
            Err(_) => vec![format!(
                "ending its tracking took longer than {RELEASE_LIMIT:?} and was given up"
            )],
        };
    let tracking = reverse::tracking_dir(data_dir, vm.id);
    if let Err(e) = std::fs::remove_dir_all(&tracking) {
        if e.kind() != std::io::ErrorKind::NotFound {
            problems.push(format!("{} stays: {e}", tracking.display()));
        }
    }
    problems
}

/// How long [`release`] may take (QMP calls, `qemu-img` on the disks).
pub const RELEASE_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

async fn release_unbounded(vm: &VmRow, data_dir: &std::path::Path) -> Vec<String> {
    let prefixes = [
        disk::bitmap::PREFIX,
        offline::PREFIX,
        failback::FAILBACK_BITMAP,
    ];
    let running = || crate::power::enabled_state(&vm.power) == crate::power::ENABLED;
    let mut problems = Vec::new();
    if running() {
        if let Err(e) = running::stop_tracking(vm, data_dir, &prefixes[1..]).await {
            problems.push(format!("in the VM's QEMU process: {}", e.message()));
        }
    }
    // Also when the VM stopped meanwhile: its QEMU process wrote its bitmaps into the files.
    if !running() {
        problems.clear();
        running::remove_work(data_dir, vm);
        for image in &vm.disks {
            for name in offline::bitmap_names(std::path::Path::new(image)).await {
                if prefixes.iter().any(|p| name.starts_with(p))
                    && !offline::qemu_img_bitmap(image, "--remove", &name).await
                {
                    problems.push(format!(
                        "bitmap {name} stays in {image} (qemu-img bitmap --remove failed: is the file in use?)"
                    ));
                }
            }
        }
    }
    problems
}

/// The engine of a build without a data plane.
pub struct NoEngine;

impl DataPlane for NoEngine {
    fn start(&self, request: EngineRequest) -> Result<JobRow, CommandError> {
        let from = request.relationship.as_ref().map_or(0, |r| r.state);
        Err(CommandError::new(
            ReturnCode::NotSupported,
            format!(
                "{} on '{}' (state {from} -> {}): the data-plane engine for this operation is not implemented yet",
                request.operation.name(),
                request.vm.name,
                request.transition.after.as_u16()
            ),
        ))
    }
}

/// The engine of this host: initial replication over the network and on offline media (export on
/// the primary, import on the replica). Every other data-moving operation is still answered by
/// [`NoEngine`].
pub struct LocalEngine {
    pub store: Arc<Store>,
    pub jobs: Arc<JobEngine>,
    pub data_dir: PathBuf,
    /// How this host reaches recovery servers.
    pub peers: Arc<crate::replication::client::Peers>,
    /// Wakes the replica's apply task (after a reverted failover).
    pub apply_wake: Arc<tokio::sync::Notify>,
    /// This host's replication cycles as a primary (the final log of a planned failover).
    pub primary: Arc<crate::replication::primary::PrimarySide>,
}

impl DataPlane for LocalEngine {
    fn data_dir(&self) -> Option<&std::path::Path> {
        Some(&self.data_dir)
    }

    fn start(&self, request: EngineRequest) -> Result<JobRow, CommandError> {
        match request.operation {
            Operation::StartReplication(InitialReplicationType::Export) => self.export(request),
            Operation::StartReplication(InitialReplicationType::Network) => {
                self.network(request, false)
            }
            Operation::StartReplication(InitialReplicationType::Seeded) => {
                self.network(request, true)
            }
            Operation::ImportInitialReplica => self.import(request),
            Operation::TestReplicaSystem => self.test_failover(request),
            Operation::InitiateFailover => self.failover(request),
            Operation::RevertFailover if request.vm.mode == ReplicationMode::Replica.as_u16() => {
                self.revert_failover(request)
            }
            Operation::CommitFailover => self.commit_failover(request),
            Operation::SetFailoverNetworkAdapterSettings => self.set_failover_network(request),
            Operation::InitiateFailback => self.failback(request),
            Operation::ReverseReplicationRelationship => self.reverse(request),
            Operation::Resynchronize if request.vm.mode == ReplicationMode::Primary.as_u16() => {
                self.resynchronize(request)
            }
            Operation::RequestReplicationStateChange(RequestedState::Replicating)
                if request.vm.mode == ReplicationMode::Primary.as_u16()
                    && request.relationship.as_ref().is_some_and(|r| {
                        r.state == ReplicationState::WaitingToStartResynchronization.as_u16()
                            || r.state == ReplicationState::ResynchronizationSuspended.as_u16()
                    }) =>
            {
                self.resynchronize(request)
            }
            // Resume from Suspended, or from Critical once the operator fixed the cause: the
            // next cycle is due now and ships everything tracked meanwhile.
            Operation::RequestReplicationStateChange(RequestedState::Replicating)
                if request.vm.mode == ReplicationMode::Primary.as_u16()
                    && request.relationship.as_ref().is_some_and(|r| {
                        r.state == ReplicationState::Suspended.as_u16()
                            || r.state == ReplicationState::Critical.as_u16()
                    }) =>
            {
                self.resume(request)
            }
            Operation::RequestReplicationStateChange(RequestedState::SyncedReplicationComplete)
                if request.vm.mode == ReplicationMode::Primary.as_u16() =>
            {
                self.prepare_failover(request)
            }
            _ => NoEngine.start(request),
        }
    }
}

/// What the work of a job that owns the relationship leaves (`LocalEngine::spawn_with_outcome`):
/// the row as it made it, and what goes with its write.
pub(crate) struct Done {
    pub rel: RelationshipRow,
    /// The VM's failover is over: its row goes in the same transaction as the relationship's
    /// (the apply task keeps off a failed-over VM's logs until then, and never sees it as a replica
    /// with no failover before its new mode is written).
    pub failover_over: bool,
    /// Wakes the apply task once written (the VM's queued logs are its again).
    pub wake_apply: bool,
}

impl From<RelationshipRow> for Done {
    fn from(rel: RelationshipRow) -> Done {
        Done {
            rel,
            failover_over: false,
            wake_apply: false,
        }
    }
}

/// What a network transfer job sends.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Initial replication, every block.
    Full,
    /// Initial replication against the replica's copy: only the blocks that differ.
    Seeded,
    /// Against the replica's latest point: only the blocks that differ.
    Resync,
}

/// A `StartTime` in the future: the job waits for it (cancellable), then does its work.
async fn wait_until(ctx: &JobContext, start: Option<i64>) -> Result<(), JobFailure> {
    let Some(start) = start else { return Ok(()) };
    if start > crate::clock::now() {
        ctx.note(&format!(
            "Scheduled: starts at {} (StartTime)",
            cim::CimDateTime::from_unix(start, 0)
        ))?;
    }
    while crate::clock::now() < start {
        ctx.check_cancelled()?;
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    Ok(())
}

/// The relationship and the folder (`param`) an offline-media operation needs.
fn relationship_and_location(
    relationship: Option<RelationshipRow>,
    location: Option<String>,
    param: &str,
) -> Result<(RelationshipRow, PathBuf), CommandError> {
    let rel = relationship.ok_or_else(|| missing("a replication relationship"))?;
    let location = PathBuf::from(location.ok_or_else(|| missing(param))?);
    if !location.is_absolute() {
        let msg = format!("{param} must be an absolute path");
        return Err(CommandError::new(ReturnCode::InvalidParameter, msg));
    }
    Ok((rel, location))
}

fn missing(what: &str) -> CommandError {
    CommandError::new(ReturnCode::InvalidParameter, format!("{what} is required"))
}

impl LocalEngine {
    /// Shows `transition.during` now; the job then writes its outcome, or puts the state back.
    fn show_during(
        &self,
        vm: &VmRow,
        rel: &mut RelationshipRow,
        t: &Transition,
    ) -> Result<u16, CommandError> {
        let before = rel.state;
        if let Some(during) = t.during {
            rel.state = during.as_u16();
            self.store
                .update_relationship(vm.id, Some(vm.mode), |cur| cur.state = rel.state)?;
        }
        Ok(before)
    }

    /// Runs `work` as a job that owns the relationship: the state shows `transition.during` now;
    /// on success the job writes what `work` changed of the row it was given, with
    /// `transition.after` and the new mode, on the row as it is then (what an apply or a cycle
    /// wrote meanwhile stays); on failure it puts the state back. The VM's claim is held until
    /// that write, whatever `work` does with its own.
    fn spawn_with_outcome<F, Fut, D>(
        &self,
        req: EngineRequest,
        location_param: Option<&str>,
        what: &str,
        cancellable: bool,
        work: F,
    ) -> Result<JobRow, CommandError>
    where
        F: FnOnce(JobContext, VmRow, RelationshipRow, PathBuf, VmClaim) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<D, JobFailure>> + Send + 'static,
        D: Into<Done>,
    {
        let EngineRequest {
            vm,
            relationship,
            args,
            transition,
            claim,
            ..
        } = req;
        let (mut rel, location) = match location_param {
            Some(param) => relationship_and_location(relationship, args.location, param)?,
            None => (
                relationship.ok_or_else(|| missing("a replication relationship"))?,
                PathBuf::new(),
            ),
        };
        let before = self.show_during(&vm, &mut rel, &transition)?;
        let (store, apply_wake) = (self.store.clone(), self.apply_wake.clone());
        let description = match location_param {
            Some(_) => format!("{what} of '{}' ({})", vm.name, location.display()),
            None => format!("{what} of '{}'", vm.name),
        };
        let (vm_id, mode) = (vm.id, vm.mode);
        // A failover cut off stays in 12, where RevertFailover cleans up what it made; any other
        // job cut off by a stop of the daemon puts the state back (Store::restore_interrupted_states).
        let restore = transition.job_type != vmreplica_core::job::JobType::InitiateFailover
            && transition.during.is_some();
        let (held, shown) = (claim.clone(), transition.during);
        let spawned = self.jobs.spawn(
            transition.job_type,
            Some(vm_id),
            description,
            cancellable,
            move |ctx| async move {
                let _held = held; // until the outcome is written
                let job_id = ctx.id().to_string();
                let given = rel.clone();
                let outcome = work(ctx, vm, rel, location, claim).await;
                let _ = store.forget_job_restore(&job_id);
                match outcome {
                    Ok(done) => {
                        let Done {
                            rel: done,
                            failover_over,
                            wake_apply,
                        } = done.into();
                        let written = store.update_relationship_and(
                            vm_id,
                            Some(transition.mode_after.as_u16()),
                            |cur| {
                                cur.rebase(&given, &done);
                                cur.state = transition.after.as_u16();
                            },
                            |tx| match failover_over {
                                true => failover::forget_in(tx, vm_id),
                                false => Ok(()),
                            },
                        )?;
                        if !written {
                            return Err(JobFailure::failed(
                                "the replication relationship was removed while the job ran",
                                "Enable replication again if it is still wanted.",
                            ));
                        }
                        if wake_apply {
                            apply_wake.notify_one();
                        }
                        Ok(())
                    }
                    Err(failure) => {
                        store.update_relationship(vm_id, Some(mode), |cur| cur.state = before)?;
                        Err(failure)
                    }
                }
            },
        );
        let job = spawned.inspect_err(|_| {
            // No job runs: the state shown for it goes (where nothing moved it since).
            if let Some(during) = shown {
                let _ = self.store.move_state(vm_id, during.as_u16(), before);
            }
        })?;
        if restore {
            self.store.put_job_restore(&job.id, vm_id, before)?;
        }
        Ok(job)
    }

    fn export(&self, req: EngineRequest) -> Result<JobRow, CommandError> {
        let (store, data_dir) = (self.store.clone(), self.data_dir.clone());
        self.spawn_with_outcome(
            req,
            Some("InitialReplicationExportLocation"),
            "Export the initial replica",
            true,
            move |ctx, vm, rel, location, claim| async move {
                let compression = rel.settings.compression_enabled;
                let interval = i64::from(rel.settings.replication_interval);
                let (id, hash) = (
                    vm.id,
                    initial::export(ctx, vm, location, compression, data_dir, claim).await?,
                );
                // The primary asks the replica each interval whether it imported this log.
                store
                    .put_chain(&crate::replication::chain::ChainRow {
                        vm: id,
                        last_sequence: 1,
                        last_log_hash: hash,
                        next_due: crate::clock::now() + interval,
                        retries: 0,
                        retry_at: 0,
                        last_error: None,
                    })
                    .map_err(JobFailure::from)?;
                Ok(rel)
            },
        )
    }

    /// Initial replication over the network: full (type 1) or seeded from the replica's copy
    /// (type 3). Both need certificate authentication.
    fn network(&self, req: EngineRequest, seeded: bool) -> Result<JobRow, CommandError> {
        self.compare_job(req, if seeded { Kind::Seeded } else { Kind::Full })
    }

    /// SetFailoverNetworkAdapterSettings on either side: stores the settings (by adapter and
    /// protocol; settings that ask for nothing clear that key, `FailoverNetworkSettings::is_clear`),
    /// which a failed-over replica's start command gets in `VMREPLICA_FAILOVER_NETWORK`
    /// (power::start). The state does not change.
    fn set_failover_network(&self, req: EngineRequest) -> Result<JobRow, CommandError> {
        let store = self.store.clone();
        let (vm, settings, claim) = (req.vm, req.args.failover_network, req.claim);
        let job = self.jobs.spawn(
            req.transition.job_type,
            Some(vm.id),
            format!("Set the failover network settings of '{}'", vm.name),
            false,
            move |_ctx| async move {
                let _claim = claim;
                store.put_failover_network(vm.id, &settings)?;
                tracing::info!(vm = %vm.id, entries = settings.len(), "failover network settings stored");
                Ok(())
            },
        )?;
        Ok(job)
    }

    /// Resynchronize (or RRSC(3) from 9/11) on a primary: 10 while it runs, then 3.
    fn resynchronize(&self, req: EngineRequest) -> Result<JobRow, CommandError> {
        self.compare_job(req, Kind::Resync)
    }

    fn compare_job(&self, req: EngineRequest, kind: Kind) -> Result<JobRow, CommandError> {
        let rel = req
            .relationship
            .as_ref()
            .ok_or_else(|| missing("a replication relationship"))?;
        if rel.settings.authentication_type != 2 {
            return Err(CommandError::new(
                ReturnCode::NotSupported,
                "initial replication over the network needs certificate authentication (AuthenticationType 2); Kerberos is not supported",
            ));
        }
        let job = network::NetworkIr {
            store: self.store.clone(),
            peers: self.peers.clone(),
            data_dir: self.data_dir.clone(),
        };
        let what = match kind {
            Kind::Seeded => "Seeded initial replication",
            Kind::Full => "Send the initial replica over the network",
            Kind::Resync => "Resynchronize",
        };
        let start = req.args.start_time;
        // From 11 a paused resynchronization goes on: what it hashed is kept (spec §13.6).
        let resume = rel.state == ReplicationState::ResynchronizationSuspended.as_u16();
        self.spawn_with_outcome(
            req,
            None,
            what,
            true,
            move |ctx, vm, rel, _, claim| async move {
                let _claim = claim; // held until the job ends
                wait_until(&ctx, start).await?;
                match kind {
                    Kind::Seeded => seeded::run(ctx, job, vm, rel).await,
                    Kind::Full => network::run(ctx, job, vm, rel).await,
                    Kind::Resync => seeded::resync(ctx, job, vm, rel, resume).await,
                }
            },
        )
    }

    /// Resume-VMReplication on a suspended primary: tracking went on while it was suspended, so
    /// resuming is making the next cycle due now; it ships everything that accumulated.
    fn resume(&self, req: EngineRequest) -> Result<JobRow, CommandError> {
        let store = self.store.clone();
        self.spawn_with_outcome(
            req,
            None,
            "Resume replication",
            false,
            move |_ctx, vm, rel, _, claim| async move {
                let _claim = claim;
                // Only the due time and the back-off: a cycle that ends meanwhile writes the rest.
                store
                    .due_now(vm.id, crate::clock::now())
                    .map_err(JobFailure::from)?;
                Ok(rel)
            },
        )
    }

    /// RRSC(4) on a primary (Start-VMFailover -Prepare): the final log, then state 4 with the VM
    /// locked from starting (`service::vms`). Any failure puts the state back to 3.
    fn prepare_failover(&self, req: EngineRequest) -> Result<JobRow, CommandError> {
        let primary = self.primary.clone();
        self.spawn_with_outcome(
            req,
            None,
            "Prepare the planned failover",
            false,
            move |_ctx, vm, mut rel, _, claim| async move {
                let _claim = claim;
                let (_, point_time) = primary.final_log(&vm).await.map_err(|why| {
                    JobFailure::failed(
                        format!("the final log was not applied on the recovery server: {why}"),
                        "Check the connection to the recovery server and try again; the VM stays protected.",
                    )
                })?;
                rel.last_replication_time = Some(point_time);
                rel.last_replication_type = vmreplica_core::state::ReplicationType::Planned.as_u16();
                Ok(rel)
            },
        )
    }

    fn import(&self, req: EngineRequest) -> Result<JobRow, CommandError> {
        let (store, data_dir) = (self.store.clone(), self.data_dir.clone());
        self.spawn_with_outcome(
            req,
            Some("InitialReplicationImportLocation"),
            "Import the initial replica",
            false,
            move |ctx, vm, rel, location, claim| async move {
                let job = initial::Import {
                    store,
                    vm,
                    location,
                    data_dir,
                    claim,
                };
                initial::import(ctx, job, rel).await
            },
        )
    }
}
