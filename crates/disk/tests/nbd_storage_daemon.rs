//! The NBD client against `qemu-storage-daemon` driven over QMP, the way a running VM is: writes
//! through a writable export are tracked by a dirty bitmap, which a second, read-only export publishes
//! as `qemu:dirty-bitmap:bm0` once the bitmap is disabled (RECIPES.md).

#[path = "nbd_support.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use disk::nbd::{dirty_bitmap_context, NbdClient, BASE_ALLOCATION};
use support::*;

const SIZE: u64 = 64 * MIB;
const GRANULARITY: u64 = 64 << 10;

fn start_daemon(dir: &Path, image: &Path) -> (ServerGuard, RawQmp) {
    let (sock, qmp_sock) = (dir.join("nbd.sock"), dir.join("qmp.sock"));
    let file = format!(
        "driver=file,node-name=file0,filename={},cache.direct=off",
        image.display()
    );
    let nbd = format!("addr.type=unix,addr.path={}", sock.display());
    let chardev = format!(
        "socket,id=qmp0,path={},server=on,wait=off",
        qmp_sock.display()
    );
    let args = [
        "--blockdev",
        &file,
        "--blockdev",
        "driver=qcow2,node-name=disk0,file=file0",
        "--nbd-server",
        &nbd,
        "--chardev",
        &chardev,
        "--monitor",
        "chardev=qmp0",
    ];
    let guard = ServerGuard::start("qemu-storage-daemon", &args, &sock);
    let start = Instant::now();
    while !qmp_sock.exists() {
        assert!(start.elapsed() < DEADLINE, "no QMP socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    (guard, RawQmp::connect(&qmp_sock))
}

#[tokio::test]
async fn frozen_dirty_bitmap_lists_exactly_the_written_clusters() {
    tokio::time::timeout(Duration::from_secs(25), scenario())
        .await
        .expect("test timed out");
}

async fn scenario() {
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
    let (server, mut qmp) = start_daemon(dir.path(), &image);
    qmp.execute(r#"{"execute":"block-dirty-bitmap-add","arguments":{"node":"disk0","name":"bm0","persistent":true,"granularity":65536}}"#);
    qmp.execute(r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"exp0","node-name":"disk0","name":"disk0","writable":true}}"#);

    // The "guest": unaligned writes straddling cluster boundaries, and a zeroed range.
    let writes = [(0u64, 1u64), (GRANULARITY - 1, 2), (5 * MIB + 100, 200_000)];
    let zeroed = (30 * MIB, MIB);
    let mut guest = NbdClient::connect_unix(&server.sock, "disk0", &[])
        .await
        .unwrap();
    for (i, &(offset, len)) in writes.iter().enumerate() {
        guest
            .write(offset, &pattern(i as u8, len as usize))
            .await
            .unwrap();
    }
    guest.write_zeroes(zeroed.0, zeroed.1).await.unwrap();
    guest.flush().await.unwrap();

    qmp.execute(
        r#"{"execute":"block-dirty-bitmap-disable","arguments":{"node":"disk0","name":"bm0"}}"#,
    );
    qmp.execute(r#"{"execute":"block-export-add","arguments":{"type":"nbd","id":"exp1","node-name":"disk0","name":"frozen","writable":false,"bitmaps":[{"node":"disk0","name":"bm0"}]}}"#);
    // Writes after the freeze must not show up.
    guest.write(50 * MIB, &pattern(7, 4096)).await.unwrap();

    let bitmap = dirty_bitmap_context("bm0");
    let mut reader = NbdClient::connect_unix(&server.sock, "frozen", &[BASE_ALLOCATION, &bitmap])
        .await
        .unwrap();
    assert!(reader.read_only());
    assert_ne!(
        reader.context_id(BASE_ALLOCATION),
        reader.context_id(&bitmap)
    );

    let mut all = writes.to_vec();
    all.push(zeroed);
    let dirty = reader.map(&bitmap, 0, SIZE).await.unwrap();
    assert_eq!(dirty, expected_dirty(&all, GRANULARITY, SIZE));
    if let Some(theirs) = nbdinfo_map(&bitmap, &server.sock, "frozen") {
        assert_eq!(dirty, theirs, "nbdinfo --map disagrees");
    }

    // Only dirty clusters that hold data need reading; the zeroed one reads as zero.
    let alloc = reader.map(BASE_ALLOCATION, 0, SIZE).await.unwrap();
    let zero_range = alloc
        .iter()
        .find(|e| e.offset <= zeroed.0 && zeroed.0 < e.end())
        .expect("covered");
    assert!(
        zero_range.is_zero() && zero_range.end() >= zeroed.0 + zeroed.1,
        "{alloc:?}"
    );
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let mut back = vec![0; len as usize];
        reader.read(offset, &mut back).await.unwrap();
        assert_eq!(back, pattern(i as u8, len as usize), "write {i} reads back");
    }

    reader.disconnect().await.unwrap();
    guest.disconnect().await.unwrap();
    qmp.execute(r#"{"execute":"quit"}"#);
    drop(server);
}
