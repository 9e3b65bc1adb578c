//! Staged uploads on the replica (docs/protocol.md §5.3, "Staged upload"): an initial replica
//! (log 1, a full image, into a store that holds no point) is written into standalone qcow2 layers
//! as it arrives, instead of being written to an upload file, read back after the commit and
//! written into the layers then. No log file exists; the layers stay under the VM's `incoming/`
//! until the log is committed and the apply task makes them point 1
//! ([`disk::points::PointStore::commit_staged`]).
//!
//! Files, all in `incoming/`:
//! - `<seq:020>-<upload>.s<nonce>.disk<i>.layer`: the staged layer of disk i;
//! - `<seq:020>-<upload>.staged`: written once the whole log verified (the point it makes and its
//!   layers), the counterpart of an `.uploaded` file;
//! - `<seq:020>.staged`: the same once committed, the counterpart of `<seq:020>.vrlog`;
//! - `<seq:020>-<upload>.s<nonce>.checkpoint`: while it arrives, its last checkpoint (below).
//!
//! While bytes arrive, the writing thread reads them from a channel. A broken connection leaves
//! that thread waiting and the upload kept in memory ([`Stagings`]) with the count of bytes it
//! received, so the primary continues at exactly that offset under the same upload id; an upload
//! not continued within [`ABANDONED_AFTER`] is dropped and its layers deleted.
//!
//! Every [`CHECKPOINT_EVERY`] bytes, between two records, the thread takes a checkpoint: a thread
//! of its own syncs the layers and saves where it stood (`<seq:020>-<upload>.s<nonce>.checkpoint`:
//! the log reader's place and hash state, each layer's allocations; disk::points::StageCheckpoint).
//! One taken while the last is still being saved is skipped, unless the saved one lags more than
//! [`CHECKPOINT_MAX_LAG`]. After a restart of this daemon the upload continues from its
//! checkpoint, under the same id: the primary still holds the bytes from there.
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

/// How long a staged upload cut off by a broken connection waits for the primary to continue it,
/// and a checkpoint left by a restart is kept: as long as the primary keeps trying
/// (`client::INITIAL_RETRIES`), so an outage of either host's network or of this host itself up
/// to an hour costs the initial replication nothing.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(3600);

/// The files of one staging of an upload: `<seq:020>-<upload>.s<nonce:08x>.disk<i>.layer` and
/// `….checkpoint`. The nonce is new for every staging started at offset 0, so the files of an
/// attempt being ended never have the names of a later attempt of the same upload id (a primary
/// sends every attempt of one delivery under one id).
#[derive(Debug, Clone)]
pub struct StageFiles {
    pub incoming: PathBuf,
    pub sequence: u64,
    pub upload: Uuid,
    pub nonce: u32,
}

impl StageFiles {
    /// The files of a new staging of `upload` of log `sequence` in `incoming` (a new nonce).
    pub fn new(incoming: &Path, sequence: u64, upload: Uuid) -> StageFiles {
        StageFiles {
            incoming: incoming.to_path_buf(),
            sequence,
            upload,
            nonce: Uuid::new_v4().as_u128() as u32,
        }
    }

    fn stem(&self) -> String {
        format!("{:020}-{}.s{:08x}", self.sequence, self.upload, self.nonce)
    }

    /// The staged layer of disk `disk`.
    pub fn layer(&self, disk: usize) -> PathBuf {
        self.incoming
            .join(format!("{}.disk{disk}.layer", self.stem()))
    }

    /// Its last checkpoint: where it continues after a restart.
    pub fn checkpoint(&self) -> PathBuf {
        self.incoming.join(format!("{}.checkpoint", self.stem()))
    }

    /// The runs file of disk `disk`'s layer: its allocations, which its checkpoints count.
    pub fn runs(&self, disk: usize) -> PathBuf {
        self.incoming
            .join(format!("{}.disk{disk}.runs", self.stem()))
    }

    /// Deletes its `disks` layers and its checkpoint.
    pub fn remove(&self, disks: usize) {
        for i in 0..disks {
            let _ = std::fs::remove_file(self.layer(i));
        }
        self.remove_checkpoint(disks);
    }

