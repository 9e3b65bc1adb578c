//! Change tracking with QEMU persistent dirty bitmaps, for disks held by a running QEMU process
//! (a VM, or qemu-storage-daemon standing in for one). The QMP sequences are the verified ones of
//! RECIPES.md ("checkpoint + image fleecing"), the way libvirt's pull-mode backup works.
//!
//! Every tracked disk (a block node) carries exactly one *enabled* bitmap named
//! `vmreplica-<generation>`: it records every guest write since the last point. Taking point
//! `g+1` is one QMP `transaction` across all disks of the VM — add bitmap `g+1`, disable bitmap
//! `g`, start a `blockdev-backup sync=none` into a fleecing overlay — so the point is
//! crash-consistent across disks, and the guest keeps writing (into bitmap `g+1`) while the frozen
//! view is read over NBD through an export that publishes bitmap `g`. Then:
//!
//! | outcome | what happens to the bitmaps |
//! |---|---|
//! | the consumer confirmed the point durable ([`FrozenPoint::commit`]) | bitmap `g` is removed; `g+1` tracks on |
//! | anything failed ([`FrozenPoint::abort`]) | `g` is merged into `g+1`, then removed: no write is ever forgotten |
//! | QEMU was killed (bitmaps come back *inconsistent*) | [`BitmapTracker::status`] says so: that disk needs one hash scan, then tracking restarts |
//!
//! The fleecing overlay is a temporary qcow2 in our work directory, removed on commit and abort.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use wire::{LogEncodeError, LogWriter};

use crate::nbd::{dirty_bitmap_context, NbdClient, NbdError};
use crate::qmp::{QmpClient, QmpError};

/// Granularity of the bitmaps: the unit in which changes are shipped.
pub const GRANULARITY: u64 = 64 * 1024;
/// Names of this tracker's bitmaps: `vmreplica-<generation>`.
pub const PREFIX: &str = "vmreplica-";
/// Largest single read of dirty data.
const READ_CHUNK: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("reading the frozen point failed")]
    Nbd(#[from] NbdError),
    #[error("writing the replication log failed")]
    Log(#[from] LogEncodeError),
    #[error("cannot create the fleecing image {path}: {why}")]
    Fleece { path: String, why: String },
    #[error("block node '{0}' does not exist in the QEMU process")]
    NoSuchNode(String),
    /// [`BitmapTracker::stop_own_nbd_server`] could not tell the server at `socket` to be the
    /// QEMU process's own, so it left it running.
    #[error("the NBD server at {socket} is left running: {why}")]
    NbdServer { socket: String, why: String },
    /// Tracking of this disk cannot be trusted: it needs a hash-scan resynchronization.
    #[error("resynchronization required for '{node}': {why}")]
    ResyncRequired { node: String, why: String },
}

/// The tracking state of one block node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapStatus {
    /// Tracking with this generation's bitmap.
    Tracking(u64),
    /// No vmreplica bitmap on the node.
    Missing,
    /// The bitmap survived an unclean stop of QEMU and cannot be trusted.
    Inconsistent(u64),
}

/// Only qcow2 images store bitmaps. Any other node (a raw disk the VM's QEMU opened as raw) gets
/// bitmaps that live as long as the QEMU process: after it stops they are missing, and that disk
/// is hash-scanned once, as after a crash. (A raw disk opened through a qcow2 metadata overlay,
/// `crate::raw`, is a qcow2 node and keeps them.)
fn can_persist(node_info: &Value) -> bool {
    node_info["drv"].as_str() == Some("qcow2")
}

fn bitmap_name(generation: u64) -> String {
    format!("{PREFIX}{generation}")
}

/// Talks to one QEMU process over QMP.
pub struct BitmapTracker {
    qmp: QmpClient,
    work_dir: PathBuf,
    nbd_socket: PathBuf,
    nbd_started: bool,
    /// The NBD server is the process's own ([`BitmapTracker::with_nbd_server`]), not this one's.
    server_given: bool,
}

