//! The replication state machine: `(mode, state, operation) -> Transition | Refusal`.
//!
//! [`decide`] is the only entry point. It is total: every triple of [`ReplicationMode`] ×
//! [`ReplicationState`] × [`Operation`] has a defined outcome, and a refused operation changes nothing.
//! The rules come from spec §3.2, §3.3, §13 and §14, with the project's choices of DESIGN §6. The
//! generated table of every outcome is `docs/state-machine.md` ([`render_state_table_markdown`]).
//!
//! Order of the checks, so the return code is predictable:
//! 1. mode: Test Replica refuses everything; None allows only the two ways in; Extended Replica is
//!    decided as a Replica and then refused with 32770 when the rules would allow it (except
//!    `RemoveReplicationRelationship`, so a stray one can be cleaned up);
//! 2. `RemoveReplicationRelationship` (allowed from every state except while a failover, failback,
//!    disk-update or repurpose job runs: 12, 13, 15, 18 → 32774 System is in use; and a Replica
//!    in 5, failed over but not committed → 32775: the VM runs on disks of a recovery point);
//! 3. a missing relationship record, then the bookkeeping operations (statistics, failover IP
//!    settings: always allowed, no state change), then the states this implementation does not manage
//!    (0, 17, 19, 20, 21 → 32775);
//! 4. the role (an operation of the other side → 32775), the state (a transient state 12, 13, 15, 18 →
//!    32774, any other wrong state → 32775), then the facts (VM must be off, a replication must have
//!    been received, one test VM at a time → 32774).

mod operation;
mod primary;
mod replica;
mod table;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::codes::ReturnCode;
use crate::job::JobType;
use crate::state::{ReplicationMode, ReplicationState};

pub use operation::{Operation, RequestedState};
pub use table::render_state_table_markdown;

/// Facts about the VM the decision needs besides (mode, state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Facts {
    /// `Msvm_ComputerSystem.EnabledState` is not Off (3).
    pub vm_running: bool,
    /// `LastReplicationTime` is set: the replica holds at least one recovery point.
    pub has_received_replication: bool,
    /// A test VM made by `TestReplicaSystem` exists for this replica.
    pub test_system_exists: bool,
    /// The relationship record exists (false only for a damaged store).
    pub relationship_exists: bool,
    /// The failover being reversed used a planned-failover point (`FailedOverReplicationType` = 3), so
    /// the old primary's disks equal it. Decides the state after `ReverseReplicationRelationship`:
    /// 3 when planned, 9 (resynchronization required) otherwise (DESIGN §6).
    pub failed_over_planned: bool,
}

impl Facts {
    /// The facts the generated table assumes: VM off, a replication received, no test VM, the
    /// relationship exists whenever the mode is not None, an unplanned failover.
    pub fn typical(mode: ReplicationMode) -> Self {
        Facts {
            vm_running: false,
            has_received_replication: true,
            test_system_exists: false,
            relationship_exists: mode != ReplicationMode::None,
            failed_over_planned: false,
        }
    }
}

/// The outcome of an allowed operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Transition {
    /// The state shown while the job runs; `None` = the current state stays visible until the job
    /// ends. For RequestReplicationStateChange this is already the requested value (spec §3.3).
    pub during: Option<ReplicationState>,
    /// The state when the job completes successfully.
    pub after: ReplicationState,
    /// The mode when the job completes successfully.
    pub mode_after: ReplicationMode,
    /// The job type the job is reported as.
    pub job_type: JobType,
    /// The job needs the data-plane engine (disks are read, written, compared or shipped).
    pub moves_data: bool,
}

/// A refused operation, with the documented return code and a sentence saying why and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub code: ReturnCode,
    pub reason: String,
}

/// The one decision function. Every (mode, state, operation) triple has a defined outcome.
pub fn decide(
    mode: ReplicationMode,
    state: ReplicationState,
    op: Operation,
    facts: &Facts,
) -> Result<Transition, Refusal> {
    match mode {
        ReplicationMode::None => unprotected(state, op),
        ReplicationMode::TestReplica => Err(refuse(
            ReturnCode::InvalidState,
            "This is a test replica virtual machine; it takes no part in replication. Remove it with \
             Msvm_VirtualSystemManagementService.DestroySystem.",
        )),
        // A failed-over replica VM runs on an overlay of a recovery point inside the point store:
        // removed, it would keep disks nothing tracks, pinning that point for good, with no way
        // left to commit or revert them (and its next failover would find the overlay taken). (A
        // stray record in 5 of another mode, which nothing can commit or revert, can be removed.)
        ReplicationMode::Replica
            if op == Operation::RemoveReplicationRelationship
                && state == ReplicationState::Recovered =>
        {
            Err(refuse(
                ReturnCode::InvalidState,
                format!(
                    "{} cannot run while the relationship is in state {}: the virtual machine runs \
                     on disks of a recovery point. Complete the failover (CommitFailover) to keep \
                     them, or cancel it (RevertFailover), then remove replication.",
                    op.name(),
                    describe(state)
                ),
            ))
        }
        ReplicationMode::Primary | ReplicationMode::Replica => protected(mode, state, op, facts),
        ReplicationMode::ExtendedReplica => match protected(ReplicationMode::Replica, state, op, facts) {
            Ok(t) if op == Operation::RemoveReplicationRelationship => Ok(t),
            Ok(_) => Err(refuse(
                ReturnCode::NotSupported,
                "Extended replication is not supported yet, so an Extended Replica virtual machine cannot \
                 be managed; remove its relationship with RemoveReplicationRelationship.",
            )),
            Err(refusal) => Err(refusal),
        },
    }
}

