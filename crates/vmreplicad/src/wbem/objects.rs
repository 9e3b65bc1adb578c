//! The CIM objects of this host, built from one snapshot of the metadata store per request.
//!
//! Identifier formats follow spec §1: `Msvm_ReplicationRelationship.InstanceID` and
//! `Msvm_ReplicationSettingData.InstanceID` are `Microsoft:<VMID>\HVR\0`; the built-in provider is
//! `22391CDC-272C-4DDF-BA88-9BEFB1A0975C`. A default `Msvm_ReplicationSettingData` exists for every VM
//! before replication is enabled, as in Hyper-V, so clients can fetch it, change it and pass it to
//! `CreateReplicationRelationship`.

use cim::{CimDateTime, CimInstance, CimType, CimValue, KeyValue, ObjectPath};
use uuid::Uuid;
use vmreplica_core::job::{JobState, JobType};
use vmreplica_core::settings::{
    AuthorizationEntry, FailoverNetworkSettings, ReplicationSettings, ServiceSettings,
};

use crate::engine::test_failover::TestSystemRow;
use crate::jobs::JOB_RETENTION_SECS;
use crate::power;
use crate::service::Service;
use crate::store::{JobErrorInfo, JobRow, PointRow, RelationshipRow, StoreError, VmRow};

pub const PROVIDER_GUID: &str = "22391CDC-272C-4DDF-BA88-9BEFB1A0975C";
const CS: &str = "Msvm_ComputerSystem";

/// Everything the CIM view shows, read once.
pub struct Snapshot {
    pub host: String,
    pub vms: Vec<(VmRow, Option<RelationshipRow>)>,
    pub service_settings: ServiceSettings,
    pub authorization: Vec<AuthorizationEntry>,
    pub jobs: Vec<JobRow>,
    /// The recovery-point catalog of every replica VM.
    pub points: Vec<PointRow>,
    /// Test VMs and the replica VMs they were made from.
    pub test_systems: Vec<TestSystemRow>,
    /// The failover IP settings of each VM (SetFailoverNetworkAdapterSettings).
    pub failover_network: Vec<(Uuid, FailoverNetworkSettings)>,
}

impl Snapshot {
    pub fn read(service: &Service) -> Result<Snapshot, StoreError> {
        let mut vms = Vec::new();
        let mut points = Vec::new();
        let mut failover_network = Vec::new();
        for vm in service.store.list_vms()? {
            let rel = service.store.get_relationship(vm.id)?;
            points.extend(service.store.recovery_points(vm.id)?);
            failover_network.extend(
                service
                    .store
                    .failover_network(vm.id)?
                    .into_iter()
                    .map(|f| (vm.id, f)),
            );
            vms.push((vm, rel));
        }
        Ok(Snapshot {
            host: service.host.clone(),
            vms,
            service_settings: service.store.service_settings()?,
            authorization: service.store.authorization_entries()?,
            jobs: service.store.list_jobs()?,
            points,
            test_systems: service.store.test_systems()?,
            failover_network,
        })
    }
}

// ---- identities ----

pub fn vm_name(id: Uuid) -> String {
    id.to_string().to_uppercase()
}

pub fn host_path(host: &str) -> ObjectPath {
    ObjectPath::new(CS)
        .with_key("CreationClassName", KeyValue::String(CS.into()))
        .with_key("Name", KeyValue::String(host.into()))
}

pub fn vm_path(id: Uuid) -> ObjectPath {
    ObjectPath::new(CS)
        .with_key("CreationClassName", KeyValue::String(CS.into()))
        .with_key("Name", KeyValue::String(vm_name(id)))
}

fn hosted_service_path(class: &str, name: &str, host: &str) -> ObjectPath {
    ObjectPath::new(class)
        .with_key("CreationClassName", KeyValue::String(class.into()))
        .with_key("Name", KeyValue::String(name.into()))
        .with_key("SystemCreationClassName", KeyValue::String(CS.into()))
        .with_key("SystemName", KeyValue::String(host.into()))
}

pub fn service_path(host: &str) -> ObjectPath {
    hosted_service_path("Msvm_ReplicationService", "replicasvc", host)
}

