//! Pruning: dropping point `j` merges it with its child, so the child no longer needs it. The child
//! keeps showing exactly what it showed.
//!
//! The merge writes the child's clusters down into `j`'s layer (`qemu-img commit -d`: as much work
//! as the child holds, which in steady replication is one small delta over a large base) and then
//! renames that layer to the child's name. Before it starts, `merge.json` records the merge and
//! `j` stops being a point (its metadata goes), so no one opens `j` again, and recovery keeps `j`'s
//! layers, which the child's chain still needs, until the next prune finishes the merge. During the
//! commit the child still reads the same: every cluster written into `j`'s layer is one the child
//! holds itself. Where the commit cannot run (another process holds the child's layer open: a VM
//! on an overlay of it), a copy of the child is rebased onto what lies under `j` (safe mode,
//! as much work as `j` holds) and renamed over the child instead.

use std::path::PathBuf;

use std::collections::BTreeSet;
use std::path::Path;

use super::durable::{self, tmp_name};
use super::error::{PruneError, StoreError};
use super::layout::{file_name, layer_name, Layout};
use super::meta::PointInfo;
use super::policy::{points_to_keep, RetentionPolicy};
use super::qemu_img::{self, QemuImgError};
use super::{catalog, recover, PointStore};

/// What a prune did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Sequences still retained, oldest first.
    pub kept: Vec<u64>,
    /// Sequences merged away, oldest first.
    pub merged: Vec<u64>,
}

impl PointStore {
    /// Drops every point the policy does not keep at `now_micros` (see
    /// [`points_to_keep`]); the base of every overlay is kept.
    pub async fn prune(
        &self,
        policy: &RetentionPolicy,
        now_micros: i64,
    ) -> Result<PruneReport, PruneError> {
        self.prune_keeping(policy, now_micros, BTreeSet::new).await
    }

    /// [`PointStore::prune`] that also keeps the points `chosen` returns, asked once the store is
    /// locked (points a failover or a test failover chose and has no overlay on yet).
    pub async fn prune_keeping(
        &self,
        policy: &RetentionPolicy,
        now_micros: i64,
        chosen: impl FnOnce() -> BTreeSet<u64>,
    ) -> Result<PruneReport, PruneError> {
        let _lock = self.lock().await?;
        recover::run(&self.layout)?;
        // A merge a crash cut off is finished first.
        if let Some(m) = merging(&self.layout)? {
            self.finish_merge(&m, true).await?;
        }
        let mut points = catalog::points(&self.layout)?;
        let mut pinned: BTreeSet<u64> = catalog::overlays(&self.layout)?
            .iter()
            .map(|o| o.base)
            .collect();
        pinned.extend(chosen());
        let keep = points_to_keep(&points, policy, now_micros, &pinned);
        let mut report = PruneReport::default();
        let mut i = 0;
        while i < points.len() {
            if keep.contains(&points[i].sequence) {
                i += 1;
                continue;
            }
            // The latest point is always kept, so a dropped point has a child.
            let child = &points[i + 1];
            self.merge(&points[i], child).await?;
            report.merged.push(points.remove(i).sequence);
        }
        report.kept = points.iter().map(|p| p.sequence).collect();
        tracing::info!(kept = ?report.kept, merged = ?report.merged, "pruned recovery points");
        Ok(report)
    }

    /// Merges point `j` into `child` (the next retained point) and deletes `j`.
    async fn merge(&self, j: &PointInfo, child: &PointInfo) -> Result<(), PruneError> {
        let m = Merge {
            point: j.sequence,
            child: child.sequence,
            disks: child.disks.len(),
        };
        let path = merge_marker(&self.layout);
        let bytes = serde_json::to_vec(&m)
            .map_err(|e| StoreError::io("encode", &path)(std::io::Error::other(e.to_string())))?;
        durable::write_atomic(&path, &bytes).map_err(StoreError::io("write", &path))?;
        // From here on `j` is no point: nothing opens it again.
        let meta = self.layout.point_meta(j.sequence);
        durable::remove_durable(&meta).map_err(StoreError::io("remove", &meta))?;
        self.finish_merge(&m, false).await?;
        tracing::debug!(
            sequence = j.sequence,
            child = child.sequence,
            "merged a recovery point"
        );
        Ok(())
    }

