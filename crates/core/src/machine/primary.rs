//! Rules for a VM in mode Primary (spec §3.2, §3.3, §13; DESIGN §6).

use super::{
    go, not_busy, refuse, require, require_off, stay, wrong_side, Facts, Operation, Refusal,
    RequestedState, Transition,
};
use crate::codes::ReturnCode;
use crate::state::{InitialReplicationType, ReplicationMode, ReplicationState as S};

const PRIMARY: ReplicationMode = ReplicationMode::Primary;

pub(super) fn decide(state: S, op: Operation, facts: &Facts) -> Result<Transition, Refusal> {
    use Operation as O;
    match op {
        O::CreateReplicationRelationship => Err(refuse(
            ReturnCode::InvalidState,
            "Replication is already enabled for this virtual machine (mode Primary); change it with \
             ModifyReplicationSettings, or remove it first.",
        )),
        O::ModifyReplicationSettings => {
            not_busy(op, state)?;
            Ok(stay(PRIMARY, state, op, false))
        }
        O::StartReplication(kind) => start_replication(state, op, kind),
        O::RevertFailover => {
            // PS-IMPL: Stop-VMFailover on a prepared primary cancels the planned failover (§3.2).
            require(op, state, &[S::SyncedReplicationComplete])?;
            Ok(go(None, S::Replicating, PRIMARY, op, false))
        }
        O::Resynchronize => {
            // PS-IMPL: Resume -Resynchronize from 7, 9, 11, 8, 16; states 9 → 10 → 3 (§3.2, §13.6).
            let from = [
                S::Suspended,
                S::Critical,
                S::WaitingToStartResynchronization,
                S::ResynchronizationSuspended,
                S::DiskUpdateCritical,
            ];
            require(op, state, &from)?;
            Ok(go(Some(S::Resynchronizing), S::Replicating, PRIMARY, op, true))
        }
        O::InitiateFailback => failback(state, op, facts),
        O::RequestReplicationStateChange(requested) => request(state, op, requested, facts),
        O::ImportInitialReplica
        | O::InitiateFailover
        | O::CommitFailover
        | O::ReverseReplicationRelationship
        | O::TestReplicaSystem
        | O::ChangeReplicationModeToPrimary => Err(wrong_side(
            op,
            "primary",
            "call it on the replica. A planned failover is prepared on the primary with \
             RequestReplicationStateChange(4).",
        )),
        O::RemoveReplicationRelationship
        | O::SetFailoverNetworkAdapterSettings
        | O::GetReplicationStatistics
        | O::ResetReplicationStatistics => Ok(stay(PRIMARY, state, op, false)),
    }
}

/// Spec §3.2 StartReplication, §13.1: from 1 only; 2 while IR runs, then 3. Export waits in 2 for
/// `ImportInitialReplica` on the replica (UNCONFIRMED, §13.1).
fn start_replication(
    state: S,
    op: Operation,
    kind: InitialReplicationType,
) -> Result<Transition, Refusal> {
    require(op, state, &[S::ReadyForReplication])?;
    let after = match kind {
        InitialReplicationType::Export => S::WaitingToCompleteInitialReplication,
        InitialReplicationType::Network | InitialReplicationType::Seeded => S::Replicating,
    };
    Ok(go(
        Some(S::WaitingToCompleteInitialReplication),
        after,
        PRIMARY,
        op,
        true,
    ))
}

/// DESIGN §6: the old primary receives the VM back; 13 while the job runs, 14 after, and the VM is
/// from then on the replica of the new primary.
fn failback(state: S, op: Operation, facts: &Facts) -> Result<Transition, Refusal> {
    let from = [
        S::Replicating,
        S::SyncedReplicationComplete,
        S::Suspended,
        S::Critical,
        S::WaitingToStartResynchronization,
        S::ResynchronizationSuspended,
    ];
    require(op, state, &from)?;
    require_off(op, facts)?;
    Ok(go(
        Some(S::FailbackInProgress),
        S::FailbackComplete,
        ReplicationMode::Replica,
        op,
        true,
    ))
}

