//! Printing command outputs as tables (default) or JSON (`--output json`).

use vmreplica_core::command::{CommandOutput, JobView};
use vmreplica_core::job::JobState;

use crate::OutputFormat;

pub fn print(fmt: OutputFormat, out: &CommandOutput) {
    if fmt == OutputFormat::Json {
        match serde_json::to_string_pretty(out) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("error: cannot render JSON: {e}"),
        }
        return;
    }
    match out {
        CommandOutput::Completed => println!("Completed."),
        CommandOutput::Vm(vm) => println!("{}", vm.id.to_string().to_uppercase()),
        CommandOutput::Vms { vms } => {
            let rows = vms
                .iter()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        v.id.to_string().to_uppercase(),
                        power(v.enabled_state),
                        v.disks.join(", "),
                    ]
                })
                .collect();
            table(&["Name", "Id", "State", "Disks"], rows);
        }
        CommandOutput::Status { rows } => {
            let rows = rows
                .iter()
                .map(|r| {
                    vec![
                        r.vm.name.clone(),
                        r.state.clone(),
                        r.health.clone(),
                        r.mode.clone(),
                        r.replication_interval
                            .map_or(String::new(), |i| i.to_string()),
                        r.primary_connection_point.clone().unwrap_or_default(),
                        r.recovery_connection_point.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            table(
                &[
                    "VMName",
                    "State",
                    "Health",
                    "Mode",
                    "FrequencySec",
                    "PrimaryServer",
                    "ReplicaServer",
                ],
                rows,
            );
        }
        CommandOutput::Job(job) => {
            table(JOB_HEADER, vec![job_row(job)]);
            // A job's log (what a failback read and sent, say) follows its name.
            if let Some((_, log)) = job.description.split_once(". ") {
                println!("{log}");
            }
        }
        CommandOutput::JobWithSystem { job, system } => {
            table(JOB_HEADER, vec![job_row(job)]);
            println!("ResultingSystem: {}", system.to_string().to_uppercase());
        }
        CommandOutput::Jobs { jobs } => table(JOB_HEADER, jobs.iter().map(job_row).collect()),
        CommandOutput::ServiceSettings(s) => {
            let rows = vec![
                vec!["RepEnabled".into(), s.recovery_server_enabled.to_string()],
                vec![
                    "AuthType".into(),
                    auth_type(s.allowed_authentication_type).into(),
                ],
                vec![
                    "CertThumbprint".into(),
                    s.certificate_thumbprint.clone().unwrap_or_default(),
                ],
                vec!["CertAuthPort".into(), s.https_port.to_string()],
                vec![
                    "MonitoringInterval".into(),
                    s.monitoring_interval.to_string(),
                ],
                vec!["MonitoringStartTime".into(), hhmm(s.monitoring_start_time)],
            ];
            table(&["Setting", "Value"], rows);
        }
        CommandOutput::ReplicationSettings(s) => {
            let rows = vec![
                vec!["ReplicaServer".into(), s.recovery_connection_point.clone()],
                vec![
                    "ReplicaPort".into(),
                    s.recovery_server_port_number.to_string(),
                ],
                vec!["AuthType".into(), auth_type(s.authentication_type).into()],
                vec![
                    "CertificateThumbprint".into(),
                    s.certificate_thumbprint.clone().unwrap_or_default(),
                ],
                vec!["FrequencySec".into(), s.replication_interval.to_string()],
                vec!["RecoveryHistory".into(), s.recovery_history.to_string()],
                vec![
                    "VSSSnapshotFrequencyHour".into(),
                    s.application_consistent_snapshot_interval.to_string(),
                ],
                vec![
                    "CompressionEnabled".into(),
                    s.compression_enabled.to_string(),
                ],
                vec!["ReplicatedDisks".into(), s.included_disks.join(", ")],
            ];
            table(&["Setting", "Value"], rows);
        }
        CommandOutput::AuthorizationEntries { entries } => {
            let rows = entries
                .iter()
                .map(|e| {
                    vec![
                        e.allowed_primary_host_system.clone(),
                        e.replica_storage_location.clone(),
                        e.trust_group.clone(),
                    ]
                })
                .collect();
            table(
                &[
                    "AllowedPrimaryServer",
                    "ReplicaStorageLocation",
                    "TrustGroup",
                ],
                rows,
            );
        }
        CommandOutput::Certificates { encoded } => encoded.iter().for_each(|c| println!("{c}")),
        CommandOutput::FailoverNetwork { settings } => {
            let rows = settings
                .iter()
                .map(|f| {
                    let protocol = match f.protocol_if_type {
                        vmreplica_core::settings::PROTOCOL_IPV4 => "IPv4",
                        _ => "IPv6",
                    };
                    let addresses: Vec<String> = f
                        .ip_addresses
                        .iter()
                        .zip(&f.subnets)
                        .map(|(a, s)| format!("{a}/{s}"))
                        .collect();
                    vec![
                        f.adapter.to_string(),
                        protocol.into(),
                        if f.dhcp_enabled { "yes" } else { "no" }.into(),
                        addresses.join(", "),
                        f.default_gateways.join(", "),
                        f.dns_servers.join(", "),
                    ]
                })
                .collect();
            table(
                &[
                    "Adapter",
                    "Protocol",
                    "DHCP",
                    "Addresses",
                    "Gateways",
                    "DNS",
                ],
                rows,
            );
        }
        CommandOutput::HostSettings(s) => {
            let rows = vec![
                vec![
                    "BandwidthLimit".into(),
                    if s.bandwidth_limit == 0 {
                        "none".into()
                    } else {
                        format!("{} bytes/s", s.bandwidth_limit)
                    },
                ],
                vec!["BandwidthWindows".into(), s.bandwidth_windows.join("; ")],
                vec![
                    "MaxParallelTransfers".into(),
                    s.max_parallel_transfers.to_string(),
                ],
                vec!["Source".into(), s.source.clone()],
            ];
            table(&["Setting", "Value"], rows);
        }
        CommandOutput::Statistics(s) => {
            let avg = |total: u64| {
                if s.replication_success_count == 0 {
                    0
                } else {
                    total / u64::from(s.replication_success_count)
                }
            };
            let rows = vec![
                vec!["Health".into(), s.replication_health.to_string()],
                vec![
                    "SuccessfulReplicationCount".into(),
                    s.replication_success_count.to_string(),
                ],
                vec![
                    "MissedReplicationCount".into(),
                    s.replication_miss_count.to_string(),
                ],
                vec![
                    "AverageReplicationSize".into(),
                    avg(s.replication_size).to_string(),
                ],
                vec![
                    "MaximumReplicationSize".into(),
                    s.max_replication_size.to_string(),
                ],
                vec![
                    "AverageReplicationLatency".into(),
                    avg(u64::from(s.replication_latency)).to_string(),
                ],
                vec![
                    "ReplicationErrors".into(),
                    (s.replication_failure_count
                        + s.network_failure_count
                        + s.application_consistent_snapshot_failure_count)
                        .to_string(),
                ],
                vec![
                    "PendingReplicationSize".into(),
                    s.pending_replication_size.to_string(),
                ],
                vec![
                    "ReplicationHealthDetails".into(),
                    s.health_messages.join(" | "),
                ],
            ];
            table(&["Field", "Value"], rows);
        }
    }
}

const JOB_HEADER: &[&str] = &["Id", "Type", "State", "Percent", "Error"];

fn job_row(j: &JobView) -> Vec<String> {
    let state = JobState::from_u16(j.job_state)
        .map_or_else(|| j.job_state.to_string(), |s| format!("{s:?}"));
    vec![
        j.id.clone(),
        j.caption.clone(),
        state,
        j.percent_complete.to_string(),
        j.error_description.clone().unwrap_or_default(),
    ]
}

fn power(state: u16) -> String {
    match state {
        2 => "Running".into(),
        3 => "Off".into(),
        other => other.to_string(),
    }
}

fn auth_type(t: u16) -> &'static str {
    match t {
        1 => "Kerberos",
        2 => "Certificate",
        3 => "CertificateAndKerberos",
        _ => "NotDefined",
    }
}

fn hhmm(secs: u32) -> String {
    format!("{:02}:{:02}", secs / 3600, (secs % 3600) / 60)
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    line(widths.iter().map(|w| "-".repeat(*w)).collect());
    rows.into_iter().for_each(line);
}
