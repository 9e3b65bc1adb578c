//! Fuzzes the WMI object path parser; parsed paths must print and parse back unchanged.
#![no_main]

use cim::ObjectPath;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(p) = ObjectPath::parse_wmi(&text) {
        let again = ObjectPath::parse_wmi(&p.to_wmi());
        assert!(
            again.is_ok(),
            "re-parse of {:?} failed: {:?}",
            p.to_wmi(),
            again
        );
    }
});
