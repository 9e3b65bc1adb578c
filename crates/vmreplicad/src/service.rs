//! The service: executes [`Command`]s for every front end.
//!
//! Each replication command asks the core's state machine (`decide`) whether it is allowed in the
//! VM's current (mode, state) and what follows, validates settings with the core, and only then does
//! the work — synchronously, or as a job. Operations whose data-plane engine does not exist yet are
//! refused with 32770 (Not supported) after their parameters and state were checked: nothing
//! pretends to have moved data.

use std::path::PathBuf;
use std::sync::Arc;

use uuid::Uuid;
use vmreplica_core::codes::ReturnCode;
use vmreplica_core::command::{
    Command, CommandError, CommandOutput, JobView, OperationArgs, StatisticsView, StatusRow,
    VmDefinition, VmRef, VmView,
};
use vmreplica_core::health::{evaluate_health, HealthInputs};
use vmreplica_core::job::JobType;
use vmreplica_core::machine::{decide, Facts, Operation, RequestedState, Transition};
use vmreplica_core::settings::{AuthorizationEntry, ReplicationSettings, ServiceSettings};
use vmreplica_core::state::{
    ReplicationHealth, ReplicationMode, ReplicationState, ReplicationType,
};

use crate::claims::{VmClaim, VmClaims};
use crate::clock::now;
use crate::engine::{DataPlane, EngineRequest};
use crate::jobs::{JobEngine, JobFailure};
use crate::power;
use crate::store::{JobRow, RelationshipRow, Store, StoreError, VmRow};

pub type CommandResult = Result<CommandOutput, CommandError>;

pub struct Service {
    pub store: Arc<Store>,
    pub jobs: Arc<JobEngine>,
    /// This host's name, as `Msvm_ComputerSystem.Name` of the host and `SystemName` of the services.
    pub host: String,
    /// Certificate store directory (the equivalent of LocalMachine\My).
    pub cert_dir: PathBuf,
    /// Runs the operations that move data.
    pub engine: Arc<dyn DataPlane>,
    /// One state-changing command or job per VM at a time.
    pub claims: VmClaims,
}

impl From<StoreError> for CommandError {
    fn from(e: StoreError) -> Self {
        CommandError::new(
            ReturnCode::Failed,
            format!("metadata store: {}", crate::error_chain(&e)),
        )
    }
}

/// Replica states in which losing the authorization entry stops replication (→ 8 Critical).
const STOPPED_BY_LOST_AUTHORIZATION: [ReplicationState; 5] = [
    ReplicationState::WaitingToCompleteInitialReplication,
    ReplicationState::Replicating,
    ReplicationState::Suspended,
    ReplicationState::Resynchronizing,
    ReplicationState::ResynchronizationSuspended,
];

fn invalid(message: impl Into<String>) -> CommandError {
    CommandError::new(ReturnCode::InvalidParameter, message)
}

