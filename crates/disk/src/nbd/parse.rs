//! Pure, bounded parsers for everything an NBD server sends, over `&[u8]` (no I/O).
//!
//! Parsing is two-phase: each function first checks that the buffer holds a whole frame and answers
//! [`Decoded::Need`] with the total length needed otherwise (after checking the announced length against
//! its limit, so nothing is ever allocated from an unchecked length), then decodes the frame.
//!
//! | Frame | Bytes (big-endian) |
//! |---|---|
//! | greeting | `NBDMAGIC` u64, `IHAVEOPT` u64, handshake flags u16 |
//! | option reply | magic `0x3e889045565a9` u64, option u32, reply type u32, length u32, payload |
//! | simple reply | magic `0x67446698` u32, error u32, cookie u64 |
//! | structured chunk | magic `0x668e33ef` u32, flags u16, type u16, cookie u64, length u32, payload |

use super::error::NbdProtocolError;
use super::wire::*;

/// Largest structured chunk payload accepted (a READ chunk is at most 32 MiB of data plus its offset).
pub const MAX_CHUNK_PAYLOAD: u32 = 64 << 20;
/// Largest number of extents accepted in one BLOCK_STATUS chunk.
pub const MAX_EXTENTS_PER_CHUNK: u32 = 1 << 20;
/// Largest option reply payload accepted during the handshake.
pub const MAX_OPTION_PAYLOAD: u32 = 64 << 10;

/// Outcome of a two-phase parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// The buffer must hold at least this many bytes in total before the frame can be decoded.
    Need(usize),
    /// A whole frame: its value and how many bytes it used.
    Done { value: T, consumed: usize },
}

/// The server's first message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    pub handshake_flags: u16,
}

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        transmission_flags: u16,
    },
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    /// Informational types this client does not use (name, description, future ones).
    Other(u16),
}

/// A decoded option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub kind: OptionReplyKind,
}

/// What an option reply says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReplyKind {
    Ack,
    Server,
    Info(Info),
    MetaContext { id: u32, name: Vec<u8> },
    Error { code: u32, message: String },
}

/// A transmission-phase reply frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    Simple { cookie: u64, error: u32 },
    Chunk(Chunk<'a>),
}

impl Reply<'_> {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } => *cookie,
            Reply::Chunk(c) => c.cookie,
        }
    }
}

/// One structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk<'a> {
    pub cookie: u64,
    pub done: bool,
    pub body: ChunkBody<'a>,
}

/// The payload of a structured reply chunk, validated for its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkBody<'a> {
    None,
    OffsetData {
        offset: u64,
        data: &'a [u8],
    },
    OffsetHole {
        offset: u64,
        length: u32,
    },
    /// `descriptors` holds whole (length u32, flags u32) pairs; see [`descriptors`].
    BlockStatus {
        context_id: u32,
        descriptors: &'a [u8],
    },
    Error {
        code: u32,
        message: &'a [u8],
        offset: Option<u64>,
    },
}

/// Iterates over the (length, flags) pairs of a BLOCK_STATUS payload.
pub fn descriptors(raw: &[u8]) -> impl Iterator<Item = (u32, u32)> + '_ {
    raw.chunks_exact(8).map(|d| (be32(d, 0), be32(d, 4)))
}

/// Parses the server greeting.
pub fn parse_greeting(buf: &[u8]) -> Result<Decoded<Greeting>, NbdProtocolError> {
    if buf.len() < GREETING_LEN {
        return Ok(Decoded::Need(GREETING_LEN));
    }
    let magic = be64(buf, 0);
    if magic != INIT_MAGIC {
        return Err(NbdProtocolError::BadGreetingMagic { found: magic });
    }
    match be64(buf, 8) {
        OPTS_MAGIC => {}
        OLDSTYLE_MAGIC => return Err(NbdProtocolError::Oldstyle),
        found => return Err(bad_magic("greeting", found, OPTS_MAGIC)),
    }
    let handshake_flags = be16(buf, 16);
    if handshake_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdProtocolError::NotFixedNewstyle);
    }
    Ok(Decoded::Done {
        value: Greeting { handshake_flags },
        consumed: GREETING_LEN,
    })
}

