//! Killing the applying process (SIGKILL) at random instants never damages a retained point, and
//! the logs re-apply to the same result.

#[path = "points_support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use disk::points::PointStore;
use support::{check, same, tree, Source};

/// Set in the child: the work directory whose logs the helper applies.
const HELPER_ENV: &str = "VMREPLICA_POINTS_KILL_HELPER";
const VERSIONS: usize = 4;
const KILLS: usize = 24;

/// Not a test of its own: the child process the kill test starts (and kills). It applies every
/// log in order, as the daemon would after a restart.
#[tokio::test]
async fn helper_applies_every_log() {
    let Ok(dir) = std::env::var(HELPER_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let store = PointStore::open(&dir.join("store"), support::vm())
        .await
        .expect("open");
    for n in 1..=VERSIONS {
        store
            .apply(&dir.join(format!("{n}.log")), &Source::expect(n))
            .await
            .expect("apply");
    }
}

fn spawn_helper(dir: &Path) -> Child {
    Command::new(std::env::current_exe().expect("test executable"))
        .args([
            "--exact",
            "helper_applies_every_log",
            "--test-threads=1",
            "--quiet",
        ])
        .env(HELPER_ENV, dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn helper")
}

/// The committed points, read from the files alone (no recovery runs): each must pass
/// `qemu-img check` and equal its source version. Returns how many there are.
fn verify_committed(vm_dir: &Path, src: &Source) -> usize {
    let mut committed = 0;
    for n in 1..=VERSIONS {
        if !vm_dir.join(format!("p{n:020}.json")).exists() {
            continue;
        }
        assert_eq!(committed + 1, n, "points are committed in order");
        committed = n;
        let layer = vm_dir.join("disk0").join(format!("p{n:020}.qcow2"));
        check(&layer);
        assert!(
            same(&layer, &src.raw(n)),
            "committed point {n} differs from its version"
        );
    }
    committed
}

/// xorshift seeded from the clock; the seed is printed so a failure can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn killing_the_applier_at_random_instants_never_damages_a_point() {
    if std::env::var(HELPER_ENV).is_ok() {
        return;
    }
    let t = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), VERSIONS);
    src.logs(dir.path(), 20);
    let store_root = dir.path().join("store");
    let vm_dir = store_root.join(support::vm().to_string());

    // How long an uninterrupted run takes: kills land uniformly inside it.
    let start = Instant::now();
    assert!(
        spawn_helper(dir.path()).wait().expect("wait").success(),
        "helper run"
    );
    let full = start.elapsed();
    assert_eq!(verify_committed(&vm_dir, &src), VERSIONS);
    std::fs::remove_dir_all(&store_root).expect("reset");

    let seed = std::env::var("POINTS_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
                | 1
        });
    eprintln!("kill test: seed {seed}, uninterrupted run {full:?}");
    let mut rng = Rng(seed);
    let (mut kills, mut reached) = (0, [0usize; VERSIONS + 1]);
    while kills < KILLS {
        let delay = Duration::from_micros(rng.next() % (full.as_micros() as u64).max(1));
        let mut child = spawn_helper(dir.path());
        std::thread::sleep(delay);
        let finished = child.try_wait().expect("try_wait").is_some();
        if !finished {
            child.kill().expect("SIGKILL");
            kills += 1;
        }
        child.wait().expect("reap");
        let committed = verify_committed(&vm_dir, &src);
        reached[committed] += 1;
        if finished || committed == VERSIONS {
            // A killed applier leaves its qemu-nbd behind (the store's recovery would end it);
            // end it here before its pid file goes with the directory.
            disk::export::reap_stray_exports(&vm_dir.join("run"));
            std::fs::remove_dir_all(&store_root).expect("start over");
        }
    }
    eprintln!("kill test: {kills} kills; committed points when killed: {reached:?}");

    // After the last kill: the interrupted logs re-apply, and every point equals its version.
    assert!(
        spawn_helper(dir.path()).wait().expect("wait").success(),
        "re-apply after kills"
    );
    assert_eq!(verify_committed(&vm_dir, &src), VERSIONS);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = PointStore::open(&store_root, support::vm())
            .await
            .expect("open");
        let before = tree(store.dir());
        for n in 1..=VERSIONS {
            let again = store
                .apply(&dir.path().join(format!("{n}.log")), &Source::expect(n))
                .await
                .expect("re-apply");
            assert_eq!(again.sequence, n as u64);
        }
        assert_eq!(
            tree(store.dir()),
            before,
            "re-applying committed logs changes nothing"
        );
        let leftovers: Vec<_> = tree(store.dir())
            .into_iter()
            .filter(|(p, _, _)| {
                p.to_string_lossy().ends_with(".tmp") || p.starts_with(store.dir().join("run"))
            })
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    });
    assert_eq!(
        disk::export::reap_stray_exports(&vm_dir.join("run")),
        0,
        "the last apply ran recovery: no qemu-nbd may be left"
    );
    eprintln!("kill test: {:?}", t.elapsed());
}
