//! Reading a log once, verifying it while its extents go into the new (uncommitted) layers.
//!
//! One blocking task runs the [`LogReader`] (CPU-bound: checksums, BLAKE3, zstd). It routes every
//! extent to one of [`CONNECTIONS`] NBD connections per disk, all to the same writable qemu-nbd
//! export of that disk's temporary layer. The route is the stripe of the bytes:
//! `offset / STRIPE % CONNECTIONS`, and an extent that crosses a stripe boundary is split there.
//! So extents touching the same bytes always travel on the same connection, in log order, and a
//! later extent overwrites an earlier one as the format says (overlaps are allowed, later wins).
//! Each connection is driven by its own task fed by a bounded channel of batches; a batch owns
//! one data buffer that goes back to the reader once written, so memory stays bounded by
//! `(BATCHES_IN_FLIGHT + 2) * BATCH_BYTES` per connection and buffers are reused, not reallocated.
//! Data extents become NBD writes (adjacent ones merged); zero extents become NBD WRITE_ZEROES
//! without NO_HOLE, which qcow2 records as zero clusters (no data is allocated).
//!
//! Nothing read here is trusted before the trailer matched: the layers written are temporary and
//! referenced by nothing, and the caller deletes them when this returns an error.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wire::{
    Content, Expect, FrameData, LogDecodeError, LogReader, LogSummary, OwnedContent, OwnedFrame,
    ReaderCheckpoint,
};

use super::error::{ApplyError, StoreError};
use super::layout::Layout;
use crate::aligned::AlignedBuf;
use crate::export::{ExportSpec, NbdExport};
use crate::nbd::{NbdClient, NbdError};
use crate::qcow2::{Qcow2Progress, Qcow2WriteError, Qcow2Writer};

/// NBD connections per disk (qemu-nbd runs with `--shared=4`).
const CONNECTIONS: usize = 3;
/// Bytes of a disk that always go over the same connection. Small enough that a sequential log
/// keeps every connection busy (several stripes fit in the batches in flight), large enough that
/// a write rarely splits, and a multiple of the qcow2 cluster size.
const STRIPE: u64 = 1 << 20;
/// Most data bytes in one batch.
const BATCH_BYTES: usize = 1 << 20;
/// Most operations in one batch (bounds the memory of logs made of tiny extents).
const BATCH_OPS: usize = 4096;
/// Batches queued per connection.
const BATCHES_IN_FLIGHT: usize = 2;
/// Frames (of up to 4 MiB of data) queued to a full image's writer thread.
const FRAMES_IN_FLIGHT: usize = 2;
// A frame's data, aligned for the log, is aligned for the layers' `O_DIRECT` writes.
const _: () = assert!(wire::DATA_ALIGN.is_multiple_of(crate::qcow2::DIRECT_ALIGN));
/// Read buffer of the log file.
const READ_BUFFER: usize = 1 << 20;

/// A log whose header was read and checked.
pub(crate) type OpenLog = LogReader<BufReader<File>>;

/// Opens the log and reads and checks its header against `expect` (in a blocking task); with
/// `verified`, the hash the log was verified with when it arrived ([`LogReader::open_verified`]).
pub(crate) async fn open(
    log: &Path,
    expect: &Expect,
    verified: Option<[u8; 32]>,
) -> Result<OpenLog, ApplyError> {
    let path = log.to_path_buf();
    let expect = *expect;
    let task = tokio::task::spawn_blocking(move || -> Result<OpenLog, ApplyError> {
        let file = File::open(&path).map_err(StoreError::io("open", &path))?;
        let input = BufReader::with_capacity(READ_BUFFER, file);
        match verified {
            Some(hash) => LogReader::open_verified(input, &expect, hash),
            None => LogReader::open(input, &expect),
        }
        .map_err(|source| rejected(&path, source))
    });
    task.await.map_err(ApplyError::ReaderTask)?
}

/// Reads the rest of the log without applying it and returns its summary if it checks out.
pub(crate) async fn verify_rest(mut reader: OpenLog, log: &Path) -> Result<LogSummary, ApplyError> {
    let path = log.to_path_buf();
    let task = tokio::task::spawn_blocking(move || -> Result<LogSummary, ApplyError> {
        let read = (|| {
            while reader.next_extent()?.is_some() {}
            reader
                .summary()
                .cloned()
                .ok_or(LogDecodeError::ReaderFailed)
        })();
        read.map_err(|source| rejected(&path, source))
    });
    task.await.map_err(ApplyError::ReaderTask)?
}

