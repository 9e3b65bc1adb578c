//! Record framing: the preamble, then records of `kind u8 | length u32 | body | checksum u64`.
//! Reading is two-phase: the head first, its length checked against the kind's limit, and only
//! then the body. Both ends keep the running BLAKE3 hash of the stream before the trailer: of every
//! byte in format version 1; in version 2, of every byte but a frame's data, whose place the frame's
//! data digest takes ([`digest_pieces`]).

use std::io::{self, Read, Write};

use std::hash::Hasher;

use twox_hash::XxHash3_64;

use super::data::FrameData;
use super::error::{LogDecodeError, LogEncodeError};
use super::limits::{
    DIGEST_PIECE, EXTENT_ENTRY_LEN, FORMAT_VERSION, FORMAT_VERSIONS, FRAME_FIXED_LEN, MAGIC,
    MAX_FRAME_BODY, MAX_HEADER_BODY, PREAMBLE_LEN, RECORD_CHECKSUM_LEN, RECORD_HEAD_LEN,
    TRAILER_BODY_LEN,
};
use super::resumable::ResumableHasher;

/// Record kinds. On the wire: 1, 2, 3; 0 is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordKind {
    Header = 1,
    Frame = 2,
    Trailer = 3,
}

impl RecordKind {
    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(RecordKind::Header),
            2 => Some(RecordKind::Frame),
            3 => Some(RecordKind::Trailer),
            _ => None,
        }
    }

    /// Longest body a record of this kind may have.
    fn limit(self) -> usize {
        match self {
            RecordKind::Header => MAX_HEADER_BODY,
            RecordKind::Frame => MAX_FRAME_BODY,
            RecordKind::Trailer => TRAILER_BODY_LEN,
        }
    }
}

fn checksum(head: &[u8], body: &[u8]) -> [u8; RECORD_CHECKSUM_LEN] {
    checksum_parts(head, body, &[])
}

/// The body of the trailer record that ends `log` (its last bytes, at least that record), when they
/// are a whole trailer record whose checksum verifies; nothing before it is looked at.
pub(crate) fn trailing_trailer(log: &[u8]) -> Option<&[u8]> {
    let n = RECORD_HEAD_LEN + TRAILER_BODY_LEN + RECORD_CHECKSUM_LEN;
    let record = log.get(log.len().checked_sub(n)?..)?;
    let (head, rest) = record.split_at(RECORD_HEAD_LEN);
    let (body, sum) = rest.split_at(TRAILER_BODY_LEN);
    let length = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    (head[0] == RecordKind::Trailer as u8
        && length as usize == TRAILER_BODY_LEN
        && checksum(head, body) == sum)
        .then_some(body)
}

/// The checksum of a record whose body is `body` followed by `tail`.
fn checksum_parts(head: &[u8], body: &[u8], tail: &[u8]) -> [u8; RECORD_CHECKSUM_LEN] {
    // XXH3-64, seed 0 (twox-hash picks AVX2 or SSE2 at run time).
    let mut h = XxHash3_64::new();
    h.write(head);
    h.write(body);
    h.write(tail);
    h.finish().to_le_bytes()
}

/// Clears `buf` and reserves room for a record head; append the body after it, then hand it to
/// [`Sink::finish`] (or, a frame's table, to [`Sink::finish_frame`] with its data beside it).
pub(crate) fn begin(buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&[0; RECORD_HEAD_LEN]);
}

/// Calls `piece` with every piece of the data of an extent at disk `offset` whose bytes are `data`:
/// split where the disk offset is a multiple of [`DIGEST_PIECE`]. A version-2 data digest is the
/// BLAKE3 hash of each piece of each Data extent, in table order.
pub(crate) fn digest_pieces(offset: u64, data: &[u8], mut piece: impl FnMut(u64, &[u8])) {
    let (mut at, mut rest) = (offset, data);
    while !rest.is_empty() {
        let room = DIGEST_PIECE - at % DIGEST_PIECE;
        let n = usize::try_from(room).map_or(rest.len(), |r| r.min(rest.len()));
        let (this, tail) = rest.split_at(n);
        piece(at, this);
        (at, rest) = (at + n as u64, tail);
    }
}

/// The writing end: counts and hashes what it writes.
pub(crate) struct Sink<W> {
    out: W,
    hasher: blake3::Hasher,
    bytes: u64,
    version: u16,
}

