//! Staged uploads on the replica (docs/protocol.md §5.3, "Staged upload"): an initial replica
//! (log 1, a full image, into a store that holds no point) is written into standalone qcow2 layers
//! as it arrives, instead of being written to an upload file, read back after the commit and
//! written into the layers then. No log file exists; the layers stay under the VM's `incoming/`
//! until the log is committed and the apply task makes them point 1
//! ([`disk::points::PointStore::commit_staged`]).
//!
//! Files, all in `incoming/`:
//! - `<seq:020>-<upload>.disk<i>.layer`: the staged layer of disk i;
//! - `<seq:020>-<upload>.staged`: written once the whole log verified (the point it makes and its
//!   layers), the counterpart of an `.uploaded` file;
//! - `<seq:020>.staged`: the same once committed, the counterpart of `<seq:020>.vrlog`;
//! - `<seq:020>-<upload>.checkpoint`: while it arrives, its last checkpoint (below).
//!
//! While bytes arrive, the writing thread reads them from a channel. A broken connection leaves
//! that thread waiting and the upload kept in memory ([`Stagings`]) with the count of bytes it
//! received, so the primary continues at exactly that offset under the same upload id; an upload
//! not continued within [`ABANDONED_AFTER`] is dropped and its layers deleted.
//!
//! Every [`CHECKPOINT_EVERY`] bytes, between two records, the thread syncs the layers and saves
//! where it stands (`<seq:020>-<upload>.checkpoint`: the log reader's place and hash state, each
//! layer's allocations; disk::points::StageCheckpoint). After a restart of this daemon the upload
//! continues from its checkpoint, under the same id: the primary still holds the bytes from there.
//! A checkpoint nobody continued within [`ABANDONED_AFTER`] is deleted with its layers by the
//! tidy-up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use disk::points::{ApplyError, Checkpoints, PointInfo, PointStore, StageCheckpoint};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use wire::protocol::DiskSpec;
use wire::{Expect, LogReader, LogSummary};

/// How long a staged upload cut off by a broken connection waits for the primary to continue it.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(600);

/// The staged layer of disk `disk` of an upload.
pub fn layer_path(incoming: &Path, seq: u64, upload: Uuid, disk: usize) -> PathBuf {
    incoming.join(format!("{seq:020}-{upload}.disk{disk}.layer"))
}

/// What a verified staged upload left: the counterpart of an `.uploaded` file.
pub fn uploaded_path(incoming: &Path, seq: u64, upload: Uuid) -> PathBuf {
    incoming.join(format!("{seq:020}-{upload}.staged"))
}

/// The last checkpoint of a staged upload still arriving: where it continues after a restart.
pub fn checkpoint_path(incoming: &Path, seq: u64, upload: Uuid) -> PathBuf {
    incoming.join(format!("{seq:020}-{upload}.checkpoint"))
}

/// Log bytes between two checkpoints of a staged upload. What the primary counted as sent beyond
/// the checkpoint on disk is at most: two of these (one being synced, the next being read) and a
/// frame (4.6 MB); the batches queued to the writer (5 MiB); the chunks queued to the staging
/// thread ([`QUEUED_CHUNKS`] of at most 1 MiB, and two more in hand); the stream's flow-control
/// window (8 MiB); the primary's own queue and send buffer (about 9 MiB). About 40 MiB, under the
/// 64 MiB the primary keeps of a log sent from memory (replication::growing::KEEP), so it
/// continues where the checkpoint is.
pub const CHECKPOINT_EVERY: u64 = 4 << 20;

/// Chunks of the request body queued to the staging thread (HTTP/2 DATA frames, at most 1 MiB).
const QUEUED_CHUNKS: usize = 4;

/// The staged upload of log `seq` whose checkpoint is in `incoming`, with that checkpoint, if its
/// layers are all there. (At most one: an upload at offset 0 deletes the others of its sequence.)
pub fn find_checkpoint(incoming: &Path, seq: u64) -> Option<(Uuid, StageCheckpoint)> {
    let prefix = format!("{seq:020}-");
    std::fs::read_dir(incoming)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_prefix(&prefix)?.strip_suffix(".checkpoint")?;
            let upload = Uuid::parse_str(id).ok()?;
            let cp = StageCheckpoint::from_bytes(&std::fs::read(e.path()).ok()?)?;
            (0..cp.layers.len())
                .all(|i| layer_path(incoming, seq, upload, i).is_file())
                .then_some((upload, cp))
        })
        .max_by_key(|(_, cp)| cp.offset())
}

