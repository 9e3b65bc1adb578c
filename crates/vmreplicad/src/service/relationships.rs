//! Replication relationships: the state machine's verdict, settings, and the operations it allows.

use super::*;

impl Service {
    pub(super) fn facts(&self, vm: &VmRow, rel: Option<&RelationshipRow>) -> Facts {
        Facts {
            vm_running: power::enabled_state(&vm.power) == 2,
            has_received_replication: rel.is_some_and(|r| r.last_replication_time.is_some()),
            test_system_exists: self.store.test_system_of(vm.id).ok().flatten().is_some(),
            relationship_exists: rel.is_some(),
            failed_over_planned: rel
                .is_some_and(|r| r.failed_over_type == ReplicationType::Planned.as_u16()),
        }
    }

    /// The state machine's verdict on `op` for this VM now.
    pub(super) fn decide(
        &self,
        vm: &VmRow,
        op: Operation,
    ) -> Result<(Option<RelationshipRow>, Transition), CommandError> {
        let rel = self.store.get_relationship(vm.id)?;
        let mode = ReplicationMode::from_u16(vm.mode).unwrap_or(ReplicationMode::None);
        let state = rel
            .as_ref()
            .and_then(|r| ReplicationState::from_u16(r.state))
            .unwrap_or(ReplicationState::Disabled);
        let facts = self.facts(vm, rel.as_ref());
        let t = decide(mode, state, op, &facts).map_err(|r| CommandError::new(r.code, r.reason))?;
        Ok((rel, t))
    }

    /// Checks the included disks name this VM's disks (by SASD path, InstanceID or image path);
    /// an empty list means all disks, as Enable-VMReplication does.
    pub(super) fn resolve_included_disks(
        &self,
        vm: &VmRow,
        settings: &mut ReplicationSettings,
    ) -> Result<(), CommandError> {
        if settings.included_disks.is_empty() {
            settings.included_disks = (0..vm.disks.len())
                .map(|i| crate::wbem::objects::sasd_instance_id(vm.id, i))
                .collect();
            return Ok(());
        }
        let mut resolved = Vec::new();
        for d in &settings.included_disks {
            let index = crate::wbem::objects::disk_index(vm, d).ok_or_else(|| {
                invalid(format!(
                    "IncludedDisks: '{d}' is not a disk of VM '{}'",
                    vm.name
                ))
            })?;
            resolved.push(crate::wbem::objects::sasd_instance_id(vm.id, index));
        }
        settings.included_disks = resolved;
        Ok(())
    }

    pub(super) fn create_relationship(
        &self,
        vm: &VmRef,
        settings: ReplicationSettings,
    ) -> CommandResult {
        self.write_settings(vm, settings, Operation::CreateReplicationRelationship)
    }

    pub(super) fn modify_relationship(
        &self,
        vm: &VmRef,
        settings: ReplicationSettings,
    ) -> CommandResult {
        self.write_settings(vm, settings, Operation::ModifyReplicationSettings)
    }

