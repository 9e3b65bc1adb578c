//! Extrinsic method calls: typing the parameters from the class declaration, turning the call into
//! a [`Command`], and rendering the [`CommandOutput`] as the method's return value and out parameters.
//!
//! Protocol-level problems (unknown method or parameter, a value that is not of the declared type,
//! an embedded instance that does not parse, a reference to a missing object) are CIM errors with a
//! description. Problems with what the values mean (ReplicationInterval 60, a state that does not
//! allow the operation) are the method's documented return codes (32773, 32775, ...).

use cim::{
    parse_embedded_instance, CimDateTime, CimError, CimInstance, CimStatusCode, CimType, CimValue,
    KeyValue, MethodDecl, ObjectPath, OutParam, ParamData, ParamDecl, ParamValue,
};
use vmreplica_core::codes::ReturnCode;
use vmreplica_core::command::{
    Command, CommandError, CommandOutput, OperationArgs, PowerControl, VmDefinition,
};
use vmreplica_core::job::JobStateRequest;
use vmreplica_core::machine::{Operation, RequestedState};
use vmreplica_core::settings::{
    AuthorizationEntry, FailoverNetworkSettings, ReplicationSettings, ServiceSettings,
};
use vmreplica_core::state::InitialReplicationType;

use super::objects::{self, vm_name};
use super::schema;
use crate::service::Service;

/// One typed input parameter.
#[derive(Debug, Clone)]
enum Arg {
    Value(CimValue),
    Instance(CimInstance),
    Instances(Vec<CimInstance>),
    Ref(ObjectPath),
}

struct Args {
    method: String,
    values: Vec<(String, Arg)>,
}

fn invalid_param(msg: impl Into<String>) -> CimError {
    CimError::new(CimStatusCode::InvalidParameter, msg)
}

fn embedded_class(decl: &ParamDecl) -> Option<&str> {
    decl.qualifiers
        .iter()
        .find(|q| q.name.eq_ignore_ascii_case("EmbeddedInstance"))
        .and_then(|q| q.value.as_str())
}

fn embedded(decl: &ParamDecl, text: &str) -> Result<CimInstance, CimError> {
    let inst = parse_embedded_instance(text).map_err(|e| {
        invalid_param(format!(
            "{}: the embedded instance is not valid: {e}",
            decl.name
        ))
    })?;
    of_class(decl, inst)
}

/// `inst`, if it is an instance of the class `decl`'s EmbeddedInstance qualifier names.
fn of_class(decl: &ParamDecl, inst: CimInstance) -> Result<CimInstance, CimError> {
    if let Some(class) = embedded_class(decl) {
        let fits =
            schema::is_a(&inst.class_name, class) || inst.class_name.eq_ignore_ascii_case(class);
        if !fits {
            return Err(invalid_param(format!(
                "{}: expected an instance of {class}, got {}",
                decl.name, inst.class_name
            )));
        }
    }
    Ok(inst)
}

fn typed(decl: &ParamDecl, pv: &ParamValue) -> Result<Option<Arg>, CimError> {
    let name = &decl.name;
    let scalar = |text: &str| {
        CimValue::parse_scalar(decl.ty, text).map_err(|e| invalid_param(format!("{name}: {e}")))
    };
    let arg = match (&pv.data, decl.ty, decl.is_array) {
        (ParamData::Null, _, _) => return Ok(None),
        (ParamData::Reference(p) | ParamData::InstanceName(p), CimType::Reference, false) => {
            Arg::Ref(p.clone())
        }
        (ParamData::Value(text), CimType::Reference, false) => Arg::Ref(
            ObjectPath::parse_wmi(text)
                .map_err(|e| invalid_param(format!("{name}: not an object path: {e}")))?,
        ),
        (ParamData::Instance(i), CimType::String, false) if embedded_class(decl).is_some() => {
            Arg::Instance(of_class(decl, i.clone())?)
        }
        (ParamData::Value(text), CimType::String, false) if embedded_class(decl).is_some() => {
            Arg::Instance(embedded(decl, text)?)
        }
        (ParamData::ValueArray(items), CimType::String, true) if embedded_class(decl).is_some() => {
            Arg::Instances(
                items
                    .iter()
                    .flatten()
                    .map(|t| embedded(decl, t))
                    .collect::<Result<_, _>>()?,
            )
        }
        (ParamData::Value(text), ty, false) if ty != CimType::Reference => {
            Arg::Value(scalar(text)?)
        }
        (ParamData::ValueArray(items), ty, true) if ty != CimType::Reference => {
            Arg::Value(CimValue::Array(
                ty,
                items
                    .iter()
                    .flatten()
                    .map(|t| scalar(t))
                    .collect::<Result<_, _>>()?,
            ))
        }
        _ => {
            let kind = if decl.is_array {
                "an array"
            } else {
                "a single value"
            };
            return Err(invalid_param(format!(
                "{name}: expected {kind} of type {}",
                decl.ty.as_str()
            )));
        }
    };
    Ok(Some(arg))
}

