//! The streaming writer: extents go in one at a time, frames of at most 4 MiB of data come out,
//! and `finish` closes the log with the trailer. Memory stays within one frame (its table, its raw
//! data, its compression and the record being written) whatever the size of the log.

use std::io::Write;

use super::error::LogEncodeError;
use super::extent::check_range;
use super::frame::{self, Encoding, Entry, EntryKind};
use super::header::LogHeader;
use super::limits::{DIGEST_PIECE, FORMAT_VERSION, MAX_FRAME_EXTENTS, MAX_FRAME_RAW};
use super::record::{self, digest_pieces, RecordKind, Sink};
use super::summary::{LogCounts, LogSummary, Trailer};

/// How the writer stores frame data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Store data as is (the relationship's `CompressionEnabled` is false).
    Off,
    /// Compress with zstd at `level` (0 is zstd's default). A frame that does not get smaller is
    /// stored as is.
    Zstd { level: i32 },
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd { level: 3 }
    }
}

/// Writes one replication log into any `Write`.
pub struct LogWriter<W: Write> {
    sink: Sink<W>,
    header: LogHeader,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    entries: Vec<Entry>,
    raw: Vec<u8>,
    packed: Vec<u8>,
    record: Vec<u8>,
    counts: LogCounts,
    failed: bool,
    /// Frames left to store without trying to compress (see [`LogWriter::compress`]).
    skip_compression: u32,
    /// The pending frame's data digest (format version 2): the hash of each piece of its data.
    digest: Vec<u8>,
}

/// After a frame that zstd could not shrink, this many frames are stored without trying: data that
/// does not compress (encrypted, already compressed, random) usually comes in long runs, and
/// trying costs more than the copy. Then compression is tried again.
const INCOMPRESSIBLE_SKIP: u32 = 8;

impl<W: Write> LogWriter<W> {
    /// Validates the header and writes the preamble and the header record, in the newest format
    /// version ([`FORMAT_VERSION`]).
    pub fn new(
        out: W,
        header: LogHeader,
        compression: Compression,
    ) -> Result<Self, LogEncodeError> {
        Self::with_version(out, header, compression, FORMAT_VERSION)
    }

    /// [`LogWriter::new`] in format `version` (one of [`super::limits::FORMAT_VERSIONS`]): the
    /// one the protocol handshake agreed on.
    pub fn with_version(
        out: W,
        header: LogHeader,
        compression: Compression,
        version: u16,
    ) -> Result<Self, LogEncodeError> {
        header.validate()?;
        let compressor = match compression {
            Compression::Off => None,
            Compression::Zstd { level } => {
                Some(zstd::bulk::Compressor::new(level).map_err(LogEncodeError::Compress)?)
            }
        };
        let mut writer = LogWriter {
            sink: Sink::new(out, version)?,
            header,
            compressor,
            entries: Vec::new(),
            raw: Vec::new(),
            packed: Vec::new(),
            record: Vec::new(),
            counts: LogCounts::default(),
            failed: false,
            skip_compression: 0,
            digest: Vec::new(),
        };
        record::begin(&mut writer.record);
        writer.header.encode(&mut writer.record);
        writer.sink.finish(RecordKind::Header, &mut writer.record)?;
        Ok(writer)
    }

    /// The header being written.
    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// Adds `data` at byte `offset` of disk `disk` (an index into the header's disk table). Data
    /// that does not fit in the current frame is split across frames.
    pub fn write_data(
        &mut self,
        disk: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), LogEncodeError> {
        self.write_data_hashed(disk, offset, data, &[])
    }

    /// [`LogWriter::write_data`] given `hashes`: the BLAKE3 hash of each piece of `data`, split
    /// where the disk offset is a multiple of [`DIGEST_PIECE`], in order (a scan's block hashes).
    /// In format version 2 such a piece is not hashed again for the stream's hash. Hashes that are
    /// not one per piece are not used; a wrong one makes the log's hash wrong, so the replica
    /// refuses the log (`HashMismatch`): it cannot make a wrong log pass.
    pub fn write_data_hashed(
        &mut self,
        disk: u32,
        offset: u64,
        data: &[u8],
        hashes: &[[u8; 32]],
    ) -> Result<(), LogEncodeError> {
        self.usable()?;
        let given = Given::new(offset, data.len() as u64, hashes);
        check_range(&self.header.disks, disk, offset, data.len() as u64)?;
        let (mut at, mut rest) = (offset, data);
        while !rest.is_empty() {
            if self.raw.len() == MAX_FRAME_RAW || self.entries.len() == MAX_FRAME_EXTENTS {
                self.flush_frame()?;
            }
            if rest.len() >= MAX_FRAME_RAW {
                // A whole frame of data: written from the caller's buffer, not copied first. What
                // is pending goes out first as a shorter frame, so one unaligned extent does not
                // make every later one be copied.
                self.flush_frame()?;
                let (piece, tail) = rest.split_at(MAX_FRAME_RAW);
                self.entries.push(Entry {
                    kind: EntryKind::Data,
                    disk,
                    offset: at,
                    len: MAX_FRAME_RAW as u64,
                });
                self.add_digest(&given, at, piece);
                self.emit_frame(piece)?;
                (at, rest) = (at + MAX_FRAME_RAW as u64, tail);
                continue;
            }
            let (piece, tail) = rest.split_at(rest.len().min(MAX_FRAME_RAW - self.raw.len()));
            let len = piece.len() as u64;
            self.entries.push(Entry {
                kind: EntryKind::Data,
                disk,
                offset: at,
                len,
            });
            self.add_digest(&given, at, piece);
            self.raw.extend_from_slice(piece);
            (at, rest) = (at + len, tail);
        }
        Ok(())
    }

