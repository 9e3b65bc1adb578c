//! Change tracking by hash scan: for disks nobody tracks (the VM is off, a raw file, a lost bitmap).
//!
//! The disk is read through an NBD export; `base:allocation` tells which ranges are holes or zeros,
//! and those are never read. Every other block (64 KiB by default) is hashed with BLAKE3 and
//! compared with the map of the last shipped point ([`hashmap`]); blocks that differ go into the
//! replication log, adjacent ones of one read (up to 4 MiB) written as one extent straight from the
//! read buffer. The new map is written beside the old one and becomes the map of record only when
//! the consumer confirms the point is durable ([`hashmap::commit`]). Memory stays bounded: one read run and one map entry at a time.
//!
//! Without a previous map the scan produces a full image: every non-zero block, and no zero extents
//! (the replica starts from an empty, sparse image).

mod files;
pub mod hashmap;
pub mod mapped;
mod source;

pub use source::Source;

use std::collections::VecDeque;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use wire::{LogEncodeError, LogWriter};

use crate::nbd::{Extent, NbdError};
use files::Prefetch;
use hashmap::{block_count, block_hash, HashMapError, MapReader, MapWriter, ZERO};

/// Default block size of the hash map.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;
/// Bytes asked about in one BLOCK_STATUS request.
const MAP_CHUNK: u64 = 64 << 20;
/// Largest read of consecutive data blocks (and largest extent handed to the log at once).
const READ_RUN: u64 = 4 << 20;