impl Args {
    fn parse(decl: &MethodDecl, params: &[ParamValue]) -> Result<Args, CimError> {
        let mut values = Vec::new();
        for pv in params {
            let p = decl.param(&pv.name).ok_or_else(|| {
                invalid_param(format!("{} has no parameter '{}'", decl.name, pv.name))
            })?;
            if !p.is_in() {
                return Err(invalid_param(format!(
                    "{}: '{}' is an output parameter",
                    decl.name, p.name
                )));
            }
            if let Some(arg) = typed(p, pv)? {
                values.push((p.name.clone(), arg));
            }
        }
        Ok(Args {
            method: decl.name.clone(),
            values,
        })
    }

    fn get(&self, name: &str) -> Option<&Arg> {
        self.values
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, a)| a)
    }

    fn missing(&self, name: &str) -> CommandError {
        CommandError::new(
            ReturnCode::InvalidParameter,
            format!("{}: the {name} parameter is required", self.method),
        )
    }

    fn value(&self, name: &str) -> Option<&CimValue> {
        match self.get(name) {
            Some(Arg::Value(v)) => Some(v),
            _ => None,
        }
    }

    fn string(&self, name: &str) -> Option<String> {
        self.value(name)
            .and_then(CimValue::as_str)
            .map(str::to_string)
    }

    fn u16(&self, name: &str) -> Option<u16> {
        self.value(name)
            .and_then(CimValue::as_u64)
            .and_then(|v| u16::try_from(v).ok())
    }

    fn instance(&self, name: &str) -> Result<&CimInstance, CommandError> {
        match self.get(name) {
            Some(Arg::Instance(i)) => Ok(i),
            _ => Err(self.missing(name)),
        }
    }

    fn reference(&self, name: &str) -> Option<&ObjectPath> {
        match self.get(name) {
            Some(Arg::Ref(p)) => Some(p),
            _ => None,
        }
    }

    /// The VM named by the `ComputerSystem` REF (by its `Name` key, the VM's GUID).
    fn vm(&self, svc: &Service) -> Result<String, MethodError> {
        let path = self
            .reference("ComputerSystem")
            .ok_or_else(|| self.missing("ComputerSystem"))?;
        vm_from_path(svc, path, "ComputerSystem")
    }

    fn unix_time(&self, name: &str) -> Result<Option<i64>, CommandError> {
        match self.value(name) {
            None => Ok(None),
            Some(CimValue::Datetime(dt)) => dt.to_unix().map(|(s, _)| Some(s)).ok_or_else(|| {
                CommandError::new(
                    ReturnCode::InvalidParameter,
                    format!("{name} must be a point in time, not an interval"),
                )
            }),
            Some(_) => Err(CommandError::new(
                ReturnCode::IncorrectDataType,
                format!("{name} must be a datetime"),
            )),
        }
    }
}

/// Either a CIM error (protocol level) or a return code (method level).
pub enum MethodError {
    Cim(CimError),
    Command(CommandError),
}

impl From<CimError> for MethodError {
    fn from(e: CimError) -> Self {
        MethodError::Cim(e)
    }
}

impl From<CommandError> for MethodError {
    fn from(e: CommandError) -> Self {
        MethodError::Command(e)
    }
}

fn vm_from_path(svc: &Service, path: &ObjectPath, what: &str) -> Result<String, MethodError> {
    if !schema::is_a(&path.class_name, "CIM_ComputerSystem") {
        return Err(invalid_param(format!(
            "{what} must reference an Msvm_ComputerSystem, not {}",
            path.class_name
        ))
        .into());
    }
    let name = path
        .key_str("Name")
        .ok_or_else(|| invalid_param(format!("{what} has no Name key")))?;
    let vm = svc.resolve_vm(&name.to_string()).map_err(|_| {
        CimError::new(
            CimStatusCode::NotFound,
            format!("{what}: no virtual machine with Name '{name}' on this host"),
        )
    })?;
    Ok(vm_name(vm.id))
}

/// The result of a method: return value and out parameters.
pub type MethodResult = (CimValue, Vec<OutParam>);

/// Runs the extrinsic method `method` on `target`.
pub async fn call(
    svc: &Service,
    target: &ObjectPath,
    method: &str,
    params: &[ParamValue],
) -> Result<MethodResult, CimError> {
    let class = schema::class(&target.class_name).ok_or_else(|| {
        CimError::new(
            CimStatusCode::InvalidClass,
            format!("no class '{}' in this namespace", target.class_name),
        )
    })?;
    let decl = class.method(method).ok_or_else(|| {
        CimError::new(
            CimStatusCode::MethodNotFound,
            format!("{} has no method '{method}'", class.name),
        )
    })?;
    let args = Args::parse(decl, params)?;
    let outcome = dispatch(svc, &class.name, target, &args).await;
    let result = match outcome {
        Ok(out) => render(decl, out),
        Err(MethodError::Cim(e)) => return Err(e),
        Err(MethodError::Command(e)) => {
            tracing::warn!(method = %decl.name, code = e.code, "method refused: {}", e.message);
            (CimValue::Uint32(e.code), Vec::new())
        }
    };
    Ok(result)
}

