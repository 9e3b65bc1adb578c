//! The NBD client against real `qemu-nbd` exports: data round trips checked by `qemu-img compare`,
//! allocation maps cross-checked with `nbdinfo`, an offline dirty bitmap, and the typed errors.

#[path = "nbd_support.rs"]
mod support;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use disk::nbd::{
    dirty_bitmap_context, Extent, NbdClient, NbdError, BASE_ALLOCATION, STATE_HOLE, STATE_ZERO,
};
use support::*;

const SIZE: u64 = 64 * MIB;
const TEST_LIMIT: Duration = Duration::from_secs(25);

async fn within<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test timed out");
}

/// Writes, zeroes and trims through NBD and applies the same bytes to a raw file with std::fs;
/// the image must then compare equal with `qemu-img compare`.
async fn round_trip(format: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join(format!("disk.{format}"));
    let reference = dir.path().join("reference.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        format,
        image.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    let ref_file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&reference)
        .unwrap();
    ref_file.set_len(SIZE).unwrap();

    let server = ServerGuard::qemu_nbd(
        dir.path(),
        &image,
        format,
        &["--discard=unmap", "--cache=writeback"],
    );
    let mut nbd = NbdClient::connect_unix(&server.sock, "disk0", &[])
        .await
        .unwrap();
    assert_eq!(nbd.size(), SIZE);
    assert!(!nbd.read_only() && nbd.can_write_zeroes() && nbd.can_flush());

    // Unaligned small writes, the last byte, and one 33 MiB write that must be split.
    let writes: [(u64, usize); 4] = [
        (0, 4096),
        (MIB + 512, 100_000),
        (10 * MIB + 7, 33 * MIB as usize),
        (SIZE - 1, 1),
    ];
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let data = pattern(i as u8 + 1, len);
        nbd.write(offset, &data).await.unwrap();
        ref_file.write_all_at(&data, offset).unwrap();
    }
    nbd.write_zeroes(12 * MIB, MIB + 3).await.unwrap();
    ref_file
        .write_all_at(&vec![0; (MIB + 3) as usize], 12 * MIB)
        .unwrap();

    // Trimmed bytes may read back as anything: mirror what the server now returns.
    if nbd.can_trim() {
        nbd.trim(20 * MIB, 2 * MIB).await.unwrap();
        let mut after = vec![0xAA; 2 * MIB as usize];
        nbd.read(20 * MIB, &mut after).await.unwrap();
        ref_file.write_all_at(&after, 20 * MIB).unwrap();
    }

    let mut whole = vec![0xFF; SIZE as usize];
    nbd.read(0, &mut whole).await.unwrap();
    assert!(
        whole == std::fs::read(&reference).unwrap(),
        "{format}: NBD read differs from the reference"
    );
    nbd.flush().await.unwrap();
    nbd.disconnect().await.unwrap();
    server.stop();

    let (same, out) = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            format,
            "-F",
            "raw",
            image.to_str().unwrap(),
            reference.to_str().unwrap(),
        ],
    );
    assert!(same, "{format}: qemu-img compare: {out}");
    let (ok, out) = if format == "qcow2" {
        run("qemu-img", &["check", "-q", image.to_str().unwrap()])
    } else {
        (true, String::new())
    };
    assert!(ok, "qemu-img check: {out}");
}

#[tokio::test]
async fn raw_round_trip_matches_qemu_img_compare() {
    within(round_trip("raw")).await;
}

#[tokio::test]
async fn qcow2_round_trip_matches_qemu_img_compare() {
    within(round_trip("qcow2")).await;
}

#[tokio::test]
async fn vhdx_round_trip_matches_qemu_img_compare() {
    within(round_trip("vhdx")).await;
}

