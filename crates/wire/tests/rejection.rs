//! Every way a log can be wrong is rejected by `verify` with its own error, before anything could
//! be applied: flipped bytes, truncation, bytes out of place, the wrong VM or sequence, and lengths
//! crafted to make the reader allocate.

mod common;

use std::io::{self, Read};

use common::{expect, header, record, records, small_log};
use wire::{
    verify, Compression, Expect, ExtentError, HeaderError, LogDecodeError, LogReader, LogWriter,
};

fn rejects(log: &[u8]) -> LogDecodeError {
    verify(log, &expect()).expect_err("the log must be rejected")
}

#[test]
fn the_small_logs_verify() {
    for compression in [Compression::Off, Compression::default()] {
        verify(&small_log(compression)[..], &expect()).expect("valid");
    }
}

#[test]
fn every_flipped_byte_is_rejected() {
    for compression in [Compression::Off, Compression::default()] {
        let log = small_log(compression);
        for at in 0..log.len() {
            for mask in [0x01, 0x80, 0xff] {
                let mut bad = log.clone();
                bad[at] ^= mask;
                assert!(
                    verify(&bad[..], &expect()).is_err(),
                    "flip {mask:#x} at {at} accepted"
                );
            }
        }
    }
}

#[test]
fn every_truncation_is_rejected_as_truncated() {
    let log = small_log(Compression::default());
    for len in 0..log.len() {
        let err = rejects(&log[..len]);
        assert!(
            matches!(err, LogDecodeError::Truncated { .. }),
            "length {len}: {err:?}"
        );
    }
}

#[test]
fn bytes_after_the_trailer_are_rejected() {
    let mut log = small_log(Compression::Off);
    let end = log.len() as u64;
    log.push(0);
    assert!(matches!(rejects(&log), LogDecodeError::TrailingData { offset } if offset == end));
}

#[test]
fn wrong_magic_and_version_are_named() {
    let mut log = small_log(Compression::Off);
    log[1] = b'X';
    assert!(matches!(rejects(&log), LogDecodeError::BadMagic));
    let mut log = small_log(Compression::Off);
    log[8] = 3;
    assert!(matches!(
        rejects(&log),
        LogDecodeError::UnsupportedVersion {
            found: 3,
            supported: 2
        }
    ));
}

#[test]
fn the_wrong_log_is_rejected_before_any_extent() {
    let log = small_log(Compression::Off);
    let other = uuid::Uuid::from_u128(7);
    let cases = [
        (
            Expect {
                vm: other,
                ..expect()
            },
            "WrongVm",
        ),
        (
            Expect {
                relationship: 1,
                ..expect()
            },
            "WrongRelationship",
        ),
        (
            Expect {
                sequence: 6,
                ..expect()
            },
            "OutOfOrder",
        ),
        (
            Expect {
                parent: 3,
                ..expect()
            },
            "ParentMismatch",
        ),
    ];
    for (expectation, name) in cases {
        let err = verify(&log[..], &expectation).expect_err(name);
        let ok = match err {
            LogDecodeError::WrongVm { expected, found } => expected == other && found == common::VM,
            LogDecodeError::WrongRelationship {
                expected: 1,
                found: 0,
            } => true,
            LogDecodeError::OutOfOrder {
                expected: 6,
                found: 5,
            } => true,
            LogDecodeError::ParentMismatch {
                expected: 3,
                found: 4,
            } => true,
            _ => false,
        };
        assert!(
            ok && format!("{err:?}").starts_with(name),
            "{name}: {err:?}"
        );
        assert!(LogReader::open(&log[..], &expectation).is_err());
    }
}

/// A log whose only frame record is replaced by `body`, with a correct checksum.
fn with_frame(body: &[u8]) -> Vec<u8> {
    let log = small_log(Compression::Off);
    let recs = records(&log);
    let mut out = log[..recs[1].0].to_vec();
    out.extend_from_slice(&record(2, body));
    out.extend_from_slice(&recs[2].2);
    out
}