/// Out parameters are sent only when they have a value: sblim-wbemcli crashes on a
/// PARAMVALUE without a value, and DSP0200 lets a server omit them.
fn set_out(outs: &mut Vec<OutParam>, decl: &MethodDecl, name: &str, value: CimValue) {
    if let Some(p) = decl.param(name).filter(|p| p.is_out()) {
        outs.push(OutParam {
            name: p.name.clone(),
            ty: p.ty,
            is_array: p.is_array,
            value: Some(value),
            embedded_object: embedded_class(p).is_some(),
        });
    }
}

fn render(decl: &MethodDecl, out: CommandOutput) -> MethodResult {
    let mut outs = Vec::new();
    let code = match out {
        CommandOutput::Job(job) => {
            set_out(
                &mut outs,
                decl,
                "Job",
                CimValue::Reference(objects::job_path(&job.id)),
            );
            ReturnCode::JobStarted
        }
        CommandOutput::JobWithSystem { job, system } => {
            set_out(
                &mut outs,
                decl,
                "Job",
                CimValue::Reference(objects::job_path(&job.id)),
            );
            set_out(
                &mut outs,
                decl,
                "ResultingSystem",
                CimValue::Reference(objects::vm_path(system)),
            );
            ReturnCode::JobStarted
        }
        CommandOutput::Vm(vm) => {
            set_out(
                &mut outs,
                decl,
                "ResultingSystem",
                CimValue::Reference(objects::vm_path(vm.id)),
            );
            ReturnCode::Completed
        }
        CommandOutput::Certificates { encoded } => {
            set_out(
                &mut outs,
                decl,
                "EncodedCertificates",
                string_array(encoded),
            );
            ReturnCode::Completed
        }
        CommandOutput::Statistics(st) => {
            let stats = super::stats::statistics_instance(&st);
            set_out(
                &mut outs,
                decl,
                "ReplicationStatistics",
                string_array(vec![cim::encode_instance(&stats)]),
            );
            let issues = super::stats::health_issue_instances(&st)
                .iter()
                .map(cim::encode_instance)
                .collect();
            set_out(
                &mut outs,
                decl,
                "ReplicationHealthIssues",
                string_array(issues),
            );
            ReturnCode::Completed
        }
        _ => ReturnCode::Completed,
    };
    (CimValue::Uint32(code.code()), outs)
}

fn string_array(items: Vec<String>) -> CimValue {
    CimValue::Array(
        CimType::String,
        items.into_iter().map(CimValue::String).collect(),
    )
}

async fn run(svc: &Service, cmd: Command) -> Result<CommandOutput, MethodError> {
    Ok(svc.execute(cmd).await?)
}

async fn dispatch(
    svc: &Service,
    class: &str,
    target: &ObjectPath,
    args: &Args,
) -> Result<CommandOutput, MethodError> {
    match class {
        "Msvm_ReplicationService" => {
            service_target(target, &objects::service_path(&svc.host))?;
            replication_service(svc, args).await
        }
        "Msvm_ComputerSystem" if args.method == "RequestStateChange" => {
            let vm = vm_from_path(svc, target, "the target")?;
            let requested = args
                .u16("RequestedState")
                .ok_or_else(|| args.missing("RequestedState"))?;
            run(svc, Command::SetPowerState { vm, requested }).await
        }
        "Msvm_ComputerSystem" => {
            let vm = vm_from_path(svc, target, "the target")?;
            let requested = args
                .u16("RequestedState")
                .ok_or_else(|| args.missing("RequestedState"))?;
            if args
                .method
                .eq_ignore_ascii_case("RequestReplicationStateChangeEx")
            {
                check_primary_relationship(args, &vm)?;
            }
            let requested = RequestedState::from_u16(requested).ok_or_else(|| {
                CommandError::new(
                    ReturnCode::InvalidParameter,
                    format!("RequestedState {requested} is not one of 1, 2, 3, 4, 7, 9"),
                )
            })?;
            let operation = Operation::RequestReplicationStateChange(requested);
            run(
                svc,
                Command::Replication {
                    vm,
                    operation,
                    args: OperationArgs::default(),
                },
            )
            .await
        }
        "Msvm_ConcreteJob" => concrete_job(svc, target, args).await,
        "Msvm_VirtualSystemManagementService" if args.method == "DefineSystem" => {
            service_target(target, &objects::management_service_path(&svc.host))?;
            run(svc, Command::AddVm(vm_definition(args)?)).await
        }
        "Msvm_VirtualSystemManagementService" => {
            service_target(target, &objects::management_service_path(&svc.host))?;
            let path = args
                .reference("AffectedSystem")
                .ok_or_else(|| args.missing("AffectedSystem"))?;
            let vm = vm_from_path(svc, path, "AffectedSystem")?;
            run(svc, Command::DestroySystem { vm }).await
        }
        other => Err(CimError::new(
            CimStatusCode::MethodNotAvailable,
            format!("{other} has no callable methods"),
        )
        .into()),
    }
}

