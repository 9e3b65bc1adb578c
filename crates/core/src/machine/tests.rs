//! State-machine tests. Part (a) restates the spec by hand — every expected number below is typed from
//! the cited section, never read from the table under test. Part (b) checks properties over every
//! (mode, state, operation, facts). Part (c) keeps docs/state-machine.md in sync.

use proptest::prelude::*;

use super::*;
use crate::state::InitialReplicationType;

const NONE: u16 = 0;
const P: u16 = 1;
const R: u16 = 2;
const T: u16 = 3;
const X: u16 = 4;

/// (state shown during the job, state after, mode after, job type) or the return code.
type Outcome = Result<(Option<u16>, u16, u16, u16), u32>;

fn mode(m: u16) -> ReplicationMode {
    ReplicationMode::from_u16(m).expect("test uses a defined mode")
}

fn state(s: u16) -> ReplicationState {
    ReplicationState::from_u16(s).expect("test uses a defined state")
}

fn with(m: u16, s: u16, op: Operation, facts: Facts) -> Outcome {
    match decide(mode(m), state(s), op, &facts) {
        Ok(t) => Ok((
            t.during.map(ReplicationState::as_u16),
            t.after.as_u16(),
            t.mode_after.as_u16(),
            t.job_type.as_u16(),
        )),
        Err(r) => Err(r.code.code()),
    }
}

/// With the facts of the generated table: VM off, replication received, no test VM, unplanned.
fn run(m: u16, s: u16, op: Operation) -> Outcome {
    with(m, s, op, Facts::typical(mode(m)))
}

fn running(m: u16) -> Facts {
    Facts {
        vm_running: true,
        ..Facts::typical(mode(m))
    }
}

fn reason(m: u16, s: u16, op: Operation, facts: Facts) -> String {
    decide(mode(m), state(s), op, &facts)
        .err()
        .map(|r| r.reason)
        .unwrap_or_default()
}

fn moves(m: u16, s: u16, op: Operation) -> bool {
    decide(mode(m), state(s), op, &Facts::typical(mode(m))).is_ok_and(|t| t.moves_data)
}

use InitialReplicationType::{Export, Network, Seeded};
use Operation as O;
use RequestedState as Rq;

fn rrsc(requested: RequestedState) -> Operation {
    O::RequestReplicationStateChange(requested)
}

// ---- (a) documented transitions and codes, by hand ----

/// Spec §13.1 steps 3–5, §3.2 CreateReplicationRelationship / StartReplication / ImportInitialReplica,
/// §3.3 RequestedState 2 (-AsReplica).
#[test]
fn setup_and_initial_replication() {
    assert_eq!(
        run(NONE, 0, O::CreateReplicationRelationship),
        Ok((None, 1, P, 91))
    );
    assert_eq!(
        run(NONE, 0, rrsc(Rq::WaitingToCompleteInitialReplication)),
        Ok((Some(2), 2, R, 96))
    );
    assert_eq!(
        run(P, 1, O::StartReplication(Network)),
        Ok((Some(2), 3, P, 94))
    );
    assert_eq!(
        run(P, 1, O::StartReplication(Seeded)),
        Ok((Some(2), 3, P, 117))
    );
    // Export: the primary waits in 2 for the import on the replica (§13.1, UNCONFIRMED).
    assert_eq!(
        run(P, 1, O::StartReplication(Export)),
        Ok((Some(2), 2, P, 118))
    );
    assert_eq!(run(R, 2, O::ImportInitialReplica), Ok((None, 3, R, 95)));
    // PS-IMPL: StartReplication requires state 1.
    assert_eq!(run(P, 2, O::StartReplication(Network)), Err(32775));
    assert_eq!(run(P, 3, O::StartReplication(Network)), Err(32775));
    assert_eq!(run(R, 3, O::ImportInitialReplica), Err(32775));
    // §12 Enable-VMReplication: fails if the VM is already Primary.
    assert_eq!(run(P, 3, O::CreateReplicationRelationship), Err(32775));
    assert_eq!(run(P, 1, O::CreateReplicationRelationship), Err(32775));
    // §3.3: Stop-VMInitialReplication without a running IR job → 1.
    assert_eq!(
        run(P, 2, rrsc(Rq::ReadyForReplication)),
        Ok((Some(1), 1, P, 109))
    );
    assert_eq!(run(P, 3, rrsc(Rq::ReadyForReplication)), Err(32775));
}