#[tokio::test]
async fn allocation_map_reports_holes_zeroes_and_data() {
    within(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
            &SIZE.to_string(),
        ]);
        let server = ServerGuard::qemu_nbd(
            dir.path(),
            &image,
            "qcow2",
            &["--discard=unmap", "--shared=2"],
        );
        let mut nbd = NbdClient::connect_unix(&server.sock, "disk0", &[BASE_ALLOCATION])
            .await
            .unwrap();
        assert!(nbd.context_id(BASE_ALLOCATION).is_some());

        let fresh = nbd.map(BASE_ALLOCATION, 0, SIZE).await.unwrap();
        assert_eq!(
            fresh,
            vec![Extent {
                offset: 0,
                length: SIZE,
                flags: STATE_HOLE | STATE_ZERO
            }]
        );

        nbd.write(MIB, &pattern(9, 128 << 10)).await.unwrap();
        nbd.write(5 * MIB, &pattern(8, 4096)).await.unwrap();
        nbd.write_zeroes(5 * MIB, 64 << 10).await.unwrap();
        nbd.flush().await.unwrap();

        let map = nbd.map(BASE_ALLOCATION, 0, SIZE).await.unwrap();
        assert_contiguous(&map, 0, SIZE);
        let data: Vec<_> = map
            .iter()
            .filter(|e| e.is_data())
            .map(|e| (e.offset, e.length))
            .collect();
        assert_eq!(
            data,
            vec![(MIB, 128 << 10)],
            "only the written range holds data: {map:?}"
        );
        assert!(map.iter().all(|e| e.is_data() || e.is_zero()));

        // A short query is clipped to the requested range.
        let one = nbd
            .block_status(BASE_ALLOCATION, MIB + 4096, 100)
            .await
            .unwrap();
        assert_eq!(
            one,
            vec![Extent {
                offset: MIB + 4096,
                length: 100,
                flags: 0
            }]
        );

        if let Some(theirs) = nbdinfo_map(BASE_ALLOCATION, &server.sock, "disk0") {
            assert_eq!(map, theirs, "nbdinfo --map disagrees");
        }
        nbd.disconnect().await.unwrap();
        server.stop();
    })
    .await;
}

#[tokio::test]
async fn offline_bitmap_exported_by_qemu_nbd_lists_written_clusters() {
    within(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.qcow2");
        let img = image.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", img, &SIZE.to_string()]);
        qemu_img(&["bitmap", "--add", "-g", "64K", img, "bm0"]);

        let writes = [(100u64, 10u64), (3 * MIB - 1, 2), (40 * MIB, 3 * MIB)];
        let server = ServerGuard::qemu_nbd(dir.path(), &image, "qcow2", &[]);
        let mut nbd = NbdClient::connect_unix(&server.sock, "disk0", &[])
            .await
            .unwrap();
        for &(offset, len) in &writes[..2] {
            nbd.write(offset, &pattern(3, len as usize)).await.unwrap();
        }
        nbd.write_zeroes(writes[2].0, writes[2].1).await.unwrap();
        nbd.disconnect().await.unwrap();
        server.stop();

        qemu_img(&["bitmap", "--disable", img, "bm0"]);
        let server = ServerGuard::qemu_nbd(dir.path(), &image, "qcow2", &["-r", "-B", "bm0"]);
        let context = dirty_bitmap_context("bm0");
        let mut nbd = NbdClient::connect_unix(&server.sock, "disk0", &[&context, BASE_ALLOCATION])
            .await
            .unwrap();
        assert!(nbd.read_only());
        let dirty = nbd.map(&context, 0, SIZE).await.unwrap();
        assert_eq!(dirty, expected_dirty(&writes, 64 << 10, SIZE));
        nbd.disconnect().await.unwrap();
        server.stop();
    })
    .await;
}

#[tokio::test]
async fn refusals_and_misuse_are_typed_errors() {
    within(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.raw");
        qemu_img(&["create", "-q", "-f", "raw", image.to_str().unwrap(), "1M"]);
        let server = ServerGuard::qemu_nbd(dir.path(), &image, "raw", &["-r", "--shared=4"]);

        match NbdClient::connect_unix(&server.sock, "nope", &[]).await {
            Err(NbdError::OptionRefused {
                option,
                code,
                message,
            }) => {
                assert_eq!(option, "NBD_OPT_GO");
                assert_eq!(code.to_string(), "NBD_REP_ERR_UNKNOWN");
                assert!(message.contains("nope"), "{message}");
            }
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
        let mut nbd = NbdClient::connect_unix(&server.sock, "disk0", &["qemu:dirty-bitmap:none"])
            .await
            .unwrap();
        assert_eq!(nbd.context_id("qemu:dirty-bitmap:none"), None);
        assert!(matches!(nbd.write(0, b"x").await, Err(NbdError::ReadOnly)));
        assert!(matches!(
            nbd.read(MIB - 1, &mut [0; 2]).await,
            Err(NbdError::OutOfRange { .. })
        ));
        assert!(matches!(
            nbd.map(BASE_ALLOCATION, 0, MIB).await,
            Err(NbdError::UnknownContext(_))
        ));
        let mut buf = vec![1; 1000];
        nbd.read(MIB - 1000, &mut buf).await.unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        nbd.disconnect().await.unwrap();
        server.stop();
        assert_no_socket_left(dir.path());
    })
    .await;
}

fn assert_contiguous(map: &[Extent], offset: u64, len: u64) {
    let mut at = offset;
    for e in map {
        assert_eq!(e.offset, at, "gap or overlap in {map:?}");
        at = e.end();
    }
    assert_eq!(at, offset + len);
}

fn assert_no_socket_left(dir: &Path) {
    assert!(
        !dir.join("nbd.sock").exists(),
        "qemu-nbd left its socket behind"
    );
}