/// The target of a service's method must be that service (`ours`): every key it gives must name
/// it (string keys compared without regard to case; a class path, with no keys, stands for the one
/// service). Any other is not on this host.
fn service_target(target: &ObjectPath, ours: &ObjectPath) -> Result<(), MethodError> {
    let fits = target
        .keys
        .iter()
        .all(|(name, v)| match (v, ours.key(name)) {
            (KeyValue::String(a), Some(KeyValue::String(b))) => a.eq_ignore_ascii_case(b),
            _ => false,
        });
    if fits {
        Ok(())
    } else {
        Err(CimError::new(
            CimStatusCode::NotFound,
            format!("no {} {} on this host", target.class_name, target.to_wmi()),
        )
        .into())
    }
}

/// The Ex methods name a relationship of VM `vm` (its `Name`, a GUID): `Microsoft:<VMID>\HVR\<0|1>`,
/// or none (the primary relationship). Only the primary relationship (index 0) exists here; one of
/// another VM, or no relationship at all, is an invalid parameter.
fn check_primary_relationship(args: &Args, vm: &str) -> Result<(), MethodError> {
    let Some(Arg::Instance(rel)) = args.get("ReplicationRelationship") else {
        return Ok(());
    };
    let id = rel
        .value("InstanceID")
        .and_then(CimValue::as_str)
        .unwrap_or("")
        .trim();
    if id.is_empty() {
        return Ok(());
    }
    let ours = format!("Microsoft:{}\\HVR\\", vm.trim_matches(['{', '}']));
    let index = id
        .get(..ours.len())
        .filter(|head| head.eq_ignore_ascii_case(&ours))
        .and_then(|_| id.get(ours.len()..));
    match index {
        Some("0") => Ok(()),
        Some("1") => Err(CommandError::new(
            ReturnCode::NotSupported,
            "extended replication (relationship 1) is not supported yet",
        )
        .into()),
        _ => Err(CommandError::new(
            ReturnCode::InvalidParameter,
            format!(
                "ReplicationRelationship '{id}' is not a relationship of this VM (expected {ours}0)"
            ),
        )
        .into()),
    }
}

async fn concrete_job(
    svc: &Service,
    target: &ObjectPath,
    args: &Args,
) -> Result<CommandOutput, MethodError> {
    let id = target
        .key_str("InstanceID")
        .ok_or_else(|| invalid_param("the job path has no InstanceID key"))?;
    let job = svc
        .store
        .get_job(id)
        .map_err(CommandError::from)?
        .ok_or_else(|| {
            CimError::new(
                CimStatusCode::NotFound,
                format!("no job with InstanceID '{id}'"),
            )
        })?;
    // GetError / GetErrorEx never get here: `job_errors` answers them with their out parameters.
    let requested = args
        .u16("RequestedState")
        .ok_or_else(|| args.missing("RequestedState"))?;
    match JobStateRequest::from_u16(requested) {
        Some(JobStateRequest::Terminate | JobStateRequest::Kill) => {
            run(svc, Command::CancelJob { id: job.id }).await
        }
        Some(_) => Err(CommandError::new(
            ReturnCode::NotSupported,
            "jobs can only be terminated (4) or killed (5)",
        )
        .into()),
        None => Err(CommandError::new(
            ReturnCode::InvalidParameter,
            format!("RequestedState {requested} is not 2-6"),
        )
        .into()),
    }
}

/// GetError / GetErrorEx of a job: its `Msvm_Error`s as embedded CIM-XML.
pub fn job_errors(
    svc: &Service,
    target: &ObjectPath,
    method: &str,
) -> Option<Result<MethodResult, CimError>> {
    let is_get_error =
        method.eq_ignore_ascii_case("GetError") || method.eq_ignore_ascii_case("GetErrorEx");
    if !target.class_name.eq_ignore_ascii_case("Msvm_ConcreteJob") || !is_get_error {
        return None;
    }
    let id = target.key_str("InstanceID")?;
    let job = match svc.store.get_job(id) {
        Ok(Some(job)) => job,
        Ok(None) => {
            return Some(Err(CimError::new(
                CimStatusCode::NotFound,
                format!("no job with InstanceID '{id}'"),
            )))
        }
        Err(e) => {
            return Some(Err(CimError::new(
                CimStatusCode::Failed,
                crate::error_chain(&e),
            )))
        }
    };
    let errors: Vec<String> = job
        .errors
        .iter()
        .map(|e| cim::encode_instance(&objects::error_instance(&job, e)))
        .collect();
    let decl = schema::class("Msvm_ConcreteJob").and_then(|c| c.method(method))?;
    let mut outs = Vec::new();
    if method.eq_ignore_ascii_case("GetError") {
        if let Some(first) = errors.into_iter().next() {
            set_out(&mut outs, decl, "Error", CimValue::String(first));
        }
    } else {
        set_out(&mut outs, decl, "Errors", string_array(errors));
    }
    Some(Ok((CimValue::Uint32(0), outs)))
}