/// Writes `cp` as the checkpoint of `upload` durably (temporary file, fsync, rename, directory
/// fsync).
fn save_checkpoint(
    incoming: &Path,
    seq: u64,
    upload: Uuid,
    cp: &StageCheckpoint,
) -> std::io::Result<()> {
    let path = checkpoint_path(incoming, seq, upload);
    let tmp = path.with_extension("checkpoint.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &cp.to_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(incoming)?.sync_all()
}

/// A committed staged upload: the counterpart of `<seq>.vrlog`.
pub fn committed_path(incoming: &Path, seq: u64) -> PathBuf {
    incoming.join(format!("{seq:020}.staged"))
}

/// The point a staged upload makes and its layers, in disk order.
#[derive(Debug, Serialize, Deserialize)]
pub struct StagedPoint {
    pub point: PointInfo,
    pub layers: Vec<PathBuf>,
}

impl StagedPoint {
    /// Writes it to `path` durably (temporary file, fsync, rename, directory fsync).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("staged.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &json)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    pub fn read(path: &Path) -> std::io::Result<StagedPoint> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }

    /// Deletes its layers (best effort).
    pub fn remove_layers(&self) {
        remove_all(&self.layers);
    }
}

fn remove_all(paths: &[PathBuf]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

/// Why the writing thread refused a log.
#[derive(Debug)]
pub enum StageError {
    Apply(ApplyError),
    /// The log's disk table is not the placeholder's (this one).
    DiskTable(Vec<DiskSpec>),
}

/// What the writing thread returns: the point and the log's summary.
type Staged = Result<(PointInfo, LogSummary), StageError>;

/// An upload being staged: the writing thread, fed through `tx`.
pub struct Staging {
    pub sequence: u64,
    pub upload: Uuid,
    /// Bytes received (all handed to the writing thread, which reads the stream as it is).
    pub fed: u64,
    pub tx: tokio::sync::mpsc::Sender<Bytes>,
    pub task: tokio::task::JoinHandle<Staged>,
    pub layers: Vec<PathBuf>,
    /// The VM's `incoming/`, where its layers and checkpoint are.
    incoming: PathBuf,
    /// Which keeping this is (the abandon timer drops only the one it was started for).
    generation: u64,
}

impl Staging {
    /// Starts the writing thread of upload `upload` of log `expect.sequence` for the placeholder's
    /// disk table `disks`, its layers in `incoming`: from the log's first byte, or from the
    /// checkpoint `from` (after a restart of this daemon). The thread refuses a log whose disk
    /// table differs as soon as its header is known, saves a checkpoint every
    /// [`CHECKPOINT_EVERY`] bytes, and deletes its layers and checkpoint if the log fails.
    pub fn start(
        expect: Expect,
        incoming: &Path,
        upload: Uuid,
        disks: &[DiskSpec],
        from: Option<StageCheckpoint>,
    ) -> Staging {
        let seq = expect.sequence;
        let layers: Vec<PathBuf> = (0..disks.len())
            .map(|i| layer_path(incoming, seq, upload, i))
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUED_CHUNKS);
        let fed = from.as_ref().map_or(0, StageCheckpoint::offset);
        let (paths, what, table, dir) = (
            layers.clone(),
            incoming.join(format!("{seq:020}-{upload}")),
            disks.to_vec(),
            incoming.to_path_buf(),
        );
        let task = tokio::task::spawn_blocking(move || {
            let arriving = super::replica::ChannelReader::new(rx);
            let opened = match &from {
                None => LogReader::open_resumable(arriving, &expect),
                Some(cp) => LogReader::resume(arriving, &cp.reader, &expect),
            };
            let saving = dir.clone();
            let checkpoints = Checkpoints {
                every: CHECKPOINT_EVERY,
                saved: Box::new(move |cp: StageCheckpoint| {
                    if let Err(e) = save_checkpoint(&saving, seq, upload, &cp) {
                        tracing::warn!(sequence = seq, %upload, "cannot save a staged upload's checkpoint: {e}");
                    }
                }),
            };
            let staged = match opened {
                Err(source) => Err(StageError::Apply(ApplyError::Rejected {
                    path: what.display().to_string(),
                    source,
                })),
                Ok(reader) => {
                    if super::replica::disk_specs(reader.header()) != table {
                        Err(StageError::DiskTable(table))
                    } else {
                        PointStore::stage_checkpointed(
                            reader,
                            &paths,
                            &what,
                            Some(checkpoints),
                            from.as_ref().map(|cp| &cp.layers[..]),
                        )
                        .map_err(StageError::Apply)
                    }
                }
            };
            // A log refused is gone; one whose input ended early (a broken connection, this
            // daemon stopping) keeps its layers and checkpoint: whoever ends it deletes them
            // (`Staging::discard`), else it continues from them after a restart.
            if staged.as_ref().is_err_and(|e| !input_ended(e)) {
                remove_files(&dir, seq, upload, &paths);
            }
            staged
        });
        Staging {
            sequence: seq,
            upload,
            fed,
            tx,
            task,
            layers,
            incoming: incoming.to_path_buf(),
            generation: 0,
        }
    }

    /// Ends the input and waits for the writing thread's verdict.
    pub async fn finish(self) -> Result<Staged, tokio::task::JoinError> {
        drop(self.tx);
        self.task.await
    }

    /// Ends the upload for good: its layers and checkpoint are deleted (the thread writes on into
    /// the unlinked files until it notices), then its thread is waited for. Returns its verdict.
    pub async fn discard(self) -> Result<Staged, tokio::task::JoinError> {
        self.remove_files();
        self.finish().await
    }

    fn remove_files(&self) {
        remove_files(&self.incoming, self.sequence, self.upload, &self.layers);
    }
}

/// True if the thread stopped because its input ended before the log did.
fn input_ended(e: &StageError) -> bool {
    matches!(
        e,
        StageError::Apply(ApplyError::Rejected {
            source: wire::LogDecodeError::Truncated { .. } | wire::LogDecodeError::Io(_),
            ..
        })
    )
}

/// Deletes an upload's layers and checkpoint.
pub fn remove_files(incoming: &Path, seq: u64, upload: Uuid, layers: &[PathBuf]) {
    remove_all(layers);
    let _ = std::fs::remove_file(checkpoint_path(incoming, seq, upload));
}

#[derive(Default)]
struct Inner {
    /// Uploads cut off by a broken connection, by VM, waiting for the primary to continue them.
    kept: HashMap<Uuid, Staging>,
    /// Uploads being received now, by VM: their sequence and layers.
    active: HashMap<Uuid, (u64, Vec<PathBuf>)>,
    generation: u64,
}

/// The staged uploads of this replica: kept (cut off, waiting for a resume) and active (arriving).
#[derive(Clone, Default)]
pub struct Stagings(Arc<Mutex<Inner>>);

/// A staged upload arriving: holds it, and marks it as arriving, while it lives. Dropped while it
/// still holds it — the request's handler dropped mid-body, as when the primary resets the stream —
/// it keeps the upload for a resume, as a broken connection does.
pub struct Arriving {
    all: Stagings,
    vm: Uuid,
    st: Option<Staging>,
}

impl Arriving {
    pub fn staging(&mut self) -> &mut Staging {
        self.st.as_mut().expect("held until taken")
    }

    /// Takes the upload out to finish it; it counts as arriving (its layers are not tidied away)
    /// until the guard is dropped, after its `.staged` file is written.
    pub fn take(&mut self) -> Staging {
        self.st.take().expect("held until taken")
    }

    /// Keeps the upload for the primary to continue.
    pub fn keep(mut self) {
        if let Some(st) = self.st.take() {
            self.all.inner().active.remove(&self.vm);
            self.all.keep(self.vm, st);
        }
    }
}

impl Drop for Arriving {
    fn drop(&mut self) {
        self.all.inner().active.remove(&self.vm);
        if let Some(st) = self.st.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                tracing::info!(vm = %self.vm, sequence = st.sequence, bytes = st.fed, "staged upload cancelled; kept for a resume");
                self.all.keep(self.vm, st);
            }
        }
    }
}