pub fn management_service_path(host: &str) -> ObjectPath {
    hosted_service_path("Msvm_VirtualSystemManagementService", "vmms", host)
}

fn instance_id_path(class: &str, id: &str) -> ObjectPath {
    ObjectPath::new(class).with_key("InstanceID", KeyValue::String(id.into()))
}

pub fn relationship_instance_id(vm: Uuid) -> String {
    format!("Microsoft:{}\\HVR\\0", vm_name(vm))
}

/// `Msvm_FailoverNetworkAdapterSettingData.InstanceID` of adapter `adapter`'s settings for
/// protocol `protocol` (4096 IPv4, 4097 IPv6, 4098 both).
pub fn failover_network_instance_id(vm: Uuid, adapter: u32, protocol: u16) -> String {
    format!(
        "Microsoft:{}\\FailoverNetworkAdapter\\{adapter}\\{protocol}",
        vm_name(vm)
    )
}

/// The adapter, and the protocol if it names one (4096, 4097 or 4098), an InstanceID of
/// [`failover_network_instance_id`]'s form names for VM `vm` (its upper-case GUID).
pub fn failover_network_adapter(vm: &str, instance_id: &str) -> Option<(u32, Option<u16>)> {
    let rest = instance_id.trim().strip_prefix("Microsoft:")?;
    let (id, rest) = rest.split_once('\\')?;
    if !id.eq_ignore_ascii_case(vm) {
        return None;
    }
    let mut parts = rest.split('\\');
    if !parts.next()?.eq_ignore_ascii_case("FailoverNetworkAdapter") {
        return None;
    }
    let adapter = parts.next()?.parse().ok()?;
    let protocol = match parts.next() {
        None => None,
        Some(p) => Some(p.parse().ok().filter(|p| (4096..=4098).contains(p))?),
    };
    parts.next().is_none().then_some((adapter, protocol))
}

pub fn failover_network_path(vm: Uuid, s: &FailoverNetworkSettings) -> ObjectPath {
    instance_id_path(
        "Msvm_FailoverNetworkAdapterSettingData",
        &failover_network_instance_id(vm, s.adapter, s.protocol_if_type),
    )
}

pub fn rsd_path(vm: Uuid) -> ObjectPath {
    instance_id_path("Msvm_ReplicationSettingData", &relationship_instance_id(vm))
}

pub fn relationship_path(vm: Uuid) -> ObjectPath {
    instance_id_path(
        "Msvm_ReplicationRelationship",
        &relationship_instance_id(vm),
    )
}

pub fn sasd_instance_id(vm: Uuid, index: usize) -> String {
    format!("Microsoft:{}\\Disk{index}\\L", vm_name(vm))
}

pub fn sasd_path(vm: Uuid, index: usize) -> ObjectPath {
    instance_id_path(
        "Msvm_StorageAllocationSettingData",
        &sasd_instance_id(vm, index),
    )
}

pub fn recovery_point_id(vm: Uuid, sequence: u64) -> String {
    format!("Microsoft:{}\\RecoveryPoint\\{sequence}", vm_name(vm))
}

pub fn recovery_point_path(vm: Uuid, sequence: u64) -> ObjectPath {
    instance_id_path(
        "Msvm_VirtualSystemSettingData",
        &recovery_point_id(vm, sequence),
    )
}

pub fn job_path(id: &str) -> ObjectPath {
    instance_id_path("Msvm_ConcreteJob", id)
}

fn service_settings_path(host: &str) -> ObjectPath {
    instance_id_path(
        "Msvm_ReplicationServiceSettingData",
        &format!("Microsoft:{host}\\ReplicationServiceSettingData"),
    )
}

fn authorization_path(host_pattern: &str) -> ObjectPath {
    instance_id_path(
        "Msvm_ReplicationAuthorizationSettingData",
        &format!("Microsoft:ReplicationAuthorizationSettingData\\{host_pattern}"),
    )
}

/// How the InstanceID of the built-in provider ends (`Microsoft:<host>` comes before it).
pub const PROVIDER_INSTANCE_SUFFIX: &str = "\\ReplicationProvider\\HostToHostReplicationProvider";

