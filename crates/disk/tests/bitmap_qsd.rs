//! Dirty-bitmap change tracking against a real qemu-storage-daemon: the frozen point is exactly the
//! disk at the instant of the freeze while the "guest" keeps writing, commit and abort keep every
//! write, and an unclean stop of QEMU makes tracking report a resynchronization.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use disk::bitmap::{BitmapStatus, BitmapTracker};
use disk::nbd::NbdClient;
use uuid::Uuid;
use wire::{Compression, Content, DiskInfo, Expect, LogHeader, LogReader, LogWriter, PointType};

const SIZE: u64 = 32 << 20;

struct Qsd {
    child: Child,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_qsd(dir: &Path, image: &Path) -> Qsd {
    start_qsd_with_node(dir, image, "disk0")
}

/// The image's format node named `node`.
fn start_qsd_with_node(dir: &Path, image: &Path, node: &str) -> Qsd {
    let (qmp, guest) = (dir.join("qmp.sock"), dir.join("guest.sock"));
    let _ = std::fs::remove_file(&qmp);
    let _ = std::fs::remove_file(&guest);
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},cache.direct=off",
            image.display()
        ))
        .arg("--blockdev")
        .arg(format!("driver=qcow2,node-name={node},file=file0"))
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", guest.display()))
        .arg("--export")
        .arg(format!(
            "type=nbd,id=guest,node-name={node},name=guest,writable=on"
        ))
        .arg("--chardev")
        .arg(format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            qmp.display()
        ))
        .args(["--monitor", "chardev=qmp0"])
        .spawn()
        .expect("qemu-storage-daemon");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(qmp.exists() && guest.exists()) {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Qsd { child }
}

/// The "guest": writes through the writable export and into a raw mirror of what the disk holds.
struct Guest {
    nbd: NbdClient,
    mirror: std::fs::File,
}

impl Guest {
    async fn write(&mut self, offset: u64, len: usize, seed: u8) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
        self.nbd.write(offset, &data).await.expect("guest write");
        self.mirror.write_all_at(&data, offset).expect("mirror");
    }
}

fn header(seq: u64) -> LogHeader {
    LogHeader {
        vm: Uuid::from_u128(9),
        relationship: 0,
        sequence: seq,
        parent: seq - 1,
        point_time_micros: seq as i64,
        point_type: PointType::Standard,
        full_image: false,
        disks: vec![DiskInfo {
            id: "disk0".into(),
            virtual_size: SIZE,
        }],
    }
}

/// Reads the frozen point into a log and applies it onto the replica file.
async fn ship(
    point: &disk::bitmap::FrozenPoint,
    seq: u64,
    dir: &Path,
    replica: &Path,
) -> disk::bitmap::ReadStats {
    let log_path = dir.join(format!("{seq}.vrlog"));
    let mut log = LogWriter::new(
        std::fs::File::create(&log_path).expect("log"),
        header(seq),
        Compression::default(),
    )
    .expect("writer");
    let stats = point
        .read_changes(0, 0, &mut log)
        .await
        .expect("read changes");
    log.finish().expect("finish");
    let expect = Expect {
        vm: Uuid::from_u128(9),
        relationship: 0,
        sequence: seq,
        parent: seq - 1,
    };
    wire::verify(std::fs::File::open(&log_path).expect("open"), &expect).expect("verify");
    let mut reader =
        LogReader::open(std::fs::File::open(&log_path).expect("open"), &expect).expect("reader");
    let out = OpenOptions::new()
        .write(true)
        .open(replica)
        .expect("replica");
    while let Some(e) = reader.next_extent().expect("extent") {
        match e.content {
            Content::Data(b) => out.write_all_at(b, e.offset).expect("write"),
            Content::Zero(n) => out
                .write_all_at(&vec![0; n as usize], e.offset)
                .expect("zero"),
        }
    }
    stats
}

fn same(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .status()
        .expect("compare")
        .success()
}

/// An empty qcow2 image of [`SIZE`] in `dir`.
fn qcow2_image(dir: &Path) -> PathBuf {
    let image = dir.join("disk.qcow2");
    let created = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg(SIZE.to_string())
        .status();
    assert!(created.expect("img").success());
    image
}

fn zero_file(path: &PathBuf) {
    std::fs::File::create(path)
        .expect("create")
        .set_len(SIZE)
        .expect("size");
}

