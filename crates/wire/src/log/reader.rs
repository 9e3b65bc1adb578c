//! The streaming reader and `verify`. The reader yields a frame's extents once that frame checked
//! out, and reports the log complete only after the trailer matched what it counted and hashed;
//! the apply side therefore verifies a log in one pass first and then reads it again to apply it.

use std::io::Read;

use uuid::Uuid;

use super::bytes::{Cursor, PutLe};
use super::data::FrameData;
use super::error::LogDecodeError;
use super::extent::Extent;
use super::frame::{LoadedFrame, OwnedFrame};
use super::header::LogHeader;
use super::record::{RecordKind, Source, StreamHash};
use super::summary::{LogCounts, LogSummary, Trailer};

/// Which log the replica is waiting for. Anything else is rejected before any extent is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// The replica VM's id.
    pub vm: Uuid,
    /// The relationship index (0 primary, 1 extended).
    pub relationship: u8,
    /// The next sequence number in the chain.
    pub sequence: u64,
    /// The sequence of the last point the replica holds, which the log must build on; 0 when the
    /// replica holds none, which only a full image does.
    pub parent: u64,
}

impl Expect {
    /// Checks a header against the expectation, in the order VM, relationship, sequence, parent.
    pub fn check(&self, header: &LogHeader) -> Result<(), LogDecodeError> {
        if header.vm != self.vm {
            return Err(LogDecodeError::WrongVm {
                expected: self.vm,
                found: header.vm,
            });
        }
        if header.relationship != self.relationship {
            return Err(LogDecodeError::WrongRelationship {
                expected: self.relationship,
                found: header.relationship,
            });
        }
        if header.sequence != self.sequence {
            return Err(LogDecodeError::OutOfOrder {
                expected: self.sequence,
                found: header.sequence,
            });
        }
        if header.parent != self.parent {
            return Err(LogDecodeError::ParentMismatch {
                expected: self.parent,
                found: header.parent,
            });
        }
        Ok(())
    }
}

/// A reader's place in a stream between two records ([`LogReader::checkpoint`]): the format
/// version, the offset, the header, the counts so far and the state of the stream's hash. Its
/// bytes ([`ReaderCheckpoint::to_bytes`]) carry their own checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderCheckpoint {
    version: u16,
    offset: u64,
    counts: LogCounts,
    header: Vec<u8>,
    hash: Vec<u8>,
}

/// The checkpoint of a version-1 stream: no version field (the layout builds before format
/// version 2 write and read).
const CHECKPOINT_MAGIC_V1: &[u8; 8] = b"VRLOGCP1";
/// The checkpoint of a later version's stream, its version after the magic.
const CHECKPOINT_MAGIC: &[u8; 8] = b"VRLOGCP2";

impl ReaderCheckpoint {
    /// The stream's offset: the next byte the reader needs.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The format version of the stream.
    pub fn version(&self) -> u16 {
        self.version
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // A version-1 stream's checkpoint keeps the layout an older build reads.
        let mut out = if self.version == 1 {
            CHECKPOINT_MAGIC_V1.to_vec()
        } else {
            let mut out = CHECKPOINT_MAGIC.to_vec();
            out.put_u16(self.version);
            out
        };
        out.put_u64(self.offset);
        self.counts.encode(&mut out);
        out.put_u32(self.header.len() as u32);
        out.extend_from_slice(&self.header);
        out.put_u32(self.hash.len() as u32);
        out.extend_from_slice(&self.hash);
        let sum = xxh3(&out);
        out.put_u64(sum);
        out
    }

    /// Bytes [`ReaderCheckpoint::to_bytes`] wrote; `None` if they are not whole (the checksum) or
    /// not one.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(8)?)?;
        if xxh3(body) != u64::from_le_bytes(sum.try_into().ok()?) {
            return None;
        }
        let mut c = Cursor::new(body);
        let version = match c.take(CHECKPOINT_MAGIC.len())? {
            magic if magic == CHECKPOINT_MAGIC_V1 => 1,
            magic if magic == CHECKPOINT_MAGIC => c.u16()?,
            _ => return None,
        };
        if !super::limits::FORMAT_VERSIONS.contains(&version) {
            return None;
        }
        let offset = c.u64()?;
        let counts = LogCounts::decode(&mut c)?;
        let len = c.u32()? as usize;
        let header = c.take(len)?.to_vec();
        let len = c.u32()? as usize;
        let hash = c.take(len)?.to_vec();
        if !c.is_empty() {
            return None;
        }
        Some(ReaderCheckpoint {
            version,
            offset,
            counts,
            header,
            hash,
        })
    }
}

fn xxh3(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = twox_hash::XxHash3_64::new();
    h.write(bytes);
    h.finish()
}

enum State {
    Frames,
    Done(LogSummary),
    Failed,
}