fn provider_path(host: &str) -> ObjectPath {
    instance_id_path(
        "Msvm_ReplicationProvider",
        &format!("Microsoft:{host}{PROVIDER_INSTANCE_SUFFIX}"),
    )
}

/// The disk of `vm` that `text` names: an SASD InstanceID, an SASD object path or the image path.
pub fn disk_index(vm: &VmRow, text: &str) -> Option<usize> {
    let text = text.trim();
    let id = match ObjectPath::parse_wmi(text) {
        Ok(p)
            if p.class_name
                .eq_ignore_ascii_case("Msvm_StorageAllocationSettingData") =>
        {
            p.key_str("InstanceID").map(str::to_string)
        }
        _ => None,
    };
    let id = id.as_deref().unwrap_or(text);
    (0..vm.disks.len())
        .find(|&i| sasd_instance_id(vm.id, i).eq_ignore_ascii_case(id) || vm.disks[i] == text)
}

// ---- values ----

fn s(v: &str) -> CimValue {
    CimValue::String(v.to_string())
}

fn u16v(v: u16) -> CimValue {
    CimValue::Uint16(v)
}

pub fn timestamp(secs: i64) -> CimValue {
    CimValue::Datetime(CimDateTime::from_unix(secs, 0))
}

fn strings(items: impl IntoIterator<Item = String>) -> CimValue {
    CimValue::Array(
        CimType::String,
        items.into_iter().map(CimValue::String).collect(),
    )
}

fn set_opt_time(inst: &mut CimInstance, name: &str, secs: Option<i64>) {
    match secs {
        Some(t) => inst.set(name, timestamp(t)),
        None => inst.set_null(name, CimType::Datetime, false),
    }
}

fn set_opt_str(inst: &mut CimInstance, name: &str, v: Option<&str>) {
    match v {
        Some(v) => inst.set(name, s(v)),
        None => inst.set_null(name, CimType::String, false),
    }
}

fn keyed(path: &ObjectPath) -> CimInstance {
    let mut inst = CimInstance::new(&path.class_name);
    for (name, value) in &path.keys {
        match value {
            KeyValue::String(v) => inst.set(name, s(v)),
            KeyValue::Reference(p) => inst.set(name, CimValue::Reference((**p).clone())),
            KeyValue::Number(n) => inst.set(name, s(n)),
            KeyValue::Boolean(b) => inst.set(name, CimValue::Boolean(*b)),
        }
    }
    inst
}

// ---- instances ----

pub type Object = (ObjectPath, CimInstance);

fn host_system(snap: &Snapshot) -> Object {
    let path = host_path(&snap.host);
    let inst = keyed(&path)
        .with("ElementName", s(&snap.host))
        .with("Caption", s("Hosting Computer System"))
        .with("Description", s("Microsoft Hosting Computer System"))
        .with("EnabledState", u16v(power::ENABLED))
        .with("HealthState", u16v(5))
        .with("ReplicationMode", u16v(0));
    (path, inst)
}

fn vm_system(vm: &VmRow, rel: Option<&RelationshipRow>, health: u16) -> Object {
    let path = vm_path(vm.id);
    let mut inst = keyed(&path)
        .with("ElementName", s(&vm.name))
        .with("Caption", s("Virtual Machine"))
        .with("Description", s("Microsoft Virtual Machine"))
        .with("EnabledState", u16v(power::enabled_state(&vm.power)))
        .with("HealthState", u16v(5))
        .with(
            "OperationalStatus",
            CimValue::Array(CimType::Uint16, vec![u16v(2)]),
        )
        .with("ReplicationMode", u16v(vm.mode))
        .with("ReplicationState", u16v(rel.map_or(0, |r| r.state)))
        .with("ReplicationHealth", u16v(health))
        .with(
            "FailedOverReplicationType",
            u16v(rel.map_or(0, |r| r.failed_over_type)),
        )
        .with(
            "LastReplicationType",
            u16v(rel.map_or(0, |r| r.last_replication_type)),
        );
    set_opt_time(
        &mut inst,
        "LastReplicationTime",
        rel.and_then(|r| r.last_replication_time),
    );
    set_opt_time(
        &mut inst,
        "LastApplicationConsistentReplicationTime",
        rel.and_then(|r| r.last_app_consistent_time),
    );
    (path, inst)
}

