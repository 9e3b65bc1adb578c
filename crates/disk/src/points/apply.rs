//! Applying one replication log in one pass: read and check its header, write every disk's new
//! layer under a temporary name while the rest of the log is read and verified, and only once
//! the trailer matched rename the layers into place and commit the point by writing its metadata
//! file.

use std::path::{Path, PathBuf};

use wire::Expect;

use super::durable::{self, tmp_name};
use super::error::{ApplyError, StoreError};
use super::layout::layer_name;
use super::meta::PointInfo;
use super::stream::{self, write_log};
use super::{catalog, qemu_img, recover, PointStore};

impl PointStore {
    /// Applies the log at `log` as the next recovery point and returns it.
    ///
    /// The header is read and checked first (`expect`: VM, relationship, sequence, parent; then,
    /// under the lock, whether the log fits the chain), before any layer exists. The rest of the
    /// log is verified (checksums, trailer hash) while its extents are written into temporary
    /// layers that nothing references; a log rejected on the way loses those layers and changes
    /// nothing. Applying a log whose point is already committed verifies it and returns that point
    /// (a re-sent log, or a re-run after a crash). A crash at any instant leaves every committed
    /// point intact and the log re-appliable.
    pub async fn apply(&self, log: &Path, expect: &Expect) -> Result<PointInfo, ApplyError> {
        self.apply_checked(log, expect, None).await
    }

    /// [`PointStore::apply`] of a log whose whole-stream hash `hash` was verified when it arrived
    /// (an upload the replica checked before committing it): the records and the trailer are
    /// checked as it is applied, but its bytes are not BLAKE3-hashed a second time.
    pub async fn apply_verified(
        &self,
        log: &Path,
        expect: &Expect,
        hash: [u8; 32],
    ) -> Result<PointInfo, ApplyError> {
        self.apply_checked(log, expect, Some(hash)).await
    }

    async fn apply_checked(
        &self,
        log: &Path,
        expect: &Expect,
        verified: Option<[u8; 32]>,
    ) -> Result<PointInfo, ApplyError> {
        if expect.vm != self.vm {
            return Err(ApplyError::WrongVm {
                store: self.vm,
                log: expect.vm,
            });
        }
        let reader = stream::open(log, expect, verified).await?;
        let _lock = self.lock().await?;
        recover::run(&self.layout)?;
        let points = catalog::points(&self.layout)?;
        // The point as the header describes it; its hash and length are known at the trailer.
        let planned = PointInfo::from_header(reader.header());
        if let Some(found) = points.iter().find(|p| p.sequence == planned.sequence) {
            // Rare (a re-sent log): verify the whole log, then compare it with the committed one.
            let summary = stream::verify_rest(reader, log).await?;
            let done = already_applied(found, &PointInfo::from_summary(&summary))?;
            tracing::info!(sequence = done.sequence, "log already applied");
            return Ok(done);
        }
        let backing = backing_for(&points, &planned)?;
        let tmps = self.create_layers(&planned, backing).await?;
        // A full image becomes standalone layers written directly; a delta goes through qemu-nbd
        // onto the backing chain.
        let written = match backing {
            None => stream::write_full_image(reader, log, &tmps).await,
            Some(_) => write_log(&self.layout, reader, log, &tmps).await,
        };
        let summary = match written {
            Ok(summary) => summary,
            Err(e) => {
                remove_all(&tmps);
                return Err(e);
            }
        };
        let info = PointInfo::from_summary(&summary);
        self.commit(&info, &tmps)?;
        tracing::info!(sequence = info.sequence, "recovery point committed");
        Ok(info)
    }

    /// Creates the point's layers under temporary names: a standalone qcow2 for a full image,
    /// otherwise a layer over the latest point's layer.
    async fn create_layers(
        &self,
        info: &PointInfo,
        backing: Option<u64>,
    ) -> Result<Vec<PathBuf>, ApplyError> {
        let mut tmps = Vec::with_capacity(info.disks.len());
        for (i, disk) in info.disks.iter().enumerate() {
            let dir = self.layout.disk_dir(i);
            std::fs::create_dir_all(&dir).map_err(StoreError::io("create", &dir))?;
            let tmp = tmp_name(&self.layout.layer(info.sequence, i));
            let backing_name = backing.map(layer_name);
            tmps.push(tmp.clone());
            if let Err(e) = qemu_img::create(&tmp, backing_name.as_deref(), disk.virtual_size).await
            {
                remove_all(&tmps);
                return Err(e.into());
            }
        }
        Ok(tmps)
    }