/// Waits until the consumer of the log a scan writes has room for more: a log sent from memory
/// while it is written holds only so much unsent (`vmreplicad`'s `GrowingLog`).
pub trait Pace: Send + Sync {
    /// Resolves once the log has room for more; false when its consumer gave up (the scan stops
    /// then, even where it would write nothing for a long while).
    fn room(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;

    /// The bytes of the read being scanned (`None` once it is scanned). The log's data comes from
    /// them where it is written from the read's buffer (whole frames of data): a consumer that
    /// keeps what it is given may keep slices of these instead of copies. They do not change while
    /// any slice of them lives, and their buffer is read into again only after.
    fn lend(&self, _bytes: Option<Bytes>) {}
}

/// Lends the read being scanned to the paced scan's consumer ([`Pace::lend`]).
fn lend(bytes: Option<Bytes>) {
    let _ = PACE.try_with(|pace| pace.lend(bytes));
}

tokio::task_local! {
    static PACE: Arc<dyn Pace>;
}

/// Runs `work` (which scans into a log) with `pace` consulted after every read.
pub async fn paced<F: Future>(pace: Arc<dyn Pace>, work: F) -> F::Output {
    PACE.scope(pace, work).await
}

/// After every read: a file read never waits in the runtime, so a future joined with the scan (the
/// upload of the log being written) gets its turn; and a paced scan waits for room, or stops when
/// the log's consumer gave up.
async fn after_read() -> Result<(), ScanError> {
    tokio::task::yield_now().await;
    if let Ok(pace) = PACE.try_with(Arc::clone) {
        if !pace.room().await {
            return Err(ScanError::Log(LogEncodeError::Io(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the upload of this log stopped",
            ))));
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("reading the disk failed")]
    Nbd(#[from] NbdError),
    #[error(transparent)]
    HashMap(#[from] HashMapError),
    #[error("writing the replication log failed")]
    Log(#[from] LogEncodeError),
    /// The previous map cannot describe this disk: the replica needs a resynchronization.
    #[error("resynchronization required: {0}")]
    ResyncRequired(String),
}

/// What a scan read and found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanStats {
    pub blocks: u64,
    pub changed_blocks: u64,
    /// Bytes of changed data written to the log (before compression).
    pub data_bytes: u64,
    /// Bytes written to the log as zero extents.
    pub zero_bytes: u64,
    /// Bytes read from the disk.
    pub read_bytes: u64,
}

/// Hands changed blocks to the log: data spans as they are (each a run of adjacent changed blocks
/// of one read, written from the read buffer without a copy), zero ranges merged while adjacent.
struct Coalescer<'a, W: Write> {
    log: &'a mut LogWriter<W>,
    disk: u32,
    zero: Option<(u64, u64)>,
}

impl<W: Write> Coalescer<'_, W> {
    /// `hashes`: the BLAKE3 of each block of `bytes` when the blocks are the log's digest pieces
    /// (`wire::limits::DIGEST_PIECE`), so the log does not hash them again; else empty.
    fn data(
        &mut self,
        offset: u64,
        bytes: &[u8],
        hashes: &[[u8; 32]],
    ) -> Result<(), LogEncodeError> {
        self.flush_zero()?;
        self.log.write_data_hashed(self.disk, offset, bytes, hashes)
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<(), LogEncodeError> {
        match &mut self.zero {
            Some((start, n)) if *start + *n == offset => *n += len,
            _ => {
                self.flush_zero()?;
                self.zero = Some((offset, len));
            }
        }
        Ok(())
    }

    fn flush_zero(&mut self) -> Result<(), LogEncodeError> {
        if let Some((offset, len)) = self.zero.take() {
            self.log.write_zero(self.disk, offset, len)?;
        }
        Ok(())
    }
}

/// What a block's new hash means for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Same,
    Data,
    Zero,
}

/// True when `[offset, offset+len)` lies entirely in extents that read as zeros.
fn all_zero(extents: &[Extent], offset: u64, len: u64) -> bool {
    let end = offset + len;
    let mut pos = offset;
    for e in extents
        .iter()
        .filter(|e| e.end() > offset && e.offset < end)
    {
        if e.offset > pos || !e.is_zero() {
            return false;
        }
        pos = e.end();
        if pos >= end {
            return true;
        }
    }
    pos >= end
}

/// Scans the disk `source` into `log` as disk `disk_index`,
/// comparing with `previous` (the map of the last shipped point, None for a full image). Writes the
/// new map to `<map_path>.tmp` and returns that path for [`hashmap::commit`].
pub async fn scan_disk<W: Write>(
    source: &mut Source<'_>,
    disk_index: u32,
    previous: Option<&Path>,
    map_path: &Path,
    block_size: u32,
    log: &mut LogWriter<W>,
) -> Result<(PathBuf, ScanStats), ScanError> {
    scan_disk_ranges(
        source, disk_index, previous, map_path, block_size, log, None,
    )
    .await
}

/// [`scan_disk`] limited to `candidates`, sorted byte ranges (offset, length) outside which nothing
/// changed since `previous` (what a dirty bitmap reports): blocks touching a candidate are read,
/// hashed and compared as usual, every other block keeps its old hash without being read. So a
/// block a bitmap calls dirty but whose content is what the replica has is not shipped, and the
/// new map stays exact. Candidates need a previous map.
pub async fn scan_disk_ranges<W: Write>(
    source: &mut Source<'_>,
    disk_index: u32,
    previous: Option<&Path>,
    map_path: &Path,
    block_size: u32,
    log: &mut LogWriter<W>,
    candidates: Option<&[(u64, u64)]>,
) -> Result<(PathBuf, ScanStats), ScanError> {
    hashmap::check_block_size(block_size)?;
    if candidates.is_some() && previous.is_none() {
        return Err(ScanError::ResyncRequired(
            "changed ranges without the map of the last shipped point".into(),
        ));
    }
    let size = source.size()?;
    let mut old = match previous {
        Some(p) => Some(MapReader::open(p)?),
        None => None,
    };
    if let Some(o) = &old {
        if o.disk_size != size {
            return Err(ScanError::ResyncRequired(format!(
                "the disk's size changed from {} to {size} bytes",
                o.disk_size
            )));
        }
        if o.block_size != block_size {
            return Err(ScanError::ResyncRequired(format!(
                "the map's block size is {}, not {block_size}",
                o.block_size
            )));
        }
    }
    let mut map = MapWriter::create(map_path, block_size, size)?;
    let mut out = Coalescer {
        log,
        disk: disk_index,
        zero: None,
    };
    let mut stats = ScanStats {
        blocks: block_count(size, block_size),
        ..ScanStats::default()
    };
    let bs = u64::from(block_size);
    // The full hashes of the span's blocks, for the log's digest, when its pieces are the blocks.
    let mut span_hashes: Option<Vec<[u8; 32]>> = (bs == wire::limits::DIGEST_PIECE).then(Vec::new);
    let mut reads = Reads::new(source, READ_RUN.max(bs));
    let mut planner = Planner {
        wanted: Candidates {
            ranges: candidates,
            next: 0,
        },
        next: 0,
        end: size,
        size,
        block_size: bs,
    };
    while let Some(steps) = reads.next_chunk(&mut planner).await? {
        for step in steps {
            match step {
                Step::Keep(blocks) => {
                    for _ in 0..blocks {
                        keep_old(&mut old, &mut map)?;
                    }
                }
                Step::Hole(offset, len) => {
                    if compare(&mut old, &mut map, &mut stats, len, false, ZERO)? == Change::Zero {
                        out.zero(offset, len)?;
                    }
                }
                Step::Read(run_start, len) => {
                    let buf = reads.take(run_start, len).await?;
                    stats.read_bytes += len;
                    after_read().await?;
                    // The changed data blocks of this read in a row: [from, to) of `buf`.
                    let mut span: Option<(usize, usize)> = None;
                    let mut at = 0usize;
                    for block in buf.chunks(block_size as usize) {
                        let (hash, full) = hashmap::block_digest(block);
                        let len = block.len();
                        match compare(&mut old, &mut map, &mut stats, len as u64, true, hash)? {
                            Change::Data => {
                                match &mut span {
                                    Some((_, to)) if *to == at => *to += len,
                                    _ => {
                                        let s = span.take();
                                        flush_span(&mut out, run_start, buf, s, &mut span_hashes)?;
                                        span = Some((at, at + len));
                                    }
                                }
                                // A Data block is never zeros, so it has its full hash (were it
                                // missing, the count would not fit and the log would hash them).
                                if let (Some(h), Some(full)) = (&mut span_hashes, full) {
                                    h.push(full);
                                }
                            }
                            Change::Zero => {
                                let s = span.take();
                                flush_span(&mut out, run_start, buf, s, &mut span_hashes)?;
                                out.zero(run_start + at as u64, len as u64)?;
                            }
                            Change::Same => {
                                let s = span.take();
                                flush_span(&mut out, run_start, buf, s, &mut span_hashes)?;
                            }
                        }
                        at += len;
                    }
                    flush_span(&mut out, run_start, buf, span, &mut span_hashes)?;
                    reads.done();
                }
            }
        }
    }
    out.flush_zero()?;
    if let Some(o) = &mut old {
        o.next_hash()?; // verifies the trailer if the last block was already read
    }
    Ok((map.finish()?, stats))
}

/// The hashes of blocks `first..first + count` of `source` (as [`hashmap::block_hash`]; ZERO for a
/// block its allocation calls zero, known without reading it), appended to `out`, in order. Reads
/// consecutive data blocks at once, up to 4 MiB. Returns the bytes read.
pub async fn hash_blocks(
    source: &mut Source<'_>,
    first: u64,
    count: u64,
    block_size: u32,
    out: &mut Vec<[u8; hashmap::HASH_LEN]>,
) -> Result<u64, ScanError> {
    hashmap::check_block_size(block_size)?;
    let size = source.size()?;
    let bs = u64::from(block_size);
    let start = first.saturating_mul(bs).min(size);
    let end = first.saturating_add(count).saturating_mul(bs).min(size);
    let mut read = 0;
    let mut reads = Reads::new(source, READ_RUN.max(bs));
    let mut planner = Planner {
        wanted: Candidates {
            ranges: None,
            next: 0,
        },
        next: start,
        end,
        size,
        block_size: bs,
    };
    while let Some(steps) = reads.next_chunk(&mut planner).await? {
        for step in steps {
            match step {
                Step::Read(offset, len) => {
                    let buf = reads.take(offset, len).await?;
                    out.extend(buf.chunks(block_size as usize).map(block_hash));
                    read += len;
                    reads.done();
                    tokio::task::yield_now().await;
                }
                Step::Hole(..) => out.push(ZERO),
                Step::Keep(_) => {} // only with candidates
            }
        }
    }
    Ok(read)
}

/// One step of a scan, planned a chunk ([`MAP_CHUNK`]) at a time before any of it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// This many blocks outside every candidate range: their old hashes stand, nothing is read.
    Keep(u64),
    /// A block (offset, length) that reads as zeros by its allocation: known without reading.
    Hole(u64, u64),
    /// A run of blocks that may hold data (offset, length, at most [`READ_RUN`]), read at once.
    Read(u64, u64),
}

