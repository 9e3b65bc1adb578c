//! Applying replication logs builds one verified recovery point per log; bad logs change nothing.

#[path = "points_support.rs"]
mod support;

use disk::points::{ApplyError, PointKind, PointStore};
use support::{check, noise, same, tree, Source};
use wire::{Compression, DiskInfo, LogDecodeError, LogHeader, LogWriter, PointType};

#[tokio::test]
async fn every_point_equals_its_source_version_and_reapplying_changes_nothing() {
    let t = std::time::Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), 4);
    let logs = src.logs(dir.path(), 20);
    let store = PointStore::open(&dir.path().join("store"), support::vm())
        .await
        .expect("open");
    for (i, log) in logs.iter().enumerate() {
        let info = store
            .apply(log, &Source::expect(i + 1))
            .await
            .expect("apply");
        assert_eq!(
            (info.sequence, info.kind, info.full_image),
            ((i + 1) as u64, PointKind::Standard, i == 0)
        );
    }
    let points = store.list_points().expect("list");
    assert_eq!(
        points.iter().map(|p| p.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    for p in &points {
        let layer = store.point_path(p.sequence, 0).expect("path");
        check(&layer);
        store.check_point(p.sequence).await.expect("check_point");
        assert!(
            same(&layer, &src.raw(p.sequence as usize)),
            "point {} differs from its version",
            p.sequence
        );
    }
    // Zero extents stay sparse and a delta holds only the changed blocks: every layer is far
    // smaller than the 64 MiB disk (the log of version 1 describes all of it, mostly as zeros).
    for p in &points {
        let len = std::fs::metadata(store.point_path(p.sequence, 0).expect("path"))
            .expect("meta")
            .len();
        assert!(
            len < support::DISK_SIZE / 8,
            "layer {} takes {len} bytes",
            p.sequence
        );
    }

    let before = tree(store.dir());
    for (i, log) in logs.iter().enumerate() {
        let again = store
            .apply(log, &Source::expect(i + 1))
            .await
            .expect("re-apply");
        assert_eq!(again, points[i]);
    }
    assert_eq!(
        tree(store.dir()),
        before,
        "re-applying must not touch the store"
    );
    eprintln!("apply chain: {:?}", t.elapsed());
}

#[tokio::test]
async fn a_flipped_byte_a_truncated_log_and_a_wrong_sequence_are_rejected_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), 2);
    let logs = src.logs(dir.path(), 20);
    let store = PointStore::open(&dir.path().join("store"), support::vm())
        .await
        .expect("open");
    store
        .apply(&logs[0], &Source::expect(1))
        .await
        .expect("apply 1");
    let good = std::fs::read(&logs[1]).expect("log 2");
    let before = tree(store.dir());

    let mut flipped = good.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x01;
    let bad = dir.path().join("bad.log");
    std::fs::write(&bad, &flipped).expect("write");
    let err = store
        .apply(&bad, &Source::expect(2))
        .await
        .expect_err("flipped byte");
    assert!(
        matches!(
            err,
            ApplyError::Rejected {
                source: LogDecodeError::ChecksumMismatch { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("rejected; nothing was applied"),
        "{err}"
    );

    std::fs::write(&bad, &good[..good.len() - 100]).expect("write");
    let err = store
        .apply(&bad, &Source::expect(2))
        .await
        .expect_err("truncated");
    assert!(
        matches!(
            err,
            ApplyError::Rejected {
                source: LogDecodeError::Truncated { .. },
                ..
            }
        ),
        "{err:?}"
    );

    let mut wrong = Source::expect(2);
    wrong.sequence = 3;
    let err = store
        .apply(&logs[1], &wrong)
        .await
        .expect_err("wrong sequence");
    assert!(
        matches!(
            err,
            ApplyError::Rejected {
                source: LogDecodeError::OutOfOrder {
                    expected: 3,
                    found: 2
                },
                ..
            }
        ),
        "{err:?}"
    );
    // A log whose point is committed is verified in full and returns that point, changing nothing.
    let err = store
        .apply(&logs[0], &Source::expect(1))
        .await
        .expect("log 1 again is idempotent");
    assert_eq!(err.sequence, 1);
    assert_eq!(
        tree(store.dir()),
        before,
        "a rejected log must leave the store as it was"
    );
    assert_eq!(store.list_points().expect("list").len(), 1);

    store
        .apply(&logs[1], &Source::expect(2))
        .await
        .expect("the good log still applies");
    assert!(same(&store.point_path(2, 0).expect("path"), &src.raw(2)));
}

#[tokio::test]
async fn a_delta_on_an_empty_store_and_a_gap_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), 3);
    let logs = src.logs(dir.path(), 20);
    let store = PointStore::open(&dir.path().join("store"), support::vm())
        .await
        .expect("open");
    let err = store
        .apply(&logs[1], &Source::expect(2))
        .await
        .expect_err("delta first");
    assert!(
        matches!(err, ApplyError::FirstMustBeFull { sequence: 2 }),
        "{err:?}"
    );
    store
        .apply(&logs[0], &Source::expect(1))
        .await
        .expect("apply 1");
    let err = store
        .apply(&logs[2], &Source::expect(3))
        .await
        .expect_err("gap");
    assert!(
        matches!(
            err,
            ApplyError::NotNext {
                sequence: 3,
                parent: 2,
                latest: 1
            }
        ),
        "{err:?}"
    );
    assert_eq!(store.list_points().expect("list").len(), 1);
}