    /// Records that `len` bytes at `offset` of disk `disk` read as zeros.
    pub fn write_zero(&mut self, disk: u32, offset: u64, len: u64) -> Result<(), LogEncodeError> {
        self.usable()?;
        check_range(&self.header.disks, disk, offset, len)?;
        if self.entries.len() == MAX_FRAME_EXTENTS {
            self.flush_frame()?;
        }
        self.entries.push(Entry {
            kind: EntryKind::Zero,
            disk,
            offset,
            len,
        });
        Ok(())
    }

    /// Writes the last frame and the trailer, flushes, and hands back the output and what the
    /// log holds.
    pub fn finish(mut self) -> Result<(W, LogSummary), LogEncodeError> {
        self.usable()?;
        self.flush_frame()?;
        let trailer = Trailer {
            counts: self.counts,
            hashed_bytes: self.sink.bytes(),
            hash: self.sink.hash(),
        };
        record::begin(&mut self.record);
        trailer.encode(&mut self.record);
        self.sink.finish(RecordKind::Trailer, &mut self.record)?;
        let bytes = self.sink.bytes();
        let version = self.sink.version();
        let out = self.sink.into_inner()?;
        let summary = LogSummary {
            header: self.header,
            counts: self.counts,
            bytes,
            hash: trailer.hash,
            version,
        };
        Ok((out, summary))
    }

    fn usable(&self) -> Result<(), LogEncodeError> {
        if self.failed {
            return Err(LogEncodeError::WriterFailed);
        }
        Ok(())
    }

    /// Writes the pending extents as one frame; a failure leaves the writer unusable.
    fn flush_frame(&mut self) -> Result<(), LogEncodeError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let raw = std::mem::take(&mut self.raw);
        let result = self.emit_frame(&raw);
        self.raw = raw;
        self.raw.clear();
        result
    }

    /// Writes the pending extents as one frame whose raw data is `raw` (stored, or compressed
    /// into `packed`), the data written from where it is.
    fn emit_frame(&mut self, raw: &[u8]) -> Result<(), LogEncodeError> {
        let compressed = self.compress(raw);
        let (encoding, data) = if compressed {
            (Encoding::Zstd, self.packed.as_slice())
        } else {
            (Encoding::Stored, raw)
        };
        record::begin(&mut self.record);
        frame::encode_table(
            &mut self.record,
            encoding,
            &self.entries,
            raw.len(),
            data.len(),
        );
        let written = self.sink.finish_frame(&mut self.record, data, &self.digest);
        self.digest.clear();
        if let Err(e) = written {
            self.failed = true;
            return Err(e);
        }
        self.counts.frames += 1;
        for entry in &self.entries {
            self.counts.add(entry.kind, entry.len);
        }
        self.entries.clear();
        Ok(())
    }

    /// Appends the digest of an entry's `data` at disk offset `at` (format version 2), taking the
    /// hashes `given` has for whole pieces of the caller's extent and hashing the others.
    fn add_digest(&mut self, given: &Given<'_>, at: u64, data: &[u8]) {
        if self.sink.version() < 2 {
            return;
        }
        let digest = &mut self.digest;
        digest_pieces(at, data, |start, piece| {
            match given.hash(start, piece.len()) {
                Some(hash) => digest.extend_from_slice(hash),
                None => digest.extend_from_slice(blake3::hash(piece).as_bytes()),
            }
        });
    }

    /// Compresses the raw data into `packed`; true when that made it smaller. Any zstd failure,
    /// "output larger than the input" among them, means the data is stored as is. Data that did
    /// not shrink makes the next [`INCOMPRESSIBLE_SKIP`] frames skip the attempt.
    fn compress(&mut self, raw: &[u8]) -> bool {
        let Some(compressor) = &mut self.compressor else {
            return false;
        };
        if raw.is_empty() {
            return false;
        }
        if self.skip_compression > 0 {
            self.skip_compression -= 1;
            return false;
        }
        self.packed.clear();
        self.packed.reserve(raw.len());
        // Worth it only when it saves at least 1/32 of the frame.
        let worth = raw.len() - raw.len() / 32;
        let shrank =
            matches!(compressor.compress_to_buffer(raw, &mut self.packed), Ok(n) if n < worth);
        if !shrank {
            self.skip_compression = INCOMPRESSIBLE_SKIP;
        }
        shrank
    }
}

/// The piece hashes a caller of [`LogWriter::write_data_hashed`] gave for its extent
/// `[offset, end)`: usable only if there is one per piece.
struct Given<'a> {
    offset: u64,
    end: u64,
    hashes: &'a [[u8; 32]],
}

impl<'a> Given<'a> {
    fn new(offset: u64, len: u64, hashes: &'a [[u8; 32]]) -> Self {
        let end = offset.saturating_add(len);
        let pieces = if len == 0 {
            0
        } else {
            (end - 1) / DIGEST_PIECE - offset / DIGEST_PIECE + 1
        };
        let hashes = if hashes.len() as u64 == pieces {
            hashes
        } else {
            &[]
        };
        Given {
            offset,
            end,
            hashes,
        }
    }

    /// The given hash of the piece `[start, start + len)`, if it is one of the extent's pieces
    /// whole (an entry split across frames cuts a piece in two, each hashed on its own).
    fn hash(&self, start: u64, len: usize) -> Option<&'a [u8; 32]> {
        let end = start + len as u64;
        let starts = start == self.offset || start.is_multiple_of(DIGEST_PIECE);
        let ends = end == self.end || end.is_multiple_of(DIGEST_PIECE);
        if !(starts && ends) {
            return None;
        }
        let index = start / DIGEST_PIECE - self.offset / DIGEST_PIECE;
        self.hashes.get(usize::try_from(index).ok()?)
    }
}