fn rejected(path: &Path, source: LogDecodeError) -> ApplyError {
    ApplyError::Rejected {
        path: path.display().to_string(),
        source,
    }
}

/// Reads the rest of `reader` and writes every extent straight into new standalone qcow2 layers
/// (`tmps`, one per disk; see [`crate::qcow2`]). Reading and verifying (checksums, BLAKE3, zstd)
/// run on one thread and writing on another, joined by a bounded channel of whole frames: the
/// reader reads each frame's data into a buffer aligned for `O_DIRECT` that the writer writes
/// from and gives back, so the data is not copied between them. Returns the log's summary once
/// the trailer matched; on any error the caller must delete the layers.
pub(crate) async fn write_full_image(
    reader: OpenLog,
    log: &Path,
    tmps: &[PathBuf],
) -> Result<LogSummary, ApplyError> {
    let path = log.to_path_buf();
    let tmps = tmps.to_vec();
    let task = tokio::task::spawn_blocking(move || full_image_threads(reader, &path, &tmps));
    task.await.map_err(ApplyError::ReaderTask)?
}

/// [`write_full_image`]'s work, on the calling thread and one writer thread; `reader` may read any
/// input (a log file, or an upload as it arrives: [`PointStore::stage_full_image`]).
///
/// [`PointStore::stage_full_image`]: super::PointStore::stage_full_image
pub(crate) fn full_image_threads<R: std::io::Read>(
    reader: LogReader<R>,
    path: &Path,
    tmps: &[PathBuf],
) -> Result<LogSummary, ApplyError> {
    full_image_staged(reader, path, tmps, None, None).map(|(summary, _)| summary)
}

/// Where a staged full image stands between two records: the reader's place in the log and each
/// layer's progress, every byte written before it durable. Saved, it lets the image be continued
/// after a restart ([`StageCheckpoint::progress`], then [`super::PointStore::stage_checkpointed`]).
///
/// A layer's allocations are described by a file of runs beside it ([`Checkpoints::runs`]: 16
/// bytes per final run, appended as they become final) and a [`LayerMark`] here: how many of those
/// runs count, and the last run. So a checkpoint stays small however fragmented the image, and
/// each save writes only the runs that are new since the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageCheckpoint {
    pub reader: ReaderCheckpoint,
    pub layers: Vec<LayerMark>,
}

/// One layer's place in a [`StageCheckpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerMark {
    /// The disk's virtual size.
    pub size: u64,
    /// Final runs: the first `kept` entries of the layer's runs file.
    pub kept: u64,
    /// The last run (first cluster, clusters), which later allocations may have extended.
    pub last: Option<(u64, u64)>,
}

const STAGE_MAGIC: &[u8; 8] = b"VRSTAGE2";
const MARK_BYTES: usize = 40;

impl LayerMark {
    fn to_bytes(self) -> [u8; MARK_BYTES] {
        let mut out = [0u8; MARK_BYTES];
        let (first, count) = self.last.unwrap_or((0, 0));
        for (i, word) in [
            self.size,
            self.kept,
            u64::from(self.last.is_some()),
            first,
            count,
        ]
        .iter()
        .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
        out
    }

    fn from_bytes(bytes: &[u8]) -> Option<LayerMark> {
        if bytes.len() != MARK_BYTES {
            return None;
        }
        let word =
            |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        let last = match word(2) {
            0 => None,
            1 => Some((word(3), word(4))),
            _ => return None,
        };
        Some(LayerMark {
            size: word(0),
            kept: word(1),
            last,
        })
    }
}

/// Bytes of one run in a runs file: first cluster and count, little-endian.
const RUN_BYTES: u64 = 16;

impl StageCheckpoint {
    /// The log's offset the checkpoint continues from.
    pub fn offset(&self) -> u64 {
        self.reader.offset()
    }