/// The VM's replication settings: the relationship's, or Hyper-V's defaults before replication is enabled.
pub fn replication_setting_data(host: &str, vm: &VmRow, rel: Option<&RelationshipRow>) -> Object {
    let default;
    let settings = match rel {
        Some(r) => &r.settings,
        None => {
            default = ReplicationSettings::default();
            &default
        }
    };
    let disks: Vec<String> = match rel {
        Some(_) => settings
            .included_disks
            .iter()
            .map(|id| sasd_path_text(host, id))
            .collect(),
        None => (0..vm.disks.len())
            .map(|i| sasd_path_text(host, &sasd_instance_id(vm.id, i)))
            .collect(),
    };
    let path = rsd_path(vm.id);
    let mut inst = keyed(&path)
        .with("Caption", s("Replication Settings"))
        .with(
            "Description",
            s("Virtual Machine Replication Settings Data"),
        )
        .with("ElementName", s(&vm.name))
        .with("VirtualSystemType", s("Microsoft:Hyper-V:Replica"))
        .with("VirtualSystemIdentifier", s(&vm_name(vm.id)))
        .with("AuthenticationType", u16v(settings.authentication_type))
        .with(
            "CompressionEnabled",
            CimValue::Boolean(settings.compression_enabled),
        )
        .with(
            "BypassProxyServer",
            CimValue::Boolean(settings.bypass_proxy_server),
        )
        .with(
            "RecoveryConnectionPoint",
            s(&settings.recovery_connection_point),
        )
        .with(
            "RecoveryServerPortNumber",
            u16v(settings.recovery_server_port_number),
        )
        .with(
            "ReplicateHostKvpItems",
            CimValue::Boolean(settings.replicate_host_kvp_items),
        )
        .with(
            "ApplicationConsistentSnapshotInterval",
            u16v(settings.application_consistent_snapshot_interval),
        )
        .with("RecoveryHistory", u16v(settings.recovery_history))
        .with("IncludedDisks", strings(disks))
        .with(
            "AutoResynchronizeEnabled",
            CimValue::Boolean(settings.auto_resynchronize_enabled),
        )
        .with(
            "AutoResynchronizeIntervalStart",
            CimValue::Datetime(CimDateTime::interval_from_secs(
                settings.auto_resynchronize_interval_start.into(),
            )),
        )
        .with(
            "AutoResynchronizeIntervalEnd",
            CimValue::Datetime(CimDateTime::interval_from_secs(
                settings.auto_resynchronize_interval_end.into(),
            )),
        )
        .with(
            "EnableWriteOrderPreservationAcrossDisks",
            CimValue::Boolean(settings.enable_write_order_preservation_across_disks),
        )
        .with("ReplicationInterval", u16v(settings.replication_interval))
        .with(
            "ReplicationProvider",
            s(&settings
                .replication_provider
                .clone()
                .unwrap_or_else(|| provider_path(host).to_wmi())),
        );
    set_opt_str(
        &mut inst,
        "CertificateThumbPrint",
        settings.certificate_thumbprint.as_deref(),
    );
    set_opt_str(
        &mut inst,
        "AdditionalSettings",
        settings.additional_settings.as_deref(),
    );
    set_opt_str(
        &mut inst,
        "PrimaryConnectionPoint",
        rel.and_then(|r| r.primary_connection_point.as_deref()),
    );
    set_opt_str(
        &mut inst,
        "PrimaryHostSystem",
        rel.and_then(|r| r.primary_connection_point.as_deref()),
    );
    let recovery_host = rel
        .map(|r| r.settings.recovery_connection_point.as_str())
        .filter(|h| !h.is_empty());
    set_opt_str(&mut inst, "RecoveryHostSystem", recovery_host);
    inst.set_null("RootCertificateThumbPrint", CimType::String, false);
    (path, inst)
}