/// Plans the steps of `[next, end)` of a disk of `size` bytes, a chunk at a time.
struct Planner<'a> {
    wanted: Candidates<'a>,
    next: u64,
    end: u64,
    size: u64,
    block_size: u64,
}

impl Planner<'_> {
    /// The steps of the next chunk, None past the end.
    async fn plan(&mut self, source: &mut Source<'_>) -> Result<Option<Vec<Step>>, NbdError> {
        if self.next >= self.end {
            return Ok(None);
        }
        let (size, bs) = (self.size, self.block_size);
        let chunk_start = self.next;
        let chunk_end = (chunk_start + MAP_CHUNK).min(self.end);
        self.next = chunk_end;
        let mut steps = Vec::new();
        let keep = |steps: &mut Vec<Step>, blocks: u64| match steps.last_mut() {
            Some(Step::Keep(n)) => *n += blocks,
            _ => steps.push(Step::Keep(blocks)),
        };
        if !self.wanted.any(chunk_start, chunk_end - chunk_start) {
            keep(&mut steps, (chunk_end - chunk_start).div_ceil(bs));
            return Ok(Some(steps));
        }
        let extents = source
            .allocation(chunk_start, chunk_end - chunk_start)
            .await?;
        let mut off = chunk_start;
        while off < chunk_end {
            let len = bs.min(size - off);
            if !self.wanted.any(off, len) {
                keep(&mut steps, 1);
                off += len;
                continue;
            }
            let mut run_end = off;
            while run_end < chunk_end
                && run_end - off < READ_RUN
                && self.wanted.any(run_end, bs.min(size - run_end))
                && !all_zero(&extents, run_end, bs.min(size - run_end))
            {
                run_end += bs.min(size - run_end);
            }
            if run_end > off {
                steps.push(Step::Read(off, run_end - off));
                off = run_end;
            } else {
                steps.push(Step::Hole(off, len));
                off += len;
            }
        }
        Ok(Some(steps))
    }
}

