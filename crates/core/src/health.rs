//! Replication health (spec §10, "Health rules published by the Hyper-V team"): a pure function of
//! the mode, the state and the monitoring window's counters.
//!
//! - Critical: state 8 (Critical), 9 (resynchronization required) or 16 (disk update critical) on
//!   either side — the blog lists "cannot send" and "resync required" for the primary; we apply the
//!   same to a replica in those states — and replication suspended (7) on the *replica*.
//! - Warning: more than 20 % of the window's cycles missed; more than an hour since the last send or
//!   receive; initial replication not complete (1, 2); failed over but not reversed (5, 6);
//!   replication suspended on the *primary* (7, 11); average latency above 5 minutes.
//! - Normal otherwise. Mode None and Test Replica: Not applicable.

use crate::state::{ReplicationHealth, ReplicationMode, ReplicationState};

/// One hour, the lag beyond which health is Warning.
pub const MAX_LAG_SECS: u64 = 3600;
/// Five minutes, the average latency beyond which health is Warning.
pub const MAX_AVERAGE_LATENCY_SECS: u64 = 300;
/// Percent of missed cycles beyond which health is Warning.
pub const MAX_MISSED_PERCENT: u64 = 20;

/// What the health rules look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthInputs {
    pub mode: ReplicationMode,
    pub state: ReplicationState,
    /// `ReplicationSuccessCount` of the monitoring window.
    pub success_count: u32,
    /// `ReplicationMissCount` of the monitoring window.
    pub miss_count: u32,
    /// Since the last send (primary) or receive (replica); `None` when there was none.
    pub seconds_since_last_replication: Option<u64>,
    /// `ReplicationLatency / ReplicationSuccessCount`; `None` without successes.
    pub average_latency_secs: Option<u64>,
    /// Why the primary's last attempt to send failed, while it keeps retrying (spec §10: Critical
    /// when the primary cannot send); `None` after a success.
    pub send_error: Option<String>,
}

/// One reason the health is not Normal; becomes an `Msvm_Error` in `ReplicationHealthIssues`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthIssue {
    pub health: ReplicationHealth,
    pub message: String,
    pub recommended_action: String,
}

/// The health and the issues behind it. The health is the worst issue's, or Normal (1) without any.
pub fn evaluate_health(inputs: &HealthInputs) -> (ReplicationHealth, Vec<HealthIssue>) {
    if matches!(
        inputs.mode,
        ReplicationMode::None | ReplicationMode::TestReplica
    ) {
        return (ReplicationHealth::NotApplicable, Vec::new());
    }
    let issues: Vec<HealthIssue> = [
        state_issue(inputs),
        send_issue(inputs),
        missed_issue(inputs),
        lag_issue(inputs),
        latency_issue(inputs),
    ]
    .into_iter()
    .flatten()
    .collect();
    let health = issues
        .iter()
        .map(|i| i.health)
        .max_by_key(|h| h.as_u16())
        .unwrap_or(ReplicationHealth::Ok);
    (health, issues)
}

fn issue(health: ReplicationHealth, message: String, action: &str) -> Option<HealthIssue> {
    Some(HealthIssue {
        health,
        message,
        recommended_action: action.to_string(),
    })
}

fn send_issue(inputs: &HealthInputs) -> Option<HealthIssue> {
    let why = inputs.send_error.as_ref()?;
    if inputs.mode != ReplicationMode::Primary || inputs.state != ReplicationState::Replicating {
        return None;
    }
    issue(
        ReplicationHealth::Critical,
        format!("Replication to the recovery server is failing and being retried: {why}"),
        "Check the network to the recovery server and its log; replication resumes by itself once the cause is fixed.",
    )
}

