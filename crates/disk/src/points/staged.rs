//! A full-image log applied while it arrives: the replica writes an initial replica's extents
//! straight into standalone qcow2 layers as the upload streams in, instead of writing the log to a
//! file, reading it back after the commit and writing the layers then (docs/protocol.md §5.3,
//! "staged upload").
//!
//! The layers are staged outside the point directories (the caller names them, under the VM's
//! `incoming/`), so no recovery, prune or apply ever takes them for a point or for garbage. They
//! become point `sequence` only through [`PointStore::commit_staged`], once the primary committed
//! the log, exactly as an applied log's layers do (synced, renamed into place, then the metadata
//! file that commits the point).

use std::io::Read;
use std::path::{Path, PathBuf};

use wire::{LogDecodeError, LogReader, LogSummary};

use super::apply::{already_applied, backing_for};
use super::durable;
use super::error::{ApplyError, StoreError};
use super::meta::PointInfo;
use super::stream::Checkpoints;
use super::{catalog, recover, stream, PointStore};
use crate::qcow2::Qcow2Progress;

impl PointStore {
    /// Writes the full-image log `reader` reads into new standalone qcow2 layers at `staged` (one
    /// per disk), checking every record and, at the trailer, the whole log; then syncs them and
    /// returns the point they make and the log's summary. `what` names the log in errors. Blocking:
    /// run it on a thread of its own. On an error the caller deletes `staged`.
    pub fn stage_full_image<R: Read>(
        reader: LogReader<R>,
        staged: &[PathBuf],
        what: &Path,
    ) -> Result<(PointInfo, LogSummary), ApplyError> {
        Self::stage_checkpointed(reader, staged, what, None, None)
    }

    /// [`PointStore::stage_full_image`], saving a [`StageCheckpoint`] through `checkpoints` every
    /// so many log bytes (the reader must come from [`LogReader::open_resumable`] or
    /// [`LogReader::resume`]); with `resume`, the layers are the ones a checkpoint saved (one
    /// progress per disk, in order) and `reader` continues the log from that checkpoint's offset.
    pub fn stage_checkpointed<R: Read>(
        reader: LogReader<R>,
        staged: &[PathBuf],
        what: &Path,
        checkpoints: Option<Checkpoints<'_>>,
        resume: Option<&[Qcow2Progress]>,
    ) -> Result<(PointInfo, LogSummary), ApplyError> {
        let header = reader.header();
        if !header.full_image {
            return Err(ApplyError::FirstMustBeFull {
                sequence: header.sequence,
            });
        }
        if header.disks.len() != staged.len()
            || resume.is_some_and(|layers| layers.len() != staged.len())
        {
            return Err(ApplyError::Rejected {
                path: what.display().to_string(),
                source: LogDecodeError::ReaderFailed,
            });
        }
        let (summary, _direct) =
            stream::full_image_staged(reader, what, staged, checkpoints, resume)?;
        for path in staged {
            durable::sync_file(path).map_err(StoreError::io("sync", path))?;
        }
        Ok((PointInfo::from_summary(&summary), summary))
    }

    /// Makes the layers [`PointStore::stage_full_image`] wrote (`staged`, in disk order) point
    /// `info.sequence`: under the store lock, renamed into place, then the point's metadata file
    /// written. A point of that sequence already committed by the same log is returned as it is (a
    /// commit repeated after a crash); one committed by another log, or a sequence the store is
    /// past, is refused; a staged layer that no longer exists refuses the point (`Rejected`). The
    /// staged files are gone once the point is committed, and kept by any error.
    pub async fn commit_staged(
        &self,
        info: &PointInfo,
        staged: &[PathBuf],
    ) -> Result<PointInfo, ApplyError> {
        let _lock = self.lock().await?;
        recover::run(&self.layout)?;
        let points = catalog::points(&self.layout)?;
        if let Some(found) = points.iter().find(|p| p.sequence == info.sequence) {
            let done = already_applied(found, info)?;
            for path in staged {
                let _ = std::fs::remove_file(path);
            }
            return Ok(done);
        }
        if !info.full_image || staged.len() != info.disks.len() {
            return Err(ApplyError::FirstMustBeFull {
                sequence: info.sequence,
            });
        }
        // A full image has no backing; this refuses a sequence the store is already past.
        backing_for(&points, info)?;
        let mut layers = Vec::with_capacity(staged.len());
        for (i, path) in staged.iter().enumerate() {
            let dir = self.layout.disk_dir(i);
            std::fs::create_dir_all(&dir).map_err(StoreError::io("create", &dir))?;
            // Linked beside its final name (the commit renames within the disk directory); the
            // staged file stays until the point is committed, so a commit cut off at any instant
            // (its `.tmp` links are garbage to the next recovery) can run again.
            let tmp = durable::tmp_name(&self.layout.layer(info.sequence, i));
            let _ = std::fs::remove_file(&tmp);
            match std::fs::hard_link(path, &tmp) {
                Ok(()) => layers.push(tmp),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ApplyError::Rejected {
                        path: path.display().to_string(),
                        source: LogDecodeError::Io(e),
                    })
                }
                Err(e) => return Err(StoreError::io("link", path)(e).into()),
            }
        }
        self.commit(info, &layers)?;
        for path in staged {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!(sequence = info.sequence, "staged recovery point committed");
        Ok(info.clone())
    }
}