impl<W: Write> Sink<W> {
    /// Writes the preamble of format `version` (one of [`FORMAT_VERSIONS`]).
    pub(crate) fn new(out: W, version: u16) -> Result<Self, LogEncodeError> {
        if !FORMAT_VERSIONS.contains(&version) {
            return Err(LogEncodeError::UnsupportedVersion(version));
        }
        let mut sink = Sink {
            out,
            hasher: blake3::Hasher::new(),
            bytes: 0,
            version,
        };
        let mut preamble = MAGIC.to_vec();
        preamble.extend_from_slice(&version.to_le_bytes());
        sink.put(&preamble)?;
        Ok(sink)
    }

    /// Fills in the head of the record in `buf` (begun with `begin`), appends its checksum and
    /// writes it. Every record but the trailer is hashed.
    pub(crate) fn finish(
        &mut self,
        kind: RecordKind,
        buf: &mut Vec<u8>,
    ) -> Result<(), LogEncodeError> {
        let body_len = buf.len() - RECORD_HEAD_LEN;
        debug_assert!(
            body_len <= kind.limit(),
            "the writer respects the record limits"
        );
        buf[0] = kind as u8;
        buf[1..RECORD_HEAD_LEN].copy_from_slice(&(body_len as u32).to_le_bytes());
        let sum = checksum(&buf[..RECORD_HEAD_LEN], &buf[RECORD_HEAD_LEN..]);
        buf.extend_from_slice(&sum);
        if kind == RecordKind::Trailer {
            self.write_unhashed(buf)
        } else {
            self.put(buf)
        }
    }

    /// The format version being written.
    pub(crate) fn version(&self) -> u16 {
        self.version
    }

    /// Like [`Sink::finish`], for a frame whose body is the rest of `buf` (its fixed fields and
    /// table) followed by `tail` (its data, written from where it is instead of copied behind the
    /// table first). In format version 2 the stream's hash takes `digest` (the frame's data
    /// digest) where the data stands.
    pub(crate) fn finish_frame(
        &mut self,
        buf: &mut [u8],
        tail: &[u8],
        digest: &[u8],
    ) -> Result<(), LogEncodeError> {
        let kind = RecordKind::Frame;
        let body_len = buf.len() - RECORD_HEAD_LEN + tail.len();
        debug_assert!(
            body_len <= kind.limit(),
            "the writer respects the record limits"
        );
        buf[0] = kind as u8;
        buf[1..RECORD_HEAD_LEN].copy_from_slice(&(body_len as u32).to_le_bytes());
        let sum = checksum_parts(&buf[..RECORD_HEAD_LEN], &buf[RECORD_HEAD_LEN..], tail);
        self.put(buf)?;
        if self.version >= 2 {
            self.write_unhashed(tail)?;
            self.hasher.update(digest);
        } else {
            self.put(tail)?;
        }
        self.put(&sum)
    }

    fn write_unhashed(&mut self, bytes: &[u8]) -> Result<(), LogEncodeError> {
        self.out.write_all(bytes).map_err(LogEncodeError::Io)?;
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), LogEncodeError> {
        self.out.write_all(bytes).map_err(LogEncodeError::Io)?;
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The hash of everything hashed so far.
    pub(crate) fn hash(&self) -> [u8; 32] {
        *self.hasher.finalize().as_bytes()
    }

    /// Flushes and hands back the output.
    pub(crate) fn into_inner(mut self) -> Result<W, LogEncodeError> {
        self.out.flush().map_err(LogEncodeError::Io)?;
        Ok(self.out)
    }
}

/// The reading end: counts and hashes what it reads.
/// The running hash of a stream: BLAKE3's own hasher, or one whose state can be saved when a
/// reader must be able to continue after a restart ([`super::resumable`]).
// One per reader or writer: its size does not matter, and boxing would add a hop per update.
#[allow(clippy::large_enum_variant)]
pub(crate) enum StreamHash {
    Plain(blake3::Hasher),
    Resumable(ResumableHasher),
}

impl StreamHash {
    fn update(&mut self, bytes: &[u8]) {
        match self {
            StreamHash::Plain(h) => {
                h.update(bytes);
            }
            StreamHash::Resumable(h) => h.update(bytes),
        }
    }