fn sasd_path_text(host: &str, instance_id: &str) -> String {
    let mut p = instance_id_path("Msvm_StorageAllocationSettingData", instance_id);
    p.host = Some(host.to_string());
    p.namespace = Some(super::schema::NAMESPACE.to_string());
    p.to_wmi()
}

/// One adapter's failover IP settings for one protocol.
fn failover_network_setting_data(vm: Uuid, f: &FailoverNetworkSettings) -> Object {
    let path = failover_network_path(vm, f);
    let inst = keyed(&path)
        .with(
            "ElementName",
            s(&format!("Failover network adapter {}", f.adapter)),
        )
        .with("ProtocolIFType", u16v(f.protocol_if_type))
        .with("DHCPEnabled", CimValue::Boolean(f.dhcp_enabled))
        .with("IPAddresses", strings(f.ip_addresses.clone()))
        // Kept as prefix lengths; IPv4 ones shown as the dotted masks Hyper-V shows.
        .with(
            "Subnets",
            strings(f.subnets.iter().map(|p| match f.protocol_if_type {
                vmreplica_core::settings::PROTOCOL_IPV4 => {
                    vmreplica_core::settings::ipv4_mask(p).unwrap_or_else(|| p.clone())
                }
                _ => p.clone(),
            })),
        )
        .with("DefaultGateways", strings(f.default_gateways.clone()))
        .with("DNSServers", strings(f.dns_servers.clone()));
    (path, inst)
}

fn relationship(vm: &VmRow, rel: &RelationshipRow, health: u16) -> Object {
    let path = relationship_path(vm.id);
    let mut inst = keyed(&path)
        .with("ElementName", s(&vm.name))
        .with("Caption", s("Replication Relationship"))
        .with("ReplicationState", u16v(rel.state))
        .with("ReplicationHealth", u16v(health))
        .with("FailedOverReplicationType", u16v(rel.failed_over_type))
        .with("LastReplicationType", u16v(rel.last_replication_type));
    set_opt_time(&mut inst, "LastReplicationTime", rel.last_replication_time);
    set_opt_time(&mut inst, "LastApplyTime", rel.last_apply_time);
    set_opt_time(
        &mut inst,
        "LastApplicationConsistentReplicationTime",
        rel.last_app_consistent_time,
    );
    (path, inst)
}

fn storage_allocation(vm: &VmRow, index: usize) -> Object {
    let path = sasd_path(vm.id, index);
    let inst = keyed(&path)
        .with("ElementName", s("Hard Disk Image"))
        .with("Caption", s("Hard Disk Image"))
        .with("ResourceType", u16v(31))
        .with("ResourceSubType", s("Microsoft:Hyper-V:Virtual Hard Disk"))
        .with("HostResource", strings([vm.disks[index].clone()]));
    (path, inst)
}

fn replication_service(snap: &Snapshot) -> Object {
    let path = service_path(&snap.host);
    let inst = keyed(&path)
        .with("Caption", s("Hyper-V Replica Service"))
        .with(
            "Description",
            s("vmreplica: Hyper-V Replica service for QEMU/KVM"),
        )
        .with("ElementName", s("Hyper-V Replica Service"))
        .with("EnabledState", u16v(2))
        .with("EnabledDefault", u16v(2))
        .with("RequestedState", u16v(12))
        .with("HealthState", u16v(5))
        .with(
            "OperationalStatus",
            CimValue::Array(CimType::Uint16, vec![u16v(2)]),
        )
        .with("StatusDescriptions", strings(["OK".to_string()]))
        .with("Started", CimValue::Boolean(true))
        .with("StartMode", s("Automatic"));
    (path, inst)
}

fn management_service(snap: &Snapshot) -> Object {
    let path = management_service_path(&snap.host);
    let inst = keyed(&path)
        .with("Caption", s("Virtual Machine Management Service"))
        .with("ElementName", s("Virtual Machine Management Service"))
        .with("EnabledState", u16v(2))
        .with("HealthState", u16v(5));
    (path, inst)
}

