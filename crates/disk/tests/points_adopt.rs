//! Adoption: a VM's own qcow2 images become the store's first point without a copy; the next log
//! applies on top; a raw image, a layered image or a second adoption are refused with nothing
//! changed; the old names stay until they are released, also after an adoption cut off after its
//! commit.

#[path = "points_support.rs"]
mod support;

use disk::points::{AdoptError, PointDisk, PointInfo, PointKind, PointStore};
use support::{check, run, same, Source, DISK_SIZE};

fn info(sequence: u64) -> PointInfo {
    PointInfo {
        sequence,
        log_parent: 0,
        time_micros: support::T0,
        kind: PointKind::Standard,
        full_image: true,
        disks: vec![PointDisk {
            id: "scsi0".into(),
            virtual_size: DISK_SIZE,
        }],
        log_hash: "0".repeat(64),
        log_bytes: 0,
    }
}

fn qcow2_of(raw: &std::path::Path, out: &std::path::Path) {
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
}

/// A store under `dir`/`store` whose point `sequence` adopted `dir`/`image`, a qcow2 copy of
/// version 1 of `src`; returns the store, its root and the image's path.
async fn adopted_store(
    dir: &std::path::Path,
    src: &Source,
    (store, image): (&str, &str),
    sequence: u64,
) -> (PointStore, std::path::PathBuf, std::path::PathBuf) {
    let image = dir.join(image);
    qcow2_of(&src.raw(1), &image);
    let root = dir.join(store);
    let points = PointStore::open(&root, support::vm()).await.expect("open");
    points
        .adopt(&info(sequence), std::slice::from_ref(&image))
        .await
        .expect("adopt");
    (points, root, image)
}

#[tokio::test]
async fn own_images_become_the_first_point_and_logs_apply_on_top() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), 2);
    let logs = src.logs(dir.path(), 20);
    let image = dir.path().join("vm-disk.qcow2");
    qcow2_of(&src.raw(1), &image);
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&image).unwrap());
    let store = PointStore::open(&dir.path().join("store"), support::vm())
        .await
        .expect("open");

    // Refusals change nothing.
    let raw = dir.path().join("raw-disk");
    std::fs::copy(src.raw(1), &raw).unwrap();
    assert!(matches!(
        store.adopt(&info(1), std::slice::from_ref(&raw)).await,
        Err(AdoptError::NotAdoptable(_))
    ));
    let layered = dir.path().join("layered.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            image.to_str().unwrap(),
            "-F",
            "qcow2",
            layered.to_str().unwrap(),
        ],
    );
    assert!(matches!(
        store.adopt(&info(1), &[layered]).await,
        Err(AdoptError::NotAdoptable(_))
    ));
    assert!(raw.exists() && store.list_points().unwrap().is_empty());

    store
        .adopt(&info(1), std::slice::from_ref(&image))
        .await
        .expect("adopt");
    let layer = store.point_path(1, 0).unwrap();
    assert!(image.exists(), "the old name stays until it is released");
    assert_eq!(
        store.release_adopted().await.expect("release"),
        vec![image.clone()]
    );
    assert!(!image.exists(), "the old name goes");
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&layer).unwrap()),
        ino,
        "the same file: nothing was copied"
    );
    assert!(same(&layer, &src.raw(1)));
    store
        .apply(&logs[1], &Source::expect(2))
        .await
        .expect("apply");
    check(&store.point_path(2, 0).unwrap());
    assert!(same(&store.point_path(2, 0).unwrap(), &src.raw(2)));
    // A second adoption is refused.
    let again = dir.path().join("again.qcow2");
    qcow2_of(&src.raw(1), &again);
    assert!(matches!(
        store.adopt(&info(3), std::slice::from_ref(&again)).await,
        Err(AdoptError::NotAdoptable(_))
    ));
    assert!(again.exists());
}

#[tokio::test]
async fn an_adoption_cut_off_after_its_commit_is_taken_as_it_is_and_its_names_released_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), 1);
    let (store, root, image) = adopted_store(dir.path(), &src, ("store", "vm-disk.qcow2"), 4).await;
    // Cut off here (the names not released yet); the store opened again, the adoption asked
    // again takes the point as it is.
    drop(store);
    let store = PointStore::open(&root, support::vm()).await.expect("open");
    store
        .adopt(&info(4), std::slice::from_ref(&image))
        .await
        .expect("adopted already");
    assert_eq!(store.list_points().unwrap().len(), 1);
    assert!(image.exists());
    assert_eq!(
        store.release_adopted().await.expect("release"),
        vec![image.clone()]
    );
    assert!(!image.exists());
    assert!(same(&store.point_path(4, 0).unwrap(), &src.raw(1)));
    assert!(store.release_adopted().await.expect("again").is_empty());
}

