//! [`NbdClient`]: one NBD connection in the transmission phase, one request in flight at a time.

use std::path::Path;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};

use super::assemble::{AckSink, ReadSink, ReplyCollector, ReplySink, ServerError, StatusSink};
use super::conn::{Conn, Transport};
use super::error::{CommandErrorCode, NbdError};
use super::extent::{push_merged, Extent};
use super::handshake::{negotiate, BlockSizes, Negotiated, MAX_PAYLOAD};
use super::parse::{parse_reply, Decoded};
use super::wire::*;

/// Longest a handshake or a single request may take unless changed with [`NbdClient::set_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest length sent in one TRIM, WRITE_ZEROES or BLOCK_STATUS request (a multiple of every legal
/// minimum block size).
pub const MAX_NON_DATA_REQUEST: u32 = 1 << 30;

/// An NBD connection to one export, after a successful handshake.
pub struct NbdClient {
    conn: Conn,
    info: Negotiated,
    next_cookie: u64,
    timeout: Option<Duration>,
    broken: bool,
}

impl NbdClient {
    /// Connects to a server on a unix socket and negotiates `export` with the given meta contexts.
    pub async fn connect_unix(
        path: &Path,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<NbdClient, NbdError> {
        let stream = with_timeout(DEFAULT_TIMEOUT, async {
            Ok(UnixStream::connect(path).await?)
        })
        .await?;
        Self::handshake(Box::new(stream), export, meta_contexts).await
    }

    /// Connects to a server over TCP (`host:port`).
    pub async fn connect_tcp(
        addr: &str,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<NbdClient, NbdError> {
        let stream = with_timeout(DEFAULT_TIMEOUT, async {
            Ok(TcpStream::connect(addr).await?)
        })
        .await?;
        stream.set_nodelay(true)?;
        Self::handshake(Box::new(stream), export, meta_contexts).await
    }

    /// Runs the handshake over an already connected stream.
    pub async fn handshake(
        stream: Box<dyn Transport>,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<NbdClient, NbdError> {
        let mut conn = Conn::new(stream);
        let info =
            with_timeout(DEFAULT_TIMEOUT, negotiate(&mut conn, export, meta_contexts)).await?;
        tracing::debug!(export, size = info.size, flags = info.transmission_flags, contexts = ?info.contexts, "NBD export opened");
        Ok(NbdClient {
            conn,
            info,
            next_cookie: 1,
            timeout: Some(DEFAULT_TIMEOUT),
            broken: false,
        })
    }

    /// Sets the limit for each request (`None`: wait forever). A request that times out breaks the connection.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Raw transmission flags (`NBD_FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.info.transmission_flags
    }

    pub fn read_only(&self) -> bool {
        self.has(TFLAG_READ_ONLY)
    }

    pub fn can_trim(&self) -> bool {
        self.has(TFLAG_SEND_TRIM)
    }

    pub fn can_write_zeroes(&self) -> bool {
        self.has(TFLAG_SEND_WRITE_ZEROES)
    }

    pub fn can_fast_zero(&self) -> bool {
        self.has(TFLAG_SEND_FAST_ZERO)
    }

    pub fn can_flush(&self) -> bool {
        self.has(TFLAG_SEND_FLUSH)
    }

    pub fn can_multi_conn(&self) -> bool {
        self.has(TFLAG_CAN_MULTI_CONN)
    }

    /// Block size constraints the server advertised (or the protocol defaults).
    pub fn block_sizes(&self) -> BlockSizes {
        self.info.block_sizes
    }

    /// Id the server gave meta context `name`, if it granted it.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.info
            .contexts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }

    fn has(&self, flag: u16) -> bool {
        self.info.transmission_flags & flag != 0
    }

    /// Largest READ/WRITE payload per request.
    fn max_payload(&self) -> u32 {
        self.info.block_sizes.max.min(MAX_PAYLOAD)
    }

    /// Reads `buf.len()` bytes at `offset` (holes arrive as zeroes).
    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.check_range(offset, buf.len() as u64)?;
        let max = self.max_payload() as usize;
        for (i, piece) in buf.chunks_mut(max).enumerate() {
            let at = offset + (i * max) as u64;
            let len = piece.len() as u32;
            self.run(
                "NBD_CMD_READ",
                CMD_READ,
                0,
                at,
                len,
                &[],
                ReadSink::new(at, piece),
            )
            .await?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.check_writable(offset, data.len() as u64)?;
        let max = self.max_payload() as usize;
        for (i, piece) in data.chunks(max).enumerate() {
            let at = offset + (i * max) as u64;
            let sink = AckSink("NBD_CMD_WRITE");
            self.run(
                "NBD_CMD_WRITE",
                CMD_WRITE,
                0,
                at,
                piece.len() as u32,
                piece,
                sink,
            )
            .await?;
        }
        Ok(())
    }

    /// Zeroes a range; the server may deallocate it (NO_HOLE is not set), so sparse stays sparse.
    pub async fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.zero(offset, len, 0).await
    }

