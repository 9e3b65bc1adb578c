//! Format version 2's data digest (docs/formats/replication-log.md, "Data digest"): the trailer's
//! hash is the rule's, computed here independently of the writer; hashes handed to the writer give
//! the very bytes it would have written itself, and a wrong one cannot make a log pass; version-1
//! logs are still written on request and read, resumed included.

mod common;

use common::{expect, records};
use wire::limits::{DIGEST_PIECE as PIECE, FORMAT_VERSION};
use wire::{
    verify, Compression, LogDecodeError, LogHeader, LogReader, LogWriter, ReaderCheckpoint,
};

/// `common::header()` with a 16 MiB first disk.
fn header() -> LogHeader {
    let mut h = common::header();
    h.disks[0].virtual_size = 16 << 20;
    h
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// The BLAKE3 of each piece of `data` at disk `offset`, cut where the offset is a multiple of
/// 64 KiB: what a scan of 64 KiB blocks hands the writer.
fn pieces(offset: u64, data: &[u8]) -> Vec<[u8; 32]> {
    let mut out = Vec::new();
    let (mut at, mut rest) = (offset, data);
    while !rest.is_empty() {
        let n = ((PIECE - at % PIECE) as usize).min(rest.len());
        out.push(*blake3::hash(&rest[..n]).as_bytes());
        (at, rest) = (at + n as u64, &rest[n..]);
    }
    out
}

/// Writes the extents (disk, offset, data) with `hashed`: given their piece hashes, or not.
fn write(version: u16, extents: &[(u32, u64, Vec<u8>)], hashed: bool, c: Compression) -> Vec<u8> {
    let mut w = LogWriter::with_version(Vec::new(), header(), c, version).expect("writer");
    for (disk, offset, data) in extents {
        if hashed {
            w.write_data_hashed(*disk, *offset, data, &pieces(*offset, data))
                .expect("data");
        } else {
            w.write_data(*disk, *offset, data).expect("data");
        }
    }
    w.write_zero(1, 0, 4096).expect("zero");
    w.finish().expect("finish").0
}

/// Extents that cross 64 KiB boundaries and start and end off them; a whole 4 MiB frame written
/// from the caller's buffer; and (the last, 1 MiB and 3000 bytes pending) one cut across two frames
/// in the middle of a piece.
fn extents() -> Vec<(u32, u64, Vec<u8>)> {
    vec![
        (0, 60 << 10, pattern(72 << 10, 1)),
        (0, 512, pattern(4, 2)),
        (1, 100, pattern(3000, 3)),
        (0, 200 << 10, pattern(100 << 10, 4)),
        (0, 320 << 10, pattern(5 << 20, 5)),
        (1, 5000, pattern(3000, 6)),
        (0, 6 << 20, pattern(7 << 19, 7)),
    ]
}

/// The trailer's hash by the documented rule, from the log's own bytes: every byte before the
/// trailer, but each frame's data replaced by the BLAKE3 of each piece of each Data extent.
fn documented_hash(log: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&log[..10]);
    for (_, kind, rec) in records(log) {
        match kind {
            1 => {
                h.update(&rec);
            }
            2 => {
                let body = &rec[5..rec.len() - 8];
                assert_eq!(body[0], 1, "the test's frames are stored");
                let count = u32::from_le_bytes(body[1..5].try_into().unwrap()) as usize;
                let table_end = 13 + 21 * count;
                h.update(&rec[..5 + table_end]);
                let mut data = &body[table_end..];
                for entry in body[13..table_end].chunks(21) {
                    let offset = u64::from_le_bytes(entry[5..13].try_into().unwrap());
                    let len = u64::from_le_bytes(entry[13..21].try_into().unwrap()) as usize;
                    if entry[0] == 1 {
                        for piece in pieces(offset, &data[..len]) {
                            h.update(&piece);
                        }
                        data = &data[len..];
                    }
                }
                h.update(&rec[rec.len() - 8..]);
            }
            _ => {}
        }
    }
    *h.finalize().as_bytes()
}

#[test]
fn the_trailer_hash_is_the_documented_digest() {
    assert_eq!(FORMAT_VERSION, 2);
    let log = write(2, &extents(), false, Compression::Off);
    let summary = verify(&log[..], &expect()).expect("valid");
    assert!(
        summary.counts.frames >= 4,
        "the extents span several frames"
    );
    // The last extent was cut where no piece ends.
    let cut = records(&log)
        .iter()
        .filter(|r| r.1 == 2)
        .flat_map(|(_, _, rec)| {
            let count = u32::from_le_bytes(rec[6..10].try_into().unwrap()) as usize;
            (0..count)
                .map(|i| {
                    let e = &rec[18 + 21 * i..18 + 21 * (i + 1)];
                    let offset = u64::from_le_bytes(e[5..13].try_into().unwrap());
                    offset + u64::from_le_bytes(e[13..21].try_into().unwrap())
                })
                .collect::<Vec<_>>()
        })
        .any(|end| end > 6 << 20 && end < (6 << 20) + (7 << 19) && end % PIECE != 0);
    assert!(cut, "an extent is cut in the middle of a piece");
    assert_eq!(summary.hash, documented_hash(&log));
    // Version 1 hashes every byte: same extents, another hash, also valid.
    let v1 = write(1, &extents(), false, Compression::Off);
    let s1 = verify(&v1[..], &expect()).expect("valid");
    assert_eq!(
        s1.hash,
        *blake3::hash(&v1[..s1.bytes as usize - 93]).as_bytes()
    );
    assert_ne!(s1.hash, summary.hash);
    assert_eq!(v1[8..10], [1, 0]);
    assert_eq!(log[8..10], [2, 0]);
    assert_eq!((s1.version, summary.version), (1, 2));
}