fn frame(encoding: u8, entries: &[(u8, u32, u64, u64)], raw: u32, data: &[u8]) -> Vec<u8> {
    let mut b = vec![encoding];
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    b.extend_from_slice(&raw.to_le_bytes());
    b.extend_from_slice(&(data.len() as u32).to_le_bytes());
    for &(kind, disk, offset, len) in entries {
        b.push(kind);
        b.extend_from_slice(&disk.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
    }
    b.extend_from_slice(data);
    b
}

#[test]
fn bad_frames_are_rejected_with_what_is_wrong() {
    let bad_frame = |body: Vec<u8>| match rejects(&with_frame(&body)) {
        LogDecodeError::BadFrame { problem, .. } => problem,
        other => panic!("expected BadFrame, got {other:?}"),
    };
    assert_eq!(
        bad_frame(frame(0, &[(2, 0, 0, 1)], 0, &[])),
        "unknown encoding"
    );
    assert_eq!(
        bad_frame(frame(1, &[], 0, &[])),
        "extent count is 0 or above the limit"
    );
    assert_eq!(
        bad_frame(frame(1, &[(1, 0, 0, 2)], 2, b"ab")[..30].to_vec()),
        "record length differs from the lengths it declares"
    );
    assert_eq!(
        bad_frame(frame(2, &[(1, 0, 0, 1 << 31)], 1 << 31, b"x")),
        "data length above the limit"
    );
    assert_eq!(
        bad_frame(frame(1, &[(1, 0, 0, 2)], 3, b"abc")),
        "data extents do not add up to the raw length"
    );
    assert_eq!(
        bad_frame(frame(1, &[(1, 0, 0, 2)], 2, b"abc")),
        "stored data length differs from raw length"
    );

    let bad_extent = |entry| match rejects(&with_frame(&frame(1, &[entry], 0, &[]))) {
        LogDecodeError::BadExtent { source, .. } => source,
        other => panic!("expected BadExtent, got {other:?}"),
    };
    assert_eq!(bad_extent((0, 0, 0, 1)), ExtentError::InvalidKind(0));
    assert_eq!(
        bad_extent((2, 2, 0, 1)),
        ExtentError::UnknownDisk { disk: 2, disks: 2 }
    );
    assert_eq!(
        bad_extent((2, 0, 9, 0)),
        ExtentError::Empty { disk: 0, offset: 9 }
    );
    assert_eq!(
        bad_extent((2, 1, 0, 1 << 40)),
        ExtentError::OutOfRange {
            disk: 1,
            offset: 0,
            len: 1 << 40,
            size: 8192
        }
    );

    let garbage = frame(2, &[(1, 0, 0, 3)], 3, b"not zstd");
    assert!(matches!(
        rejects(&with_frame(&garbage)),
        LogDecodeError::Decompress { .. }
    ));
    let short = zstd::bulk::compress(b"ab", 1).expect("compress");
    let mut body = frame(2, &[(1, 0, 0, 3)], 3, &short);
    assert!(matches!(
        rejects(&with_frame(&body)),
        LogDecodeError::BadFrame { .. } | LogDecodeError::Decompress { .. }
    ));
    body[0] = 3;
    assert!(matches!(
        rejects(&with_frame(&body)),
        LogDecodeError::BadFrame { .. }
    ));
}

/// Records out of place, records dropped, reordered or recounted.
#[test]
fn the_trailer_catches_what_checksums_cannot() {
    let mut w = LogWriter::new(Vec::new(), header(), Compression::default()).expect("writer");
    for i in 0..16_385 * 2 {
        w.write_zero(0, i * 16, 16).expect("zero");
    }
    let (log, _) = w.finish().expect("finish");
    let recs = records(&log);
    assert_eq!(
        recs.iter().map(|r| r.1).collect::<Vec<_>>(),
        [1, 2, 2, 2, 3]
    );
    let join = |order: &[usize]| {
        let mut out = log[..10].to_vec();
        for &i in order {
            out.extend_from_slice(&recs[i].2);
        }
        out
    };
    let err = rejects(&join(&[0, 1, 3, 4]));
    assert!(
        matches!(
            err,
            LogDecodeError::TrailerMismatch {
                what: "frames",
                trailer: 3,
                counted: 2
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        rejects(&join(&[0, 2, 1, 3, 4])),
        LogDecodeError::HashMismatch
    ));
    assert!(matches!(
        rejects(&join(&[1, 2, 3, 4])),
        LogDecodeError::UnexpectedRecord {
            kind: 2,
            offset: 10
        }
    ));
    assert!(matches!(
        rejects(&join(&[0, 0, 1, 2, 3, 4])),
        LogDecodeError::UnexpectedRecord { kind: 1, .. }
    ));
    assert!(matches!(
        rejects(&join(&[0, 1, 2, 3])),
        LogDecodeError::Truncated { .. }
    ));

    let mut trailer = recs[4].2[5..85].to_vec();
    trailer[32] ^= 1;
    let mut bad = join(&[0, 1, 2, 3]);
    bad.extend_from_slice(&record(3, &trailer));
    assert!(matches!(
        rejects(&bad),
        LogDecodeError::TrailerMismatch {
            what: "zero bytes",
            ..
        }
    ));
    let mut trailer = recs[4].2[5..85].to_vec();
    trailer[79] ^= 1;
    let mut bad = join(&[0, 1, 2, 3]);
    bad.extend_from_slice(&record(3, &trailer));
    assert!(matches!(rejects(&bad), LogDecodeError::HashMismatch));
    let mut bad = join(&[0, 1, 2, 3]);
    bad.extend_from_slice(&record(3, &trailer[..40]));
    assert!(matches!(rejects(&bad), LogDecodeError::BadTrailer { .. }));
}

/// Counts the bytes a reader pulls from an endless input.
struct Endless {
    pulled: u64,
}

impl Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        buf.fill(0);
        self.pulled += buf.len() as u64;
        Ok(buf.len())
    }
}