/// Where a scan's reads come from: reader threads ahead of the scan for image files, else the
/// source itself, one read at a time.
struct Reads<'s, 'a> {
    source: &'s mut Source<'a>,
    /// The reader threads, started at the first chunk with data (none for a range of holes).
    ahead: Option<Prefetch>,
    /// Whether starting them was tried, and the largest read.
    tried: bool,
    run: usize,
    /// Chunks planned and not yet scanned (with `ahead`, their reads are asked for).
    planned: VecDeque<Vec<Step>>,
    /// The bytes of the read being scanned, lent to the log's consumer until [`Reads::done`].
    held: Option<Bytes>,
    buf: Vec<u8>,
}

impl<'s, 'a> Reads<'s, 'a> {
    fn new(source: &'s mut Source<'a>, run: u64) -> Reads<'s, 'a> {
        Reads {
            source,
            ahead: None,
            tried: false,
            run: usize::try_from(run).unwrap_or(usize::MAX),
            planned: VecDeque::new(),
            held: None,
            buf: Vec::new(),
        }
    }

    /// The steps of the next chunk. Reading ahead, the chunk after it is planned as well and its
    /// reads asked for, so the readers do not wait at a chunk's end.
    async fn next_chunk(
        &mut self,
        planner: &mut Planner<'_>,
    ) -> Result<Option<Vec<Step>>, NbdError> {
        while self.planned.len() < if self.ahead.is_some() { 2 } else { 1 } {
            let Some(steps) = planner.plan(self.source).await? else {
                break;
            };
            let reads = steps.iter().filter_map(|s| match *s {
                Step::Read(offset, len) => Some((offset, usize::try_from(len).unwrap_or(0))),
                _ => None,
            });
            if !self.tried && reads.clone().next().is_some() {
                self.tried = true;
                self.ahead = self.source.prefetch(self.run);
            }
            if let Some(ahead) = &mut self.ahead {
                for (offset, len) in reads {
                    ahead.ask(offset, len);
                }
            }
            self.planned.push_back(steps);
        }
        Ok(self.planned.pop_front())
    }

