//! This host as a recovery server: its settings and the authorization table.

use super::*;

/// Replica states in which losing the authorization entry stops replication (→ 8 Critical).
const STOPPED_BY_LOST_AUTHORIZATION: [ReplicationState; 5] = [
    ReplicationState::WaitingToCompleteInitialReplication,
    ReplicationState::Replicating,
    ReplicationState::Suspended,
    ReplicationState::Resynchronizing,
    ReplicationState::ResynchronizationSuspended,
];

impl Service {
    pub(super) fn modify_service_settings(&self, s: ServiceSettings) -> CommandResult {
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

    pub(super) fn add_authorization_entry(&self, e: AuthorizationEntry) -> CommandResult {
        e.validate().map_err(settings_error)?;
        if !self.store.add_authorization_entry(&e)? {
            return Err(invalid(format!(
                "an authorization entry for '{}' already exists; use ModifyAuthorizationEntry",
                e.allowed_primary_host_system
            )));
        }
        Ok(CommandOutput::Completed)
    }

    pub(super) fn modify_authorization_entry(&self, e: AuthorizationEntry) -> CommandResult {
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
    pub(super) fn remove_authorization_entry(&self, host: &str) -> CommandResult {
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

    pub(super) fn set_authorization_entry(
        &self,
        vm: &VmRef,
        entry: AuthorizationEntry,
    ) -> CommandResult {
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
}
