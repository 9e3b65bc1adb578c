//! `vmreplica`: the command-line tool. It builds the core's `Command`s and sends them to the
//! daemon's JSON API (`POST /api/v1/command`), the same commands the CIM-XML endpoint executes.
//!
//! Exit codes: 0 success; 1 the daemon could not be reached or answered nonsense; 2 usage error;
//! 3 the daemon refused the command (its return code and reason are printed); 4 a job failed.

mod client;
mod credentials;
mod labca;
mod render;

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use vmreplica_core::command::{Command, CommandOutput, OperationArgs, PowerControl, VmDefinition};
use vmreplica_core::machine::{Operation, RequestedState};
use vmreplica_core::settings::{
    AuthorizationEntry, FailoverNetworkSettings, ReplicationSettings, PROTOCOL_IPV4, PROTOCOL_IPV6,
};
use vmreplica_core::state::InitialReplicationType;

/// How long one `GetJob` may wait on the daemon for a job to move on (see `Client::wait_job`).
const JOB_WAIT: Duration = Duration::from_secs(1);

use client::{Client, Failure};

#[derive(Parser)]
#[command(
    name = "vmreplica",
    version,
    about = "Manage vmreplica (Hyper-V Replica for QEMU/KVM)"
)]
struct Cli {
    /// The daemon's endpoint.
    #[arg(
        long,
        global = true,
        env = "VMREPLICA_URL",
        default_value = "http://127.0.0.1:5988"
    )]
    url: String,
    /// User for HTTP Basic authentication.
    #[arg(long, global = true, env = "VMREPLICA_USER")]
    user: Option<String>,
    /// Password for HTTP Basic authentication.
    #[arg(
        long,
        global = true,
        env = "VMREPLICA_PASSWORD",
        hide_env_values = true
    )]
    password: Option<String>,
    /// PEM CA certificate that signed the daemon's HTTPS certificate.
    #[arg(long, global = true, env = "VMREPLICA_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
    #[command(subcommand)]
    command: Verb,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Verb {
    /// Define and list VMs.
    #[command(subcommand)]
    Vm(VmVerb),
    /// This host's recovery-server settings (Get/Set-VMReplicationServer).
    #[command(subcommand)]
    Server(ServerVerb),
    /// The recovery server's authorization table (*-VMReplicationAuthorizationEntry).
    #[command(subcommand)]
    Auth(AuthVerb),
    /// This host's limits as a primary: upload bandwidth cap and parallel transfers, in force at
    /// once and kept over the daemon's flags until `host reset`.
    #[command(subcommand)]
    Host(HostVerb),
    /// The guest IP settings a VM takes when it runs after a failover
    /// (Set-VMNetworkAdapterFailoverConfiguration → SetFailoverNetworkAdapterSettings). A
    /// failed-over replica's start command gets them in VMREPLICA_FAILOVER_NETWORK (JSON).
    #[command(subcommand)]
    FailoverNetwork(FailoverNetworkVerb),
    /// Enable replication of a VM (Enable-VMReplication → CreateReplicationRelationship).
    Enable(EnableArgs),
    /// Change a VM's replication settings (Set-VMReplication → ModifyReplicationSettings); settings
    /// not given keep their current value.
    Set(SetArgs),
    /// Show a VM's replication settings.
    Settings { vm: String },
    /// Make an existing VM a replica waiting for initial replication (Enable-VMReplication -AsReplica).
    EnableAsReplica { vm: String },
    /// Remove a VM's replication relationship (Remove-VMReplication).
    Disable { vm: String },
    /// Start initial replication (Start-VMInitialReplication).
    Start {
        vm: String,
        #[arg(long, value_enum, default_value_t = InitialType::Network)]
        r#type: InitialType,
        /// Export folder (with --type export).
        #[arg(long)]
        path: Option<String>,
    },
    /// Import an initial replica exported to offline media (Import-VMInitialReplication).
    Import {
        vm: String,
        /// The folder StartReplication --type export wrote (or the folder above it).
        #[arg(long)]
        path: String,
    },
    /// Check that this host can replicate to a recovery server (Test-VMReplicationConnection →
    /// TestReplicationConnection): TLS both ways, authorization, and a write in its storage.
    TestConnection {
        #[arg(long)]
        replica_server: String,
        #[arg(long, default_value_t = 443)]
        replica_port: u16,
        /// This host's certificate (thumbprint in <data-dir>/certs/).
        #[arg(long)]
        thumbprint: String,
    },
    /// Suspend replication (Suspend-VMReplication).
    Suspend { vm: String },
    /// Resume replication (Resume-VMReplication).
    Resume { vm: String },
    /// Fail a replica VM over to a recovery point (Start-VMFailover). With --test, make a test VM
    /// "<VM> - Test" on an overlay of the point while replication goes on (Start-VMFailover -AsTest).
    Failover {
        vm: String,
        /// A test failover: the replica is not disturbed.
        #[arg(long)]
        test: bool,
        /// The recovery point (its sequence number, or the InstanceID of its
        /// Msvm_VirtualSystemSettingData); the latest when left out.
        #[arg(long)]
        point: Option<String>,
    },
    /// Remove the test VM of a replica VM and everything written into it (Stop-VMFailover).
    StopFailover { vm: String },
    /// On the primary, with the VM off: send the last changes and lock the VM from starting, ready
    /// for a planned failover without data loss (Start-VMFailover -Prepare).
    PrepareFailover { vm: String },
    /// On a failed-over replica: become the primary and replicate to the old primary, named by
    /// --replica-server (Set-VMReplication -Reverse); settings not given keep their value.
    Reverse(SetArgs),
    /// Compare block hashes with the replica and send only what differs (Resume-VMReplication
    /// -Resynchronize).
    Resync { vm: String },
    /// On the old primary, VM off, after an unplanned failover on the replica: bring this host's
    /// disks to the replica's current disks (failover committed) or to one of its recovery points
    /// (--point; failover committed or not), sending only the blocks either side wrote since, and
    /// become its replica (InitiateFailback). This host must be a recovery server for it. Settings
    /// given apply to the new direction.
    Failback {
        #[command(flatten)]
        settings: SetArgs,
        /// A recovery point of the new primary (RecoveryPointIdentifier: its InstanceID or
        /// sequence number); its current disks when left out. Not committed there: the failover
        /// moves to that point (what its VM wrote is dropped) and is committed. Committed: only
        /// the point it was committed to, while nothing was written since.
        #[arg(long)]
        point: Option<String>,
    },
    /// Make a failover permanent: the other recovery points are deleted (Complete-VMFailover).
    Complete { vm: String },
    /// Undo a failover that is not committed; the queued logs are applied (RevertFailover).
    Revert { vm: String },
    /// Replication state of every VM (Get-VMReplication).
    Status,
    /// Replication statistics of a VM (Measure-VMReplication).
    Measure { vm: String },
    /// Reset a VM's replication statistics (Reset-VMReplicationStatistics).
    ResetStatistics { vm: String },
    /// Certificates in this host's certificate store (base64 DER).
    Certs,
    /// Lab certificates for host-to-host replication (local; no daemon needed).
    #[command(subcommand)]
    Cert(CertVerb),
    /// Jobs of the daemon.
    #[command(subcommand)]
    Job(JobVerb),
    /// Print a shell completion script (bash, zsh, fish, ...).
    Completions { shell: clap_complete::Shell },
    /// The daemon's credentials file (local; vmreplicad --credentials FILE).
    #[command(subcommand)]
    Credentials(CredentialsVerb),
}