#[tokio::test]
async fn frozen_points_are_exact_while_the_guest_writes_and_no_write_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let image = qcow2_image(d);
    let (mirror, replica) = (d.join("mirror.raw"), d.join("replica.raw"));
    zero_file(&mirror);
    zero_file(&replica);
    let _qsd = start_qsd(d, &image);

    let mut tracker = BitmapTracker::connect(&d.join("qmp.sock"), &d.join("work"))
        .await
        .expect("tracker")
        .with_nbd_server(&d.join("guest.sock"));
    assert_eq!(
        tracker.status("disk0").await.expect("status"),
        BitmapStatus::Missing
    );
    tracker.start_tracking("disk0", 1).await.expect("start");
    assert_eq!(
        tracker.status("disk0").await.expect("status"),
        BitmapStatus::Tracking(1)
    );
    let nbd = NbdClient::connect_unix(&d.join("guest.sock"), "guest", &[])
        .await
        .expect("guest");
    let mut guest = Guest {
        nbd,
        mirror: OpenOptions::new()
            .write(true)
            .open(&mirror)
            .expect("mirror"),
    };

    // Cycle 1: writes A, freeze, more writes while the frozen view is read.
    guest.write(0, 70_000, 1).await;
    guest.write(5 << 20, 200_000, 2).await;
    guest.write(20 << 20, 4096, 3).await;
    let frozen_copy = d.join("at-freeze-1.raw");
    std::fs::copy(&mirror, &frozen_copy).expect("copy");
    let point = tracker.freeze(&["disk0"]).await.expect("freeze");
    guest.write(5 << 20, 65536, 4).await; // overwrites frozen data: the point must not see it
    guest.write(30 << 20, 8192, 5).await;
    let stats = ship(&point, 2, d, &replica).await;
    assert!(
        same(&replica, &frozen_copy),
        "the shipped point is not the disk at the freeze"
    );
    assert!(
        stats.data_bytes <= 4 * 65536 + 200_000 + 70_000,
        "shipped far more than the dirty blocks: {stats:?}"
    );
    point.commit(&mut tracker).await.expect("commit");
    assert_eq!(
        tracker.status("disk0").await.expect("status"),
        BitmapStatus::Tracking(2)
    );

    // Cycle 2 fails: its changes fold into the next bitmap and arrive with cycle 3.
    let point = tracker.freeze(&["disk0"]).await.expect("freeze 2");
    guest.write(12 << 20, 100_000, 6).await;
    point.abort(&mut tracker).await.expect("abort");
    assert_eq!(
        tracker.status("disk0").await.expect("status"),
        BitmapStatus::Tracking(3)
    );
    guest.write(0, 4096, 7).await;
    let at_freeze = d.join("at-freeze-3.raw");
    std::fs::copy(&mirror, &at_freeze).expect("copy");
    let point = tracker.freeze(&["disk0"]).await.expect("freeze 3");
    let _ = ship(&point, 3, d, &replica).await;
    point.commit(&mut tracker).await.expect("commit 3");
    assert!(
        same(&replica, &at_freeze),
        "writes of the aborted cycle were lost"
    );
    guest.nbd.disconnect().await.expect("disconnect");
}

fn kill(mut qsd: Qsd) {
    qsd.child.kill().expect("SIGKILL");
    let _ = qsd.child.wait();
}