async fn replication_service(svc: &Service, args: &Args) -> Result<CommandOutput, MethodError> {
    let op = |operation: Operation, a: OperationArgs| -> Result<Command, MethodError> {
        Ok(Command::Replication {
            vm: args.vm(svc)?,
            operation,
            args: a,
        })
    };
    let cmd = match args.method.as_str() {
        "ModifyServiceSettings" => {
            let base = svc.store.service_settings().map_err(CommandError::from)?;
            Command::ModifyServiceSettings(service_settings(base, args.instance("SettingData")?)?)
        }
        "AddAuthorizationEntry" => Command::AddAuthorizationEntry(authorization_entry(
            args.instance("AuthorizationEntry")?,
        )?),
        "ModifyAuthorizationEntry" => Command::ModifyAuthorizationEntry(authorization_entry(
            args.instance("AuthorizationEntry")?,
        )?),
        "RemoveAuthorizationEntry" => Command::RemoveAuthorizationEntry {
            allowed_primary_host_system: args
                .string("AllowedPrimaryHostSystem")
                .ok_or_else(|| args.missing("AllowedPrimaryHostSystem"))?,
        },
        "SetAuthorizationEntry" => Command::SetAuthorizationEntry {
            vm: args.vm(svc)?,
            entry: authorization_entry(args.instance("AuthorizationEntry")?)?,
        },
        "TestReplicationConnection" => Command::TestReplicationConnection {
            recovery_connection_point: args
                .string("RecoveryConnectionPoint")
                .ok_or_else(|| args.missing("RecoveryConnectionPoint"))?,
            recovery_server_port_number: args.u16("RecoveryServerPortNumber").unwrap_or(0),
            authentication_type: args.u16("AuthenticationType").unwrap_or(0),
            certificate_thumbprint: args.string("CertificateThumbPrint"),
            bypass_proxy_server: args
                .value("BypassProxyServer")
                .and_then(CimValue::as_bool)
                .unwrap_or(false),
        },
        "GetSystemCertificates" => Command::GetSystemCertificates,
        "CreateReplicationRelationship" => {
            let vm = args.vm(svc)?;
            let settings = replication_settings(svc, &vm, args)?;
            Command::CreateReplicationRelationship { vm, settings }
        }
        "ModifyReplicationSettings" => {
            let vm = args.vm(svc)?;
            let settings = replication_settings(svc, &vm, args)?;
            Command::ModifyReplicationSettings { vm, settings }
        }
        "RemoveReplicationRelationship" => {
            Command::RemoveReplicationRelationship { vm: args.vm(svc)? }
        }
        "RemoveReplicationRelationshipEx" => {
            let vm = args.vm(svc)?;
            check_primary_relationship(args, &vm)?;
            Command::RemoveReplicationRelationship { vm }
        }
        "StartReplication" => {
            let t = args
                .u16("InitialReplicationType")
                .ok_or_else(|| args.missing("InitialReplicationType"))?;
            let kind = InitialReplicationType::from_u16(t).ok_or_else(|| {
                CommandError::new(
                    ReturnCode::InvalidParameter,
                    format!("InitialReplicationType {t} is not 1, 2 or 3"),
                )
            })?;
            let a = OperationArgs {
                location: args.string("InitialReplicationExportLocation"),
                start_time: args.unix_time("StartTime")?,
                ..OperationArgs::default()
            };
            op(Operation::StartReplication(kind), a)?
        }
        "ImportInitialReplica" => op(
            Operation::ImportInitialReplica,
            OperationArgs {
                location: args.string("InitialReplicationImportLocation"),
                ..OperationArgs::default()
            },
        )?,
        "InitiateFailover" => op(Operation::InitiateFailover, point_args(args)?)?,
        "RevertFailover" => op(Operation::RevertFailover, OperationArgs::default())?,
        "CommitFailover" => op(Operation::CommitFailover, OperationArgs::default())?,
        "ReverseReplicationRelationship" => {
            let vm = args.vm(svc)?;
            let settings = replication_settings(svc, &vm, args)?;
            let a = OperationArgs {
                settings: Some(settings),
                ..OperationArgs::default()
            };
            Command::Replication {
                vm,
                operation: Operation::ReverseReplicationRelationship,
                args: a,
            }
        }
        "TestReplicaSystem" => op(Operation::TestReplicaSystem, point_args(args)?)?,
        "Resynchronize" => op(
            Operation::Resynchronize,
            OperationArgs {
                start_time: args.unix_time("StartTime")?,
                ..OperationArgs::default()
            },
        )?,
        "SetFailoverNetworkAdapterSettings" => {
            let failover_network = network_settings(&args.vm(svc)?, args)?;
            op(
                Operation::SetFailoverNetworkAdapterSettings,
                OperationArgs {
                    failover_network,
                    ..OperationArgs::default()
                },
            )?
        }
        "GetReplicationStatistics" => Command::GetReplicationStatistics { vm: args.vm(svc)? },
        "GetReplicationStatisticsEx" => {
            let vm = args.vm(svc)?;
            check_primary_relationship(args, &vm)?;
            Command::GetReplicationStatistics { vm }
        }
        "ResetReplicationStatistics" => Command::ResetReplicationStatistics { vm: args.vm(svc)? },
        "ResetReplicationStatisticsEx" => {
            let vm = args.vm(svc)?;
            check_primary_relationship(args, &vm)?;
            Command::ResetReplicationStatistics { vm }
        }
        "ChangeReplicationModeToPrimary" => {
            check_primary_relationship(args, &args.vm(svc)?)?;
            op(
                Operation::ChangeReplicationModeToPrimary,
                OperationArgs::default(),
            )?
        }
        "InitiateFailback" => {
            let vm = args.vm(svc)?;
            let settings = replication_settings(svc, &vm, args)?;
            let a = OperationArgs {
                settings: Some(settings),
                recovery_point: args
                    .string("RecoveryPointIdentifier")
                    .filter(|s| !s.is_empty()),
                ..OperationArgs::default()
            };
            Command::Replication {
                vm,
                operation: Operation::InitiateFailback,
                args: a,
            }
        }
        // Inherited CIM_Service stubs: the service is always running (spec §2.1).
        "StartService" => return Ok(CommandOutput::Completed),
        "RequestStateChange" if args.u16("RequestedState") == Some(2) => {
            return Ok(CommandOutput::Completed)
        }
        "StopService" | "RequestStateChange" => {
            return Err(CommandError {
                code: 1,
                message: "the replication service cannot be stopped or changed".into(),
            }
            .into())
        }
        other => {
            return Err(CimError::new(
                CimStatusCode::MethodNotAvailable,
                format!("Msvm_ReplicationService.{other} is not available"),
            )
            .into())
        }
    };
    run(svc, cmd).await
}

