//! A full-image log staged while it arrives becomes its point only when committed, equal to what
//! applying the same log makes; a bad log leaves nothing.

#[path = "points_support.rs"]
mod support;

use disk::points::{ApplyError, PointStore};
use support::{check, same, Source};
use wire::LogReader;

#[tokio::test]
async fn a_staged_full_image_is_committed_as_point_1_and_a_bad_one_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), 2);
    let logs = src.logs(dir.path(), 20);
    let incoming = dir.path().join("incoming");
    std::fs::create_dir_all(&incoming).expect("mkdir");
    let store = PointStore::open(&dir.path().join("store"), support::vm())
        .await
        .expect("open");

    // A flipped byte in the middle: rejected at its record; the caller deletes the layers.
    let mut bad = std::fs::read(&logs[0]).expect("read");
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    let layers = vec![incoming.join("bad.layer")];
    let reader = LogReader::open(std::io::Cursor::new(bad), &Source::expect(1)).expect("header");
    let err = PointStore::stage_full_image(reader, &layers, &logs[0]).unwrap_err();
    assert!(matches!(err, ApplyError::Rejected { .. }), "{err}");

    // A delta is not staged.
    let delta = std::fs::File::open(&logs[1]).expect("open");
    let reader = LogReader::open(std::io::BufReader::new(delta), &Source::expect(2)).expect("hdr");
    let err = PointStore::stage_full_image(reader, &layers, &logs[1]).unwrap_err();
    assert!(
        matches!(err, ApplyError::FirstMustBeFull { sequence: 2 }),
        "{err}"
    );

    // The good log: staged layers, no point until committed.
    let layers = vec![incoming.join("good.layer")];
    let file = std::fs::File::open(&logs[0]).expect("open");
    let reader = LogReader::open(std::io::BufReader::new(file), &Source::expect(1)).expect("hdr");
    let (info, summary) = PointStore::stage_full_image(reader, &layers, &logs[0]).expect("stage");
    assert_eq!((info.sequence, info.full_image), (1, true));
    assert_eq!(
        summary.bytes,
        std::fs::metadata(&logs[0]).expect("meta").len()
    );
    assert!(store.list_points().expect("list").is_empty());
    check(&layers[0]);
    assert!(same(&layers[0], &src.raw(1)));

    let committed = store.commit_staged(&info, &layers).await.expect("commit");
    assert_eq!(committed, info);
    assert!(!layers[0].exists(), "the staged layer moved into the store");
    let points = store.list_points().expect("list");
    assert_eq!(points, vec![info.clone()]);
    let layer = store.point_path(1, 0).expect("path");
    check(&layer);
    assert!(same(&layer, &src.raw(1)));
    store.check_point(1).await.expect("check_point");
    // Committed again (a crash before the apply was recorded): the point as it is.
    assert_eq!(
        store.commit_staged(&info, &layers).await.expect("again"),
        info
    );
    // And the next log applies on top of it.
    let two = store
        .apply(&logs[1], &Source::expect(2))
        .await
        .expect("apply 2");
    assert!(same(
        &store.point_path(two.sequence, 0).expect("path"),
        &src.raw(2)
    ));
}