/// Parses one option reply.
pub fn parse_option_reply(buf: &[u8]) -> Result<Decoded<OptionReply>, NbdProtocolError> {
    if buf.len() < OPTION_REPLY_HEADER_LEN {
        return Ok(Decoded::Need(OPTION_REPLY_HEADER_LEN));
    }
    let magic = be64(buf, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(bad_magic("option reply", magic, OPTION_REPLY_MAGIC));
    }
    let (option, reply_type, len) = (be32(buf, 8), be32(buf, 12), be32(buf, 16));
    check_limit("option reply", len, MAX_OPTION_PAYLOAD)?;
    let total = OPTION_REPLY_HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(Decoded::Need(total));
    }
    let kind = option_reply_kind(option, reply_type, &buf[OPTION_REPLY_HEADER_LEN..total])?;
    Ok(Decoded::Done {
        value: OptionReply { option, kind },
        consumed: total,
    })
}

fn option_reply_kind(
    option: u32,
    reply_type: u32,
    p: &[u8],
) -> Result<OptionReplyKind, NbdProtocolError> {
    let bad_len = || NbdProtocolError::BadLength {
        what: "option reply",
        len: p.len() as u64,
    };
    if reply_type & REP_FLAG_ERROR != 0 {
        let message = String::from_utf8_lossy(p).into_owned();
        return Ok(OptionReplyKind::Error {
            code: reply_type,
            message,
        });
    }
    match reply_type {
        REP_ACK if p.is_empty() => Ok(OptionReplyKind::Ack),
        REP_SERVER if p.len() >= 4 => Ok(OptionReplyKind::Server),
        REP_INFO if p.len() >= 2 => parse_info(p).map(OptionReplyKind::Info).ok_or_else(bad_len),
        REP_META_CONTEXT if p.len() >= 4 => Ok(OptionReplyKind::MetaContext {
            id: be32(p, 0),
            name: p[4..].to_vec(),
        }),
        REP_ACK | REP_SERVER | REP_INFO | REP_META_CONTEXT => Err(bad_len()),
        _ => Err(NbdProtocolError::UnexpectedOptionReply { option, reply_type }),
    }
}

fn parse_info(p: &[u8]) -> Option<Info> {
    match be16(p, 0) {
        INFO_EXPORT if p.len() == 12 => Some(Info::Export {
            size: be64(p, 2),
            transmission_flags: be16(p, 10),
        }),
        INFO_BLOCK_SIZE if p.len() == 14 => Some(Info::BlockSize {
            min: be32(p, 2),
            preferred: be32(p, 6),
            max: be32(p, 10),
        }),
        INFO_EXPORT | INFO_BLOCK_SIZE => None,
        other => Some(Info::Other(other)),
    }
}

/// Parses one transmission reply: a simple reply header or a whole structured chunk.
///
/// A simple reply is only its 16-byte header: this client always negotiates structured replies, so a
/// simple reply never carries data.
pub fn parse_reply(buf: &[u8]) -> Result<Decoded<Reply<'_>>, NbdProtocolError> {
    if buf.len() < 4 {
        return Ok(Decoded::Need(4));
    }
    match be32(buf, 0) {
        SIMPLE_REPLY_MAGIC if buf.len() < SIMPLE_REPLY_LEN => Ok(Decoded::Need(SIMPLE_REPLY_LEN)),
        SIMPLE_REPLY_MAGIC => {
            let value = Reply::Simple {
                error: be32(buf, 4),
                cookie: be64(buf, 8),
            };
            Ok(Decoded::Done {
                value,
                consumed: SIMPLE_REPLY_LEN,
            })
        }
        STRUCTURED_REPLY_MAGIC => parse_chunk(buf),
        EXTENDED_REPLY_MAGIC => Err(NbdProtocolError::ExtendedHeaders),
        found => Err(bad_magic(
            "reply",
            found.into(),
            STRUCTURED_REPLY_MAGIC.into(),
        )),
    }
}

fn parse_chunk(buf: &[u8]) -> Result<Decoded<Reply<'_>>, NbdProtocolError> {
    if buf.len() < CHUNK_HEADER_LEN {
        return Ok(Decoded::Need(CHUNK_HEADER_LEN));
    }
    let (flags, chunk_type, cookie, len) =
        (be16(buf, 4), be16(buf, 6), be64(buf, 8), be32(buf, 16));
    let limit = match chunk_type {
        REPLY_TYPE_BLOCK_STATUS => 4 + 8 * MAX_EXTENTS_PER_CHUNK,
        _ => MAX_CHUNK_PAYLOAD,
    };
    check_limit("reply chunk", len, limit)?;
    let total = CHUNK_HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(Decoded::Need(total));
    }
    let done = flags & REPLY_FLAG_DONE != 0;
    let body = parse_chunk_body(chunk_type, done, &buf[CHUNK_HEADER_LEN..total])?;
    Ok(Decoded::Done {
        value: Reply::Chunk(Chunk { cookie, done, body }),
        consumed: total,
    })
}

