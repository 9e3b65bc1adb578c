//! Pruning keeps the latest point, the hourly history and app-consistent points, and the base of
//! every overlay; every remaining point still equals its source version.

#[path = "points_support.rs"]
mod support;

use disk::points::{PointStore, RetentionPolicy};
use support::{check, same, Source, T0};
use wire::PointType;

#[tokio::test]
async fn pruning_merges_dropped_points_and_keeps_every_retained_one_intact() {
    let t = std::time::Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), 7);
    // Seven points 40 minutes apart: ages at "now" (version 7 + 10 min) are
    // v1 250, v2 210, v3 170, v4 130, v5 90, v6 50, v7 10 minutes. v2 is application-consistent.
    let store = PointStore::open(&dir.path().join("store"), support::vm())
        .await
        .expect("open");
    for n in 1..=7 {
        let log = dir.path().join(format!("{n}.log"));
        let kind = if n == 2 {
            PointType::ApplicationConsistent
        } else {
            PointType::Standard
        };
        src.log(n, T0 + (n as i64 - 1) * 40 * 60_000_000, kind, &log);
        store.apply(&log, &Source::expect(n)).await.expect("apply");
    }
    let now = T0 + 6 * 40 * 60_000_000 + 10 * 60_000_000;
    let overlay = store
        .create_overlay(3, "test-failover")
        .await
        .expect("overlay on 3");

    // History of 3 hours: hour 0 holds v7, v6 (keep 7); hour 1 v5 (keep); hour 2 v4, v3 (keep 4).
    // v3 stays as the overlay's base, v2 is app-consistent but outside the window, v1 goes.
    let policy = RetentionPolicy {
        recovery_history: 3,
        keep_app_consistent: true,
    };
    let report = store.prune(&policy, now).await.expect("prune");
    assert_eq!(report.merged, vec![1, 2, 6]);
    assert_eq!(report.kept, vec![3, 4, 5, 7]);
    assert_retained(&store, &src, &[3, 4, 5, 7]).await;
    assert!(
        same(&overlay[0], &src.raw(3)),
        "the overlay still shows its base point"
    );

    // Pruning again changes nothing; without the overlay, a 1-hour history keeps only the latest.
    assert_eq!(
        store.prune(&policy, now).await.expect("prune again").merged,
        Vec::<u64>::new()
    );
    store
        .remove_overlay("test-failover")
        .await
        .expect("remove overlay");
    // A point a failover chose and has no overlay on yet stays when the caller names it.
    let latest_only = RetentionPolicy {
        recovery_history: 1,
        keep_app_consistent: true,
    };
    let report = store
        .prune_keeping(&latest_only, now, || [4].into_iter().collect())
        .await
        .expect("prune keeping 4");
    assert_eq!((report.merged, report.kept), (vec![3, 5], vec![4, 7]));
    assert_retained(&store, &src, &[4, 7]).await;
    let report = store.prune(&latest_only, now).await.expect("prune");
    assert_eq!((report.merged, report.kept), (vec![4], vec![7]));
    assert_retained(&store, &src, &[7]).await;
    let backing = support::run(
        "qemu-img",
        &[
            "info",
            "--output=json",
            store
                .point_path(7, 0)
                .expect("path")
                .to_str()
                .expect("utf-8"),
        ],
    );
    assert!(
        !String::from_utf8_lossy(&backing.stdout).contains("backing-filename"),
        "the last point is standalone now"
    );
    eprintln!("prune: {:?}", t.elapsed());
}

async fn assert_retained(store: &PointStore, src: &Source, expected: &[u64]) {
    let points: Vec<u64> = store
        .list_points()
        .expect("list")
        .iter()
        .map(|p| p.sequence)
        .collect();
    assert_eq!(points, expected);
    let files = std::fs::read_dir(store.dir().join("disk0"))
        .expect("disk dir")
        .count();
    assert_eq!(
        files,
        expected.len(),
        "one layer per retained point, nothing else"
    );
    for &seq in expected {
        let layer = store.point_path(seq, 0).expect("path");
        check(&layer);
        assert!(same(&layer, &src.raw(seq as usize)), "point {seq} changed");
    }
}

