//! Response documents for every IReturn shape. `dump_for_pywbem` (ignored) writes them to
//! `$CIM_DUMP_DIR` so pywbem's own parser can check them (see tests/check_with_pywbem.py).

use cim::*;

fn vm_path() -> ObjectPath {
    ObjectPath::new("Msvm_ComputerSystem")
        .with_key(
            "CreationClassName",
            KeyValue::String("Msvm_ComputerSystem".into()),
        )
        .with_key("Name", KeyValue::String("5B8E-GUID".into()))
}

fn vm() -> CimInstance {
    let mut i = CimInstance::new("Msvm_ComputerSystem")
        .with("Name", CimValue::String("5B8E-GUID".into()))
        .with("ElementName", CimValue::String("vm <1> & \"q\"".into()))
        .with("EnabledState", CimValue::Uint16(2))
        .with("ReplicationEnabled", CimValue::Boolean(true))
        .with(
            "InstallDate",
            CimValue::Datetime(CimDateTime::from_unix(1_700_000_000, 5)),
        )
        .with(
            "OperationalStatus",
            CimValue::Array(
                CimType::Uint16,
                vec![CimValue::Uint16(2), CimValue::Uint16(32768)],
            ),
        )
        .with(
            "Host",
            CimValue::Reference(
                ObjectPath::new("Msvm_Host").with_key("N", KeyValue::Number("-3".into())),
            ),
        );
    i.set_null("Caption", CimType::String, false);
    i
}

fn class() -> CimClass {
    let param = |name: &str, ty, rc: Option<&str>, q: &str| ParamDecl {
        name: name.into(),
        ty,
        is_array: false,
        reference_class: rc.map(str::to_string),
        qualifiers: vec![Qualifier::boolean(q)],
    };
    CimClass {
        name: "Msvm_ReplicationService".into(),
        superclass: Some("CIM_Service".into()),
        qualifiers: vec![Qualifier::string("Description", "Replication")],
        properties: vec![PropertyDecl {
            name: "Name".into(),
            ty: CimType::String,
            is_array: false,
            reference_class: None,
            qualifiers: vec![Qualifier::boolean("Key")],
            class_origin: Some("CIM_ManagedSystemElement".into()),
            propagated: true,
        }],
        methods: vec![MethodDecl {
            name: "StartReplication".into(),
            return_type: CimType::Uint32,
            params: vec![
                param(
                    "ComputerSystem",
                    CimType::Reference,
                    Some("CIM_ComputerSystem"),
                    "In",
                ),
                param("InitialReplicationType", CimType::Uint16, None, "In"),
                param("Job", CimType::Reference, Some("CIM_ConcreteJob"), "Out"),
            ],
            qualifiers: vec![],
            class_origin: Some("Msvm_ReplicationService".into()),
            propagated: false,
        }],
    }
}

fn samples() -> Vec<(&'static str, String)> {
    let i = |name, r: IReturn| {
        encode_imethod_response("1001", name, "h1", "root/virtualization/v2", &Ok(r))
    };
    let job =
        ObjectPath::new("Msvm_ConcreteJob").with_key("InstanceID", KeyValue::String("j-1".into()));
    let outs = vec![
        OutParam {
            name: "Job".into(),
            ty: CimType::Reference,
            is_array: false,
            value: Some(CimValue::Reference(job)),
            embedded_object: false,
        },
        OutParam {
            name: "Errors".into(),
            ty: CimType::String,
            is_array: true,
            value: Some(CimValue::Array(
                CimType::String,
                vec![CimValue::String(encode_instance(&vm()))],
            )),
            embedded_object: true,
        },
        OutParam {
            name: "Empty".into(),
            ty: CimType::String,
            is_array: false,
            value: None,
            embedded_object: false,
        },
    ];
    vec![
        ("getinstance", i("GetInstance", IReturn::Instance(vm()))),
        (
            "enuminstances",
            i(
                "EnumerateInstances",
                IReturn::NamedInstances(vec![(vm_path(), vm())]),
            ),
        ),
        (
            "enuminstances_empty",
            i("EnumerateInstances", IReturn::NamedInstances(vec![])),
        ),
        (
            "enuminstancenames",
            i(
                "EnumerateInstanceNames",
                IReturn::InstanceNames(vec![vm_path()]),
            ),
        ),
        (
            "associators",
            i(
                "Associators",
                IReturn::ObjectsWithPath(vec![(vm_path(), vm())]),
            ),
        ),
        (
            "associatornames",
            i("AssociatorNames", IReturn::ObjectPaths(vec![vm_path()])),
        ),
        ("getclass", i("GetClass", IReturn::Class(class()))),
        (
            "enumclasses",
            i("EnumerateClasses", IReturn::Classes(vec![class()])),
        ),
        (
            "enumclassnames",
            i(
                "EnumerateClassNames",
                IReturn::ClassNames(vec!["Msvm_A".into()]),
            ),
        ),
        ("deleteinstance", i("DeleteInstance", IReturn::Nothing)),
        (
            "error",
            encode_imethod_response(
                "1001",
                "GetInstance",
                "h1",
                "root",
                &Err(CimError::new(CimStatusCode::NotFound, "no such VM")),
            ),
        ),
        (
            "method",
            encode_method_response(
                "1001",
                "StartReplication",
                "h1",
                "root/virtualization/v2",
                &Ok((CimValue::Uint32(4096), outs)),
            ),
        ),
        (
            "method_error",
            encode_method_response(
                "1001",
                "StartReplication",
                "h1",
                "root",
                &Err(CimError::new(CimStatusCode::MethodNotFound, "no")),
            ),
        ),
    ]
}

#[test]
fn responses_are_well_formed_and_echo_the_message_id() {
    for (name, xml) in samples() {
        let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{name}: {e}"));
        let msg = doc
            .descendants()
            .find(|n| n.has_tag_name("MESSAGE"))
            .expect("MESSAGE");
        assert_eq!(msg.attribute("ID"), Some("1001"), "{name}");
    }
}

#[test]
fn embedded_error_string_round_trips_through_a_method_response() {
    let xml = samples()
        .into_iter()
        .find(|(n, _)| *n == "method")
        .expect("sample")
        .1;
    let doc = roxmltree::Document::parse(&xml).expect("well-formed");
    let value = doc
        .descendants()
        .find(|n| n.attribute("NAME") == Some("Errors"))
        .and_then(|p| p.descendants().find(|n| n.has_tag_name("VALUE")))
        .and_then(|v| v.text())
        .expect("Errors value");
    assert_eq!(parse_embedded_instance(value), Ok(vm()));
}

#[test]
#[ignore = "writes files for tests/check_with_pywbem.py"]
fn dump_for_pywbem() {
    let dir = std::env::var("CIM_DUMP_DIR").expect("set CIM_DUMP_DIR");
    for (name, xml) in samples() {
        std::fs::write(format!("{dir}/{name}.xml"), xml).expect("write sample");
    }
}
