//! The replica's recovery-point store: per VM and disk, a qcow2 backing chain whose immutable
//! layers are the retained recovery points.
//!
//! # Layout
//!
//! ```text
//! <root>/<vm-guid>/
//!   .lock                           flock(2) taken by every change (see "Locking")
//!   p<seq:020>.json                 point metadata (PointInfo); the point is committed iff it exists
//!   disk<i>/p<seq:020>.qcow2        the layer of point <seq> for disk <i> of the log's disk table
//!   overlays/<name>/overlay.json    the overlay exists iff this exists (OverlayInfo: base point)
//!   overlays/<name>/disk<i>.qcow2   writable layer over disk<i>/p<base>.qcow2
//!   run/                            sockets and pid files of the qemu-nbd helpers of an apply
//! ```
//!
//! The first point (a full-image log) is a standalone qcow2 of each disk's virtual size. Every later
//! point is a qcow2 whose backing file is the previous retained point's layer, named relative to
//! its own directory (`-b p<prev>.qcow2 -F qcow2`), so the store can be moved as a whole. A point
//! is read by opening its layer as qcow2: QEMU follows the chain. A full-image log arriving on a
//! non-empty store (a resynchronization) starts a new standalone chain; older points stay.
//!
//! The store is self-describing and crash-consistent on its own: the set of committed points is
//! the set of `p<seq>.json` files. The daemon mirrors [`PointStore::list_points`] into its
//! catalog (the rows `Msvm_VirtualSystemSettingData` recovery snapshots show) and can rebuild that
//! mirror from the files at any time; the files, not the mirror, are the truth.
//!
//! # Invariants
//!
//! 1. A committed point's layers exist, pass `qemu-img check`, and show the disk as the primary
//!    saw it at that point; they are never written in place again. Pruning replaces a layer only by
//!    rename, with a file that shows the same bytes.
//! 2. Only committed layers are named as backing files, but one: a new point's backing is the
//!    latest committed point; an overlay's base is a committed point; a child a prune rebased
//!    names the backing of the point merged, which its own commit made valid. The exception is
//!    the point a prune is merging (`merge.json`): uncommitted first, its layers stay the child's
//!    backing until they become the child's layers by rename.
//! 3. Hence a layer without its `.json` is referenced by nothing, and recovery may delete it,
//!    unless `merge.json` names its point. It is either a layer of an apply that died before
//!    committing (its sequence is above every committed one, and no apply builds on an uncommitted
//!    point), or a layer of a merged point whose child no longer reads it.
//!
//! # Crash safety
//!
//! Every durable step is "write a temporary file, fsync, rename, fsync the directory" (or unlink,
//! fsync the directory). The table lists, for each step, what a crash (SIGKILL or power loss)
//! right after it leaves behind, and what recovery — run under the lock by [`PointStore::open`]
//! and before every change — does with it.
//!
//! | operation | step | a crash right after it leaves | recovery |
//! |---|---|---|---|
//! | apply N | read and check the log's header (`Expect`), then, under the lock, its fit on the chain | nothing changed | — |
//! | apply N | `qemu-img create disk<i>/p<N>.qcow2.tmp` (over p<N-1>) | `*.tmp` files | delete `*.tmp` |
//! | apply N | read and verify the rest of the log while writing its extents: a full image straight into standalone qcow2 files (`crate::qcow2`, header written last), a delta through qemu-nbd (several connections per disk) | `*.tmp` files; maybe a qemu-nbd still running | kill the qemu-nbd (pid file in `run/`), delete `*.tmp` |
//! | apply N | the trailer does not match, or a frame is bad: stop the exports, delete the `*.tmp` files, return `Rejected` | nothing changed (or `*.tmp` files if killed while deleting) | delete `*.tmp` |
//! | apply N | the trailer matched: finish the qcow2 metadata (full image), or NBD flush on every connection and stop the exports (delta) | `*.tmp` files | delete `*.tmp` |
//! | apply N | fsync each tmp, rename it to `p<N>.qcow2`, fsync dir | layers without `p<N>.json` | delete layers without `.json` (invariant 3) |
//! | apply N | write `p<N>.json` atomically | **point N committed** | — (re-applying the log returns point N) |
//! | prune j (child c) | write `merge.json` {j, c} atomically | j still committed, intact | delete `merge.json` (nothing changed; the next prune decides again, with the pins of then) |
//! | prune j | delete `p<j>.json` | j uncommitted; its layers still c's backing | keep j's layers (`merge.json`); the next prune finishes |
//! | prune j, per disk | `qemu-img commit -d` c into j's layer (c unchanged; its pid in `run/merge-commit.pid`) | j's layer holds some of c's clusters, maybe leaked ones; c reads the same (each cluster written is one c holds); the commit may still run | stop that commit (SIGKILL, wait for its exit); the next prune reclaims leaks (`qemu-img check -r leaks`) and commits again: idempotent |
//! | prune j, per disk | fsync j's layer, rename it over c's, fsync dir | c's name on j's old file: c's content, over j's backing | — (the next prune finds no j layer for that disk) |
//! | prune j, per disk, when the commit cannot run (c held open) | copy c to `c.tmp`, safe `qemu-img rebase` onto j's backing, fsync, rename over c, then delete j's layer | `c.tmp`, or c over j's backing with j's layer unreferenced | delete `*.tmp`; the next prune copies again or only deletes j's layer |
//! | prune j | delete `merge.json` | **j merged** | — |
//! | create overlay | mkdir, `qemu-img create` its disks (its pid in `run/overlay-<name>.pid`) | an overlay dir without `overlay.json`; the create may still run | stop it (SIGKILL, wait for its exit), delete the dir |
//! | create overlay | write `overlay.json` atomically | **overlay exists**, base pinned | — |
//! | remove overlay | delete `overlay.json` | an overlay dir without `overlay.json` | delete the dir |
//! | commit overlay | `qemu-img convert` to `dest/disk<i>.qcow2.tmp` (its pid in `run/overlay-<name>.pid`), fsync, rename | the flattened images; the overlay still exists; the convert may still run | stop it as above; commit again (it overwrites) |
//!
//! So at any instant every committed point is intact and the log of an uncommitted point can be
//! applied again from scratch. A log is read once: its extents go into the temporary layers as
//! their frames check out, but nothing is renamed or committed before the trailer matched, so a
//! log rejected halfway (or a crash halfway) leaves only `*.tmp` files, which nothing references.
//! A log whose point is already committed is verified in full (no layer is created) and compared
//! with the committed point by its hash.
//!
//! Why prune writes the child down into the dropped point's layer: in steady replication the child
//! is one small delta and the dropped point the large base, and a safe rebase of the child onto
//! nothing copies the whole base into it (every cycle, with RecoveryHistory 0: 20 s for 4 GiB on
//! the test machine, where the commit takes well under a second). The commit writes only the
//! child's clusters, into a layer that is no point any more and that the child's chain reads only
//! where the child holds nothing, so the child's view never changes; qcow2's own ordering of
//! metadata writes (as for QEMU's live block-commit) keeps that layer consistent across a power cut,
//! leaking clusters at worst. The child itself is never written in place (the commit keeps it,
//! `-d`); the rename gives its name to the merged file, and a process that has the old child open
//! keeps reading the old inodes. When a process holds the child open (a VM on an overlay above it),
//! QEMU refuses the commit, and prune copies the child instead (a safe rebase of a copy, renamed
//! over it: the work of the dropped point's size, a reflink on XFS or Btrfs), so pruning never
//! waits for overlays; it only keeps their base. The store never lets QEMU write into a committed
//! layer (no live `block-commit` into the chain): committing an overlay flattens it into a new
//! standalone image instead, which leaves every retained point as it was.
//!
//! A prune killed during its commit may leave that `qemu-img commit` running on its own; recovery
//! stops it (its pid is in `run/`) before anything else writes that layer. A `merge.json` that
//! cannot be read stops recovery with an error rather than letting it delete layers a child still
//! reads, and a build older than this one does not know the file: do not downgrade while a
//! `merge.json` exists.
//!
//! # Locking
//!
//! | operation | lock | why |
//! |---|---|---|
//! | [`PointStore::open`] (recovery) | exclusive | recovery deletes files an unfinished change would still be writing |
//! | [`PointStore::apply`] | exclusive, after reading and checking the log's header; held while the rest is verified and written | recovery, then the new point is built on the latest one |
//! | [`PointStore::prune`] | exclusive | it replaces child layers, writes dropped points' layers and reads the overlay pins |
//! | [`PointStore::create_overlay`], [`PointStore::remove_overlay`] | exclusive | pins must not change while a prune decides |
//! | [`PointStore::commit_overlay`] | none while converting, exclusive to remove the overlay | the overlay pins its base; ancestors change only by rename |
//! | [`PointStore::list_points`], [`PointStore::point_path`], [`PointStore::overlays`] | none | metadata changes only by rename, so a reader sees whole files; a point may be pruned right after it was listed, so a user of a point takes an overlay on it |
//!
//! The lock is `flock(2)`, released by the kernel when its holder dies: a killed apply never leaves
//! the store locked. It orders the processes and tasks of one host; one store has one daemon.
//!
//! QEMU's own image locks are another matter: a prune's `qemu-img commit` opens the child (often
//! the latest point) for writing, though it never changes the child's bytes, and writes the
//! dropped point's layer below it. A tool that opens a point's layers by name meanwhile (an
//! operator's `qemu-img compare`) is refused with "Failed to get shared \"write\" lock"; `-U`
//! reads without the locks and sees the point as committed. A VM is run on an overlay instead.
//!
//! # Pruning
//!
//! [`points_to_keep`] (pure) keeps the latest point, the newest point of each of the last
//! `recovery_history` hours, every application-consistent point inside that window, and the base
//! of every overlay. Every other point is merged into its child, oldest first.
//!
//! # Limits
//!
//! The disk table must not change between points (a resized disk needs a full image). Overlays and
//! layers use backing names relative to their own directory.