    fn finalize(&self) -> [u8; 32] {
        match self {
            StreamHash::Plain(h) => *h.finalize().as_bytes(),
            StreamHash::Resumable(h) => h.finalize(),
        }
    }
}

pub(crate) struct Source<R> {
    input: R,
    hasher: StreamHash,
    offset: u64,
    /// The stream's hash, verified when the log arrived: not computed again.
    known: Option<[u8; 32]>,
    /// The format version its preamble names.
    version: u16,
    /// In version 2, the head and checksum of the frame just read, hashed with its digest by
    /// [`Source::hash_frame`] once the frame is loaded.
    deferred: Option<([u8; RECORD_HEAD_LEN], [u8; RECORD_CHECKSUM_LEN])>,
}

/// Where a record started and what kind it is; its body is in the caller's buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordAt {
    pub(crate) kind: RecordKind,
    pub(crate) offset: u64,
}

impl<R: Read> Source<R> {
    /// Reads and checks the preamble.
    pub(crate) fn new(input: R) -> Result<Self, LogDecodeError> {
        Self::with_hash(input, StreamHash::Plain(blake3::Hasher::new()))
    }

    /// [`Source::new`] with the given (fresh) hasher.
    pub(crate) fn with_hash(input: R, hasher: StreamHash) -> Result<Self, LogDecodeError> {
        let mut src = Source {
            input,
            hasher,
            offset: 0,
            known: None,
            version: 0,
            deferred: None,
        };
        let mut preamble = [0; PREAMBLE_LEN];
        src.fill(&mut preamble, 0)?;
        if preamble[..8] != MAGIC {
            return Err(LogDecodeError::BadMagic);
        }
        let found = u16::from_le_bytes([preamble[8], preamble[9]]);
        if !FORMAT_VERSIONS.contains(&found) {
            return Err(LogDecodeError::UnsupportedVersion {
                found,
                supported: FORMAT_VERSION,
            });
        }
        src.version = found;
        src.hasher.update(&preamble);
        src.offset = PREAMBLE_LEN as u64;
        Ok(src)
    }

    /// Reads the next record into `body` (replacing its contents) and checks its checksum.
    pub(crate) fn next(&mut self, body: &mut Vec<u8>) -> Result<RecordAt, LogDecodeError> {
        self.read_record(body, None)
    }

    /// [`Source::next`], a frame's data going into `data` (aligned) and only its fixed fields and
    /// table into `body`. A frame whose declared table does not fit in its record is read into
    /// `body` whole (`data` left empty): its checksum is checked the same way, and its layout fails
    /// on its lengths.
    pub(crate) fn next_split(
        &mut self,
        body: &mut Vec<u8>,
        data: &mut FrameData,
    ) -> Result<RecordAt, LogDecodeError> {
        self.read_record(body, Some(data))
    }

    fn read_record(
        &mut self,
        body: &mut Vec<u8>,
        data: Option<&mut FrameData>,
    ) -> Result<RecordAt, LogDecodeError> {
        let offset = self.offset;
        let mut head = [0; RECORD_HEAD_LEN];
        self.fill(&mut head, offset)?;
        let kind = RecordKind::from_code(head[0]).ok_or(LogDecodeError::UnknownRecord {
            kind: head[0],
            offset,
        })?;
        let length = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        let len = usize::try_from(length).unwrap_or(usize::MAX);
        if len > kind.limit() {
            return Err(LogDecodeError::RecordTooLong {
                kind: head[0],
                length,
                limit: kind.limit(),
                offset,
            });
        }
        let data: &[u8] = match data {
            Some(data) if kind == RecordKind::Frame => {
                self.frame_body(body, data, len, offset)?;
                data.bytes()
            }
            other => {
                if let Some(data) = other {
                    data.fill(0);
                }
                self.body(body, len, offset)?;
                &[]
            }
        };
        let mut sum = [0; RECORD_CHECKSUM_LEN];
        self.fill(&mut sum, offset)?;
        if sum != checksum_parts(&head, body, data) {
            return Err(LogDecodeError::ChecksumMismatch { offset });
        }
        self.deferred = None;
        if kind == RecordKind::Frame && self.version >= 2 {
            self.deferred = Some((head, sum));
        } else if kind != RecordKind::Trailer && self.known.is_none() {
            self.hasher.update(&head);
            self.hasher.update(body);
            self.hasher.update(data);
            self.hasher.update(&sum);
        }
        self.offset += (RECORD_HEAD_LEN + len + RECORD_CHECKSUM_LEN) as u64;
        Ok(RecordAt { kind, offset })
    }