/// One disk of a frozen point.
#[derive(Debug, Clone)]
pub struct FrozenDisk {
    pub node: String,
    pub size: u64,
    /// Generation whose bitmap holds this point's changes.
    pub generation: u64,
    /// Whether the node's bitmaps are stored in the image (see [`can_persist`]).
    persistent: bool,
    fleece_node: String,
    fleece_file: PathBuf,
    job_id: String,
    export: String,
    /// Other consistent dirty bitmaps of the node, named `vmr-*` (not this tracker's), exported
    /// with the point (see [`FrozenPoint::other_bitmap`]); they go on recording after the freeze.
    others: Vec<String>,
}

/// Drivers of nodes that name an image's file without being its format node: protocols, and
/// filters (a backup job's own, and those a VM's configuration may put above a disk).
const FILTERS_AND_PROTOCOLS: &[&str] = &[
    "file",
    "host_device",
    "copy-before-write",
    "backup-top",
    "snapshot-access",
    "throttle",
    "copy-on-read",
    "preallocate",
    "compress",
    "blkdebug",
    "blklogwrites",
];

/// Prefix of bitmaps other parts of vmreplica keep on a node, which a frozen point exports too.
pub const OTHER_PREFIX: &str = "vmr-";

/// The longest node name QEMU takes (its `node_name` buffer holds 32 bytes with the NUL).
const MAX_NODE_NAME: usize = 31;

/// The names of what [`BitmapTracker::freeze`] adds to QEMU for `node`: the fleecing node, its
/// backup job and its NBD export. They hold `node` itself when QEMU takes it there (a letter, then
/// letters, digits, `-`, `.`, `_`; the node's name short enough); else `h` and 16 hex digits of
/// its BLAKE3, always the same for one node, so [`BitmapTracker::recover`] and
/// [`BitmapTracker::adopt`] find what an earlier session added. QEMU names a node itself
/// `#blockNNN` (a VM started with `-drive` and no node name), which may not appear in a name, and
/// libvirt's own names may be too long to prefix.
fn own_names(node: &str) -> (String, String, String) {
    let fits = |tag: &str| "vmr-fleece-".len() + tag.len() <= MAX_NODE_NAME;
    let well_formed = node.starts_with(|c: char| c.is_ascii_alphabetic())
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    let tag = if well_formed && fits(node) {
        node.to_string()
    } else {
        let hash = blake3::hash(node.as_bytes());
        format!("h{}", &hash.to_hex()[..16])
    };
    (
        format!("vmr-fleece-{tag}"),
        format!("vmr-fleece-job-{tag}"),
        format!("vmr-frozen-{tag}"),
    )
}

/// A crash-consistent point of all tracked disks, readable over NBD until committed or aborted.
pub struct FrozenPoint {
    pub disks: Vec<FrozenDisk>,
    socket: PathBuf,
}

/// What reading a frozen disk found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub dirty_bytes: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

impl BitmapTracker {
    /// Connects to the QEMU process's QMP socket. `work_dir` holds fleecing images and the NBD socket.
    pub async fn connect(qmp_socket: &Path, work_dir: &Path) -> Result<BitmapTracker, BitmapError> {
        let qmp = QmpClient::connect(qmp_socket, Duration::from_secs(30)).await?;
        // `work_dir` is made by the first freeze: a tracker that only asks (the pending size of a
        // VM whose replication is being removed, say) leaves nothing behind.
        Ok(BitmapTracker {
            qmp,
            work_dir: work_dir.to_path_buf(),
            nbd_socket: work_dir.join("fleece.nbd.sock"),
            nbd_started: false,
            server_given: false,
        })
    }

    /// Uses the NBD server the QEMU process already runs on `socket` (a process can run only one)
    /// instead of starting one.
    pub fn with_nbd_server(mut self, socket: &Path) -> BitmapTracker {
        self.nbd_socket = socket.to_path_buf();
        self.nbd_started = true;
        self.server_given = true;
        self
    }

    async fn node_info(&mut self, node: &str) -> Result<Value, BitmapError> {
        let nodes = self
            .qmp
            .execute("query-named-block-nodes", Some(json!({"flat": true})))
            .await?;
        nodes
            .as_array()
            .and_then(|list| list.iter().find(|n| n["node-name"] == node).cloned())
            .ok_or_else(|| BitmapError::NoSuchNode(node.to_string()))
    }

