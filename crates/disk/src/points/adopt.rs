//! Adoption: a VM's own standalone qcow2 images become the first point of an empty store without
//! a byte being copied (a failback takes the old primary's disks as its base this way).
//!
//! Each image gets a second name, its layer (a hard link: same file system only); the old names
//! are recorded (`adopted.json`); then the point is committed (`p<seq>.json`). The old names stay
//! until the caller, once it no longer uses them (a failback: once its VM is a replica with no
//! disks of its own), asks [`PointStore::release_adopted`] to remove them. So a crash at any point
//! leaves every disk with a name its owner knows:
//! - before the commit: uncommitted layers, which recovery deletes (only the extra names go, the
//!   images stay), and a record naming no committed layer, which the release leaves (no name
//!   goes) until an adoption asked again replaces it;
//! - after it: the point committed and the old names still there. [`PointStore::adopt`] asked
//!   again takes the point as it is (of other images, it drops that point first); the release,
//!   asked again (at the daemon's start), removes the names that still name the adopted files.

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
    /// the layers of point `info`, the store's first. Their old names stay (the layers' second
    /// names: a write through them changes the point) until [`PointStore::release_adopted`].
    pub async fn adopt(&self, info: &PointInfo, images: &[PathBuf]) -> Result<(), AdoptError> {
        let no = |why: String| Err(AdoptError::NotAdoptable(why));
        if images.len() != info.disks.len() || images.is_empty() {
            return no("one image per disk is needed".into());
        }
        let _lock = self.lock().await?;
        recover::run(&self.layout)?;
        let mut points = catalog::points(&self.layout)?;
        let layers: Vec<PathBuf> = (0..images.len())
            .map(|i| self.layout.layer(info.sequence, i))
            .collect();
        // Asked again after a crash that followed the commit: done already.
        if points.len() == 1
            && points[0].sequence == info.sequence
            && images.iter().zip(&layers).all(|(i, l)| same_file(i, l))
        {
            return Ok(());
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
        if self.drop_cut_off_adoption(&points, images)? {
            points = catalog::points(&self.layout)?;
        }
        if !points.is_empty() {
            return no("the store already holds recovery points".into());
        }
        for (i, (image, layer)) in images.iter().zip(&layers).enumerate() {
            let dir = self.layout.disk_dir(i);
            std::fs::create_dir_all(&dir).map_err(StoreError::io("create", &dir))?;
            std::fs::hard_link(image, layer).map_err(StoreError::io("link", layer))?;
            durable::sync_parent(layer).map_err(StoreError::io("sync", layer))?;
        }
        let record = self.layout.adopted();
        let mut files = Vec::with_capacity(images.len());
        for image in images {
            let meta = std::fs::metadata(image).map_err(StoreError::io("stat", image))?;
            files.push((meta.dev(), meta.ino()));
        }
        let names = Adopted {
            sequence: info.sequence,
            images: images.to_vec(),
            files,
        };
        let json =
            serde_json::to_vec_pretty(&names).map_err(|source| StoreError::BadAdoptionRecord {
                path: record.display().to_string(),
                source,
            })?;
        durable::write_atomic(&record, &json).map_err(StoreError::io("write", &record))?;
        let meta = self.layout.point_meta(info.sequence);
        let json = serde_json::to_vec_pretty(info).map_err(|source| StoreError::BadPointMeta {
            path: meta.display().to_string(),
            source,
        })?;
        durable::write_atomic(&meta, &json).map_err(StoreError::io("write", &meta))?;
        tracing::info!(
            sequence = info.sequence,
            "images adopted as the first recovery point"
        );
        Ok(())
    }

    /// Whether an adoption into the store of `vm` under `root` recorded old names not released yet.
    pub fn adoption_recorded(root: &Path, vm: uuid::Uuid) -> bool {
        super::layout::Layout::of(root, vm).adopted().exists()
    }

    /// Drops the point of an adoption cut off before its names were released when `images` are
    /// other files (the disks were replaced since): the caller still runs on its own disks (it
    /// adopts them), so that point was never its data. Only such a point: the store's one point,
    /// recorded as adopted, each of its layers still the file recorded, none of them one of
    /// `images`, and no overlay on it. Uncommitted, recovery deletes its layers (only those names:
    /// a name the file had before stays). Returns whether it dropped one.
    fn drop_cut_off_adoption(
        &self,
        points: &[PointInfo],
        images: &[PathBuf],
    ) -> Result<bool, StoreError> {
        let Some(cut_off) = self.read_adopted()? else {
            return Ok(false);
        };
        let [point] = points else {
            return Ok(false);
        };
        let files = cut_off.files(&self.layout);
        let layers_as_recorded = point.sequence == cut_off.sequence
            && files.len() == point.disks.len()
            && files.iter().enumerate().all(|(i, f)| {
                identity(&self.layout.layer(point.sequence, i)).is_some_and(|x| x == *f)
            });
        let reused = images
            .iter()
            .any(|image| identity(image).is_some_and(|x| files.contains(&x)));
        if !layers_as_recorded || reused || !catalog::overlays(&self.layout)?.is_empty() {
            return Ok(false);
        }
        let meta = self.layout.point_meta(point.sequence);
        durable::remove_durable(&meta).map_err(StoreError::io("remove", &meta))?;
        recover::run(&self.layout)?;
        let record = self.layout.adopted();
        durable::remove_durable(&record).map_err(StoreError::io("remove", &record))?;
        tracing::warn!(
            sequence = point.sequence,
            "a cut-off adoption of other images is dropped"
        );
        Ok(true)
    }

    /// Removes the old names of the images an adoption took in, those that still name the files
    /// adopted while a committed point's layer names them too (whichever layer each is now: a
    /// merge renames layers; a file put at such a path since is left alone), and then the record
    /// of them, unless a name of an adopted file is left that no committed layer names yet (an
    /// adoption not committed, a merge cut off): asked again later. Returns the names removed.
    pub async fn release_adopted(&self) -> Result<Vec<PathBuf>, StoreError> {
        let _lock = self.lock().await?;
        let Some(names) = self.read_adopted()? else {
            return Ok(Vec::new());
        };
        let committed: Vec<u64> = catalog::points(&self.layout)?
            .iter()
            .map(|p| p.sequence)
            .collect();
        let files = names.files(&self.layout);
        let mut removed = Vec::new();
        let mut left = false;
        for (i, (image, file)) in names.images.iter().zip(&files).enumerate() {
            if identity(image) != Some(*file) {
                continue; // gone, or another file now
            }
            // Only a name whose file a committed point's layer also names: never the last name.
            // (Not yet: an adoption not committed, or a merge cut off before its rename; the
            // record stays, to be asked again.)
            let kept = committed
                .iter()
                .any(|seq| identity(&self.layout.layer(*seq, i)) == Some(*file));
            if !kept {
                left = true;
                continue;
            }
            durable::remove_durable(image).map_err(StoreError::io("remove", image))?;
            removed.push(image.clone());
        }
        if !left {
            let record = self.layout.adopted();
            durable::remove_durable(&record).map_err(StoreError::io("remove", &record))?;
        }
        Ok(removed)
    }

    fn read_adopted(&self) -> Result<Option<Adopted>, StoreError> {
        let record = self.layout.adopted();
        match std::fs::read(&record) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| {
                StoreError::BadAdoptionRecord {
                    path: record.display().to_string(),
                    source,
                }
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("read", &record)(e)),
        }
    }
}

/// `adopted.json`: the names an adoption's images had.
#[derive(serde::Serialize, serde::Deserialize)]
struct Adopted {
    sequence: u64,
    images: Vec<PathBuf>,
    /// Each image's (device, inode) when it was adopted (a record without them: the point's
    /// layers', as they are now).
    #[serde(default)]
    files: Vec<(u64, u64)>,
}

impl Adopted {
    fn files(&self, layout: &super::layout::Layout) -> Vec<(u64, u64)> {
        if self.files.len() == self.images.len() {
            return self.files.clone();
        }
        (0..self.images.len())
            .map(|i| identity(&layout.layer(self.sequence, i)).unwrap_or((0, 0)))
            .collect()
    }
}

/// A file's (device, inode), following symlinks; `None` when it cannot be read.
fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}
