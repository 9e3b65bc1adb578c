//! Whatever goes into the writer comes out of the reader: the same extents in the same order, the
//! same summary, compressed or not, across frame boundaries.

mod common;

use proptest::prelude::*;
use wire::{
    verify, Compression, Content, DiskInfo, Extent, FrameData, LogReader, LogSummary, LogWriter,
    OwnedContent, DATA_ALIGN,
};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Data {
        disk: u32,
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        disk: u32,
        offset: u64,
        len: u64,
    },
}

fn write(ops: &[Op], header: wire::LogHeader, compression: Compression) -> (Vec<u8>, LogSummary) {
    let mut w = LogWriter::new(Vec::new(), header, compression).expect("writer");
    for op in ops {
        match op {
            Op::Data { disk, offset, data } => w.write_data(*disk, *offset, data),
            Op::Zero { disk, offset, len } => w.write_zero(*disk, *offset, *len),
        }
        .expect("extent within the disks");
    }
    w.finish().expect("finish")
}

/// The extent as an [`Op`].
fn op(e: Extent<'_>) -> Op {
    match e.content {
        Content::Data(data) => Op::Data {
            disk: e.disk,
            offset: e.offset,
            data: data.to_vec(),
        },
        Content::Zero(len) => Op::Zero {
            disk: e.disk,
            offset: e.offset,
            len,
        },
    }
}

fn read(log: &[u8]) -> (Vec<Op>, LogSummary) {
    let mut r = LogReader::open(log, &common::expect()).expect("open");
    let mut ops = Vec::new();
    while let Some(e) = r.next_extent().expect("valid log") {
        ops.push(op(e));
    }
    (ops, r.summary().expect("complete").clone())
}

/// [`read`] a frame at a time ([`LogReader::next_frame`]), every buffer handed back for the next;
/// with `mixed`, the first extent of every frame comes from `next_extent` instead. Checks that each
/// frame's data starts aligned for `O_DIRECT`.
fn read_frames(log: &[u8], mixed: bool) -> (Vec<Op>, LogSummary) {
    let mut r = LogReader::open(log, &common::expect()).expect("open");
    let mut ops = Vec::new();
    let mut spare = FrameData::default();
    loop {
        if mixed {
            match r.next_extent().expect("valid log") {
                Some(e) => ops.push(op(e)),
                None => break,
            }
        }
        let Some(frame) = r.next_frame(spare).expect("valid log") else {
            break;
        };
        if !frame.data.is_empty() {
            assert_eq!(frame.data.bytes().as_ptr() as usize % DATA_ALIGN, 0);
        }
        for e in &frame.extents {
            ops.push(match &e.content {
                OwnedContent::Data(range) => Op::Data {
                    disk: e.disk,
                    offset: e.offset,
                    data: frame.data.bytes()[range.clone()].to_vec(),
                },
                OwnedContent::Zero(len) => Op::Zero {
                    disk: e.disk,
                    offset: e.offset,
                    len: *len,
                },
            });
        }
        spare = frame.data;
    }
    (ops, r.summary().expect("complete").clone())
}

