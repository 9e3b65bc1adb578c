//! Replication modes, states, health and the small enums of spec §4.

use crate::numbered::numbered_enum;

numbered_enum! {
    /// `Msvm_ComputerSystem.ReplicationMode` (spec §4.2): which side of a relationship this VM is.
    pub enum ReplicationMode { None = 0, Primary = 1, Replica = 2, TestReplica = 3, ExtendedReplica = 4 }
}

impl ReplicationMode {
    /// The label of spec §4.2 (the doc's "Recovery" for 2 is a known quirk; the label is Replica).
    pub fn label(self) -> &'static str {
        match self {
            ReplicationMode::None => "None",
            ReplicationMode::Primary => "Primary",
            ReplicationMode::Replica => "Replica",
            ReplicationMode::TestReplica => "Test Replica",
            ReplicationMode::ExtendedReplica => "Extended Replica",
        }
    }

    /// True for the modes that receive replication (Replica, Extended Replica).
    pub fn is_recovery_side(self) -> bool {
        matches!(
            self,
            ReplicationMode::Replica | ReplicationMode::ExtendedReplica
        )
    }
}

numbered_enum! {
    /// `Msvm_ReplicationRelationship.ReplicationState` (spec §4.1), values 0–21.
    pub enum ReplicationState {
        Disabled = 0,
        ReadyForReplication = 1,
        WaitingToCompleteInitialReplication = 2,
        Replicating = 3,
        SyncedReplicationComplete = 4,
        Recovered = 5,
        Committed = 6,
        Suspended = 7,
        Critical = 8,
        WaitingToStartResynchronization = 9,
        Resynchronizing = 10,
        ResynchronizationSuspended = 11,
        FailoverInProgress = 12,
        FailbackInProgress = 13,
        FailbackComplete = 14,
        DiskUpdateInProgress = 15,
        DiskUpdateCritical = 16,
        Unknown = 17,
        RepurposeReplicationInProgress = 18,
        PreparedForSyncReplication = 19,
        PreparedForGroupReverseReplication = 20,
        FiredrillInProgress = 21,
    }
}

impl ReplicationState {
    /// The WMI label of spec §4.1.
    pub fn label(self) -> &'static str {
        use ReplicationState as S;
        match self {
            S::Disabled => "Disabled",
            S::ReadyForReplication => "Ready for replication",
            S::WaitingToCompleteInitialReplication => "Waiting to complete initial replication",
            S::Replicating => "Replicating",
            S::SyncedReplicationComplete => "Synced replication complete",
            S::Recovered => "Recovered",
            S::Committed => "Committed",
            S::Suspended => "Suspended",
            S::Critical => "Critical",
            S::WaitingToStartResynchronization => "Waiting to start resynchronization",
            S::Resynchronizing => "Resynchronizing",
            S::ResynchronizationSuspended => "Resynchronization suspended",
            S::FailoverInProgress => "Failover in progress",
            S::FailbackInProgress => "Failback in progress",
            S::FailbackComplete => "Failback complete",
            S::DiskUpdateInProgress => "Disk update in progress",
            S::DiskUpdateCritical => "Disk update critical",
            S::Unknown => "Unknown",
            S::RepurposeReplicationInProgress => "Repurpose replication in progress",
            S::PreparedForSyncReplication => "Prepared for sync replication",
            S::PreparedForGroupReverseReplication => "Prepared for group reverse replication",
            S::FiredrillInProgress => "Firedrill in progress",
        }
    }

    /// The PowerShell `VMReplicationState` name for a VM of this mode (spec §4.1 table).
    ///
    /// None and Primary use the primary-side column; Replica, Extended Replica and Test Replica the
    /// replica column. Cells the table marks "n/a" or "(not mapped)" read `"Unknown"`, except state 13 on
    /// the primary side, which PowerShell shows as `"Disabled"`.
    pub fn ps_name(self, mode: ReplicationMode) -> &'static str {
        if matches!(mode, ReplicationMode::None | ReplicationMode::Primary) {
            self.ps_name_primary()
        } else {
            self.ps_name_replica()
        }
    }

    fn ps_name_primary(self) -> &'static str {
        use ReplicationState as S;
        match self {
            S::Disabled | S::FailbackInProgress => "Disabled",
            S::ReadyForReplication => "ReadyForInitialReplication",
            S::WaitingToCompleteInitialReplication => "InitialReplicationInProgress",
            S::SyncedReplicationComplete => "PreparedForFailover",
            S::Recovered
            | S::Committed
            | S::FailbackComplete
            | S::Unknown
            | S::FiredrillInProgress => "Unknown",
            S::PreparedForSyncReplication => "PreparedForSyncReplication",
            S::PreparedForGroupReverseReplication => "PreparedForGroupReverseReplication",
            other => other.ps_name_common(),
        }
    }

    fn ps_name_replica(self) -> &'static str {
        use ReplicationState as S;
        match self {
            S::Disabled => "Disabled",
            S::ReadyForReplication => "ReadyForInitialReplication",
            S::WaitingToCompleteInitialReplication => "WaitingForInitialReplication",
            S::Recovered => "FailedOverWaitingCompletion",
            S::Committed => "FailedOver",
            S::FailbackInProgress => "FailbackInProgress",
            S::FailbackComplete => "FailbackComplete",
            S::FiredrillInProgress => "FiredrillInProgress",
            S::SyncedReplicationComplete
            | S::Unknown
            | S::PreparedForSyncReplication
            | S::PreparedForGroupReverseReplication => "Unknown",
            other => other.ps_name_common(),
        }
    }

    /// Names both columns share.
    fn ps_name_common(self) -> &'static str {
        use ReplicationState as S;
        match self {
            S::Replicating => "Replicating",
            S::Suspended => "Suspended",
            S::Critical => "Error",
            S::WaitingToStartResynchronization => "WaitingForStartResynchronize",
            S::Resynchronizing => "Resynchronizing",
            S::ResynchronizationSuspended => "ResynchronizeSuspended",
            S::FailoverInProgress => "RecoveryInProgress",
            S::DiskUpdateInProgress => "WaitingForUpdateCompletion",
            S::DiskUpdateCritical => "UpdateError",
            S::RepurposeReplicationInProgress => "WaitingForRepurposeCompletion",
            _ => "Unknown",
        }
    }
}

