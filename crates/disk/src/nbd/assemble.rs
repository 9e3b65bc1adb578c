//! Pure per-request reply checking: feeds parsed [`Reply`] frames for one request and verifies what
//! the server must guarantee (matching cookie, chunks inside the request, a READ covered exactly once,
//! one BLOCK_STATUS chunk per negotiated context) before the request is reported as done.

use super::error::NbdProtocolError;
use super::extent::{push_merged, Extent};
use super::parse::{descriptors, ChunkBody, Reply};
use super::wire::{
    REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE,
};

/// Largest number of chunks accepted in the reply to one request.
pub const MAX_CHUNKS_PER_REPLY: usize = 1 << 20;

/// An error the server reported for one request (an errno-style code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub code: u32,
    pub message: String,
    pub offset: Option<u64>,
}

/// What a command accepts in its reply.
pub trait ReplySink {
    type Output;
    /// Command name for error messages.
    const COMMAND: &'static str;
    /// Whether a simple reply without error completes the command (it carries no payload).
    const SIMPLE_OK: bool;
    /// Handles one non-error chunk.
    fn on_chunk(&mut self, body: &ChunkBody<'_>) -> Result<(), NbdProtocolError>;
    /// Checks the complete reply.
    fn finish(self) -> Result<Self::Output, NbdProtocolError>;
}

/// Collects the reply frames of one request.
#[derive(Debug)]
pub struct ReplyCollector<S> {
    cookie: u64,
    sink: S,
    error: Option<ServerError>,
    chunks: usize,
}

impl<S: ReplySink> ReplyCollector<S> {
    pub fn new(cookie: u64, sink: S) -> Self {
        ReplyCollector {
            cookie,
            sink,
            error: None,
            chunks: 0,
        }
    }

    /// Feeds one frame; answers whether it was the last one of the reply.
    pub fn feed(&mut self, reply: &Reply<'_>) -> Result<bool, NbdProtocolError> {
        if reply.cookie() != self.cookie {
            return Err(NbdProtocolError::CookieMismatch {
                expected: self.cookie,
                found: reply.cookie(),
            });
        }
        let chunk = match reply {
            Reply::Simple { error: 0, .. } if S::SIMPLE_OK => return Ok(true),
            Reply::Simple { error: 0, .. } => return Err(unexpected(S::COMMAND, REPLY_TYPE_NONE)),
            Reply::Simple { error, .. } => {
                self.record(ServerError {
                    code: *error,
                    message: String::new(),
                    offset: None,
                });
                return Ok(true);
            }
            Reply::Chunk(chunk) => chunk,
        };
        self.chunks += 1;
        if self.chunks > MAX_CHUNKS_PER_REPLY {
            return Err(NbdProtocolError::TooManyChunks {
                limit: MAX_CHUNKS_PER_REPLY,
            });
        }
        match &chunk.body {
            ChunkBody::Error {
                code,
                message,
                offset,
            } => {
                let message = String::from_utf8_lossy(message).into_owned();
                self.record(ServerError {
                    code: *code,
                    message,
                    offset: *offset,
                });
            }
            body => self.sink.on_chunk(body)?,
        }
        Ok(chunk.done)
    }

    fn record(&mut self, error: ServerError) {
        self.error.get_or_insert(error);
    }

    /// The command's result once [`feed`](Self::feed) reported the last frame.
    pub fn finish(self) -> Result<Result<S::Output, ServerError>, NbdProtocolError> {
        match self.error {
            Some(e) => Ok(Err(e)),
            None => self.sink.finish().map(Ok),
        }
    }
}

fn unexpected(command: &'static str, chunk_type: u16) -> NbdProtocolError {
    NbdProtocolError::UnexpectedChunk {
        command,
        chunk_type,
    }
}

/// Reply of WRITE, WRITE_ZEROES, TRIM, FLUSH: no payload.
#[derive(Debug)]
pub struct AckSink(pub &'static str);

impl ReplySink for AckSink {
    type Output = ();
    const COMMAND: &'static str = "command without payload";
    const SIMPLE_OK: bool = true;

    fn on_chunk(&mut self, body: &ChunkBody<'_>) -> Result<(), NbdProtocolError> {
        match body {
            ChunkBody::None => Ok(()),
            _ => Err(unexpected(self.0, chunk_type(body))),
        }
    }

    fn finish(self) -> Result<(), NbdProtocolError> {
        Ok(())
    }
}

/// Reply of READ: data and hole chunks land in `out`, which must be covered exactly once.
#[derive(Debug)]
pub struct ReadSink<'a> {
    offset: u64,
    out: &'a mut [u8],
    covered: Vec<(u64, u64)>,
}

impl<'a> ReadSink<'a> {
    pub fn new(offset: u64, out: &'a mut [u8]) -> Self {
        ReadSink {
            offset,
            out,
            covered: Vec::new(),
        }
    }

