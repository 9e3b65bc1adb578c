//! Supervised qemu-nbd exports: start, use, stop, and no stray process afterwards.

use std::process::Command;
use std::time::Duration;

use disk::export::{reap_stray_exports, ExportSpec, NbdExport};

/// The pid recorded on the first line of a pid file.
fn pid_of(path: &std::path::Path) -> u32 {
    let text = std::fs::read_to_string(path).expect("pid file");
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("pid")
}

/// qemu-nbd runs as `pid` (a zombie waiting for its parent to reap it does not count).
fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    stat.contains("(qemu-nbd)") && state.is_some_and(|s| s != 'Z')
}

fn image(dir: &std::path::Path, fmt: &str) -> std::path::PathBuf {
    let path = dir.join(format!("disk.{fmt}"));
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", fmt])
        .arg(&path)
        .arg("8M")
        .status()
        .expect("qemu-img");
    assert!(ok.success());
    path
}

#[tokio::test]
async fn an_export_serves_the_image_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    for fmt in ["qcow2", "raw", "vhdx"] {
        let img = image(dir.path(), fmt);
        let export = NbdExport::start(&ExportSpec::new(&img, fmt).writable(), dir.path(), fmt)
            .await
            .expect("start");
        let pid = pid_of(&dir.path().join(format!("{fmt}.nbd.pid")));
        assert!(alive(pid));
        let mut nbd = export.connect(&["base:allocation"]).await.expect("connect");
        assert_eq!(nbd.size(), 8 << 20);
        nbd.write(1 << 20, &[0xA5; 4096]).await.expect("write");
        nbd.flush().await.expect("flush");
        let mut back = vec![0u8; 4096];
        nbd.read(1 << 20, &mut back).await.expect("read");
        assert!(back.iter().all(|&b| b == 0xA5));
        nbd.disconnect().await.expect("disconnect");
        export.stop().await;
        assert!(!alive(pid), "{fmt}: qemu-nbd still runs after stop");
        assert!(!dir.path().join(format!("{fmt}.nbd.sock")).exists());
    }
}

#[tokio::test]
async fn a_bad_image_is_a_clear_error_and_strays_are_reaped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.qcow2");
    match NbdExport::start(&ExportSpec::new(&missing, "qcow2"), dir.path(), "m").await {
        Err(disk::export::ExportError::Exited { stderr, .. }) => {
            assert!(stderr.contains("missing.qcow2"), "{stderr}")
        }
        other => panic!("expected Exited, got {:?}", other.err()),
    }

    // A crashed owner leaves a running qemu-nbd and its pid file: reap_stray_exports ends it.
    let img = image(dir.path(), "qcow2");
    let export = NbdExport::start(&ExportSpec::new(&img, "qcow2"), dir.path(), "stray")
        .await
        .expect("start");
    let pid = pid_of(&dir.path().join("stray.nbd.pid"));
    std::mem::forget(export); // as if the owner died without dropping it
    assert!(alive(pid));

    // A pid file whose pid is a qemu-nbd serving another socket (its pid reused after a reboot,
    // say): that one is left alone.
    let others = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        others.path().join("old.nbd.pid"),
        format!("{pid}\n{}\n", others.path().join("old.nbd.sock").display()),
    )
    .expect("pid file");
    assert_eq!(reap_stray_exports(others.path()), 0);
    assert!(alive(pid));
    assert_eq!(reap_stray_exports(dir.path()), 1);
    for _ in 0..100 {
        if !alive(pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(pid));
    assert!(!dir.path().join("stray.nbd.pid").exists());
}

#[tokio::test]
async fn a_deep_directory_gets_a_short_private_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let deep = dir.path().join("a".repeat(60)).join("b".repeat(60));
    std::fs::create_dir_all(&deep).expect("mkdir");
    let img = image(dir.path(), "qcow2");
    let export = NbdExport::start(&ExportSpec::new(&img, "qcow2"), &deep, "deep")
        .await
        .expect("start");
    let socket = export.socket().to_path_buf();
    assert!(socket.as_os_str().len() < 108, "{}", socket.display());
    let nbd = export.connect(&[]).await.expect("connect");
    nbd.disconnect().await.expect("disconnect");
    export.stop().await;
    assert!(
        !socket.exists() && !socket.parent().expect("dir").exists(),
        "the private socket directory was left"
    );
}