    /// The bytes of the read step `(offset, len)`, the next one planned.
    async fn take(&mut self, offset: u64, len: u64) -> Result<&[u8], NbdError> {
        self.done();
        let Some(ahead) = &mut self.ahead else {
            self.buf
                .resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
            self.source.read(offset, &mut self.buf).await?;
            return Ok(&self.buf);
        };
        let (at, buf) = ahead.next().await?;
        if at != offset || buf.len() as u64 != len {
            return Err(NbdError::Io(std::io::Error::other(format!(
                "the scan's reader returned {} bytes at {at} for {len} at {offset}",
                buf.len()
            ))));
        }
        lend(Some(buf.clone()));
        Ok(self.held.insert(buf))
    }

    /// The bytes [`Reads::take`] returned are no longer needed: their buffer goes back to its
    /// reader once the log's consumer dropped what it kept of them.
    fn done(&mut self) {
        if self.held.take().is_some() {
            lend(None);
        }
    }
}

impl Drop for Reads<'_, '_> {
    /// A scan that stopped on an error lends nothing any more either.
    fn drop(&mut self) {
        self.done();
    }
}

/// The candidate ranges, consulted in increasing offset order.
struct Candidates<'a> {
    ranges: Option<&'a [(u64, u64)]>,
    next: usize,
}

impl Candidates<'_> {
    /// True when `[offset, offset+len)` touches a candidate (always, without candidates). Calls
    /// must come with non-decreasing offsets.
    fn any(&mut self, offset: u64, len: u64) -> bool {
        let Some(ranges) = self.ranges else {
            return true;
        };
        while self
            .ranges
            .and_then(|r| r.get(self.next))
            .is_some_and(|(o, l)| o + l <= offset)
        {
            self.next += 1;
        }
        ranges
            .get(self.next)
            .is_some_and(|(o, _)| *o < offset + len)
    }
}

/// Carries an unchanged block's old hash into the new map.
fn keep_old(old: &mut Option<MapReader>, map: &mut MapWriter) -> Result<(), ScanError> {
    let hash = match old {
        Some(o) => o
            .next_hash()?
            .ok_or_else(|| ScanError::ResyncRequired("the previous map ended early".into()))?,
        None => ZERO,
    };
    map.push(&hash)?;
    Ok(())
}

/// Writes the changed data blocks `span` ([from, to) of `buf`, read at `run_start`) to the log.
fn flush_span<W: Write>(
    out: &mut Coalescer<'_, W>,
    run_start: u64,
    buf: &[u8],
    span: Option<(usize, usize)>,
    hashes: &mut Option<Vec<[u8; 32]>>,
) -> Result<(), LogEncodeError> {
    let given = hashes.as_deref().unwrap_or(&[]);
    let written = match span {
        Some((from, to)) => out.data(run_start + from as u64, &buf[from..to], given),
        None => Ok(()),
    };
    if let Some(h) = hashes {
        h.clear();
    }
    written
}

/// Records a block's new hash (`len` bytes; `read`: its bytes were read, not known to be zeros)
/// and says what the log needs: its data, a zero extent, or nothing when it did not change.
fn compare(
    old: &mut Option<MapReader>,
    map: &mut MapWriter,
    stats: &mut ScanStats,
    len: u64,
    read: bool,
    hash: [u8; hashmap::HASH_LEN],
) -> Result<Change, ScanError> {
    map.push(&hash)?;
    let previous = match old {
        Some(o) => o.next_hash()?,
        None => None,
    };
    let changed = match previous {
        Some(p) => p != hash,
        None => hash != ZERO, // a full image ships data only
    };
    if !changed {
        return Ok(Change::Same);
    }
    stats.changed_blocks += 1;
    if read && hash != ZERO {
        stats.data_bytes += len;
        Ok(Change::Data)
    } else {
        stats.zero_bytes += len;
        Ok(Change::Zero)
    }
}
