//! Fuzzes the replication log reader: `verify` and the streaming reader must reject or accept any
//! input without panicking, agree on which, and only ever yield extents inside their disk. The
//! expectation is taken from the input's own header, so the fuzzer gets past it to the frames and
//! the trailer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::{verify, Expect, LogReader};

fuzz_target!(|data: &[u8]| {
    let Ok(mut reader) = LogReader::open_unchecked(data) else {
        return;
    };
    let h = reader.header().clone();
    let expect = Expect { vm: h.vm, relationship: h.relationship, sequence: h.sequence, parent: h.parent };
    let verified = verify(data, &expect);

    let mut extents = 0u64;
    let streamed = loop {
        match reader.next_extent() {
            Ok(Some(extent)) => {
                let disk = &h.disks[extent.disk as usize];
                let end = extent.offset.checked_add(extent.len()).expect("no overflow");
                assert!(extent.len() > 0 && end <= disk.virtual_size, "extent outside its disk");
                extents += 1;
            }
            Ok(None) => break reader.summary().cloned(),
            Err(_) => break None,
        }
    };
    match (verified, streamed) {
        (Ok(a), Some(b)) => {
            assert_eq!(a, b);
            assert_eq!(a.counts.data_extents + a.counts.zero_extents, extents);
            assert_eq!(a.bytes, data.len() as u64);
        }
        (Err(_), None) => {}
        (a, b) => panic!("verify and the reader disagree: {a:?} vs {b:?}"),
    }
});