/// Mode None: only `CreateReplicationRelationship` (spec §13.1 step 3) and RRSC(2) (§3.3, `-AsReplica`).
fn unprotected(state: ReplicationState, op: Operation) -> Result<Transition, Refusal> {
    use ReplicationState as S;
    if state != S::Disabled {
        return Err(refuse(
            ReturnCode::InvalidState,
            format!(
                "The virtual machine has replication mode None but replication state {}; the record is \
                 inconsistent. Repair it before enabling replication.",
                describe(state)
            ),
        ));
    }
    match op {
        Operation::CreateReplicationRelationship => {
            Ok(go(None, S::ReadyForReplication, ReplicationMode::Primary, op, false))
        }
        Operation::RequestReplicationStateChange(RequestedState::WaitingToCompleteInitialReplication) => {
            let waiting = S::WaitingToCompleteInitialReplication;
            Ok(go(Some(waiting), waiting, ReplicationMode::Replica, op, false))
        }
        _ => Err(refuse(
            ReturnCode::InvalidState,
            format!(
                "{} needs replication to be enabled, and it is not. Enable it with \
                 CreateReplicationRelationship (primary) or RequestReplicationStateChange(2) (replica).",
                op.name()
            ),
        )),
    }
}

/// Modes Primary and Replica: the checks every operation shares, then the role's own rules.
fn protected(
    mode: ReplicationMode,
    state: ReplicationState,
    op: Operation,
    facts: &Facts,
) -> Result<Transition, Refusal> {
    if op == Operation::RemoveReplicationRelationship {
        not_busy(op, state)?;
        return Ok(go(
            None,
            ReplicationState::Disabled,
            ReplicationMode::None,
            op,
            false,
        ));
    }
    if !facts.relationship_exists {
        return Err(refuse(
            ReturnCode::InvalidState,
            format!(
                "{} needs the replication relationship record, which is missing. Remove replication \
                 and enable it again.",
                op.name()
            ),
        ));
    }
    if op.is_bookkeeping() {
        return Ok(stay(mode, state, op, false));
    }
    if is_unmanaged(state) {
        return Err(refuse(
            ReturnCode::InvalidState,
            format!(
                "The relationship is in state {}, which this implementation does not manage; only \
                 RemoveReplicationRelationship and statistics are allowed.",
                describe(state)
            ),
        ));
    }
    match mode {
        ReplicationMode::Primary => primary::decide(state, op, facts),
        _ => replica::decide(state, op, facts),
    }
}

/// States shown while a job owns the VM: a second state change must wait.
fn is_transient(state: ReplicationState) -> bool {
    use ReplicationState as S;
    matches!(
        state,
        S::FailoverInProgress
            | S::FailbackInProgress
            | S::DiskUpdateInProgress
            | S::RepurposeReplicationInProgress
    )
}

/// States a protected VM never reaches here: 0 (belongs to mode None), 17, and the VM-group states.
fn is_unmanaged(state: ReplicationState) -> bool {
    use ReplicationState as S;
    matches!(
        state,
        S::Disabled
            | S::Unknown
            | S::PreparedForSyncReplication
            | S::PreparedForGroupReverseReplication
            | S::FiredrillInProgress
    )
}

pub(crate) fn refuse(code: ReturnCode, reason: impl Into<String>) -> Refusal {
    Refusal {
        code,
        reason: reason.into(),
    }
}

/// "3 (Replicating)".
pub(crate) fn describe(state: ReplicationState) -> String {
    format!("{} ({})", state.as_u16(), state.label())
}

fn go(
    during: Option<ReplicationState>,
    after: ReplicationState,
    mode_after: ReplicationMode,
    op: Operation,
    moves_data: bool,
) -> Transition {
    Transition {
        during,
        after,
        mode_after,
        job_type: op.job_type(),
        moves_data,
    }
}

fn stay(
    mode: ReplicationMode,
    state: ReplicationState,
    op: Operation,
    moves_data: bool,
) -> Transition {
    go(None, state, mode, op, moves_data)
}

/// 32774 while a job owns the VM.
fn not_busy(op: Operation, state: ReplicationState) -> Result<(), Refusal> {
    if is_transient(state) {
        return Err(refuse(
            ReturnCode::SystemInUse,
            format!(
                "{} cannot run while the relationship is in state {}; wait for the running job to \
                 finish, then try again.",
                op.name(),
                describe(state)
            ),
        ));
    }
    Ok(())
}

/// The state must be one of `allowed`: otherwise 32774 in a transient state, 32775 in any other.
fn require(
    op: Operation,
    state: ReplicationState,
    allowed: &[ReplicationState],
) -> Result<(), Refusal> {
    if allowed.contains(&state) {
        return Ok(());
    }
    not_busy(op, state)?;
    let list: Vec<String> = allowed.iter().map(|s| describe(*s)).collect();
    Err(refuse(
        ReturnCode::InvalidState,
        format!(
            "{} is allowed only in state {}; the relationship is in state {}.",
            op.name(),
            list.join(" or "),
            describe(state)
        ),
    ))
}

/// 32775 unless the VM is off (failover family, prepare, failback: spec §5, PS-IMPL).
fn require_off(op: Operation, facts: &Facts) -> Result<(), Refusal> {
    if facts.vm_running {
        return Err(refuse(
            ReturnCode::InvalidState,
            format!(
                "{} needs the virtual machine to be turned off; turn it off and try again.",
                op.name()
            ),
        ));
    }
    Ok(())
}

/// 32775 for an operation that belongs to the other side of the relationship.
fn wrong_side(op: Operation, here: &str, hint: &str) -> Refusal {
    refuse(
        ReturnCode::InvalidState,
        format!(
            "{} is not allowed on a {here} virtual machine; {hint}",
            op.name()
        ),
    )
}
