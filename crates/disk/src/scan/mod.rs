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

pub mod hashmap;
pub mod mapped;
mod source;

pub use source::Source;

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use wire::{LogEncodeError, LogWriter};

use crate::nbd::{Extent, NbdError};
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
    fn room(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

tokio::task_local! {
    static PACE: Arc<dyn Pace>;
}

/// Runs `work` (which scans into a log) with `pace` consulted after every read.
pub async fn paced<F: Future>(pace: Arc<dyn Pace>, work: F) -> F::Output {
    PACE.scope(pace, work).await
}

/// After every read: a file read never waits in the runtime, so a future joined with the scan (the
/// upload of the log being written) gets its turn; and a paced scan waits for room.
async fn after_read() {
    tokio::task::yield_now().await;
    if let Ok(pace) = PACE.try_with(Arc::clone) {
        pace.room().await;
    }
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
    fn data(&mut self, offset: u64, bytes: &[u8]) -> Result<(), LogEncodeError> {
        self.flush_zero()?;
        self.log.write_data(self.disk, offset, bytes)
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
    let mut chunk_start = 0;
    let mut buf = Vec::new();
    let mut wanted = Candidates {
        ranges: candidates,
        next: 0,
    };
    while chunk_start < size {
        let chunk_len = MAP_CHUNK.min(size - chunk_start);
        let chunk_end = chunk_start + chunk_len;
        let mut off = chunk_start;
        if !wanted.any(chunk_start, chunk_len) {
            // Nothing in this chunk changed: the old hashes stand, nothing is read.
            while off < chunk_end {
                keep_old(&mut old, &mut map)?;
                off += bs.min(size - off);
            }
            chunk_start = chunk_end;
            continue;
        }
        let extents = source.allocation(chunk_start, chunk_len).await?;
        while off < chunk_end {
            if !wanted.any(off, bs.min(size - off)) {
                keep_old(&mut old, &mut map)?;
                off += bs.min(size - off);
                continue;
            }
            // A run of blocks that may hold data, read at once.
            let mut run_end = off;
            while run_end < chunk_end
                && run_end - off < READ_RUN
                && wanted.any(run_end, bs.min(size - run_end))
                && !all_zero(&extents, run_end, bs.min(size - run_end))
            {
                run_end += bs.min(size - run_end);
            }
            if run_end > off {
                let run_len = usize::try_from(run_end - off).unwrap_or(usize::MAX);
                buf.resize(run_len, 0);
                source.read(off, &mut buf).await?;
                stats.read_bytes += run_end - off;
                after_read().await;
                let run_start = off;
                // The changed data blocks of this read in a row: [from, to) of `buf`.
                let mut span: Option<(usize, usize)> = None;
                let mut at = 0usize;
                for block in buf.chunks(block_size as usize) {
                    let hash = block_hash(block);
                    let len = block.len();
                    match compare(&mut old, &mut map, &mut stats, len as u64, true, hash)? {
                        Change::Data => match &mut span {
                            Some((_, to)) if *to == at => *to += len,
                            _ => {
                                flush_span(&mut out, run_start, &buf, span.take())?;
                                span = Some((at, at + len));
                            }
                        },
                        Change::Zero => {
                            flush_span(&mut out, run_start, &buf, span.take())?;
                            out.zero(off, len as u64)?;
                        }
                        Change::Same => flush_span(&mut out, run_start, &buf, span.take())?,
                    }
                    at += len;
                    off += len as u64;
                }
                flush_span(&mut out, run_start, &buf, span)?;
            } else {
                // A hole or zero range: known without reading.
                let len = bs.min(size - off);
                if compare(&mut old, &mut map, &mut stats, len, false, ZERO)? == Change::Zero {
                    out.zero(off, len)?;
                }
                off += len;
            }
        }
        chunk_start = chunk_end;
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
    let mut buf = Vec::new();
    let mut chunk_start = start;
    while chunk_start < end {
        let chunk_end = (chunk_start + MAP_CHUNK).min(end);
        let extents = source
            .allocation(chunk_start, chunk_end - chunk_start)
            .await?;
        let mut off = chunk_start;
        while off < chunk_end {
            let mut run_end = off;
            while run_end < chunk_end
                && run_end - off < READ_RUN
                && !all_zero(&extents, run_end, bs.min(size - run_end))
            {
                run_end += bs.min(size - run_end);
            }
            if run_end > off {
                buf.resize(usize::try_from(run_end - off).unwrap_or(usize::MAX), 0);
                source.read(off, &mut buf).await?;
                read += run_end - off;
                tokio::task::yield_now().await;
                out.extend(buf.chunks(block_size as usize).map(block_hash));
                off = run_end;
            } else {
                out.push(ZERO);
                off += bs.min(size - off);
            }
        }
        chunk_start = chunk_end;
    }
    Ok(read)
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
) -> Result<(), LogEncodeError> {
    match span {
        Some((from, to)) => out.data(run_start + from as u64, &buf[from..to]),
        None => Ok(()),
    }
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