#[derive(Subcommand)]
enum CertVerb {
    /// Create (or reuse) a lab CA in --out and a certificate for each --host; prints each
    /// thumbprint. Copy <out>/<host>/certs/ to that host's <data-dir>/certs/.
    New {
        /// A host's fully qualified name (repeat for each host).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Directory of the lab CA and the issued certificates.
        #[arg(long = "out", alias = "ca")]
        out: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum CredentialsVerb {
    /// Add or replace a user; reads the password from the first line of standard input.
    Add {
        #[arg(long)]
        file: std::path::PathBuf,
        #[arg(long = "name")]
        name: String,
    },
}

#[derive(Subcommand)]
enum VmVerb {
    /// Define a VM to the daemon; prints its GUID.
    Add {
        #[arg(long)]
        name: String,
        /// A disk image (repeat for several disks).
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        /// The VM's GUID (default: a new one).
        #[arg(long)]
        id: Option<uuid::Uuid>,
        #[command(flatten)]
        power: PowerArgs,
    },
    /// List the VMs.
    List,
    /// Forget a VM that no relationship uses (disable replication first); its files stay.
    Remove { vm: String },
    /// Set how the daemon starts, stops and sees a VM run, replacing what it had (a failed-over
    /// replica VM gets one here; its start command finds the current disks in $VMREPLICA_DISK0…).
    Power {
        vm: String,
        #[command(flatten)]
        power: PowerArgs,
    },
    /// Start a VM (runs its start command; Msvm_ComputerSystem.RequestStateChange(2)).
    Start { vm: String },
    /// Turn a VM off (QMP quit or its stop command), or with --shutdown ask the guest to shut down.
    Stop {
        vm: String,
        #[arg(long)]
        shutdown: bool,
    },
}

#[derive(Subcommand)]
enum ServerVerb {
    Show,
    Set {
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        #[arg(long)]
        disable: bool,
        /// Certificate thumbprint (hex SHA-1 or SHA-256 of the DER).
        #[arg(long)]
        thumbprint: Option<String>,
        #[arg(long)]
        https_port: Option<u16>,
        /// Statistics window, seconds.
        #[arg(long)]
        monitoring_interval: Option<u32>,
    },
}

#[derive(Subcommand)]
enum FailoverNetworkVerb {
    Show {
        vm: String,
    },
    /// Set one adapter's static settings; they replace what the adapter had for each protocol
    /// they name (IPv4, IPv6, or both when the addresses mix them).
    Set {
        vm: String,
        /// The adapter, in the order the VM's start command creates them (0 = the first).
        #[arg(long, default_value_t = 0)]
        adapter: u32,
        /// The guest asks DHCP for its IPv4 address (with --dns or --gateway, say; to drop
        /// static settings use `clear`).
        #[arg(long)]
        dhcp: bool,
        /// A static address with its prefix length or mask, like 10.0.0.5/24 (repeatable).
        #[arg(long = "ip", value_name = "ADDRESS/PREFIX")]
        ips: Vec<String>,
        /// A default gateway (repeatable, at most 5).
        #[arg(long = "gateway", value_name = "ADDRESS")]
        gateways: Vec<String>,
        /// A DNS server (repeatable).
        #[arg(long = "dns", value_name = "ADDRESS")]
        dns: Vec<String>,
    },
    /// Forget one adapter's settings (every protocol): the guest keeps what it has.
    Clear {
        vm: String,
        #[arg(long, default_value_t = 0)]
        adapter: u32,
    },
}

#[derive(Subcommand)]
enum HostVerb {
    Show,
    /// Settings not given keep their value.
    Set {
        /// Upload cap, bytes per second, shared by every transfer (K/M/G suffixes; 0 = none).
        #[arg(long, value_name = "BYTES_PER_SEC", value_parser = vmreplica_core::command::parse_rate)]
        bandwidth_limit: Option<u64>,
        /// A weekly window of this host's local time with its own cap, replacing the limit while
        /// it holds: "[DAYS ]HH:MM-HH:MM=RATE", like "Mon-Fri 08:00-18:00=10M". Repeatable; the
        /// windows given replace the ones in force (the first that holds wins).
        #[arg(long = "bandwidth-window", value_name = "WINDOW")]
        bandwidth_windows: Vec<String>,
        /// Drop every bandwidth window.
        #[arg(long, conflicts_with = "bandwidth_windows")]
        no_bandwidth_windows: bool,
        /// Replication cycles that transfer at once (1-64).
        #[arg(long, value_name = "N")]
        max_parallel_transfers: Option<u16>,
    },
    /// Forget what `host set` stored: the daemon's flags hold again.
    Reset,
}

#[derive(Subcommand)]
enum AuthVerb {
    List,
    Add(AuthEntryArgs),
    Modify(AuthEntryArgs),
    Remove {
        /// The entry's AllowedPrimaryHostSystem.
        primary: String,
    },
    /// Bind a replica VM to an entry: it accepts data only from that primary (SetAuthorizationEntry).
    Bind {
        vm: String,
        /// The entry's AllowedPrimaryHostSystem.
        #[arg(long)]
        primary: String,
    },
}

#[derive(Args)]
struct AuthEntryArgs {
    /// Allowed primary: an FQDN, `*.domain` or `*`.
    #[arg(long)]
    primary: String,
    /// Where replicas from this primary are stored.
    #[arg(long)]
    storage: String,
    #[arg(long, default_value = "DEFAULT")]
    trust_group: String,
}

#[derive(Args)]
struct EnableArgs {
    vm: String,
    /// The replica server's name.
    #[arg(long)]
    replica_server: String,
    #[arg(long, default_value_t = 443)]
    replica_port: u16,
    /// Certificate thumbprint used to authenticate to the replica server.
    #[arg(long)]
    thumbprint: Option<String>,
    /// Replication frequency in seconds: 30, 300 or 900.
    #[arg(long, default_value_t = 300)]
    frequency: u16,
    /// Extra hourly recovery points (0-24).
    #[arg(long, default_value_t = 0)]
    recovery_history: u16,
    /// Application-consistent point frequency in hours (0-12, needs --recovery-history).
    #[arg(long, default_value_t = 0)]
    vss_frequency: u16,
    #[arg(long)]
    no_compression: bool,
    /// Disks to replicate (default: all).
    #[arg(long = "disk")]
    disks: Vec<String>,
}

/// How the daemon starts, stops and sees a VM run (a `PowerControl`).
#[derive(Args)]
struct PowerArgs {
    /// QMP socket of the QEMU process running the VM.
    #[arg(long)]
    qmp_socket: Option<String>,
    #[arg(long)]
    start_command: Option<String>,
    #[arg(long)]
    stop_command: Option<String>,
    /// Unix socket of an NBD server the VM's QEMU process already runs (replication starts its
    /// own otherwise; a QEMU process can run only one).
    #[arg(long, requires = "qmp_socket")]
    nbd_socket: Option<String>,
}

impl From<PowerArgs> for PowerControl {
    fn from(a: PowerArgs) -> PowerControl {
        PowerControl {
            qmp_socket: a.qmp_socket,
            start_command: a.start_command,
            stop_command: a.stop_command,
            nbd_socket: a.nbd_socket,
        }
    }
}

#[derive(Args)]
struct SetArgs {
    vm: String,
    #[arg(long)]
    replica_server: Option<String>,
    #[arg(long)]
    replica_port: Option<u16>,
    #[arg(long)]
    thumbprint: Option<String>,
    /// Replication frequency in seconds: 30, 300 or 900.
    #[arg(long)]
    frequency: Option<u16>,
    #[arg(long)]
    recovery_history: Option<u16>,
    #[arg(long)]
    vss_frequency: Option<u16>,
    #[arg(long)]
    compression: Option<bool>,
    /// Disks to replicate (replaces the list).
    #[arg(long = "disk")]
    disks: Vec<String>,
}

impl SetArgs {
    /// The current settings with the given flags applied.
    fn apply(self, mut s: ReplicationSettings) -> (String, ReplicationSettings) {
        s.recovery_connection_point = self.replica_server.unwrap_or(s.recovery_connection_point);
        s.recovery_server_port_number = self.replica_port.unwrap_or(s.recovery_server_port_number);
        s.certificate_thumbprint = self.thumbprint.or(s.certificate_thumbprint);
        s.replication_interval = self.frequency.unwrap_or(s.replication_interval);
        s.recovery_history = self.recovery_history.unwrap_or(s.recovery_history);
        s.application_consistent_snapshot_interval = self
            .vss_frequency
            .unwrap_or(s.application_consistent_snapshot_interval);
        s.compression_enabled = self.compression.unwrap_or(s.compression_enabled);
        if !self.disks.is_empty() {
            s.included_disks = self.disks;
        }
        (self.vm, s)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum InitialType {
    Network,
    Export,
    Seeded,
}

#[derive(Subcommand)]
enum JobVerb {
    List,
    Show {
        id: String,
    },
    /// Wait for a job to finish, with a progress bar.
    Wait {
        id: String,
    },
    Cancel {
        id: String,
    },
}

fn cert_new(out: &std::path::Path, hosts: &[String], fmt: OutputFormat) -> Result<(), Failure> {
    let (ca, created, issued) = labca::new_certificates(out, hosts).map_err(Failure::Transport)?;
    if fmt == OutputFormat::Json {
        let list: Vec<_> = issued
            .iter()
            .map(|i| {
                serde_json::json!({"host": i.host, "thumbprint": i.thumbprint,
                    "certs_dir": i.certs_dir.display().to_string()})
            })
            .collect();
        let doc = serde_json::json!({"ca": ca.display().to_string(), "ca_created": created, "hosts": list});
        println!("{doc}");
        return Ok(());
    }
    let verb = if created { "created" } else { "reused" };
    println!("lab CA {verb}: {}", ca.display());
    println!("{:<32} {:<40} CERTIFICATE STORE", "HOST", "THUMBPRINT");
    for i in &issued {
        println!(
            "{:<32} {:<40} {}",
            i.host,
            i.thumbprint,
            i.certs_dir.display()
        );
    }
    Ok(())
}

fn main() {
    // Die quietly on a closed pipe (`vmreplica status | head`) instead of panicking in println!.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Verb::Credentials(CredentialsVerb::Add { file, name }) => {
            credentials::add(&file, &name).map_err(Failure::Transport)
        }
        Verb::Cert(CertVerb::New { hosts, out }) => cert_new(&out, &hosts, cli.output),
        Verb::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "vmreplica", &mut std::io::stdout());
            Ok(())
        }
        verb => {
            let endpoint = client::Endpoint {
                url: cli.url,
                basic: cli.user.map(|u| (u, cli.password.unwrap_or_default())),
                ca_cert: cli.ca_cert,
            };
            Client::new(&endpoint)
                .map_err(Failure::Transport)
                .and_then(|c| run(&c, cli.output, verb))
        }
    };
    let code = match result {
        Ok(()) => 0,
        Err(Failure::Refused(e)) => {
            eprintln!("error: {} (return code {})", e.message, e.code);
            3
        }
        Err(Failure::JobFailed(msg)) => {
            eprintln!("error: {msg}");
            4
        }
        Err(Failure::Transport(e)) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn settings(a: EnableArgs) -> (String, ReplicationSettings) {
    let s = ReplicationSettings {
        recovery_connection_point: a.replica_server,
        recovery_server_port_number: a.replica_port,
        certificate_thumbprint: a.thumbprint,
        replication_interval: a.frequency,
        recovery_history: a.recovery_history,
        application_consistent_snapshot_interval: a.vss_frequency,
        compression_enabled: !a.no_compression,
        included_disks: a.disks,
        ..ReplicationSettings::default()
    };
    (a.vm, s)
}

fn replication(vm: String, operation: Operation, args: OperationArgs) -> Command {
    Command::Replication {
        vm,
        operation,
        args,
    }
}

fn run(client: &Client, fmt: OutputFormat, verb: Verb) -> Result<(), Failure> {
    let cmd = match verb {
        Verb::Vm(VmVerb::Add {
            name,
            disks,
            id,
            power,
        }) => {
            let disks = disks
                .iter()
                .map(|d| absolute(d))
                .collect::<Result<_, _>>()?;
            let power = PowerControl::from(power);
            Command::AddVm(VmDefinition {
                name,
                disks,
                id,
                power,
            })
        }
        Verb::Vm(VmVerb::Power { vm, power }) => Command::SetPowerControl {
            vm,
            power: power.into(),
        },
        Verb::Vm(VmVerb::List) => Command::ListVms,
        Verb::Vm(VmVerb::Remove { vm }) => Command::RemoveVm { vm },
        Verb::Vm(VmVerb::Start { vm }) => Command::SetPowerState { vm, requested: 2 },
        Verb::Vm(VmVerb::Stop { vm, shutdown }) => Command::SetPowerState {
            vm,
            requested: if shutdown { 4 } else { 3 },
        },
        Verb::Server(ServerVerb::Show) => Command::GetServiceSettings,
        Verb::Server(ServerVerb::Set {
            enable,
            disable,
            thumbprint,
            https_port,
            monitoring_interval,
        }) => {
            let mut s = match client.execute(&Command::GetServiceSettings)? {
                CommandOutput::ServiceSettings(s) => s,
                other => return Err(Failure::unexpected(&other)),
            };
            if enable {
                s.recovery_server_enabled = true;
                s.allowed_authentication_type = 2;
            }
            if disable {
                s.recovery_server_enabled = false;
            }
            s.certificate_thumbprint = thumbprint.or(s.certificate_thumbprint);
            s.https_port = https_port.unwrap_or(s.https_port);
            s.monitoring_interval = monitoring_interval.unwrap_or(s.monitoring_interval);
            Command::ModifyServiceSettings(s)
        }
        Verb::FailoverNetwork(FailoverNetworkVerb::Show { vm }) => {
            Command::GetFailoverNetwork { vm }
        }
        Verb::FailoverNetwork(FailoverNetworkVerb::Set {
            vm,
            adapter,
            dhcp,
            ips,
            gateways,
            dns,
        }) => {
            let mut s = FailoverNetworkSettings {
                adapter,
                dhcp_enabled: dhcp,
                default_gateways: gateways,
                dns_servers: dns,
                ..FailoverNetworkSettings::default()
            };
            for ip in ips {
                let (address, subnet) = ip.split_once('/').ok_or_else(|| {
                    usage(format!(
                        "--ip {ip}: give the prefix length or mask too, like 10.0.0.5/24"
                    ))
                })?;
                s.ip_addresses.push(address.into());
                s.subnets.push(subnet.into());
            }
            if s.is_clear() {
                return Err(usage(
                    "nothing to set: give --ip (and --gateway, --dns), or use `failover-network clear`",
                ));
            }
            let args = OperationArgs {
                failover_network: vec![s],
                ..OperationArgs::default()
            };
            replication(vm, Operation::SetFailoverNetworkAdapterSettings, args)
        }
        Verb::FailoverNetwork(FailoverNetworkVerb::Clear { vm, adapter }) => {
            let clear = |protocol_if_type| FailoverNetworkSettings {
                adapter,
                protocol_if_type,
                dhcp_enabled: true,
                ..FailoverNetworkSettings::default()
            };
            let args = OperationArgs {
                failover_network: vec![clear(PROTOCOL_IPV4), clear(PROTOCOL_IPV6)],
                ..OperationArgs::default()
            };
            replication(vm, Operation::SetFailoverNetworkAdapterSettings, args)
        }
        Verb::Host(HostVerb::Show) => Command::GetHostSettings,
        Verb::Host(HostVerb::Reset) => Command::ResetHostSettings,
        Verb::Host(HostVerb::Set {
            bandwidth_limit,
            bandwidth_windows,
            no_bandwidth_windows,
            max_parallel_transfers,
        }) => {
            let mut s = match client.execute(&Command::GetHostSettings)? {
                CommandOutput::HostSettings(s) => s,
                other => return Err(Failure::unexpected(&other)),
            };
            s.bandwidth_limit = bandwidth_limit.unwrap_or(s.bandwidth_limit);
            if no_bandwidth_windows {
                s.bandwidth_windows.clear();
            } else if !bandwidth_windows.is_empty() {
                s.bandwidth_windows = bandwidth_windows;
            }
            s.max_parallel_transfers = max_parallel_transfers.unwrap_or(s.max_parallel_transfers);
            Command::SetHostSettings(s)
        }
        Verb::Auth(AuthVerb::List) => Command::ListAuthorizationEntries,
        Verb::Auth(AuthVerb::Add(a)) => Command::AddAuthorizationEntry(entry(a)),
        Verb::Auth(AuthVerb::Modify(a)) => Command::ModifyAuthorizationEntry(entry(a)),
        Verb::Auth(AuthVerb::Remove { primary }) => Command::RemoveAuthorizationEntry {
            allowed_primary_host_system: primary,
        },
        Verb::Auth(AuthVerb::Bind { vm, primary }) => Command::SetAuthorizationEntry {
            vm,
            entry: AuthorizationEntry {
                allowed_primary_host_system: primary,
                trust_group: String::new(),
                replica_storage_location: String::new(),
            },
        },
        Verb::Enable(a) => {
            let (vm, settings) = settings(a);
            Command::CreateReplicationRelationship { vm, settings }
        }
        Verb::Set(a) => {
            let current = Command::GetReplicationSettings { vm: a.vm.clone() };
            let (vm, settings) = match client.execute(&current)? {
                CommandOutput::ReplicationSettings(s) => a.apply(s),
                other => return Err(Failure::unexpected(&other)),
            };
            Command::ModifyReplicationSettings { vm, settings }
        }
        Verb::Reverse(a) => {
            let current = Command::GetReplicationSettings { vm: a.vm.clone() };
            let (vm, settings) = match client.execute(&current)? {
                CommandOutput::ReplicationSettings(s) => a.apply(s),
                other => return Err(Failure::unexpected(&other)),
            };
            let args = OperationArgs {
                settings: Some(settings),
                ..OperationArgs::default()
            };
            replication(vm, Operation::ReverseReplicationRelationship, args)
        }
        Verb::Resync { vm } => replication(vm, Operation::Resynchronize, OperationArgs::default()),
        Verb::Failback { settings: a, point } => {
            let current = Command::GetReplicationSettings { vm: a.vm.clone() };
            let (vm, settings) = match client.execute(&current)? {
                CommandOutput::ReplicationSettings(s) => a.apply(s),
                other => return Err(Failure::unexpected(&other)),
            };
            let args = OperationArgs {
                settings: Some(settings),
                recovery_point: point,
                ..OperationArgs::default()
            };
            replication(vm, Operation::InitiateFailback, args)
        }
        Verb::Settings { vm } => Command::GetReplicationSettings { vm },
        Verb::Disable { vm } => Command::RemoveReplicationRelationship { vm },
        Verb::EnableAsReplica { vm } => replication(
            vm,
            Operation::RequestReplicationStateChange(
                RequestedState::WaitingToCompleteInitialReplication,
            ),
            OperationArgs::default(),
        ),
        Verb::Start { vm, r#type, path } => {
            let kind = match r#type {
                InitialType::Network => InitialReplicationType::Network,
                InitialType::Export => InitialReplicationType::Export,
                InitialType::Seeded => InitialReplicationType::Seeded,
            };
            let args = OperationArgs {
                location: path,
                ..OperationArgs::default()
            };
            replication(vm, Operation::StartReplication(kind), args)
        }
        Verb::Import { vm, path } => {
            let args = OperationArgs {
                location: Some(absolute(&path)?),
                ..OperationArgs::default()
            };
            replication(vm, Operation::ImportInitialReplica, args)
        }
        Verb::Suspend { vm } => replication(
            vm,
            Operation::RequestReplicationStateChange(RequestedState::Suspend),
            OperationArgs::default(),
        ),
        Verb::Resume { vm } => replication(
            vm,
            Operation::RequestReplicationStateChange(RequestedState::Replicating),
            OperationArgs::default(),
        ),
        Verb::Failover { vm, test, point } => {
            let args = OperationArgs {
                recovery_point: point,
                ..OperationArgs::default()
            };
            let op = if test {
                Operation::TestReplicaSystem
            } else {
                Operation::InitiateFailover
            };
            replication(vm, op, args)
        }
        Verb::StopFailover { vm } => {
            let CommandOutput::Vms { vms } = client.execute(&Command::ListVms)? else {
                return Err(Failure::Transport(anyhow::anyhow!(
                    "the daemon did not list its VMs"
                )));
            };
            let replica = vms
                .iter()
                .find(|v| {
                    v.name.eq_ignore_ascii_case(&vm)
                        || v.id
                            .to_string()
                            .eq_ignore_ascii_case(vm.trim_matches(['{', '}']))
                })
                .ok_or_else(|| {
                    Failure::Transport(anyhow::anyhow!("no virtual machine '{vm}' on this host"))
                })?;
            Command::DestroySystem {
                vm: format!("{} - Test", replica.name),
            }
        }
        Verb::PrepareFailover { vm } => replication(
            vm,
            Operation::RequestReplicationStateChange(RequestedState::SyncedReplicationComplete),
            OperationArgs::default(),
        ),
        Verb::Complete { vm } => {
            replication(vm, Operation::CommitFailover, OperationArgs::default())
        }
        Verb::Revert { vm } => replication(vm, Operation::RevertFailover, OperationArgs::default()),
        Verb::Status => Command::Status,
        Verb::Measure { vm } => Command::GetReplicationStatistics { vm },
        Verb::ResetStatistics { vm } => Command::ResetReplicationStatistics { vm },
        Verb::Certs => Command::GetSystemCertificates,
        Verb::TestConnection {
            replica_server,
            replica_port,
            thumbprint,
        } => Command::TestReplicationConnection {
            recovery_connection_point: replica_server,
            recovery_server_port_number: replica_port,
            authentication_type: 2,
            certificate_thumbprint: Some(thumbprint),
            bypass_proxy_server: false,
        },
        Verb::Job(JobVerb::List) => Command::ListJobs,
        Verb::Job(JobVerb::Show { id }) => Command::GetJob { id, wait_ms: 0 },
        Verb::Job(JobVerb::Wait { id }) => {
            let job = client.wait_job(&id, JOB_WAIT)?;
            render::print(fmt, &CommandOutput::Job(job.clone()));
            return client::job_outcome(&job);
        }
        Verb::Job(JobVerb::Cancel { id }) => Command::CancelJob { id },
        Verb::Credentials(_) | Verb::Completions { .. } | Verb::Cert(_) => {
            unreachable!("handled before connecting")
        }
    };
    let out = client.execute(&cmd)?;
    // A started job is waited for, as the PowerShell cmdlets do.
    if let CommandOutput::JobWithSystem { job, system } = &out {
        let done = client.wait_job(&job.id, JOB_WAIT)?;
        render::print(fmt, &CommandOutput::Job(done.clone()));
        client::job_outcome(&done)?;
        println!("Test VM: {}", system.to_string().to_uppercase());
        return Ok(());
    }
    if let CommandOutput::Job(job) = &out {
        let done = client.wait_job(&job.id, JOB_WAIT)?;
        render::print(fmt, &CommandOutput::Job(done.clone()));
        return client::job_outcome(&done);
    }
    render::print(fmt, &out);
    Ok(())
}

fn entry(a: AuthEntryArgs) -> AuthorizationEntry {
    AuthorizationEntry {
        allowed_primary_host_system: a.primary,
        trust_group: a.trust_group,
        replica_storage_location: a.storage,
    }
}

/// A command line the daemon would refuse (32773), refused here before anything is sent.
fn usage(message: impl Into<String>) -> Failure {
    Failure::Refused(vmreplica_core::command::CommandError::new(
        vmreplica_core::codes::ReturnCode::InvalidParameter,
        message,
    ))
}

fn absolute(path: &str) -> Result<String, Failure> {
    let p = std::path::absolute(path)
        .with_context(|| format!("cannot make '{path}' absolute"))
        .map_err(Failure::Transport)?;
    Ok(p.display().to_string())
}
