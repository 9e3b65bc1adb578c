//! The class declarations served by GetClass / EnumerateClasses, in `root/virtualization/v2`.
//!
//! Names, property types and method signatures follow spec §1-§11 (MOF declaration order for
//! parameters). wbemcli and pywbemcli fetch the class before every method call and type the
//! parameters from it; the method dispatcher types untyped request values with the same declarations.

use std::sync::OnceLock;

use cim::{CimClass, CimType, MethodDecl, ParamDecl, PropertyDecl, Qualifier};

pub const NAMESPACE: &str = "root/virtualization/v2";

use CimType::{
    Boolean as B, Datetime as DT, String as S, Uint16 as U16, Uint32 as U32, Uint64 as U64,
};

/// Every class of the namespace.
pub fn classes() -> &'static [CimClass] {
    static CLASSES: OnceLock<Vec<CimClass>> = OnceLock::new();
    CLASSES.get_or_init(build)
}

/// The class named `name` (case-insensitive).
pub fn class(name: &str) -> Option<&'static CimClass> {
    classes().iter().find(|c| c.name.eq_ignore_ascii_case(name))
}

/// True when `class_name` is `filter` or directly derives from it.
pub fn is_a(class_name: &str, filter: &str) -> bool {
    if class_name.eq_ignore_ascii_case(filter) {
        return true;
    }
    class(class_name)
        .and_then(|c| c.superclass.as_deref())
        .is_some_and(|s| s.eq_ignore_ascii_case(filter))
}

struct ClassBuilder(CimClass);

fn class_decl(name: &str, superclass: &str) -> ClassBuilder {
    ClassBuilder(CimClass {
        name: name.into(),
        superclass: Some(superclass.into()),
        qualifiers: vec![
            Qualifier::boolean("dynamic"),
            Qualifier::string("provider", "vmreplicad"),
        ],
        properties: Vec::new(),
        methods: Vec::new(),
    })
}

fn prop(name: &str, ty: CimType, is_array: bool, qualifiers: Vec<Qualifier>) -> PropertyDecl {
    PropertyDecl {
        name: name.into(),
        ty,
        is_array,
        reference_class: None,
        qualifiers,
        class_origin: None,
        propagated: false,
    }
}

impl ClassBuilder {
    fn key(mut self, name: &str) -> Self {
        self.0
            .properties
            .push(prop(name, S, false, vec![Qualifier::boolean("Key")]));
        self
    }
    fn key_ref(mut self, name: &str, class: &str) -> Self {
        let mut p = prop(
            name,
            CimType::Reference,
            false,
            vec![Qualifier::boolean("Key")],
        );
        p.reference_class = Some(class.into());
        self.0.properties.push(p);
        self
    }
    fn props(mut self, ty: CimType, names: &[&str]) -> Self {
        for n in names {
            self.0.properties.push(prop(n, ty, false, Vec::new()));
        }
        self
    }
    fn arrays(mut self, ty: CimType, names: &[&str]) -> Self {
        for n in names {
            self.0.properties.push(prop(n, ty, true, Vec::new()));
        }
        self
    }
    /// A string array whose entries name instances of `class` (InstanceIDs or object paths; spec
    /// §6: `HyperVEmbeddedInstance`, not DSP0004's `EmbeddedInstance`: they are not instances).
    fn named_array(mut self, name: &str, class: &str) -> Self {
        let q = vec![
            Qualifier::string("HyperVEmbeddedInstance", class),
            Qualifier::string("ArrayType", "Indexed"),
        ];
        self.0.properties.push(prop(name, S, true, q));
        self
    }
    fn method(mut self, name: &str, params: Vec<ParamDecl>) -> Self {
        self.0.methods.push(MethodDecl {
            name: name.into(),
            return_type: U32,
            params,
            qualifiers: Vec::new(),
            class_origin: None,
            propagated: false,
        });
        self
    }
    fn done(self) -> CimClass {
        self.0
    }
}

fn param(
    name: &str,
    ty: CimType,
    is_array: bool,
    dir: &str,
    extra: Option<Qualifier>,
) -> ParamDecl {
    let mut qualifiers = vec![Qualifier::boolean(dir)];
    qualifiers.extend(extra);
    ParamDecl {
        name: name.into(),
        ty,
        is_array,
        reference_class: None,
        qualifiers,
    }
}