/// Brief: in mode None only the two ways in are allowed; everything else 32775.
#[test]
fn unprotected_vm_refuses_everything_else() {
    for op in Operation::all() {
        let expected_ok = matches!(
            op,
            O::CreateReplicationRelationship
                | O::RequestReplicationStateChange(Rq::WaitingToCompleteInitialReplication)
        );
        assert_eq!(run(NONE, 0, op).is_ok(), expected_ok, "{}", op.name());
        if !expected_ok {
            assert_eq!(run(NONE, 0, op), Err(32775), "{}", op.name());
        }
    }
    assert_eq!(run(NONE, 3, O::CreateReplicationRelationship), Err(32775));
}

/// Spec §13.2 planned failover with reverse; §3.3 RequestedState 4; §3.2 RevertFailover on a primary.
#[test]
fn planned_failover_and_reverse() {
    assert_eq!(
        run(P, 3, rrsc(Rq::SyncedReplicationComplete)),
        Ok((Some(4), 4, P, 100))
    );
    assert_eq!(
        with(P, 3, rrsc(Rq::SyncedReplicationComplete), running(P)),
        Err(32775)
    );
    assert!(reason(P, 3, rrsc(Rq::SyncedReplicationComplete), running(P)).contains("turned off"));
    assert_eq!(run(P, 7, rrsc(Rq::SyncedReplicationComplete)), Err(32775));
    assert_eq!(run(R, 3, rrsc(Rq::SyncedReplicationComplete)), Err(32775));
    assert_eq!(run(R, 3, O::InitiateFailover), Ok((Some(12), 5, R, 97)));
    // DESIGN §6: after a planned failover, reverse → both sides 3.
    let planned = Facts {
        failed_over_planned: true,
        ..Facts::typical(mode(R))
    };
    assert_eq!(
        with(R, 5, O::ReverseReplicationRelationship, planned),
        Ok((None, 3, P, 104))
    );
    // §13.2 note: cancel before step 3 with RevertFailover on the prepared primary.
    assert_eq!(run(P, 4, O::RevertFailover), Ok((None, 3, P, 98)));
    assert_eq!(run(P, 3, O::RevertFailover), Err(32775));
}

/// Spec §13.3 unplanned failover; §3.2 InitiateFailover / RevertFailover / CommitFailover.
#[test]
fn unplanned_failover_commit_and_reverse() {
    for from in [3, 7, 10, 15] {
        assert_eq!(
            run(R, from, O::InitiateFailover),
            Ok((Some(12), 5, R, 97)),
            "from {from}"
        );
    }
    for from in [2, 5, 6, 9, 11] {
        assert_eq!(run(R, from, O::InitiateFailover), Err(32775), "from {from}");
    }
    assert_eq!(run(R, 12, O::InitiateFailover), Err(32774));
    assert_eq!(with(R, 3, O::InitiateFailover, running(R)), Err(32775));
    assert_eq!(
        reason(R, 3, O::InitiateFailover, running(R)),
        "InitiateFailover needs the virtual machine to be turned off; turn it off and try again."
    );
    let nothing_received = Facts {
        has_received_replication: false,
        ..Facts::typical(mode(R))
    };
    assert_eq!(
        with(R, 3, O::InitiateFailover, nothing_received),
        Err(32775)
    );
    assert_eq!(run(P, 3, O::InitiateFailover), Err(32775));
    // §13.3 step 2a and DESIGN §6: revert → 3; PS-IMPL also from 12.
    assert_eq!(run(R, 5, O::RevertFailover), Ok((None, 3, R, 98)));
    assert_eq!(run(R, 12, O::RevertFailover), Ok((None, 3, R, 98)));
    assert_eq!(with(R, 5, O::RevertFailover, running(R)), Err(32775));
    assert_eq!(run(R, 3, O::RevertFailover), Err(32775));
    // §3.2 CommitFailover: Replica and state 5 → 6.
    assert_eq!(run(R, 5, O::CommitFailover), Ok((None, 6, R, 99)));
    assert_eq!(run(R, 3, O::CommitFailover), Err(32775));
    assert_eq!(run(P, 5, O::CommitFailover), Err(32775));
    // DESIGN §6: after an unplanned failover the new primary waits in 9 for Resynchronize → 10 → 3.
    assert_eq!(
        run(R, 6, O::ReverseReplicationRelationship),
        Ok((None, 9, P, 104))
    );
    assert_eq!(run(R, 3, O::ReverseReplicationRelationship), Err(32775));
    assert_eq!(run(P, 9, O::Resynchronize), Ok((Some(10), 3, P, 107)));
}

