//! Health, statistics and the Get-VMReplication status.

use super::*;

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
        let start = rel.as_ref().map_or_else(now, |r| r.statistics_reset_time);
        let window = i64::from(self.store.service_settings()?.monitoring_interval);
        let s = self.store.stats(vm.id)?;
        Ok(CommandOutput::Statistics(StatisticsView {
            start_statistic_time: start,
            end_statistic_time: start + window,
            replication_success_count: s.success,
            replication_size: s.size,
            max_replication_size: s.max_size,
            replication_latency: s.latency,
            max_replication_latency: s.max_latency,
            replication_miss_count: s.misses,
            network_failure_count: s.network_failures,
            replication_failure_count: s.failures,
            pending_replication_size: s.pending_size,
            replication_health: health.as_u16(),
            health_messages: messages,
            ..StatisticsView::default()
        }))
    }

    pub(super) fn reset_statistics(&self, vm: &VmRef) -> CommandResult {
        let (vm, _claim) = self.claimed_vm(vm)?; // the claim is held while the row is rewritten
        let (rel, _) = self.decide(&vm, Operation::ResetReplicationStatistics)?;
        if let Some(mut rel) = rel {
            rel.statistics_reset_time = now();
            self.store.put_relationship(&rel, vm.mode)?;
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