    /// Succeeds only if the input has ended.
    pub(crate) fn expect_end(&mut self) -> Result<(), LogDecodeError> {
        let mut byte = [0; 1];
        loop {
            return match self.input.read(&mut byte) {
                Ok(0) => Ok(()),
                Ok(_) => Err(LogDecodeError::TrailingData {
                    offset: self.offset,
                }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(LogDecodeError::Io(e)),
            };
        }
    }

    /// Bytes consumed by complete records so far (the preamble included).
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// The format version of the stream.
    pub(crate) fn version(&self) -> u16 {
        self.version
    }

    /// Hashes the version-2 frame [`Source::next`] just read, once it is loaded: its head, `table`
    /// (its body before the data), the data digest that `digest` feeds, and its checksum. Does
    /// nothing in version 1 (the frame was hashed as read) or when the hash is known.
    pub(crate) fn hash_frame(&mut self, table: &[u8], digest: impl FnOnce(&mut dyn FnMut(&[u8]))) {
        let Some((head, sum)) = self.deferred.take() else {
            return;
        };
        if self.known.is_some() {
            return;
        }
        self.hasher.update(&head);
        self.hasher.update(table);
        digest(&mut |bytes| self.hasher.update(bytes));
        self.hasher.update(&sum);
    }

    /// Stops hashing: `hash` is the stream's hash, verified when the log arrived.
    pub(crate) fn trust(&mut self, hash: [u8; 32]) {
        self.known = Some(hash);
    }

    /// The hash of every byte before the current position, trailer excluded (the trusted one
    /// after [`Source::trust`]).
    pub(crate) fn hash(&self) -> [u8; 32] {
        self.known.unwrap_or_else(|| self.hasher.finalize())
    }

    /// The saved state of a resumable hash; `None` for a plain one.
    pub(crate) fn hash_state(&self) -> Option<Vec<u8>> {
        match &self.hasher {
            StreamHash::Resumable(h) if self.known.is_none() => Some(h.to_bytes()),
            _ => None,
        }
    }

    /// A source that continues a stream of format `version` at `offset` (a record boundary), its
    /// bytes before it hashed into `hasher`.
    pub(crate) fn resume(input: R, offset: u64, hasher: ResumableHasher, version: u16) -> Self {
        Source {
            input,
            hasher: StreamHash::Resumable(hasher),
            offset,
            known: None,
            version,
            deferred: None,
        }
    }

    /// Reads exactly `buf.len()` bytes; running out is `Truncated` at `record`.
    fn fill(&mut self, buf: &mut [u8], record: u64) -> Result<(), LogDecodeError> {
        self.input.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => LogDecodeError::Truncated { offset: record },
            _ => LogDecodeError::Io(e),
        })
    }

    /// Reads a frame body of `len` bytes: the fixed fields and the table into `body`, the data
    /// into `data`, when the table the fixed fields declare fits in `len`; else all into `body`.
    fn frame_body(
        &mut self,
        body: &mut Vec<u8>,
        data: &mut FrameData,
        len: usize,
        record: u64,
    ) -> Result<(), LogDecodeError> {
        data.fill(0);
        if len < FRAME_FIXED_LEN {
            return self.body(body, len, record);
        }
        self.body(body, FRAME_FIXED_LEN, record)?;
        let count = u32::from_le_bytes([body[1], body[2], body[3], body[4]]);
        let table_end = (count as usize)
            .checked_mul(EXTENT_ENTRY_LEN)
            .and_then(|t| t.checked_add(FRAME_FIXED_LEN))
            .filter(|&end| end <= len)
            .unwrap_or(len);
        body.resize(table_end, 0);
        self.fill(&mut body[FRAME_FIXED_LEN..], record)?;
        self.fill(data.fill(len - table_end), record)
    }

    /// Reads a body of `len` bytes, already checked against its limit, so the buffer never holds
    /// more than the largest record body.
    fn body(&mut self, body: &mut Vec<u8>, len: usize, record: u64) -> Result<(), LogDecodeError> {
        // The buffer keeps its bytes between records: only growth is zeroed, not every record
        // (reading into a cleared Vec zeroed all of it each time: 4 MiB per frame).
        if body.len() > len {
            body.truncate(len);
        } else {
            body.resize(len, 0);
        }
        self.fill(body, record)
    }
}