#[test]
fn huge_lengths_fail_before_reading_or_allocating() {
    let log = small_log(Compression::Off);
    let header_end = records(&log)[1].0;
    for (prefix, kind) in [
        (&log[..10], 1u8),
        (&log[..header_end], 2),
        (&log[..header_end], 3),
    ] {
        let mut input = prefix.to_vec();
        input.push(kind);
        input.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut endless = Endless { pulled: 0 };
        let err = verify(input.as_slice().chain(&mut endless), &expect()).expect_err("too long");
        assert!(
            matches!(
                err,
                LogDecodeError::RecordTooLong {
                    length: u32::MAX,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(endless.pulled, 0, "nothing read past the head");
    }
    // A header claiming 65535 disks fails on the count, not after reading them.
    let mut body = records(&log)[0].2[5..].to_vec();
    body.truncate(body.len() - 8);
    body[44..46].copy_from_slice(&u16::MAX.to_le_bytes());
    let mut input = log[..10].to_vec();
    input.extend_from_slice(&record(1, &body));
    let err = rejects(&input);
    assert!(
        matches!(
            err,
            LogDecodeError::InvalidHeader(HeaderError::DiskCount(65535))
        ),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "the log header is invalid");
}

#[test]
fn the_streaming_reader_stops_for_good_after_an_error() {
    let mut log = small_log(Compression::Off);
    let last = log.len() - 1;
    log[last] ^= 1;
    let mut r = LogReader::open(&log[..], &expect()).expect("header is fine");
    let mut yielded = 0;
    let err = loop {
        match r.next_extent() {
            Ok(Some(_)) => yielded += 1,
            Ok(None) => panic!("a corrupt trailer was accepted"),
            Err(e) => break e,
        }
    };
    assert_eq!(
        yielded, 3,
        "extents stream before the trailer; verify first to apply nothing"
    );
    assert!(matches!(err, LogDecodeError::ChecksumMismatch { .. }));
    assert!(matches!(r.next_extent(), Err(LogDecodeError::ReaderFailed)));
    assert!(r.summary().is_none());
}

#[test]
fn the_writer_refuses_what_the_reader_would_reject() {
    let mut bad = header();
    bad.parent = 0;
    assert!(LogWriter::new(Vec::new(), bad, Compression::Off).is_err());
    let mut w = LogWriter::new(Vec::new(), header(), Compression::Off).expect("writer");
    assert!(w.write_data(2, 0, b"x").is_err());
    assert!(w.write_data(1, 8190, b"xyz").is_err());
    assert!(w.write_data(1, 0, b"").is_err());
    assert!(w.write_zero(0, u64::MAX, 2).is_err());
    let (log, summary) = w
        .finish()
        .expect("the refused extents left the writer usable");
    assert_eq!(summary.counts.frames, 0);
    assert_eq!(
        verify(&log[..], &expect()).expect("empty log is valid"),
        summary
    );
}

#[test]
fn an_interrupted_log_is_cut_back_to_its_whole_records() {
    let log = small_log(Compression::Off);
    let full = wire::whole_records_prefix(&log[..]);
    assert_eq!(
        full,
        log.len() as u64,
        "a complete log is all whole records"
    );
    for cut in [0usize, 5, 16, log.len() / 3, log.len() / 2, log.len() - 1] {
        let prefix = wire::whole_records_prefix(&log[..cut]);
        assert!(prefix <= cut as u64, "cut {cut}: {prefix}");
        // The prefix is itself made of whole records: cutting there keeps all of it.
        assert_eq!(wire::whole_records_prefix(&log[..prefix as usize]), prefix);
    }
    let mut damaged = log.clone();
    let at = log.len() / 2;
    damaged[at] ^= 0x10;
    assert!(wire::whole_records_prefix(&damaged[..]) <= at as u64);
}

/// A log read again with the hash it was verified with when it arrived (`open_verified`, the
/// apply of an upload): the BLAKE3 pass is skipped, but a wrong hash, and every flipped byte, are
/// still rejected.
#[test]
fn a_log_read_with_its_verified_hash_is_still_checked() {
    let read_all = |log: &[u8], hash: [u8; 32]| -> Result<wire::LogSummary, LogDecodeError> {
        let mut r = LogReader::open_verified(log, &expect(), hash)?;
        while r.next_extent()?.is_some() {}
        r.summary().cloned().ok_or(LogDecodeError::ReaderFailed)
    };
    for compression in [Compression::Off, Compression::default()] {
        let log = small_log(compression);
        let summary = verify(&log[..], &expect()).expect("valid");
        assert_eq!(read_all(&log, summary.hash).expect("accepted"), summary);
        let mut wrong = summary.hash;
        wrong[0] ^= 1;
        assert!(read_all(&log, wrong).is_err(), "another hash");
        for at in 0..log.len() {
            let mut bad = log.clone();
            bad[at] ^= 0x01;
            assert!(
                read_all(&bad, summary.hash).is_err(),
                "flip at {at} accepted"
            );
        }
    }
}
