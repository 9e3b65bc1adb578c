//! `Msvm_ReplicationStatistics` and the health `Msvm_Error`s, as GetReplicationStatistics(Ex) embed them.

use cim::{CimInstance, CimValue};
use vmreplica_core::command::StatisticsView;

use super::objects::timestamp;

pub fn statistics_instance(st: &StatisticsView) -> CimInstance {
    let mut inst = CimInstance::new("Msvm_ReplicationStatistics")
        .with("StartStatisticTime", timestamp(st.start_statistic_time))
        .with("EndStatisticTime", timestamp(st.end_statistic_time))
        .with(
            "ReplicationSuccessCount",
            CimValue::Uint32(st.replication_success_count),
        )
        .with("ReplicationSize", CimValue::Uint64(st.replication_size))
        .with(
            "MaxReplicationSize",
            CimValue::Uint64(st.max_replication_size),
        )
        .with(
            "ReplicationLatency",
            CimValue::Uint32(st.replication_latency),
        )
        .with(
            "MaxReplicationLatency",
            CimValue::Uint32(st.max_replication_latency),
        )
        .with(
            "ReplicationMissCount",
            CimValue::Uint32(st.replication_miss_count),
        )
        .with(
            "NetworkFailureCount",
            CimValue::Uint32(st.network_failure_count),
        )
        .with(
            "ReplicationFailureCount",
            CimValue::Uint32(st.replication_failure_count),
        )
        .with(
            "ApplicationConsistentSnapshotFailureCount",
            CimValue::Uint32(st.application_consistent_snapshot_failure_count),
        )
        .with(
            "PendingReplicationSize",
            CimValue::Uint64(st.pending_replication_size),
        )
        .with(
            "ReplicationHealth",
            CimValue::Uint32(u32::from(st.replication_health)),
        );
    match st.last_test_failover_time {
        Some(t) => inst.set("LastTestFailoverTime", timestamp(t)),
        None => inst.set_null("LastTestFailoverTime", cim::CimType::Datetime, false),
    }
    inst
}

/// One `Msvm_Error` per health message (shown by Measure-VMReplication as ReplicationHealthDetails).
pub fn health_issue_instances(st: &StatisticsView) -> Vec<CimInstance> {
    let severity = match st.replication_health {
        3 => 6,
        2 => 3,
        _ => 2,
    };
    st.health_messages
        .iter()
        .map(|m| {
            CimInstance::new("Msvm_Error")
                .with("ErrorType", CimValue::Uint16(1))
                .with("OwningEntity", CimValue::String("vmreplica".into()))
                .with("Message", CimValue::String(m.clone()))
                .with("PerceivedSeverity", CimValue::Uint16(severity))
        })
        .collect()
}
