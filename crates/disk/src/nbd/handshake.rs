//! Fixed newstyle negotiation: structured replies, meta contexts, then NBD_OPT_GO.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant C as client
//!     participant S as server
//!     S->>C: NBDMAGIC IHAVEOPT flags(FIXED_NEWSTYLE|NO_ZEROES)
//!     C->>S: client flags(C_FIXED_NEWSTYLE|C_NO_ZEROES)
//!     C->>S: NBD_OPT_STRUCTURED_REPLY
//!     S->>C: NBD_REP_ACK
//!     C->>S: NBD_OPT_SET_META_CONTEXT(export, [contexts])
//!     S->>C: NBD_REP_META_CONTEXT(id, name) ... NBD_REP_ACK
//!     C->>S: NBD_OPT_GO(export, [NBD_INFO_BLOCK_SIZE])
//!     S->>C: NBD_REP_INFO(EXPORT size flags), NBD_REP_INFO(BLOCK_SIZE) ... NBD_REP_ACK
//!     Note over C,S: transmission phase
//! ```

use super::conn::Conn;
use super::error::{NbdError, NbdProtocolError, OptionErrorCode};
use super::parse::{parse_greeting, parse_option_reply, Info, OptionReplyKind};
use super::wire::*;

/// Largest READ/WRITE payload sent, whatever the server advertises.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Block size constraints advertised by the server (`NBD_INFO_BLOCK_SIZE`), or the protocol defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

impl BlockSizes {
    const DEFAULT: BlockSizes = BlockSizes {
        min: 1,
        preferred: 4096,
        max: MAX_PAYLOAD,
    };

    fn validated(min: u32, preferred: u32, max: u32) -> Result<BlockSizes, NbdProtocolError> {
        let ok = min.is_power_of_two()
            && min <= 64 << 10
            && preferred.is_power_of_two()
            && preferred >= min
            && (max == u32::MAX || (max.is_multiple_of(min) && max >= preferred.min(MAX_PAYLOAD)));
        if !ok {
            return Err(NbdProtocolError::BadBlockSizes {
                min,
                preferred,
                max,
            });
        }
        Ok(BlockSizes {
            min,
            preferred,
            max,
        })
    }
}

/// What the handshake settled.
#[derive(Debug, Clone)]
pub(crate) struct Negotiated {
    pub size: u64,
    pub transmission_flags: u16,
    pub block_sizes: BlockSizes,
    pub contexts: Vec<(String, u32)>,
}

pub(crate) async fn negotiate(
    conn: &mut Conn,
    export: &str,
    contexts: &[&str],
) -> Result<Negotiated, NbdError> {
    let greeting = conn.next(parse_greeting).await?;
    let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
    if greeting.handshake_flags & FLAG_NO_ZEROES != 0 {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    conn.send(&[&client_flags.to_be_bytes()]).await?;

    send_option(conn, OPT_STRUCTURED_REPLY, &[]).await?;
    match next_reply(conn, OPT_STRUCTURED_REPLY).await? {
        OptionReplyKind::Ack => {}
        other => return Err(unexpected(OPT_STRUCTURED_REPLY, &other).into()),
    }
    let contexts = if contexts.is_empty() {
        Vec::new()
    } else {
        set_meta_contexts(conn, export, contexts).await?
    };
    let (size, transmission_flags, block_sizes) = go(conn, export).await?;
    Ok(Negotiated {
        size,
        transmission_flags,
        block_sizes,
        contexts,
    })
}

async fn set_meta_contexts(
    conn: &mut Conn,
    export: &str,
    wanted: &[&str],
) -> Result<Vec<(String, u32)>, NbdError> {
    let mut data = length_prefixed(export.as_bytes());
    data.extend_from_slice(&(wanted.len() as u32).to_be_bytes());
    for name in wanted {
        data.extend_from_slice(&length_prefixed(name.as_bytes()));
    }
    send_option(conn, OPT_SET_META_CONTEXT, &data).await?;
    let mut granted: Vec<(String, u32)> = Vec::new();
    loop {
        match next_reply(conn, OPT_SET_META_CONTEXT).await? {
            OptionReplyKind::Ack => return Ok(granted),
            OptionReplyKind::MetaContext { id, name } => {
                let Some(name) = wanted.iter().find(|w| w.as_bytes() == name.as_slice()) else {
                    return Err(NbdProtocolError::UnrequestedContext {
                        name: String::from_utf8_lossy(&name).into_owned(),
                    }
                    .into());
                };
                if granted.iter().any(|(_, g)| *g == id) {
                    return Err(NbdProtocolError::DuplicateContextId { id }.into());
                }
                granted.push((name.to_string(), id));
            }
            other => return Err(unexpected(OPT_SET_META_CONTEXT, &other).into()),
        }
    }
}

async fn go(conn: &mut Conn, export: &str) -> Result<(u64, u16, BlockSizes), NbdError> {
    let mut data = length_prefixed(export.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(conn, OPT_GO, &data).await?;
    let mut export_info = None;
    let mut block_sizes = BlockSizes::DEFAULT;
    loop {
        match next_reply(conn, OPT_GO).await? {
            OptionReplyKind::Ack => break,
            OptionReplyKind::Info(Info::Export {
                size,
                transmission_flags,
            }) => export_info = Some((size, transmission_flags)),
            OptionReplyKind::Info(Info::BlockSize {
                min,
                preferred,
                max,
            }) => {
                block_sizes = BlockSizes::validated(min, preferred, max)?;
            }
            OptionReplyKind::Info(Info::Other(_)) => {}
            other => return Err(unexpected(OPT_GO, &other).into()),
        }
    }
    let (size, flags) = export_info.ok_or(NbdProtocolError::MissingExportInfo)?;
    Ok((size, flags, block_sizes))
}

async fn send_option(conn: &mut Conn, option: u32, data: &[u8]) -> Result<(), NbdError> {
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
    header.extend_from_slice(&option.to_be_bytes());
    header.extend_from_slice(&(data.len() as u32).to_be_bytes());
    conn.send(&[&header, data]).await
}

/// Reads the next reply to `option`; an `NBD_REP_ERR_*` becomes [`NbdError::OptionRefused`].
async fn next_reply(conn: &mut Conn, option: u32) -> Result<OptionReplyKind, NbdError> {
    let reply = conn.next(parse_option_reply).await?;
    if reply.option != option {
        return Err(NbdProtocolError::OptionMismatch {
            expected: option,
            found: reply.option,
        }
        .into());
    }
    match reply.kind {
        OptionReplyKind::Error { code, message } => Err(NbdError::OptionRefused {
            option: option_name(option),
            code: OptionErrorCode(code),
            message,
        }),
        kind => Ok(kind),
    }
}

fn unexpected(option: u32, kind: &OptionReplyKind) -> NbdProtocolError {
    let reply_type = match kind {
        OptionReplyKind::Ack => REP_ACK,
        OptionReplyKind::Server => REP_SERVER,
        OptionReplyKind::Info(_) => REP_INFO,
        OptionReplyKind::MetaContext { .. } => REP_META_CONTEXT,
        OptionReplyKind::Error { code, .. } => *code,
    };
    NbdProtocolError::UnexpectedOptionReply { option, reply_type }
}

fn length_prefixed(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + bytes.len());
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

fn option_name(option: u32) -> &'static str {
    match option {
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "an NBD option",
    }
}