/// DefineSystem: `SystemSettings` names the VM (ElementName, optional VirtualSystemIdentifier GUID);
/// each `ResourceSettings` entry is a disk whose `HostResource[0]` is the image path.
fn vm_definition(args: &Args) -> Result<VmDefinition, MethodError> {
    if args.reference("ReferenceConfiguration").is_some() {
        let msg = "DefineSystem: ReferenceConfiguration (copying a VM) is not supported";
        return Err(CommandError::new(ReturnCode::NotSupported, msg).into());
    }
    let settings = Props(args.instance("SystemSettings")?);
    let mut name = String::new();
    settings.string("ElementName", &mut name)?;
    let mut id = None;
    settings.opt_string("VirtualSystemIdentifier", &mut id)?;
    let id = id
        .map(|text| {
            uuid::Uuid::parse_str(text.trim_matches(['{', '}'])).map_err(|_| {
                let msg = format!("VirtualSystemIdentifier '{text}' is not a GUID");
                CommandError::new(ReturnCode::InvalidParameter, msg)
            })
        })
        .transpose()?;
    let mut disks = Vec::new();
    if let Some(Arg::Instances(list)) = args.get("ResourceSettings") {
        for inst in list {
            let mut host_resource = Vec::new();
            Props(inst).strings("HostResource", &mut host_resource)?;
            let path = host_resource.into_iter().next().ok_or_else(|| {
                let msg = "ResourceSettings: every disk needs HostResource (the image path)";
                CommandError::new(ReturnCode::InvalidParameter, msg)
            })?;
            disks.push(path);
        }
    }
    Ok(VmDefinition {
        name,
        disks,
        id,
        power: PowerControl::default(),
    })
}

/// The recovery point a `SnapshotSettingData` reference names (null: the latest point).
fn point_args(args: &Args) -> Result<OperationArgs, CommandError> {
    let point = match args.reference("SnapshotSettingData") {
        None => None,
        Some(p) => {
            let id = p
                .key_str("InstanceID")
                .filter(|_| schema::is_a(&p.class_name, "CIM_VirtualSystemSettingData"));
            let Some(id) = id else {
                return Err(CommandError::new(
                    ReturnCode::InvalidParameter,
                    format!(
                        "SnapshotSettingData must reference a recovery point \
                         (an Msvm_VirtualSystemSettingData by InstanceID), not {}",
                        p.class_name
                    ),
                ));
            };
            Some(id.to_string())
        }
    };
    Ok(OperationArgs {
        recovery_point: point,
        ..OperationArgs::default()
    })
}

/// The `Msvm_FailoverNetworkAdapterSettingData` instances of SetFailoverNetworkAdapterSettings for
/// VM `vm`. Each names its adapter by InstanceID
/// (`Microsoft:<VMID>\FailoverNetworkAdapter\<n>`, as enumerated); one without an InstanceID is for
/// adapter 0.
fn network_settings(vm: &str, args: &Args) -> Result<Vec<FailoverNetworkSettings>, CommandError> {
    let Some(Arg::Instances(list)) = args.get("NetworkSettings") else {
        return Err(args.missing("NetworkSettings"));
    };
    let mut out = Vec::new();
    for inst in list {
        if inst.value("IPAddresses").is_none() || inst.value("DHCPEnabled").is_none() {
            return Err(CommandError::new(
                ReturnCode::InvalidParameter,
                "NetworkSettings: every entry needs IPAddresses and DHCPEnabled",
            ));
        }
        let p = Props(inst);
        let mut s = FailoverNetworkSettings::default();
        let mut id = None;
        p.opt_string("InstanceID", &mut id)?;
        let mut named = None;
        if let Some(id) = id.filter(|i| !i.trim().is_empty()) {
            let (adapter, protocol) =
                objects::failover_network_adapter(vm, &id).ok_or_else(|| {
                    CommandError::new(
                        ReturnCode::InvalidParameter,
                        format!(
                            "NetworkSettings: InstanceID '{id}' names no network adapter of this \
                             VM (Microsoft:{vm}\\FailoverNetworkAdapter\\<n>[\\<ProtocolIFType>])"
                        ),
                    )
                })?;
            s.adapter = adapter;
            named = protocol;
        }
        p.u16("ProtocolIFType", &mut s.protocol_if_type)?;
        match (named, s.protocol_if_type) {
            (Some(p), 0 | 1) => s.protocol_if_type = p,
            (Some(p), given) if p != given => {
                return Err(CommandError::new(
                    ReturnCode::InvalidParameter,
                    format!(
                        "NetworkSettings: ProtocolIFType {given} with an InstanceID of protocol {p}"
                    ),
                ))
            }
            _ => {}
        }
        p.bool("DHCPEnabled", &mut s.dhcp_enabled)?;
        p.strings("IPAddresses", &mut s.ip_addresses)?;
        p.strings("Subnets", &mut s.subnets)?;
        p.strings("DefaultGateways", &mut s.default_gateways)?;
        p.strings("DNSServers", &mut s.dns_servers)?;
        out.push(s); // checked by the service, as the CLI's
    }
    Ok(out)
}

