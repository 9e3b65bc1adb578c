//! The asynchronous job model of spec §2.2 and §2.3: job types, job states, job state requests.

use crate::numbered::numbered_enum;

numbered_enum! {
    /// `Msvm_ConcreteJob.JobType` values for replication (spec §2.3).
    pub enum JobType {
        ModifyReplicationServerSettings = 90,
        CreateReplicationRelationship = 91,
        ModifyReplicationRelationshipSettings = 92,
        RemoveReplicationRelationship = 93,
        StartInbandInitialReplication = 94,
        ImportReplication = 95,
        ReplicateStateChange = 96,
        InitiateFailover = 97,
        RevertFailover = 98,
        CommitFailover = 99,
        InitiateSyncedReplication = 100,
        CancelSyncedReplication = 101,
        InitiateTestReplica = 102,
        RemoveTestReplica = 103,
        ReverseReplication = 104,
        ReplicationSendingDelta = 105,
        ReplicationReceivingDelta = 106,
        Resynchronizing = 107,
        ApplyChangeLog = 108,
        StopInitialReplication = 109,
        StopResynchronizing = 110,
        GetReplicaStatistics = 111,
        PrepareForConsistencyChecker = 112,
        ConsistencyChecker = 113,
        StopConsistencyChecker = 114,
        TestReplicationConnection = 115,
        SendingInitialReplica = 116,
        StartResyncInitialReplication = 117,
        StartExportInitialReplication = 118,
        ResetReplicaStatistics = 119,
        ApplyRegisteredDeltas = 120,
        ResynchronizingExtendedReplication = 121,
        ReadingTestReplicaConfiguration = 122,
        ChangeReplicationModeToPrimary = 123,
        InitiateFailback = 124,
        UpdateDiskSet = 125,
    }
}

impl JobType {
    /// The caption of spec §2.3 (the MOF's "Inititate" typo is not copied).
    pub fn caption(self) -> &'static str {
        use JobType as J;
        match self {
            J::ModifyReplicationServerSettings => "Modify Replication Server Settings",
            J::CreateReplicationRelationship => "Create Replication Relationship",
            J::ModifyReplicationRelationshipSettings => "Modify Replication Relationship Settings",
            J::RemoveReplicationRelationship => "Remove Replication Relationship",
            J::StartInbandInitialReplication => "Start Inband Initial Replication",
            J::ImportReplication => "Import Replication",
            J::ReplicateStateChange => "Replicate State Change",
            J::InitiateFailover => "Initiate Failover",
            J::RevertFailover => "Revert Failover",
            J::CommitFailover => "Commit Failover",
            J::InitiateSyncedReplication => "Initiate Synced Replication",
            J::CancelSyncedReplication => "Cancel Synced Replication",
            J::InitiateTestReplica => "Initiate Test Replica",
            J::RemoveTestReplica => "Remove Test Replica",
            J::ReverseReplication => "Reverse Replication",
            J::ReplicationSendingDelta => "Replication Sending Delta",
            J::ReplicationReceivingDelta => "Replication Receiving Delta",
            J::Resynchronizing => "Resynchronizing",
            J::ApplyChangeLog => "Apply change log",
            J::StopInitialReplication => "Stop Initial Replication",
            J::StopResynchronizing => "Stop Resynchronizing",
            J::GetReplicaStatistics => "Get Replica statistics",
            J::PrepareForConsistencyChecker => "Prepare for Consistency Checker",
            J::ConsistencyChecker => "Consistency Checker",
            J::StopConsistencyChecker => "Stop Consistency Checker",
            J::TestReplicationConnection => "Test Replication Connection",
            J::SendingInitialReplica => "Sending Initial Replica",
            J::StartResyncInitialReplication => "Start Resync Initial Replication",
            J::StartExportInitialReplication => "Start Export Initial Replication",
            J::ResetReplicaStatistics => "Reset Replica Statistics",
            J::ApplyRegisteredDeltas => "Apply Registered Deltas",
            J::ResynchronizingExtendedReplication => "Resynchronizing Extended Replication",
            J::ReadingTestReplicaConfiguration => "Reading Test Replica Configuration",
            J::ChangeReplicationModeToPrimary => "Change the replication mode to primary",
            J::InitiateFailback => "Initiate Failback",
            J::UpdateDiskSet => "Update Disk Set",
        }
    }
}