fn input(name: &str, ty: CimType) -> ParamDecl {
    param(name, ty, false, "In", None)
}

fn input_ei(name: &str, class: &str) -> ParamDecl {
    param(
        name,
        S,
        false,
        "In",
        Some(Qualifier::string("EmbeddedInstance", class)),
    )
}

fn output_ei_array(name: &str, class: &str) -> ParamDecl {
    param(
        name,
        S,
        true,
        "Out",
        Some(Qualifier::string("EmbeddedInstance", class)),
    )
}

fn reference(name: &str, class: &str, dir: &str) -> ParamDecl {
    let mut p = param(name, CimType::Reference, false, dir, None);
    p.reference_class = Some(class.into());
    p
}

fn vm() -> ParamDecl {
    reference("ComputerSystem", "CIM_ComputerSystem", "In")
}

fn job() -> ParamDecl {
    reference("Job", "CIM_ConcreteJob", "Out")
}

fn managed_element(b: ClassBuilder) -> ClassBuilder {
    b.props(S, &["Caption", "Description", "ElementName"])
}

fn replication_service() -> CimClass {
    let b = class_decl("Msvm_ReplicationService", "CIM_Service")
        .key("CreationClassName")
        .key("Name")
        .key("SystemCreationClassName")
        .key("SystemName");
    managed_element(b)
        .props(
            U16,
            &[
                "EnabledState",
                "RequestedState",
                "HealthState",
                "EnabledDefault",
            ],
        )
        .arrays(U16, &["OperationalStatus"])
        .arrays(S, &["StatusDescriptions"])
        .props(B, &["Started"])
        .props(S, &["StartMode", "PrimaryOwnerName"])
        .method(
            "ModifyServiceSettings",
            vec![
                input_ei("SettingData", "Msvm_ReplicationServiceSettingData"),
                job(),
            ],
        )
        .method(
            "AddAuthorizationEntry",
            vec![input_ei("AuthorizationEntry", AUTH), job()],
        )
        .method(
            "ModifyAuthorizationEntry",
            vec![input_ei("AuthorizationEntry", AUTH), job()],
        )
        .method(
            "RemoveAuthorizationEntry",
            vec![input("AllowedPrimaryHostSystem", S), job()],
        )
        .method(
            "SetAuthorizationEntry",
            vec![vm(), input_ei("AuthorizationEntry", AUTH), job()],
        )
        .method(
            "TestReplicationConnection",
            vec![
                input("RecoveryConnectionPoint", S),
                input("RecoveryServerPortNumber", U16),
                input("AuthenticationType", U16),
                input("CertificateThumbPrint", S),
                input("BypassProxyServer", B),
                job(),
            ],
        )
        .method(
            "GetSystemCertificates",
            vec![param("EncodedCertificates", S, true, "Out", None)],
        )
        .method(
            "CreateReplicationRelationship",
            vec![vm(), input_ei("ReplicationSettingData", RSD), job()],
        )
        .method(
            "ModifyReplicationSettings",
            vec![vm(), input_ei("ReplicationSettingData", RSD), job()],
        )
        .method("RemoveReplicationRelationship", vec![vm(), job()])
        .method(
            "RemoveReplicationRelationshipEx",
            vec![vm(), input_ei("ReplicationRelationship", REL), job()],
        )
        .method(
            "StartReplication",
            vec![
                vm(),
                input("InitialReplicationType", U16),
                input("InitialReplicationExportLocation", S),
                input("StartTime", DT),
                job(),
            ],
        )
        .method(
            "ImportInitialReplica",
            vec![vm(), input("InitialReplicationImportLocation", S), job()],
        )
        .method("InitiateFailover", vec![vm(), snapshot(), job()])
        .method("RevertFailover", vec![vm(), job()])
        .method("CommitFailover", vec![vm(), job()])
        .method(
            "ReverseReplicationRelationship",
            vec![vm(), input_ei("ReplicationSettingData", RSD), job()],
        )
        .method(
            "TestReplicaSystem",
            vec![
                vm(),
                snapshot(),
                reference("ResultingSystem", "CIM_ComputerSystem", "Out"),
                job(),
            ],
        )
        .method("Resynchronize", vec![vm(), input("StartTime", DT), job()])
        .method(
            "SetFailoverNetworkAdapterSettings",
            vec![
                vm(),
                param(
                    "NetworkSettings",
                    S,
                    true,
                    "In",
                    Some(Qualifier::string(
                        "EmbeddedInstance",
                        "Msvm_FailoverNetworkAdapterSettingData",
                    )),
                ),
                job(),
            ],
        )
        .method(
            "GetReplicationStatistics",
            vec![vm(), stats_out(), health_out(), job()],
        )
        .method(
            "GetReplicationStatisticsEx",
            vec![
                vm(),
                input_ei("ReplicationRelationship", REL),
                stats_out(),
                health_out(),
                job(),
            ],
        )
        .method("ResetReplicationStatistics", vec![vm(), job()])
        .method(
            "ResetReplicationStatisticsEx",
            vec![vm(), input_ei("ReplicationRelationship", REL), job()],
        )
        .method(
            "ChangeReplicationModeToPrimary",
            vec![vm(), input_ei("ReplicationRelationship", REL), job()],
        )
        .method(
            "InitiateFailback",
            vec![
                vm(),
                input_ei("ReplicationSettingData", RSD),
                input("RecoveryPointIdentifier", S),
                job(),
            ],
        )
        .method(
            "RequestStateChange",
            vec![
                input("RequestedState", U16),
                job(),
                input("TimeoutPeriod", DT),
            ],
        )
        .method("StartService", Vec::new())
        .method("StopService", Vec::new())
        .done()
}

