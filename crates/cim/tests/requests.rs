//! Real request bodies captured from pywbem 1.9 and written the way sblim-wbemcli sends them
//! decode into the expected requests.

use cim::{parse_embedded_instance, parse_request, CimRequest, CimValue, KeyValue, ParamData};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn extrinsic(name: &str) -> (cim::ObjectPath, Vec<cim::ParamValue>, String) {
    match parse_request(&fixture(name)).expect("fixture decodes") {
        CimRequest::Extrinsic {
            target,
            params,
            method,
            ..
        } => (target, params, method),
        other => panic!("expected a method call, got {other:?}"),
    }
}

#[test]
fn pywbem_method_call_with_reference_and_embedded_instance() {
    let (target, params, method) = extrinsic("pywbem_invoke_embedded.xml");
    assert_eq!(method, "CreateReplicationRelationship");
    assert_eq!(target.namespace.as_deref(), Some("root/virtualization/v2"));
    assert_eq!(target.key_str("SystemName"), Some("HOST"));
    let ParamData::Reference(vm) = &params[0].data else {
        panic!("ComputerSystem should be a reference: {:?}", params[0]);
    };
    assert_eq!(vm.key_str("Name"), Some("5B8E-GUID"));
    assert_eq!(params[0].param_type.as_deref(), Some("reference"));
    assert_eq!(params[1].embedded_object.as_deref(), Some("instance"));
    let inst = parse_embedded_instance(params[1].as_str().expect("embedded text"))
        .expect("embedded instance decodes");
    assert_eq!(inst.class_name, "Msvm_ReplicationSettingData");
    assert_eq!(
        inst.value("RecoveryServerPortNumber"),
        Some(&CimValue::Uint16(80))
    );
    assert_eq!(
        inst.value("CompressionEnabled"),
        Some(&CimValue::Boolean(true))
    );
    assert_eq!(
        inst.value("Note"),
        Some(&CimValue::String("a<b & \"c\"".into()))
    );
}

#[test]
fn pywbem_method_call_with_scalars() {
    let (_, params, _) = extrinsic("pywbem_invoke_string.xml");
    let by_name = |n: &str| params.iter().find(|p| p.name == n).expect("param present");
    assert_eq!(by_name("RecoveryPointIdentifier").as_str(), Some("rp-1"));
    assert_eq!(by_name("Flags").param_type.as_deref(), Some("uint32"));
    assert_eq!(by_name("Flags").as_str(), Some("3"));
}

#[test]
fn pywbem_intrinsic_operations() {
    for (file, method) in [
        ("pywbem_getinstance.xml", "GetInstance"),
        ("pywbem_enuminstances.xml", "EnumerateInstances"),
        ("pywbem_getclass.xml", "GetClass"),
        ("pywbem_execquery.xml", "ExecQuery"),
        ("pywbem_associators.xml", "Associators"),
        ("wbemcli_getclass.xml", "GetClass"),
    ] {
        let r = parse_request(&fixture(file)).expect("fixture decodes");
        assert_eq!(r.method(), method, "{file}");
        assert_eq!(r.namespace(), Some("root/virtualization/v2"), "{file}");
        assert!(matches!(r, CimRequest::Intrinsic { .. }), "{file}");
    }
    let CimRequest::Intrinsic { params, .. } =
        parse_request(&fixture("pywbem_associators.xml")).expect("decodes")
    else {
        panic!("intrinsic expected");
    };
    assert!(
        matches!(&params[0].data, ParamData::InstanceName(p) if p.class_name == "Msvm_ComputerSystem")
    );
    assert_eq!(
        params[1].data,
        ParamData::ClassName("Msvm_SystemDevice".into())
    );
}

#[test]
fn wbemcli_method_call() {
    let r = parse_request(&fixture("wbemcli_initiate_failback.xml")).expect("decodes");
    assert_eq!(r.message_id(), "4711");
    let (target, params, method) = extrinsic("wbemcli_initiate_failback.xml");
    assert_eq!(method, "InitiateFailback");
    assert_eq!(target.key("Name"), Some(&KeyValue::String("vmms".into())));
    assert_eq!(params[0].param_type, None);
    assert_eq!(params[0].as_str(), Some("rp-1"));
}

#[test]
fn wbemcli_reference_as_full_instance_path_with_doctype_and_whitespace() {
    let (target, params, _) = extrinsic("wbemcli_ref_param.xml");
    assert_eq!(target.class_name, "Msvm_ReplicationService");
    let ParamData::Reference(vm) = &params[0].data else {
        panic!("expected a reference: {:?}", params[0]);
    };
    assert_eq!(vm.host.as_deref(), Some("127.0.0.1:5988"));
    assert_eq!(vm.namespace.as_deref(), Some("root/virtualization/v2"));
    assert_eq!(vm.key_str("Name"), Some("5B8E-GUID"));
    assert_eq!(params[1].as_str(), Some("1"));
}
