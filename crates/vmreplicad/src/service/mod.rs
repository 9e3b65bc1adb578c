//! The service: executes [`Command`]s for every front end.
//!
//! Each replication command asks the core's state machine (`decide`) whether it is allowed in the
//! VM's current (mode, state) and what follows, validates settings with the core, and only then does
//! the work — synchronously, or as a job. Operations whose data-plane engine does not exist yet are
//! refused with 32770 (Not supported) after their parameters and state were checked: nothing
//! pretends to have moved data.

mod authorization;
mod relationships;
mod statistics;
mod vms;

use std::path::PathBuf;
use std::sync::Arc;

use uuid::Uuid;
use vmreplica_core::codes::ReturnCode;
use vmreplica_core::command::{
    Command, CommandError, CommandOutput, JobView, OperationArgs, StatisticsView, StatusRow,
    VmDefinition, VmRef, VmView, MAX_JOB_WAIT_MS,
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
    /// How this host reaches recovery servers.
    pub peers: Arc<crate::replication::client::Peers>,
    /// The VMs whose replication cycle is in flight.
    pub in_flight: Arc<crate::replication::primary::InFlight>,
    /// Tells the replication listener the recovery-server settings changed.
    pub listener: crate::replication::server::ListenerControl,
    /// The bandwidth cap and parallel transfers of this host as a primary.
    pub limits: Arc<crate::replication::limits::HostLimits>,
    /// How long a removal waits for the VM's replication cycle in flight (`--removal-wait`).
    pub removal_wait: std::time::Duration,
}

impl From<StoreError> for CommandError {
    fn from(e: StoreError) -> Self {
        CommandError::new(
            ReturnCode::Failed,
            format!("metadata store: {}", crate::error_chain(&e)),
        )
    }
}

fn invalid(message: impl Into<String>) -> CommandError {
    CommandError::new(ReturnCode::InvalidParameter, message)
}

impl Service {
    pub async fn execute(&self, cmd: Command) -> CommandResult {
        match cmd {
            Command::AddVm(def) => self.add_vm(def),
            Command::RemoveVm { vm } => self.remove_vm(&vm),
            Command::SetPowerControl { vm, power } => {
                let (vm, _claim) = self.claimed_vm(&vm)?;
                self.store.set_vm_power(vm.id, &power)?;
                tracing::info!(vm = %vm.id, "power control changed");
                Ok(CommandOutput::Completed)
            }
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
                self.test_connection(settings)
            }
            Command::SetPowerState { vm, requested } => self.set_power_state(&vm, requested).await,
            Command::DestroySystem { vm } => {
                let vm = self.resolve_vm(&vm)?;
                // The replica's claim: not while its test failover job is still making the disks.
                let _claim = match self.store.test_system(vm.id)? {
                    Some(t) => Some(self.claimed_vm(&t.replica_vm.to_string())?.1),
                    None => None,
                };
                crate::engine::test_failover::destroy(&self.store, &vm).await?;
                Ok(CommandOutput::Completed)
            }
            Command::GetFailoverNetwork { vm } => {
                let vm = self.resolve_vm(&vm)?;
                Ok(CommandOutput::FailoverNetwork {
                    settings: self.store.failover_network(vm.id)?,
                })
            }
            Command::GetHostSettings => Ok(CommandOutput::HostSettings(self.limits.current())),
            Command::SetHostSettings(s) => {
                crate::replication::limits::validate(&s).map_err(invalid)?;
                let _changing = self.limits.changing();
                let s = vmreplica_core::command::HostSettings {
                    source: String::new(),
                    ..s
                };
                self.store.put_host_settings(Some(&s))?;
                self.limits.apply(s).map_err(invalid)?;
                tracing::info!(settings = ?self.limits.current(), "host settings changed");
                Ok(CommandOutput::HostSettings(self.limits.current()))
            }
            Command::ResetHostSettings => {
                let _changing = self.limits.changing();
                self.store.put_host_settings(None)?;
                self.limits.reset();
                tracing::info!(settings = ?self.limits.current(), "host settings back to the flags");
                Ok(CommandOutput::HostSettings(self.limits.current()))
            }
            Command::Status => self.status(),
            Command::ListJobs => {
                let jobs = self.store.list_jobs()?.iter().map(job_view).collect();
                Ok(CommandOutput::Jobs { jobs })
            }
            Command::GetJob { id, wait_ms } => self.get_job(&id, wait_ms).await,
            Command::CancelJob { id } => {
                self.jobs
                    .cancel(&id)
                    .map_err(|e| CommandError::new(ReturnCode::InvalidState, e.to_string()))?;
                Ok(CommandOutput::Completed)
            }
        }
    }

    /// Resolves and claims the VM, then reads it again: what an earlier job wrote before the claim
    /// was taken is what the command sees.
    pub(super) fn claimed_vm(&self, vm: &VmRef) -> Result<(VmRow, VmClaim), CommandError> {
        let found = self.resolve_vm(vm)?;
        let claim = self.claim(&found)?;
        let fresh = self
            .store
            .get_vm(found.id)?
            .ok_or_else(|| invalid(format!("no virtual machine '{vm}' on this host")))?;
        Ok((fresh, claim))
    }

    /// Claims the VM for one state-changing command (32774 while another holds it).
    pub(super) fn claim(&self, vm: &VmRow) -> Result<VmClaim, CommandError> {
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

    /// The job `id`, answered once it moved on or the wait is over (`jobs::watch`).
    async fn get_job(&self, id: &str, wait_ms: u32) -> CommandResult {
        let wait = std::time::Duration::from_millis(u64::from(wait_ms.min(MAX_JOB_WAIT_MS)));
        match crate::jobs::watch(&self.store, id, wait).await? {
            Some(job) => Ok(CommandOutput::Job(job_view(&job))),
            None => Err(invalid(format!("no job with InstanceID '{id}'"))),
        }
    }

    /// Starts `work` as a job; the VM's claim, if any, is held until the work has finished.
    pub(super) fn job<F, Fut>(
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
        description: job.description.clone(),
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