fn parse_chunk_body(
    chunk_type: u16,
    done: bool,
    p: &[u8],
) -> Result<ChunkBody<'_>, NbdProtocolError> {
    let bad_len = || NbdProtocolError::BadLength {
        what: "reply chunk",
        len: p.len() as u64,
    };
    match chunk_type {
        REPLY_TYPE_NONE if p.is_empty() && done => Ok(ChunkBody::None),
        REPLY_TYPE_NONE => Err(bad_len()),
        REPLY_TYPE_OFFSET_DATA if p.len() > 8 => Ok(ChunkBody::OffsetData {
            offset: be64(p, 0),
            data: &p[8..],
        }),
        REPLY_TYPE_OFFSET_HOLE if p.len() == 12 && be32(p, 8) != 0 => Ok(ChunkBody::OffsetHole {
            offset: be64(p, 0),
            length: be32(p, 8),
        }),
        REPLY_TYPE_BLOCK_STATUS if p.len() >= 12 && (p.len() - 4).is_multiple_of(8) => {
            Ok(ChunkBody::BlockStatus {
                context_id: be32(p, 0),
                descriptors: &p[4..],
            })
        }
        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE | REPLY_TYPE_BLOCK_STATUS => Err(bad_len()),
        t if t & REPLY_TYPE_FLAG_ERROR != 0 => parse_error_chunk(t, p),
        t => Err(NbdProtocolError::UnexpectedChunk {
            command: "any command",
            chunk_type: t,
        }),
    }
}

fn parse_error_chunk(chunk_type: u16, p: &[u8]) -> Result<ChunkBody<'_>, NbdProtocolError> {
    let bad_len = || NbdProtocolError::BadLength {
        what: "error chunk",
        len: p.len() as u64,
    };
    if p.len() < 6 {
        return Err(bad_len());
    }
    let code = be32(p, 0);
    if code == 0 {
        return Err(NbdProtocolError::ZeroErrorCode);
    }
    let msg_end = 6 + usize::from(be16(p, 4));
    let message = p.get(6..msg_end).ok_or_else(bad_len)?;
    let offset = match (chunk_type, p.len() - msg_end) {
        (REPLY_TYPE_ERROR, 0) => None,
        (REPLY_TYPE_ERROR_OFFSET, 8) => Some(be64(p, msg_end)),
        (REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET, _) => return Err(bad_len()),
        // Unknown error types: only the code and message are meaningful.
        _ => None,
    };
    Ok(ChunkBody::Error {
        code,
        message,
        offset,
    })
}

fn check_limit(what: &'static str, len: u32, limit: u32) -> Result<(), NbdProtocolError> {
    if len > limit {
        return Err(NbdProtocolError::TooLong {
            what,
            len: len.into(),
            limit: limit.into(),
        });
    }
    Ok(())
}

fn bad_magic(what: &'static str, found: u64, expected: u64) -> NbdProtocolError {
    NbdProtocolError::BadMagic {
        what,
        found,
        expected,
    }
}

