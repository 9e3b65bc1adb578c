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
//! - `<seq:020>.staged`: the same once committed, the counterpart of `<seq:020>.vrlog`.
//!
//! While bytes arrive, the writing thread reads them from a channel. A broken connection leaves
//! that thread waiting and the upload kept in memory ([`Stagings`]) with the count of bytes it
//! received, so the primary continues at exactly that offset under the same upload id; an upload
//! not continued within [`ABANDONED_AFTER`] is dropped and its layers deleted. After a restart of
//! this daemon the upload is unknown and starts again at 0 (the tidy-up deletes its files).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use disk::points::{ApplyError, PointInfo, PointStore};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
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

/// What the writing thread returns: the point and the log's summary.
type Staged = Result<(PointInfo, LogSummary), ApplyError>;

/// An upload being staged: the writing thread, fed through `tx`.
pub struct Staging {
    pub sequence: u64,
    pub upload: Uuid,
    /// Bytes received (all handed to the writing thread, which reads the stream as it is).
    pub fed: u64,
    pub tx: tokio::sync::mpsc::Sender<Bytes>,
    pub task: tokio::task::JoinHandle<Staged>,
    pub layers: Vec<PathBuf>,
}

impl Staging {
    /// Starts the writing thread of upload `upload` of log `expect.sequence`, for `disks` disks,
    /// its layers in `incoming`. The thread deletes its layers if the log fails.
    pub fn start(expect: Expect, incoming: &Path, upload: Uuid, disks: usize) -> Staging {
        let layers: Vec<PathBuf> = (0..disks)
            .map(|i| layer_path(incoming, expect.sequence, upload, i))
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let (paths, what) = (
            layers.clone(),
            incoming.join(format!("{:020}-{upload}", expect.sequence)),
        );
        let task = tokio::task::spawn_blocking(move || {
            let arriving = super::replica::ChannelReader::new(rx);
            let staged = LogReader::open(arriving, &expect)
                .map_err(|source| ApplyError::Rejected {
                    path: what.display().to_string(),
                    source,
                })
                .and_then(|reader| PointStore::stage_full_image(reader, &paths, &what));
            if staged.is_err() {
                remove_all(&paths);
            }
            staged
        });
        Staging {
            sequence: expect.sequence,
            upload,
            fed: 0,
            tx,
            task,
            layers,
        }
    }

    /// Ends the input and waits for the writing thread's verdict.
    pub async fn finish(self) -> Result<Staged, tokio::task::JoinError> {
        drop(self.tx);
        self.task.await
    }
}

/// The staged uploads cut off by a broken connection, by VM, waiting for the primary to continue.
#[derive(Clone, Default)]
pub struct Stagings(Arc<Mutex<HashMap<Uuid, Staging>>>);

impl Stagings {
    fn map(&self) -> MutexGuard<'_, HashMap<Uuid, Staging>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `vm`'s kept upload of log `seq` out (to continue or drop it).
    pub fn take(&self, vm: Uuid, seq: u64) -> Option<Staging> {
        let mut map = self.map();
        match map.get(&vm) {
            Some(s) if s.sequence == seq => map.remove(&vm),
            _ => None,
        }
    }

    /// The upload id and bytes received of `vm`'s kept upload of log `seq`.
    pub fn status(&self, vm: Uuid, seq: u64) -> Option<(Uuid, u64)> {
        self.map()
            .get(&vm)
            .filter(|s| s.sequence == seq)
            .map(|s| (s.upload, s.fed))
    }

    /// True if `path` is a layer of an upload kept here.
    pub fn holds(&self, path: &Path) -> bool {
        self.map()
            .values()
            .any(|s| s.layers.iter().any(|l| l == path))
    }

    /// Keeps `staging` for the primary to continue; drops it (its thread ends and deletes its
    /// layers) if it is still where it was after [`ABANDONED_AFTER`].
    pub fn keep(&self, vm: Uuid, staging: Staging) {
        let (upload, fed) = (staging.upload, staging.fed);
        // Any other upload kept for this VM is over.
        self.map().insert(vm, staging);
        let all = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ABANDONED_AFTER).await;
            let mut map = all.map();
            if map
                .get(&vm)
                .is_some_and(|s| s.upload == upload && s.fed == fed)
            {
                tracing::info!(%vm, %upload, "dropping a staged upload the primary did not continue");
                map.remove(&vm);
            }
        });
    }
}