const AUTH: &str = "Msvm_ReplicationAuthorizationSettingData";
const RSD: &str = "Msvm_ReplicationSettingData";
const REL: &str = "Msvm_ReplicationRelationship";

fn snapshot() -> ParamDecl {
    reference("SnapshotSettingData", "CIM_VirtualSystemSettingData", "In")
}

fn stats_out() -> ParamDecl {
    output_ei_array("ReplicationStatistics", "Msvm_ReplicationStatistics")
}

fn health_out() -> ParamDecl {
    output_ei_array("ReplicationHealthIssues", "Msvm_Error")
}

fn computer_system() -> CimClass {
    let b = class_decl("Msvm_ComputerSystem", "CIM_ComputerSystem")
        .key("CreationClassName")
        .key("Name");
    managed_element(b)
        .props(U16, &["EnabledState", "RequestedState", "HealthState"])
        .arrays(U16, &["OperationalStatus"])
        .props(DT, &["InstallDate", "TimeOfLastStateChange"])
        .props(
            U16,
            &[
                "ReplicationMode",
                "ReplicationState",
                "ReplicationHealth",
                "FailedOverReplicationType",
                "LastReplicationType",
            ],
        )
        .props(
            DT,
            &[
                "LastReplicationTime",
                "LastApplicationConsistentReplicationTime",
                "LastSuccessfulBackupTime",
            ],
        )
        .method(
            "RequestStateChange",
            vec![
                input("RequestedState", U16),
                job(),
                input("TimeoutPeriod", DT),
            ],
        )
        .method(
            "RequestReplicationStateChange",
            vec![
                input("RequestedState", U16),
                job(),
                input("TimeoutPeriod", DT),
            ],
        )
        .method(
            "RequestReplicationStateChangeEx",
            vec![
                input_ei("ReplicationRelationship", REL),
                input("RequestedState", U16),
                job(),
                input("TimeoutPeriod", DT),
            ],
        )
        .done()
}

