//! VMs: definition, lookup, the view front ends show, and power control.

use super::*;

impl Service {
    /// `vm remove`: only a VM without a relationship (disable replication first), test VM or
    /// failover in progress; its rows go, its files stay.
    pub(super) fn remove_vm(&self, vm: &VmRef) -> CommandResult {
        let (vm, _claim) = self.claimed_vm(vm)?;
        let refuse = |why: String| Err(CommandError::new(ReturnCode::InvalidState, why));
        if self.store.get_relationship(vm.id)?.is_some() {
            return refuse(format!(
                "'{}' has a replication relationship; remove it first (vmreplica disable)",
                vm.name
            ));
        }
        if self.store.test_system_of(vm.id)?.is_some() || self.store.test_system(vm.id)?.is_some() {
            return refuse(format!(
                "'{}' has a test VM or is one; remove it with stop-failover first",
                vm.name
            ));
        }
        if power::enabled_state(&vm.power) == power::ENABLED {
            return refuse(format!("'{}' is running; turn it off first", vm.name));
        }
        // A replica's recovery points are kept, moved aside: a new replica of the same VM starts a
        // store of its own there.
        if let Some(r) = self.store.replica_vm(vm.id)? {
            let dir = std::path::Path::new(&r.store_root).join(vm.id.hyphenated().to_string());
            if dir.exists() {
                let aside = dir.with_extension(format!("removed-{}", now()));
                std::fs::rename(&dir, &aside).map_err(|e| {
                    CommandError::new(
                        ReturnCode::Failed,
                        format!("cannot move {} aside: {e}", dir.display()),
                    )
                })?;
                tracing::info!(vm = %vm.id, kept = %aside.display(), "the removed replica's recovery points are kept");
            }
        }
        self.store.delete_vm_rows(
            vm.id,
            &[
                "replica_vms",
                "recovery_points",
                "received_logs",
                "uploads",
                "failovers",
                "test_failover_times",
                "failover_network",
                "replication_stats",
                "primary_chains",
                "resync_points",
                "job_restores",
            ],
        )?;
        self.store.delete_vm(vm.id)?;
        tracing::info!(vm = %vm.id, name = %vm.name, "VM definition removed (its files are kept)");
        Ok(CommandOutput::Completed)
    }

    pub(super) fn add_vm(&self, def: VmDefinition) -> CommandResult {
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
            match std::fs::metadata(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(CommandError::new(
                        ReturnCode::FileNotFound,
                        format!("disk image '{d}' does not exist"),
                    ))
                }
                Err(e) => return Err(invalid(format!("disk image '{d}' cannot be read: {e}"))),
                Ok(_) => {}
            }
            if !path.is_file() {
                return Err(invalid(format!(
                    "disk '{d}' is not a regular file: disks are image files here (block devices \
                     such as LVM volumes are not supported yet; convert one to an image file \
                     with qemu-img convert)"
                )));
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
    /// failover (state 4) is locked from starting, and so is a replica not failed over (5, 6).
    pub(super) async fn set_power_state(&self, vm: &VmRef, requested: u16) -> CommandResult {
        let (vm, _claim) = self.claimed_vm(vm)?;
        let current = power::enabled_state(&vm.power);
        let result = match requested {
            power::ENABLED if current == power::ENABLED => {
                return Err(CommandError::new(ReturnCode::InvalidState, format!("'{}' is already running", vm.name)))
            }
            power::ENABLED => {
                let rel = self.store.get_relationship(vm.id)?;
                let prepared = ReplicationState::SyncedReplicationComplete.as_u16();
                if vm.mode == ReplicationMode::Primary.as_u16() && rel.as_ref().is_some_and(|r| r.state == prepared) {
                    return Err(CommandError::new(
                        ReturnCode::InvalidState,
                        format!(
                            "'{}' is prepared for a planned failover and locked from starting; cancel with RevertFailover",
                            vm.name
                        ),
                    ));
                }
                // A failed-over replica starts with its failover IP settings (spec §9).
                let failed_over = vm.mode == ReplicationMode::Replica.as_u16()
                    && rel.as_ref().is_some_and(|r| {
                        r.state == ReplicationState::Recovered.as_u16()
                            || r.state == ReplicationState::Committed.as_u16()
                    });
                // Any other replica is a copy of a VM that runs elsewhere, whose disks are recovery
                // points (or a seed being taken in): it starts only once failed over, as in
                // Hyper-V. (It started, and a second copy of the VM ran beside the primary.)
                if vm.mode == ReplicationMode::Replica.as_u16() && !failed_over {
                    return Err(CommandError::new(
                        ReturnCode::InvalidState,
                        format!(
                            "'{}' is a replica (state {}); it starts only after a failover (InitiateFailover), or test it with TestReplicaSystem",
                            vm.name,
                            rel.as_ref().map_or(0, |r| r.state)
                        ),
                    ));
                }
                let network = match failed_over {
                    true => Some(self.store.failover_network(vm.id)?),
                    false => None,
                };
                power::start(&vm.power, &vm.disks, network.as_deref().filter(|n| !n.is_empty())).await
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
}