pub fn service_setting_data(host: &str, st: &ServiceSettings) -> Object {
    let path = service_settings_path(host);
    let mut inst = keyed(&path)
        .with("Caption", s("Replication Service Settings"))
        .with("ElementName", s("Replication Service Settings"))
        .with(
            "RecoveryServerEnabled",
            CimValue::Boolean(st.recovery_server_enabled),
        )
        .with(
            "AllowedAuthenticationType",
            u16v(st.allowed_authentication_type),
        )
        .with("HttpPort", u16v(st.http_port))
        .with("HttpsPort", u16v(st.https_port))
        .with(
            "MonitoringInterval",
            CimValue::Uint32(st.monitoring_interval),
        )
        .with(
            "MonitoringStartTime",
            CimValue::Datetime(CimDateTime::interval_from_secs(
                st.monitoring_start_time.into(),
            )),
        );
    set_opt_str(
        &mut inst,
        "CertificateThumbPrint",
        st.certificate_thumbprint.as_deref(),
    );
    (path, inst)
}

fn authorization_entry(e: &AuthorizationEntry) -> Object {
    let path = authorization_path(&e.allowed_primary_host_system);
    let inst = keyed(&path)
        .with("Caption", s("Replication Authorization Settings"))
        .with("ElementName", s(&e.allowed_primary_host_system))
        .with(
            "AllowedPrimaryHostSystem",
            s(&e.allowed_primary_host_system),
        )
        .with("TrustGroup", s(&e.trust_group))
        .with("ReplicaStorageLocation", s(&e.replica_storage_location));
    (path, inst)
}

fn provider(snap: &Snapshot) -> Object {
    let path = provider_path(&snap.host);
    let inst = keyed(&path)
        .with("Name", s(PROVIDER_GUID))
        .with("Caption", s("Replication Provider"))
        .with(
            "ElementName",
            s("Virtual machine replication provider to Hyper-V host"),
        )
        .with(
            "Description",
            s("Virtual machine replication provider to Hyper-V host"),
        )
        .with(
            "OperationalStatus",
            CimValue::Array(CimType::Uint16, vec![u16v(2)]),
        );
    (path, inst)
}

/// A recovery point as the recovery snapshot Hyper-V shows (`Get-VMSnapshot -SnapshotType Replica`).
fn recovery_point(vm: &VmRow, p: &PointRow) -> Object {
    let path = recovery_point_path(vm.id, p.sequence);
    let secs = p.time_micros.div_euclid(1_000_000);
    let when = match CimDateTime::from_unix(secs, 0) {
        CimDateTime::Timestamp {
            year,
            month,
            day,
            hour,
            minute,
            second,
            ..
        } => {
            format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02} UTC")
        }
        CimDateTime::Interval { .. } => String::new(),
    };
    let inst = keyed(&path)
        .with(
            "ElementName",
            s(&format!("{} - {} Replica - ({when})", vm.name, p.kind)),
        )
        .with("Caption", s("Recovery Point"))
        .with(
            "Description",
            s(&format!("Recovery point {} of {}", p.sequence, vm.name)),
        )
        .with(
            "VirtualSystemType",
            s(&format!("Microsoft:Hyper-V:Snapshot:Replica:{}", p.kind)),
        )
        .with("VirtualSystemIdentifier", s(&vm_name(vm.id)))
        .with(
            "CreationTime",
            CimValue::Datetime(CimDateTime::from_unix(secs, 0)),
        );
    (path, inst)
}