fn replication_setting_data() -> CimClass {
    let b = class_decl(RSD, "CIM_VirtualSystemSettingData").key("InstanceID");
    managed_element(b)
        .props(S, &["VirtualSystemType", "VirtualSystemIdentifier"])
        .props(U16, &["AuthenticationType"])
        .props(S, &["CertificateThumbPrint", "RootCertificateThumbPrint"])
        .props(B, &["CompressionEnabled", "BypassProxyServer"])
        .props(
            S,
            &[
                "RecoveryConnectionPoint",
                "RecoveryHostSystem",
                "PrimaryConnectionPoint",
                "PrimaryHostSystem",
            ],
        )
        .props(U16, &["RecoveryServerPortNumber"])
        .props(B, &["ReplicateHostKvpItems"])
        .props(
            U16,
            &["ApplicationConsistentSnapshotInterval", "RecoveryHistory"],
        )
        .named_array("IncludedDisks", "CIM_StorageAllocationSettingData")
        .props(B, &["AutoResynchronizeEnabled"])
        .props(
            DT,
            &[
                "AutoResynchronizeIntervalStart",
                "AutoResynchronizeIntervalEnd",
            ],
        )
        .props(B, &["EnableWriteOrderPreservationAcrossDisks"])
        .props(S, &["ReplicationProvider"])
        .props(U16, &["ReplicationInterval"])
        .props(S, &["AdditionalSettings"])
        .done()
}

fn replication_relationship() -> CimClass {
    let b = class_decl(REL, "CIM_ManagedSystemElement").key("InstanceID");
    managed_element(b)
        .props(
            U16,
            &[
                "ReplicationState",
                "ReplicationHealth",
                "FailedOverReplicationType",
                "LastReplicationType",
            ],
        )
        .props(
            DT,
            &[
                "LastReplicationTime",
                "LastApplyTime",
                "LastApplicationConsistentReplicationTime",
            ],
        )
        .done()
}

fn service_setting_data() -> CimClass {
    let b = class_decl("Msvm_ReplicationServiceSettingData", "CIM_SettingData").key("InstanceID");
    managed_element(b)
        .props(B, &["RecoveryServerEnabled"])
        .props(U16, &["AllowedAuthenticationType"])
        .props(S, &["CertificateThumbPrint"])
        .props(U16, &["HttpPort", "HttpsPort"])
        .props(U32, &["MonitoringInterval"])
        .props(DT, &["MonitoringStartTime"])
        .done()
}

fn authorization_setting_data() -> CimClass {
    let b = class_decl(AUTH, "CIM_SettingData").key("InstanceID");
    managed_element(b)
        .props(
            S,
            &[
                "AllowedPrimaryHostSystem",
                "TrustGroup",
                "ReplicaStorageLocation",
            ],
        )
        .done()
}

fn provider() -> CimClass {
    let b = class_decl("Msvm_ReplicationProvider", "CIM_ManagedSystemElement").key("InstanceID");
    managed_element(b)
        .props(S, &["Name"])
        .arrays(U16, &["OperationalStatus"])
        .done()
}

fn concrete_job() -> CimClass {
    let b = class_decl("Msvm_ConcreteJob", "CIM_ConcreteJob").key("InstanceID");
    managed_element(b)
        .props(
            S,
            &[
                "Name",
                "JobStatus",
                "Owner",
                "ErrorDescription",
                "ErrorSummaryDescription",
            ],
        )
        .props(
            U16,
            &[
                "JobType",
                "JobState",
                "PercentComplete",
                "ErrorCode",
                "HealthState",
            ],
        )
        .arrays(U16, &["OperationalStatus"])
        .props(
            DT,
            &[
                "TimeSubmitted",
                "StartTime",
                "ScheduledStartTime",
                "ElapsedTime",
                "TimeOfLastStateChange",
                "TimeBeforeRemoval",
            ],
        )
        .props(B, &["DeleteOnCompletion", "Cancellable"])
        .method(
            "RequestStateChange",
            vec![input("RequestedState", U16), input("TimeoutPeriod", DT)],
        )
        .method(
            "GetError",
            vec![param(
                "Error",
                S,
                false,
                "Out",
                Some(Qualifier::string("EmbeddedInstance", "Msvm_Error")),
            )],
        )
        .method("GetErrorEx", vec![output_ei_array("Errors", "Msvm_Error")])
        .done()
}

