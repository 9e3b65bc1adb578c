//! # vmreplica-core: the replication domain, without I/O
//!
//! This crate is what vmreplica *decides*; the daemon is what it *does*. Everything here is a pure,
//! deterministic function of its arguments: no files, no sockets, no clocks, no randomness. That is
//! why the rules can be tested exhaustively with tables and properties instead of through two
//! daemons, and why every front end (CIM-XML, JSON API, CLI) gets the same answer for the same
//! request. The names and numbers are those of the Hyper-V Replica WMI API
//! (`shared/spec/hyperv-replica-api.md`); where that reference is silent, the choice is written next
//! to the rule and listed in DESIGN §6.
//!
//! ## Modes and states
//!
//! A VM has a [`ReplicationMode`](state::ReplicationMode) — which side of a relationship it is: None,
//! Primary, Replica, Test Replica (a throw-away VM made by `TestReplicaSystem`) or Extended Replica (a
//! third site, not supported yet) — and its relationship has a
//! [`ReplicationState`](state::ReplicationState), one of the 22 values of spec §4.1. The same number
//! means different things per side (4 is "prepared for failover" on a primary; 5 and 6 exist only on
//! a replica), which is why PowerShell shows (mode, state) pairs under one name
//! ([`ReplicationState::ps_name`](state::ReplicationState::ps_name)).
//!
//! ## The decision: (mode, state, operation) → outcome
//!
//! Every replication verb — the `Msvm_ReplicationService` methods and
//! `Msvm_ComputerSystem.RequestReplicationStateChange` with its requested state — is one
//! [`Operation`](machine::Operation). [`machine::decide`] takes the VM's mode, state, the operation
//! and a few [`Facts`](machine::Facts) (is the VM running, has a replication been received, does a
//! test VM exist) and returns either a [`Transition`](machine::Transition) — the state shown while the
//! job runs, the state and mode after it, the job type, whether the data plane is needed — or a
//! [`Refusal`](machine::Refusal) with the documented return code (32775 invalid state, 32774 system
//! in use, 32770 not supported) and a sentence saying why and what to do. The function is total:
//! every triple has an outcome, and `docs/state-machine.md` is generated from it. A refusal changes
//! nothing; the daemon applies a transition only after the job succeeds, and shows `during` meanwhile.
//!
//! ## The rest
//!
//! - [`settings`]: typed replication, recovery-server and authorization settings with `validate()`
//!   whose errors name the CIM property and the allowed values, and map to 32773 or 32770.
//! - [`health`]: the Normal / Warning / Critical rules of spec §10 with Hyper-V-worded messages.
//! - [`job`] and [`codes`]: job types, job states and return codes, with their documented captions.
//! - [`command`]: the one command enum every front end parses into.

pub mod codes;
pub mod command;
pub mod health;
pub mod job;
pub mod machine;
mod numbered;
pub mod settings;
pub mod state;

pub use codes::ReturnCode;
pub use health::{evaluate_health, HealthInputs, HealthIssue};
pub use job::{JobState, JobStateRequest, JobType};
pub use machine::{
    decide, render_state_table_markdown, Facts, Operation, Refusal, RequestedState, Transition,
};
pub use settings::{
    normalize_thumbprint, AuthorizationEntry, ReplicationSettings, ServiceSettings, SettingsError,
};
pub use state::{
    AuthenticationType, InitialReplicationType, ReplicationHealth, ReplicationMode,
    ReplicationState, ReplicationType,
};