/// Spec §13.4 and §3.2 TestReplicaSystem: not from 10/15; one test VM at a time; state unchanged.
#[test]
fn test_failover() {
    assert_eq!(run(R, 3, O::TestReplicaSystem), Ok((None, 3, R, 102)));
    assert_eq!(run(R, 10, O::TestReplicaSystem), Err(32775));
    assert_eq!(run(R, 15, O::TestReplicaSystem), Err(32774)); // our code for "a job owns the VM"
    let existing = Facts {
        test_system_exists: true,
        ..Facts::typical(mode(R))
    };
    assert_eq!(with(R, 3, O::TestReplicaSystem, existing), Err(32774));
    assert_eq!(run(P, 3, O::TestReplicaSystem), Err(32775));
    // DESIGN §6: a test VM is removed by DestroySystem only; replication verbs refuse.
    for op in Operation::all() {
        assert_eq!(run(T, 0, op), Err(32775), "{}", op.name());
        assert_eq!(run(T, 3, op), Err(32775), "{}", op.name());
    }
}

/// Spec §13.6 and §3.3: suspend from 2, 3, 10; resume from 7, 9, 11, 8; resync from 7, 9, 11, 8, 16;
/// cancel resync from 10/11 → 9.
#[test]
fn suspend_resume_and_resynchronize() {
    for from in [2, 3] {
        assert_eq!(
            run(P, from, rrsc(Rq::Suspend)),
            Ok((Some(7), 7, P, 96)),
            "from {from}"
        );
        assert_eq!(
            run(R, from, rrsc(Rq::Suspend)),
            Ok((Some(7), 7, R, 96)),
            "from {from}"
        );
    }
    // Our choice (§16.1): suspending a resync keeps its progress → 11.
    assert_eq!(run(P, 10, rrsc(Rq::Suspend)), Ok((Some(11), 11, P, 96)));
    assert_eq!(run(P, 1, rrsc(Rq::Suspend)), Err(32775));
    assert_eq!(run(P, 7, rrsc(Rq::Suspend)), Err(32775));
    assert_eq!(run(P, 7, rrsc(Rq::Replicating)), Ok((Some(3), 3, P, 96)));
    assert_eq!(run(P, 8, rrsc(Rq::Replicating)), Ok((Some(3), 3, P, 96)));
    // Our choice: resuming where changes are unknown runs the resync, shown as 10.
    assert_eq!(run(P, 9, rrsc(Rq::Replicating)), Ok((Some(10), 3, P, 96)));
    assert_eq!(run(P, 11, rrsc(Rq::Replicating)), Ok((Some(10), 3, P, 96)));
    assert_eq!(run(P, 3, rrsc(Rq::Replicating)), Err(32775));
    // Suspended before initial replication completed (§13.6: a suspend from 2): a resume goes
    // back to 2 on both sides, not on to 3 (the primary then needed a resync, and the replica
    // refused ImportInitialReplica for good).
    let no_ir = |m| Facts {
        has_received_replication: false,
        ..Facts::typical(mode(m))
    };
    assert_eq!(
        with(P, 7, rrsc(Rq::Replicating), no_ir(P)),
        Ok((Some(2), 2, P, 96))
    );
    assert_eq!(
        with(R, 7, rrsc(Rq::Replicating), no_ir(R)),
        Ok((Some(2), 2, R, 96))
    );
    // The same from 8 (a replica waiting for its import whose authorization entry was removed).
    assert_eq!(
        with(R, 8, rrsc(Rq::Replicating), no_ir(R)),
        Ok((Some(2), 2, R, 96))
    );
    assert_eq!(
        with(P, 8, rrsc(Rq::Replicating), no_ir(P)),
        Ok((Some(2), 2, P, 96))
    );
    // §3.2 InitiateFailover: PS first requests 3 on a replica in 7 or 10.
    assert_eq!(run(R, 7, rrsc(Rq::Replicating)), Ok((Some(3), 3, R, 96)));
    assert_eq!(run(R, 10, rrsc(Rq::Replicating)), Ok((Some(3), 3, R, 96)));
    for from in [7, 8, 9, 11, 16] {
        assert_eq!(
            run(P, from, O::Resynchronize),
            Ok((Some(10), 3, P, 107)),
            "from {from}"
        );
    }
    for from in [1, 2, 3, 4, 10] {
        assert_eq!(run(P, from, O::Resynchronize), Err(32775), "from {from}");
    }
    assert_eq!(
        run(P, 10, rrsc(Rq::CancelResynchronize)),
        Ok((Some(9), 9, P, 110))
    );
    assert_eq!(
        run(P, 11, rrsc(Rq::CancelResynchronize)),
        Ok((Some(9), 9, P, 110))
    );
    assert_eq!(run(P, 3, rrsc(Rq::CancelResynchronize)), Err(32775));
    // §12 Stop-VMReplication: RRSC(3), not 9, on a simple replica.
    assert_eq!(run(R, 10, rrsc(Rq::CancelResynchronize)), Err(32775));
}