pub fn concrete_job(job: &JobRow) -> Object {
    let path = job_path(&job.id);
    let job_type = JobType::from_u16(job.job_type);
    let caption = job_type.map_or("Job", |t| t.caption());
    let state = JobState::from_u16(job.state);
    let elapsed = job.time_finished.unwrap_or_else(crate::clock::now)
        - job.start_time.unwrap_or(job.time_submitted);
    let mut inst = keyed(&path)
        .with("Caption", s(caption))
        .with("Name", s(caption))
        .with("ElementName", s(caption))
        .with("Description", s(&job.description))
        .with("JobType", u16v(job.job_type))
        .with("JobState", u16v(job.state))
        .with("JobStatus", s(state.map_or("Unknown", job_status_text)))
        .with("PercentComplete", u16v(job.percent))
        .with("ErrorCode", u16v(job.error_code))
        .with("TimeSubmitted", timestamp(job.time_submitted))
        .with("TimeOfLastStateChange", timestamp(job.last_change))
        .with(
            "ElapsedTime",
            CimValue::Datetime(CimDateTime::interval_from_secs(elapsed.max(0) as u64)),
        )
        .with(
            "TimeBeforeRemoval",
            CimValue::Datetime(CimDateTime::interval_from_secs(JOB_RETENTION_SECS as u64)),
        )
        .with("DeleteOnCompletion", CimValue::Boolean(true))
        .with("Cancellable", CimValue::Boolean(job.cancellable))
        .with("HealthState", u16v(5))
        .with(
            "OperationalStatus",
            CimValue::Array(CimType::Uint16, vec![u16v(2)]),
        )
        .with("Owner", s("vmreplicad"));
    set_opt_time(&mut inst, "StartTime", job.start_time);
    set_opt_str(
        &mut inst,
        "ErrorDescription",
        job.error_description.as_deref(),
    );
    set_opt_str(
        &mut inst,
        "ErrorSummaryDescription",
        job.error_description.as_deref(),
    );
    (path, inst)
}

fn job_status_text(state: JobState) -> &'static str {
    match state {
        JobState::Completed => "Job completed successfully",
        JobState::Terminated => "Job was cancelled",
        JobState::Exception | JobState::Killed => "Job failed",
        JobState::Running => "Job is running",
        _ => "Job is pending",
    }
}

/// One `Msvm_Error` of a failed job, as GetError/GetErrorEx return it (embedded CIM-XML).
pub fn error_instance(job: &JobRow, e: &JobErrorInfo) -> CimInstance {
    CimInstance::new("Msvm_Error")
        .with("ErrorType", u16v(e.error_type))
        .with("OwningEntity", s("vmreplica"))
        .with("MessageID", s(&format!("VMR{}", job.error_code)))
        .with("Message", s(&e.message))
        .with("MessageArguments", strings(Vec::new()))
        .with("PerceivedSeverity", u16v(5))
        .with("ProbableCause", u16v(0))
        .with(
            "RecommendedActions",
            strings([e.recommended_action.clone()]),
        )
        .with("ErrorSource", s(&job_path(&job.id).to_wmi()))
        .with("ErrorSourceFormat", u16v(2))
        .with("CIMStatusCode", CimValue::Uint32(1))
        .with("CIMStatusCodeDescription", s("CIM_ERR_FAILED"))
}

/// An association instance between two objects.
fn association(class: &str, role1: &str, p1: &ObjectPath, role2: &str, p2: &ObjectPath) -> Object {
    let path = ObjectPath::new(class)
        .with_key(role1, KeyValue::Reference(Box::new(p1.clone())))
        .with_key(role2, KeyValue::Reference(Box::new(p2.clone())));
    (path.clone(), keyed(&path))
}