    /// Deletes its checkpoint and the `disks` runs files it counts (the layers stay).
    pub fn remove_checkpoint(&self, disks: usize) {
        let _ = std::fs::remove_file(self.checkpoint());
        for i in 0..disks {
            let _ = std::fs::remove_file(self.runs(i));
        }
    }
}

/// What a verified staged upload left: the counterpart of an `.uploaded` file.
pub fn uploaded_path(incoming: &Path, seq: u64, upload: Uuid) -> PathBuf {
    incoming.join(format!("{seq:020}-{upload}.staged"))
}

/// Log bytes between two checkpoints of a staged upload (at least: they are taken at the end of a
/// frame).
pub const CHECKPOINT_EVERY: u64 = 4 << 20;

/// A checkpoint is skipped while the last is still being saved (the writer does not wait for the
/// disk), unless the saved one is more than this behind it.
///
/// A save syncs the layers and the runs files and writes the checkpoint durably: four flushes,
/// 20-40 ms on a virtual disk. At 16 MiB the writer waited for nearly every save, which held a
/// network initial replication to about 16 MiB per save (560 MiB/s where the disk took 683 MiB/s;
/// docs/performance.md, "A twenty-first look"); at 48 MiB it does not wait.
///
/// What the primary counted as sent beyond the checkpoint on disk is then at most: this lag, one
/// interval and a frame (4.6 MB) before the next checkpoint is taken; the frames handed to the
/// writer thread and not yet written (three of at most 4.6 MB: two queued, one being written); the
/// chunks queued to the staging thread ([`QUEUED_CHUNKS`] of at most 1 MiB, and two more in hand);
/// the stream's flow-control window (8 MiB); the primary's own queue and send buffer (about
/// 9 MiB). At most 107 MiB, less than the 112 MiB the primary keeps of a log sent from memory, so it
/// continues where the checkpoint is.
pub const CHECKPOINT_MAX_LAG: u64 = 48 << 20;

const _: () = assert!(
    CHECKPOINT_MAX_LAG
        + CHECKPOINT_EVERY
        + (5 << 20)
        + 3 * (5 << 20)
        + (QUEUED_CHUNKS as u64 + 2) * (1 << 20)
        + (8 << 20)
        + (9 << 20)
        < super::growing::KEEP_STAGED
);

/// Chunks of the request body queued to the staging thread (HTTP/2 DATA frames, at most 1 MiB;
/// fewer slowed the initial replication down).
const QUEUED_CHUNKS: usize = 16;

/// The staging of log `seq` whose checkpoint in `incoming` is furthest, with that checkpoint, if
/// its layers are all there and its runs files hold the runs it counts. (A checkpoint left by an
/// attempt ended meanwhile still matches its own layers and its upload's bytes.)
pub fn find_checkpoint(incoming: &Path, seq: u64) -> Option<(StageFiles, StageCheckpoint)> {
    let prefix = format!("{seq:020}-");
    std::fs::read_dir(incoming)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_prefix(&prefix)?.strip_suffix(".checkpoint")?;
            let (id, nonce) = stem.split_once(".s")?;
            let files = StageFiles {
                incoming: incoming.to_path_buf(),
                sequence: seq,
                upload: Uuid::parse_str(id).ok()?,
                nonce: u32::from_str_radix(nonce, 16).ok()?,
            };
            let cp = StageCheckpoint::from_bytes(&std::fs::read(e.path()).ok()?)?;
            let runs: Vec<PathBuf> = (0..cp.layers.len()).map(|i| files.runs(i)).collect();
            ((0..cp.layers.len()).all(|i| files.layer(i).is_file()) && cp.runs_present(&runs))
                .then_some((files, cp))
        })
        .max_by_key(|(_, cp)| cp.offset())
}

