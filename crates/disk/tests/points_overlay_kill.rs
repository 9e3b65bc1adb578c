//! Killing an overlay's creation or its commit (SIGKILL) at random instants never damages a point:
//! every point still passes `qemu-img check` and equals its source version, and running the same
//! operation again (recovery first) ends with the flattened image equal to the overlay's base.

#[path = "points_support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use disk::points::PointStore;
use support::{check, same, Source, HOUR, T0};

/// Set in the child: the work directory whose store the helper works on.
const HELPER_ENV: &str = "VMREPLICA_POINTS_OVERLAY_KILL_HELPER";
const VERSIONS: usize = 3;
/// The overlay's base: not the latest point.
const BASE: u64 = 2;
const KILLS: usize = 20;

/// Not a test of its own: the child process the kill test starts (and kills). It finishes what an
/// earlier, killed run left: commit the overlay if it exists, else create and commit it.
#[tokio::test]
async fn helper_creates_and_commits() {
    let Ok(dir) = std::env::var(HELPER_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let store = PointStore::open(&dir.join("store"), support::vm())
        .await
        .expect("open");
    let exists = store
        .overlays()
        .expect("overlays")
        .iter()
        .any(|o| o.name == "failover");
    if !exists {
        store
            .create_overlay(BASE, "failover")
            .await
            .expect("create");
    }
    store
        .commit_overlay("failover", &dir.join("committed"))
        .await
        .expect("commit");
}

/// The helper run; its output kept (`keep`, read by `wait_with_output`) or dropped.
fn spawn_helper(dir: &Path, keep: bool) -> Child {
    let out = || if keep { Stdio::piped() } else { Stdio::null() };
    Command::new(std::env::current_exe().expect("test executable"))
        .args([
            "--exact",
            "helper_creates_and_commits",
            "--test-threads=1",
            "--quiet",
        ])
        .env(HELPER_ENV, dir)
        .stdout(out())
        .stderr(out())
        .spawn()
        .expect("spawn helper")
}

fn verify_points(vm_dir: &Path, src: &Source) {
    for n in 1..=VERSIONS {
        let layer = vm_dir.join("disk0").join(format!("p{n:020}.qcow2"));
        check(&layer);
        assert!(same(&layer, &src.raw(n)), "point {n} changed after a kill");
    }
}

fn copy_tree(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let ok = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(ok.success());
}

#[test]
fn killing_an_overlay_create_or_commit_never_damages_a_point() {
    if std::env::var(HELPER_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), VERSIONS);
    let store_root = dir.path().join("store");
    let committed = dir.path().join("committed");
    let baseline = dir.path().join("baseline");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = PointStore::open(&baseline, support::vm())
            .await
            .expect("open");
        for n in 1..=VERSIONS {
            let log = dir.path().join(format!("{n}.log"));
            src.log(
                n,
                T0 + (n as i64 - 1) * HOUR,
                wire::PointType::Standard,
                &log,
            );
            store.apply(&log, &Source::expect(n)).await.expect("apply");
        }
    });
    let vm_dir = store_root.join(support::vm().to_string());
    let flattened = committed.join("disk0.qcow2");
    let finished = |src: &Source| {
        check(&flattened);
        assert!(
            same(&flattened, &src.raw(BASE as usize)),
            "the committed image is not the base point"
        );
        assert!(
            !vm_dir.join("overlays").join("failover").exists(),
            "the overlay is gone after its commit"
        );
    };

    copy_tree(&baseline, &store_root);
    let _ = std::fs::remove_dir_all(&committed);
    let start = Instant::now();
    assert!(
        spawn_helper(dir.path(), false)
            .wait()
            .expect("wait")
            .success(),
        "uninterrupted run"
    );
    let full = start.elapsed();
    verify_points(&vm_dir, &src);
    finished(&src);

    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    eprintln!("overlay kill test: seed {seed}, uninterrupted run {full:?}");
    let mut kills = 0;
    while kills < KILLS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        copy_tree(&baseline, &store_root);
        let _ = std::fs::remove_dir_all(&committed);
        let mut child = spawn_helper(dir.path(), false);
        std::thread::sleep(Duration::from_micros(
            seed % (full.as_micros() as u64).max(1),
        ));
        if child.try_wait().expect("try_wait").is_none() {
            child.kill().expect("SIGKILL");
            kills += 1;
        }
        child.wait().expect("reap");
        verify_points(&vm_dir, &src);
        // Running it again finishes the job with the same result (its output says why not).
        let again = spawn_helper(dir.path(), true)
            .wait_with_output()
            .expect("wait");
        assert!(
            again.status.success(),
            "run after a kill (seed {seed}): {}{}",
            String::from_utf8_lossy(&again.stdout),
            String::from_utf8_lossy(&again.stderr)
        );
        verify_points(&vm_dir, &src);
        finished(&src);
    }
}