/// Spec §13.7 and §3.2 RemoveReplicationRelationship: → 0, mode None, from any state; our choice:
/// 32774 while a failover/failback job owns the VM, 32775 while it runs failed over on a point.
#[test]
fn removal() {
    // (X, 5) and (P, 5): a stray record in 5 of a mode that cannot commit or revert it can still
    // be removed.
    for (m, s) in [
        (P, 1),
        (P, 3),
        (P, 9),
        (R, 2),
        (R, 6),
        (R, 7),
        (P, 17),
        (X, 5),
        (P, 5),
    ] {
        assert_eq!(
            run(m, s, O::RemoveReplicationRelationship),
            Ok((None, 0, NONE, 93)),
            "{m}/{s}"
        );
    }
    assert_eq!(run(R, 5, O::RemoveReplicationRelationship), Err(32775));
    assert_eq!(run(R, 12, O::RemoveReplicationRelationship), Err(32774));
    assert_eq!(run(P, 13, O::RemoveReplicationRelationship), Err(32774));
    assert_eq!(run(NONE, 0, O::RemoveReplicationRelationship), Err(32775));
}

/// §3.2 ModifyReplicationSettings (PS-IMPL: rejected on a replica's primary relationship).
#[test]
fn modify_settings() {
    assert_eq!(
        run(P, 3, O::ModifyReplicationSettings),
        Ok((None, 3, P, 92))
    );
    assert_eq!(
        run(P, 7, O::ModifyReplicationSettings),
        Ok((None, 7, P, 92))
    );
    assert_eq!(run(P, 13, O::ModifyReplicationSettings), Err(32774));
    assert_eq!(run(R, 3, O::ModifyReplicationSettings), Err(32775));
    assert!(
        reason(R, 3, O::ModifyReplicationSettings, Facts::typical(mode(R)))
            .contains("change them on the primary")
    );
}

/// §3.2 Get/ResetReplicationStatistics: whenever a relationship exists; no state change.
#[test]
fn statistics() {
    assert_eq!(
        run(P, 3, O::GetReplicationStatistics),
        Ok((None, 3, P, 111))
    );
    assert_eq!(
        run(R, 12, O::ResetReplicationStatistics),
        Ok((None, 12, R, 119))
    );
    assert_eq!(run(NONE, 0, O::GetReplicationStatistics), Err(32775));
    let missing = Facts {
        relationship_exists: false,
        ..Facts::typical(mode(P))
    };
    assert_eq!(with(P, 3, O::GetReplicationStatistics, missing), Err(32775));
    assert_eq!(
        with(P, 3, O::RemoveReplicationRelationship, missing),
        Ok((None, 0, NONE, 93))
    );
}

