//! The seam where data-plane engines plug in.
//!
//! The service checks an operation's parameters and asks the core's state machine first; an allowed
//! operation whose [`Transition::moves_data`] is set (initial replication, failover, resync,
//! failback, test replica, connection test, ...) is then handed to a [`DataPlane`], which starts the
//! job that does the work. Until an engine exists, [`NoEngine`] answers 32770 (Not supported), so no
//! method claims a success it did not earn.

use vmreplica_core::codes::ReturnCode;
use vmreplica_core::command::{CommandError, OperationArgs};
use vmreplica_core::machine::{Operation, Transition};

use crate::claims::VmClaim;
use crate::store::{JobRow, RelationshipRow, VmRow};

/// An allowed operation, ready for an engine.
pub struct EngineRequest {
    pub vm: VmRow,
    pub relationship: Option<RelationshipRow>,
    pub operation: Operation,
    // Read by the engines that issues 3-5 bring; nothing reads it before them.
    #[allow(dead_code)]
    pub args: OperationArgs,
    pub transition: Transition,
    /// The VM's claim: the engine holds it until its job has written the result.
    // Moved into the engine's job by the engines of issues 3-5; NoEngine drops it at once.
    #[allow(dead_code)]
    pub claim: VmClaim,
}

pub trait DataPlane: Send + Sync {
    /// Starts the job that carries out `request`; the job moves the relationship to
    /// `transition.after` when its work is durable.
    fn start(&self, request: EngineRequest) -> Result<JobRow, CommandError>;
}

/// The engine of a build without a data plane.
pub struct NoEngine;

impl DataPlane for NoEngine {
    fn start(&self, request: EngineRequest) -> Result<JobRow, CommandError> {
        let from = request.relationship.as_ref().map_or(0, |r| r.state);
        Err(CommandError::new(
            ReturnCode::NotSupported,
            format!(
                "{} on '{}' (state {from} -> {}): the data-plane engine for this operation is not implemented yet",
                request.operation.name(),
                request.vm.name,
                request.transition.after.as_u16()
            ),
        ))
    }
}