    /// Its bytes, with a BLAKE3 checksum of them at the end.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = STAGE_MAGIC.to_vec();
        let mut put = |bytes: &[u8]| {
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        };
        put(&self.reader.to_bytes());
        for layer in &self.layers {
            put(&layer.to_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Bytes [`StageCheckpoint::to_bytes`] wrote; `None` when they are damaged or not one.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
        if blake3::hash(body).as_bytes()[..] != *sum || !body.starts_with(STAGE_MAGIC) {
            return None;
        }
        let mut rest = &body[STAGE_MAGIC.len()..];
        let mut parts = Vec::new();
        while !rest.is_empty() {
            let (len, tail) = rest.split_at_checked(8)?;
            let len = usize::try_from(u64::from_le_bytes(len.try_into().ok()?)).ok()?;
            let (part, tail) = tail.split_at_checked(len)?;
            parts.push(part);
            rest = tail;
        }
        let (reader, layers) = parts.split_first()?;
        Some(StageCheckpoint {
            reader: ReaderCheckpoint::from_bytes(reader)?,
            layers: layers
                .iter()
                .map(|l| LayerMark::from_bytes(l))
                .collect::<Option<Vec<_>>>()?,
        })
    }

    /// True when each layer's runs file in `runs` (one per layer) is long enough to hold the runs
    /// its mark counts (without reading them: [`StageCheckpoint::progress`] does).
    pub fn runs_present(&self, runs: &[PathBuf]) -> bool {
        runs.len() == self.layers.len()
            && self.layers.iter().zip(runs).all(|(mark, path)| {
                let need = mark.kept.checked_mul(RUN_BYTES);
                need == Some(0)
                    || need.is_some_and(|n| std::fs::metadata(path).is_ok_and(|m| m.len() >= n))
            })
    }

    /// Each layer's progress, its final runs read from its runs file in `runs` (one per layer, as
    /// given to [`Checkpoints::runs`]); an error when one is missing or shorter than its mark says.
    pub fn progress(&self, runs: &[PathBuf]) -> std::io::Result<Vec<Qcow2Progress>> {
        use std::os::unix::fs::FileExt;
        if runs.len() != self.layers.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "one runs file per layer",
            ));
        }
        self.layers
            .iter()
            .zip(runs)
            .map(|(mark, path)| {
                let len = mark
                    .kept
                    .checked_mul(RUN_BYTES)
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
                let mut bytes = vec![0u8; len];
                if len > 0 {
                    File::open(path)?.read_exact_at(&mut bytes, 0)?;
                }
                let mut all: Vec<(u64, u64)> = bytes
                    .chunks_exact(RUN_BYTES as usize)
                    .map(|r| {
                        let word = |i: usize| {
                            u64::from_le_bytes(r[i..i + 8].try_into().unwrap_or_default())
                        };
                        (word(0), word(8))
                    })
                    .collect();
                all.extend(mark.last);
                Ok(Qcow2Progress::new(mark.size, all))
            })
            .collect()
    }
}

/// Appends `runs` to the runs file `file` as its entries `from..`.
fn write_runs(file: &File, from: u64, runs: &[(u64, u64)]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    if runs.is_empty() {
        return Ok(());
    }
    let mut bytes = Vec::with_capacity(runs.len() * RUN_BYTES as usize);
    for (first, count) in runs {
        bytes.extend_from_slice(&first.to_le_bytes());
        bytes.extend_from_slice(&count.to_le_bytes());
    }
    let at = from
        .checked_mul(RUN_BYTES)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    file.write_all_at(&bytes, at)
}

/// A checkpoint on its way to the syncer: the reader's place, and per layer the runs that became
/// final since the last one handed over (to be written as entries `from..` of its runs file).
struct Pending {
    reader: ReaderCheckpoint,
    layers: Vec<PendingLayer>,
}

struct PendingLayer {
    /// The index in the runs file of the first of `new`.
    from: u64,
    new: Vec<crate::qcow2::Run>,
    mark: LayerMark,
}

/// How often a staged full image is checkpointed, and what is told each checkpoint.
pub struct Checkpoints<'a> {
    /// Log bytes between two checkpoints (at least; they are taken between records).
    pub every: u64,
    /// A checkpoint that comes while the last is still being saved is skipped, unless the one saved
    /// is more than this many log bytes behind it: then the writer waits to hand it over.
    pub max_lag: u64,
    /// Called on a thread of its own once the layers and their runs files are synced; it saves the
    /// checkpoint and says whether it could (the lag is measured from the last one saved).
    pub saved: Box<dyn FnMut(StageCheckpoint) -> bool + Send + 'a>,
    /// One runs file per layer ([`StageCheckpoint`]), created if missing; a staging taken up
    /// from a checkpoint must be given the same files.
    pub runs: Vec<PathBuf>,
}

/// What goes from the reader to the writer thread.
enum ToWriter {
    /// A frame's extents, with the buffer holding their data: handed over whole, not copied (the
    /// reader reads a frame's data aligned for the layers' `O_DIRECT` writes), and sent back once
    /// written, for the reader to read a later frame into.
    Frame(OwnedFrame),
    /// Every extent before it was sent: sync the layers and save this.
    Checkpoint(ReaderCheckpoint),
}

