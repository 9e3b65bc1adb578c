//! Applying replication logs builds one verified recovery point per log; bad logs change nothing.

#[path = "points_support.rs"]
mod support;

use disk::points::{ApplyError, PointKind, PointStore};
use support::{check, same, tree, Source};
use wire::LogDecodeError;

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
    // A log that does not follow the latest point is refused after verification, before any write.
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
