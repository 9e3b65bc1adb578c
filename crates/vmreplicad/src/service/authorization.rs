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
        let certificate = matches!(s.allowed_authentication_type, 2 | 3);
        if s.recovery_server_enabled && certificate {
            let Some(thumb) = s
                .certificate_thumbprint
                .as_deref()
                .filter(|t| !t.is_empty())
            else {
                return Err(invalid(
                    "CertificateThumbPrint is required for certificate authentication (AllowedAuthenticationType 2 or 3)",
                ));
            };
            crate::replication::peer_certs::find_identity(&self.cert_dir, thumb).map_err(|e| {
                invalid(format!("CertificateThumbPrint: {}", crate::error_chain(&e)))
            })?;
        }
        let store = self.store.clone();
        let listener = self.listener.clone();
        self.job(
            JobType::ModifyReplicationServerSettings,
            None,
            "Modify replication server settings",
            move |ctx| async move {
                ctx.check_cancelled()?;
                store.put_service_settings(&s)?;
                listener.settings_changed();
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
        let entry = found.allowed_primary_host_system.clone();
        if !self
            .store
            .update_relationship(vm.id, None, |r| r.authorization_entry = Some(entry))?
        {
            return Err(CommandError::new(
                ReturnCode::InvalidState,
                "the VM is not a replica: it has no relationship",
            ));
        }
        Ok(CommandOutput::Completed)
    }
}

impl Service {
    /// TestReplicationConnection (JobType 115): connect to the recovery server with this host's
    /// certificate, say hello, and have it write and delete a file in the storage location the
    /// matching authorization entry names (docs/protocol.md §5.1).
    pub(super) fn test_connection(&self, settings: ReplicationSettings) -> CommandResult {
        if settings.authentication_type != 2 {
            return Err(CommandError::new(
                ReturnCode::NotSupported,
                "only certificate authentication (AuthenticationType 2) is supported; Kerberos is not",
            ));
        }
        let target = crate::replication::client::Target {
            host: settings.recovery_connection_point.clone(),
            port: settings.recovery_server_port_number,
            thumbprint: settings.certificate_thumbprint.clone().unwrap_or_default(),
        };
        let peers = self.peers.clone();
        let description = format!(
            "Test the replication connection to {}:{}",
            target.host, target.port
        );
        self.job(
            JobType::TestReplicationConnection,
            None,
            &description,
            move |ctx| async move {
                let mut session = peers
                    .connect(&target)
                    .await
                    .map_err(|e| e.into_failure("connecting to the recovery server"))?;
                ctx.progress(50)?;
                let (_, answer) = session
                    .json::<_, wire::protocol::TestResponse>(
                        wire::protocol::Route::Test,
                        Some(&wire::protocol::Empty {}),
                    )
                    .await
                    .map_err(|e| e.into_failure("testing the replica storage"))?;
                tracing::info!(
                    server = %target.host,
                    authorized_as = %answer.authorized_as,
                    free_bytes = answer.storage_free_bytes,
                    "replication connection test passed"
                );
                Ok(())
            },
        )
    }
}
