//! The operations the state machine decides about: every replication verb of spec §3 that acts on one
//! VM, plus `RequestReplicationStateChange` (§3.3) with its requested state.

use serde::{Deserialize, Serialize};

use crate::job::JobType;
use crate::numbered::numbered_enum;
use crate::state::InitialReplicationType;

numbered_enum! {
    /// `RequestReplicationStateChange[Ex].RequestedState` (spec §3.3, MOF ValueMap `1,2,3,4,7,9`).
    ///
    /// 15 (sent by PowerShell when resuming from "Disk update critical") is not in the ValueMap and is
    /// not accepted: `from_u16(15)` is `None`, which the daemon answers with 32773.
    pub enum RequestedState {
        ReadyForReplication = 1,
        WaitingToCompleteInitialReplication = 2,
        Replicating = 3,
        SyncedReplicationComplete = 4,
        Suspend = 7,
        CancelResynchronize = 9,
    }
}

/// One replication verb applied to one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operation {
    CreateReplicationRelationship,
    ModifyReplicationSettings,
    RemoveReplicationRelationship,
    StartReplication(InitialReplicationType),
    ImportInitialReplica,
    InitiateFailover,
    RevertFailover,
    CommitFailover,
    ReverseReplicationRelationship,
    TestReplicaSystem,
    Resynchronize,
    InitiateFailback,
    ChangeReplicationModeToPrimary,
    RequestReplicationStateChange(RequestedState),
    SetFailoverNetworkAdapterSettings,
    GetReplicationStatistics,
    ResetReplicationStatistics,
}

impl Operation {
    /// Every operation with every parameter value (24 in all), in a stable order.
    pub fn all() -> Vec<Operation> {
        use Operation as O;
        let mut all = vec![
            O::CreateReplicationRelationship,
            O::ModifyReplicationSettings,
            O::RemoveReplicationRelationship,
        ];
        all.extend(InitialReplicationType::ALL.map(O::StartReplication));
        all.extend([
            O::ImportInitialReplica,
            O::InitiateFailover,
            O::RevertFailover,
            O::CommitFailover,
            O::ReverseReplicationRelationship,
            O::TestReplicaSystem,
            O::Resynchronize,
            O::InitiateFailback,
            O::ChangeReplicationModeToPrimary,
        ]);
        all.extend(RequestedState::ALL.map(O::RequestReplicationStateChange));
        all.extend([
            O::SetFailoverNetworkAdapterSettings,
            O::GetReplicationStatistics,
            O::ResetReplicationStatistics,
        ]);
        all
    }

    /// The CIM method name, with the numeric parameter when there is one: `"StartReplication(1)"`,
    /// `"RequestReplicationStateChange(7)"`.
    pub fn name(&self) -> String {
        match self {
            Operation::StartReplication(t) => format!("StartReplication({})", t.as_u16()),
            Operation::RequestReplicationStateChange(r) => {
                format!("RequestReplicationStateChange({})", r.as_u16())
            }
            other => other.method().to_string(),
        }
    }

