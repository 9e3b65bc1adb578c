//! Fuzzes the replication log reader: `verify` and the streaming reader must reject or accept any
//! input without panicking, agree on which, and only ever yield extents inside their disk. The
//! expectation is taken from the input's own header, so the fuzzer gets past it to the frames and
//! the trailer. The same input read resumably, saved at a checkpoint and taken up again from the
//! saved bytes (as a replica does after a restart), must come to the same verdict.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::{verify, Expect, LogReader, ReaderCheckpoint};

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
    // Resumed at the second checkpoint the reader offers (the first is right after the header).
    let mut resumable = LogReader::open_resumable(data, &expect).expect("opened once already");
    let mut saved = resumable.checkpoint();
    let mut seen = 0;
    while seen < 2 {
        match resumable.next_extent() {
            Ok(Some(_)) => {
                if let Some(c) = resumable.checkpoint() {
                    saved = Some(c);
                    seen += 1;
                }
            }
            _ => break,
        }
    }
    let saved = saved.expect("a checkpoint after the header");
    let saved = ReaderCheckpoint::from_bytes(&saved.to_bytes()).expect("its bytes read back");
    let rest = &data[saved.offset() as usize..];
    let resumed = LogReader::resume(rest, &saved, &expect).ok().and_then(|mut r| loop {
        match r.next_extent() {
            Ok(Some(_)) => {}
            Ok(None) => break r.summary().cloned(),
            Err(_) => break None,
        }
    });
    assert_eq!(resumed.as_ref(), verified.as_ref().ok(), "resumed and one pass disagree");

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