fn state_issue(inputs: &HealthInputs) -> Option<HealthIssue> {
    use ReplicationHealth::{Critical, Warning};
    use ReplicationState as S;
    let primary = inputs.mode == ReplicationMode::Primary;
    match inputs.state {
        S::Critical => issue(
            Critical,
            "Replication is in an error state and has stopped.".into(),
            "Look at the failed job's error, fix the cause, then resume replication.",
        ),
        S::WaitingToStartResynchronization => issue(
            Critical,
            "Resynchronization is required for the virtual machine; changes are no longer tracked."
                .into(),
            "Resume replication with resynchronization (Resynchronize), or wait for the automatic \
             resynchronization window.",
        ),
        S::DiskUpdateCritical => issue(
            Critical,
            "Updating the replicated disk set failed.".into(),
            "Resume replication with resynchronization.",
        ),
        S::Suspended if !primary => issue(
            Critical,
            "Replication is paused on the replica virtual machine.".into(),
            "Resume replication on the replica (RequestReplicationStateChange(3)).",
        ),
        S::Suspended | S::ResynchronizationSuspended => issue(
            Warning,
            "Replication is paused for the virtual machine.".into(),
            "Resume replication (RequestReplicationStateChange(3)).",
        ),
        S::ReadyForReplication | S::WaitingToCompleteInitialReplication => issue(
            Warning,
            "Initial replication has not completed.".into(),
            "Start initial replication, or wait for it to complete.",
        ),
        S::Recovered | S::Committed => issue(
            Warning,
            "The virtual machine has failed over but replication has not been reversed.".into(),
            "Commit the failover and reverse replication (ReverseReplicationRelationship).",
        ),
        _ => None,
    }
}

/// Spec §3.2 quotes "More than 20 percent of replication cycles have been missed…".
fn missed_issue(inputs: &HealthInputs) -> Option<HealthIssue> {
    let missed = u64::from(inputs.miss_count);
    let total = missed + u64::from(inputs.success_count);
    if total == 0 || missed * 100 <= total * MAX_MISSED_PERCENT {
        return None;
    }
    issue(
        ReplicationHealth::Warning,
        format!(
            "More than 20 percent of replication cycles have been missed ({missed} of {total} in the current \
             monitoring window)."
        ),
        "Check the network between the servers and the load on both; consider a longer replication interval.",
    )
}

/// Spec §3.2 quotes "Replica … is behind the primary by more than an hour".
fn lag_issue(inputs: &HealthInputs) -> Option<HealthIssue> {
    let seconds = inputs.seconds_since_last_replication?;
    if seconds <= MAX_LAG_SECS || !replicates(inputs.state) {
        return None;
    }
    let minutes = seconds / 60;
    let message = if inputs.mode == ReplicationMode::Primary {
        format!("The replica is behind the primary by more than an hour (last replication sent {minutes} minutes ago).")
    } else {
        format!("The replica is behind the primary by more than an hour (last replication received {minutes} minutes ago).")
    };
    issue(
        ReplicationHealth::Warning,
        message,
        "Check that the primary server can reach the recovery server and that replication is not paused.",
    )
}

fn latency_issue(inputs: &HealthInputs) -> Option<HealthIssue> {
    let average = inputs.average_latency_secs?;
    if average <= MAX_AVERAGE_LATENCY_SECS {
        return None;
    }
    issue(
        ReplicationHealth::Warning,
        format!("The average replication latency is {average} seconds, more than 5 minutes."),
        "Check the bandwidth between the servers; consider enabling compression.",
    )
}