fn error_class() -> CimClass {
    class_decl("Msvm_Error", "CIM_Error")
        .props(U16, &["ErrorType"])
        .props(
            S,
            &["OtherErrorType", "OwningEntity", "MessageID", "Message"],
        )
        .arrays(S, &["MessageArguments"])
        .props(U16, &["PerceivedSeverity", "ProbableCause"])
        .props(S, &["ProbableCauseDescription"])
        .arrays(S, &["RecommendedActions"])
        .props(S, &["ErrorSource"])
        .props(U16, &["ErrorSourceFormat"])
        .props(S, &["OtherErrorSourceFormat"])
        .props(U32, &["CIMStatusCode"])
        .props(S, &["CIMStatusCodeDescription"])
        .done()
}

fn statistics() -> CimClass {
    let b =
        class_decl("Msvm_ReplicationStatistics", "CIM_ManagedElement").props(S, &["InstanceID"]);
    managed_element(b)
        .props(DT, &["StartStatisticTime", "EndStatisticTime"])
        .props(U32, &["ReplicationSuccessCount"])
        .props(U64, &["ReplicationSize", "MaxReplicationSize"])
        .props(
            U32,
            &[
                "ReplicationLatency",
                "MaxReplicationLatency",
                "ReplicationMissCount",
            ],
        )
        .props(
            U32,
            &[
                "NetworkFailureCount",
                "ReplicationFailureCount",
                "ApplicationConsistentSnapshotFailureCount",
            ],
        )
        .props(U64, &["PendingReplicationSize"])
        .props(U32, &["ReplicationHealth"])
        .props(DT, &["LastTestFailoverTime"])
        .done()
}

fn virtual_system_setting_data() -> CimClass {
    let b = class_decl(
        "Msvm_VirtualSystemSettingData",
        "CIM_VirtualSystemSettingData",
    )
    .key("InstanceID");
    managed_element(b)
        .props(
            S,
            &["VirtualSystemType", "VirtualSystemIdentifier", "Parent"],
        )
        .props(DT, &["CreationTime"])
        .done()
}

fn storage_allocation_setting_data() -> CimClass {
    let b = class_decl(
        "Msvm_StorageAllocationSettingData",
        "CIM_StorageAllocationSettingData",
    )
    .key("InstanceID");
    managed_element(b)
        .props(U16, &["ResourceType"])
        .props(S, &["ResourceSubType", "Parent"])
        .arrays(S, &["HostResource"])
        .done()
}

fn failover_network_adapter_setting_data() -> CimClass {
    let b =
        class_decl("Msvm_FailoverNetworkAdapterSettingData", "CIM_SettingData").key("InstanceID");
    managed_element(b)
        .props(U16, &["ProtocolIFType"])
        .props(B, &["DHCPEnabled"])
        .arrays(
            S,
            &["IPAddresses", "Subnets", "DefaultGateways", "DNSServers"],
        )
        .done()
}

fn management_service() -> CimClass {
    let b = class_decl(
        "Msvm_VirtualSystemManagementService",
        "CIM_VirtualSystemManagementService",
    )
    .key("CreationClassName")
    .key("Name")
    .key("SystemCreationClassName")
    .key("SystemName");
    managed_element(b)
        .props(U16, &["EnabledState", "HealthState"])
        .method(
            "DefineSystem",
            vec![
                input_ei("SystemSettings", "Msvm_VirtualSystemSettingData"),
                param(
                    "ResourceSettings",
                    S,
                    true,
                    "In",
                    Some(Qualifier::string(
                        "EmbeddedInstance",
                        "Msvm_StorageAllocationSettingData",
                    )),
                ),
                reference(
                    "ReferenceConfiguration",
                    "CIM_VirtualSystemSettingData",
                    "In",
                ),
                reference("ResultingSystem", "CIM_ComputerSystem", "Out"),
                job(),
            ],
        )
        .method(
            "DestroySystem",
            vec![
                reference("AffectedSystem", "CIM_ComputerSystem", "In"),
                job(),
            ],
        )
        .done()
}