/// Reads one replication log from any `Read`, one extent at a time.
pub struct LogReader<R: Read> {
    src: Source<R>,
    header: LogHeader,
    frame: LoadedFrame,
    counts: LogCounts,
    state: State,
}

impl<R: Read> LogReader<R> {
    /// Reads the preamble and the header and checks the header against `expect`.
    pub fn open(input: R, expect: &Expect) -> Result<Self, LogDecodeError> {
        let reader = Self::open_unchecked(input)?;
        expect.check(&reader.header)?;
        Ok(reader)
    }

    /// [`LogReader::open`] for a log whose whole-stream hash `hash` was verified when it arrived
    /// (the replica checks an upload before it commits it) and that is read again to be applied:
    /// every record is still checked (XXH3), and the trailer against the counts, the length and
    /// `hash`, but the BLAKE3 pass over every byte is not repeated.
    pub fn open_verified(
        input: R,
        expect: &Expect,
        hash: [u8; 32],
    ) -> Result<Self, LogDecodeError> {
        let mut reader = Self::open(input, expect)?;
        reader.src.trust(hash);
        Ok(reader)
    }

    /// [`LogReader::open`] with a hash whose state a [`LogReader::checkpoint`] can save, for a
    /// stream that must be continued after a restart ([`LogReader::resume`]).
    pub fn open_resumable(input: R, expect: &Expect) -> Result<Self, LogDecodeError> {
        let reader = Self::open_with(
            input,
            StreamHash::Resumable(super::resumable::ResumableHasher::new()),
        )?;
        expect.check(&reader.header)?;
        Ok(reader)
    }

    /// Continues a stream a [`LogReader::checkpoint`] saved: `input` starts at the checkpoint's
    /// offset. The header saved in it is checked against `expect` again.
    pub fn resume(
        input: R,
        checkpoint: &ReaderCheckpoint,
        expect: &Expect,
    ) -> Result<Self, LogDecodeError> {
        let header = LogHeader::decode(&checkpoint.header)?;
        expect.check(&header)?;
        // Version 1 hashes every byte before the offset; version 2 a frame's digest instead of
        // its data, so its hashed length says nothing about the offset.
        let hasher = super::resumable::ResumableHasher::from_bytes(&checkpoint.hash)
            .filter(|h| checkpoint.version >= 2 || h.len() == checkpoint.offset)
            .ok_or(LogDecodeError::ReaderFailed)?;
        Ok(LogReader {
            src: Source::resume(input, checkpoint.offset, hasher, checkpoint.version),
            header,
            frame: LoadedFrame::new(),
            counts: checkpoint.counts,
            state: State::Frames,
        })
    }

    /// Where the stream stands between two records, once every extent read so far was handed out:
    /// enough to continue it with [`LogReader::resume`]. `None` in the middle of a frame, after the
    /// end or an error, or for a reader not opened with [`LogReader::open_resumable`].
    pub fn checkpoint(&self) -> Option<ReaderCheckpoint> {
        if !matches!(self.state, State::Frames) || self.frame.has_next() {
            return None;
        }
        let hash = self.src.hash_state()?;
        let mut header = Vec::new();
        self.header.encode(&mut header);
        Some(ReaderCheckpoint {
            version: self.src.version(),
            offset: self.src.offset(),
            counts: self.counts,
            header,
            hash,
        })
    }

    /// Reads the preamble and the header without expecting a particular VM or sequence, for tools
    /// that inspect logs. The format is checked as strictly as by [`LogReader::open`].
    pub fn open_unchecked(input: R) -> Result<Self, LogDecodeError> {
        Self::open_with(input, StreamHash::Plain(blake3::Hasher::new()))
    }

    fn open_with(input: R, hasher: StreamHash) -> Result<Self, LogDecodeError> {
        let mut src = Source::with_hash(input, hasher)?;
        let mut frame = LoadedFrame::new();
        let at = src.next(frame.buffer())?;
        if at.kind != RecordKind::Header {
            return Err(LogDecodeError::UnexpectedRecord {
                kind: at.kind as u8,
                offset: at.offset,
            });
        }
        let header = LogHeader::decode(frame.body())?;
        Ok(LogReader {
            src,
            header,
            frame,
            counts: LogCounts::default(),
            state: State::Frames,
        })
    }

    /// Bytes read so far in whole records (the preamble included).
    pub fn offset(&self) -> u64 {
        self.src.offset()
    }