/// §14 and DESIGN §6: InitiateFailback on the old primary; 13 while running, 14 after; JobType 124.
#[test]
fn failback() {
    assert_eq!(run(P, 3, O::InitiateFailback), Ok((Some(13), 14, R, 124)));
    assert_eq!(run(P, 8, O::InitiateFailback), Ok((Some(13), 14, R, 124)));
    assert_eq!(run(R, 9, O::InitiateFailback), Ok((Some(13), 14, R, 124)));
    assert_eq!(with(P, 3, O::InitiateFailback, running(P)), Err(32775));
    assert_eq!(run(R, 5, O::InitiateFailback), Err(32775));
    assert_eq!(run(R, 13, O::InitiateFailback), Err(32774));
    assert_eq!(run(P, 1, O::InitiateFailback), Err(32775));
}

/// §3.2 / §13.5 extended replication (not supported: 32770 where the state allows it, else 32775).
#[test]
fn extended_replication_is_not_supported() {
    assert_eq!(run(R, 3, O::CreateReplicationRelationship), Err(32770));
    assert_eq!(run(R, 2, O::CreateReplicationRelationship), Err(32775));
    assert_eq!(run(R, 6, O::ChangeReplicationModeToPrimary), Err(32770));
    assert_eq!(run(R, 5, O::ChangeReplicationModeToPrimary), Err(32775));
    assert_eq!(run(P, 6, O::ChangeReplicationModeToPrimary), Err(32775));
    assert_eq!(run(X, 3, O::InitiateFailover), Err(32770));
    assert_eq!(run(X, 3, O::CommitFailover), Err(32775));
    assert_eq!(
        run(X, 3, O::RemoveReplicationRelationship),
        Ok((None, 0, NONE, 93))
    );
}

/// The brief's list of which operations need the data-plane engine.
#[test]
fn data_moving_operations() {
    assert!(moves(P, 1, O::StartReplication(Network)));
    assert!(moves(R, 3, O::InitiateFailover));
    assert!(moves(R, 3, O::TestReplicaSystem));
    assert!(moves(P, 9, O::Resynchronize));
    assert!(moves(P, 3, O::InitiateFailback));
    assert!(moves(P, 3, rrsc(Rq::SyncedReplicationComplete)));
    assert!(!moves(NONE, 0, O::CreateReplicationRelationship));
    assert!(!moves(P, 3, O::ModifyReplicationSettings));
    assert!(!moves(P, 3, O::RemoveReplicationRelationship));
    assert!(!moves(P, 3, O::GetReplicationStatistics));
    assert!(!moves(P, 3, rrsc(Rq::Suspend)));
}

// ---- (b) properties over every (mode, state, operation, facts) ----

fn all_facts() -> Vec<Facts> {
    (0u8..32)
        .map(|bits| Facts {
            vm_running: bits & 1 != 0,
            has_received_replication: bits & 2 != 0,
            test_system_exists: bits & 4 != 0,
            relationship_exists: bits & 8 != 0,
            failed_over_planned: bits & 16 != 0,
        })
        .collect()
}

fn every_case(
    mut check: impl FnMut(
        ReplicationMode,
        ReplicationState,
        Operation,
        &Facts,
        Result<Transition, Refusal>,
    ),
) {
    for facts in all_facts() {
        for m in ReplicationMode::ALL {
            for s in ReplicationState::ALL {
                for op in Operation::all() {
                    check(m, s, op, &facts, decide(m, s, op, &facts));
                }
            }
        }
    }
}

/// States the machine produces itself (spec §4.1 columns; DESIGN §6 for 13/14 and 9 after reverse).
fn produced(mode: ReplicationMode) -> &'static [u16] {
    match mode {
        ReplicationMode::None => &[0],
        ReplicationMode::Primary => &[1, 2, 3, 4, 7, 9, 10, 11, 13],
        ReplicationMode::Replica => &[2, 3, 5, 6, 7, 11, 12, 13, 14],
        _ => &[],
    }
}

#[test]
fn allowed_outcomes_stay_in_the_documented_state_sets() {
    every_case(|m, s, op, _, outcome| {
        if let Ok(t) = outcome {
            assert_eq!(t.job_type, op.job_type());
            if t.after != s || t.mode_after != m {
                assert_eq!(
                    t.after == ReplicationState::Disabled,
                    t.mode_after == ReplicationMode::None
                );
                assert!(
                    produced(t.mode_after).contains(&t.after.as_u16()),
                    "{m:?} {s:?} {op:?} -> {t:?}"
                );
            }
            if let Some(during) = t.during {
                let shown = during.as_u16();
                let known = produced(m).contains(&shown) || produced(t.mode_after).contains(&shown);
                assert!(known, "{m:?} {s:?} {op:?} during {during:?}");
            }
        }
    });
}