    /// Carries out the merge `merge.json` records, `j` already uncommitted; `resumed` after a
    /// crash (its commit may have been killed halfway: the leaked clusters are reclaimed first).
    async fn finish_merge(&self, m: &Merge, resumed: bool) -> Result<(), PruneError> {
        let fail = |source| PruneError::Merge {
            sequence: m.point,
            child: m.child,
            source,
        };
        for disk in 0..m.disks {
            let j = self.layout.layer(m.point, disk);
            if !j.try_exists().map_err(StoreError::io("stat", &j))? {
                continue; // this disk's merge is done
            }
            let layer = self.layout.layer(m.child, disk);
            let backing = qemu_img::backing_of(&layer).await.map_err(fail)?;
            if backing.as_deref() == Some(layer_name(m.point).as_str()) {
                let committed = async {
                    if resumed {
                        qemu_img::repair_leaks(&j).await?;
                    }
                    qemu_img::commit_keep(&layer, &self.layout.run_dir()).await
                };
                match committed.await {
                    Ok(()) => {
                        // `j`'s layer now shows what the child shows: it becomes the child's.
                        durable::sync_file(&j).map_err(StoreError::io("sync", &j))?;
                        durable::rename_durable(&j, &layer)
                            .map_err(StoreError::io("rename", &j))?;
                        continue;
                    }
                    Err(e) => {
                        tracing::info!(layer = file_name(&layer), "merging by a copy instead: {e}");
                        let below = qemu_img::backing_of(&j).await.map_err(fail)?;
                        rebase_by_copy(&layer, below.as_deref(), fail).await?;
                    }
                }
            }
            // The child no longer reads `j` (a standalone child, a rebase just made or made
            // before a crash).
            durable::remove_durable(&j).map_err(StoreError::io("remove", &j))?;
        }
        let marker = merge_marker(&self.layout);
        durable::remove_durable(&marker).map_err(StoreError::io("remove", &marker))?;
        Ok(())
    }
}

/// The merge in progress: point `point`'s layers going into those of `child` (`disks` of them).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Merge {
    point: u64,
    child: u64,
    disks: usize,
}

fn merge_marker(layout: &Layout) -> PathBuf {
    layout.vm_dir.join("merge.json")
}

/// The merge a crash cut off, if any. A marker that cannot be read is an error, never "none":
/// the layers it names are still needed.
fn merging(layout: &Layout) -> Result<Option<Merge>, StoreError> {
    let path = merge_marker(layout);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("read", &path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StoreError::io("read", &path)(std::io::Error::other(e.to_string())))
}

/// Recovery's part (under the lock): a merge whose point is still committed had not changed
/// anything yet and is dropped (the next prune decides again, with the pins of that time); else
/// the point whose layers the unfinished merge still needs, which recovery must keep, after its
/// `qemu-img commit` left running by a killed prune is stopped.
pub(crate) fn recover_merge(layout: &Layout) -> Result<Option<u64>, StoreError> {
    let Some(m) = merging(layout)? else {
        return Ok(None);
    };
    let meta = layout.point_meta(m.point);
    if meta.try_exists().map_err(StoreError::io("stat", &meta))? {
        let marker = merge_marker(layout);
        durable::remove_durable(&marker).map_err(StoreError::io("remove", &marker))?;
        return Ok(None);
    }
    qemu_img::reap_commit(&layout.run_dir());
    Ok(Some(m.point))
}

/// Rebases a copy of `layer` onto `below` (safe mode) and renames it over `layer`: the layer's
/// path switches atomically from the old file to the new one, and a process that has the old
/// file open keeps reading the old file (and the old backing, which it has open too).
async fn rebase_by_copy(
    layer: &Path,
    below: Option<&str>,
    fail: impl Fn(QemuImgError) -> PruneError,
) -> Result<(), PruneError> {
    let tmp = tmp_name(layer);
    std::fs::copy(layer, &tmp).map_err(StoreError::io("copy", layer))?;
    tracing::debug!(layer = file_name(layer), ?below, "rebasing a copy");
    qemu_img::rebase(&tmp, below).await.map_err(fail)?;
    durable::sync_file(&tmp).map_err(StoreError::io("sync", &tmp))?;
    durable::rename_durable(&tmp, layer).map_err(StoreError::io("rename", &tmp))?;
    Ok(())
}