    /// The log's header.
    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// The next extent, or `None` once the trailer was read and matched: only then is the log
    /// valid. Extents come in log order; apply them in that order. After an error the reader only
    /// returns [`LogDecodeError::ReaderFailed`].
    pub fn next_extent(&mut self) -> Result<Option<Extent<'_>>, LogDecodeError> {
        Ok(match self.ready_for_extent()? {
            true => self.frame.next_extent(),
            false => None,
        })
    }

    /// The extents of the current frame not handed out yet (of the next frame, when every one was),
    /// with the buffer that holds their data, taken from the reader: `spare` takes its place (a
    /// buffer handed back after its data was used, or [`FrameData::default`]). Data, when the frame
    /// has any, starts at an address aligned to [`super::data::DATA_ALIGN`], and a Data extent's
    /// range starts where the Data extents before it in the frame end. `None` once the trailer was
    /// read and matched, as for [`LogReader::next_extent`], which can be called in turn with this.
    pub fn next_frame(&mut self, spare: FrameData) -> Result<Option<OwnedFrame>, LogDecodeError> {
        Ok(match self.ready_for_extent()? {
            true => self.frame.take(spare),
            false => None,
        })
    }

    /// Reads records until the loaded frame has an extent to hand out (true), or the trailer
    /// matched (false). After an error the reader only returns [`LogDecodeError::ReaderFailed`].
    fn ready_for_extent(&mut self) -> Result<bool, LogDecodeError> {
        loop {
            match self.state {
                State::Failed => return Err(LogDecodeError::ReaderFailed),
                State::Done(_) => return Ok(false),
                State::Frames => {}
            }
            if self.frame.has_next() {
                return Ok(true);
            }
            if let Err(e) = self.advance() {
                self.state = State::Failed;
                return Err(e);
            }
        }
    }

    /// What the log holds, once `next_extent` returned `None`.
    pub fn summary(&self) -> Option<&LogSummary> {
        match &self.state {
            State::Done(summary) => Some(summary),
            _ => None,
        }
    }

    /// Reads the next record: loads a frame, or checks the trailer and the end of the input.
    fn advance(&mut self) -> Result<(), LogDecodeError> {
        let (body, data) = self.frame.buffers();
        let at = self.src.next_split(body, data)?;
        match at.kind {
            RecordKind::Frame => {
                self.frame
                    .load(at.offset, &self.header.disks, &mut self.counts)?;
                let frame = &self.frame;
                self.src
                    .hash_frame(frame.table(), |feed| frame.digest(feed));
                Ok(())
            }
            RecordKind::Trailer => {
                let read = Trailer {
                    counts: self.counts,
                    hashed_bytes: at.offset,
                    hash: self.src.hash(),
                };
                Trailer::check(self.frame.body(), &read, at.offset)?;
                self.src.expect_end()?;
                self.state = State::Done(LogSummary {
                    header: self.header.clone(),
                    counts: self.counts,
                    bytes: self.src.offset(),
                    hash: read.hash,
                    version: self.src.version(),
                });
                Ok(())
            }
            RecordKind::Header => Err(LogDecodeError::UnexpectedRecord {
                kind: at.kind as u8,
                offset: at.offset,
            }),
        }
    }
}

/// Reads a whole log in one pass with bounded memory and accepts it only if everything, trailer
/// included, checked out. Apply nothing from a log this rejects.
pub fn verify<R: Read>(input: R, expect: &Expect) -> Result<LogSummary, LogDecodeError> {
    let mut reader = LogReader::open(input, expect)?;
    while reader.next_extent()?.is_some() {}
    reader
        .summary()
        .cloned()
        .ok_or(LogDecodeError::ReaderFailed)
}

/// The stream hash the trailer of a log claims, read from the log's last bytes (`tail`, at least
/// its trailer record): None unless they end with a whole trailer record whose checksum verifies
/// and which says it starts where it does (`log_len`, the whole log's length). Nothing before the
/// trailer is checked ([`verify`] does): this only tells which log a file verified earlier is.
pub fn trailer_hash(tail: &[u8], log_len: u64) -> Option<[u8; 32]> {
    let body = crate::log::record::trailing_trailer(tail)?;
    let t = crate::log::summary::Trailer::decode(body)?;
    let record = (crate::log::limits::RECORD_HEAD_LEN
        + crate::log::limits::TRAILER_BODY_LEN
        + crate::log::limits::RECORD_CHECKSUM_LEN) as u64;
    (t.hashed_bytes.checked_add(record) == Some(log_len)).then_some(t.hash)
}

/// The length of the longest prefix of `input` made of the preamble and whole records whose
/// checksums verify (0 when not even the preamble does). An interrupted upload is cut back to this
/// length and resumed there: at most one record is sent again, and no byte after a damaged or torn
/// record is kept. It says nothing about what the records mean; [`verify`] still reads the whole
/// log before anything is accepted.
pub fn whole_records_prefix<R: Read>(input: R) -> u64 {
    let Ok(mut src) = crate::log::record::Source::new(input) else {
        return 0;
    };
    let mut body = Vec::new();
    loop {
        let good = src.offset();
        match src.next(&mut body) {
            Ok(at) if at.kind == crate::log::record::RecordKind::Trailer => return src.offset(),
            Ok(_) => {}
            Err(_) => return good,
        }
    }
}
