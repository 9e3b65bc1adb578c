//! Errors of the NBD client: what the server refused, what it answered badly, and what failed locally.

use std::fmt;

/// The server sent bytes that break the protocol. The connection is unusable afterwards.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NbdProtocolError {
    #[error("server greeting has magic {found:#018x}, expected NBDMAGIC")]
    BadGreetingMagic { found: u64 },
    #[error("server speaks oldstyle NBD, which has no options or structured replies")]
    Oldstyle,
    #[error("server does not offer fixed newstyle negotiation")]
    NotFixedNewstyle,
    #[error("{what} has magic {found:#x}, expected {expected:#x}")]
    BadMagic {
        what: &'static str,
        found: u64,
        expected: u64,
    },
    #[error("server used extended headers, which were not negotiated")]
    ExtendedHeaders,
    #[error("{what} announces {len} bytes, limit is {limit}")]
    TooLong {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("{what} has length {len}, which is malformed")]
    BadLength { what: &'static str, len: u64 },
    #[error("option reply answers option {found}, expected {expected}")]
    OptionMismatch { expected: u32, found: u32 },
    #[error("unexpected option reply type {reply_type:#x} to option {option}")]
    UnexpectedOptionReply { option: u32, reply_type: u32 },
    #[error("server acknowledged NBD_OPT_GO without sending NBD_INFO_EXPORT")]
    MissingExportInfo,
    #[error("server advertised invalid block sizes min {min}, preferred {preferred}, max {max}")]
    BadBlockSizes { min: u32, preferred: u32, max: u32 },
    #[error("server granted meta context {name:?}, which was not requested")]
    UnrequestedContext { name: String },
    #[error("server reused meta context id {id}")]
    DuplicateContextId { id: u32 },
    #[error("reply cookie {found} does not match request cookie {expected}")]
    CookieMismatch { expected: u64, found: u64 },
    #[error("unexpected chunk type {chunk_type:#x} in the reply to {command}")]
    UnexpectedChunk {
        command: &'static str,
        chunk_type: u16,
    },
    #[error("chunk covers {offset}+{length}, outside the request {req_offset}+{req_length}")]
    ChunkOutOfRange {
        offset: u64,
        length: u64,
        req_offset: u64,
        req_length: u64,
    },
    #[error("read reply chunks overlap or leave a gap")]
    ReadCoverage,
    #[error("reply has more than {limit} chunks")]
    TooManyChunks { limit: usize },
    #[error("block status names context id {id}, which was not negotiated")]
    UnknownContextId { id: u32 },
    #[error("block status reports context id {id} twice")]
    DuplicateContextReply { id: u32 },
    #[error("block status has no extents for context id {id}")]
    MissingContextReply { id: u32 },
    #[error("block status has a zero-length extent")]
    ZeroLengthExtent,
    #[error("error chunk carries error code 0")]
    ZeroErrorCode,
    #[error("server closed the connection in the middle of a reply")]
    UnexpectedEof,
}

/// An `NBD_REP_ERR_*` code from the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionErrorCode(pub u32);

impl fmt::Display for OptionErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 & !crate::nbd::wire::REP_FLAG_ERROR {
            1 => "NBD_REP_ERR_UNSUP",
            2 => "NBD_REP_ERR_POLICY",
            3 => "NBD_REP_ERR_INVALID",
            4 => "NBD_REP_ERR_PLATFORM",
            5 => "NBD_REP_ERR_TLS_REQD",
            6 => "NBD_REP_ERR_UNKNOWN",
            7 => "NBD_REP_ERR_SHUTDOWN",
            8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
            9 => "NBD_REP_ERR_TOO_BIG",
            10 => "NBD_REP_ERR_EXT_HEADER_REQD",
            _ => return write!(f, "NBD_REP_ERR {:#x}", self.0),
        };
        f.write_str(name)
    }
}

/// An errno-style code from a transmission reply (`EIO`, `ENOSPC`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandErrorCode(pub u32);

impl fmt::Display for CommandErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            1 => "EPERM (operation not permitted)",
            5 => "EIO (input/output error)",
            12 => "ENOMEM (out of memory)",
            22 => "EINVAL (invalid argument)",
            28 => "ENOSPC (no space left on device)",
            75 => "EOVERFLOW (value too large)",
            95 => "ENOTSUP (operation not supported)",
            108 => "ESHUTDOWN (server is shutting down)",
            n => return write!(f, "error {n}"),
        };
        f.write_str(name)
    }
}

/// Anything that can go wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD connection I/O failed")]
    Io(#[from] std::io::Error),
    #[error("NBD server broke the protocol")]
    Protocol(#[from] NbdProtocolError),
    #[error("NBD server did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("NBD server refused {option} with {code}{}", fmt_message(.message))]
    OptionRefused {
        option: &'static str,
        code: OptionErrorCode,
        message: String,
    },
    #[error("NBD {command} at {offset}+{length} failed with {code}{}", fmt_message(.message))]
    CommandFailed {
        command: &'static str,
        offset: u64,
        length: u64,
        code: CommandErrorCode,
        message: String,
    },
    #[error("NBD export does not support {0}")]
    Unsupported(&'static str),
    #[error("NBD export is read-only")]
    ReadOnly,
    #[error("range {offset}+{length} is outside the NBD export of {size} bytes")]
    OutOfRange { offset: u64, length: u64, size: u64 },
    #[error("meta context {0:?} was not negotiated on this connection")]
    UnknownContext(String),
    #[error("NBD connection is unusable after an earlier failure")]
    Broken,
}

fn fmt_message(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

impl NbdError {
    /// Whether the connection must be abandoned after this error.
    pub fn breaks_connection(&self) -> bool {
        matches!(
            self,
            NbdError::Io(_) | NbdError::Protocol(_) | NbdError::Timeout(_) | NbdError::Broken
        )
    }
}
