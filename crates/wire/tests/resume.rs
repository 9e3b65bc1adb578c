//! A reader saved between two records continues, after its process is gone, exactly where it
//! stopped: the same extents, the same summary, and the same verdict on damage as one pass.

mod common;

use wire::{
    verify, Compression, Content, DiskInfo, Expect, LogHeader, LogReader, LogWriter, PointType,
    ReaderCheckpoint,
};

fn header() -> LogHeader {
    LogHeader {
        vm: common::VM,
        relationship: 0,
        sequence: 1,
        parent: 0,
        point_time_micros: 1_700_000_000_000_000,
        point_type: PointType::Standard,
        full_image: true,
        disks: vec![DiskInfo {
            id: "disk0".into(),
            virtual_size: 64 << 20,
        }],
    }
}

fn expect() -> Expect {
    Expect {
        vm: common::VM,
        relationship: 0,
        sequence: 1,
        parent: 0,
    }
}

/// A log of several frames: data pieces of awkward sizes with zero runs between them. `seed`
/// changes the data, never the layout.
fn log(seed: u8, compression: Compression) -> Vec<u8> {
    let mut w = LogWriter::new(Vec::new(), header(), compression).expect("writer");
    let mut at = 0u64;
    for i in 0..40u64 {
        let len = 300_000 + (i as usize * 7919) % 200_000;
        let data: Vec<u8> = (0..len)
            .map(|j| (j as u8).wrapping_mul(31).wrapping_add(seed ^ i as u8))
            .collect();
        w.write_data(0, at, &data).expect("data");
        at += len as u64;
        w.write_zero(0, at, 4096).expect("zero");
        at += 4096;
    }
    w.finish().expect("finish").0
}

/// Every extent of a reader, flattened: (offset, data or zero length).
fn drain<R: std::io::Read>(r: &mut LogReader<R>, into: &mut Vec<(u64, Vec<u8>, u64)>) {
    while let Some(e) = r.next_extent().expect("valid log") {
        into.push(match e.content {
            Content::Data(d) => (e.offset, d.to_vec(), 0),
            Content::Zero(n) => (e.offset, Vec::new(), n),
        });
    }
}

#[test]
fn a_reader_resumed_at_any_record_boundary_reads_the_rest_as_one_pass_would() {
    for compression in [Compression::Off, Compression::default()] {
        let bytes = log(1, compression);
        let whole = verify(&bytes[..], &expect()).expect("the log verifies");
        let mut all = Vec::new();
        drain(
            &mut LogReader::open(&bytes[..], &expect()).unwrap(),
            &mut all,
        );

        // Checkpoints at every boundary the reader offers.
        let mut r = LogReader::open_resumable(&bytes[..], &expect()).unwrap();
        let mut points = vec![(0usize, r.checkpoint().expect("after the header"))];
        let mut seen = 0;
        while r.next_extent().expect("valid").is_some() {
            seen += 1;
            if let Some(c) = r.checkpoint() {
                points.push((seen, c));
            }
        }
        assert_eq!(r.summary(), Some(&whole));
        assert!(r.checkpoint().is_none(), "no checkpoint after the end");
        assert!(points.len() > 3, "several frames: {}", points.len());

        for (extents_before, c) in points {
            // Saved as bytes and read back, as across a restart.
            let c = ReaderCheckpoint::from_bytes(&c.to_bytes()).expect("restores");
            let rest = &bytes[c.offset() as usize..];
            let mut resumed = LogReader::resume(rest, &c, &expect()).expect("resumes");
            let mut after = Vec::new();
            drain(&mut resumed, &mut after);
            assert_eq!(after[..], all[extents_before..], "from {}", c.offset());
            assert_eq!(resumed.summary(), Some(&whole), "from {}", c.offset());
        }
    }
}

#[test]
fn a_resumed_reader_still_catches_bytes_that_are_not_the_streams() {
    let a = log(1, Compression::Off);
    // Same layout and lengths, other data: every record checks out on its own.
    let b = log(2, Compression::Off);
    assert_eq!(a.len(), b.len());
    let mut r = LogReader::open_resumable(&a[..], &expect()).unwrap();
    let mut c = None;
    while r.next_extent().unwrap().is_some() {
        if let Some(k) = r.checkpoint() {
            c = Some(k);
            break;
        }
    }
    let c = c.expect("a boundary");
    let mut resumed = LogReader::resume(&b[c.offset() as usize..], &c, &expect()).unwrap();
    let err = loop {
        match resumed.next_extent() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("another stream's tail was accepted"),
            Err(e) => break e,
        }
    };
    assert!(err.to_string().contains("hash"), "{err}");

    // A checkpoint for another log is refused before anything is read.
    let other = Expect {
        sequence: 2,
        parent: 1,
        ..expect()
    };
    assert!(LogReader::resume(&a[c.offset() as usize..], &c, &other).is_err());
}

#[test]
fn a_damaged_checkpoint_is_not_taken_up() {
    let a = log(1, Compression::Off);
    let r = LogReader::open_resumable(&a[..], &expect()).unwrap();
    let saved = r.checkpoint().unwrap().to_bytes();
    for i in [0, 9, saved.len() / 2, saved.len() - 1] {
        let mut bad = saved.clone();
        bad[i] ^= 1;
        assert!(ReaderCheckpoint::from_bytes(&bad).is_none(), "byte {i}");
    }
    assert!(ReaderCheckpoint::from_bytes(&saved[..saved.len() - 3]).is_none());
    assert!(ReaderCheckpoint::from_bytes(&[]).is_none());
    // A reader that was not opened resumable has no state to save.
    let plain = LogReader::open(&a[..], &expect()).unwrap();
    assert!(plain.checkpoint().is_none());
}
