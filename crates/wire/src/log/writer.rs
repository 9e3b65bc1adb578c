//! The streaming writer: extents go in one at a time, frames of at most 4 MiB of data come out,
//! and `finish` closes the log with the trailer. Memory stays within one frame (its table, its raw
//! data, its compression and the record being written) whatever the size of the log.

use std::io::Write;

use super::error::LogEncodeError;
use super::extent::check_range;
use super::frame::{self, Encoding, Entry, EntryKind};
use super::header::LogHeader;
use super::limits::{MAX_FRAME_EXTENTS, MAX_FRAME_RAW};
use super::record::{self, RecordKind, Sink};
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
}

/// After a frame that zstd could not shrink, this many frames are stored without trying: data that
/// does not compress (encrypted, already compressed, random) usually comes in long runs, and
/// trying costs more than the copy. Then compression is tried again.
const INCOMPRESSIBLE_SKIP: u32 = 8;

impl<W: Write> LogWriter<W> {
    /// Validates the header and writes the preamble and the header record.
    pub fn new(
        out: W,
        header: LogHeader,
        compression: Compression,
    ) -> Result<Self, LogEncodeError> {
        header.validate()?;
        let compressor = match compression {
            Compression::Off => None,
            Compression::Zstd { level } => {
                Some(zstd::bulk::Compressor::new(level).map_err(LogEncodeError::Compress)?)
            }
        };
        let mut writer = LogWriter {
            sink: Sink::new(out)?,
            header,
            compressor,
            entries: Vec::new(),
            raw: Vec::new(),
            packed: Vec::new(),
            record: Vec::new(),
            counts: LogCounts::default(),
            failed: false,
            skip_compression: 0,
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
        self.usable()?;
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
        let out = self.sink.into_inner()?;
        let summary = LogSummary {
            header: self.header,
            counts: self.counts,
            bytes,
            hash: trailer.hash,
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
        if let Err(e) = self
            .sink
            .finish_with(RecordKind::Frame, &mut self.record, data)
        {
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