numbered_enum! {
    /// `ReplicationHealth` (spec §4.2).
    pub enum ReplicationHealth { NotApplicable = 0, Ok = 1, Warning = 2, Critical = 3 }
}

impl ReplicationHealth {
    /// The name PowerShell shows (`Normal` for 1 Ok).
    pub fn label(self) -> &'static str {
        match self {
            ReplicationHealth::NotApplicable => "NotApplicable",
            ReplicationHealth::Ok => "Normal",
            ReplicationHealth::Warning => "Warning",
            ReplicationHealth::Critical => "Critical",
        }
    }
}

numbered_enum! {
    /// `LastReplicationType` / `FailedOverReplicationType` (spec §4.2).
    pub enum ReplicationType { None = 0, Regular = 1, ApplicationConsistent = 2, Planned = 3 }
}

numbered_enum! {
    /// `StartReplication.InitialReplicationType` (spec §4.2): PS OverNetwork, Export, UsingBackup.
    pub enum InitialReplicationType { Network = 1, Export = 2, Seeded = 3 }
}

numbered_enum! {
    /// `Msvm_ReplicationSettingData.AuthenticationType` (spec §4.2).
    pub enum AuthenticationType { Kerberos = 1, Certificate = 2 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_numbers_match_spec_4_2() {
        assert_eq!(ReplicationMode::from_u16(0), Some(ReplicationMode::None));
        assert_eq!(ReplicationMode::from_u16(2), Some(ReplicationMode::Replica));
        assert_eq!(
            ReplicationMode::from_u16(4),
            Some(ReplicationMode::ExtendedReplica)
        );
        assert_eq!(ReplicationMode::from_u16(5), None);
        assert_eq!(ReplicationMode::TestReplica.as_u16(), 3);
        assert_eq!(ReplicationMode::TestReplica.label(), "Test Replica");
    }

    #[test]
    fn state_numbers_and_labels_match_spec_4_1() {
        assert_eq!(ReplicationState::ALL.len(), 22);
        assert_eq!(ReplicationState::SyncedReplicationComplete.as_u16(), 4);
        assert_eq!(ReplicationState::FailbackInProgress.as_u16(), 13);
        assert_eq!(ReplicationState::FiredrillInProgress.as_u16(), 21);
        assert_eq!(ReplicationState::from_u16(22), None);
        assert_eq!(
            ReplicationState::from_u16(9).map(|s| s.label()),
            Some("Waiting to start resynchronization")
        );
        assert_eq!(
            ReplicationState::DiskUpdateInProgress.label(),
            "Disk update in progress"
        );
        for (index, state) in ReplicationState::ALL.iter().enumerate() {
            assert_eq!(usize::from(state.as_u16()), index);
        }
    }

    #[test]
    fn powershell_names_depend_on_mode() {
        use ReplicationMode::{Primary, Replica};
        use ReplicationState as S;
        assert_eq!(
            S::SyncedReplicationComplete.ps_name(Primary),
            "PreparedForFailover"
        );
        assert_eq!(S::Recovered.ps_name(Replica), "FailedOverWaitingCompletion");
        assert_eq!(S::Committed.ps_name(Replica), "FailedOver");
        assert_eq!(
            S::WaitingToCompleteInitialReplication.ps_name(Primary),
            "InitialReplicationInProgress"
        );
        assert_eq!(
            S::WaitingToCompleteInitialReplication.ps_name(Replica),
            "WaitingForInitialReplication"
        );
        assert_eq!(S::Critical.ps_name(Primary), "Error");
        assert_eq!(S::FailbackInProgress.ps_name(Primary), "Disabled");
        assert_eq!(S::FailbackInProgress.ps_name(Replica), "FailbackInProgress");
        assert_eq!(
            S::FailbackComplete.ps_name(ReplicationMode::ExtendedReplica),
            "FailbackComplete"
        );
        assert_eq!(S::FailoverInProgress.ps_name(Replica), "RecoveryInProgress");
        assert_eq!(S::DiskUpdateCritical.ps_name(Primary), "UpdateError");
        assert_eq!(S::Unknown.ps_name(Primary), "Unknown");
    }

    #[test]
    fn health_labels_follow_powershell() {
        assert_eq!(ReplicationHealth::Ok.label(), "Normal");
        assert_eq!(ReplicationHealth::Ok.as_u16(), 1);
        assert_eq!(ReplicationHealth::Critical.as_u16(), 3);
    }

    #[test]
    fn small_enums_match_spec_4_2() {
        assert_eq!(ReplicationType::Planned.as_u16(), 3);
        assert_eq!(
            InitialReplicationType::from_u16(3),
            Some(InitialReplicationType::Seeded)
        );
        assert_eq!(InitialReplicationType::from_u16(0), None);
        assert_eq!(
            AuthenticationType::from_u16(2),
            Some(AuthenticationType::Certificate)
        );
    }
}