numbered_enum! {
    /// `CIM_ConcreteJob.JobState` (spec §2.2). 32768 is the vendor value Hyper-V samples read as
    /// "completed with warnings".
    pub enum JobState {
        New = 2,
        Starting = 3,
        Running = 4,
        Suspended = 5,
        ShuttingDown = 6,
        Completed = 7,
        Terminated = 8,
        Killed = 9,
        Exception = 10,
        Service = 11,
        QueryPending = 12,
        CompletedWithWarnings = 32768,
    }
}

impl JobState {
    /// The job will not change any more: 7, 8, 9, 10 or 32768 (the states Microsoft's sample stops
    /// polling at).
    pub fn is_terminal(self) -> bool {
        self.is_success()
            || matches!(
                self,
                JobState::Terminated | JobState::Killed | JobState::Exception
            )
    }

    /// The job finished and did what it was asked: 7 Completed or 32768 Completed with warnings.
    pub fn is_success(self) -> bool {
        matches!(self, JobState::Completed | JobState::CompletedWithWarnings)
    }
}

numbered_enum! {
    /// `Msvm_ConcreteJob.RequestStateChange(RequestedState)` values (spec §2.2).
    pub enum JobStateRequest { Start = 2, Suspend = 3, Terminate = 4, Kill = 5, Service = 6 }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Spec §2.3, by hand.
    #[test]
    fn job_type_numbers_and_captions() {
        assert_eq!(JobType::ALL.len(), 36);
        assert_eq!(JobType::ModifyReplicationServerSettings.as_u16(), 90);
        assert_eq!(JobType::InitiateFailover.as_u16(), 97);
        assert_eq!(
            JobType::InitiateSyncedReplication.caption(),
            "Initiate Synced Replication"
        );
        assert_eq!(JobType::from_u16(124), Some(JobType::InitiateFailback));
        assert_eq!(
            JobType::from_u16(124).map(JobType::caption),
            Some("Initiate Failback")
        );
        assert_eq!(
            JobType::from_u16(117).map(JobType::caption),
            Some("Start Resync Initial Replication")
        );
        assert_eq!(
            JobType::ChangeReplicationModeToPrimary.caption(),
            "Change the replication mode to primary"
        );
        assert_eq!(JobType::UpdateDiskSet.as_u16(), 125);
        assert_eq!(JobType::from_u16(89), None);
        assert_eq!(JobType::from_u16(126), None);
    }

    // Spec §2.2: success is 7 or 32768; failure 8, 9, 10.
    #[test]
    fn terminal_and_success_job_states() {
        assert!(JobState::Completed.is_success());
        assert!(JobState::CompletedWithWarnings.is_success());
        assert_eq!(JobState::CompletedWithWarnings.as_u16(), 32768);
        for failed in [JobState::Terminated, JobState::Killed, JobState::Exception] {
            assert!(failed.is_terminal());
            assert!(!failed.is_success());
        }
        for running in [
            JobState::New,
            JobState::Starting,
            JobState::Running,
            JobState::Suspended,
            JobState::QueryPending,
        ] {
            assert!(!running.is_terminal());
        }
        assert_eq!(JobState::from_u16(13), None);
    }

    #[test]
    fn job_state_requests() {
        assert_eq!(
            JobStateRequest::from_u16(4),
            Some(JobStateRequest::Terminate)
        );
        assert_eq!(JobStateRequest::from_u16(7), None);
        assert_eq!(JobStateRequest::Service.as_u16(), 6);
    }
}