/// [`full_image_threads`], checkpointed every `checkpoints.every` log bytes when given (the reader
/// must be resumable: [`LogReader::open_resumable`] or [`LogReader::resume`]), writing into the
/// layers `resume` took up (one progress per layer), or into new ones. Returns the log's summary
/// and the bytes written with `O_DIRECT`.
pub(crate) fn full_image_staged<'a, R: std::io::Read>(
    mut reader: LogReader<R>,
    path: &Path,
    tmps: &[PathBuf],
    mut checkpoints: Option<Checkpoints<'a>>,
    resume: Option<&[Qcow2Progress]>,
) -> Result<(LogSummary, u64), ApplyError> {
    let sequence = reader.header().sequence;
    let sizes: Vec<u64> = reader
        .header()
        .disks
        .iter()
        .map(|d| d.virtual_size)
        .collect();
    let layer_error = move |disk: usize| {
        move |source| ApplyError::WriteLayer {
            sequence,
            disk,
            source,
        }
    };
    let mut writers = Vec::with_capacity(tmps.len());
    for (disk, (tmp, size)) in tmps.iter().zip(&sizes).enumerate() {
        let w = match resume {
            Some(progress) => {
                let p = progress
                    .get(disk)
                    .filter(|p| p.size() == *size)
                    .ok_or_else(|| rejected(path, LogDecodeError::ReaderFailed))?;
                Qcow2Writer::resume(tmp, p)
            }
            None => Qcow2Writer::create(tmp, *size),
        };
        writers.push(w.map_err(layer_error(disk))?);
    }
    let every = checkpoints.as_ref().map(|c| c.every.max(1));
    let max_lag = checkpoints.as_ref().map_or(u64::MAX, |c| c.max_lag);
    let saved_at = std::sync::atomic::AtomicU64::new(reader.offset());
    let saved_at = &saved_at;
    // Checkpoints are synced and saved by a thread of their own, so the writer does not wait for
    // the disk's flush: one that comes while the last is being saved is skipped, unless the saved
    // one lags more than `max_lag` behind; then the writer waits to hand it over.
    let mut syncer = None;
    if let Some(c) = checkpoints.take() {
        if c.runs.len() != writers.len() {
            return Err(rejected(path, LogDecodeError::ReaderFailed));
        }
        let mut handles = Vec::with_capacity(writers.len());
        let mut runs = Vec::with_capacity(writers.len());
        for (disk, (w, file)) in writers.iter().zip(&c.runs).enumerate() {
            let io = |e| layer_error(disk)(Qcow2WriteError::Io(e));
            handles.push(w.sync_handle().map_err(io)?);
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(file);
            runs.push(opened.map_err(io)?);
        }
        syncer = Some((c, handles, runs));
    }
    // Final runs already handed to the syncer, per layer (a resumed layer's are in its file).
    let mut handed: Vec<usize> = writers.iter().map(Qcow2Writer::final_runs).collect();
    // A sync that failed: the kernel may have dropped those pages and reports it once, so nothing
    // after is trusted: no more checkpoints, and the image fails.
    let sync_failed = std::sync::Mutex::new(None::<std::io::Error>);
    let (frame_tx, frame_rx) = std_mpsc::sync_channel::<ToWriter>(FRAMES_IN_FLIGHT);
    let (recycle_tx, recycle_rx) = std_mpsc::channel::<FrameData>();
    std::thread::scope(|scope| {
        let (save_tx, save_rx) = std_mpsc::sync_channel::<Pending>(0);
        let failed = &sync_failed;
        let mut syncing = None;
        if let Some((mut c, handles, runs)) = syncer {
            syncing = Some(scope.spawn(move || {
                for pending in save_rx {
                    let durable = pending
                        .layers
                        .iter()
                        .zip(&runs)
                        .try_for_each(|(l, file)| write_runs(file, l.from, &l.new))
                        .and_then(|()| handles.iter().chain(&runs).try_for_each(File::sync_data));
                    match durable {
                        Ok(()) => {
                            let cp = StageCheckpoint {
                                reader: pending.reader,
                                layers: pending.layers.iter().map(|l| l.mark).collect(),
                            };
                            let offset = cp.offset();
                            if (c.saved)(cp) {
                                saved_at.store(offset, std::sync::atomic::Ordering::Release);
                            }
                        }
                        Err(e) => {
                            *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                            return;
                        }
                    }
                }
            }));
        }
        let writer = scope.spawn(move || -> Result<Vec<Qcow2Writer>, ApplyError> {
            for msg in frame_rx {
                let frame = match msg {
                    ToWriter::Frame(frame) => frame,
                    ToWriter::Checkpoint(reader) => {
                        // Every write before it has returned: a sync that starts after covers them.
                        let layers = writers
                            .iter()
                            .zip(&handed)
                            .map(|(w, &from)| {
                                let (new, last) = w.runs_since(from);
                                let kept = (from + new.len()) as u64;
                                let mark = LayerMark {
                                    size: w.size(),
                                    kept,
                                    last,
                                };
                                PendingLayer {
                                    from: from as u64,
                                    new,
                                    mark,
                                }
                            })
                            .collect::<Vec<_>>();
                        let kept: Vec<usize> =
                            layers.iter().map(|l| l.mark.kept as usize).collect();
                        let lag = reader
                            .offset()
                            .saturating_sub(saved_at.load(std::sync::atomic::Ordering::Acquire));
                        let pending = Pending { reader, layers };
                        // A skipped one hands nothing: its runs go with the next.
                        let (taken, alive) = match save_tx.try_send(pending) {
                            Ok(()) => (true, true),
                            Err(std_mpsc::TrySendError::Full(p)) if lag > max_lag => {
                                let sent = save_tx.send(p).is_ok();
                                (sent, sent)
                            }
                            Err(std_mpsc::TrySendError::Full(_)) => (false, true),
                            Err(std_mpsc::TrySendError::Disconnected(_)) => (false, false),
                        };
                        if taken {
                            handed = kept;
                        }
                        if !alive {
                            // The syncer stopped: a sync failed (reported below).
                            return Err(layer_error(0)(Qcow2WriteError::Io(
                                std::io::Error::other("a staged layer could not be synced"),
                            )));
                        }
                        continue;
                    }
                };
                write_frame(&mut writers, &frame).map_err(|(disk, e)| layer_error(disk)(e))?;
                let _ = recycle_tx.send(frame.data);
            }
            Ok(writers)
        });
        // Reader: one frame at a time, into a buffer the writer gave back when there is one.
        let send = |item: ToWriter| frame_tx.send(item).is_ok();
        let mut last_checkpoint = reader.offset();
        let read = loop {
            let spare = recycle_rx.try_recv().unwrap_or_default();
            let frame = match reader.next_frame(spare) {
                Ok(Some(frame)) => frame,
                Ok(None) => break Ok(()),
                Err(source) => break Err(rejected(path, source)),
            };
            if frame.extents.iter().any(|e| e.disk as usize >= sizes.len()) {
                break Err(rejected(path, LogDecodeError::ReaderFailed));
            }
            if !send(ToWriter::Frame(frame)) {
                break Ok(()); // the writer stopped: its error is reported below
            }
            let due = every.is_some_and(|n| reader.offset() - last_checkpoint >= n);
            if let Some(c) = due.then(|| reader.checkpoint()).flatten() {
                last_checkpoint = c.offset();
                if !send(ToWriter::Checkpoint(c)) {
                    break Ok(());
                }
            }
        };
        drop(frame_tx);
        let written = writer.join();
        // The writer is done: the last checkpoint is saved (or its sync failed) before we look.
        if let Some(s) = syncing {
            let _ = s.join();
        }
        // A failed sync first: it explains a writer that stopped, and nothing after it is kept.
        if let Some(e) = sync_failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(layer_error(0)(Qcow2WriteError::Io(e)));
        }
        let written = written.map_err(|_| rejected(path, LogDecodeError::ReaderFailed))?;
        read?;
        let writers = written?;
        let summary = reader
            .summary()
            .cloned()
            .ok_or_else(|| rejected(path, LogDecodeError::ReaderFailed))?;
        let direct = writers.iter().map(Qcow2Writer::direct_bytes).sum();
        for (disk, w) in writers.into_iter().enumerate() {
            // Synced through its own file: a new one would not hear of an earlier write-back error.
            w.finish()
                .and_then(|f| f.sync_all().map_err(Qcow2WriteError::Io))
                .map_err(layer_error(disk))?;
        }
        Ok((summary, direct))
    })
}

