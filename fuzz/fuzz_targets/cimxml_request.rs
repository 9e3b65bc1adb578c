//! Fuzzes the CIM-XML request decoder; decoded requests are re-encoded as responses.
#![no_main]

use cim::{
    encode_imethod_response, encode_instance, encode_method_response, parse_request, CimRequest,
    CimValue, IReturn, ParamData,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(req) = parse_request(body) else {
        return;
    };
    let ns = req.namespace().unwrap_or("root").to_string();
    let params = match &req {
        CimRequest::Intrinsic { params, .. } | CimRequest::Extrinsic { params, .. } => params,
    };
    let mut paths = Vec::new();
    for p in params {
        match &p.data {
            ParamData::Reference(path) | ParamData::InstanceName(path) => paths.push(path.clone()),
            ParamData::ReferenceArray(ps) => paths.extend(ps.iter().cloned()),
            ParamData::Instance(i) => {
                let _ = encode_instance(i);
            }
            _ => {}
        }
    }
    for p in &paths {
        let _ = cim::ObjectPath::parse_wmi(&p.to_wmi());
    }
    let _ = encode_imethod_response(
        req.message_id(),
        req.method(),
        "host",
        &ns,
        &Ok(IReturn::ObjectPaths(paths.clone())),
    );
    let _ = encode_imethod_response(
        req.message_id(),
        req.method(),
        "host",
        &ns,
        &Ok(IReturn::InstanceNames(paths)),
    );
    if let CimRequest::Extrinsic { target, .. } = &req {
        let _ = encode_method_response(
            req.message_id(),
            req.method(),
            "host",
            &ns,
            &Ok((CimValue::Reference(target.clone()), Vec::new())),
        );
    }
});