    /// CreateReplicationRelationship (a new relationship, primary side) or ModifyReplicationSettings
    /// (the existing one): validated settings written by a job.
    pub(super) fn write_settings(
        &self,
        vm: &VmRef,
        mut settings: ReplicationSettings,
        op: Operation,
    ) -> CommandResult {
        let (vm, claim) = self.claimed_vm(vm)?;
        let (rel, t) = self.decide(&vm, op)?;
        if op == Operation::CreateReplicationRelationship && self.in_flight.contains(vm.id) {
            // A removed relationship's cycle still holds the VM's files or QEMU process (and its
            // tracking ends once it ended, unless a new relationship came first).
            return Err(CommandError::new(
                ReturnCode::SystemInUse,
                format!(
                    "a replication cycle of the earlier relationship of '{}' is still ending; try again shortly",
                    vm.name
                ),
            ));
        }
        settings.validate().map_err(settings_error)?;
        if let Some(provider) = &settings.replication_provider {
            // The CIM layer maps the built-in provider to None; anything left is another provider.
            return Err(CommandError::new(
                ReturnCode::NotSupported,
                format!("ReplicationProvider '{provider}': only the built-in host-to-host provider is supported"),
            ));
        }
        self.resolve_included_disks(&vm, &mut settings)?;
        self.refuse_engineless(&t, &op.name())?;
        let (mut rel, what) = match (op, rel) {
            (Operation::ModifyReplicationSettings, Some(r)) => (r, "Modify replication of"),
            (Operation::ModifyReplicationSettings, None) => {
                return Err(CommandError::new(
                    ReturnCode::InvalidState,
                    "the VM has no relationship",
                ))
            }
            _ => {
                let mut fresh = RelationshipRow::new(vm.id, now());
                fresh.primary_connection_point = Some(self.host.clone());
                (fresh, "Enable replication of")
            }
        };
        // A primary's relationship lives on both hosts: the job creates (Create) or updates (Modify)
        // the placeholder replica on the recovery server (docs/protocol.md §5.2) before it writes
        // its own row, with this host's certificate, which must therefore be in the store now.
        let primary = t.mode_after == ReplicationMode::Primary;
        if primary {
            let thumb = settings
                .certificate_thumbprint
                .as_deref()
                .unwrap_or_default();
            crate::replication::peer_certs::find_identity(&self.cert_dir, thumb).map_err(|e| {
                invalid(format!("CertificateThumbPrint: {}", crate::error_chain(&e)))
            })?;
        }
        rel.settings = settings;
        rel.state = t.after.as_u16();
        let store = self.store.clone();
        let mode = t.mode_after.as_u16();
        let (peers, host) = (self.peers.clone(), self.host.clone());
        self.job(
            t.job_type,
            Some(claim),
            &format!("{what} '{}'", vm.name),
            move |ctx| async move {
                ctx.check_cancelled()?;
                if primary {
                    let target = crate::engine::network::target(&rel);
                    let put = crate::engine::network::put_vm(&vm, &rel, &host, 1)?;
                    let mut session = peers
                        .connect(&target)
                        .await
                        .map_err(|e| e.into_failure("connecting to the recovery server"))?;
                    ctx.progress(50)?;
                    session
                        .json::<_, wire::protocol::ReplicaVm>(
                            wire::protocol::Route::PutVm(vm.id),
                            Some(&put),
                        )
                        .await
                        .map_err(|e| {
                            e.into_failure("creating the replica VM on the recovery server")
                        })?;
                }
                store.put_relationship(&rel, mode)?;
                tracing::info!(vm = %rel.vm, "replication settings written");
                Ok(())
            },
        )
    }

    pub(super) fn remove_relationship(&self, vm: &VmRef) -> CommandResult {
        let (vm, claim) = self.claimed_vm(vm)?;
        let (_, t) = self.decide(&vm, Operation::RemoveReplicationRelationship)?;
        self.refuse_engineless(&t, "RemoveReplicationRelationship")?;
        let store = self.store.clone();
        let in_flight = self.in_flight.clone();
        let claims = self.claims.clone();
        let wait = self.removal_wait;
        let id = vm.id;
        // A primary's tracking ends with it; a replica VM keeps its files (its points, and the
        // disks a failover left it on).
        let data_dir = self
            .engine
            .data_dir()
            .filter(|_| vm.mode == ReplicationMode::Primary.as_u16())
            .map(std::path::Path::to_path_buf);
        let replica = vm.mode == ReplicationMode::Replica.as_u16();
        self.job(
            t.job_type,
            Some(claim),
            &format!("Remove replication of '{}'", vm.name),
            move |ctx| async move {
                ctx.check_cancelled()?;
                // Not while a log of it is being applied: it would land after its log was dropped.
                let applying = claims.applying(id).await;
                let dropped = store.remove_relationship(id)?;
                drop(applying);
                // Logs committed and not applied yet never will be (only a replica's are, and the
                // chain they continue ends here): the VM keeps its latest applied point.
                crate::replication::resync::remove_log_files(&store, id, &dropped);
                if replica {
                    if let Some(last) = dropped.last() {
                        tracing::info!(vm = %id, logs = ?dropped, "logs received and not applied are dropped with the relationship");
                        ctx.note(&format!(
                            "{} received log(s) not applied yet were dropped (up to {last}): the VM keeps its latest applied recovery point",
                            dropped.len()
                        ))?;
                    }
                }
                // No cycle starts without the relationship; the one in flight, if any, stops
                // uploading and ends before the chain goes, so nothing of it lands on a chain
                // enabled again later (and should it outlast the wait, its outcome finds no chain
                // to write to).
                let ended = in_flight
                    .stop_and_wait(id, wait)
                    .await;
                if !ended {
                    tracing::warn!(vm = %id, "removed while a log is still in flight");
                }
                store.remove_chain(id)?;
                match data_dir {
                    // Its cycle still holds the VM's QEMU process or files: ended after it.
                    Some(data_dir) if !ended => {
                        ctx.note(
                            "Its tracking was not ended yet: a replication cycle was still running; it ends once that cycle ended",
                        )?;
                        tokio::spawn(release_later(
                            store.clone(),
                            in_flight,
                            claims,
                            vm.clone(),
                            data_dir,
                        ));
                    }
                    Some(data_dir) => {
                        let problems = crate::engine::release(&vm, &data_dir).await;
                        if !problems.is_empty() {
                            tracing::warn!(vm = %id, "ending its tracking: {}", problems.join("; "));
                            ctx.note(&format!(
                                "Its tracking was not ended everywhere: {}",
                                problems.join("; ")
                            ))?;
                        }
                    }
                    None => {}
                }
                tracing::info!(vm = %id, "replication relationship removed");
                Ok(())
            },
        )
    }