#[test]
fn given_piece_hashes_write_the_same_log() {
    for c in [Compression::Off, Compression::default()] {
        for version in [1, 2] {
            let computed = write(version, &extents(), false, c);
            let given = write(version, &extents(), true, c);
            assert_eq!(computed, given, "version {version}, {c:?}");
            verify(&given[..], &expect()).expect("valid");
        }
    }
}

#[test]
fn hashes_that_are_not_one_per_piece_are_not_used() {
    let data = pattern(200 << 10, 9); // at 64 KiB: pieces of 64, 64, 64 and 8 KiB
    let mut w = LogWriter::new(Vec::new(), header(), Compression::Off).expect("writer");
    w.write_data_hashed(0, PIECE, &data, &[[7; 32]; 3])
        .expect("data");
    let mut log = w.finish().expect("finish").0;
    verify(&log[..], &expect()).expect("three hashes for four pieces: all hashed again");
    // Changing a byte of the data (its record checksum made right again) changes the digest.
    let (at, _, rec) = records(&log).into_iter().find(|r| r.1 == 2).unwrap();
    log[at + rec.len() - 8 - 1] ^= 1;
    let fixed = common::record(2, &log[at + 5..at + rec.len() - 8]);
    log[at..at + rec.len()].copy_from_slice(&fixed);
    assert!(matches!(
        verify(&log[..], &expect()),
        Err(LogDecodeError::HashMismatch)
    ));
}

#[test]
fn a_wrong_given_hash_makes_the_replica_refuse_the_log() {
    let data = pattern(3 << 16, 4);
    let mut hashes = pieces(PIECE, &data);
    hashes[1][0] ^= 1;
    for c in [Compression::Off, Compression::default()] {
        let mut w = LogWriter::new(Vec::new(), header(), c).expect("writer");
        w.write_data_hashed(0, PIECE, &data, &hashes).expect("data");
        let log = w.finish().expect("finish").0;
        assert!(matches!(
            verify(&log[..], &expect()),
            Err(LogDecodeError::HashMismatch)
        ));
    }
}

#[test]
fn a_resumed_reader_verifies_either_version() {
    for version in [1, 2] {
        let log = write(version, &extents(), false, Compression::default());
        let mut r = LogReader::open_resumable(&log[..], &expect()).expect("open");
        // Read up to the first checkpoint after a frame, save it, and continue from its bytes.
        let saved = loop {
            r.next_extent().expect("valid").expect("more extents");
            if let Some(cp) = r.checkpoint() {
                if cp.offset() > 100 {
                    break cp.to_bytes();
                }
            }
        };
        let cp = ReaderCheckpoint::from_bytes(&saved).expect("checkpoint");
        let at = cp.offset() as usize;
        let mut rest = LogReader::resume(&log[at..], &cp, &expect()).expect("resume");
        while rest.next_extent().expect("valid").is_some() {}
        let whole = verify(&log[..], &expect()).expect("valid");
        assert_eq!(rest.summary().expect("done").hash, whole.hash, "v{version}");
    }
}

#[test]
fn a_version_1_streams_checkpoint_keeps_the_older_layout_and_resumes() {
    let log = write(1, &extents(), false, Compression::Off);
    let mut r = LogReader::open_resumable(&log[..], &expect()).expect("open");
    let cp = loop {
        r.next_extent().expect("valid").expect("more extents");
        if let Some(cp) = r.checkpoint() {
            break cp;
        }
    };
    // A version-1 stream's checkpoint keeps the layout of the builds before version 2 (which
    // read it): magic VRLOGCP1, no version field. A version-2 one names its version.
    let old = cp.to_bytes();
    assert_eq!(&old[..8], b"VRLOGCP1");
    let v2 = write(2, &extents(), false, Compression::Off);
    let r2 = LogReader::open_resumable(&v2[..], &expect()).expect("open");
    let cp2 = r2.checkpoint().expect("after the header").to_bytes();
    assert_eq!((&cp2[..8], &cp2[8..10]), (&b"VRLOGCP2"[..], &[2u8, 0][..]));
    let cp = ReaderCheckpoint::from_bytes(&old).expect("a version-1 checkpoint");
    assert_eq!(cp.version(), 1);
    let mut rest = LogReader::resume(&log[cp.offset() as usize..], &cp, &expect()).expect("resume");
    while rest.next_extent().expect("valid").is_some() {}
    assert_eq!(
        rest.summary().expect("done").hash,
        verify(&log[..], &expect()).expect("valid").hash
    );
}

#[test]
fn the_trailer_of_a_whole_log_names_its_hash_and_nothing_else_does() {
    for version in [1, 2] {
        let log = write(version, &extents(), false, Compression::Off);
        let summary = verify(&log[..], &expect()).expect("valid");
        let len = log.len() as u64;
        assert_eq!(wire::trailer_hash(&log, len), Some(summary.hash));
        assert_eq!(
            wire::trailer_hash(&log[log.len() - 93..], len),
            Some(summary.hash)
        );
        // Not the whole trailer, another length, a flipped byte, bytes after it: no claim.
        assert_eq!(wire::trailer_hash(&log[log.len() - 92..], len), None);
        assert_eq!(wire::trailer_hash(&log, len + 1), None);
        let mut flipped = log.clone();
        let at = flipped.len() - 40;
        flipped[at] ^= 1;
        assert_eq!(wire::trailer_hash(&flipped, len), None);
        let mut longer = log.clone();
        longer.push(0);
        assert_eq!(wire::trailer_hash(&longer, len + 1), None);
    }
}