#[tokio::test]
async fn an_unclean_stop_of_qemu_makes_tracking_untrustworthy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let image = qcow2_image(d);

    // A bitmap that never reached the image (QEMU killed before any clean close) is gone.
    let qsd = start_qsd(d, &image);
    let mut tracker = BitmapTracker::connect(&d.join("qmp.sock"), &d.join("work"))
        .await
        .expect("tracker");
    tracker.start_tracking("disk0", 1).await.expect("start");
    drop(tracker);
    kill(qsd);
    let qsd = start_qsd(d, &image);
    let tracker = BitmapTracker::connect(&d.join("qmp.sock"), &d.join("work"))
        .await
        .expect("tracker");
    let mut tracker = tracker.with_nbd_server(&d.join("guest.sock"));
    assert_eq!(
        tracker.status("disk0").await.expect("status"),
        BitmapStatus::Missing
    );
    match tracker.freeze(&["disk0"]).await {
        Err(disk::bitmap::BitmapError::ResyncRequired { why, .. }) => {
            assert!(why.contains("no tracking bitmap"), "{why}")
        }
        Ok(_) => panic!("a disk without a bitmap must not be frozen"),
        Err(e) => panic!("expected ResyncRequired, got {e}"),
    }

    // A bitmap stored by a clean quit, loaded again, then QEMU killed: it comes back inconsistent.
    tracker.start_tracking("disk0", 1).await.expect("start");
    drop(tracker);
    {
        let qmp = disk::qmp::QmpClient::connect(&d.join("qmp.sock"), Duration::from_secs(10))
            .await
            .expect("qmp");
        qmp.quit().await.expect("quit");
    }
    let mut qsd = qsd;
    let _ = qsd.child.wait();
    drop(qsd);
    let qsd = start_qsd(d, &image);
    let mut tracker = BitmapTracker::connect(&d.join("qmp.sock"), &d.join("work"))
        .await
        .expect("tracker");
    assert_eq!(
        tracker.status("disk0").await.expect("status"),
        BitmapStatus::Tracking(1)
    );
    let mut guest = NbdClient::connect_unix(&d.join("guest.sock"), "guest", &[])
        .await
        .expect("guest");
    guest.write(0, &[1; 4096]).await.expect("write");
    guest.flush().await.expect("flush");
    drop(tracker);
    kill(qsd);
    let _qsd = start_qsd(d, &image);
    let tracker = BitmapTracker::connect(&d.join("qmp.sock"), &d.join("work"))
        .await
        .expect("tracker");
    let mut tracker = tracker.with_nbd_server(&d.join("guest.sock"));
    assert_eq!(
        tracker.status("disk0").await.expect("status"),
        BitmapStatus::Inconsistent(1)
    );
    match tracker.freeze(&["disk0"]).await {
        Err(disk::bitmap::BitmapError::ResyncRequired { node, why }) => {
            assert_eq!(node, "disk0");
            assert!(why.contains("inconsistent"), "{why}");
        }
        Ok(_) => panic!("an inconsistent bitmap must not be frozen"),
        Err(e) => panic!("expected ResyncRequired, got {e}"),
    }
    // Tracking restarts: the inconsistent bitmap is replaced.
    tracker
        .start_tracking("disk0", 5)
        .await
        .expect("restart tracking");
    assert_eq!(
        tracker.status("disk0").await.expect("status"),
        BitmapStatus::Tracking(5)
    );
}

#[tokio::test]
async fn a_raw_disk_is_tracked_through_a_qcow2_metadata_overlay_and_stays_raw() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // A raw disk that already holds data: the overlay must keep it.
    let raw = d.join("disk.raw");
    let data: Vec<u8> = (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(&raw, &data).expect("raw");
    let meta = d.join("disk.meta.qcow2");
    disk::raw::create_metadata_overlay(&raw, &meta).expect("metadata overlay");
    assert!(
        std::fs::read(&raw).expect("read") == data,
        "creating the overlay changed the raw disk"
    );
    let (mirror, replica) = (d.join("mirror.raw"), d.join("replica.raw"));
    std::fs::copy(&raw, &mirror).expect("mirror");
    std::fs::copy(&raw, &replica).expect("replica");
    let _qsd = start_qsd(d, &meta);
    let tracker = BitmapTracker::connect(&d.join("qmp.sock"), &d.join("work"))
        .await
        .expect("tracker");
    let mut tracker = tracker.with_nbd_server(&d.join("guest.sock"));
    tracker.start_tracking("disk0", 1).await.expect("start");
    let nbd = NbdClient::connect_unix(&d.join("guest.sock"), "guest", &[])
        .await
        .expect("guest");
    let mut guest = Guest {
        nbd,
        mirror: OpenOptions::new()
            .write(true)
            .open(&mirror)
            .expect("mirror"),
    };
    guest.write(3 << 20, 100_000, 11).await;
    guest.write(17 << 20, 4096, 12).await;
    guest.nbd.flush().await.expect("flush");
    let point = tracker.freeze(&["disk0"]).await.expect("freeze");
    let stats = ship(&point, 2, d, &replica).await;
    point.commit(&mut tracker).await.expect("commit");
    assert!(
        same(&replica, &mirror),
        "the shipped point is not what the guest wrote"
    );
    assert!(
        stats.data_bytes <= 3 * 65536 + 65536,
        "only the dirty blocks are shipped: {stats:?}"
    );
    // The raw file itself holds the guest's bytes: it stays a plain raw image.
    assert!(
        same(&raw, &mirror),
        "the raw data file is not byte-identical to what the guest wrote"
    );
    guest.nbd.disconnect().await.expect("disconnect");
}