    /// Operations that follow the state machine. Those needing a data-plane engine answer 32770
    /// after their parameters and state were checked; the others change state in a job.
    pub(super) fn replication(
        &self,
        vm: &VmRef,
        op: Operation,
        mut args: OperationArgs,
    ) -> CommandResult {
        args.failover_network = failover_network(op, &args.failover_network)?;
        let own_command = match op {
            Operation::CreateReplicationRelationship => Some("create_replication_relationship"),
            Operation::ModifyReplicationSettings => Some("modify_replication_settings"),
            Operation::RemoveReplicationRelationship => Some("remove_replication_relationship"),
            Operation::GetReplicationStatistics => Some("get_replication_statistics"),
            Operation::ResetReplicationStatistics => Some("reset_replication_statistics"),
            _ => None,
        };
        if let Some(command) = own_command {
            return Err(invalid(format!(
                "{} has its own command: use '{command}'",
                op.name()
            )));
        }
        // Stop-VMReplication (9) or Suspend-VMReplication (7, → 11) while a resynchronization
        // runs: its job holds the VM, so it is cancelled first, then the state is written.
        if let Some(output) = self.stop_resync(vm, op)? {
            return Ok(output);
        }
        // Suspend-VMReplication while a network initial replication runs (2, spec §3.3), and
        // Resume-VMReplication of one suspended so.
        if let Some(output) = self.suspend_initial_replication(vm, op)? {
            return Ok(output);
        }
        if let Some(output) = self.resume_initial_replication(vm, op)? {
            return Ok(output);
        }
        let (vm, claim) = self.claimed_vm(vm)?;
        check_args(op, &args)?;
        let (rel, t) = self.decide(&vm, op)?;
        if matches!(op, Operation::StartReplication(_)) {
            // An initial replication starts: whatever suspended an earlier one is over.
            self.store.set_initial_suspended(vm.id, false)?;
        }
        if let Some(s) = &args.settings {
            s.validate().map_err(settings_error)?;
        }
        // Failover network settings are stored by a job (engine::set_failover_network) and handed
        // to a failed-over VM's start command (power::start). A reverse after a planned failover changes the other host too (engine/reverse.rs); after
        // an unplanned one this host alone goes to 9 until a Resynchronize.
        let planned_reverse = op == Operation::ReverseReplicationRelationship
            && rel
                .as_ref()
                .is_some_and(|r| r.failed_over_type == ReplicationType::Planned.as_u16());
        if t.moves_data || op == Operation::SetFailoverNetworkAdapterSettings || planned_reverse {
            let request = EngineRequest {
                vm,
                relationship: rel,
                operation: op,
                args,
                transition: t,
                claim,
            };
            let (vm_id, test) = (request.vm.id, op == Operation::TestReplicaSystem);
            let job = job_view(&self.engine.start(request)?);
            if test {
                if let Some(t) = self.store.test_system_of(vm_id)? {
                    return Ok(CommandOutput::JobWithSystem {
                        job,
                        system: t.test_vm,
                    });
                }
            }
            return Ok(CommandOutput::Job(job));
        }
        let rel_existed = rel.is_some();
        let mut rel = match rel {
            Some(r) => r,
            // RequestReplicationStateChange(2) on a VM with no relationship makes it a replica that
            // waits for initial replication (Enable-VMReplication -AsReplica).
            None => RelationshipRow::new(vm.id, now()),
        };
        let mode = t.mode_after.as_u16();
        if let Some(during) = t.during {
            // While the change is in progress, ReplicationState already reads as the requested value.
            rel.state = during.as_u16();
            if !(rel_existed
                && self
                    .store
                    .update_relationship(vm.id, Some(mode), |cur| cur.state = rel.state)?)
            {
                self.store.put_relationship(&rel, mode)?;
            }
        }
        rel.state = t.after.as_u16();
        if op == Operation::ReverseReplicationRelationship {
            // The settings of the new direction: the old primary is now the recovery server.
            if let Some(s) = args.settings.clone() {
                rel.settings = s;
                rel.primary_connection_point = Some(self.host.clone());
                rel.authorization_entry = None;
            }
        }
        let store = self.store.clone();
        let what = format!("{} on '{}'", op.name(), vm.name);
        // A suspended primary sends nothing: the job ends once the log in flight (if any) did.
        let in_flight = (t.after == ReplicationState::Suspended
            && vm.mode == ReplicationMode::Primary.as_u16())
        .then(|| self.in_flight.clone());
        // The row exists by now also when the in-progress state was written for a new one.
        let existed = rel_existed || t.during.is_some();
        let reverse = op == Operation::ReverseReplicationRelationship && args.settings.is_some();
        self.job(t.job_type, Some(claim), &what, move |ctx| async move {
            ctx.check_cancelled()?;
            // On the row as it is now: an apply or a commit may have written it since it was read.
            let changed = existed
                && store.update_relationship(rel.vm, Some(mode), |cur| {
                    cur.state = rel.state;
                    if reverse {
                        cur.settings = rel.settings.clone();
                        cur.primary_connection_point = rel.primary_connection_point.clone();
                        cur.authorization_entry = None;
                    }
                })?;
            if !changed {
                store.put_relationship(&rel, mode)?;
            }
            if let Some(f) = in_flight {
                if !f
                    .wait_idle(rel.vm, std::time::Duration::from_secs(600))
                    .await
                {
                    tracing::warn!(vm = %rel.vm, "suspended while a log is still in flight");
                }
            }
            Ok(())
        })
    }

