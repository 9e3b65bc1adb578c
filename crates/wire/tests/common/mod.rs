//! Helpers shared by the log tests: headers, expectations and hand-made records.
#![allow(dead_code)]

use uuid::Uuid;
use wire::{Compression, DiskInfo, Expect, LogHeader, LogWriter, PointType};

pub const VM: Uuid = Uuid::from_u128(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff);

/// A delta header: sequence 5 on parent 4, two disks.
pub fn header() -> LogHeader {
    LogHeader {
        vm: VM,
        relationship: 0,
        sequence: 5,
        parent: 4,
        point_time_micros: 1_700_000_000_000_000,
        point_type: PointType::Standard,
        full_image: false,
        disks: vec![
            DiskInfo {
                id: "scsi0-0-0-0".into(),
                virtual_size: 1 << 20,
            },
            DiskInfo {
                id: "scsi0-0-0-1".into(),
                virtual_size: 8192,
            },
        ],
    }
}

/// What the replica waiting for `header()` expects.
pub fn expect() -> Expect {
    Expect {
        vm: VM,
        relationship: 0,
        sequence: 5,
        parent: 4,
    }
}

/// A small log: one frame holding both extent kinds, data compressed or stored.
pub fn small_log(compression: Compression) -> Vec<u8> {
    let mut w = LogWriter::new(Vec::new(), header(), compression).expect("writer");
    w.write_data(0, 4096, &[0x5a; 600]).expect("data");
    w.write_zero(1, 0, 8192).expect("zero");
    w.write_data(1, 100, b"abc").expect("data");
    w.finish().expect("finish").0
}

/// A record with a correct checksum around `body`.
pub fn record(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    let sum = xxhash_rust::xxh3::xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Splits a log into its preamble and records (offset, kind, whole record bytes).
pub fn records(log: &[u8]) -> Vec<(usize, u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 10;
    while at < log.len() {
        let len = u32::from_le_bytes(log[at + 1..at + 5].try_into().unwrap()) as usize;
        let end = at + 5 + len + 8;
        out.push((at, log[at], log[at..end].to_vec()));
        at = end;
    }
    out
}