    /// Like [`write_zeroes`](Self::write_zeroes) with NBD_CMD_FLAG_FAST_ZERO: the server fails with
    /// ENOTSUP instead of writing zeroes slowly.
    pub async fn write_zeroes_fast(&mut self, offset: u64, len: u64) -> Result<(), NbdError> {
        if !self.can_fast_zero() {
            return Err(NbdError::Unsupported("NBD_CMD_FLAG_FAST_ZERO"));
        }
        self.zero(offset, len, CMD_FLAG_FAST_ZERO).await
    }

    async fn zero(&mut self, offset: u64, len: u64, flags: u16) -> Result<(), NbdError> {
        if !self.can_write_zeroes() {
            return Err(NbdError::Unsupported("NBD_CMD_WRITE_ZEROES"));
        }
        self.check_writable(offset, len)?;
        for (at, n) in pieces(offset, len, MAX_NON_DATA_REQUEST) {
            let sink = AckSink("NBD_CMD_WRITE_ZEROES");
            self.run(
                "NBD_CMD_WRITE_ZEROES",
                CMD_WRITE_ZEROES,
                flags,
                at,
                n,
                &[],
                sink,
            )
            .await?;
        }
        Ok(())
    }

    /// Tells the server the range is no longer needed (it may read back as anything until written).
    pub async fn trim(&mut self, offset: u64, len: u64) -> Result<(), NbdError> {
        if !self.can_trim() {
            return Err(NbdError::Unsupported("NBD_CMD_TRIM"));
        }
        self.check_writable(offset, len)?;
        for (at, n) in pieces(offset, len, MAX_NON_DATA_REQUEST) {
            self.run(
                "NBD_CMD_TRIM",
                CMD_TRIM,
                0,
                at,
                n,
                &[],
                AckSink("NBD_CMD_TRIM"),
            )
            .await?;
        }
        Ok(())
    }

    /// Makes completed writes durable. A server that does not advertise flush has nothing to flush.
    pub async fn flush(&mut self) -> Result<(), NbdError> {
        if !self.can_flush() {
            return Ok(());
        }
        self.run(
            "NBD_CMD_FLUSH",
            CMD_FLUSH,
            0,
            0,
            0,
            &[],
            AckSink("NBD_CMD_FLUSH"),
        )
        .await
    }

    /// One BLOCK_STATUS request: extents of `context` from `offset`, covering at most `len` bytes
    /// (the server may answer short; see [`map`](Self::map)).
    pub async fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, NbdError> {
        let want = self
            .context_id(context)
            .ok_or_else(|| NbdError::UnknownContext(context.to_string()))?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let n = len.min(MAX_NON_DATA_REQUEST.into()) as u32;
        let ids = self.info.contexts.iter().map(|(_, id)| *id).collect();
        let sink = StatusSink::new(offset, n, ids, want);
        self.run(
            "NBD_CMD_BLOCK_STATUS",
            CMD_BLOCK_STATUS,
            0,
            offset,
            n,
            &[],
            sink,
        )
        .await
    }