    /// RRSC 9 or 7 on a primary whose resynchronization job (107, or 96 for an RRSC 3) runs: a
    /// job that cancels it, waits for it to end (its outcome puts the state back to 9), then writes
    /// 9 or 11. A pause (11) keeps what was hashed (`seeded::hash_kept` on a turned-off VM; the
    /// replica records its hashes of its point as it goes, `prehash::Journal`) and a resume goes on
    /// from there; after a stop (9) this host's next one starts over. None when no
    /// resynchronization runs.
    fn stop_resync(
        &self,
        vm: &VmRef,
        op: Operation,
    ) -> Result<Option<CommandOutput>, CommandError> {
        let to = match op {
            Operation::RequestReplicationStateChange(RequestedState::CancelResynchronize) => {
                ReplicationState::WaitingToStartResynchronization
            }
            Operation::RequestReplicationStateChange(RequestedState::Suspend) => {
                ReplicationState::ResynchronizationSuspended
            }
            _ => return Ok(None),
        };
        let found = self.resolve_vm(vm)?;
        let resyncing = self.store.get_relationship(found.id)?.is_some_and(|r| {
            r.state == ReplicationState::Resynchronizing.as_u16()
                && found.mode == ReplicationMode::Primary.as_u16()
        });
        let running = self.running_jobs(
            found.id,
            &[JobType::Resynchronizing, JobType::ReplicateStateChange],
        )?;
        if !resyncing || running.is_empty() {
            return Ok(None);
        }
        // The resync's job puts the state back to 9 when it ends and lets the VM go.
        self.after_stopping(
            &found,
            op,
            running,
            "resynchronization",
            move |store, id| async move {
                if let (Some(v), Some(mut rel)) = (store.get_vm(id)?, store.get_relationship(id)?) {
                    // Not over a resync that completed meanwhile.
                    let stopped = [
                        ReplicationState::WaitingToStartResynchronization,
                        ReplicationState::Resynchronizing,
                        ReplicationState::ResynchronizationSuspended,
                    ]
                    .map(ReplicationState::as_u16);
                    if stopped.contains(&rel.state) {
                        rel.state = to.as_u16();
                        store.put_relationship(&rel, v.mode)?;
                    }
                }
                Ok(())
            },
        )
    }