#[tokio::test]
async fn a_release_leaves_a_file_put_at_an_old_name_since_and_an_adoption_cut_off_before_its_commit_leaves_the_images(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), 1);
    let (store, _, image) = adopted_store(dir.path(), &src, ("store", "vm-disk.qcow2"), 1).await;
    // Another file at the old name: not the point's layer, so it stays.
    std::fs::remove_file(&image).unwrap();
    std::fs::write(&image, b"someone else's").unwrap();
    assert!(store.release_adopted().await.expect("release").is_empty());
    assert_eq!(std::fs::read(&image).unwrap(), b"someone else's");

    // Cut off before the commit: the point's metadata is missing. Recovery deletes the layer (the
    // extra name); the release leaves the image, and its record (asked again later).
    let (store2, dir2, other) = adopted_store(dir.path(), &src, ("store2", "other.qcow2"), 1).await;
    let vm_dir2 = dir2.join(support::vm().hyphenated().to_string());
    std::fs::remove_file(vm_dir2.join(format!("p{:020}.json", 1))).unwrap();
    drop(store2);
    let store2 = PointStore::open(&dir2, support::vm()).await.expect("open");
    assert!(store2.list_points().unwrap().is_empty());
    assert!(store2.release_adopted().await.expect("release").is_empty());
    assert!(other.exists() && same(&other, &src.raw(1)));
    assert!(vm_dir2.join("adopted.json").exists());
    // Adopted again (the failback run again), then released.
    store2
        .adopt(&info(1), std::slice::from_ref(&other))
        .await
        .expect("adopt again");
    assert_eq!(
        store2.release_adopted().await.expect("release"),
        vec![other.clone()]
    );
    assert!(!vm_dir2.join("adopted.json").exists());
    assert!(same(&store2.point_path(1, 0).unwrap(), &src.raw(1)));
}

#[tokio::test]
async fn an_adoption_cut_off_is_dropped_when_other_images_are_adopted_and_a_merge_does_not_keep_a_name(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), 2);
    let logs = src.logs(dir.path(), 20);
    let (store, _, image) = adopted_store(dir.path(), &src, ("store", "vm-disk.qcow2"), 1).await;
    // Cut off; the disk is replaced by another file meanwhile: adopting it drops the first
    // point (its layer only: the replaced file is gone with it, not the new image's name).
    std::fs::remove_file(&image).unwrap();
    qcow2_of(&src.raw(2), &image);
    store
        .adopt(&info(1), std::slice::from_ref(&image))
        .await
        .expect("adopt the new file");
    assert_eq!(store.list_points().unwrap().len(), 1);
    assert!(same(&store.point_path(1, 0).unwrap(), &src.raw(2)));
    // A log applied and the old point merged away before the release (its file renamed to the
    // new point's layer): the old name still goes, by its file, not by its layer's name.
    let (store2, _, merged) = adopted_store(dir.path(), &src, ("store2", "merged.qcow2"), 1).await;
    store2
        .apply(&logs[1], &Source::expect(2))
        .await
        .expect("apply");
    let latest_only = disk::points::RetentionPolicy {
        recovery_history: 0,
        keep_app_consistent: false,
    };
    let report = store2
        .prune(&latest_only, support::T0 + 3_600_000_000)
        .await
        .expect("prune");
    assert_eq!(report.merged, vec![1]);
    assert_eq!(store2.list_points().unwrap().len(), 1);
    assert_eq!(
        store2.release_adopted().await.expect("release"),
        vec![merged.clone()]
    );
    assert!(!merged.exists());
    assert!(same(&store2.point_path(2, 0).unwrap(), &src.raw(2)));
    assert!(store.release_adopted().await.expect("release").len() == 1);
}

#[tokio::test]
async fn a_stale_adoption_record_never_drops_a_point_an_overlay_stands_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), 1);
    let (store, _, image) = adopted_store(dir.path(), &src, ("store", "vm-disk.qcow2"), 1).await;
    // The release did not happen (the record stays); the old name is gone by other means, and
    // the VM runs on an overlay of point 1 (a failover).
    std::fs::remove_file(&image).unwrap();
    store.create_overlay(1, "failover").await.expect("overlay");
    let other = dir.path().join("other.qcow2");
    qcow2_of(&src.raw(1), &other);
    assert!(matches!(
        store.adopt(&info(1), std::slice::from_ref(&other)).await,
        Err(AdoptError::NotAdoptable(_))
    ));
    assert_eq!(store.list_points().unwrap().len(), 1);
    assert!(same(&store.point_path(1, 0).unwrap(), &src.raw(1)));
}
