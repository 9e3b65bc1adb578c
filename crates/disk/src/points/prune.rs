//! Pruning: dropping point `j` merges its layer into its child's, so the child no longer needs it,
//! then deletes it. The child keeps showing exactly what it showed (qemu-img's safe-mode rebase),
//! and it is replaced by rename, never rewritten in place.

use std::collections::BTreeSet;
use std::path::Path;

use super::durable::{self, tmp_name};
use super::error::{PruneError, StoreError};
use super::layout::{file_name, layer_name};
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
        let _lock = self.lock().await?;
        recover::run(&self.layout)?;
        let mut points = catalog::points(&self.layout)?;
        let pinned: BTreeSet<u64> = catalog::overlays(&self.layout)?
            .iter()
            .map(|o| o.base)
            .collect();
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
        let fail = |source| PruneError::Merge {
            sequence: j.sequence,
            child: child.sequence,
            source,
        };
        for disk in 0..child.disks.len() {
            let layer = self.layout.layer(child.sequence, disk);
            let backing = qemu_img::backing_of(&layer).await.map_err(fail)?;
            if backing.as_deref() != Some(layer_name(j.sequence).as_str()) {
                continue; // standalone (a resynchronization) or already merged before a crash
            }
            let below = qemu_img::backing_of(&self.layout.layer(j.sequence, disk))
                .await
                .map_err(fail)?;
            rebase_by_copy(&layer, below.as_deref(), fail).await?;
        }
        // Uncommit first: from here on the layers are garbage that recovery would delete too.
        let meta = self.layout.point_meta(j.sequence);
        durable::remove_durable(&meta).map_err(StoreError::io("remove", &meta))?;
        for disk in 0..j.disks.len() {
            let layer = self.layout.layer(j.sequence, disk);
            durable::remove_durable(&layer).map_err(StoreError::io("remove", &layer))?;
        }
        tracing::debug!(
            sequence = j.sequence,
            child = child.sequence,
            "merged a recovery point"
        );
        Ok(())
    }
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