    /// RRSC 7 on a primary whose network initial replication (job 94) runs, in state 2 (spec §3.3
    /// allows a suspend from 2): a job that cancels it (the scan and the upload stop at once; the
    /// replica keeps what arrived), waits for it to end (its outcome puts the state back to 1),
    /// then writes 7 and remembers the initial replication was suspended, so that a resume runs it
    /// again (`resume_initial_replication`), continuing where the replica stands. If it completed
    /// meanwhile (3), the suspend is an ordinary one. None when no such job runs.
    fn suspend_initial_replication(
        &self,
        vm: &VmRef,
        op: Operation,
    ) -> Result<Option<CommandOutput>, CommandError> {
        if op != Operation::RequestReplicationStateChange(RequestedState::Suspend) {
            return Ok(None);
        }
        let found = self.resolve_vm(vm)?;
        let sending = found.mode == ReplicationMode::Primary.as_u16()
            && self.store.get_relationship(found.id)?.is_some_and(|r| {
                r.state == ReplicationState::WaitingToCompleteInitialReplication.as_u16()
            });
        let running = self.running_jobs(found.id, &[JobType::StartInbandInitialReplication])?;
        if !sending || running.is_empty() {
            return Ok(None);
        }
        let in_flight = self.in_flight.clone();
        self.after_stopping(
            &found,
            op,
            running,
            "initial replication",
            move |store, id| async move {
                match store.suspend_ended_initial_replication(id)? {
                    None => Ok(()),
                    Some(s) if s == ReplicationState::ReadyForReplication.as_u16() => Ok(()),
                    Some(s) if s == ReplicationState::Replicating.as_u16() => {
                        // It completed meanwhile: an ordinary suspend, after the log in flight.
                        if !in_flight
                            .wait_idle(id, std::time::Duration::from_secs(600))
                            .await
                        {
                            tracing::warn!(vm = %id, "suspended while a log is still in flight");
                        }
                        Ok(())
                    }
                    Some(s) => Err(JobFailure::failed(
                        format!(
                            "the initial replication ended in state {s}: nothing was suspended"
                        ),
                        "Look at the replication state, and suspend again if it is still wanted.",
                    )),
                }
            },
        )
    }