/// Disks of 1 byte to 64 KiB, and extents that fit them.
fn disks_and_ops() -> impl Strategy<Value = (Vec<DiskInfo>, Vec<Op>)> {
    prop::collection::vec(1u64..=65536, 1..=4).prop_flat_map(|sizes| {
        let disks: Vec<DiskInfo> = sizes
            .iter()
            .enumerate()
            .map(|(i, &virtual_size)| DiskInfo {
                id: format!("disk{i}"),
                virtual_size,
            })
            .collect();
        let op = (
            0..sizes.len(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            any::<u8>(),
        )
            .prop_map(move |(disk, zero, a, b, repetitive, byte)| {
                let size = sizes[disk];
                let offset = a % size;
                let len = 1 + b % (size - offset).min(20_000);
                let disk = disk as u32;
                if zero {
                    return Op::Zero { disk, offset, len };
                }
                let data = (0..len)
                    .map(|i| {
                        if repetitive {
                            byte
                        } else {
                            (i as u8).wrapping_mul(byte) ^ (i >> 7) as u8
                        }
                    })
                    .collect();
                Op::Data { disk, offset, data }
            });
        (Just(disks), prop::collection::vec(op, 0..40))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn reader_yields_exactly_what_was_written(
        (disks, ops) in disks_and_ops(),
        compress in any::<bool>(),
        level in 1i32..=5,
    ) {
        let header = wire::LogHeader { disks, ..common::header() };
        let compression = if compress { Compression::Zstd { level } } else { Compression::Off };
        let (log, written) = write(&ops, header.clone(), compression);
        let (read_ops, summary) = read(&log);
        prop_assert_eq!(&read_ops, &ops);
        prop_assert_eq!(&summary, &written);
        for mixed in [false, true] {
            let (frame_ops, frame_summary) = read_frames(&log, mixed);
            prop_assert_eq!(&frame_ops, &ops);
            prop_assert_eq!(&frame_summary, &written);
        }
        prop_assert_eq!(verify(&log[..], &common::expect()).expect("verifies"), written.clone());
        prop_assert_eq!(summary.bytes, log.len() as u64);
        prop_assert_eq!(summary.header, header);
        let data: u64 = ops.iter().map(|op| match op { Op::Data { data, .. } => data.len() as u64, _ => 0 }).sum();
        prop_assert_eq!(summary.counts.data_bytes, data);
        prop_assert_eq!(summary.counts.frames, u64::from(!ops.is_empty()));
    }
}

/// A 9 MiB extent after a zero extent: the zero extent goes out in a frame of its own (a whole
/// frame of data is written straight from the caller's buffer, after what is pending), the extent
/// in two whole frames and a third holding its tail and the next extent; it comes back as
/// adjacent pieces with the same bytes.
#[test]
fn large_extents_are_split_across_frames() {
    let big: Vec<u8> = (0..9 * 1024 * 1024 + 7)
        .map(|i: u32| (i / 4096) as u8 ^ (i as u8 & 3))
        .collect();
    for compression in [Compression::Off, Compression::Zstd { level: 1 }] {
        let ops = [
            Op::Zero {
                disk: 1,
                offset: 0,
                len: 8192,
            },
            Op::Data {
                disk: 0,
                offset: 3,
                data: big.clone(),
            },
            Op::Data {
                disk: 1,
                offset: 10,
                data: vec![1, 2, 3],
            },
        ];
        let mut header = common::header();
        header.disks[0].virtual_size = 16 << 20;
        let (log, written) = write(&ops, header, compression);
        let (read_ops, summary) = read(&log);
        // Frames of up to 4 MiB of data, taken whole, in buffers handed back and grown as needed.
        assert!(read_frames(&log, false) == (read_ops.clone(), summary.clone()));
        assert_eq!(summary, written);
        assert_eq!(summary.counts.frames, 4);
        assert_eq!(
            summary.counts.data_extents, 4,
            "the big extent in three pieces, and one more"
        );
        let mut rebuilt = Vec::new();
        let mut next = 3;
        for op in &read_ops[1..4] {
            let Op::Data {
                disk: 0,
                offset,
                data,
            } = op
            else {
                panic!("a piece of the big extent: {op:?}")
            };
            assert_eq!(*offset, next);
            next += data.len() as u64;
            rebuilt.extend_from_slice(data);
        }
        assert!(rebuilt == big);
        assert_eq!(read_ops[0], ops[0]);
        assert_eq!(read_ops[4], ops[2]);
        if compression == Compression::Off {
            assert!(log.len() > big.len());
        } else {
            assert!(
                log.len() < big.len() / 4,
                "compressible data is compressed: {}",
                log.len()
            );
        }
    }
}

/// Whole frames of data with nothing pending: each is one frame of one extent, and an unaligned
/// extent between them does not make the next ones share frames.
#[test]
fn whole_frames_of_data_go_out_as_they_come() {
    let frame = 4 << 20;
    let chunk: Vec<u8> = (0..frame).map(|i: u32| (i % 251) as u8).collect();
    let ops = [
        Op::Data {
            disk: 0,
            offset: 0,
            data: chunk.clone(),
        },
        Op::Data {
            disk: 0,
            offset: frame as u64,
            data: vec![7; 4096],
        },
        Op::Data {
            disk: 0,
            offset: 2 * frame as u64,
            data: chunk.clone(),
        },
        Op::Data {
            disk: 0,
            offset: 3 * frame as u64,
            data: chunk.clone(),
        },
    ];
    let mut header = common::header();
    header.disks[0].virtual_size = 16 << 20;
    let (log, written) = write(&ops, header, Compression::Off);
    let (read_ops, summary) = read(&log);
    assert_eq!(summary, written);
    assert_eq!(read_ops, ops);
    assert_eq!(summary.counts.frames, 4, "one frame per extent");
    // Copied into frames as they came, the 4 MiB extents after the small one would be split.
    assert_eq!(summary.counts.data_extents, 4, "no extent split");
}

/// Data that zstd cannot shrink is stored, so compression never makes a log bigger.
#[test]
fn incompressible_frames_are_stored() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..100_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let ops = [Op::Data {
        disk: 0,
        offset: 0,
        data: noise,
    }];
    let (plain, _) = write(&ops, common::header(), Compression::Off);
    let (packed, _) = write(&ops, common::header(), Compression::Zstd { level: 19 });
    assert_eq!(packed.len(), plain.len());
    assert_eq!(read(&packed).0, ops);
}

/// More extents than a frame's table holds start a new frame.
#[test]
fn many_small_extents_fill_several_frames() {
    let ops: Vec<Op> = (0..16_385)
        .map(|i| Op::Zero {
            disk: 0,
            offset: i * 32,
            len: 32,
        })
        .collect();
    let (log, written) = write(&ops, common::header(), Compression::default());
    assert_eq!(written.counts.frames, 2);
    assert_eq!(written.counts.zero_extents, 16_385);
    assert_eq!(written.counts.zero_bytes, 16_385 * 32);
    assert_eq!(read(&log).0, ops);
}

/// After a run of incompressible frames the writer stops trying for a while, then tries again:
/// compressible data that follows is still compressed.
#[test]
fn compression_resumes_after_a_run_of_incompressible_data() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let frame = 4 << 20;
    let mut ops = Vec::new();
    for i in 0..20u64 {
        let data: Vec<u8> = (0..frame)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        ops.push(Op::Data {
            disk: 0,
            offset: i * frame as u64,
            data,
        });
    }
    for i in 20..40u64 {
        ops.push(Op::Data {
            disk: 0,
            offset: i * frame as u64,
            data: vec![7u8; frame],
        });
    }
    let mut header = common::header();
    header.disks[0].virtual_size = 40 * frame as u64;
    let (plain, _) = write(&ops, header.clone(), Compression::Off);
    let (packed, _) = write(&ops, header, Compression::default());
    // At most the frames skipped after the last failed try (8) stay stored; the other 12+
    // compressible frames (4 MiB of one byte each) almost vanish.
    assert!(
        packed.len() < plain.len() - 40 * (1 << 20),
        "{} vs {}",
        packed.len(),
        plain.len()
    );
    assert_eq!(read(&packed).0, ops);
}
