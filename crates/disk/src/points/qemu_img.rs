//! The `qemu-img` invocations the store needs. QEMU's own tool creates, rebases, checks and
//! flattens every layer, so every layer is a qcow2 that QEMU itself wrote.

use std::ffi::OsStr;
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

/// `qemu-img commit -d`: writes the clusters `path` holds into its backing file, leaving `path`
/// as it is. Needs the write lock on both (a process holding `path` open makes it fail).
pub(crate) async fn commit_keep(path: &Path) -> Result<(), QemuImgError> {
    let args = [os("-q"), os("-d"), os("-f"), os("qcow2"), path.as_os_str()];
    run("commit", path, &args).await.map(drop)
}

/// `qemu-img check`: the image's metadata is consistent (no leaks, no corruptions).
pub(crate) async fn check(path: &Path) -> Result<(), QemuImgError> {
    let args = [os("-q"), os("-f"), os("qcow2"), path.as_os_str()];
    run("check", path, &args).await.map(drop)
}

/// Flattens the chain under `src` into a standalone qcow2 at `dst`.
pub(crate) async fn convert(src: &Path, dst: &Path) -> Result<(), QemuImgError> {
    let args = [
        os("-f"),
        os("qcow2"),
        os("-O"),
        os("qcow2"),
        src.as_os_str(),
        dst.as_os_str(),
    ];
    run("convert", src, &args).await.map(drop)
}
