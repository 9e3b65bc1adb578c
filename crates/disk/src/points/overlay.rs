//! Overlays for failover and test failover: a writable qcow2 per disk whose backing file is a
//! retained point's layer, created in O(1). Committing flattens the overlay's whole chain into a
//! standalone image outside the store (`qemu-img convert`), so no retained point ever changes.

use std::path::{Path, PathBuf};

use super::durable::{self, tmp_name};
use super::error::{OverlayError, StoreError};
use super::layout::{layer_name, valid_overlay_name};
use super::meta::OverlayInfo;
use super::{catalog, qemu_img, recover, PointStore};

impl PointStore {
    /// Creates overlay `name` on point `sequence` and returns its disk images (disk-table order).
    /// The point is kept by pruning until the overlay is removed or committed.
    pub async fn create_overlay(
        &self,
        sequence: u64,
        name: &str,
    ) -> Result<Vec<PathBuf>, OverlayError> {
        if !valid_overlay_name(name) {
            return Err(OverlayError::BadName(name.to_string()));
        }
        let _lock = self.lock().await?;
        qemu_img::reap_overlay(&self.layout.run_dir(), name);
        recover::run(&self.layout)?;
        let point =
            catalog::point(&self.layout, sequence)?.ok_or(StoreError::UnknownPoint { sequence })?;
        let dir = self.layout.overlay_dir(name);
        if dir.exists() {
            return Err(OverlayError::Exists(name.to_string()));
        }
        std::fs::create_dir_all(&dir).map_err(StoreError::io("create", &dir))?;
        let mut paths = Vec::with_capacity(point.disks.len());
        for (disk, info) in point.disks.iter().enumerate() {
            let path = self.layout.overlay_disk(name, disk);
            let backing = format!("../../disk{disk}/{}", layer_name(sequence));
            let run = self.layout.run_dir();
            qemu_img::create_recorded(&path, &backing, info.virtual_size, (&run, name)).await?;
            durable::sync_file(&path).map_err(StoreError::io("sync", &path))?;
            paths.push(path);
        }
        let info = OverlayInfo {
            name: name.to_string(),
            base: sequence,
            disks: paths.len(),
        };
        write_meta(&self.layout.overlay_meta(name), &info)?;
        durable::sync_parent(&dir).map_err(StoreError::io("sync", &dir))?;
        Ok(paths)
    }

    /// Every overlay, by name.
    pub fn overlays(&self) -> Result<Vec<OverlayInfo>, StoreError> {
        catalog::overlays(&self.layout)
    }

    /// Deletes overlay `name` and everything written into it (a reverted failover, a finished test
    /// failover). The VM using it must have stopped.
    pub async fn remove_overlay(&self, name: &str) -> Result<(), OverlayError> {
        let _lock = self.lock().await?;
        self.remove_locked(name)
    }

    /// Flattens overlay `name` (its writes over its base point) into standalone qcow2 images
    /// `dest/disk<i>.qcow2`, then removes the overlay. The VM using it must have stopped.
    pub async fn commit_overlay(
        &self,
        name: &str,
        dest: &Path,
    ) -> Result<Vec<PathBuf>, OverlayError> {
        let info = catalog::overlay(&self.layout, name)?
            .ok_or_else(|| OverlayError::Unknown(name.to_string()))?;
        std::fs::create_dir_all(dest).map_err(StoreError::io("create", dest))?;
        // A killed run's flattening may still be writing into `dest`.
        qemu_img::reap_overlay(&self.layout.run_dir(), name);
        // No lock while converting: the base point is pinned by the overlay, and a concurrent prune
        // only replaces ancestor layers by rename, which the running convert does not see.
        let mut out = Vec::with_capacity(info.disks);
        for disk in 0..info.disks {
            let target = dest.join(format!("disk{disk}.qcow2"));
            let tmp = tmp_name(&target);
            let run = self.layout.run_dir();
            qemu_img::convert_recorded(&self.layout.overlay_disk(name, disk), &tmp, (&run, name))
                .await?;
            durable::sync_file(&tmp).map_err(StoreError::io("sync", &tmp))?;
            durable::rename_durable(&tmp, &target).map_err(StoreError::io("rename", &tmp))?;
            out.push(target);
        }
        let _lock = self.lock().await?;
        self.remove_locked(name)?;
        Ok(out)
    }

    fn remove_locked(&self, name: &str) -> Result<(), OverlayError> {
        let meta = self.layout.overlay_meta(name);
        if !valid_overlay_name(name) || !meta.exists() {
            return Err(OverlayError::Unknown(name.to_string()));
        }
        // Without its metadata the directory is garbage that recovery removes too.
        durable::remove_durable(&meta).map_err(StoreError::io("remove", &meta))?;
        let dir = self.layout.overlay_dir(name);
        std::fs::remove_dir_all(&dir).map_err(StoreError::io("remove", &dir))?;
        durable::sync_parent(&dir).map_err(StoreError::io("sync", &dir))?;
        Ok(())
    }
}

fn write_meta(path: &Path, info: &OverlayInfo) -> Result<(), StoreError> {
    let json = serde_json::to_vec_pretty(info).map_err(|source| StoreError::BadOverlayMeta {
        path: path.display().to_string(),
        source,
    })?;
    durable::write_atomic(path, &json).map_err(StoreError::io("write", path))
}
