//! Fuzzes the WQL parser and query matching.
#![no_main]

use cim::{parse_wql, CimInstance, CimValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(q) = parse_wql(&text) {
        let mut inst = CimInstance::new(&q.class_name);
        for (name, _) in &q.conditions {
            inst.set(name, CimValue::String(name.clone()));
        }
        let _ = q.matches(&inst);
    }
});