    /// A job for `op` on `found` that cancels its jobs `running` (they hold the VM; `stops` says
    /// what they do), waits for them to end and let the VM go, then runs `then` holding its claim.
    fn after_stopping<F, Fut>(
        &self,
        found: &VmRow,
        op: Operation,
        running: Vec<String>,
        stops: &'static str,
        then: F,
    ) -> Result<Option<CommandOutput>, CommandError>
    where
        F: FnOnce(Arc<Store>, Uuid) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), JobFailure>> + Send + 'static,
    {
        let (store, claims, jobs, id) = (
            self.store.clone(),
            self.claims.clone(),
            self.jobs.clone(),
            found.id,
        );
        let what = format!("{} on '{}' (stops its {stops})", op.name(), found.name);
        let job = self.jobs.spawn(
            op.job_type(),
            Some(id),
            what,
            false,
            move |_ctx| async move {
                for job in &running {
                    let _ = jobs.cancel(job);
                }
                let _claim = claim_once_ended(&store, &claims, id, &running, stops).await?;
                then(store, id).await
            },
        )?;
        Ok(Some(CommandOutput::Job(job_view(&job))))
    }

    /// RRSC 3 on a primary in 7 whose network initial replication was suspended while it ran
    /// (and none arrived since): back to 1, and StartReplication (1) again, whose job is the
    /// answer; it continues where the replica stands (docs/protocol.md §5.3). None otherwise.
    fn resume_initial_replication(
        &self,
        vm: &VmRef,
        op: Operation,
    ) -> Result<Option<CommandOutput>, CommandError> {
        if op != Operation::RequestReplicationStateChange(RequestedState::Replicating) {
            return Ok(None);
        }
        let found = self.resolve_vm(vm)?;
        let Some(rel) = self.store.get_relationship(found.id)? else {
            return Ok(None);
        };
        let suspended = found.mode == ReplicationMode::Primary.as_u16()
            && rel.state == ReplicationState::Suspended.as_u16()
            && rel.last_replication_time.is_none()
            && self.store.initial_suspended(found.id)?;
        if !suspended {
            return Ok(None);
        }
        let (suspended, ready) = (
            ReplicationState::Suspended.as_u16(),
            ReplicationState::ReadyForReplication.as_u16(),
        );
        if !self.store.move_state(found.id, suspended, ready)? {
            return Ok(None); // (moved meanwhile: decided as it is now)
        }
        let start = Operation::StartReplication(vmreplica_core::InitialReplicationType::Network);
        match self.replication(vm, start, OperationArgs::default()) {
            Ok(output) => Ok(Some(output)),
            Err(e) => {
                if self.store.move_state(found.id, ready, suspended)? {
                    self.store.set_initial_suspended(found.id, true)?;
                }
                Err(e)
            }
        }
    }

    /// The jobs of `types` running for `vm`.
    fn running_jobs(&self, vm: Uuid, types: &[JobType]) -> Result<Vec<String>, CommandError> {
        Ok(self
            .store
            .list_jobs()?
            .into_iter()
            .filter(|j| {
                j.vm == Some(vm)
                    && types.iter().any(|t| t.as_u16() == j.job_type)
                    && !vmreplica_core::job::JobState::from_u16(j.state)
                        .is_some_and(|s| s.is_terminal())
            })
            .map(|j| j.id)
            .collect())
    }

    pub(super) fn refuse_engineless(&self, t: &Transition, what: &str) -> Result<(), CommandError> {
        if t.moves_data {
            return Err(CommandError::new(
                ReturnCode::NotSupported,
                format!("{what}: the data-plane engine for this operation is not implemented yet"),
            ));
        }
        Ok(())
    }
}

