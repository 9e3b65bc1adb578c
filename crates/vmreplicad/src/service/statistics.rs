//! Health, statistics and the Get-VMReplication status.

use super::*;
use crate::store::StoreResult;
use vmreplica_core::JobState;

impl Service {
    pub fn health(
        &self,
        vm: &VmRow,
        rel: Option<&RelationshipRow>,
    ) -> (ReplicationHealth, Vec<String>) {
        let mode = ReplicationMode::from_u16(vm.mode).unwrap_or(ReplicationMode::None);
        let state = rel
            .and_then(|r| ReplicationState::from_u16(r.state))
            .unwrap_or(ReplicationState::Disabled);
        // Counted over the current monitoring window (spec §10).
        if let Err(e) = self.store.roll_statistics(vm.id, now()) {
            tracing::warn!(vm = %vm.id, "cannot start the new monitoring window: {e}");
        }
        let stats = self.store.stats(vm.id).unwrap_or_default();
        let inputs = HealthInputs {
            mode,
            state,
            success_count: stats.success,
            miss_count: stats.misses,
            seconds_since_last_replication: rel
                .and_then(|r| r.last_replication_time)
                .map(|t| (now() - t).max(0) as u64),
            average_latency_secs: (stats.success > 0)
                .then(|| u64::from(stats.latency / stats.success)),
            send_error: self
                .store
                .chain(vm.id)
                .ok()
                .flatten()
                .and_then(|c| c.last_error),
        };
        let (health, issues) = evaluate_health(&inputs);
        (health, issues.into_iter().map(|i| i.message).collect())
    }

    pub(super) fn statistics(&self, vm: &VmRef) -> CommandResult {
        let vm = self.resolve_vm(vm)?;
        let (rel, _) = self.decide(&vm, Operation::GetReplicationStatistics)?;
        let (health, messages) = self.health(&vm, rel.as_ref());
        // Read again: the health above started a new window if the last one had ended.
        let rel = self.store.get_relationship(vm.id)?;
        let settings = self.store.service_settings()?;
        let (start, end) = match rel.as_ref() {
            // From a reset (or the relationship's creation) to the end of its window.
            Some(r) => (
                r.statistics_reset_time,
                settings.monitoring_window(r.statistics_reset_time).1,
            ),
            None => settings.monitoring_window(now()),
        };
        let s = self.store.stats(vm.id)?;
        let pending = s
            .pending_size
            .saturating_add(self.initial_pending(&vm, rel.as_ref())?);
        Ok(CommandOutput::Statistics(StatisticsView {
            start_statistic_time: start,
            end_statistic_time: end,
            replication_success_count: s.success,
            replication_size: s.size,
            max_replication_size: s.max_size,
            replication_latency: s.latency,
            max_replication_latency: s.max_latency,
            replication_miss_count: s.misses,
            network_failure_count: s.network_failures,
            replication_failure_count: s.failures,
            pending_replication_size: pending,
            replication_health: health.as_u16(),
            health_messages: messages,
            last_test_failover_time: self.store.last_test_failover(vm.id)?,
            ..StatisticsView::default()
        }))
    }

    /// While a network initial replication runs on this primary: the size of the VM's disk files
    /// scaled by the share its job has still to do (how Measure-VMReplication counts it, spec §10).
    fn initial_pending(&self, vm: &VmRow, rel: Option<&RelationshipRow>) -> StoreResult<u64> {
        let in_ir = vm.mode == ReplicationMode::Primary.as_u16()
            && rel.is_some_and(|r| {
                r.state == ReplicationState::WaitingToCompleteInitialReplication.as_u16()
            });
        if !in_ir {
            return Ok(0);
        }
        let network_ir = [
            JobType::StartInbandInitialReplication,
            JobType::StartResyncInitialReplication,
        ]
        .map(JobType::as_u16);
        let Some(job) = self.store.list_jobs()?.into_iter().find(|j| {
            j.vm == Some(vm.id)
                && network_ir.contains(&j.job_type)
                && j.state == JobState::Running.as_u16()
        }) else {
            return Ok(0);
        };
        let files: u64 = vm
            .disks
            .iter()
            .filter_map(|d| std::fs::metadata(d).ok())
            .map(|m| m.len())
            .sum();
        Ok(files / 100 * u64::from(100 - job.percent.min(100)))
    }

    pub(super) fn reset_statistics(&self, vm: &VmRef) -> CommandResult {
        let (vm, _claim) = self.claimed_vm(vm)?; // the claim is held while the row is rewritten
        let (rel, _) = self.decide(&vm, Operation::ResetReplicationStatistics)?;
        if rel.is_some() {
            let at = now();
            self.store
                .update_relationship(vm.id, None, |r| r.statistics_reset_time = at)?;
            self.store.reset_stats(vm.id)?;
        }
        Ok(CommandOutput::Completed)
    }

    pub(super) fn status(&self) -> CommandResult {
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
}