/// The association classes: (name, superclass, first role, its class, second role, its class).
const ASSOCIATIONS: &[(&str, &str, &str, &str, &str, &str)] = &[
    (
        "Msvm_SystemReplicationRelationship",
        "CIM_Dependency",
        "Antecedent",
        "CIM_ComputerSystem",
        "Dependent",
        REL,
    ),
    (
        "Msvm_ReplicaSystemDependency",
        "CIM_Dependency",
        "Antecedent",
        "CIM_ComputerSystem",
        "Dependent",
        "CIM_ComputerSystem",
    ),
    (
        "Msvm_ElementSettingData",
        "CIM_ElementSettingData",
        "ManagedElement",
        "CIM_ManagedElement",
        "SettingData",
        "CIM_SettingData",
    ),
    (
        "Msvm_HostedService",
        "CIM_HostedService",
        "Antecedent",
        "CIM_System",
        "Dependent",
        "CIM_Service",
    ),
    (
        "Msvm_SnapshotOfVirtualSystem",
        "CIM_SnapshotOfVirtualSystem",
        "Antecedent",
        "CIM_ComputerSystem",
        "Dependent",
        "CIM_VirtualSystemSettingData",
    ),
];

/// Role names of an association class, if `name` is one.
pub fn association_roles(name: &str) -> Option<(&'static str, &'static str)> {
    ASSOCIATIONS
        .iter()
        .find(|a| a.0.eq_ignore_ascii_case(name))
        .map(|a| (a.2, a.4))
}

fn association(a: &(&str, &str, &str, &str, &str, &str)) -> CimClass {
    let mut c = class_decl(a.0, a.1)
        .key_ref(a.2, a.3)
        .key_ref(a.4, a.5)
        .done();
    c.qualifiers.push(Qualifier::boolean("Association"));
    c
}

fn build() -> Vec<CimClass> {
    let mut v = vec![
        replication_service(),
        computer_system(),
        replication_setting_data(),
        replication_relationship(),
        service_setting_data(),
        authorization_setting_data(),
        provider(),
        concrete_job(),
        error_class(),
        statistics(),
        virtual_system_setting_data(),
        storage_allocation_setting_data(),
        failover_network_adapter_setting_data(),
        management_service(),
    ];
    v.extend(ASSOCIATIONS.iter().map(association));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replication_service_declares_the_26_methods_of_the_spec_plus_the_inherited_stubs() {
        let svc = class("msvm_replicationservice").expect("declared");
        let spec_methods = [
            "ModifyServiceSettings",
            "AddAuthorizationEntry",
            "ModifyAuthorizationEntry",
            "RemoveAuthorizationEntry",
            "SetAuthorizationEntry",
            "TestReplicationConnection",
            "GetSystemCertificates",
            "CreateReplicationRelationship",
            "ModifyReplicationSettings",
            "RemoveReplicationRelationship",
            "RemoveReplicationRelationshipEx",
            "StartReplication",
            "ImportInitialReplica",
            "InitiateFailover",
            "RevertFailover",
            "CommitFailover",
            "ReverseReplicationRelationship",
            "TestReplicaSystem",
            "Resynchronize",
            "SetFailoverNetworkAdapterSettings",
            "GetReplicationStatistics",
            "GetReplicationStatisticsEx",
            "ResetReplicationStatistics",
            "ResetReplicationStatisticsEx",
            "ChangeReplicationModeToPrimary",
            "InitiateFailback",
        ];
        for m in spec_methods {
            let decl = svc.method(m).unwrap_or_else(|| panic!("{m} missing"));
            let has_job = decl.param("Job").is_some();
            assert_eq!(
                has_job,
                m != "GetSystemCertificates",
                "{m}: every method but GetSystemCertificates has Job"
            );
        }
        assert_eq!(svc.methods.len(), 26 + 3);
    }

    #[test]
    fn initiate_failback_parameters_are_in_mof_order() {
        let m = class("Msvm_ReplicationService")
            .and_then(|c| c.method("InitiateFailback"))
            .expect("declared");
        let names: Vec<&str> = m.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ComputerSystem",
                "ReplicationSettingData",
                "RecoveryPointIdentifier",
                "Job"
            ]
        );
        assert!(m.params[3].is_out() && !m.params[3].is_in());
    }

    #[test]
    fn subclass_filter_matches_the_direct_superclass() {
        assert!(is_a("Msvm_ComputerSystem", "CIM_ComputerSystem"));
        assert!(is_a("Msvm_ComputerSystem", "msvm_computersystem"));
        assert!(!is_a("Msvm_ComputerSystem", "Msvm_ReplicationService"));
    }
}