/// A node name as libvirt may give it, too long for `vmr-fleece-` in front (QEMU takes 31 bytes):
/// the tracker's own nodes, job and export get names QEMU takes, found again by a later session.
#[tokio::test]
async fn a_disk_whose_node_name_is_long_is_frozen_adopted_and_recovered() {
    const NODE: &str = "drive-virtio-disk0-format";
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let image = qcow2_image(d);
    let (mirror, replica) = (d.join("mirror.raw"), d.join("replica.raw"));
    zero_file(&mirror);
    zero_file(&replica);
    let _qsd = start_qsd_with_node(d, &image, NODE);
    let tracker = BitmapTracker::connect(&d.join("qmp.sock"), &d.join("work"))
        .await
        .expect("tracker");
    let mut tracker = tracker.with_nbd_server(&d.join("guest.sock"));
    assert_eq!(
        tracker.node_for_image(&image).await.expect("node"),
        NODE,
        "the format node"
    );
    tracker.start_tracking(NODE, 1).await.expect("start");
    let nbd = NbdClient::connect_unix(&d.join("guest.sock"), "guest", &[])
        .await
        .expect("guest");
    let mirror_file = OpenOptions::new().write(true).open(&mirror);
    let mut guest = Guest {
        nbd,
        mirror: mirror_file.expect("mirror"),
    };
    guest.write(1 << 20, 300_000, 1).await;
    let at_freeze = d.join("at-freeze.raw");
    std::fs::copy(&mirror, &at_freeze).expect("copy");
    let point = tracker.freeze(&[NODE]).await.expect("freeze");
    guest.write(1 << 20, 65536, 2).await;

    // The daemon "stops" with the point taken: a new session adopts it by the node's name.
    drop(point);
    drop(tracker);
    let tracker = BitmapTracker::connect(&d.join("qmp.sock"), &d.join("work"))
        .await
        .expect("tracker");
    let mut tracker = tracker.with_nbd_server(&d.join("guest.sock"));
    let point = tracker
        .adopt(&[NODE], &[1])
        .await
        .expect("adopt")
        .expect("the frozen point is found again");
    let _ = ship(&point, 2, d, &replica).await;
    assert!(
        same(&replica, &at_freeze),
        "the adopted point is not the disk at the freeze"
    );
    point.commit(&mut tracker).await.expect("commit");
    assert_eq!(
        tracker.status(NODE).await.expect("status"),
        BitmapStatus::Tracking(2)
    );

    // A point left behind and not adopted is cleared: the next freeze works.
    let point = tracker.freeze(&[NODE]).await.expect("freeze 2");
    drop(point);
    tracker.recover(NODE).await.expect("recover");
    assert!(
        tracker.adopt(&[NODE], &[2]).await.expect("adopt").is_none(),
        "recover left the point"
    );
    let point = tracker.freeze(&[NODE]).await.expect("freeze 3");
    let _ = ship(&point, 3, d, &replica).await;
    point.commit(&mut tracker).await.expect("commit 3");
    assert!(same(&replica, &mirror), "a write was lost");
    guest.nbd.disconnect().await.expect("disconnect");
}

/// `stop_own_nbd_server` stops a server only when the VM's own process serves the tracker's socket:
/// not when the file is all that is left, nor when another process listens there.
#[tokio::test]
async fn only_a_server_the_process_itself_runs_at_the_trackers_socket_is_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let image = qcow2_image(d);
    let _qsd = start_qsd(d, &image);
    let (qmp_sock, work) = (d.join("qmp.sock"), d.join("work"));
    let connect = || BitmapTracker::connect(&qmp_sock, &work);

    // Another process listens at the path: left alone, and said so.
    let other = d.join("other.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&other).expect("bind");
    let mut tracker = connect().await.expect("tracker").with_nbd_socket(&other);
    match tracker.stop_own_nbd_server().await {
        Err(disk::bitmap::BitmapError::NbdServer { why, .. }) => {
            assert!(
                why.contains("not known to be the VM's QEMU process"),
                "{why}"
            )
        }
        other => panic!("expected NbdServer, got {other:?}"),
    }
    assert!(other.exists());
    drop(tracker); // QMP serves one client at a time

    // Only a file is left: it goes.
    let stale = d.join("stale.sock");
    std::fs::write(&stale, b"").expect("file");
    let mut tracker = connect().await.expect("tracker").with_nbd_socket(&stale);
    assert!(!tracker.stop_own_nbd_server().await.expect("stop"));
    assert!(!stale.exists());
    drop(tracker);

    // The process serves it (here its guest's server stands in for one a cycle started): stopped,
    // so the process runs no NBD server any more and another may start.
    let guest = d.join("guest.sock");
    let mut tracker = connect().await.expect("tracker").with_nbd_socket(&guest);
    assert!(tracker.stop_own_nbd_server().await.expect("stop"));
    assert!(!guest.exists());
    assert!(NbdClient::connect_unix(&guest, "guest", &[]).await.is_err());
    drop(tracker);
    let qmp = disk::qmp::QmpClient::connect(&qmp_sock, Duration::from_secs(10));
    let mut qmp = qmp.await.expect("qmp");
    let addr = d.join("new.sock").display().to_string();
    qmp.execute(
        "nbd-server-start",
        Some(serde_json::json!({"addr": {"type": "unix", "data": {"path": addr}}})),
    )
    .await
    .expect("no server runs");
}