// ---- embedded instance -> typed settings ----

fn type_error(class: &str, prop: &str, expected: &str) -> CommandError {
    CommandError::new(
        ReturnCode::IncorrectDataType,
        format!("{class}.{prop} must be {expected}"),
    )
}

/// Reads properties of an embedded instance by name, whatever exact type the client sent.
struct Props<'a>(&'a CimInstance);

impl Props<'_> {
    fn get(&self, name: &str) -> Option<&CimValue> {
        self.0.value(name)
    }
    fn u16(&self, name: &str, into: &mut u16) -> Result<(), CommandError> {
        if let Some(v) = self.get(name) {
            *into = v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| type_error(&self.0.class_name, name, "a uint16"))?;
        }
        Ok(())
    }
    fn u32(&self, name: &str, into: &mut u32) -> Result<(), CommandError> {
        if let Some(v) = self.get(name) {
            *into = v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| type_error(&self.0.class_name, name, "a uint32"))?;
        }
        Ok(())
    }
    fn bool(&self, name: &str, into: &mut bool) -> Result<(), CommandError> {
        if let Some(v) = self.get(name) {
            *into = v
                .as_bool()
                .or_else(|| v.as_u64().map(|n| n != 0))
                .or_else(|| {
                    v.as_str().and_then(|s| {
                        cim::CimValue::parse_scalar(CimType::Boolean, s)
                            .ok()?
                            .as_bool()
                    })
                })
                .ok_or_else(|| type_error(&self.0.class_name, name, "a boolean"))?;
        }
        Ok(())
    }
    fn string(&self, name: &str, into: &mut String) -> Result<(), CommandError> {
        if let Some(v) = self.get(name) {
            *into = v
                .as_str()
                .ok_or_else(|| type_error(&self.0.class_name, name, "a string"))?
                .to_string();
        }
        Ok(())
    }
    fn opt_string(&self, name: &str, into: &mut Option<String>) -> Result<(), CommandError> {
        if self.0.property(name).is_some() {
            *into = match self.get(name) {
                None => None,
                Some(v) => Some(
                    v.as_str()
                        .ok_or_else(|| type_error(&self.0.class_name, name, "a string"))?
                        .to_string(),
                ),
            }
            .filter(|s| !s.is_empty());
        }
        Ok(())
    }
    fn strings(&self, name: &str, into: &mut Vec<String>) -> Result<(), CommandError> {
        match self.get(name) {
            None => {}
            Some(CimValue::Array(_, items)) => {
                *into = items
                    .iter()
                    .map(|i| i.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| type_error(&self.0.class_name, name, "an array of strings"))?;
            }
            Some(v) => {
                *into = vec![v
                    .as_str()
                    .ok_or_else(|| type_error(&self.0.class_name, name, "an array of strings"))?
                    .to_string()]
            }
        }
        Ok(())
    }
    /// A time of day given as a CIM interval, or as a timestamp whose time of day is used: taken to
    /// UTC with its offset when `utc` (`…090000.000000+480` is 01:00 UTC: MonitoringStartTime,
    /// §7), else as written (a local time of day: AutoResynchronizeIntervalStart/End, §6).
    fn time_of_day(&self, name: &str, into: &mut u32, utc: bool) -> Result<(), CommandError> {
        let Some(v) = self.get(name) else {
            return Ok(());
        };
        let dt = match v {
            CimValue::Datetime(dt) => *dt,
            CimValue::String(s) => CimDateTime::parse(s)
                .map_err(|_| type_error(&self.0.class_name, name, "a CIM datetime"))?,
            _ => return Err(type_error(&self.0.class_name, name, "a CIM datetime")),
        };
        let secs = match dt {
            CimDateTime::Interval { .. } => dt.interval_total_secs().unwrap_or(0),
            CimDateTime::Timestamp {
                hour,
                minute,
                second,
                utc_offset_minutes,
                ..
            } => {
                let local = i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second);
                let offset = if utc {
                    i64::from(utc_offset_minutes) * 60
                } else {
                    0
                };
                (local - offset).rem_euclid(86_400) as u64
            }
        };
        *into = u32::try_from(secs).unwrap_or(u32::MAX);
        Ok(())
    }
}