#[test]
fn refusals_carry_a_documented_code_and_a_sentence() {
    every_case(|m, s, op, _, outcome| {
        if let Err(r) = outcome {
            assert!(
                matches!(r.code.code(), 32770 | 32774 | 32775),
                "{m:?} {s:?} {op:?}: {r:?}"
            );
            assert!(
                r.reason.len() > 20 && r.reason.ends_with('.'),
                "{m:?} {s:?} {op:?}: {:?}",
                r.reason
            );
        }
    });
}

/// Spec §3.3: the numbers equal the target states, and the state reads as the target while the job
/// runs. Documented exceptions: 7 from 10 → 11 (§16.1 choice); 3 from 9 or 11 on a primary shows 10
/// while the resynchronization runs; 3 from 7 or 8 before any replication arrived goes back to 2
/// (§13.6: the suspend came from 2).
#[test]
fn request_state_change_reaches_the_requested_state() {
    every_case(|m, s, op, facts, outcome| {
        let (Operation::RequestReplicationStateChange(requested), Ok(t)) = (op, outcome) else {
            return;
        };
        let n = requested.as_u16();
        let suspend_resync = n == 7 && s == ReplicationState::Resynchronizing;
        let resume_before_ir = n == 3
            && matches!(s, ReplicationState::Suspended | ReplicationState::Critical)
            && !facts.has_received_replication;
        let expected_after = if suspend_resync {
            11
        } else if resume_before_ir {
            2
        } else {
            n
        };
        assert_eq!(t.after.as_u16(), expected_after, "{m:?} {s:?} {op:?}");
        let resync_resume = n == 3 && m == ReplicationMode::Primary && matches!(s.as_u16(), 9 | 11);
        let expected_during = if resync_resume { 10 } else { expected_after };
        assert_eq!(
            t.during.map(ReplicationState::as_u16),
            Some(expected_during),
            "{m:?} {s:?} {op:?}"
        );
    });
}

/// The VM must be off for the failover family (spec §5): a running VM never makes such an operation
/// allowed that an off VM was refused, and a running VM is refused.
#[test]
fn running_vm_blocks_the_failover_family() {
    every_case(|m, s, op, facts, outcome| {
        let guarded = matches!(
            op,
            O::InitiateFailover
                | O::InitiateFailback
                | O::RequestReplicationStateChange(Rq::SyncedReplicationComplete)
        ) || (op == O::RevertFailover && m == ReplicationMode::Replica);
        if guarded && facts.vm_running {
            assert!(outcome.is_err(), "{m:?} {s:?} {op:?}");
        }
    });
}

proptest! {
    /// A random sequence of operations from an unprotected VM only ever visits produced states.
    #[test]
    fn random_walks_stay_in_produced_states(steps in prop::collection::vec((0usize..24, 0usize..32), 1..60)) {
        let operations = Operation::all();
        let facts = all_facts();
        let (mut m, mut s) = (ReplicationMode::None, ReplicationState::Disabled);
        for (op_index, facts_index) in steps {
            let op = operations[op_index];
            match decide(m, s, op, &facts[facts_index]) {
                Ok(t) => {
                    if let Some(during) = t.during {
                        let shown = during.as_u16();
                        prop_assert!(produced(m).contains(&shown) || produced(t.mode_after).contains(&shown));
                    }
                    m = t.mode_after;
                    s = t.after;
                    prop_assert!(produced(m).contains(&s.as_u16()), "{:?} {:?} after {}", m, s, op.name());
                }
                Err(r) => prop_assert!(!r.reason.is_empty()),
            }
        }
    }
}

// ---- (c) the generated documentation ----

#[test]
fn state_machine_doc_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/state-machine.md");
    let rendered = render_state_table_markdown();
    if std::env::var("UPDATE_DOCS").as_deref() == Ok("1") {
        std::fs::write(path, &rendered).expect("docs/state-machine.md is writable");
        return;
    }
    let on_disk = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "docs/state-machine.md is stale; run `UPDATE_DOCS=1 cargo test -p vmreplica-core`"
    );
}
