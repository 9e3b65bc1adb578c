//! Supervised `qemu-nbd` exports: how the data plane opens an image of any format QEMU supports.
//!
//! [`NbdExport::start`] runs `qemu-nbd` in the foreground (never `--fork`) on a private unix socket,
//! waits until it accepts connections, and records its pid (and socket) in a pid file in a
//! directory of ours. A unix socket path must stay under 108 bytes, so when the directory is deep
//! the socket goes into a private (0700) directory under the system's temporary directory. Dropping the export kills the process and removes both files, and
//! [`reap_stray_exports`] kills what a crashed daemon left behind, so no helper process outlives
//! its owner. A process that dies is noticed by [`NbdExport::check_alive`].

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::nbd::{NbdClient, NbdError};

/// Name under which every export is published.
pub const EXPORT_NAME: &str = "disk";
/// How long qemu-nbd may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot start qemu-nbd")]
    Spawn(#[source] std::io::Error),
    #[error("qemu-nbd for {image} exited before serving: {stderr}")]
    Exited { image: String, stderr: String },
    #[error("qemu-nbd for {image} did not start listening within {START_TIMEOUT:?}")]
    Timeout { image: String },
    #[error("qemu-nbd for {image} died ({status})")]
    Died { image: String, status: String },
    #[error("cannot prepare the export directory {path}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Nbd(#[from] NbdError),
}

/// What to export and how.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    pub image: PathBuf,
    /// QEMU format name: raw, qcow2, vhdx, vmdk, ...
    pub format: String,
    pub read_only: bool,
    /// A persistent dirty bitmap of the image to publish as `qemu:dirty-bitmap:<name>`.
    pub bitmap: Option<String>,
    /// Publish `qemu:allocation-depth` too (useful on backing chains).
    pub allocation_depth: bool,
    /// Read-only without taking the image's locks (QEMU's `force-share`), so a tool writing the
    /// file meanwhile is not refused; what is read may then be older than its writes.
    pub force_share: bool,
}

impl ExportSpec {
    pub fn new(image: impl Into<PathBuf>, format: &str) -> ExportSpec {
        ExportSpec {
            image: image.into(),
            format: format.to_string(),
            read_only: true,
            bitmap: None,
            allocation_depth: false,
            force_share: false,
        }
    }

    pub fn writable(mut self) -> ExportSpec {
        self.read_only = false;
        self
    }
}

/// A running qemu-nbd serving one image.
pub struct NbdExport {
    child: Child,
    socket: PathBuf,
    pid_file: PathBuf,
    image: String,
}

