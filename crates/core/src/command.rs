//! Commands: the one enum every front end parses into.
//!
//! The CIM-XML endpoint turns a method call (`Msvm_ReplicationService.CreateReplicationRelationship`, …)
//! into a [`Command`]; the JSON API deserializes the same enum; the CLI builds it. The daemon executes it
//! and answers with a [`CommandOutput`] or a [`CommandError`] that carries the documented return code.
//! Front ends never reach into daemon state themselves (Firecracker's `VmmAction` pattern).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codes::ReturnCode;
use crate::machine::Operation;
use crate::settings::{
    AuthorizationEntry, FailoverNetworkSettings, ReplicationSettings, ServiceSettings,
};

/// A VM named by its GUID or by its display name (`ElementName`).
pub type VmRef = String;

/// How the daemon learns and changes a VM's power state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PowerControl {
    /// QMP socket of the QEMU process running the VM (or of a qemu-storage-daemon standing in for it).
    pub qmp_socket: Option<String>,
    /// Shell command that starts the VM.
    pub start_command: Option<String>,
    /// Shell command that stops the VM.
    pub stop_command: Option<String>,
    /// Unix socket of an NBD server the QEMU process already runs (a process runs at most one);
    /// without it, replication starts its own server in the process.
    #[serde(default)]
    pub nbd_socket: Option<String>,
}

/// A VM as defined to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDefinition {
    pub name: String,
    pub disks: Vec<String>,
    pub id: Option<Uuid>,
    #[serde(default)]
    pub power: PowerControl,
}

/// Extra arguments of the operations that go through the state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OperationArgs {
    /// StartReplication type 2 / ImportInitialReplica: the folder.
    pub location: Option<String>,
    /// StartReplication / Resynchronize: when to start (Unix seconds, UTC); None = now.
    pub start_time: Option<i64>,
    /// InitiateFailover / TestReplicaSystem / InitiateFailback: the recovery point (InstanceID).
    pub recovery_point: Option<String>,
    /// ReverseReplicationRelationship / InitiateFailback: the new settings.
    pub settings: Option<ReplicationSettings>,
    /// SetFailoverNetworkAdapterSettings: the settings of each adapter and protocol given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failover_network: Vec<FailoverNetworkSettings>,
}

/// Every request any front end can make.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    AddVm(VmDefinition),
    ListVms,
    /// Forgets a VM definition that no relationship uses any more (its image files and any
    /// recovery points stay on disk).
    RemoveVm {
        vm: VmRef,
    },
    /// Replaces how the daemon starts, stops and sees a VM run (for a replica VM that failed over,
    /// whose start command finds its current disks in `VMREPLICA_DISK<i>`).
    SetPowerControl {
        vm: VmRef,
        power: PowerControl,
    },
    GetServiceSettings,
    ModifyServiceSettings(ServiceSettings),
    ListAuthorizationEntries,
    AddAuthorizationEntry(AuthorizationEntry),
    ModifyAuthorizationEntry(AuthorizationEntry),
    RemoveAuthorizationEntry {
        allowed_primary_host_system: String,
    },
    SetAuthorizationEntry {
        vm: VmRef,
        entry: AuthorizationEntry,
    },
    CreateReplicationRelationship {
        vm: VmRef,
        settings: ReplicationSettings,
    },
    ModifyReplicationSettings {
        vm: VmRef,
        settings: ReplicationSettings,
    },
    RemoveReplicationRelationship {
        vm: VmRef,
    },
    /// The settings of the VM's relationship (the values of its `Msvm_ReplicationSettingData`).
    GetReplicationSettings {
        vm: VmRef,
    },
    /// The failover IP settings of a VM (its `Msvm_FailoverNetworkAdapterSettingData`); they are
    /// set with the `Replication` operation SetFailoverNetworkAdapterSettings.
    GetFailoverNetwork {
        vm: VmRef,
    },
    /// The operations whose effect moves data or follows the state machine.
    Replication {
        vm: VmRef,
        operation: Operation,
        #[serde(default)]
        args: OperationArgs,
    },
    GetReplicationStatistics {
        vm: VmRef,
    },
    ResetReplicationStatistics {
        vm: VmRef,
    },
    GetSystemCertificates,
    TestReplicationConnection {
        recovery_connection_point: String,
        recovery_server_port_number: u16,
        authentication_type: u16,
        certificate_thumbprint: Option<String>,
        bypass_proxy_server: bool,
    },
    /// `Msvm_ComputerSystem.RequestStateChange`: 2 start, 3 turn off, 4 shut down.
    SetPowerState {
        vm: VmRef,
        requested: u16,
    },
    /// `Msvm_VirtualSystemManagementService.DestroySystem`: removes a test VM.
    DestroySystem {
        vm: VmRef,
    },
    /// This host's limits as a primary (not in Hyper-V's CIM API: `vmreplica host`).
    GetHostSettings,
    /// Stores new limits; they hold at once, and over the daemon's flags from then on.
    SetHostSettings(HostSettings),
    /// Forgets stored limits: the daemon's flags hold again.
    ResetHostSettings,
    Status,
    ListJobs,
    GetJob {
        id: String,
        /// Wait up to this long (at most [`MAX_JOB_WAIT_MS`]) for the job to move on (its state or
        /// its percent complete), then answer; 0 (the default) answers at once.
        #[serde(default, skip_serializing_if = "is_zero")]
        wait_ms: u32,
    },
    CancelJob {
        id: String,
    },
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The longest `GetJob` wait: an HTTP request that long stays well inside any client's timeout.
pub const MAX_JOB_WAIT_MS: u32 = 10_000;