/// Writes a frame's extents into the layers (the reader checked every extent's disk), Data
/// extents that follow each other both on the disk and in the frame's data as one write, so whole
/// clusters of them go `O_DIRECT`. On error, the disk it was written to.
fn write_frame(
    writers: &mut [Qcow2Writer],
    frame: &OwnedFrame,
) -> Result<(), (usize, Qcow2WriteError)> {
    let data = frame.data.bytes();
    // Data not yet written: disk, offset, range of `data`.
    let mut run: Option<(usize, u64, std::ops::Range<usize>)> = None;
    let flush = |writers: &mut [Qcow2Writer],
                 run: &mut Option<(usize, u64, std::ops::Range<usize>)>| {
        match run.take() {
            Some((disk, offset, range)) => writers[disk]
                .write(offset, &data[range])
                .map_err(|e| (disk, e)),
            None => Ok(()),
        }
    };
    for e in &frame.extents {
        let disk = e.disk as usize;
        match &e.content {
            OwnedContent::Data(range) => {
                if let Some((d, offset, r)) = &mut run {
                    if *d == disk && *offset + r.len() as u64 == e.offset && r.end == range.start {
                        r.end = range.end;
                        continue;
                    }
                }
                flush(writers, &mut run)?;
                run = Some((disk, e.offset, range.clone()));
            }
            OwnedContent::Zero(len) => {
                flush(writers, &mut run)?;
                writers[disk]
                    .write_zeroes(e.offset, *len)
                    .map_err(|e| (disk, e))?;
            }
        }
    }
    flush(writers, &mut run)
}