impl NbdExport {
    /// Starts qemu-nbd for `spec` with its socket and pid file in `dir` (named by `name`).
    pub async fn start(
        spec: &ExportSpec,
        dir: &Path,
        name: &str,
    ) -> Result<NbdExport, ExportError> {
        std::fs::create_dir_all(dir).map_err(|source| ExportError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let pid_file = dir.join(format!("{name}.nbd.pid"));
        let socket = socket_path(dir, name)?;
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg("--socket").arg(&socket);
        if !spec.force_share {
            cmd.arg("--format").arg(&spec.format);
        }
        cmd.arg("--export-name")
            .arg(EXPORT_NAME)
            .arg("--persistent")
            .arg("--shared=4")
            .arg("--cache=writeback")
            .arg("--discard=unmap");
        if spec.read_only {
            cmd.arg("--read-only");
        }
        if let Some(bitmap) = &spec.bitmap {
            cmd.arg("--bitmap").arg(bitmap);
        }
        if spec.allocation_depth {
            cmd.arg("--allocation-depth");
        }
        if spec.force_share && spec.read_only {
            // (In --image-opts a comma inside a value is written twice.)
            let path = spec.image.display().to_string().replace(',', ",,");
            let format = spec.format.replace(',', ",,");
            cmd.arg("--image-opts").arg(format!(
                "driver={format},file.driver=file,file.filename={path},force-share=on"
            ));
        } else {
            cmd.arg(&spec.image);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(ExportError::Spawn)?;
        if let Some(pid) = child.id() {
            let _ = std::fs::write(&pid_file, format!("{pid}\n{}\n", socket.display()));
        }
        let image = spec.image.display().to_string();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().map_err(ExportError::Spawn)? {
                let stderr = read_stderr(&mut child).await;
                let _ = std::fs::remove_file(&pid_file);
                let _ = status;
                return Err(ExportError::Exited { image, stderr });
            }
            // qemu-nbd listens before it has opened the image, so only a completed NBD handshake
            // proves the export is served; a failed one is retried until the process exits.
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                if let Ok(probe) = NbdClient::connect_unix(&socket, EXPORT_NAME, &[]).await {
                    let _ = probe.disconnect().await;
                    break;
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                let _ = std::fs::remove_file(&pid_file);
                return Err(ExportError::Timeout { image });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(NbdExport {
            child,
            socket,
            pid_file,
            image,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A new client connection with the given meta contexts.
    pub async fn connect(&self, meta_contexts: &[&str]) -> Result<NbdClient, ExportError> {
        Ok(NbdClient::connect_unix(&self.socket, EXPORT_NAME, meta_contexts).await?)
    }

    /// An error if the qemu-nbd process has died.
    pub fn check_alive(&mut self) -> Result<(), ExportError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(ExportError::Died {
                image: self.image.clone(),
                status: status.to_string(),
            }),
            Err(e) => Err(ExportError::Spawn(e)),
        }
    }

    /// Stops qemu-nbd (clients must have disconnected and flushed) and waits for it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        self.cleanup();
    }

    fn cleanup(&self) {
        remove_socket(&self.socket);
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

impl Drop for NbdExport {
    fn drop(&mut self) {
        // kill_on_drop ends the process; the files go with it.
        let _ = self.child.start_kill();
        self.cleanup();
    }
}

/// Longest unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Prefix of the private socket directories made under the temporary directory.
const SHORT_DIR_PREFIX: &str = "vmr-nbd-";

/// `<dir>/<name>.nbd.sock`, or a socket in a fresh private directory when that path is too long.
fn socket_path(dir: &Path, name: &str) -> Result<PathBuf, ExportError> {
    let natural = dir.join(format!("{name}.nbd.sock"));
    if natural.as_os_str().len() <= MAX_SOCKET_PATH {
        return Ok(natural);
    }
    let short = std::env::temp_dir().join(format!("{SHORT_DIR_PREFIX}{:016x}", random_u64()));
    std::fs::create_dir(&short).map_err(|source| ExportError::Dir {
        path: short.display().to_string(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o700));
    Ok(short.join("s"))
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Removes a socket, and its private directory if it has one.
fn remove_socket(socket: &Path) {
    let _ = std::fs::remove_file(socket);
    if let Some(parent) = socket.parent() {
        let private = parent
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(SHORT_DIR_PREFIX));
        if private {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

async fn read_stderr(child: &mut Child) -> String {
    use tokio::io::AsyncReadExt;
    let mut text = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = tokio::time::timeout(Duration::from_secs(2), err.read_to_string(&mut text)).await;
    }
    text.trim().to_string()
}

/// Kills the qemu-nbd processes whose pid files are left in `dir` (after a crash of the owner) and
/// removes the files. A pid is killed only if it still runs qemu-nbd. Returns how many were killed.
pub fn reap_stray_exports(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.ends_with(".nbd.pid") {
            continue;
        }
        // Line 1: the pid; line 2: the socket (which may live in a private directory).
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lines = text.lines();
        let pid = lines.next().and_then(|t| t.trim().parse::<u32>().ok());
        let socket = lines.next().filter(|s| !s.is_empty());
        if let Some(socket) = socket {
            remove_socket(Path::new(socket));
        }
        if let Some(pid) = pid {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            // A pid file may outlive a reboot, and its pid be another qemu-nbd now: only the one
            // serving this file's socket is ours.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let serves = socket.is_none_or(|socket| {
                cmdline
                    .split(|&b| b == 0)
                    .any(|arg| arg == socket.as_bytes())
            });
            if comm.trim() == "qemu-nbd" && serves {
                let pid = i32::try_from(pid).unwrap_or(0);
                // SAFETY: kill(2) with a pid read from our own pid file, checked to be qemu-nbd.
                if pid > 0 && unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                    killed += 1;
                }
            }
        }
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(dir.join(name.replace(".nbd.pid", ".nbd.sock")));
    }
    killed
}
