//! What can go wrong writing or reading a log. Decode errors name the byte offset of the record
//! concerned, so a rejected log can be inspected with a hex dump.

use std::io;

use uuid::Uuid;

use super::extent::ExtentError;
use super::header::HeaderError;

/// Why a replication log was rejected. See docs/formats/replication-log.md, "What the reader rejects".
#[derive(Debug, thiserror::Error)]
pub enum LogDecodeError {
    #[error("reading the replication log failed")]
    Io(#[source] io::Error),
    #[error("the log ends early: the record at byte {offset} is missing or incomplete")]
    Truncated { offset: u64 },
    #[error("not a replication log: the magic bytes do not match")]
    BadMagic,
    #[error(
        "log format version {found} is not supported (this build reads versions 1 to {supported})"
    )]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("unknown record kind {kind} at byte {offset}")]
    UnknownRecord { kind: u8, offset: u64 },
    #[error(
        "record kind {kind} at byte {offset} claims {length} bytes; at most {limit} are allowed"
    )]
    RecordTooLong {
        kind: u8,
        length: u32,
        limit: usize,
        offset: u64,
    },
    #[error("the record at byte {offset} is corrupt: its checksum does not match")]
    ChecksumMismatch { offset: u64 },
    #[error("record kind {kind} at byte {offset} is out of place")]
    UnexpectedRecord { kind: u8, offset: u64 },
    #[error("the log header is invalid")]
    InvalidHeader(#[from] HeaderError),
    #[error("the log belongs to VM {found}, not {expected}")]
    WrongVm { expected: Uuid, found: Uuid },
    #[error("the log belongs to relationship {found}, not {expected}")]
    WrongRelationship { expected: u8, found: u8 },
    #[error("the log has sequence {found} but sequence {expected} was expected")]
    OutOfOrder { expected: u64, found: u64 },
    #[error("the log applies on top of sequence {found} but the replica is at {expected}")]
    ParentMismatch { expected: u64, found: u64 },
    #[error("the frame at byte {offset} is malformed: {problem}")]
    BadFrame { offset: u64, problem: &'static str },
    #[error("the frame at byte {offset} does not decompress")]
    Decompress { offset: u64, source: io::Error },
    #[error("the frame at byte {offset} holds an invalid extent")]
    BadExtent { offset: u64, source: ExtentError },
    #[error("the trailer at byte {offset} is not 80 bytes long")]
    BadTrailer { offset: u64 },
    #[error("the trailer counts {trailer} {what} but the log holds {counted}")]
    TrailerMismatch {
        what: &'static str,
        trailer: u64,
        counted: u64,
    },
    #[error("the log's BLAKE3 hash does not match its trailer")]
    HashMismatch,
    #[error("bytes follow the trailer at byte {offset}")]
    TrailingData { offset: u64 },
    #[error("the log reader already failed; open the log again")]
    ReaderFailed,
}

/// Why a replication log could not be written. After an I/O or compression error the output holds
/// no trailer and no reader accepts it; drop the writer.
#[derive(Debug, thiserror::Error)]
pub enum LogEncodeError {
    #[error("writing the replication log failed")]
    Io(#[source] io::Error),
    #[error("the log header is invalid")]
    InvalidHeader(#[from] HeaderError),
    #[error("the extent does not fit the log's disks")]
    BadExtent(#[from] ExtentError),
    #[error("compressing a frame failed")]
    Compress(#[source] io::Error),
    #[error("the log writer already failed; start a new log")]
    WriterFailed,
    #[error("log format version {0} cannot be written (this build writes versions 1 to {max})", max = super::limits::FORMAT_VERSION)]
    UnsupportedVersion(u16),
}