/// `vm`'s claim once the jobs `running` (cancelled) ended and let it go; fails after 2 minutes.
async fn claim_once_ended(
    store: &Store,
    claims: &VmClaims,
    vm: Uuid,
    running: &[String],
    what: &str,
) -> Result<crate::claims::VmClaim, JobFailure> {
    let deadline = crate::clock::now() + 120;
    loop {
        let ended = running.iter().all(|j| {
            store.get_job(j).ok().flatten().is_none_or(|j| {
                vmreplica_core::job::JobState::from_u16(j.state).is_some_and(|s| s.is_terminal())
            })
        });
        if ended {
            if let Some(c) = claims.claim(vm) {
                return Ok(c);
            }
        }
        if crate::clock::now() > deadline {
            return Err(JobFailure::failed(
                format!("the {what} did not stop within 2 minutes"),
                "Cancel its job and try again.",
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The failover IP settings of SetFailoverNetworkAdapterSettings, checked and normalized (from
/// every front end; a mixed entry split per protocol); one entry per adapter and protocol. Other
/// operations take none.
fn failover_network(
    op: Operation,
    given: &[vmreplica_core::settings::FailoverNetworkSettings],
) -> Result<Vec<vmreplica_core::settings::FailoverNetworkSettings>, CommandError> {
    if op != Operation::SetFailoverNetworkAdapterSettings {
        return match given.is_empty() {
            true => Ok(Vec::new()),
            false => Err(invalid(format!(
                "{} takes no failover network settings",
                op.name()
            ))),
        };
    }
    let mut out: Vec<vmreplica_core::settings::FailoverNetworkSettings> = Vec::new();
    for given in given {
        let parts = given
            .normalized()
            .map_err(|e| CommandError::new(e.return_code(), format!("NetworkSettings: {e}")))?;
        for s in parts {
            if out
                .iter()
                .any(|o| (o.adapter, o.protocol_if_type) == (s.adapter, s.protocol_if_type))
            {
                return Err(invalid(format!(
                    "NetworkSettings: two entries for adapter {} and ProtocolIFType {}",
                    s.adapter, s.protocol_if_type
                )));
            }
            out.push(s);
        }
    }
    Ok(out)
}

/// Parameters an operation cannot do without, checked before the state.
fn check_args(op: Operation, args: &OperationArgs) -> Result<(), CommandError> {
    let missing = |what: &str| Err(invalid(format!("{}: {what} is required", op.name())));
    match op {
        Operation::StartReplication(vmreplica_core::state::InitialReplicationType::Export)
            if args.location.as_deref().is_none_or(str::is_empty) =>
        {
            missing("InitialReplicationExportLocation")
        }
        Operation::ImportInitialReplica if args.location.as_deref().is_none_or(str::is_empty) => {
            missing("InitialReplicationImportLocation")
        }
        Operation::ReverseReplicationRelationship | Operation::InitiateFailback
            if args.settings.is_none() =>
        {
            missing("ReplicationSettingData")
        }
        Operation::RequestReplicationStateChange(RequestedState::SyncedReplicationComplete) => {
            Ok(())
        }
        _ => Ok(()),
    }
}

/// After a removal whose replication cycle outlived the job's wait: ends the VM's tracking
/// (`engine::release`) once that cycle ended, checked every 5 s for at most a day, holding the VM's
/// claim while it releases; what stays (a QEMU process still not answering, a file in use) is
/// tried again every minute for an hour. Nothing is done if the VM has a relationship again by
/// then (its tracking is the new relationship's); `removed` is the VM as it was, for a VM deleted
/// meanwhile. A stop of the daemon ends the wait: its `tracking/<VMID>/` then stays.
async fn release_later(
    store: Arc<Store>,
    in_flight: Arc<crate::replication::primary::InFlight>,
    claims: VmClaims,
    removed: VmRow,
    data_dir: std::path::PathBuf,
) {
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
    const AGAIN: std::time::Duration = std::time::Duration::from_secs(60);
    const TRIES: u32 = 60;
    let vm = removed.id;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut problems = Vec::new();
    let mut tries = 0;
    loop {
        // (A store that cannot be read is asked again.)
        let enabled_again = || matches!(store.get_relationship(vm), Ok(Some(_)));
        if enabled_again() {
            return;
        }
        let mut wait = std::time::Duration::from_secs(5);
        if !in_flight.contains(vm) {
            if let Some(claim) = claims.claim(vm) {
                // Under the claim no relationship, hence no cycle, can begin.
                let row = match store.get_vm(vm) {
                    Ok(Some(row)) => Some(row),
                    Ok(None) => Some(removed.clone()),
                    Err(_) => None,
                };
                if let Some(row) = row.filter(|_| !enabled_again() && !in_flight.contains(vm)) {
                    problems = crate::engine::release(&row, &data_dir).await;
                    drop(claim);
                    tries += 1;
                    if problems.is_empty() {
                        tracing::info!(%vm, "its tracking ended after the replication cycle that outlived its removal");
                        return;
                    }
                    if tries >= TRIES {
                        tracing::warn!(%vm, "ending its tracking: {}", problems.join("; "));
                        return;
                    }
                    tracing::info!(%vm, "ending its tracking, tried again in a minute: {}", problems.join("; "));
                    wait = AGAIN;
                }
            }
        }
        if tokio::time::Instant::now() + wait >= deadline {
            if problems.is_empty() {
                tracing::warn!(%vm, "its tracking stays: the replication cycle that outlived its removal has not ended in a day");
            } else {
                tracing::warn!(%vm, "ending its tracking: {}", problems.join("; "));
            }
            return;
        }
        tokio::time::sleep(wait).await;
    }
}