mod adopt;
mod apply;
mod catalog;
mod durable;
mod error;
mod layout;
mod lock;
mod meta;
mod overlay;
mod policy;
mod prune;
mod qemu_img;
mod recover;
mod staged;
mod stream;

use std::path::{Path, PathBuf};

use uuid::Uuid;

pub use crate::qcow2::Qcow2Progress;
pub use adopt::AdoptError;
pub use error::{ApplyError, OverlayError, PointCheckError, PruneError, StoreError};
pub use meta::{OverlayInfo, PointDisk, PointInfo, PointKind};
pub use policy::{points_to_keep, RetentionPolicy};
pub use prune::PruneReport;
pub use qemu_img::QemuImgError;
pub use stream::{Checkpoints, LayerMark, StageCheckpoint};

use layout::Layout;
use lock::StoreLock;

/// The recovery points of one VM.
#[derive(Debug, Clone)]
pub struct PointStore {
    layout: Layout,
    vm: Uuid,
}

impl PointStore {
    /// Opens (creating if needed) the store of `vm` under `root` and recovers from any interrupted
    /// change.
    pub async fn open(root: &Path, vm: Uuid) -> Result<PointStore, StoreError> {
        let layout = Layout::of(root, vm);
        std::fs::create_dir_all(&layout.vm_dir)
            .map_err(StoreError::io("create", &layout.vm_dir))?;
        let store = PointStore { layout, vm };
        let _lock = store.lock().await?;
        recover::run(&store.layout)?;
        Ok(store)
    }

