//! Killing a prune (SIGKILL) at random instants never damages a retained point: every point whose
//! metadata file exists still passes `qemu-img check` and equals its source version, and running
//! the prune again completes it.

#[path = "points_support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use disk::points::{PointStore, RetentionPolicy};
use support::{check, same, Source, HOUR, T0};

/// Set in the child: the work directory whose store the helper prunes.
const HELPER_ENV: &str = "VMREPLICA_POINTS_PRUNE_KILL_HELPER";
const VERSIONS: usize = 6;
const KILLS: usize = 20;

fn policy() -> RetentionPolicy {
    // Two hours of history: of six points an hour apart the latest (hour 0) and the one of hour 1
    // stay; four merges, each a copy, a rebase and renames.
    RetentionPolicy {
        recovery_history: 2,
        keep_app_consistent: false,
    }
}

fn now() -> i64 {
    T0 + (VERSIONS as i64 - 1) * HOUR + HOUR / 2
}

/// Not a test of its own: the child process the kill test starts (and kills).
#[tokio::test]
async fn helper_prunes() {
    let Ok(dir) = std::env::var(HELPER_ENV) else {
        return;
    };
    let store = PointStore::open(&PathBuf::from(dir).join("store"), support::vm())
        .await
        .expect("open");
    store.prune(&policy(), now()).await.expect("prune");
}

fn spawn_helper(dir: &Path) -> Child {
    Command::new(std::env::current_exe().expect("test executable"))
        .args(["--exact", "helper_prunes", "--test-threads=1", "--quiet"])
        .env(HELPER_ENV, dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn helper")
}

/// Every point committed in the files (no recovery runs) passes check and equals its version.
/// `shared`: right after a kill, whose `qemu-img commit` may still run and hold its image locks
/// (it writes only the dropped point's layer, which no committed point's own data is read from).
fn verify_committed(vm_dir: &Path, src: &Source, shared: bool) -> Vec<usize> {
    let mut committed = Vec::new();
    for n in 1..=VERSIONS {
        if !vm_dir.join(format!("p{n:020}.json")).exists() {
            continue;
        }
        let layer = vm_dir.join("disk0").join(format!("p{n:020}.qcow2"));
        let layer_s = layer.to_str().expect("utf-8");
        let raw = src.raw(n);
        if shared {
            support::run("qemu-img", &["check", "-U", "-q", "-f", "qcow2", layer_s]);
            let same = Command::new("qemu-img")
                .args(["compare", "-U", "-q", "-f", "qcow2", "-F", "raw", layer_s])
                .arg(&raw)
                .status()
                .expect("compare");
            assert!(
                same.success(),
                "committed point {n} differs from its version after a kill"
            );
        } else {
            check(&layer);
            assert!(
                same(&layer, &raw),
                "committed point {n} differs from its version after a kill"
            );
        }
        committed.push(n);
    }
    assert!(
        committed.contains(&VERSIONS),
        "the latest point must never go"
    );
    committed
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
fn killing_a_prune_at_random_instants_never_damages_a_retained_point() {
    if std::env::var(HELPER_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), VERSIONS);
    let store_root = dir.path().join("store");
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

    copy_tree(&baseline, &store_root);
    let start = Instant::now();
    assert!(
        spawn_helper(dir.path()).wait().expect("wait").success(),
        "uninterrupted prune"
    );
    let full = start.elapsed();
    let survivors = verify_committed(&vm_dir, &src, false);
    assert_eq!(
        survivors,
        vec![VERSIONS - 1, VERSIONS],
        "what the policy keeps"
    );

    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        | 1;
    eprintln!("prune kill test: seed {seed}, uninterrupted prune {full:?}");
    let mut kills = 0;
    while kills < KILLS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        copy_tree(&baseline, &store_root);
        let mut child = spawn_helper(dir.path());
        std::thread::sleep(Duration::from_micros(
            seed % (full.as_micros() as u64).max(1),
        ));
        if child.try_wait().expect("try_wait").is_none() {
            child.kill().expect("SIGKILL");
            kills += 1;
        }
        child.wait().expect("reap");
        verify_committed(&vm_dir, &src, true);
        // The next prune (recovery first) finishes the job with the same result.
        assert!(
            spawn_helper(dir.path()).wait().expect("wait").success(),
            "prune after a kill"
        );
        assert_eq!(
            verify_committed(&vm_dir, &src, false),
            vec![VERSIONS - 1, VERSIONS]
        );
    }
}