/// Steady replication with RecoveryHistory 0: each new small point makes the previous one go. The
/// merge writes the small child into the old point's layer, which becomes the child's (the same
/// file: nothing of the base is copied); while a process holds the child open (a VM on an overlay
/// of it), the merge copies instead, and either way every point shows what it should.
#[tokio::test]
async fn a_merge_into_a_small_child_reuses_the_base_and_a_held_child_is_merged_by_a_copy() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), 4);
    let store = PointStore::open(&dir.path().join("store"), support::vm())
        .await
        .expect("open");
    let latest_only = RetentionPolicy {
        recovery_history: 0,
        keep_app_consistent: false,
    };
    let inode = |seq: u64| {
        std::fs::metadata(store.point_path(seq, 0).expect("path"))
            .expect("layer")
            .ino()
    };
    let mut base = 0;
    for n in 1..=3u64 {
        let log = dir.path().join(format!("{n}.log"));
        src.log(n as usize, T0 + n as i64, PointType::Standard, &log);
        store
            .apply(&log, &Source::expect(n as usize))
            .await
            .expect("apply");
        if n == 1 {
            base = inode(1);
            continue;
        }
        let report = store.prune(&latest_only, T0 + 10).await.expect("prune");
        assert_eq!((report.merged, report.kept), (vec![n - 1], vec![n]));
        assert_eq!(inode(n), base, "point {n} took over the base's file");
        assert_retained(&store, &src, &[n]).await;
    }

    // A process holds point 4's chain open through an overlay: the merge cannot write into the
    // base under it, so it copies, and the overlay's view does not move.
    let log = dir.path().join("4.log");
    src.log(4, T0 + 4, PointType::Standard, &log);
    store.apply(&log, &Source::expect(4)).await.expect("apply");
    let overlay = store.create_overlay(4, "held").await.expect("overlay");
    let spawn_holder = || {
        std::process::Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=f",
                overlay[0].display()
            ))
            .arg("--blockdev")
            .arg("driver=qcow2,file=f,node-name=q")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon")
    };
    // Held once opening point 4's layer for writing (as the commit does; this probe writes
    // nothing) fails while qemu-storage-daemon runs. A probe that raced its start (it then could
    // not open the chain and exited) starts it again.
    let layer4 = store.point_path(4, 0).expect("path");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut holder = spawn_holder();
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-storage-daemon never held point 4"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        if holder.try_wait().expect("try_wait").is_some() {
            holder = spawn_holder();
            continue;
        }
        let probe = std::process::Command::new("qemu-io")
            .args(["-c", "quit", "-f", "qcow2"])
            .arg(&layer4)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("qemu-io");
        if !probe.success() && holder.try_wait().expect("try_wait").is_none() {
            break;
        }
    }
    let report = store.prune(&latest_only, T0 + 10).await;
    let _ = holder.kill();
    let _ = holder.wait();
    let report = report.expect("prune by a copy");
    assert_eq!((report.merged, report.kept), (vec![3], vec![4]));
    assert_ne!(inode(4), base, "merged by a copy");
    assert!(
        same(&overlay[0], &src.raw(4)),
        "the overlay still shows point 4"
    );
    store.remove_overlay("held").await.expect("remove overlay");
    assert_retained(&store, &src, &[4]).await;
}

/// A `merge.json` whose point is still committed (a prune cut off before it changed anything) is
/// dropped at the next open, the point intact; one that cannot be read stops the store from
/// opening rather than letting recovery delete layers a child may still read.
#[tokio::test]
async fn an_unstarted_merge_is_dropped_and_an_unreadable_one_stops_recovery() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), 2);
    let root = dir.path().join("store");
    let store = PointStore::open(&root, support::vm()).await.expect("open");
    for n in 1..=2 {
        let log = dir.path().join(format!("{n}.log"));
        src.log(n, T0 + n as i64, PointType::Standard, &log);
        store.apply(&log, &Source::expect(n)).await.expect("apply");
    }
    let marker = store.dir().join("merge.json");
    std::fs::write(&marker, br#"{"point":1,"child":2,"disks":1}"#).expect("marker");
    let store = PointStore::open(&root, support::vm())
        .await
        .expect("open again");
    assert!(!marker.exists(), "the unstarted merge is dropped");
    assert_retained(&store, &src, &[1, 2]).await;

    std::fs::write(&marker, b"{not json").expect("marker");
    assert!(
        PointStore::open(&root, support::vm()).await.is_err(),
        "an unreadable merge.json must stop recovery"
    );
    assert!(
        store.point_path(1, 0).expect("path").exists(),
        "nothing deleted"
    );
}