impl Service {
    pub async fn execute(&self, cmd: Command) -> CommandResult {
        match cmd {
            Command::AddVm(def) => self.add_vm(def),
            Command::ListVms => {
                let vms = self
                    .store
                    .list_vms()?
                    .iter()
                    .map(|v| self.vm_view(v))
                    .collect::<Result<_, _>>()?;
                Ok(CommandOutput::Vms { vms })
            }
            Command::GetServiceSettings => Ok(CommandOutput::ServiceSettings(
                self.store.service_settings()?,
            )),
            Command::ModifyServiceSettings(s) => self.modify_service_settings(s),
            Command::ListAuthorizationEntries => Ok(CommandOutput::AuthorizationEntries {
                entries: self.store.authorization_entries()?,
            }),
            Command::AddAuthorizationEntry(e) => self.add_authorization_entry(e),
            Command::ModifyAuthorizationEntry(e) => self.modify_authorization_entry(e),
            Command::RemoveAuthorizationEntry {
                allowed_primary_host_system,
            } => self.remove_authorization_entry(&allowed_primary_host_system),
            Command::SetAuthorizationEntry { vm, entry } => {
                self.set_authorization_entry(&vm, entry)
            }
            Command::CreateReplicationRelationship { vm, settings } => {
                self.create_relationship(&vm, settings)
            }
            Command::ModifyReplicationSettings { vm, settings } => {
                self.modify_relationship(&vm, settings)
            }
            Command::RemoveReplicationRelationship { vm } => self.remove_relationship(&vm),
            Command::GetReplicationSettings { vm } => {
                let vm = self.resolve_vm(&vm)?;
                match self.store.get_relationship(vm.id)? {
                    Some(rel) => Ok(CommandOutput::ReplicationSettings(rel.settings)),
                    None => Err(CommandError::new(
                        ReturnCode::InvalidState,
                        format!("replication is not enabled for '{}'", vm.name),
                    )),
                }
            }
            Command::Replication {
                vm,
                operation,
                args,
            } => self.replication(&vm, operation, args),
            Command::GetReplicationStatistics { vm } => self.statistics(&vm),
            Command::ResetReplicationStatistics { vm } => self.reset_statistics(&vm),
            Command::GetSystemCertificates => {
                let encoded = crate::certs::system_certificates(&self.cert_dir)
                    .map_err(|e| CommandError::new(ReturnCode::Failed, crate::error_chain(&e)))?;
                Ok(CommandOutput::Certificates { encoded })
            }
            Command::TestReplicationConnection {
                recovery_connection_point,
                recovery_server_port_number,
                authentication_type,
                certificate_thumbprint,
                bypass_proxy_server,
            } => {
                let settings = ReplicationSettings {
                    recovery_connection_point,
                    recovery_server_port_number,
                    authentication_type,
                    certificate_thumbprint,
                    bypass_proxy_server,
                    ..ReplicationSettings::default()
                };
                settings.validate().map_err(settings_error)?;
                Err(CommandError::new(
                    ReturnCode::NotSupported,
                    "TestReplicationConnection: the host-to-host protocol is not implemented yet",
                ))
            }
            Command::SetPowerState { vm, requested } => self.set_power_state(&vm, requested).await,
            Command::DestroySystem { vm } => {
                let vm = self.resolve_vm(&vm)?;
                if vm.mode != ReplicationMode::TestReplica.as_u16() {
                    return Err(CommandError::new(
                        ReturnCode::InvalidState,
                        format!("'{}' is not a test VM; DestroySystem removes only VMs made by TestReplicaSystem", vm.name),
                    ));
                }
                Err(CommandError::new(
                    ReturnCode::NotSupported,
                    "removing test VMs is not implemented yet",
                ))
            }
            Command::Status => self.status(),
            Command::ListJobs => {
                let jobs = self.store.list_jobs()?.iter().map(job_view).collect();
                Ok(CommandOutput::Jobs { jobs })
            }
            Command::GetJob { id } => match self.store.get_job(&id)? {
                Some(job) => Ok(CommandOutput::Job(job_view(&job))),
                None => Err(invalid(format!("no job with InstanceID '{id}'"))),
            },
            Command::CancelJob { id } => {
                self.jobs
                    .cancel(&id)
                    .map_err(|e| CommandError::new(ReturnCode::InvalidState, e.to_string()))?;
                Ok(CommandOutput::Completed)
            }
        }
    }

    // ---- VMs ----