/// The VM's settings changed by the passed `Msvm_ReplicationSettingData` (present properties win).
fn replication_settings(
    svc: &Service,
    vm: &str,
    args: &Args,
) -> Result<ReplicationSettings, MethodError> {
    let inst = args.instance("ReplicationSettingData")?;
    let row = svc.resolve_vm(&vm.to_string())?;
    if let Some(id) = inst.value("InstanceID").and_then(CimValue::as_str) {
        if !id.is_empty() && !id.to_uppercase().contains(&vm_name(row.id)) {
            return Err(CommandError::new(
                ReturnCode::InvalidParameter,
                format!(
                    "ReplicationSettingData.InstanceID '{id}' belongs to another virtual machine"
                ),
            )
            .into());
        }
    }
    let mut s = svc
        .store
        .get_relationship(row.id)
        .map_err(CommandError::from)?
        .map(|r| r.settings)
        .unwrap_or_default();
    let p = Props(inst);
    p.string("RecoveryConnectionPoint", &mut s.recovery_connection_point)?;
    p.u16(
        "RecoveryServerPortNumber",
        &mut s.recovery_server_port_number,
    )?;
    p.u16("AuthenticationType", &mut s.authentication_type)?;
    p.opt_string("CertificateThumbPrint", &mut s.certificate_thumbprint)?;
    p.bool("CompressionEnabled", &mut s.compression_enabled)?;
    p.bool("BypassProxyServer", &mut s.bypass_proxy_server)?;
    p.bool("ReplicateHostKvpItems", &mut s.replicate_host_kvp_items)?;
    p.u16(
        "ApplicationConsistentSnapshotInterval",
        &mut s.application_consistent_snapshot_interval,
    )?;
    p.u16("RecoveryHistory", &mut s.recovery_history)?;
    p.strings("IncludedDisks", &mut s.included_disks)?;
    p.bool(
        "AutoResynchronizeEnabled",
        &mut s.auto_resynchronize_enabled,
    )?;
    p.time_of_day(
        "AutoResynchronizeIntervalStart",
        &mut s.auto_resynchronize_interval_start,
        false,
    )?;
    p.time_of_day(
        "AutoResynchronizeIntervalEnd",
        &mut s.auto_resynchronize_interval_end,
        false,
    )?;
    p.bool(
        "EnableWriteOrderPreservationAcrossDisks",
        &mut s.enable_write_order_preservation_across_disks,
    )?;
    p.opt_string("ReplicationProvider", &mut s.replication_provider)?;
    p.u16("ReplicationInterval", &mut s.replication_interval)?;
    p.opt_string("AdditionalSettings", &mut s.additional_settings)?;
    if let Some(provider) = &s.replication_provider {
        // Its Name (the GUID), or the path of its instance here (by InstanceID).
        let built_in = provider.to_uppercase().contains(objects::PROVIDER_GUID)
            || ObjectPath::parse_wmi(provider).is_ok_and(|p| {
                p.class_name
                    .eq_ignore_ascii_case("Msvm_ReplicationProvider")
                    && p.key_str("InstanceID").is_some_and(|id| {
                        id.to_ascii_lowercase()
                            .ends_with(&objects::PROVIDER_INSTANCE_SUFFIX.to_ascii_lowercase())
                    })
            });
        if !built_in {
            return Err(CommandError::new(
                ReturnCode::NotSupported,
                "only the built-in host-to-host replication provider is supported",
            )
            .into());
        }
        s.replication_provider = None;
    }
    Ok(s)
}

fn service_settings(
    mut s: ServiceSettings,
    inst: &CimInstance,
) -> Result<ServiceSettings, CommandError> {
    let p = Props(inst);
    p.bool("RecoveryServerEnabled", &mut s.recovery_server_enabled)?;
    p.u16(
        "AllowedAuthenticationType",
        &mut s.allowed_authentication_type,
    )?;
    p.opt_string("CertificateThumbPrint", &mut s.certificate_thumbprint)?;
    p.u16("HttpPort", &mut s.http_port)?;
    p.u16("HttpsPort", &mut s.https_port)?;
    p.u32("MonitoringInterval", &mut s.monitoring_interval)?;
    p.time_of_day("MonitoringStartTime", &mut s.monitoring_start_time, true)?;
    Ok(s)
}

fn authorization_entry(inst: &CimInstance) -> Result<AuthorizationEntry, CommandError> {
    let p = Props(inst);
    let mut e = AuthorizationEntry {
        allowed_primary_host_system: String::new(),
        trust_group: String::new(),
        replica_storage_location: String::new(),
    };
    p.string(
        "AllowedPrimaryHostSystem",
        &mut e.allowed_primary_host_system,
    )?;
    p.string("TrustGroup", &mut e.trust_group)?;
    p.string("ReplicaStorageLocation", &mut e.replica_storage_location)?;
    Ok(e)
}