// Callers check lengths first; the fixed-size copies cannot fail.
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Frames below are written by hand from the NBD protocol document, not built with the constants.
    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0x66, 0x8e, 0x33, 0xef];
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn greeting_needs_fixed_newstyle() {
        let mut g = b"NBDMAGICIHAVEOPT\x00\x03".to_vec();
        assert_eq!(parse_greeting(&g[..10]), Ok(Decoded::Need(18)));
        assert_eq!(
            parse_greeting(&g),
            Ok(Decoded::Done {
                value: Greeting { handshake_flags: 3 },
                consumed: 18
            })
        );
        g[17] = 2;
        assert_eq!(parse_greeting(&g), Err(NbdProtocolError::NotFixedNewstyle));
        let old = b"NBDMAGIC\x00\x00\x42\x02\x81\x86\x12\x53\x00\x00";
        assert_eq!(parse_greeting(old), Err(NbdProtocolError::Oldstyle));
    }

    #[test]
    fn option_replies_decode_and_refuse_oversized_payloads() {
        let head = |kind: u32, len: u32| {
            let mut v = vec![0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7];
            v.extend_from_slice(&kind.to_be_bytes());
            v.extend_from_slice(&len.to_be_bytes());
            v
        };
        let mut info = head(3, 12);
        info.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x03]);
        let want = OptionReply {
            option: 7,
            kind: OptionReplyKind::Info(Info::Export {
                size: 4096,
                transmission_flags: 3,
            }),
        };
        assert_eq!(
            parse_option_reply(&info),
            Ok(Decoded::Done {
                value: want,
                consumed: 32
            })
        );
        let mut err = head(0x8000_0006, 4);
        err.extend_from_slice(b"gone");
        let kind = OptionReplyKind::Error {
            code: 0x8000_0006,
            message: "gone".into(),
        };
        assert_eq!(
            parse_option_reply(&err),
            Ok(Decoded::Done {
                value: OptionReply { option: 7, kind },
                consumed: 24
            })
        );
        // The limit is checked on the header alone, before waiting for (or allocating) the payload.
        assert!(matches!(
            parse_option_reply(&head(1, 1 << 20)),
            Err(NbdProtocolError::TooLong { .. })
        ));
        assert!(matches!(
            parse_option_reply(&head(1, 3)),
            Ok(Decoded::Need(23))
        ));
    }

    #[test]
    fn simple_and_structured_replies() {
        let simple = [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 9];
        let want = Decoded::Done {
            value: Reply::Simple {
                cookie: 9,
                error: 5,
            },
            consumed: 16,
        };
        assert_eq!(parse_reply(&simple), Ok(want));
        let data = chunk(1, 1, 4, &[0, 0, 0, 0, 0, 0, 2, 0, 0xab, 0xcd]);
        let body = ChunkBody::OffsetData {
            offset: 512,
            data: &[0xab, 0xcd],
        };
        let want = Reply::Chunk(Chunk {
            cookie: 4,
            done: true,
            body,
        });
        assert_eq!(
            parse_reply(&data),
            Ok(Decoded::Done {
                value: want,
                consumed: 30
            })
        );
        assert_eq!(parse_reply(&data[..25]), Ok(Decoded::Need(30)));
        let status = chunk(0, 5, 4, &[0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 3]);
        let Ok(Decoded::Done {
            value:
                Reply::Chunk(Chunk {
                    body:
                        ChunkBody::BlockStatus {
                            context_id: 1,
                            descriptors: d,
                        },
                    ..
                }),
            ..
        }) = parse_reply(&status)
        else {
            panic!("not a block status chunk");
        };
        assert_eq!(descriptors(d).collect::<Vec<_>>(), vec![(4096, 3)]);
    }

    #[test]
    fn malformed_chunks_are_protocol_errors() {
        let over = chunk(0, 1, 1, &[]);
        let mut over = over[..16].to_vec();
        over.extend_from_slice(&(65u32 << 20).to_be_bytes());
        assert!(matches!(
            parse_reply(&over),
            Err(NbdProtocolError::TooLong { .. })
        ));
        let zero_hole = chunk(1, 2, 1, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            parse_reply(&zero_hole),
            Err(NbdProtocolError::BadLength { .. })
        ));
        let none_not_done = chunk(0, 0, 1, &[]);
        assert!(matches!(
            parse_reply(&none_not_done),
            Err(NbdProtocolError::BadLength { .. })
        ));
        let odd_status = chunk(1, 5, 1, &[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]);
        assert!(matches!(
            parse_reply(&odd_status),
            Err(NbdProtocolError::BadLength { .. })
        ));
        let err_zero = chunk(1, 0x8001, 1, &[0, 0, 0, 0, 0, 0]);
        assert_eq!(parse_reply(&err_zero), Err(NbdProtocolError::ZeroErrorCode));
        let unknown = chunk(1, 77, 1, &[]);
        assert!(matches!(
            parse_reply(&unknown),
            Err(NbdProtocolError::UnexpectedChunk { .. })
        ));
        assert_eq!(
            parse_reply(&[0x6e, 0x8a, 0x27, 0x8c]),
            Err(NbdProtocolError::ExtendedHeaders)
        );
        assert!(matches!(
            parse_reply(b"HTTP"),
            Err(NbdProtocolError::BadMagic { .. })
        ));
    }

    #[test]
    fn error_offset_chunk_carries_message_and_offset() {
        let payload = [0, 0, 0, 5, 0, 2, b'h', b'i', 0, 0, 0, 0, 0, 0, 0x10, 0];
        let frame = chunk(1, 0x8002, 3, &payload);
        let Ok(Decoded::Done {
            value: Reply::Chunk(c),
            ..
        }) = parse_reply(&frame)
        else {
            panic!("not a chunk");
        };
        assert_eq!(
            c.body,
            ChunkBody::Error {
                code: 5,
                message: b"hi",
                offset: Some(4096)
            }
        );
    }
}