/// Writes `cp` as the checkpoint of `files` durably (temporary file, fsync, rename, directory
/// fsync).
fn save_checkpoint(files: &StageFiles, cp: &StageCheckpoint) -> std::io::Result<()> {
    let path = files.checkpoint();
    let tmp = path.with_extension("checkpoint.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &cp.to_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(&files.incoming)?.sync_all()
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
    /// Where its layers and checkpoint are.
    pub files: StageFiles,
    /// Which keeping this is (the abandon timer drops only the one it was started for).
    generation: u64,
}

impl Staging {
    /// Starts the writing thread of the upload `files` names (of log `expect.sequence`) for the
    /// placeholder's disk table `disks`: from the log's first byte, or from the checkpoint `from`
    /// of the same files (after a restart of this daemon). The thread refuses a log whose disk
    /// table differs as soon as its header is known, saves a checkpoint every
    /// [`CHECKPOINT_EVERY`] bytes, and deletes its layers and checkpoint if the log is refused.
    pub fn start(
        expect: Expect,
        files: StageFiles,
        disks: &[DiskSpec],
        from: Option<StageCheckpoint>,
    ) -> Staging {
        let (seq, upload) = (expect.sequence, files.upload);
        let layers: Vec<PathBuf> = (0..disks.len()).map(|i| files.layer(i)).collect();
        let runs: Vec<PathBuf> = (0..disks.len()).map(|i| files.runs(i)).collect();
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUED_CHUNKS);
        let fed = from.as_ref().map_or(0, StageCheckpoint::offset);
        let (paths, what, table, own) = (
            layers.clone(),
            files.incoming.join(format!("{seq:020}-{upload}")),
            disks.to_vec(),
            files.clone(),
        );
        let task = tokio::task::spawn_blocking(move || {
            let arriving = super::replica::ChannelReader::new(rx);
            let opened = match &from {
                None => LogReader::open_resumable(arriving, &expect),
                Some(cp) => LogReader::resume(arriving, &cp.reader, &expect),
            };
            let saving = own.clone();
            let checkpoints = Checkpoints {
                every: CHECKPOINT_EVERY,
                max_lag: CHECKPOINT_MAX_LAG,
                saved: Box::new(
                    move |cp: StageCheckpoint| match save_checkpoint(&saving, &cp) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(sequence = seq, %upload, "cannot save a staged upload's checkpoint: {e}");
                            false
                        }
                    },
                ),
                runs: runs.clone(),
            };
            // The layers' allocations as the checkpoint saw them (`find_checkpoint` saw their
            // runs files long enough; read here, off the runtime's threads).
            let resumed = match &from {
                None => Ok(None),
                Some(cp) => cp.progress(&runs).map(Some),
            };
            let staged = match (opened, resumed) {
                (Err(source), _) => Err(StageError::Apply(ApplyError::Rejected {
                    path: what.display().to_string(),
                    source,
                })),
                // Not an ended input: nothing can continue from it, so its files go.
                (Ok(_), Err(e)) => {
                    tracing::warn!(sequence = seq, %upload, "the staged upload's runs files do not hold its checkpoint's runs: {e}");
                    Err(StageError::Apply(ApplyError::Rejected {
                        path: what.display().to_string(),
                        source: wire::LogDecodeError::ReaderFailed,
                    }))
                }
                (Ok(reader), Ok(resumed)) => {
                    if super::replica::disk_specs(reader.header()) != table {
                        Err(StageError::DiskTable(table))
                    } else {
                        PointStore::stage_checkpointed(
                            reader,
                            &paths,
                            &what,
                            Some(checkpoints),
                            resumed.as_deref(),
                        )
                        .map_err(StageError::Apply)
                    }
                }
            };
            // A log refused is gone; one whose input ended early (a broken connection, this
            // daemon stopping) keeps its layers and checkpoint: whoever ends it deletes them
            // (`Staging::discard`), else it continues from them after a restart.
            if staged.as_ref().is_err_and(|e| !input_ended(e)) {
                own.remove(paths.len());
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
            files,
            generation: 0,
        }
    }

    /// Ends the input and waits for the writing thread's verdict.
    pub async fn finish(self) -> Result<Staged, tokio::task::JoinError> {
        drop(self.tx);
        self.task.await
    }

    /// Ends the upload for good: its thread is waited for (it saves no checkpoint after), then its
    /// layers and checkpoint are deleted. Returns its verdict. (Cut off meanwhile, it leaves them
    /// under its own nonce, for a resume or the tidy-up.)
    pub async fn discard(self) -> Result<Staged, tokio::task::JoinError> {
        let (files, disks) = (self.files.clone(), self.layers.len());
        let verdict = self.finish().await;
        files.remove(disks);
        verdict
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
                            st.files.remove(st.layers.len());
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