    /// Where `[offset, offset + len)` falls inside `out`.
    fn place(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, NbdProtocolError> {
        let req_len = self.out.len() as u64;
        let start = offset
            .checked_sub(self.offset)
            .filter(|s| s.checked_add(len).is_some_and(|e| e <= req_len));
        let out_of_range = NbdProtocolError::ChunkOutOfRange {
            offset,
            length: len,
            req_offset: self.offset,
            req_length: req_len,
        };
        let start = start.ok_or(out_of_range)? as usize;
        Ok(start..start + len as usize)
    }
}

impl ReplySink for ReadSink<'_> {
    type Output = ();
    const COMMAND: &'static str = "NBD_CMD_READ";
    const SIMPLE_OK: bool = false;

    fn on_chunk(&mut self, body: &ChunkBody<'_>) -> Result<(), NbdProtocolError> {
        let range = match body {
            ChunkBody::None => return Ok(()),
            ChunkBody::OffsetData { offset, data } => {
                let range = self.place(*offset, data.len() as u64)?;
                self.out[range.clone()].copy_from_slice(data);
                range
            }
            ChunkBody::OffsetHole { offset, length } => {
                let range = self.place(*offset, u64::from(*length))?;
                self.out[range.clone()].fill(0);
                range
            }
            other => return Err(unexpected(Self::COMMAND, chunk_type(other))),
        };
        self.covered.push((range.start as u64, range.end as u64));
        Ok(())
    }

    fn finish(mut self) -> Result<(), NbdProtocolError> {
        self.covered.sort_unstable();
        let mut at = 0;
        for (start, end) in self.covered {
            if start != at {
                return Err(NbdProtocolError::ReadCoverage);
            }
            at = end;
        }
        if at != self.out.len() as u64 {
            return Err(NbdProtocolError::ReadCoverage);
        }
        Ok(())
    }
}

/// Reply of BLOCK_STATUS: one chunk per negotiated context; keeps the extents of `want`, clipped to the
/// request (the last extent may legally run past it).
#[derive(Debug)]
pub struct StatusSink {
    offset: u64,
    end: u64,
    negotiated: Vec<u32>,
    want: u32,
    seen: Vec<u32>,
    extents: Vec<Extent>,
}

impl StatusSink {
    pub fn new(offset: u64, length: u32, negotiated: Vec<u32>, want: u32) -> Self {
        let end = offset.saturating_add(length.into());
        StatusSink {
            offset,
            end,
            negotiated,
            want,
            seen: Vec::new(),
            extents: Vec::new(),
        }
    }

    fn decode(&self, raw: &[u8], keep: bool) -> Result<Vec<Extent>, NbdProtocolError> {
        let mut out = Vec::new();
        let mut at = self.offset;
        for (length, flags) in descriptors(raw) {
            if length == 0 {
                return Err(NbdProtocolError::ZeroLengthExtent);
            }
            if at >= self.end {
                let (req_offset, req_length) = (self.offset, self.end - self.offset);
                return Err(NbdProtocolError::ChunkOutOfRange {
                    offset: at,
                    length: length.into(),
                    req_offset,
                    req_length,
                });
            }
            let length = u64::from(length).min(self.end - at);
            if keep {
                push_merged(
                    &mut out,
                    Extent {
                        offset: at,
                        length,
                        flags,
                    },
                );
            }
            at += length;
        }
        Ok(out)
    }
}

impl ReplySink for StatusSink {
    type Output = Vec<Extent>;
    const COMMAND: &'static str = "NBD_CMD_BLOCK_STATUS";
    const SIMPLE_OK: bool = false;

    fn on_chunk(&mut self, body: &ChunkBody<'_>) -> Result<(), NbdProtocolError> {
        let (id, raw) = match body {
            ChunkBody::None => return Ok(()),
            ChunkBody::BlockStatus {
                context_id,
                descriptors,
            } => (*context_id, *descriptors),
            other => return Err(unexpected(Self::COMMAND, chunk_type(other))),
        };
        if !self.negotiated.contains(&id) {
            return Err(NbdProtocolError::UnknownContextId { id });
        }
        if self.seen.contains(&id) {
            return Err(NbdProtocolError::DuplicateContextReply { id });
        }
        self.seen.push(id);
        let extents = self.decode(raw, id == self.want)?;
        if id == self.want {
            self.extents = extents;
        }
        Ok(())
    }

    fn finish(self) -> Result<Vec<Extent>, NbdProtocolError> {
        if !self.seen.contains(&self.want) {
            return Err(NbdProtocolError::MissingContextReply { id: self.want });
        }
        Ok(self.extents)
    }
}

fn chunk_type(body: &ChunkBody<'_>) -> u16 {
    match body {
        ChunkBody::None => REPLY_TYPE_NONE,
        ChunkBody::OffsetData { .. } => REPLY_TYPE_OFFSET_DATA,
        ChunkBody::OffsetHole { .. } => REPLY_TYPE_OFFSET_HOLE,
        ChunkBody::BlockStatus { .. } => REPLY_TYPE_BLOCK_STATUS,
        ChunkBody::Error { .. } => super::wire::REPLY_TYPE_ERROR,
    }
}