    pub fn vm(&self) -> Uuid {
        self.vm
    }

    /// Kills the qemu-nbd helpers an apply left in the store of `vm` under `root` when its daemon
    /// was killed (their pid files in `run/`); returns how many. Without the store's lock, so only
    /// while nothing else can use the store: at the daemon's start. (Opening the store does the
    /// same under the lock, but a store no log arrives for again is not opened.)
    pub fn reap_helpers(root: &Path, vm: Uuid) -> usize {
        let run = Layout::of(root, vm).run_dir();
        // A merge's `qemu-img commit` too (it would end by itself, holding the layers meanwhile).
        qemu_img::reap_commit(&run);
        crate::export::reap_stray_exports(&run)
    }

    /// Where overlay `name` of `vm`'s store under `root` keeps its disk images, in disk-table order
    /// (they exist once [`PointStore::create_overlay`] made them).
    pub fn overlay_disk_paths(root: &Path, vm: Uuid, name: &str, disks: usize) -> Vec<PathBuf> {
        let layout = Layout::of(root, vm);
        (0..disks).map(|i| layout.overlay_disk(name, i)).collect()
    }

    /// Whether overlay `name` exists in `vm`'s store under `root` (without opening the store).
    pub fn overlay_exists(root: &Path, vm: Uuid, name: &str) -> bool {
        Layout::of(root, vm).overlay_meta(name).exists()
    }

    /// The VM's directory in the store.
    pub fn dir(&self) -> &Path {
        &self.layout.vm_dir
    }

    /// Every committed point, oldest first.
    pub fn list_points(&self) -> Result<Vec<PointInfo>, StoreError> {
        catalog::points(&self.layout)
    }

    /// The newest committed point, if any.
    pub fn latest_point(&self) -> Result<Option<PointInfo>, StoreError> {
        Ok(catalog::points(&self.layout)?.pop())
    }

    /// The layer of point `sequence` for disk `disk` (an index into the point's disk table): open
    /// it as qcow2 to read the disk as it was at that point.
    pub fn point_path(&self, sequence: u64, disk: usize) -> Result<PathBuf, StoreError> {
        let point =
            catalog::point(&self.layout, sequence)?.ok_or(StoreError::UnknownPoint { sequence })?;
        if disk >= point.disks.len() {
            return Err(StoreError::UnknownDisk { sequence, disk });
        }
        Ok(self.layout.layer(sequence, disk))
    }

    /// Runs `qemu-img check` on every layer of point `sequence` (a scrub; the store never needs it).
    pub async fn check_point(&self, sequence: u64) -> Result<(), PointCheckError> {
        let point =
            catalog::point(&self.layout, sequence)?.ok_or(StoreError::UnknownPoint { sequence })?;
        for disk in 0..point.disks.len() {
            let layer = self.layout.layer(sequence, disk);
            qemu_img::check(&layer)
                .await
                .map_err(|source| PointCheckError::Check {
                    sequence,
                    disk,
                    source,
                })?;
        }
        Ok(())
    }

    async fn lock(&self) -> Result<StoreLock, StoreError> {
        let path = self.layout.lock_file();
        StoreLock::acquire(&path)
            .await
            .map_err(StoreError::io("lock", &path))
    }
}