/// Spec §3.3 on the primary side.
fn request(
    state: S,
    op: Operation,
    requested: RequestedState,
    facts: &Facts,
) -> Result<Transition, Refusal> {
    use RequestedState as R;
    match requested {
        // Stop-VMInitialReplication when no IR job runs: back to Ready.
        R::ReadyForReplication => {
            require(op, state, &[S::WaitingToCompleteInitialReplication])?;
            Ok(go(
                Some(S::ReadyForReplication),
                S::ReadyForReplication,
                PRIMARY,
                op,
                false,
            ))
        }
        R::WaitingToCompleteInitialReplication => Err(already_protected(op)),
        R::Replicating => resume(state, op, facts),
        // Start-VMFailover -Prepare: VM off, state 3 → 4; ships the final log.
        R::SyncedReplicationComplete => {
            require(op, state, &[S::Replicating])?;
            require_off(op, facts)?;
            let prepared = S::SyncedReplicationComplete;
            Ok(go(Some(prepared), prepared, PRIMARY, op, true))
        }
        R::Suspend => suspend(state, op, PRIMARY),
        // Stop-VMReplication while resynchronizing: back to 9.
        R::CancelResynchronize => {
            require(
                op,
                state,
                &[S::Resynchronizing, S::ResynchronizationSuspended],
            )?;
            let waiting = S::WaitingToStartResynchronization;
            Ok(go(Some(waiting), waiting, PRIMARY, op, false))
        }
    }
}

/// Resume-VMReplication (RRSC 3) from 7, 9, 11, 8. From 9 and 11 the changes are unknown, so the
/// resume runs (or continues) a resynchronization: 10 is shown, not 3 (our choice; nothing is lost).
/// A VM suspended (or made critical) before its initial replication completed goes back to 2:
/// there is no chain to continue yet (an export waits for its import; a network one is started
/// again).
fn resume(state: S, op: Operation, facts: &Facts) -> Result<Transition, Refusal> {
    require(
        op,
        state,
        &[
            S::Suspended,
            S::Critical,
            S::WaitingToStartResynchronization,
            S::ResynchronizationSuspended,
        ],
    )?;
    if let Some(t) = resume_before_initial_replication(state, op, facts, PRIMARY) {
        return Ok(t);
    }
    let during = match state {
        S::WaitingToStartResynchronization | S::ResynchronizationSuspended => S::Resynchronizing,
        _ => S::Replicating,
    };
    Ok(go(Some(during), S::Replicating, PRIMARY, op, true))
}

/// A resume of a VM suspended (or made critical) before any initial replication arrived, on either
/// side: back to waiting for it (2), since the suspend came from 2 (§13.6).
pub(super) fn resume_before_initial_replication(
    state: S,
    op: Operation,
    facts: &Facts,
    mode: ReplicationMode,
) -> Option<Transition> {
    (matches!(state, S::Suspended | S::Critical) && !facts.has_received_replication).then(|| {
        let waiting = S::WaitingToCompleteInitialReplication;
        go(Some(waiting), waiting, mode, op, false)
    })
}

/// Suspend-VMReplication (RRSC 7) from 2, 3, 10 (spec §3.3). Suspending a resynchronization keeps its
/// progress (§13.6), so from 10 the result is 11, not 7 (our choice, spec §16.1).
pub(super) fn suspend(
    state: S,
    op: Operation,
    mode: ReplicationMode,
) -> Result<Transition, Refusal> {
    require(
        op,
        state,
        &[
            S::WaitingToCompleteInitialReplication,
            S::Replicating,
            S::Resynchronizing,
        ],
    )?;
    let after = if state == S::Resynchronizing {
        S::ResynchronizationSuspended
    } else {
        S::Suspended
    };
    Ok(go(Some(after), after, mode, op, false))
}

pub(super) fn already_protected(op: Operation) -> Refusal {
    refuse(
        ReturnCode::InvalidState,
        format!(
            "{} turns an unprotected virtual machine into a replica, and this one already has a \
             replication relationship; remove it first.",
            op.name()
        ),
    )
}