/// Where a run of bytes goes.
enum Op {
    /// The next `len` bytes of the batch's data go to `offset`.
    Data {
        offset: u64,
        len: usize,
    },
    Zero {
        offset: u64,
        len: u64,
    },
}

/// What the reader hands one writer at a time; reused once written.
#[derive(Default)]
struct Batch {
    data: AlignedBuf,
    ops: Vec<Op>,
}

impl Batch {
    fn push_data(&mut self, offset: u64, bytes: &[u8]) {
        self.data.push(bytes, BATCH_BYTES);
        if let Some(Op::Data { offset: at, len }) = self.ops.last_mut() {
            if *at + *len as u64 == offset {
                *len += bytes.len();
                return;
            }
        }
        self.ops.push(Op::Data {
            offset,
            len: bytes.len(),
        });
    }

    fn is_full(&self) -> bool {
        self.data.len() >= BATCH_BYTES || self.ops.len() >= BATCH_OPS
    }
}

/// How reading ended when it did not reach a matching trailer.
enum ReadEnd {
    /// The log is invalid: nothing of it may be committed.
    Rejected(LogDecodeError),
    /// A writer stopped (its error says why).
    WriterGone,
}

/// Reads the rest of `reader` and writes every extent into the layers `tmps` (one per disk, in
/// disk-table order), flushes every connection and stops the exports. Returns the log's summary
/// once the trailer matched; on any error the caller must delete the layers.
pub(crate) async fn write_log(
    layout: &Layout,
    reader: OpenLog,
    log: &Path,
    tmps: &[PathBuf],
) -> Result<LogSummary, ApplyError> {
    let sequence = reader.header().sequence;
    let mut exports = Vec::with_capacity(tmps.len());
    let mut clients = Vec::with_capacity(tmps.len() * CONNECTIONS);
    for (disk, tmp) in tmps.iter().enumerate() {
        let export_error = |source| ApplyError::Export {
            sequence,
            disk,
            source,
        };
        let spec = ExportSpec::new(tmp, "qcow2").writable();
        let export = NbdExport::start(&spec, &layout.run_dir(), &format!("apply-disk{disk}"))
            .await
            .map_err(export_error)?;
        for _ in 0..CONNECTIONS {
            clients.push(export.connect(&[]).await.map_err(export_error)?);
        }
        exports.push(export);
    }

    let (recycle_tx, recycle_rx) = std_mpsc::channel();
    let mut senders = Vec::with_capacity(clients.len());
    let mut writers: Vec<JoinHandle<Result<NbdClient, NbdError>>> =
        Vec::with_capacity(clients.len());
    for client in clients {
        let (tx, rx) = mpsc::channel(BATCHES_IN_FLIGHT);
        senders.push(tx);
        writers.push(tokio::spawn(write_batches(client, rx, recycle_tx.clone())));
    }
    drop(recycle_tx);
    let read = tokio::task::spawn_blocking(move || read_log(reader, senders, recycle_rx)).await;

    let summary = match read {
        Ok(Ok(summary)) => summary,
        Ok(Err(ReadEnd::Rejected(source))) => {
            abort(writers).await;
            stop(exports).await;
            return Err(rejected(log, source));
        }
        Ok(Err(ReadEnd::WriterGone)) => {
            let failed = join(writers, sequence).await.err();
            stop(exports).await;
            // A writer that stopped without an error is not possible; report it as the reader.
            return Err(failed.unwrap_or(ApplyError::Rejected {
                path: log.display().to_string(),
                source: LogDecodeError::ReaderFailed,
            }));
        }
        Err(e) => {
            abort(writers).await;
            stop(exports).await;
            return Err(ApplyError::ReaderTask(e));
        }
    };
    let finished = async {
        let clients = join(writers, sequence).await?;
        // Every write completed; now make them durable on every connection.
        for (i, client) in clients.into_iter().enumerate() {
            finish(client)
                .await
                .map_err(|source| write_error(sequence, i / CONNECTIONS, source))?;
        }
        Ok(())
    }
    .await;
    stop(exports).await;
    finished.map(|()| summary)
}

