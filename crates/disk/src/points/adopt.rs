//! Adoption: a VM's own standalone qcow2 images become the first point of an empty store without
//! a byte being copied (a failback takes the old primary's disks as its base this way).
//!
//! Each image gets a second name, its layer (a hard link: same file system only); then the point
//! is committed (`p<seq>.json`); only then do the images' old names go. A crash before the commit
//! leaves uncommitted layers, which recovery deletes: only the extra names go, the images stay. A
//! crash after it leaves the point committed and the old names still there, which
//! [`PointStore::adopt`] finishes when asked again.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::durable;
use super::error::StoreError;
use super::meta::PointInfo;
use super::{catalog, qemu_img, recover, PointStore};

/// Why images could not be adopted; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("{0}")]
    NotAdoptable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

impl PointStore {
    /// Makes `images` (one per disk of `info`, standalone qcow2 files on the store's file system)
    /// the layers of point `info`, the store's first. Their old names are removed once the point
    /// is committed.
    pub async fn adopt(&self, info: &PointInfo, images: &[PathBuf]) -> Result<(), AdoptError> {
        let no = |why: String| Err(AdoptError::NotAdoptable(why));
        if images.len() != info.disks.len() || images.is_empty() {
            return no("one image per disk is needed".into());
        }
        let _lock = self.lock().await?;
        recover::run(&self.layout)?;
        let points = catalog::points(&self.layout)?;
        let layers: Vec<PathBuf> = (0..images.len())
            .map(|i| self.layout.layer(info.sequence, i))
            .collect();
        // Asked again after a crash that followed the commit: finish.
        if points.len() == 1
            && points[0].sequence == info.sequence
            && images.iter().zip(&layers).all(|(i, l)| same_file(i, l))
        {
            for image in images {
                durable::remove_durable(image).map_err(StoreError::io("remove", image))?;
            }
            return Ok(());
        }
        if !points.is_empty() {
            return no("the store already holds recovery points".into());
        }
        let store_dev = std::fs::metadata(&self.layout.vm_dir)
            .map_err(StoreError::io("stat", &self.layout.vm_dir))?
            .dev();
        for image in images {
            let meta = std::fs::symlink_metadata(image).map_err(StoreError::io("stat", image))?;
            if !meta.is_file() {
                return no(format!("{} is not a plain file", image.display()));
            }
            if meta.dev() != store_dev {
                return no(format!(
                    "{} is on another file system than the store",
                    image.display()
                ));
            }
            match qemu_img::backing_of(image).await {
                Ok(None) => {}
                Ok(Some(b)) => {
                    return no(format!("{} has a backing file ({b})", image.display()));
                }
                Err(e) => {
                    return no(format!("{} is not a qcow2 image: {e}", image.display()));
                }
            }
        }
        for (i, (image, layer)) in images.iter().zip(&layers).enumerate() {
            let dir = self.layout.disk_dir(i);
            std::fs::create_dir_all(&dir).map_err(StoreError::io("create", &dir))?;
            std::fs::hard_link(image, layer).map_err(StoreError::io("link", layer))?;
            durable::sync_parent(layer).map_err(StoreError::io("sync", layer))?;
        }
        let meta = self.layout.point_meta(info.sequence);
        let json = serde_json::to_vec_pretty(info).map_err(|source| StoreError::BadPointMeta {
            path: meta.display().to_string(),
            source,
        })?;
        durable::write_atomic(&meta, &json).map_err(StoreError::io("write", &meta))?;
        for image in images {
            durable::remove_durable(image).map_err(StoreError::io("remove", image))?;
        }
        tracing::info!(
            sequence = info.sequence,
            "images adopted as the first recovery point"
        );
        Ok(())
    }
}