    /// Extents of `context` covering exactly `[offset, offset + len)`, merged where adjacent extents
    /// share flags. Loops BLOCK_STATUS until the range is covered.
    pub async fn map(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, NbdError> {
        self.check_range(offset, len)?;
        let end = offset + len;
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            // StatusSink guarantees a non-empty, contiguous answer starting at `at`, so this advances.
            for e in self.block_status(context, at, end - at).await? {
                at = e.end();
                push_merged(&mut out, e);
            }
        }
        Ok(out)
    }

    /// Sends NBD_CMD_DISC and closes the connection.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        if self.broken {
            return Err(NbdError::Broken);
        }
        let header = request_header(CMD_DISC, 0, self.next_cookie, 0, 0);
        let conn = &mut self.conn;
        with_timeout(self.timeout.unwrap_or(DEFAULT_TIMEOUT), async {
            conn.send(&[&header]).await?;
            conn.shutdown().await
        })
        .await
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.info.size => Ok(()),
            _ => Err(NbdError::OutOfRange {
                offset,
                length: len,
                size: self.info.size,
            }),
        }
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        if self.read_only() {
            return Err(NbdError::ReadOnly);
        }
        self.check_range(offset, len)
    }

    /// Sends one request and collects its reply, under the timeout. Transport and protocol failures
    /// break the connection; a server-reported error does not.
    #[allow(clippy::too_many_arguments)]
    async fn run<S: ReplySink>(
        &mut self,
        command: &'static str,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        sink: S,
    ) -> Result<S::Output, NbdError> {
        if self.broken {
            return Err(NbdError::Broken);
        }
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let header = request_header(kind, flags, cookie, offset, len);
        let exchange = exchange(
            &mut self.conn,
            &header,
            payload,
            ReplyCollector::new(cookie, sink),
        );
        let result = match self.timeout {
            Some(limit) => with_timeout(limit, exchange).await,
            None => exchange.await,
        };
        match result {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(e)) => Err(command_failed(command, offset, len, e)),
            Err(e) => {
                self.broken |= e.breaks_connection();
                Err(e)
            }
        }
    }
}

async fn exchange<S: ReplySink>(
    conn: &mut Conn,
    header: &[u8],
    payload: &[u8],
    mut collector: ReplyCollector<S>,
) -> Result<Result<S::Output, ServerError>, NbdError> {
    conn.send(&[header, payload]).await?;
    loop {
        match parse_reply(conn.buffered())? {
            Decoded::Need(n) => conn.fill(n).await?,
            Decoded::Done { value, consumed } => {
                let done = collector.feed(&value)?;
                conn.consume(consumed);
                if done {
                    return Ok(collector.finish()?);
                }
            }
        }
    }
}

async fn with_timeout<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, NbdError>>,
) -> Result<T, NbdError> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or(Err(NbdError::Timeout(limit)))
}

fn command_failed(command: &'static str, offset: u64, length: u32, e: ServerError) -> NbdError {
    let message = match e.offset {
        Some(at) if e.message.is_empty() => format!("at offset {at}"),
        Some(at) => format!("{} (at offset {at})", e.message),
        None => e.message,
    };
    NbdError::CommandFailed {
        command,
        offset,
        length: length.into(),
        code: CommandErrorCode(e.code),
        message,
    }
}

fn request_header(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut h = [0u8; REQUEST_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// Splits `[offset, offset + len)` into requests of at most `max` bytes.
fn pieces(offset: u64, len: u64, max: u32) -> impl Iterator<Item = (u64, u32)> {
    let max = u64::from(max);
    (0..len.div_ceil(max)).map(move |i| (offset + i * max, (len - i * max).min(max) as u32))
}