/// Every association instance: (class, role 1, path 1, role 2, path 2) as objects.
pub fn associations(snap: &Snapshot) -> Vec<Object> {
    let host = host_path(&snap.host);
    let svc = service_path(&snap.host);
    let esd = "Msvm_ElementSettingData";
    let mut out = vec![
        association("Msvm_HostedService", "Antecedent", &host, "Dependent", &svc),
        association(
            "Msvm_HostedService",
            "Antecedent",
            &host,
            "Dependent",
            &management_service_path(&snap.host),
        ),
        association(
            esd,
            "ManagedElement",
            &svc,
            "SettingData",
            &service_settings_path(&snap.host),
        ),
    ];
    for e in &snap.authorization {
        out.push(association(
            esd,
            "ManagedElement",
            &svc,
            "SettingData",
            &authorization_path(&e.allowed_primary_host_system),
        ));
    }
    for (vm, rel) in &snap.vms {
        let vp = vm_path(vm.id);
        out.push(association(
            esd,
            "ManagedElement",
            &vp,
            "SettingData",
            &rsd_path(vm.id),
        ));
        for i in 0..vm.disks.len() {
            out.push(association(
                esd,
                "ManagedElement",
                &vp,
                "SettingData",
                &sasd_path(vm.id, i),
            ));
        }
        if rel.is_some() {
            let rp = relationship_path(vm.id);
            out.push(association(
                "Msvm_SystemReplicationRelationship",
                "Antecedent",
                &vp,
                "Dependent",
                &rp,
            ));
        }
        if let Some(t) = snap.test_systems.iter().find(|t| t.replica_vm == vm.id) {
            out.push(association(
                "Msvm_ReplicaSystemDependency",
                "Antecedent",
                &vp,
                "Dependent",
                &vm_path(t.test_vm),
            ));
        }
        for (_, f) in snap.failover_network.iter().filter(|(v, _)| *v == vm.id) {
            out.push(association(
                esd,
                "ManagedElement",
                &vp,
                "SettingData",
                &failover_network_path(vm.id, f),
            ));
        }
        for p in snap.points.iter().filter(|p| p.vm == vm.id) {
            let pp = recovery_point_path(vm.id, p.sequence);
            out.push(association(
                "Msvm_SnapshotOfVirtualSystem",
                "Antecedent",
                &vp,
                "Dependent",
                &pp,
            ));
        }
    }
    out
}

/// Every instance of exactly `class` (no subclass expansion; the caller filters).
pub fn instances_of(
    snap: &Snapshot,
    class: &str,
    health: &dyn Fn(&VmRow, Option<&RelationshipRow>) -> u16,
) -> Vec<Object> {
    let is = |name: &str| class.eq_ignore_ascii_case(name);
    if is(CS) {
        let mut v = vec![host_system(snap)];
        v.extend(
            snap.vms
                .iter()
                .map(|(vm, rel)| vm_system(vm, rel.as_ref(), health(vm, rel.as_ref()))),
        );
        return v;
    }
    if is("Msvm_ReplicationService") {
        return vec![replication_service(snap)];
    }
    if is("Msvm_VirtualSystemManagementService") {
        return vec![management_service(snap)];
    }
    if is("Msvm_ReplicationSettingData") {
        return snap
            .vms
            .iter()
            .map(|(vm, rel)| replication_setting_data(&snap.host, vm, rel.as_ref()))
            .collect();
    }
    if is("Msvm_ReplicationRelationship") {
        return snap
            .vms
            .iter()
            .filter_map(|(vm, rel)| {
                rel.as_ref()
                    .map(|r| relationship(vm, r, health(vm, Some(r))))
            })
            .collect();
    }
    if is("Msvm_StorageAllocationSettingData") {
        return snap
            .vms
            .iter()
            .flat_map(|(vm, _)| (0..vm.disks.len()).map(move |i| storage_allocation(vm, i)))
            .collect();
    }
    if is("Msvm_ReplicationServiceSettingData") {
        return vec![service_setting_data(&snap.host, &snap.service_settings)];
    }
    if is("Msvm_ReplicationAuthorizationSettingData") {
        return snap.authorization.iter().map(authorization_entry).collect();
    }
    if is("Msvm_ReplicationProvider") {
        return vec![provider(snap)];
    }
    if is("Msvm_ConcreteJob") {
        return snap.jobs.iter().map(concrete_job).collect();
    }
    if is("Msvm_VirtualSystemSettingData") {
        return snap
            .vms
            .iter()
            .flat_map(|(vm, _)| {
                snap.points
                    .iter()
                    .filter(move |p| p.vm == vm.id)
                    .map(move |p| recovery_point(vm, p))
            })
            .collect();
    }
    if super::schema::association_roles(class).is_some() {
        return associations(snap)
            .into_iter()
            .filter(|(p, _)| p.class_name.eq_ignore_ascii_case(class))
            .collect();
    }
    if is("Msvm_FailoverNetworkAdapterSettingData") {
        return snap
            .failover_network
            .iter()
            .map(|(vm, f)| failover_network_setting_data(*vm, f))
            .collect();
    }
    // Msvm_Error and Msvm_ReplicationStatistics are only returned embedded.
    Vec::new()
}