    fn add_vm(&self, def: VmDefinition) -> CommandResult {
        let name = def.name.trim();
        if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
            return Err(invalid("the VM name must be 1 to 100 printable characters"));
        }
        if Uuid::parse_str(name.trim_matches(['{', '}'])).is_ok() {
            return Err(invalid(format!(
                "the VM name '{name}' is a GUID; a name must not look like a VM's id"
            )));
        }
        if def.disks.is_empty() {
            return Err(invalid("a VM needs at least one disk (--disk PATH)"));
        }
        let mut disks = Vec::new();
        for d in &def.disks {
            let path = std::path::Path::new(d);
            if !path.is_absolute() {
                return Err(invalid(format!("disk path '{d}' must be absolute")));
            }
            if !path.is_file() {
                return Err(CommandError::new(
                    ReturnCode::FileNotFound,
                    format!("disk image '{d}' does not exist"),
                ));
            }
            disks.push(d.clone());
        }
        if self.store.find_vm_by_name(name)?.is_some() {
            return Err(invalid(format!("a VM named '{name}' already exists")));
        }
        let id = def.id.unwrap_or_else(Uuid::new_v4);
        if self.store.get_vm(id)?.is_some() {
            return Err(invalid(format!("a VM with GUID {id} already exists")));
        }
        let row = VmRow {
            id,
            name: name.to_string(),
            disks,
            power: def.power,
            mode: 0,
        };
        self.store.insert_vm(&row)?;
        tracing::info!(vm = %id, name, "VM defined");
        Ok(CommandOutput::Vm(self.vm_view(&row)?))
    }

    /// Resolves a VM by GUID (with or without braces) or by name.
    pub fn resolve_vm(&self, vm: &VmRef) -> Result<VmRow, CommandError> {
        let trimmed = vm.trim().trim_start_matches('{').trim_end_matches('}');
        if let Ok(id) = Uuid::parse_str(trimmed) {
            if let Some(row) = self.store.get_vm(id)? {
                return Ok(row);
            }
        }
        self.store
            .find_vm_by_name(vm.trim())?
            .ok_or_else(|| invalid(format!("no virtual machine '{vm}' on this host")))
    }

    pub fn vm_view(&self, vm: &VmRow) -> Result<VmView, CommandError> {
        let rel = self.store.get_relationship(vm.id)?;
        let state = rel.as_ref().map_or(0, |r| r.state);
        Ok(VmView {
            id: vm.id,
            name: vm.name.clone(),
            disks: vm.disks.clone(),
            enabled_state: power::enabled_state(&vm.power),
            replication_mode: vm.mode,
            replication_state: state,
            replication_health: self.health(vm, rel.as_ref()).0.as_u16(),
        })
    }

    /// Starts (2), turns off (3) or shuts down (4) the VM. A primary prepared for a planned
    /// failover (state 4) is locked from starting.
    async fn set_power_state(&self, vm: &VmRef, requested: u16) -> CommandResult {
        let (vm, _claim) = self.claimed_vm(vm)?;
        let current = power::enabled_state(&vm.power);
        let result = match requested {
            power::ENABLED if current == power::ENABLED => {
                return Err(CommandError::new(ReturnCode::InvalidState, format!("'{}' is already running", vm.name)))
            }
            power::ENABLED => {
                let rel = self.store.get_relationship(vm.id)?;
                let prepared = ReplicationState::SyncedReplicationComplete.as_u16();
                if vm.mode == ReplicationMode::Primary.as_u16() && rel.is_some_and(|r| r.state == prepared) {
                    return Err(CommandError::new(
                        ReturnCode::InvalidState,
                        format!(
                            "'{}' is prepared for a planned failover and locked from starting; cancel with RevertFailover",
                            vm.name
                        ),
                    ));
                }
                power::start(&vm.power).await
            }
            power::DISABLED | power::SHUT_DOWN if current != power::ENABLED => {
                return Err(CommandError::new(ReturnCode::InvalidState, format!("'{}' is already off", vm.name)))
            }
            power::DISABLED => power::stop(&vm.power, false).await,
            power::SHUT_DOWN => power::stop(&vm.power, true).await,
            other => {
                return Err(CommandError::new(
                    ReturnCode::NotSupported,
                    format!("RequestedState {other} is not supported; use 2 (start), 3 (turn off) or 4 (shut down)"),
                ))
            }
        };
        result.map_err(|e| {
            let code = match &e {
                power::PowerError::NotConfigured(_) => ReturnCode::NotSupported,
                power::PowerError::Timeout(_) => ReturnCode::Timeout,
                _ => ReturnCode::Failed,
            };
            CommandError::new(code, crate::error_chain(&e))
        })?;
        tracing::info!(vm = %vm.id, requested, "power state changed");
        Ok(CommandOutput::Completed)
    }

    // ---- recovery-server settings and authorization ----

    fn modify_service_settings(&self, s: ServiceSettings) -> CommandResult {
        s.validate().map_err(settings_error)?;
        let store = self.store.clone();
        self.job(
            JobType::ModifyReplicationServerSettings,
            None,
            "Modify replication server settings",
            move |ctx| async move {
                ctx.check_cancelled()?;
                store.put_service_settings(&s)?;
                tracing::info!(
                    enabled = s.recovery_server_enabled,
                    "recovery server settings changed"
                );
                Ok(())
            },
        )
    }

    fn add_authorization_entry(&self, e: AuthorizationEntry) -> CommandResult {
        e.validate().map_err(settings_error)?;
        if !self.store.add_authorization_entry(&e)? {
            return Err(invalid(format!(
                "an authorization entry for '{}' already exists; use ModifyAuthorizationEntry",
                e.allowed_primary_host_system
            )));
        }
        Ok(CommandOutput::Completed)
    }

    fn modify_authorization_entry(&self, e: AuthorizationEntry) -> CommandResult {
        e.validate().map_err(settings_error)?;
        if !self.store.modify_authorization_entry(&e)? {
            return Err(invalid(format!(
                "no authorization entry for '{}'",
                e.allowed_primary_host_system
            )));
        }
        Ok(CommandOutput::Completed)
    }

    /// Deletes the entry; replication stops (state Critical) for every replica VM bound to it whose
    /// replication is running (2, 3, 7, 10, 11); failed-over replicas keep their state. The bound VMs
    /// are claimed first (32774 if one is busy, nothing changed) and everything is one transaction.
    fn remove_authorization_entry(&self, host: &str) -> CommandResult {
        let mut bound = Vec::new();
        let mut claims = Vec::new();
        for vm in self.store.list_vms()? {
            let rel = self.store.get_relationship(vm.id)?;
            let entry = rel.as_ref().and_then(|r| r.authorization_entry.as_deref());
            if vm.mode == ReplicationMode::Replica.as_u16()
                && entry.is_some_and(|h| h.eq_ignore_ascii_case(host))
            {
                claims.push(self.claim(&vm)?);
                bound.push(vm.id);
            }
        }
        let stopped = STOPPED_BY_LOST_AUTHORIZATION.map(ReplicationState::as_u16);
        let critical = ReplicationState::Critical.as_u16();
        if !self
            .store
            .remove_authorization_entry(host, &bound, &stopped, critical)?
        {
            return Err(invalid(format!("no authorization entry for '{host}'")));
        }
        for vm in &bound {
            tracing::warn!(vm = %vm, entry = host, "authorization entry removed: replication stopped");
        }
        Ok(CommandOutput::Completed)
    }

    fn set_authorization_entry(&self, vm: &VmRef, entry: AuthorizationEntry) -> CommandResult {
        let (vm, _claim) = self.claimed_vm(vm)?; // the claim is held while the row is rewritten
        if vm.mode != ReplicationMode::Replica.as_u16() {
            return Err(CommandError::new(
                ReturnCode::InvalidState,
                format!(
                    "'{}' is not a replica; only a replica VM is bound to an authorization entry",
                    vm.name
                ),
            ));
        }
        let known = self.store.authorization_entries()?;
        let Some(found) = known.iter().find(|k| {
            k.allowed_primary_host_system
                .eq_ignore_ascii_case(&entry.allowed_primary_host_system)
        }) else {
            return Err(invalid(format!(
                "no authorization entry for '{}'; add it first with AddAuthorizationEntry",
                entry.allowed_primary_host_system
            )));
        };
        let Some(mut rel) = self.store.get_relationship(vm.id)? else {
            return Err(CommandError::new(
                ReturnCode::InvalidState,
                "the VM is not a replica: it has no relationship",
            ));
        };
        rel.authorization_entry = Some(found.allowed_primary_host_system.clone());
        self.store.put_relationship(&rel, vm.mode)?;
        Ok(CommandOutput::Completed)
    }

    // ---- relationships ----

    fn facts(&self, vm: &VmRow, rel: Option<&RelationshipRow>) -> Facts {
        Facts {
            vm_running: power::enabled_state(&vm.power) == 2,
            has_received_replication: rel.is_some_and(|r| r.last_replication_time.is_some()),
            test_system_exists: false,
            relationship_exists: rel.is_some(),
            failed_over_planned: rel
                .is_some_and(|r| r.failed_over_type == ReplicationType::Planned.as_u16()),
        }
    }

    /// The state machine's verdict on `op` for this VM now.
    fn decide(
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
    fn resolve_included_disks(
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

    fn create_relationship(&self, vm: &VmRef, settings: ReplicationSettings) -> CommandResult {
        self.write_settings(vm, settings, Operation::CreateReplicationRelationship)
    }

    fn modify_relationship(&self, vm: &VmRef, settings: ReplicationSettings) -> CommandResult {
        self.write_settings(vm, settings, Operation::ModifyReplicationSettings)
    }

    /// CreateReplicationRelationship (a new relationship, primary side) or ModifyReplicationSettings
    /// (the existing one): validated settings written by a job.
    fn write_settings(
        &self,
        vm: &VmRef,
        mut settings: ReplicationSettings,
        op: Operation,
    ) -> CommandResult {
        let (vm, claim) = self.claimed_vm(vm)?;
        let (rel, t) = self.decide(&vm, op)?;
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
        rel.settings = settings;
        rel.state = t.after.as_u16();
        let store = self.store.clone();
        let mode = t.mode_after.as_u16();
        self.job(
            t.job_type,
            Some(claim),
            &format!("{what} '{}'", vm.name),
            move |ctx| async move {
                ctx.check_cancelled()?;
                store.put_relationship(&rel, mode)?;
                tracing::info!(vm = %rel.vm, "replication settings written");
                Ok(())
            },
        )
    }

    fn remove_relationship(&self, vm: &VmRef) -> CommandResult {
        let (vm, claim) = self.claimed_vm(vm)?;
        let (_, t) = self.decide(&vm, Operation::RemoveReplicationRelationship)?;
        self.refuse_engineless(&t, "RemoveReplicationRelationship")?;
        let store = self.store.clone();
        let id = vm.id;
        self.job(
            t.job_type,
            Some(claim),
            &format!("Remove replication of '{}'", vm.name),
            move |ctx| async move {
                ctx.check_cancelled()?;
                store.remove_relationship(id)?;
                tracing::info!(vm = %id, "replication relationship removed");
                Ok(())
            },
        )
    }

    /// Operations that follow the state machine. Those needing a data-plane engine answer 32770
    /// after their parameters and state were checked; the others change state in a job.
    fn replication(&self, vm: &VmRef, op: Operation, args: OperationArgs) -> CommandResult {
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
        let (vm, claim) = self.claimed_vm(vm)?;
        check_args(op, &args)?;
        let (rel, t) = self.decide(&vm, op)?;
        if let Some(s) = &args.settings {
            s.validate().map_err(settings_error)?;
        }
        // Failover network settings are applied by the failover engine, which also keeps them.
        if t.moves_data || op == Operation::SetFailoverNetworkAdapterSettings {
            let request = EngineRequest {
                vm,
                relationship: rel,
                operation: op,
                args,
                transition: t,
                claim,
            };
            return Ok(CommandOutput::Job(job_view(&self.engine.start(request)?)));
        }
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
            self.store.put_relationship(&rel, mode)?;
        }
        rel.state = t.after.as_u16();
        let store = self.store.clone();
        let what = format!("{} on '{}'", op.name(), vm.name);
        self.job(t.job_type, Some(claim), &what, move |ctx| async move {
            ctx.check_cancelled()?;
            store.put_relationship(&rel, mode)?;
            Ok(())
        })
    }

    fn refuse_engineless(&self, t: &Transition, what: &str) -> Result<(), CommandError> {
        if t.moves_data {
            return Err(CommandError::new(
                ReturnCode::NotSupported,
                format!("{what}: the data-plane engine for this operation is not implemented yet"),
            ));
        }
        Ok(())
    }

    // ---- statistics and status ----

    pub fn health(
        &self,
        vm: &VmRow,
        rel: Option<&RelationshipRow>,
    ) -> (ReplicationHealth, Vec<String>) {
        let mode = ReplicationMode::from_u16(vm.mode).unwrap_or(ReplicationMode::None);
        let state = rel
            .and_then(|r| ReplicationState::from_u16(r.state))
            .unwrap_or(ReplicationState::Disabled);
        let inputs = HealthInputs {
            mode,
            state,
            success_count: 0,
            miss_count: 0,
            seconds_since_last_replication: rel
                .and_then(|r| r.last_replication_time)
                .map(|t| (now() - t).max(0) as u64),
            average_latency_secs: None,
        };
        let (health, issues) = evaluate_health(&inputs);
        (health, issues.into_iter().map(|i| i.message).collect())
    }

    fn statistics(&self, vm: &VmRef) -> CommandResult {
        let vm = self.resolve_vm(vm)?;
        let (rel, _) = self.decide(&vm, Operation::GetReplicationStatistics)?;
        let (health, messages) = self.health(&vm, rel.as_ref());
        let start = rel.as_ref().map_or_else(now, |r| r.statistics_reset_time);
        let window = i64::from(self.store.service_settings()?.monitoring_interval);
        Ok(CommandOutput::Statistics(StatisticsView {
            start_statistic_time: start,
            end_statistic_time: start + window,
            replication_health: health.as_u16(),
            health_messages: messages,
            ..StatisticsView::default()
        }))
    }

    fn reset_statistics(&self, vm: &VmRef) -> CommandResult {
        let (vm, _claim) = self.claimed_vm(vm)?; // the claim is held while the row is rewritten
        let (rel, _) = self.decide(&vm, Operation::ResetReplicationStatistics)?;
        if let Some(mut rel) = rel {
            rel.statistics_reset_time = now();
            self.store.put_relationship(&rel, vm.mode)?;
        }
        Ok(CommandOutput::Completed)
    }

    fn status(&self) -> CommandResult {
        let mut rows = Vec::new();
        for vm in self.store.list_vms()? {
            let rel = self.store.get_relationship(vm.id)?;
            let view = self.vm_view(&vm)?;
            let mode = ReplicationMode::from_u16(vm.mode).unwrap_or(ReplicationMode::None);
            let state = ReplicationState::from_u16(view.replication_state)
                .unwrap_or(ReplicationState::Disabled);
            let health = self.health(&vm, rel.as_ref()).0;
            rows.push(StatusRow {
                mode: mode.label().to_string(),
                state: state.ps_name(mode).to_string(),
                health: health.label().to_string(),
                recovery_connection_point: rel
                    .as_ref()
                    .map(|r| r.settings.recovery_connection_point.clone()),
                primary_connection_point: rel
                    .as_ref()
                    .and_then(|r| r.primary_connection_point.clone()),
                replication_interval: rel.as_ref().map(|r| r.settings.replication_interval),
                last_replication_time: rel.as_ref().and_then(|r| r.last_replication_time),
                vm: view,
            });
        }
        Ok(CommandOutput::Status { rows })
    }

    /// Resolves and claims the VM, then reads it again: what an earlier job wrote before the claim
    /// was taken is what the command sees.
    fn claimed_vm(&self, vm: &VmRef) -> Result<(VmRow, VmClaim), CommandError> {
        let found = self.resolve_vm(vm)?;
        let claim = self.claim(&found)?;
        let fresh = self
            .store
            .get_vm(found.id)?
            .ok_or_else(|| invalid(format!("no virtual machine '{vm}' on this host")))?;
        Ok((fresh, claim))
    }

    /// Claims the VM for one state-changing command (32774 while another holds it).
    fn claim(&self, vm: &VmRow) -> Result<VmClaim, CommandError> {
        self.claims.claim(vm.id).ok_or_else(|| {
            CommandError::new(
                ReturnCode::SystemInUse,
                format!(
                    "another operation on '{}' is still running; wait for its job to finish",
                    vm.name
                ),
            )
        })
    }

    /// Starts `work` as a job; the VM's claim, if any, is held until the work has finished.
    fn job<F, Fut>(
        &self,
        job_type: JobType,
        claim: Option<VmClaim>,
        description: &str,
        work: F,
    ) -> CommandResult
    where
        F: FnOnce(crate::jobs::JobContext) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), JobFailure>> + Send + 'static,
    {
        let vm = claim.as_ref().map(VmClaim::vm);
        let work = move |ctx| async move {
            let _claim = claim;
            work(ctx).await
        };
        let job = self
            .jobs
            .spawn(job_type, vm, description.to_string(), false, work)?;
        Ok(CommandOutput::Job(job_view(&job)))
    }
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

fn settings_error(e: vmreplica_core::settings::SettingsError) -> CommandError {
    CommandError::new(e.return_code(), e.to_string())
}

pub fn job_view(job: &JobRow) -> JobView {
    JobView {
        id: job.id.clone(),
        job_type: job.job_type,
        caption: JobType::from_u16(job.job_type)
            .map_or("Job", |t| t.caption())
            .to_string(),
        job_state: job.state,
        percent_complete: job.percent,
        error_code: job.error_code,
        error_description: job.error_description.clone(),
        vm: job.vm,
        time_submitted: job.time_submitted,
        time_finished: job.time_finished,
        cancellable: job.cancellable,
    }
}
