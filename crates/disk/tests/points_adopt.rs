//! Adoption: a VM's own qcow2 images become the store's first point without a copy; the next log
//! applies on top; a raw image, a layered image or a second adoption are refused with nothing
//! changed; an adoption cut off after its commit is finished when asked again.

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
    assert!(!image.exists(), "the old name goes");
    let layer = store.point_path(1, 0).unwrap();
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
async fn an_adoption_cut_off_after_its_commit_is_finished_when_asked_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), 1);
    let image = dir.path().join("vm-disk.qcow2");
    qcow2_of(&src.raw(1), &image);
    let store = PointStore::open(&dir.path().join("store"), support::vm())
        .await
        .expect("open");
    store
        .adopt(&info(4), std::slice::from_ref(&image))
        .await
        .expect("adopt");
    // As if the old name had not been removed yet: link it back.
    std::fs::hard_link(store.point_path(4, 0).unwrap(), &image).unwrap();
    store
        .adopt(&info(4), std::slice::from_ref(&image))
        .await
        .expect("finish");
    assert!(!image.exists());
    assert!(same(&store.point_path(4, 0).unwrap(), &src.raw(1)));
}
