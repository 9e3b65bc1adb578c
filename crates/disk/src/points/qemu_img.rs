//! The `qemu-img` invocations the store needs. QEMU's own tool creates, rebases, checks and
//! flattens every layer, so every layer is a qcow2 that QEMU itself wrote.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Stdio;

use tokio::process::Command;

/// A `qemu-img` run that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    #[error("cannot run qemu-img {verb}")]
    Spawn {
        verb: &'static str,
        source: std::io::Error,
    },
    #[error("qemu-img {verb} {image} failed ({status}): {stderr}")]
    Failed {
        verb: &'static str,
        image: String,
        status: String,
        stderr: String,
    },
    #[error("qemu-img info {image} printed JSON this store cannot read")]
    BadInfo {
        image: String,
        source: serde_json::Error,
    },
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Runs `qemu-img <verb> <args…>`; `image` names the file concerned in errors.
async fn run(verb: &'static str, image: &Path, args: &[&OsStr]) -> Result<Vec<u8>, QemuImgError> {
    let out = Command::new("qemu-img")
        .arg(verb)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| QemuImgError::Spawn { verb, source })?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    Err(QemuImgError::Failed {
        verb,
        image: image.display().to_string(),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Creates a qcow2 of `size` bytes at `path`: a standalone image, or a layer over `backing`
/// (a file name relative to `path`'s directory, qcow2).
pub(crate) async fn create(
    path: &Path,
    backing: Option<&str>,
    size: u64,
) -> Result<(), QemuImgError> {
    let size = size.to_string();
    let mut args: Vec<&OsStr> = vec![os("-q"), os("-f"), os("qcow2")];
    if let Some(b) = backing {
        args.extend([os("-b"), os(b), os("-F"), os("qcow2")]);
    }
    args.extend([path.as_os_str(), os(&size)]);
    run("create", path, &args).await.map(drop)
}

/// The backing file name recorded in `path`'s header, exactly as written (None: standalone).
/// `-U` reads the header even while QEMU holds the image open.
pub(crate) async fn backing_of(path: &Path) -> Result<Option<String>, QemuImgError> {
    let args = [
        os("-U"),
        os("--output=json"),
        os("-f"),
        os("qcow2"),
        path.as_os_str(),
    ];
    let out = run("info", path, &args).await?;
    let info: serde_json::Value =
        serde_json::from_slice(&out).map_err(|source| QemuImgError::BadInfo {
            image: path.display().to_string(),
            source,
        })?;
    Ok(info
        .get("backing-filename")
        .and_then(|v| v.as_str())
        .map(str::to_string))
}

/// Safe-mode rebase: `path` keeps showing exactly what it showed, now over `backing` (relative to
/// `path`'s directory) or over nothing. qemu-img copies into `path` every cluster that reads
/// differently through the new backing, then rewrites the header.
pub(crate) async fn rebase(path: &Path, backing: Option<&str>) -> Result<(), QemuImgError> {
    let mut args: Vec<&OsStr> = vec![os("-q"), os("-f"), os("qcow2"), os("-b")];
    match backing {
        Some(b) => args.extend([os(b), os("-F"), os("qcow2")]),
        None => args.push(os("")),
    }
    args.push(path.as_os_str());
    run("rebase", path, &args).await.map(drop)
}

/// `run/merge-commit.pid`: the pid of a running [`commit_keep`], so that recovery can stop one a
/// killed daemon left behind before anything else writes the same image.
const MERGE_COMMIT: &str = "merge-commit.pid";
/// `run/overlay-<name>.pid`: the pid of a running [`create_recorded`] or [`convert_recorded`] of
/// overlay `name` (its creation, or its commit's flattening), stopped the same way
/// ([`reap_overlay`]).
fn overlay_pid_file(name: &str) -> String {
    format!("overlay-{name}.pid")
}

fn commit_pid_file(run_dir: &Path) -> std::path::PathBuf {
    run_dir.join(MERGE_COMMIT)
}

/// `qemu-img <verb> <args…>` whose pid is kept in `pid_file` while it runs; `image` names the
/// file concerned in errors.
async fn run_recorded(
    verb: &'static str,
    image: &Path,
    args: &[&OsStr],
    pid_file: &Path,
) -> Result<(), QemuImgError> {
    let child = Command::new("qemu-img")
        .arg(verb)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| QemuImgError::Spawn { verb, source })?;
    if let Some(pid) = child.id() {
        if let Some(dir) = pid_file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::write(pid_file, pid.to_string());
    }
    let out = child.wait_with_output().await;
    let _ = std::fs::remove_file(pid_file);
    let out = out.map_err(|source| QemuImgError::Spawn { verb, source })?;
    if out.status.success() {
        return Ok(());
    }
    Err(QemuImgError::Failed {
        verb,
        image: image.display().to_string(),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// `qemu-img commit -d`: writes the clusters `path` holds into its backing file, leaving `path`
/// as it is. Needs the write lock on both (a process holding `path` open makes it fail). Its pid
/// is kept in `run_dir` while it runs.
pub(crate) async fn commit_keep(path: &Path, run_dir: &Path) -> Result<(), QemuImgError> {
    let args = [os("-q"), os("-d"), os("-f"), os("qcow2"), path.as_os_str()];
    run_recorded("commit", path, &args, &commit_pid_file(run_dir)).await
}

/// [`create`] of an image of overlay `overlay`, its pid kept in `run_dir` while it runs.
pub(crate) async fn create_recorded(
    path: &Path,
    backing: &str,
    size: u64,
    (run_dir, overlay): (&Path, &str),
) -> Result<(), QemuImgError> {
    let size = size.to_string();
    let args = [
        os("-q"),
        os("-f"),
        os("qcow2"),
        os("-b"),
        os(backing),
        os("-F"),
        os("qcow2"),
        path.as_os_str(),
        os(&size),
    ];
    run_recorded(
        "create",
        path,
        &args,
        &run_dir.join(overlay_pid_file(overlay)),
    )
    .await
}

/// `qemu-img convert` of an image of overlay `overlay` (its whole chain) into a standalone qcow2
/// `dst`, its pid kept in `run_dir` while it runs.
pub(crate) async fn convert_recorded(
    src: &Path,
    dst: &Path,
    (run_dir, overlay): (&Path, &str),
) -> Result<(), QemuImgError> {
    let args = [
        os("-f"),
        os("qcow2"),
        os("-O"),
        os("qcow2"),
        src.as_os_str(),
        dst.as_os_str(),
    ];
    run_recorded(
        "convert",
        src,
        &args,
        &run_dir.join(overlay_pid_file(overlay)),
    )
    .await
}

/// Stops a [`commit_keep`] a killed daemon left running (SIGKILL, then waits up to 10 s for it to
/// exit and release its image locks). The pid is trusted only while it is a `qemu-img`.
pub(crate) fn reap_commit(run_dir: &Path) {
    reap(
        run_dir,
        MERGE_COMMIT,
        "stopped the merge commit a killed prune left running",
    );
}

/// Stops an overlay's [`create_recorded`] or [`convert_recorded`] a killed daemon left running,
/// as [`reap_commit`] does: a run again would find its image locked, or written under it.
pub(crate) fn reap_overlay(run_dir: &Path, overlay: &str) {
    reap(
        run_dir,
        &overlay_pid_file(overlay),
        "stopped the overlay's qemu-img a killed run left running",
    );
}

fn reap(run_dir: &Path, name: &str, done: &str) {
    let pid_file = run_dir.join(name);
    let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|p| *p > 0)
    else {
        let _ = std::fs::remove_file(&pid_file);
        return;
    };
    // A pid file may outlive a reboot, and its pid be another qemu-img now: ours commits a layer
    // of this store.
    let mut store = run_dir
        .parent()
        .unwrap_or(run_dir)
        .as_os_str()
        .as_bytes()
        .to_vec();
    store.push(b'/');
    let alive = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        // A zombie has exited (its locks are gone); only a live qemu-img counts.
        comm.trim() == "qemu-img"
            && cmdline
                .split(|&b| b == 0)
                .any(|arg| arg.starts_with(&store))
            && !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
    };
    if alive() {
        // SAFETY: kill(2) with a pid from our own pid file, checked to be a live qemu-img.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        tracing::info!(pid, "{done}");
    }
    let _ = std::fs::remove_file(&pid_file);
}

/// `qemu-img check -r leaks`: reclaims clusters a killed writer allocated but never used.
pub(crate) async fn repair_leaks(path: &Path) -> Result<(), QemuImgError> {
    let args = [
        os("-q"),
        os("-r"),
        os("leaks"),
        os("-f"),
        os("qcow2"),
        path.as_os_str(),
    ];
    run("check", path, &args).await.map(drop)
}

/// `qemu-img check`: the image's metadata is consistent (no leaks, no corruptions).
pub(crate) async fn check(path: &Path) -> Result<(), QemuImgError> {
    let args = [os("-q"), os("-f"), os("qcow2"), path.as_os_str()];
    run("check", path, &args).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long-running qemu-img on `image` (a benchmark that would run for minutes).
    fn busy_qemu_img(image: &Path) -> std::process::Child {
        let created = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(image)
            .arg("64M")
            .status()
            .expect("qemu-img create");
        assert!(created.success());
        let child = std::process::Command::new("qemu-img")
            .args(["bench", "-c", "100000000", "-f", "qcow2"])
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-img bench");
        // Until its exec, the child is still this test binary to /proc.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let comm = format!("/proc/{}/comm", child.id());
        while std::fs::read_to_string(&comm).unwrap_or_default().trim() != "qemu-img" {
            assert!(
                std::time::Instant::now() < deadline,
                "qemu-img did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child
    }

    /// Waits up to 10 s for `child` to exit; true if it did.
    fn exits(child: &mut std::process::Child) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if child.try_wait().expect("wait").is_some() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn only_a_qemu_img_on_this_stores_files_is_reaped() {
        let dir = tempfile::tempdir().expect("tempdir");
        // `store2` begins with the store's path: still another directory.
        let (store, elsewhere) = (dir.path().join("store"), dir.path().join("store2"));
        let run = store.join("run");
        std::fs::create_dir_all(&run).expect("run dir");
        std::fs::create_dir_all(&elsewhere).expect("dir");

        // The pid file names a qemu-img on another store's file (a pid reused after a reboot).
        let mut other = busy_qemu_img(&elsewhere.join("layer.qcow2"));
        std::fs::write(commit_pid_file(&run), other.id().to_string()).expect("pid file");
        reap_commit(&run);
        assert!(
            other.try_wait().expect("wait").is_none(),
            "another qemu-img was killed"
        );
        assert!(!commit_pid_file(&run).exists());
        other.kill().expect("kill");
        other.wait().expect("wait");

        // One on this store's layer, as a killed prune leaves it: stopped.
        let mut ours = busy_qemu_img(&store.join("layer.qcow2"));
        std::fs::write(commit_pid_file(&run), ours.id().to_string()).expect("pid file");
        reap_commit(&run);
        assert!(exits(&mut ours), "the store's qemu-img still runs");
    }
}
