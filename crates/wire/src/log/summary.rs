//! What a complete log adds up to: the counts the trailer records, the trailer's codec, and the
//! summary the writer returns and the reader accepts.

use super::bytes::{Cursor, PutLe};
use super::error::LogDecodeError;
use super::frame::EntryKind;
use super::header::LogHeader;
use super::limits::TRAILER_BODY_LEN;

/// The counts a trailer records and a reader recounts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogCounts {
    /// Frame records.
    pub frames: u64,
    /// Data extent entries.
    pub data_extents: u64,
    /// Zero extent entries.
    pub zero_extents: u64,
    /// Bytes of the data extents, before compression.
    pub data_bytes: u64,
    /// Bytes of the zero extents.
    pub zero_bytes: u64,
}

impl LogCounts {
    pub(crate) fn add(&mut self, kind: EntryKind, len: u64) {
        match kind {
            EntryKind::Data => {
                self.data_extents += 1;
                self.data_bytes = self.data_bytes.saturating_add(len);
            }
            EntryKind::Zero => {
                self.zero_extents += 1;
                self.zero_bytes = self.zero_bytes.saturating_add(len);
            }
        }
    }

    /// Appends the five counts, in field order, little-endian.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.frames,
            self.data_extents,
            self.zero_extents,
            self.data_bytes,
            self.zero_bytes,
        ] {
            out.put_u64(v);
        }
    }

    /// Reads what [`LogCounts::encode`] wrote.
    pub(crate) fn decode(c: &mut Cursor<'_>) -> Option<LogCounts> {
        Some(LogCounts {
            frames: c.u64()?,
            data_extents: c.u64()?,
            zero_extents: c.u64()?,
            data_bytes: c.u64()?,
            zero_bytes: c.u64()?,
        })
    }

    pub(crate) fn merge(&mut self, other: &LogCounts) {
        self.frames += other.frames;
        self.data_extents += other.data_extents;
        self.zero_extents += other.zero_extents;
        self.data_bytes = self.data_bytes.saturating_add(other.data_bytes);
        self.zero_bytes = self.zero_bytes.saturating_add(other.zero_bytes);
    }
}

/// A whole log, as written or as verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSummary {
    /// The header.
    pub header: LogHeader,
    /// The counts, as recorded in the trailer.
    pub counts: LogCounts,
    /// The length of the whole log in bytes, trailer included.
    pub bytes: u64,
    /// The trailer's BLAKE3 hash: of the log before the trailer record (format version 2: each
    /// frame's data digest in place of its data).
    pub hash: [u8; 32],
    /// The log's format version (its preamble's).
    pub version: u16,
}

/// The trailer record body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Trailer {
    pub(crate) counts: LogCounts,
    pub(crate) hashed_bytes: u64,
    pub(crate) hash: [u8; 32],
}

impl Trailer {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        self.counts.encode(out);
        out.put_u64(self.hashed_bytes);
        out.extend_from_slice(&self.hash);
    }

    /// Decodes a body whose length the framing already checked.
    pub(crate) fn decode(body: &[u8]) -> Option<Self> {
        let mut c = Cursor::new(body);
        let counts = LogCounts::decode(&mut c)?;
        Some(Trailer {
            counts,
            hashed_bytes: c.u64()?,
            hash: c.array()?,
        })
    }

    /// Checks a trailer body against what the reader counted and hashed itself.
    pub(crate) fn check(body: &[u8], read: &Trailer, offset: u64) -> Result<(), LogDecodeError> {
        let Some(t) = Trailer::decode(body).filter(|_| body.len() == TRAILER_BODY_LEN) else {
            return Err(LogDecodeError::BadTrailer { offset });
        };
        let (a, b) = (&t.counts, &read.counts);
        let pairs = [
            ("frames", a.frames, b.frames),
            ("data extents", a.data_extents, b.data_extents),
            ("zero extents", a.zero_extents, b.zero_extents),
            ("data bytes", a.data_bytes, b.data_bytes),
            ("zero bytes", a.zero_bytes, b.zero_bytes),
            (
                "bytes before the trailer",
                t.hashed_bytes,
                read.hashed_bytes,
            ),
        ];
        for (what, trailer, counted) in pairs {
            if trailer != counted {
                return Err(LogDecodeError::TrailerMismatch {
                    what,
                    trailer,
                    counted,
                });
            }
        }
        if t.hash != read.hash {
            return Err(LogDecodeError::HashMismatch);
        }
        Ok(())
    }
}