/// Extents may overlap and later ones win, whichever connection carries them: extents that cross
/// stripe boundaries, unaligned pieces rewritten many times, zeros over data and data over zeros,
/// on two disks written in interleaved order.
#[tokio::test]
async fn overlapping_extents_are_applied_in_log_order() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let sizes = [8 * MIB, 6 * MIB];
    let header = LogHeader {
        vm: support::vm(),
        relationship: 0,
        sequence: 1,
        parent: 0,
        point_time_micros: support::T0,
        point_type: PointType::Standard,
        full_image: true,
        disks: sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| DiskInfo {
                id: format!("scsi{i}"),
                virtual_size: size as u64,
            })
            .collect(),
    };
    let log = dir.path().join("overlap.log");
    let file = std::io::BufWriter::new(std::fs::File::create(&log).expect("log file"));
    let mut w = LogWriter::new(file, header, Compression::default()).expect("writer");
    let mut expected: Vec<Vec<u8>> = sizes.iter().map(|&size| vec![0; size]).collect();
    let mut data = |w: &mut LogWriter<_>, disk: usize, at: usize, seed: u64, len: usize| {
        let bytes = noise(seed, len);
        w.write_data(disk as u32, at as u64, &bytes).expect("data");
        expected[disk][at..at + len].copy_from_slice(&bytes);
    };
    data(&mut w, 0, 0, 1, 8 * MIB);
    data(&mut w, 1, 0, 2, 6 * MIB);
    for i in 0..40 {
        data(&mut w, i % 2, 3 * MIB - 2_049, 100 + i as u64, 4_099);
    }
    data(&mut w, 0, MIB / 2, 3, 5 * MIB);
    data(&mut w, 1, 2 * MIB - 777, 4, 10_000);
    let mut zero = |w: &mut LogWriter<_>, disk: usize, at: usize, len: usize| {
        w.write_zero(disk as u32, at as u64, len as u64)
            .expect("zero");
        expected[disk][at..at + len].fill(0);
    };
    zero(&mut w, 0, MIB - 4_096, 2 * MIB + 8_192);
    zero(&mut w, 1, 5 * MIB - 1, 2);
    zero(&mut w, 0, 7 * MIB, MIB);
    let mut data = |w: &mut LogWriter<_>, disk: usize, at: usize, seed: u64, len: usize| {
        let bytes = noise(seed, len);
        w.write_data(disk as u32, at as u64, &bytes).expect("data");
        expected[disk][at..at + len].copy_from_slice(&bytes);
    };
    data(&mut w, 0, 2 * MIB - 512, 5, 1_024);
    data(&mut w, 0, 7 * MIB + 100, 6, 2 * MIB / 3);
    data(&mut w, 1, 0, 7, 1);
    w.finish().expect("finish");

    let store = PointStore::open(&dir.path().join("store"), support::vm())
        .await
        .expect("open");
    store.apply(&log, &Source::expect(1)).await.expect("apply");
    for (disk, want) in expected.iter().enumerate() {
        let raw = dir.path().join(format!("want{disk}.raw"));
        std::fs::write(&raw, want).expect("raw");
        let layer = store.point_path(1, disk).expect("path");
        check(&layer);
        assert!(
            same(&layer, &raw),
            "disk {disk} differs from the log's last writes"
        );
    }
}