    /// The CIM method name without parameters.
    pub fn method(&self) -> &'static str {
        use Operation as O;
        match self {
            O::CreateReplicationRelationship => "CreateReplicationRelationship",
            O::ModifyReplicationSettings => "ModifyReplicationSettings",
            O::RemoveReplicationRelationship => "RemoveReplicationRelationship",
            O::StartReplication(_) => "StartReplication",
            O::ImportInitialReplica => "ImportInitialReplica",
            O::InitiateFailover => "InitiateFailover",
            O::RevertFailover => "RevertFailover",
            O::CommitFailover => "CommitFailover",
            O::ReverseReplicationRelationship => "ReverseReplicationRelationship",
            O::TestReplicaSystem => "TestReplicaSystem",
            O::Resynchronize => "Resynchronize",
            O::InitiateFailback => "InitiateFailback",
            O::ChangeReplicationModeToPrimary => "ChangeReplicationModeToPrimary",
            O::RequestReplicationStateChange(_) => "RequestReplicationStateChange",
            O::SetFailoverNetworkAdapterSettings => "SetFailoverNetworkAdapterSettings",
            O::GetReplicationStatistics => "GetReplicationStatistics",
            O::ResetReplicationStatistics => "ResetReplicationStatistics",
        }
    }

    /// The `Msvm_ConcreteJob.JobType` (spec §2.3) of the job this operation runs as.
    ///
    /// Choices where §2.3 names no job (UNCONFIRMED): `SetFailoverNetworkAdapterSettings` → 92;
    /// RRSC(1) → 109 Stop Initial Replication, RRSC(4) → 100 Initiate Synced Replication (state 4 is
    /// "Synced replication complete"), RRSC(9) → 110 Stop Resynchronizing, other RRSC → 96.
    pub fn job_type(&self) -> JobType {
        use InitialReplicationType as I;
        use Operation as O;
        match self {
            O::CreateReplicationRelationship => JobType::CreateReplicationRelationship,
            O::ModifyReplicationSettings | O::SetFailoverNetworkAdapterSettings => {
                JobType::ModifyReplicationRelationshipSettings
            }
            O::RemoveReplicationRelationship => JobType::RemoveReplicationRelationship,
            O::StartReplication(I::Network) => JobType::StartInbandInitialReplication,
            O::StartReplication(I::Export) => JobType::StartExportInitialReplication,
            O::StartReplication(I::Seeded) => JobType::StartResyncInitialReplication,
            O::ImportInitialReplica => JobType::ImportReplication,
            O::InitiateFailover => JobType::InitiateFailover,
            O::RevertFailover => JobType::RevertFailover,
            O::CommitFailover => JobType::CommitFailover,
            O::ReverseReplicationRelationship => JobType::ReverseReplication,
            O::TestReplicaSystem => JobType::InitiateTestReplica,
            O::Resynchronize => JobType::Resynchronizing,
            O::InitiateFailback => JobType::InitiateFailback,
            O::ChangeReplicationModeToPrimary => JobType::ChangeReplicationModeToPrimary,
            O::RequestReplicationStateChange(r) => rrsc_job_type(*r),
            O::GetReplicationStatistics => JobType::GetReplicaStatistics,
            O::ResetReplicationStatistics => JobType::ResetReplicaStatistics,
        }
    }

    /// Operations that only read or annotate a relationship and never change its state.
    pub fn is_bookkeeping(&self) -> bool {
        matches!(
            self,
            Operation::GetReplicationStatistics
                | Operation::ResetReplicationStatistics
                | Operation::SetFailoverNetworkAdapterSettings
        )
    }
}

fn rrsc_job_type(requested: RequestedState) -> JobType {
    match requested {
        RequestedState::ReadyForReplication => JobType::StopInitialReplication,
        RequestedState::SyncedReplicationComplete => JobType::InitiateSyncedReplication,
        RequestedState::CancelResynchronize => JobType::StopResynchronizing,
        _ => JobType::ReplicateStateChange,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requested_state_accepts_only_the_value_map() {
        assert_eq!(RequestedState::from_u16(7), Some(RequestedState::Suspend));
        assert_eq!(
            RequestedState::from_u16(9),
            Some(RequestedState::CancelResynchronize)
        );
        for rejected in [0, 5, 6, 8, 10, 15, 16] {
            assert_eq!(RequestedState::from_u16(rejected), None, "{rejected}");
        }
    }

    #[test]
    fn all_lists_every_variant_and_parameter_once() {
        let all = Operation::all();
        assert_eq!(all.len(), 24);
        let mut names: Vec<String> = all.iter().map(Operation::name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 24);
    }

    #[test]
    fn names_carry_the_numeric_parameter() {
        assert_eq!(
            Operation::StartReplication(InitialReplicationType::Network).name(),
            "StartReplication(1)"
        );
        assert_eq!(
            Operation::RequestReplicationStateChange(RequestedState::Suspend).name(),
            "RequestReplicationStateChange(7)"
        );
        assert_eq!(Operation::InitiateFailback.name(), "InitiateFailback");
    }

    // Spec §2.3 / §3.2 name the job types of these methods.
    #[test]
    fn documented_job_types() {
        use JobType as J;
        use Operation as O;
        assert_eq!(
            O::CreateReplicationRelationship.job_type(),
            J::CreateReplicationRelationship
        );
        assert_eq!(
            O::StartReplication(InitialReplicationType::Network)
                .job_type()
                .as_u16(),
            94
        );
        assert_eq!(
            O::StartReplication(InitialReplicationType::Seeded)
                .job_type()
                .as_u16(),
            117
        );
        assert_eq!(
            O::StartReplication(InitialReplicationType::Export)
                .job_type()
                .as_u16(),
            118
        );
        assert_eq!(O::ImportInitialReplica.job_type().as_u16(), 95);
        assert_eq!(O::InitiateFailover.job_type().as_u16(), 97);
        assert_eq!(O::RevertFailover.job_type().as_u16(), 98);
        assert_eq!(O::CommitFailover.job_type().as_u16(), 99);
        assert_eq!(O::TestReplicaSystem.job_type().as_u16(), 102);
        assert_eq!(O::ReverseReplicationRelationship.job_type().as_u16(), 104);
        assert_eq!(O::Resynchronize.job_type().as_u16(), 107);
        assert_eq!(O::ChangeReplicationModeToPrimary.job_type().as_u16(), 123);
        assert_eq!(O::InitiateFailback.job_type().as_u16(), 124);
    }
}