fn write_error(sequence: u64, disk: usize, source: NbdError) -> ApplyError {
    ApplyError::Write {
        sequence,
        disk,
        source,
    }
}

/// Waits for every writer; returns their connections in order, or the first error.
async fn join(
    writers: Vec<JoinHandle<Result<NbdClient, NbdError>>>,
    sequence: u64,
) -> Result<Vec<NbdClient>, ApplyError> {
    let mut clients = Vec::with_capacity(writers.len());
    let mut failed = None;
    for (i, writer) in writers.into_iter().enumerate() {
        match writer.await {
            Ok(Ok(client)) => clients.push(client),
            Ok(Err(source)) => {
                failed.get_or_insert(write_error(sequence, i / CONNECTIONS, source));
            }
            Err(e) => {
                failed.get_or_insert(ApplyError::ReaderTask(e));
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(clients),
    }
}

async fn abort(writers: Vec<JoinHandle<Result<NbdClient, NbdError>>>) {
    for writer in &writers {
        writer.abort();
    }
    for writer in writers {
        let _ = writer.await;
    }
}

async fn stop(exports: Vec<NbdExport>) {
    for export in exports {
        export.stop().await;
    }
}

/// One connection's task: writes the batches in the order received and hands their buffers back.
async fn write_batches(
    mut client: NbdClient,
    mut rx: mpsc::Receiver<Batch>,
    recycle: std_mpsc::Sender<Batch>,
) -> Result<NbdClient, NbdError> {
    while let Some(mut batch) = rx.recv().await {
        let mut at = 0;
        for op in batch.ops.drain(..) {
            match op {
                Op::Data { offset, len } => {
                    client
                        .write(offset, &batch.data.bytes()[at..at + len])
                        .await?;
                    at += len;
                }
                Op::Zero { offset, len } => client.write_zeroes(offset, len).await?,
            }
        }
        batch.data.clear();
        // The reader may be gone already; the buffer is then simply freed.
        let _ = recycle.send(batch);
    }
    Ok(client)
}

async fn finish(mut client: NbdClient) -> Result<(), NbdError> {
    client.flush().await?;
    client.disconnect().await
}

/// The reader's side: routes every extent to the batch of its connection and sends full batches.
struct Router {
    senders: Vec<mpsc::Sender<Batch>>,
    batches: Vec<Batch>,
    recycle: std_mpsc::Receiver<Batch>,
}

impl Router {
    /// The connection index of the bytes at `offset` of `disk`, and where its stripe ends.
    fn route(disk: usize, offset: u64) -> (usize, u64) {
        let stripe = offset / STRIPE;
        let conn = disk * CONNECTIONS + (stripe % CONNECTIONS as u64) as usize;
        (conn, (stripe + 1).saturating_mul(STRIPE))
    }

    fn data(&mut self, disk: usize, mut offset: u64, mut bytes: &[u8]) -> Result<(), ReadEnd> {
        while !bytes.is_empty() {
            let (conn, stripe_end) = Self::route(disk, offset);
            let room = BATCH_BYTES.saturating_sub(self.batches[conn].data.len());
            let n = bytes
                .len()
                .min(usize::try_from(stripe_end - offset).unwrap_or(usize::MAX))
                .min(room.max(1));
            let (now, rest) = bytes.split_at(n);
            self.batches[conn].push_data(offset, now);
            self.sent_if_full(conn)?;
            offset += n as u64;
            bytes = rest;
        }
        Ok(())
    }

    fn zero(&mut self, disk: usize, mut offset: u64, len: u64) -> Result<(), ReadEnd> {
        let end = offset + len;
        while offset < end {
            let (conn, stripe_end) = Self::route(disk, offset);
            let n = stripe_end.min(end) - offset;
            self.batches[conn].ops.push(Op::Zero { offset, len: n });
            self.sent_if_full(conn)?;
            offset += n;
        }
        Ok(())
    }

    fn sent_if_full(&mut self, conn: usize) -> Result<(), ReadEnd> {
        if self.batches[conn].is_full() {
            self.send(conn)?;
        }
        Ok(())
    }

    fn send(&mut self, conn: usize) -> Result<(), ReadEnd> {
        let fresh = self.recycle.try_recv().unwrap_or_default();
        let batch = std::mem::replace(&mut self.batches[conn], fresh);
        self.senders[conn]
            .blocking_send(batch)
            .map_err(|_| ReadEnd::WriterGone)
    }

    /// Sends what is left; dropping the senders then ends the writers.
    fn finish(mut self) -> Result<(), ReadEnd> {
        for conn in 0..self.batches.len() {
            if !self.batches[conn].ops.is_empty() {
                self.send(conn)?;
            }
        }
        Ok(())
    }
}

/// Reads the log to its end, routing extents to the writers. Extents of a frame are released
/// only once the frame checked out; the log is valid only once the trailer matched.
fn read_log(
    mut reader: OpenLog,
    senders: Vec<mpsc::Sender<Batch>>,
    recycle: std_mpsc::Receiver<Batch>,
) -> Result<LogSummary, ReadEnd> {
    let mut router = Router {
        batches: senders.iter().map(|_| Batch::default()).collect(),
        senders,
        recycle,
    };
    loop {
        let extent = match reader.next_extent() {
            Ok(Some(extent)) => extent,
            Ok(None) => break,
            Err(e) => return Err(ReadEnd::Rejected(e)),
        };
        let disk = extent.disk as usize;
        match extent.content {
            Content::Data(data) => router.data(disk, extent.offset, data)?,
            Content::Zero(len) => router.zero(disk, extent.offset, len)?,
        }
    }
    let summary = reader
        .summary()
        .cloned()
        .ok_or(ReadEnd::Rejected(LogDecodeError::ReaderFailed))?;
    router.finish()?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::process::Command;
    use wire::{Compression, DiskInfo, LogHeader, LogWriter, PointType};

    /// A full image's frames of data go into the layer from the buffers the reader read them
    /// into, their whole clusters with `O_DIRECT` (where the file system allows it), adjacent
    /// extents of a frame as one write; the layer reads back as the log says.
    #[test]
    fn whole_frames_go_into_the_layer_with_o_direct() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let size = 16u64 << 20;
        let header = LogHeader {
            vm: uuid::Uuid::from_u128(9),
            relationship: 0,
            sequence: 1,
            parent: 0,
            point_time_micros: 1_700_000_000_000_000,
            point_type: PointType::Standard,
            full_image: true,
            disks: vec![DiskInfo {
                id: "disk0".into(),
                virtual_size: size,
            }],
        };
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut random = |len: usize| -> Vec<u8> {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        // Two whole frames; then two halves of one cluster and the next cluster, adjacent extents
        // of one frame; then a piece of a cluster.
        let mut raw = vec![0u8; size as usize];
        let extents = [
            (0usize, 8usize << 20),
            (12 << 20, 32 << 10),
            ((12 << 20) + (32 << 10), 96 << 10),
            ((14 << 20) + 5, 3000),
        ];
        let mut w = LogWriter::new(Vec::new(), header, Compression::Off).expect("writer");
        for (offset, len) in extents {
            let data = random(len);
            raw[offset..offset + len].copy_from_slice(&data);
            w.write_data(0, offset as u64, &data).expect("data");
        }
        let (log, _) = w.finish().expect("log");
        let expect = Expect {
            vm: uuid::Uuid::from_u128(9),
            relationship: 0,
            sequence: 1,
            parent: 0,
        };
        let reader = LogReader::open(&log[..], &expect).expect("open");
        let layer = d.join("layer.qcow2");
        let (summary, direct) = full_image_staged(
            reader,
            &d.join("log"),
            std::slice::from_ref(&layer),
            None,
            None,
        )
        .expect("staged");
        assert_eq!(summary.bytes, log.len() as u64);
        let probe = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(d.join("probe"))
            .and_then(|f| f.write_all_at(AlignedBuf::with_capacity(4096).area_mut(), 0));
        if probe.is_ok() {
            assert_eq!(
                direct,
                (8 << 20) + (128 << 10),
                "every whole cluster went O_DIRECT"
            );
        } else {
            eprintln!("this file system refused O_DIRECT: only the layer's bytes are checked");
        }
        let raw_path = d.join("expected.raw");
        std::fs::write(&raw_path, &raw).expect("raw");
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&raw_path)
            .arg(&layer)
            .output()
            .expect("qemu-img");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
