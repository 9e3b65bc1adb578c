//! Rules for a VM in mode Replica (spec §3.2, §3.3, §13, §14; DESIGN §6). Extended Replica VMs are
//! decided here too and then refused with 32770 by the caller.

use super::primary::{already_protected, resume_before_initial_replication, suspend};
use super::{
    go, refuse, require, require_off, stay, wrong_side, Facts, Operation, Refusal, RequestedState,
    Transition,
};
use crate::codes::ReturnCode;
use crate::state::{ReplicationMode, ReplicationState as S};

const REPLICA: ReplicationMode = ReplicationMode::Replica;

pub(super) fn decide(state: S, op: Operation, facts: &Facts) -> Result<Transition, Refusal> {
    use Operation as O;
    match op {
        // On a replica these act on the extended relationship (spec §3.2, §13.5).
        O::CreateReplicationRelationship | O::StartReplication(_) | O::Resynchronize => {
            extension(state, op, &[S::Replicating, S::Suspended])
        }
        O::ChangeReplicationModeToPrimary => extension(state, op, &[S::Committed]),
        O::ModifyReplicationSettings => Err(refuse(
            ReturnCode::InvalidState,
            "The settings of a replica's primary relationship cannot be modified; change them on the primary.",
        )),
        O::ImportInitialReplica => {
            require(op, state, &[S::WaitingToCompleteInitialReplication])?;
            Ok(go(None, S::Replicating, REPLICA, op, true))
        }
        O::InitiateFailover => failover(state, op, facts),
        O::RevertFailover => {
            // MOF: only when failed over; PS-IMPL also from 12. DESIGN §6: back to 3.
            require(op, state, &[S::Recovered, S::FailoverInProgress])?;
            require_off(op, facts)?;
            Ok(go(None, S::Replicating, REPLICA, op, true))
        }
        O::CommitFailover => {
            require(op, state, &[S::Recovered])?;
            Ok(go(None, S::Committed, REPLICA, op, true))
        }
        O::ReverseReplicationRelationship => {
            require(op, state, &[S::Recovered, S::Committed])?;
            let after = if facts.failed_over_planned { S::Replicating } else { S::WaitingToStartResynchronization };
            Ok(go(None, after, ReplicationMode::Primary, op, false))
        }
        O::TestReplicaSystem => test_replica(state, op, facts),
        O::InitiateFailback => {
            let from = [
                S::Replicating,
                S::Suspended,
                S::Critical,
                S::WaitingToStartResynchronization,
                S::ResynchronizationSuspended,
                S::FailbackComplete,
            ];
            require(op, state, &from)?;
            require_off(op, facts)?;
            Ok(go(Some(S::FailbackInProgress), S::FailbackComplete, REPLICA, op, true))
        }
        O::RequestReplicationStateChange(requested) => request(state, op, requested, facts),
        O::RemoveReplicationRelationship
        | O::SetFailoverNetworkAdapterSettings
        | O::GetReplicationStatistics
        | O::ResetReplicationStatistics => Ok(stay(REPLICA, state, op, false)),
    }
}

/// Extended replication is not supported: 32770 where the state would allow it, 32775 elsewhere.
fn extension(state: S, op: Operation, allowed: &[S]) -> Result<Transition, Refusal> {
    require(op, state, allowed)?;
    Err(refuse(
        ReturnCode::NotSupported,
        format!(
            "{} on a replica virtual machine acts on an extended replication relationship, and extended \
             replication is not supported yet.",
            op.name()
        ),
    ))
}

/// Spec §3.2 InitiateFailover (PS-IMPL preconditions are the server's here): state 3, 7, 10 or 15, VM
/// off, a replication received; 12 while the job runs, then 5.
fn failover(state: S, op: Operation, facts: &Facts) -> Result<Transition, Refusal> {
    let from = [
        S::Replicating,
        S::Suspended,
        S::Resynchronizing,
        S::DiskUpdateInProgress,
    ];
    require(op, state, &from)?;
    require_off(op, facts)?;
    require_received(op, facts)?;
    Ok(go(
        Some(S::FailoverInProgress),
        S::Recovered,
        REPLICA,
        op,
        true,
    ))
}

/// Spec §3.2 / §13.4: not while resynchronizing (10) or updating disks (15); one test VM at a time.
fn test_replica(state: S, op: Operation, facts: &Facts) -> Result<Transition, Refusal> {
    let from = [
        S::Replicating,
        S::Suspended,
        S::Critical,
        S::WaitingToStartResynchronization,
        S::FailbackComplete,
    ];
    require(op, state, &from)?;
    if facts.test_system_exists {
        return Err(refuse(
            ReturnCode::SystemInUse,
            "A test virtual machine already exists for this replica and only one is allowed; remove it \
             with DestroySystem first.",
        ));
    }
    require_received(op, facts)?;
    Ok(stay(REPLICA, state, op, true))
}

fn require_received(op: Operation, facts: &Facts) -> Result<(), Refusal> {
    if !facts.has_received_replication {
        return Err(refuse(
            ReturnCode::InvalidState,
            format!(
                "{} needs a recovery point, and no replication has been received yet; complete initial \
                 replication first.",
                op.name()
            ),
        ));
    }
    Ok(())
}

/// Spec §3.3 on the replica side.
fn request(
    state: S,
    op: Operation,
    requested: RequestedState,
    facts: &Facts,
) -> Result<Transition, Refusal> {
    use RequestedState as R;
    match requested {
        R::ReadyForReplication => Err(wrong_side(
            op,
            "replica",
            "state 1 (Ready for replication) exists only on the primary; stop initial replication there.",
        )),
        R::WaitingToCompleteInitialReplication => Err(already_protected(op)),
        // Resume-VMReplication; Stop-VMReplication on a simple replica; the pre-failover fix-up.
        R::Replicating => {
            require(op, state, &[S::Suspended, S::Critical, S::Resynchronizing, S::ResynchronizationSuspended])?;
            // Suspended (or made critical: its entry removed) before its initial replication
            // arrived: back to waiting for it.
            if let Some(t) = resume_before_initial_replication(state, op, facts, REPLICA) {
                return Ok(t);
            }
            Ok(go(Some(S::Replicating), S::Replicating, REPLICA, op, false))
        }
        R::SyncedReplicationComplete => Err(wrong_side(
            op,
            "replica",
            "a planned failover is prepared on the primary (VM off, state 3).",
        )),
        R::Suspend => suspend(state, op, REPLICA),
        R::CancelResynchronize => Err(wrong_side(
            op,
            "replica",
            "the resynchronization is cancelled on the primary; on a replica request state 3 instead.",
        )),
    }
}