    /// The vmreplica bitmap state of `node`.
    pub async fn status(&mut self, node: &str) -> Result<BitmapStatus, BitmapError> {
        let info = self.node_info(node).await?;
        let mut found = BitmapStatus::Missing;
        for b in info["dirty-bitmaps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let Some(gen) = b["name"]
                .as_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|g| g.parse().ok())
            else {
                continue;
            };
            if b["inconsistent"].as_bool() == Some(true) {
                return Ok(BitmapStatus::Inconsistent(gen));
            }
            if b["recording"].as_bool() == Some(true) {
                found = BitmapStatus::Tracking(gen);
            }
        }
        Ok(found)
    }

    /// Bytes that `node`'s vmreplica bitmaps mark dirty: changes tracked since the last shipped
    /// point (a disabled bitmap of an interrupted or running cycle counts too, so this is an upper
    /// bound). None when the node is not tracked, or its bitmap cannot be trusted.
    pub async fn tracked_bytes(&mut self, node: &str) -> Result<Option<u64>, BitmapError> {
        let info = self.node_info(node).await?;
        let mut total = 0u64;
        let mut recording = false;
        for b in info["dirty-bitmaps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            if !b["name"].as_str().is_some_and(|n| n.starts_with(PREFIX)) {
                continue;
            }
            if b["inconsistent"].as_bool() == Some(true) {
                return Ok(None);
            }
            recording |= b["recording"].as_bool() == Some(true);
            total = total.saturating_add(b["count"].as_u64().unwrap_or(0));
        }
        Ok(recording.then_some(total))
    }

    /// Starts tracking `node` from now on with bitmap `generation`, removing any vmreplica bitmap
    /// it had (an inconsistent one after a crash, or a stale one).
    pub async fn start_tracking(&mut self, node: &str, generation: u64) -> Result<(), BitmapError> {
        let info = self.node_info(node).await?;
        for b in info["dirty-bitmaps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            if let Some(name) = b["name"].as_str().filter(|n| n.starts_with(PREFIX)) {
                self.qmp
                    .execute(
                        "block-dirty-bitmap-remove",
                        Some(json!({"node": node, "name": name})),
                    )
                    .await?;
            }
        }
        let persistent = can_persist(&info);
        let args = json!({"node": node, "name": bitmap_name(generation), "persistent": persistent, "granularity": GRANULARITY});
        self.qmp
            .execute("block-dirty-bitmap-add", Some(args))
            .await?;
        Ok(())
    }

    /// Ends tracking of `node`: a frozen point an earlier session left (as
    /// [`BitmapTracker::recover`] does), then this tracker's bitmaps and those whose names start
    /// with one of `also` (other parts of vmreplica keep them), from the process and, for
    /// persistent ones, the image.
    pub async fn stop_tracking(&mut self, node: &str, also: &[&str]) -> Result<(), BitmapError> {
        self.clear_point(node).await?;
        let info = self.node_info(node).await?;
        let ours = |n: &&str| n.starts_with(PREFIX) || also.iter().any(|p| n.starts_with(p));
        for b in info["dirty-bitmaps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            if let Some(name) = b["name"].as_str().filter(ours) {
                self.qmp
                    .execute(
                        "block-dirty-bitmap-remove",
                        Some(json!({"node": node, "name": name})),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Stops the NBD server an earlier session of this tracker started at its socket (not one the
    /// process was given: [`BitmapTracker::with_nbd_server`]); true if there was one. A socket
    /// nothing listens at is removed. A server that cannot be told to be the process's own (its
    /// pid, `SO_PEERCRED`, is not the QMP peer's, or either is unknown: another process serves the
    /// path, or QEMU listens on a socket another process made) is an error, and stays.
    pub async fn stop_own_nbd_server(&mut self) -> Result<bool, BitmapError> {
        if self.server_given || !self.nbd_socket.exists() {
            return Ok(false);
        }
        let socket = self.nbd_socket.display().to_string();
        let foreign = |why: String| BitmapError::NbdServer {
            socket: socket.clone(),
            why,
        };
        // The file outlives the process that served it: stop only a server this very process
        // runs there, never another one it runs now (a backup tool's, started after a restart).
        let server = match tokio::net::UnixStream::connect(&self.nbd_socket).await {
            Ok(s) => s.peer_cred().ok().and_then(|c| c.pid()).filter(|p| *p > 0),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                let _ = std::fs::remove_file(&self.nbd_socket);
                return Ok(false);
            }
            Err(e) => return Err(foreign(format!("connecting to it: {e}"))),
        };
        let qemu = self.qmp.peer_pid().filter(|p| *p > 0);
        if server.is_none() || server != qemu {
            return Err(foreign(format!(
                "its process (pid {server:?}) is not known to be the VM's QEMU process (pid {qemu:?})"
            )));
        }
        let stopped = match self.qmp.execute("nbd-server-stop", None).await {
            Ok(_) => true,
            // A socket left by a process that ended: this one runs no server.
            Err(QmpError::Command { .. }) => false,
            Err(e) => return Err(e.into()),
        };
        self.nbd_started = false;
        let _ = std::fs::remove_file(&self.nbd_socket);
        Ok(stopped)
    }

    async fn ensure_nbd_server(&mut self) -> Result<(), BitmapError> {
        if self.nbd_started {
            return Ok(());
        }
        if self.nbd_socket.exists() {
            // An earlier session of ours started the server at this (per-VM) path; the process
            // keeps it running after that QMP session ended.
            let running = self
                .qmp
                .execute("nbd-server-start", Some(self.nbd_address()))
                .await;
            if let Err(QmpError::Command { desc, .. }) = &running {
                if desc.contains("already running") {
                    self.nbd_started = true;
                    return Ok(());
                }
            }
            let _ = std::fs::remove_file(&self.nbd_socket);
            running?;
            self.nbd_started = true;
            return Ok(());
        }
        self.qmp
            .execute("nbd-server-start", Some(self.nbd_address()))
            .await?;
        self.nbd_started = true;
        Ok(())
    }

    fn nbd_address(&self) -> Value {
        json!({"addr": {"type": "unix", "data": {"path": self.nbd_socket.display().to_string()}}})
    }

    /// Uses `socket` for the NBD server this tracker starts in the QEMU process (a stable per-VM
    /// path lets a later session reuse the server an earlier one started).
    pub fn with_nbd_socket(mut self, socket: &Path) -> BitmapTracker {
        self.nbd_socket = socket.to_path_buf();
        self
    }

    /// The format node (not the protocol node) whose image is the file `path`; not a filter above
    /// it, which names the same file: the one a backup job puts there (`copy-before-write`,
    /// `backup-top` before QEMU 6.2; a frozen point an earlier session left has one:
    /// [`BitmapTracker::adopt`]), or a VM's own (`throttle`, ...).
    pub async fn node_for_image(&mut self, path: &Path) -> Result<String, BitmapError> {
        let nodes = self
            .qmp
            .execute("query-named-block-nodes", Some(json!({"flat": true})))
            .await?;
        let wanted = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let same = |f: &str| {
            let p = Path::new(f);
            p == path || std::fs::canonicalize(p).is_ok_and(|c| c == wanted)
        };
        nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| {
                n["drv"]
                    .as_str()
                    .is_some_and(|d| !FILTERS_AND_PROTOCOLS.contains(&d))
            })
            .filter(|n| {
                n["node-name"]
                    .as_str()
                    .is_some_and(|n| !n.starts_with("vmr-"))
            })
            .find(|n| n["file"].as_str().is_some_and(same))
            .and_then(|n| n["node-name"].as_str().map(str::to_string))
            .ok_or_else(|| BitmapError::NoSuchNode(path.display().to_string()))
    }

    /// Removes the fleecing files in the work directory that no node of the process uses: those of
    /// a point that was frozen when an earlier QEMU process of the VM ended (its nodes, named
    /// after that process's own node names, are not found again to be cleared).
    async fn remove_orphan_fleece_files(&mut self) -> Result<(), BitmapError> {
        let nodes = self
            .qmp
            .execute("query-named-block-nodes", Some(json!({"flat": true})))
            .await?;
        let live = |name: &str| {
            nodes
                .as_array()
                .is_some_and(|l| l.iter().any(|n| n["node-name"] == name))
        };
        let Ok(entries) = std::fs::read_dir(&self.work_dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(node) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".qcow2"))
                .filter(|n| n.starts_with("vmr-fleece-"))
            else {
                continue;
            };
            if !live(node) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Ends a frozen point [`BitmapTracker::freeze`] left on `node`, if any: its export, backup
    /// job, fleecing node and file. Its bitmaps stay.
    async fn clear_point(&mut self, node: &str) -> Result<(), BitmapError> {
        let (fleece_node, job_id, export) = own_names(node);
        let _ = self
            .qmp
            .execute(
                "block-export-del",
                Some(json!({"id": export, "mode": "hard"})),
            )
            .await;
        let _ = self
            .qmp
            .execute(
                "block-job-cancel",
                Some(json!({"device": job_id, "force": true})),
            )
            .await;
        for _ in 0..200 {
            match self.node_info(&fleece_node).await {
                Err(BitmapError::NoSuchNode(_)) => break,
                Err(e) => return Err(e),
                Ok(_) => {}
            }
            let _ = self
                .qmp
                .execute("blockdev-del", Some(json!({"node-name": fleece_node})))
                .await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = std::fs::remove_file(self.work_dir.join(format!("{fleece_node}.qcow2")));
        Ok(())
    }

    /// Undoes what an interrupted cycle left on `node`: its fleecing export, job and node, and
    /// disabled bitmaps of older generations, which are merged into the recording one (their
    /// changes may never have been shipped; shipping them again is harmless).
    pub async fn recover(&mut self, node: &str) -> Result<(), BitmapError> {
        self.clear_point(node).await?;
        let BitmapStatus::Tracking(current) = self.status(node).await? else {
            return Ok(());
        };
        let info = self.node_info(node).await?;
        for b in info["dirty-bitmaps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let Some(gen) = b["name"]
                .as_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|g| g.parse::<u64>().ok())
            else {
                continue;
            };
            if gen == current {
                continue;
            }
            let merge = json!({"node": node, "target": bitmap_name(current), "bitmaps": [bitmap_name(gen)]});
            self.qmp
                .execute("block-dirty-bitmap-merge", Some(merge))
                .await?;
            self.qmp
                .execute(
                    "block-dirty-bitmap-remove",
                    Some(json!({"node": node, "name": bitmap_name(gen)})),
                )
                .await?;
        }
        Ok(())
    }

    /// Takes one crash-consistent point across `nodes` (all tracking generation `g`): afterwards the
    /// guest writes go to bitmap `g+1` and the frozen view is exported for reading.
    pub async fn freeze(&mut self, nodes: &[&str]) -> Result<FrozenPoint, BitmapError> {
        std::fs::create_dir_all(&self.work_dir).map_err(|e| BitmapError::Fleece {
            path: self.work_dir.display().to_string(),
            why: e.to_string(),
        })?;
        self.remove_orphan_fleece_files().await?;
        self.ensure_nbd_server().await?;
        let mut disks = Vec::new();
        for node in nodes {
            let generation = match self.status(node).await? {
                BitmapStatus::Tracking(g) => g,
                BitmapStatus::Missing => {
                    return Err(BitmapError::ResyncRequired {
                        node: node.to_string(),
                        why: "no tracking bitmap".into(),
                    })
                }
                BitmapStatus::Inconsistent(_) => {
                    let why =
                        "the bitmap is inconsistent after an unclean stop of QEMU".to_string();
                    return Err(BitmapError::ResyncRequired {
                        node: node.to_string(),
                        why,
                    });
                }
            };
            let info = self.node_info(node).await?;
            let size = info["image"]["virtual-size"].as_u64().unwrap_or(0);
            let others = info["dirty-bitmaps"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .filter(|b| b["inconsistent"].as_bool() != Some(true))
                        .filter_map(|b| b["name"].as_str())
                        .filter(|n| n.starts_with(OTHER_PREFIX))
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            let (fleece_node, job_id, export) = own_names(node);
            let fleece_file = self.work_dir.join(format!("{fleece_node}.qcow2"));
            create_fleece_image(&fleece_file, size)?;
            let add = json!({
                "driver": "qcow2", "node-name": fleece_node,
                "file": {"driver": "file", "filename": fleece_file.display().to_string()},
                "backing": node,
            });
            self.qmp.execute("blockdev-add", Some(add)).await?;
            disks.push(FrozenDisk {
                node: node.to_string(),
                size,
                generation,
                persistent: can_persist(&info),
                job_id,
                export,
                fleece_node,
                fleece_file,
                others,
            });
        }
        let mut actions = Vec::new();
        for d in &disks {
            let next = json!({"node": d.node, "name": bitmap_name(d.generation + 1), "persistent": d.persistent, "granularity": GRANULARITY});
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": next}));
            actions.push(json!({"type": "block-dirty-bitmap-disable", "data": {"node": d.node, "name": bitmap_name(d.generation)}}));
            let backup = json!({"device": d.node, "target": d.fleece_node, "sync": "none", "job-id": d.job_id});
            actions.push(json!({"type": "blockdev-backup", "data": backup}));
        }
        if let Err(e) = self
            .qmp
            .execute("transaction", Some(json!({"actions": actions})))
            .await
        {
            for d in &disks {
                let _ = self
                    .qmp
                    .execute("blockdev-del", Some(json!({"node-name": d.fleece_node})))
                    .await;
                let _ = std::fs::remove_file(&d.fleece_file);
            }
            return Err(e.into());
        }
        let point = FrozenPoint {
            disks,
            socket: self.nbd_socket.clone(),
        };
        for d in &point.disks {
            let mut bitmaps = vec![json!({"node": d.node, "name": bitmap_name(d.generation)})];
            bitmaps.extend(d.others.iter().map(|n| json!({"node": d.node, "name": n})));
            let export = json!({
                "type": "nbd", "id": d.export, "node-name": d.fleece_node, "name": d.export, "writable": false,
                "bitmaps": bitmaps,
            });
            if let Err(e) = self.qmp.execute("block-export-add", Some(export)).await {
                let _ = point.abort(self).await;
                return Err(e.into());
            }
        }
        Ok(point)
    }

    /// The frozen point of `nodes` that [`BitmapTracker::freeze`] took in this QEMU process, each
    /// node's changes in bitmap `generations[i]`, if an earlier session left all of it there (its
    /// daemon stopped before it committed or aborted the point): every node's fleecing export, job
    /// and node, that generation's bitmap disabled and the next one recording, none inconsistent.
    /// Such a view still reads as the disks read at the freeze, whatever the guest wrote since. The
    /// point exports no other bitmaps ([`FrozenPoint::other_bitmap`] finds none). None when a part
    /// is missing: then [`BitmapTracker::recover`] clears what is left.
    pub async fn adopt(
        &mut self,
        nodes: &[&str],
        generations: &[u64],
    ) -> Result<Option<FrozenPoint>, BitmapError> {
        if nodes.len() != generations.len() || nodes.is_empty() {
            return Ok(None);
        }
        let exports = self.qmp.execute("query-block-exports", None).await?;
        let jobs = self.qmp.execute("query-block-jobs", None).await?;
        let mut disks = Vec::with_capacity(nodes.len());
        for (node, &generation) in nodes.iter().zip(generations) {
            let (fleece_node, job_id, export) = own_names(node);
            let fleece_file = self.work_dir.join(format!("{fleece_node}.qcow2"));
            let exported = exports.as_array().is_some_and(|l| {
                l.iter().any(|e| {
                    e["id"] == export.as_str()
                        && e["node-name"] == fleece_node.as_str()
                        && e["shutting-down"].as_bool() != Some(true)
                })
            });
            let backing_up = jobs.as_array().is_some_and(|l| {
                l.iter().any(|j| {
                    j["device"] == job_id.as_str()
                        && j["type"] == "backup"
                        && j["status"] == "running"
                })
            });
            if !exported || !backing_up || !fleece_file.exists() {
                return Ok(None);
            }
            match self.node_info(&fleece_node).await {
                Ok(_) => {}
                Err(BitmapError::NoSuchNode(_)) => return Ok(None),
                Err(e) => return Err(e),
            }
            let info = self.node_info(node).await?;
            let bitmap = |name: String| {
                info["dirty-bitmaps"]
                    .as_array()
                    .and_then(|l| l.iter().find(|b| b["name"] == name.as_str()).cloned())
            };
            let (Some(frozen), Some(next)) = (
                bitmap(bitmap_name(generation)),
                bitmap(bitmap_name(generation + 1)),
            ) else {
                return Ok(None);
            };
            let clean = |b: &Value| b["inconsistent"].as_bool() != Some(true);
            if !clean(&frozen)
                || !clean(&next)
                || frozen["recording"].as_bool() != Some(false)
                || next["recording"].as_bool() != Some(true)
            {
                return Ok(None);
            }
            disks.push(FrozenDisk {
                node: node.to_string(),
                size: info["image"]["virtual-size"].as_u64().unwrap_or(0),
                generation,
                persistent: can_persist(&info),
                fleece_node,
                fleece_file,
                job_id,
                export,
                others: Vec::new(),
            });
        }
        // The NBD server the export is published on still runs (`ensure_nbd_server` finds it).
        self.ensure_nbd_server().await?;
        Ok(Some(FrozenPoint {
            disks,
            socket: self.nbd_socket.clone(),
        }))
    }

    async fn teardown(&mut self, d: &FrozenDisk) -> Result<(), BitmapError> {
        let _ = self
            .qmp
            .execute("block-export-del", Some(json!({"id": d.export})))
            .await;
        // The export goes away asynchronously; wait until the node is free.
        for _ in 0..200 {
            let exports = self.qmp.execute("query-block-exports", None).await?;
            let still = exports
                .as_array()
                .is_some_and(|l| l.iter().any(|e| e["id"] == d.export.as_str()));
            if !still {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self
            .qmp
            .execute(
                "block-job-cancel",
                Some(json!({"device": d.job_id, "force": true})),
            )
            .await;
        for _ in 0..200 {
            let jobs = self.qmp.execute("query-block-jobs", None).await?;
            let still = jobs
                .as_array()
                .is_some_and(|l| l.iter().any(|j| j["device"] == d.job_id.as_str()));
            if !still {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.qmp
            .execute("blockdev-del", Some(json!({"node-name": d.fleece_node})))
            .await?;
        let _ = std::fs::remove_file(&d.fleece_file);
        Ok(())
    }
}

fn create_fleece_image(path: &Path, size: u64) -> Result<(), BitmapError> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .output()
        .map_err(|e| BitmapError::Fleece {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(BitmapError::Fleece {
            path: path.display().to_string(),
            why,
        });
    }
    Ok(())
}

impl FrozenPoint {
    /// Each disk's generation: what [`BitmapTracker::adopt`] needs to find this point again.
    pub fn generations(&self) -> Vec<u64> {
        self.disks.iter().map(|d| d.generation).collect()
    }

    /// The NBD meta context of disk `index`'s changes.
    pub fn dirty_context(&self, index: usize) -> String {
        dirty_bitmap_context(&bitmap_name(self.disks[index].generation))
    }

    /// The byte ranges another bitmap `name` of disk `index` (one of [`OTHER_PREFIX`], consistent
    /// at the freeze) marks dirty — including writes after the freeze, since it goes on recording;
    /// None when the disk has no such bitmap.
    pub async fn other_bitmap(
        &self,
        index: usize,
        name: &str,
    ) -> Result<Option<Vec<(u64, u64)>>, BitmapError> {
        let d = &self.disks[index];
        if !d.others.iter().any(|n| n == name) {
            return Ok(None);
        }
        let context = dirty_bitmap_context(name);
        let mut nbd = NbdClient::connect_unix(&self.socket, &d.export, &[&context]).await?;
        let dirty = nbd.map(&context, 0, d.size).await?;
        nbd.disconnect().await?;
        Ok(Some(
            dirty
                .iter()
                .filter(|e| e.is_dirty())
                .map(|e| (e.offset, e.length))
                .collect(),
        ))
    }

    /// A client of disk `index`'s frozen view with `base:allocation` and its dirty context.
    pub async fn connect(&self, index: usize) -> Result<NbdClient, BitmapError> {
        let d = &self.disks[index];
        let context = self.dirty_context(index);
        Ok(
            NbdClient::connect_unix(&self.socket, &d.export, &["base:allocation", &context])
                .await?,
        )
    }

    /// Reads the dirty extents of disk `index` of the point into `log` as log disk `log_disk`.
    /// Dirty ranges that read as zeros are shipped as zero extents.
    pub async fn read_changes<W: std::io::Write>(
        &self,
        index: usize,
        log_disk: u32,
        log: &mut LogWriter<W>,
    ) -> Result<ReadStats, BitmapError> {
        let d = &self.disks[index];
        let context = dirty_bitmap_context(&bitmap_name(d.generation));
        let mut nbd =
            NbdClient::connect_unix(&self.socket, &d.export, &["base:allocation", &context])
                .await?;
        let dirty = nbd.map(&context, 0, d.size).await?;
        let mut stats = ReadStats::default();
        let mut buf = Vec::new();
        for range in dirty.iter().filter(|e| e.is_dirty()) {
            stats.dirty_bytes += range.length;
            let alloc = nbd
                .map("base:allocation", range.offset, range.length)
                .await?;
            for a in alloc {
                let (start, end) = (a.offset.max(range.offset), a.end().min(range.end()));
                if start >= end {
                    continue;
                }
                if a.is_zero() {
                    log.write_zero(log_disk, start, end - start)?;
                    stats.zero_bytes += end - start;
                    continue;
                }
                let mut off = start;
                while off < end {
                    let len = READ_CHUNK.min(end - off);
                    buf.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
                    nbd.read(off, &mut buf).await?;
                    log.write_data(log_disk, off, &buf)?;
                    stats.data_bytes += len;
                    off += len;
                }
            }
        }
        nbd.disconnect().await?;
        Ok(stats)
    }

    /// The point is durable at the consumer: drop the frozen view and the old bitmaps.
    pub async fn commit(self, tracker: &mut BitmapTracker) -> Result<(), BitmapError> {
        for d in &self.disks {
            tracker.teardown(d).await?;
            let old = json!({"node": d.node, "name": bitmap_name(d.generation)});
            tracker
                .qmp
                .execute("block-dirty-bitmap-remove", Some(old))
                .await?;
        }
        Ok(())
    }

    /// The point could not be stored: fold the old bitmaps into the new ones so the next point
    /// ships these changes too, then drop the frozen view.
    pub async fn abort(self, tracker: &mut BitmapTracker) -> Result<(), BitmapError> {
        let mut first_error = None;
        for d in &self.disks {
            let merge = json!({"node": d.node, "target": bitmap_name(d.generation + 1), "bitmaps": [bitmap_name(d.generation)]});
            let steps = async {
                // The export publishes the old bitmap; it must be gone before the merge.
                tracker.teardown(d).await?;
                tracker
                    .qmp
                    .execute("block-dirty-bitmap-merge", Some(merge))
                    .await?;
                let old = json!({"node": d.node, "name": bitmap_name(d.generation)});
                tracker
                    .qmp
                    .execute("block-dirty-bitmap-remove", Some(old))
                    .await?;
                Ok::<(), BitmapError>(())
            };
            if let Err(e) = steps.await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::own_names;

    #[test]
    fn own_names_are_names_qemu_takes_for_any_node() {
        let (node, job, export) = own_names("libvirt-1-format");
        assert_eq!(node, "vmr-fleece-libvirt-1-format");
        assert_eq!(job, "vmr-fleece-job-libvirt-1-format");
        assert_eq!(export, "vmr-frozen-libvirt-1-format");
        for name in ["#block172", "drive-virtio-disk0-format", "1disk", "a b"] {
            let names = own_names(name);
            for n in [&names.0, &names.1, &names.2] {
                assert!(n.len() <= 31 || n == &names.1, "{n} too long");
                assert!(
                    n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')),
                    "{n}"
                );
            }
            assert_eq!(own_names(name), names, "not the same names twice");
        }
        assert_ne!(own_names("#block172"), own_names("#block173"));
    }
}