    /// Makes the written layers durable under their final names, then commits the point.
    pub(super) fn commit(&self, info: &PointInfo, tmps: &[PathBuf]) -> Result<(), StoreError> {
        for (i, tmp) in tmps.iter().enumerate() {
            durable::sync_file(tmp).map_err(StoreError::io("sync", tmp))?;
            let layer = self.layout.layer(info.sequence, i);
            durable::rename_durable(tmp, &layer).map_err(StoreError::io("rename", tmp))?;
        }
        let meta = self.layout.point_meta(info.sequence);
        let json = serde_json::to_vec_pretty(info).map_err(|source| StoreError::BadPointMeta {
            path: meta.display().to_string(),
            source,
        })?;
        durable::write_atomic(&meta, &json).map_err(StoreError::io("write", &meta))
    }
}

/// The committed point `found` if the verified log `offered` (same sequence) is the one that
/// produced it; an error if a different log did.
pub(super) fn already_applied(
    found: &PointInfo,
    offered: &PointInfo,
) -> Result<PointInfo, ApplyError> {
    if found.log_hash != offered.log_hash {
        return Err(ApplyError::SequenceTaken {
            sequence: offered.sequence,
            stored: found.log_hash.clone(),
            offered: offered.log_hash.clone(),
        });
    }
    Ok(found.clone())
}

/// Which committed point the new layers go on (None: standalone), or why the log does not fit.
pub(super) fn backing_for(
    points: &[PointInfo],
    info: &PointInfo,
) -> Result<Option<u64>, ApplyError> {
    let Some(latest) = points.last() else {
        return match info.full_image {
            true => Ok(None),
            false => Err(ApplyError::FirstMustBeFull {
                sequence: info.sequence,
            }),
        };
    };
    if info.sequence <= latest.sequence {
        return Err(ApplyError::Superseded {
            sequence: info.sequence,
            latest: latest.sequence,
        });
    }
    if info.full_image {
        // A resynchronization: a new standalone chain; older points stay as they are.
        return Ok(None);
    }
    if info.log_parent != latest.sequence {
        return Err(ApplyError::NotNext {
            sequence: info.sequence,
            parent: info.log_parent,
            latest: latest.sequence,
        });
    }
    if info.disks != latest.disks {
        return Err(ApplyError::DiskTableChanged {
            sequence: info.sequence,
            parent: latest.sequence,
        });
    }
    Ok(Some(latest.sequence))
}

/// Best effort: the next recovery removes whatever this leaves.
fn remove_all(paths: &[PathBuf]) {
    for path in paths {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::points::meta::{PointDisk, PointKind};

    fn point(sequence: u64, log_parent: u64, size: u64) -> PointInfo {
        PointInfo {
            sequence,
            log_parent,
            time_micros: 0,
            kind: PointKind::Standard,
            full_image: log_parent == 0,
            disks: vec![PointDisk {
                id: "d0".into(),
                virtual_size: size,
            }],
            log_hash: format!("h{sequence}"),
            log_bytes: 1,
        }
    }

    #[test]
    fn a_log_fits_only_on_top_of_the_latest_point() {
        let chain = [point(1, 0, 8), point(2, 1, 8)];
        assert_eq!(backing_for(&[], &point(1, 0, 8)).ok(), Some(None));
        assert!(matches!(
            backing_for(&[], &point(2, 1, 8)),
            Err(ApplyError::FirstMustBeFull { sequence: 2 })
        ));
        assert_eq!(backing_for(&chain, &point(3, 2, 8)).ok(), Some(Some(2)));
        assert_eq!(
            backing_for(&chain, &point(3, 0, 8)).ok(),
            Some(None),
            "resync"
        );
        assert!(matches!(
            backing_for(&chain, &point(4, 1, 8)),
            Err(ApplyError::NotNext { latest: 2, .. })
        ));
        assert!(matches!(
            backing_for(&chain, &point(2, 1, 8)),
            Err(ApplyError::Superseded { .. })
        ));
        assert!(matches!(
            backing_for(&chain, &point(3, 2, 16)),
            Err(ApplyError::DiskTableChanged { .. })
        ));
    }

    #[test]
    fn the_same_sequence_from_another_log_is_refused() {
        let committed = point(1, 0, 8);
        assert_eq!(
            already_applied(&committed, &point(1, 0, 8)).ok(),
            Some(point(1, 0, 8))
        );
        let mut other = point(1, 0, 8);
        other.log_hash = "x".into();
        assert!(matches!(
            already_applied(&committed, &other),
            Err(ApplyError::SequenceTaken { .. })
        ));
    }
}