/// This host's limits on what it sends as a primary (docs/protocol.md §8). Hyper-V keeps the like
/// outside its WMI API (registry, QoS policies), so they are not CIM properties here either.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSettings {
    /// Upload cap in bytes per second, shared by every transfer (0 = none).
    pub bandwidth_limit: u64,
    /// Weekly windows of the host's local time with their own cap, replacing `bandwidth_limit`
    /// while they hold (the first that holds wins): "[DAYS ]HH:MM-HH:MM=RATE".
    #[serde(default)]
    pub bandwidth_windows: Vec<String>,
    /// Replication cycles that transfer at once, 1–64 (Hyper-V's MaximumActiveTransfers).
    pub max_parallel_transfers: u16,
    /// Where the values in force come from (output only): "stored" (`vmreplica host set`) or
    /// "flags" (the daemon's command line).
    #[serde(default)]
    pub source: String,
}

/// Parses a number of bytes with an optional K, M or G suffix (powers of 1024).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult))
}

/// Parses a rate in bytes per second ([`parse_bytes`]).
pub fn parse_rate(text: &str) -> Result<u64, String> {
    parse_bytes(text)
        .ok_or_else(|| format!("{text:?} is not a rate in bytes per second (like 500K or 20M)"))
}

/// A VM as shown to front ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmView {
    pub id: Uuid,
    pub name: String,
    pub disks: Vec<String>,
    /// `Msvm_ComputerSystem.EnabledState`: 2 running, 3 off.
    pub enabled_state: u16,
    pub replication_mode: u16,
    pub replication_state: u16,
    pub replication_health: u16,
}

/// One row of `vmreplica status` (Get-VMReplication).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRow {
    pub vm: VmView,
    pub mode: String,
    pub state: String,
    pub health: String,
    pub recovery_connection_point: Option<String>,
    pub primary_connection_point: Option<String>,
    pub replication_interval: Option<u16>,
    pub last_replication_time: Option<i64>,
}

/// An `Msvm_ConcreteJob` as shown to front ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub id: String,
    pub job_type: u16,
    pub caption: String,
    /// What the job is, and what it found on the way (its log).
    #[serde(default)]
    pub description: String,
    pub job_state: u16,
    pub percent_complete: u16,
    pub error_code: u16,
    pub error_description: Option<String>,
    pub vm: Option<Uuid>,
    pub time_submitted: i64,
    pub time_finished: Option<i64>,
    pub cancellable: bool,
}

/// Replication statistics of the current monitoring window (spec §10).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StatisticsView {
    pub start_statistic_time: i64,
    pub end_statistic_time: i64,
    pub replication_success_count: u32,
    pub replication_size: u64,
    pub max_replication_size: u64,
    pub replication_latency: u32,
    pub max_replication_latency: u32,
    pub replication_miss_count: u32,
    pub network_failure_count: u32,
    pub replication_failure_count: u32,
    pub application_consistent_snapshot_failure_count: u32,
    pub pending_replication_size: u64,
    pub replication_health: u16,
    pub last_test_failover_time: Option<i64>,
    pub health_messages: Vec<String>,
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "output", rename_all = "snake_case")]
pub enum CommandOutput {
    /// Finished synchronously (return code 0).
    Completed,
    /// Started asynchronously (return code 4096).
    Job(JobView),
    /// Started asynchronously, and the system it makes already exists (TestReplicaSystem's
    /// `ResultingSystem`).
    JobWithSystem {
        job: JobView,
        system: Uuid,
    },
    Vm(VmView),
    Vms {
        vms: Vec<VmView>,
    },
    ServiceSettings(ServiceSettings),
    ReplicationSettings(ReplicationSettings),
    AuthorizationEntries {
        entries: Vec<AuthorizationEntry>,
    },
    Status {
        rows: Vec<StatusRow>,
    },
    Jobs {
        jobs: Vec<JobView>,
    },
    Certificates {
        encoded: Vec<String>,
    },
    Statistics(StatisticsView),
    HostSettings(HostSettings),
    FailoverNetwork {
        settings: Vec<FailoverNetworkSettings>,
    },
}

/// A refused or failed command: the CIM return code and a sentence saying what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} (return code {code})")]
pub struct CommandError {
    pub code: u32,
    pub message: String,
}

impl CommandError {
    pub fn new(code: ReturnCode, message: impl Into<String>) -> Self {
        Self {
            code: code.code(),
            message: message.into(),
        }
    }
}