/// States in which cycles are expected, so a long silence is news.
fn replicates(state: ReplicationState) -> bool {
    use ReplicationState as S;
    matches!(
        state,
        S::Replicating | S::Resynchronizing | S::FailbackComplete
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicationHealth::{Critical, NotApplicable, Ok, Warning};
    use ReplicationMode::{Primary, Replica};
    use ReplicationState as S;

    fn inputs(mode: ReplicationMode, state: ReplicationState) -> HealthInputs {
        HealthInputs {
            mode,
            state,
            success_count: 100,
            miss_count: 0,
            seconds_since_last_replication: Some(60),
            average_latency_secs: Some(10),
            send_error: None,
        }
    }

    #[test]
    fn a_primary_that_cannot_send_is_critical() {
        let failing = HealthInputs {
            send_error: Some("connection refused".into()),
            ..inputs(Primary, S::Replicating)
        };
        let (h, issues) = evaluate_health(&failing);
        assert_eq!(h, Critical);
        assert!(issues[0].message.contains("connection refused"));
        let replica = HealthInputs {
            send_error: Some("x".into()),
            ..inputs(Replica, S::Replicating)
        };
        assert_eq!(health(replica), Ok);
    }

    fn health(i: HealthInputs) -> ReplicationHealth {
        evaluate_health(&i).0
    }

    // Spec §10 table, rows written out by hand.
    #[test]
    fn normal_when_replicating_on_time() {
        assert_eq!(
            evaluate_health(&inputs(Primary, S::Replicating)),
            (Ok, vec![])
        );
        assert_eq!(health(inputs(Replica, S::Replicating)), Ok);
    }

    #[test]
    fn not_applicable_without_replication() {
        assert_eq!(
            health(inputs(ReplicationMode::None, S::Disabled)),
            NotApplicable
        );
        assert_eq!(
            health(inputs(ReplicationMode::TestReplica, S::Disabled)),
            NotApplicable
        );
    }

    #[test]
    fn critical_states() {
        assert_eq!(health(inputs(Primary, S::Critical)), Critical);
        assert_eq!(
            health(inputs(Primary, S::WaitingToStartResynchronization)),
            Critical
        );
        assert_eq!(health(inputs(Replica, S::Suspended)), Critical);
        assert_eq!(health(inputs(Primary, S::DiskUpdateCritical)), Critical);
    }

    #[test]
    fn warning_states() {
        assert_eq!(health(inputs(Primary, S::Suspended)), Warning);
        assert_eq!(health(inputs(Primary, S::ReadyForReplication)), Warning);
        assert_eq!(
            health(inputs(Primary, S::WaitingToCompleteInitialReplication)),
            Warning
        );
        assert_eq!(
            health(inputs(Replica, S::WaitingToCompleteInitialReplication)),
            Warning
        );
        assert_eq!(health(inputs(Replica, S::Recovered)), Warning);
        assert_eq!(health(inputs(Replica, S::Committed)), Warning);
    }

    #[test]
    fn more_than_20_percent_missed_is_a_warning() {
        let exactly_20 = HealthInputs {
            success_count: 80,
            miss_count: 20,
            ..inputs(Primary, S::Replicating)
        };
        assert_eq!(health(exactly_20), Ok);
        let over = HealthInputs {
            success_count: 79,
            miss_count: 21,
            ..inputs(Primary, S::Replicating)
        };
        let (h, issues) = evaluate_health(&over);
        assert_eq!(h, Warning);
        assert!(issues[0]
            .message
            .starts_with("More than 20 percent of replication cycles have been missed"));
        let none = HealthInputs {
            success_count: 0,
            miss_count: 0,
            ..inputs(Primary, S::Replicating)
        };
        assert_eq!(health(none), Ok);
    }

    #[test]
    fn more_than_an_hour_behind_is_a_warning() {
        let hour = HealthInputs {
            seconds_since_last_replication: Some(3600),
            ..inputs(Replica, S::Replicating)
        };
        assert_eq!(health(hour), Ok);
        let late = HealthInputs {
            seconds_since_last_replication: Some(3601),
            ..inputs(Replica, S::Replicating)
        };
        let (h, issues) = evaluate_health(&late);
        assert_eq!(h, Warning);
        assert!(issues[0]
            .message
            .contains("behind the primary by more than an hour"));
    }

    #[test]
    fn average_latency_over_5_minutes_is_a_warning() {
        let slow = HealthInputs {
            average_latency_secs: Some(301),
            ..inputs(Primary, S::Replicating)
        };
        assert_eq!(health(slow), Warning);
    }

    #[test]
    fn the_worst_issue_wins_and_all_are_listed() {
        let both = HealthInputs {
            miss_count: 100,
            ..inputs(Primary, S::Critical)
        };
        let (h, issues) = evaluate_health(&both);
        assert_eq!(h, Critical);
        assert_eq!(issues.len(), 2);
        assert!(issues.iter().all(|i| !i.recommended_action.is_empty()));
    }
}
