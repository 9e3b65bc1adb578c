//! A failover overlay on a retained point: created in O(1), written through NBD, the point under
//! it unchanged; committing flattens it into a standalone image.

#[path = "points_support.rs"]
mod support;

use std::io::{Seek, SeekFrom, Write};

use disk::export::{ExportSpec, NbdExport};
use disk::points::{OverlayError, PointStore, StoreError};
use support::{check, noise, same, Source};

#[tokio::test]
async fn writes_into_an_overlay_leave_the_point_intact_and_commit_flattens_them() {
    let t = std::time::Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), 3);
    let logs = src.logs(dir.path(), 20);
    let store = PointStore::open(&dir.path().join("store"), support::vm())
        .await
        .expect("open");
    for (i, log) in logs.iter().enumerate() {
        store
            .apply(log, &Source::expect(i + 1))
            .await
            .expect("apply");
    }
    let paths = store.create_overlay(2, "failover").await.expect("create");
    assert_eq!(paths.len(), 1);
    assert!(
        std::fs::metadata(&paths[0]).expect("meta").len() < 1 << 20,
        "an overlay is O(1), not a copy"
    );
    assert!(same(&paths[0], &src.raw(2)));

    // The "VM" writes 1 MiB at 5 MiB through NBD.
    let data = noise(77, 1 << 20);
    let export = NbdExport::start(
        &ExportSpec::new(&paths[0], "qcow2").writable(),
        &dir.path().join("run"),
        "vm",
    )
    .await
    .expect("export");
    let mut nbd = export.connect(&[]).await.expect("connect");
    nbd.write(5 << 20, &data).await.expect("write");
    nbd.flush().await.expect("flush");
    nbd.disconnect().await.expect("disconnect");
    export.stop().await;

    let expected = dir.path().join("expected.raw");
    std::fs::copy(src.raw(2), &expected).expect("copy");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&expected)
        .expect("open");
    f.seek(SeekFrom::Start(5 << 20))
        .and_then(|_| f.write_all(&data))
        .expect("write expected");
    drop(f);
    check(&paths[0]);
    assert!(
        same(&paths[0], &expected),
        "the overlay shows the point plus the VM's writes"
    );
    for seq in 1..=3 {
        assert!(
            same(
                &store.point_path(seq, 0).expect("path"),
                &src.raw(seq as usize)
            ),
            "point {seq} changed"
        );
    }

    let err = store
        .create_overlay(3, "failover")
        .await
        .expect_err("same name");
    assert!(matches!(err, OverlayError::Exists(_)), "{err:?}");
    let err = store
        .create_overlay(9, "other")
        .await
        .expect_err("no such point");
    assert!(
        matches!(
            err,
            OverlayError::Store(StoreError::UnknownPoint { sequence: 9 })
        ),
        "{err:?}"
    );
    let err = store
        .create_overlay(1, "../escape")
        .await
        .expect_err("bad name");
    assert!(matches!(err, OverlayError::BadName(_)), "{err:?}");

    let flat = store
        .commit_overlay("failover", &dir.path().join("committed"))
        .await
        .expect("commit");
    check(&flat[0]);
    assert!(
        same(&flat[0], &expected),
        "the committed image is the overlay's content"
    );
    let info = support::run(
        "qemu-img",
        &["info", "--output=json", flat[0].to_str().expect("utf-8")],
    );
    assert!(
        !String::from_utf8_lossy(&info.stdout).contains("backing-filename"),
        "committed image is standalone"
    );
    assert!(store.overlays().expect("overlays").is_empty());
    assert!(matches!(
        store.remove_overlay("failover").await,
        Err(OverlayError::Unknown(_))
    ));
    for seq in 1..=3 {
        assert!(
            same(
                &store.point_path(seq, 0).expect("path"),
                &src.raw(seq as usize)
            ),
            "point {seq} changed"
        );
    }
    eprintln!("overlay: {:?}", t.elapsed());
}