impl Stagings {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `st` of `vm` as arriving (see [`Arriving`]).
    pub fn arriving(&self, vm: Uuid, st: Staging) -> Arriving {
        self.inner()
            .active
            .insert(vm, (st.sequence, st.layers.clone()));
        Arriving {
            all: self.clone(),
            vm,
            st: Some(st),
        }
    }

    /// True while a staged upload of log `seq` of `vm` is arriving on some connection.
    pub fn is_arriving(&self, vm: Uuid, seq: u64) -> bool {
        self.inner().active.get(&vm).is_some_and(|(s, _)| *s == seq)
    }

    /// Takes `vm`'s kept upload of log `seq` out (to continue or drop it).
    pub fn take(&self, vm: Uuid, seq: u64) -> Option<Staging> {
        let mut inner = self.inner();
        match inner.kept.get(&vm) {
            Some(s) if s.sequence == seq => inner.kept.remove(&vm),
            _ => None,
        }
    }

    /// The upload id and bytes received of `vm`'s kept upload of log `seq`.
    pub fn status(&self, vm: Uuid, seq: u64) -> Option<(Uuid, u64)> {
        self.inner()
            .kept
            .get(&vm)
            .filter(|s| s.sequence == seq)
            .map(|s| (s.upload, s.fed))
    }

    /// True if `path` is a layer of an upload arriving or kept here.
    pub fn holds(&self, path: &Path) -> bool {
        let inner = self.inner();
        inner
            .kept
            .values()
            .any(|s| s.layers.iter().any(|l| l == path))
            || inner
                .active
                .values()
                .any(|(_, layers)| layers.iter().any(|l| l == path))
    }

    /// Keeps `staging` for the primary to continue; drops it (its layers and checkpoint deleted,
    /// its thread ended) if it was not taken again within [`ABANDONED_AFTER`].
    pub fn keep(&self, vm: Uuid, mut staging: Staging) {
        let generation = {
            let mut inner = self.inner();
            inner.generation += 1;
            staging.generation = inner.generation;
            inner.kept.insert(vm, staging);
            inner.generation
        };
        let all = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ABANDONED_AFTER).await;
            let dropped = {
                let mut inner = all.inner();
                match inner.kept.get(&vm) {
                    Some(s) if s.generation == generation => {
                        // Its files go before anyone can look for them again: a resume asked
                        // right after finds neither the upload nor its checkpoint.
                        let st = inner.kept.remove(&vm);
                        if let Some(st) = &st {
                            st.remove_files();
                        }
                        st
                    }
                    _ => None,
                }
            };
            if let Some(st) = dropped {
                tracing::info!(%vm, upload = %st.upload, "dropping a staged upload the primary did not continue");
                let _ = st.finish().await;
            }
        });
    }
}
