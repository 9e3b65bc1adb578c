//! The byte stream under an NBD session: buffered reads for the two-phase parsers, whole writes.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{NbdError, NbdProtocolError};
use super::parse::Decoded;

/// Any stream an NBD session can run over (unix socket, TCP, an in-memory pipe in tests).
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// A stream plus the bytes read from it but not yet parsed.
pub(crate) struct Conn {
    stream: Box<dyn Transport>,
    buf: BytesMut,
}

impl Conn {
    pub(crate) fn new(stream: Box<dyn Transport>) -> Self {
        Conn {
            stream,
            buf: BytesMut::with_capacity(64 << 10),
        }
    }

    /// Bytes received and not yet consumed.
    pub(crate) fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Drops the first `n` buffered bytes (a parsed frame).
    pub(crate) fn consume(&mut self, n: usize) {
        self.buf.advance(n);
    }

    /// Reads until at least `need` bytes are buffered; EOF before that is an error.
    pub(crate) async fn fill(&mut self, need: usize) -> Result<(), NbdError> {
        while self.buf.len() < need {
            self.buf.reserve(need - self.buf.len());
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(NbdProtocolError::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Reads and parses one owned frame.
    pub(crate) async fn next<T>(
        &mut self,
        parse: fn(&[u8]) -> Result<Decoded<T>, NbdProtocolError>,
    ) -> Result<T, NbdError> {
        loop {
            match parse(&self.buf)? {
                Decoded::Need(n) => self.fill(n).await?,
                Decoded::Done { value, consumed } => {
                    self.consume(consumed);
                    return Ok(value);
                }
            }
        }
    }

    /// Writes all parts and flushes.
    pub(crate) async fn send(&mut self, parts: &[&[u8]]) -> Result<(), NbdError> {
        for part in parts {
            self.stream.write_all(part).await?;
        }
        self.stream.flush().await?;
        Ok(())
    }

    /// Closes the write side.
    pub(crate) async fn shutdown(&mut self) -> Result<(), NbdError> {
        self.stream.shutdown().await?;
        Ok(())
    }
}
