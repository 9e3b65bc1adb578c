//! The primary's side of the protocol (docs/protocol.md): one HTTP/2 connection over TLS 1.3 to a
//! recovery server, authenticated with the certificate the relationship names, opened with the
//! hello handshake; JSON requests and streamed log uploads on it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use uuid::Uuid;
use vmreplica_core::codes::ReturnCode;
use wire::protocol::{
    self, decode, headers, ErrorBody, ErrorCode, ErrorDetail, Hello, HelloResponse, LogStatus,
    Route, TransferState, Validate, PROTOCOL_VERSIONS,
};

pub use super::body::WireBody;
use super::growing::{ended, Taken};
pub use super::growing::{GrowingFile, GrowingLog};
use super::tls::client_config;
use crate::jobs::JobFailure;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Size of the pieces a log is sent in.
const CHUNK: usize = 1 << 20;
/// Longest answer body read.
const MAX_ANSWER: usize = 1 << 20;

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// This host's certificate (`Msvm_ReplicationSettingData.CertificateThumbPrint`).
    pub thumbprint: String,
}

/// What failed, by the step of §5.1 that failed; each maps to a CIM return code.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("this host's certificate cannot be used: {0}")]
    Certificate(String),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("cannot connect to {addr}: {why}")]
    Connect { addr: String, why: String },
    #[error("{0} did not answer in time")]
    Timeout(String),
    #[error("the TLS handshake with {host} failed: {why}")]
    Tls { host: String, why: String },
    #[error("the connection to the recovery server failed: {0}")]
    Http(String),
    #[error("the recovery server refused: {} ({})", .0.message, .0.name)]
    Refused(Box<ErrorDetail>),
    #[error("the recovery server answered nonsense: {0}")]
    Protocol(String),
    /// This host could not read what it sends or keep what it receives.
    #[error("{0}")]
    Local(String),
}

impl PeerError {
    /// The job's error code (docs/protocol.md §4 "CIM" column, §5.1).
    pub fn return_code(&self) -> u16 {
        match self {
            PeerError::Certificate(_) => ReturnCode::InvalidParameter as u16,
            PeerError::Resolve(_) | PeerError::Connect { .. } => {
                ReturnCode::SystemNotAvailable as u16
            }
            PeerError::Timeout(_) => ReturnCode::Timeout as u16,
            PeerError::Tls { .. } => ReturnCode::AccessDenied as u16,
            PeerError::Refused(d) => match d.error_code() {
                Some(ErrorCode::AccessDenied) => ReturnCode::AccessDenied as u16,
                Some(ErrorCode::UnsupportedVersion | ErrorCode::UnknownResource) => {
                    ReturnCode::NotSupported as u16
                }
                Some(ErrorCode::BadRequest | ErrorCode::TooLarge) => {
                    ReturnCode::InvalidParameter as u16
                }
                Some(ErrorCode::UnknownVm) => ReturnCode::SystemNotAvailable as u16,
                Some(
                    ErrorCode::VmExists
                    | ErrorCode::InvalidState
                    | ErrorCode::OutOfSequence
                    | ErrorCode::SequenceConflict
                    | ErrorCode::DiskTableMismatch
                    | ErrorCode::ResyncRequired,
                ) => ReturnCode::InvalidState as u16,
                _ => ReturnCode::Failed as u16,
            },
            _ => ReturnCode::Failed as u16,
        }
    }

    /// A failed job's error, with what to do about it.
    pub fn into_failure(self, step: &str) -> JobFailure {
        let action = match &self {
            PeerError::Certificate(_) => "Check CertificateThumbPrint and the files in <data-dir>/certs/.",
            PeerError::Resolve(_) | PeerError::Connect { .. } | PeerError::Timeout(_) => {
                "Check RecoveryConnectionPoint and RecoveryServerPortNumber, that the recovery server is enabled for certificate authentication on that port, and the network between the hosts."
            }
            PeerError::Tls { .. } => {
                "Check that both hosts' certificates chain to a CA in each other's <data-dir>/certs/trusted/, that they are valid now, and that the recovery server's certificate names RecoveryConnectionPoint."
            }
            PeerError::Refused(d) if d.error_code() == Some(ErrorCode::AccessDenied) => {
                "Add an authorization entry for this host on the recovery server (vmreplica auth add)."
            }
            PeerError::Local(_) => "Check this host's data directory and free space.",
            _ => "Check the recovery server's log.",
        };
        let code = self.return_code();
        let mut f = JobFailure::failed(format!("{step}: {self}"), action);
        f.error_code = code;
        f
    }
}

/// BLAKE3 of the first `len` bytes of the spool, lowercase hex; None if it has fewer.
async fn own_prefix_hash(path: PathBuf, len: u64) -> Option<String> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path).ok()?;
        if file.metadata().ok()?.len() < len {
            return None;
        }
        let mut hasher = blake3::Hasher::new();
        let copied = std::io::copy(&mut std::io::Read::take(file, len), &mut hasher).ok()?;
        (copied == len).then(|| hasher.finalize().to_hex().to_string())
    })
    .await
    .ok()
    .flatten()
}

/// How a delivered log is committed (docs/protocol.md §5.3).
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitAs {
    /// The commit's answer waits until the replica applied the log.
    pub wait_applied: bool,
    /// The log a resynchronization sent (only told to a replica with `resync-commit`).
    pub resync: bool,
}

/// Called with (bytes sent, log length) as a log goes out.
pub type Progress = std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Waits before the quick re-sends of a log after a broken connection (docs/protocol.md §8).
const QUICK_RETRIES: [u64; 3] = [1, 2, 4];

/// Waits before the re-sends of a network initial replica: 1, 2, 4, 8, 15 and 30 s, then every
/// minute, an hour in all (counted again from the start once an attempt got further), as long as
/// a replica keeps a staged upload for it (`staged::ABANDONED_AFTER`), so one that restarts (its
/// host rebooting, however slowly) continues it from its checkpoint instead of the job failing.
pub(crate) const INITIAL_RETRIES: [u64; 65] = {
    let mut waits = [60; 65];
    let first = [1, 2, 4, 8, 15, 30];
    let mut i = 0;
    while i < first.len() {
        waits[i] = first[i];
        i += 1;
    }
    waits
};

/// Waits before asking again about a commit whose answer was lost (the connection broke after it
/// was sent), for a delivery whose peer alone knows the outcome and whose job cannot tell it
/// later: 1, 2, 4, 8, 15 and 30 s, then every minute, about ten minutes in all.
const UNANSWERED_RETRIES: [u64; 15] = [1, 2, 4, 8, 15, 30, 60, 60, 60, 60, 60, 60, 60, 60, 60];

const _: () = {
    let mut total = 0;
    let mut i = 0;
    while i < INITIAL_RETRIES.len() {
        total += INITIAL_RETRIES[i];
        i += 1;
    }
    assert!(total == super::staged::ABANDONED_AFTER.as_secs());
};

/// How long a delivery keeps trying after its connection broke, and what can end the wait.
#[derive(Clone)]
pub struct Patience {
    retries: &'static [u64],
    /// The waits once a commit was sent and its answer lost, if they differ from `retries` (they
    /// replace them from then on).
    unanswered: Option<&'static [u64]>,
    give_up: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
    /// The waits start over after an attempt that sent more than any before (each outage gets
    /// them all).
    per_outage: bool,
}

impl Patience {
    /// A replication cycle's (and the other logs'): 1, 2 and 4 s, then the cycle has failed.
    pub fn quick() -> Patience {
        Patience {
            retries: &QUICK_RETRIES,
            unanswered: None,
            give_up: None,
            per_outage: false,
        }
    }

    /// A failback's log: the quick waits, but a commit whose answer was lost is asked about for
    /// about ten minutes (the old primary may have committed it, and only it can say; a job that
    /// gave up would leave the new primary waiting to resynchronize and the old one complete);
    /// `give_up` (its job cancelled) ends the wait.
    pub fn quick_asking_after_commit(give_up: Arc<dyn Fn() -> bool + Send + Sync>) -> Patience {
        Patience {
            retries: &QUICK_RETRIES,
            unanswered: Some(&UNANSWERED_RETRIES),
            give_up: Some(give_up),
            per_outage: false,
        }
    }

    /// A network initial replication's: up to an hour; `give_up` (its job cancelled) ends it.
    pub fn initial(give_up: Arc<dyn Fn() -> bool + Send + Sync>) -> Patience {
        Patience {
            retries: &INITIAL_RETRIES,
            unanswered: None,
            give_up: Some(give_up),
            per_outage: true,
        }
    }

    fn schedule(&self, unanswered: bool) -> &'static [u64] {
        match self.unanswered {
            Some(waits) if unanswered => waits,
            _ => self.retries,
        }
    }

    /// Waits before retry `attempt` (of the waits after an unanswered commit if `unanswered`);
    /// false when there is none, or when told to give up meanwhile.
    async fn wait(&self, attempt: usize, (unanswered, committing): (bool, bool)) -> bool {
        let Some(&secs) = self.schedule(unanswered).get(attempt) else {
            return false;
        };
        let until = tokio::time::Instant::now() + Duration::from_secs(secs);
        while tokio::time::Instant::now() < until {
            if self.stops(committing) {
                return false;
            }
            tokio::time::sleep_until(
                until.min(tokio::time::Instant::now() + Duration::from_millis(500)),
            )
            .await;
        }
        !self.stops(committing)
    }

    fn has(&self, attempt: usize, (unanswered, committing): (bool, bool)) -> bool {
        attempt < self.schedule(unanswered).len() && !self.stops(committing)
    }

    fn gave_up(&self) -> bool {
        self.give_up.as_ref().is_some_and(|g| g())
    }

    /// Whether a give-up (a cancel of the job) ends the delivery now: not once a commit was sent
    /// and its answer lost (`committing`). Only the recovery server can say whether it committed
    /// the log then; a delivery that stopped without asking could leave this host ready for an
    /// initial replication the replica already holds.
    fn stops(&self, committing: bool) -> bool {
        !committing && self.gave_up()
    }
}

impl PeerError {
    /// A broken or failed connection, worth a quick retry on a new one.
    pub fn is_network(&self) -> bool {
        match self {
            PeerError::Resolve(_)
            | PeerError::Connect { .. }
            | PeerError::Timeout(_)
            | PeerError::Http(_) => true,
            PeerError::Refused(d) => d.error_code() == Some(ErrorCode::Timeout),
            _ => false,
        }
    }
}

/// What a delivered log became on the replica.
pub struct Delivered {
    pub status: LogStatus,
    /// Connections that broke on the way (each one a `NetworkFailureCount`).
    pub broken_connections: u32,
}

pub use super::bandwidth::{Bandwidth, SLICE};

/// Where `--resolve` sends a name: an address, and optionally another port.
#[derive(Debug, Clone, Copy)]
pub struct Resolved {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

/// Connection settings of this host as a primary.
#[derive(Debug, Clone)]
pub struct Peers {
    pub cert_dir: PathBuf,
    /// Name → address overrides (`vmreplicad --resolve NAME=ADDR[:PORT]`), for labs without DNS.
    pub resolve: HashMap<String, Resolved>,
    /// This host's name, sent in the hello.
    pub host: String,
    /// The upload bandwidth cap (`vmreplicad --bandwidth-limit`, `vmreplica host set`).
    pub bandwidth: Arc<Bandwidth>,
}

/// The TLS stream with bytes already read from it put back in front.
///
/// In TLS 1.3 the server judges the client's certificate after the client's handshake finished,
/// so a refusal arrives as an alert on the first read. The client therefore reads the server's
/// first bytes itself (its HTTP/2 SETTINGS frame, sent at once) before HTTP/2 starts, to report a
/// refused certificate as such, and hands them on here.
struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An open, authenticated connection to one recovery server.
pub struct Session {
    send: hyper::client::conn::http2::SendRequest<WireBody>,
    authority: String,
    bandwidth: Arc<Bandwidth>,
    pub hello: HelloResponse,
}

/// How a log is written: compressed or not, and in which log format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogMode {
    pub zstd: bool,
    pub format: u16,
}

impl LogMode {
    /// A log no peer has agreed on (an export, an import): the newest format.
    pub fn local(zstd: bool) -> LogMode {
        LogMode {
            zstd,
            format: wire::limits::FORMAT_VERSION,
        }
    }

    /// A writer of a log in this mode.
    pub fn writer<W: std::io::Write>(
        self,
        out: W,
        header: wire::LogHeader,
    ) -> Result<wire::LogWriter<W>, wire::LogEncodeError> {
        let compression = if self.zstd {
            wire::Compression::default()
        } else {
            wire::Compression::Off
        };
        wire::LogWriter::with_version(out, header, compression, self.format)
    }
}

impl Session {
    /// Whether logs sent on this connection may hold zstd frames: `CompressionEnabled` and the
    /// `zstd` capability both (§3).
    pub fn zstd(&self, enabled: bool) -> bool {
        enabled && self.has("zstd")
    }

    /// How logs sent on this connection are written: [`Session::zstd`], in the log format the
    /// hello agreed on (a recovery server of an older build reads only older ones).
    pub fn log_mode(&self, compression_enabled: bool) -> LogMode {
        LogMode {
            zstd: self.zstd(compression_enabled),
            format: self.hello.log_format_version,
        }
    }

    /// True when the hello agreed on capability `name` (docs/protocol.md §3).
    pub fn has(&self, name: &str) -> bool {
        self.hello.capabilities.iter().any(|c| c == name)
    }

    /// Ok when the hello agreed on capability `name` (docs/protocol.md §3); else the refusal a
    /// peer without the feature would give (`UnsupportedVersion`: 32770, an upgrade is needed).
    pub fn require(&self, name: &str) -> Result<(), PeerError> {
        if self.has(name) {
            return Ok(());
        }
        Err(PeerError::Refused(Box::new(ErrorDetail::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "{} ({}) does not offer the `{name}` capability (it offers: {}); upgrade it",
                self.authority,
                self.hello.product,
                self.hello.capabilities.join(", ")
            ),
        ))))
    }
}

impl Peers {
    /// Uploads log `sequence` of `vm` (from `file`, or from memory for an in-memory `log`) and
    /// commits it, on `session` and then, after a broken connection, on new ones after 1, 2 and
    /// 4 s. Before each new attempt the log's status is asked, so a log whose commit answer was lost
    /// is recognised, not sent twice, and an interrupted upload continues where the replica's whole
    /// records end: a spool file's if that prefix hashes equal to the replica's, an in-memory log's
    /// if the replica holds this delivery's own upload and the bytes from there are still kept.
    /// When this returns, an in-memory log's writer is released ([`GrowingLog::close`]).
    ///
    /// `upload_id`: the id to upload under instead of a new one (a turned-off VM's log 1 records
    /// it before its upload starts). With `ask_first`, a delivery of the same bytes may have used
    /// it before this host restarted (that log 1, built again the same): the replica is asked
    /// first, what it holds is built without being sent, and the upload resumes there
    /// (docs/protocol.md §5.3).
    #[allow(clippy::too_many_arguments)]
    pub async fn deliver(
        &self,
        target: &Target,
        session: &mut Session,
        vm: Uuid,
        sequence: u64,
        file: &Path,
        log: Arc<GrowingLog>,
        progress: Progress,
        commit: CommitAs,
        patience: Patience,
        (upload_id, ask_first): (Option<Uuid>, bool),
    ) -> Result<Delivered, PeerError> {
        let result = self
            .deliver_inner(
                target,
                session,
                (vm, sequence),
                file,
                log.clone(),
                progress,
                (commit, patience),
                (upload_id, ask_first),
            )
            .await;
        log.close();
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn deliver_inner(
        &self,
        target: &Target,
        session: &mut Session,
        (vm, sequence): (Uuid, u64),
        file: &Path,
        log: Arc<GrowingLog>,
        progress: Progress,
        (
            CommitAs {
                wait_applied,
                resync,
            },
            patience,
        ): (CommitAs, Patience),
        (upload_id, ask_first): (Option<Uuid>, bool),
    ) -> Result<Delivered, PeerError> {
        // Every attempt of this delivery uploads under one id: a replica holding it holds our bytes
        // (or, asked first, the same bytes from an earlier delivery's build).
        let ours = upload_id.unwrap_or_else(Uuid::new_v4);
        let earlier = ask_first.then_some(ours);
        let mut broken = 0;
        let mut attempt = 0;
        let mut furthest = 0;
        // A commit was sent and its answer lost: the waits after an unanswered commit apply.
        let mut unanswered = false;
        // ... whatever the waits: a give-up no longer ends the delivery before it asked.
        let mut committing = false;
        loop {
            let mut commit_sent = false;
            let result = async {
                let mut resume = None;
                // The whole log reached the replica but its answer was lost: commit it.
                let mut uploaded = None;
                if attempt > 0 || earlier.is_some() {
                    let asked = match session
                        .json::<(), LogStatus>(Route::LogStatus(vm, sequence), None)
                        .await
                    {
                        // Still no connection: the next quick retry reconnects.
                        Err(e) if e.is_network() => return Err(e),
                        asked => asked,
                    };
                    if let Ok((_, s)) = asked {
                        if let (1, Some(id)) = (s.state, s.upload_id) {
                            // Continue where the replica's whole records end, if its bytes are ours.
                            let same = if log.is_memory() {
                                id == ours
                            } else if let Some(theirs) = &s.prefix_hash {
                                let here = own_prefix_hash(file.to_path_buf(), s.offset).await;
                                here.as_deref() == Some(theirs.as_str())
                            } else {
                                false
                            };
                            if s.offset > 0 && same {
                                tracing::info!(%vm, sequence, offset = s.offset, "resuming the upload");
                                resume = Some((id, s.offset));
                            }
                        }
                        if s.state == TransferState::Uploaded as u16
                            && (!log.is_memory() || s.upload_id == Some(ours))
                        {
                            // All of it arrived, so the writer is done or about to be (an earlier
                            // delivery's: this build writes it without sending any of it).
                            if earlier.is_some() {
                                log.skip_to(u64::MAX);
                            }
                            let (log_hash, _) = ended(&log).await?;
                            if s.log_hash.as_deref() == Some(log_hash.as_str()) {
                                tracing::info!(%vm, sequence, "the log had arrived whole; committing it");
                                uploaded = Some(s.clone());
                            } else if earlier.is_some() {
                                return Err(PeerError::Local(format!(
                                    "the replica holds log {sequence} whole from an earlier delivery, whose bytes differ from this build's: the disks changed since; it must be sent again from its start"
                                )));
                            }
                        }
                        let (log_hash, _) = if s.state >= TransferState::Committed as u16 {
                            if log.is_memory() {
                                // Never wait here: an unfinished in-memory log waits for an upload
                                // (one not yet complete cannot be this committed log anyway).
                                log.end().and_then(Result::ok).unwrap_or_default()
                            } else {
                                ended(&log).await?
                            }
                        } else {
                            (String::new(), 0)
                        };
                        if s.state >= TransferState::Committed as u16 {
                            if s.log_hash.as_deref() == Some(log_hash.as_str()) {
                                return Ok(s);
                            }
                            return Err(PeerError::Refused(Box::new(ErrorDetail::new(
                                ErrorCode::SequenceConflict,
                                format!("log {sequence} was committed with another hash"),
                            ))));
                        }
                    }
                }
                let from = resume.map_or(0, |(_, k)| k);
                // What the replica holds is not sent again. An earlier delivery's build has yet to
                // write it: the upload starts once it has, since waiting that long for its next
                // byte would meet the replica's idle limit.
                log.skip_to(from);
                while log.written() < from && log.end().is_none() {
                    if patience.gave_up() {
                        return Err(PeerError::Local("the delivery was cancelled".into()));
                    }
                    log.wait().await;
                }
                if uploaded.is_none() && from < log.kept_from() {
                    return Err(PeerError::Local(format!(
                        "the replica holds {from} bytes of log {sequence}, and this host no longer holds its bytes before {}: the log must be sent again from its start",
                        log.kept_from()
                    )));
                }
                let status = match uploaded {
                    Some(s) => Ok(s),
                    None => {
                        session
                            .upload_log(
                                vm,
                                sequence,
                                file,
                                log.clone(),
                                progress.clone(),
                                resume.unwrap_or((ours, 0)),
                            )
                            .await
                    }
                };
                let status = match status {
                    Ok(status) => status,
                    // A log that could not be written explains the failed upload better than the
                    // upload; otherwise the upload's error (not waiting for the rest of the log: an
                    // in-memory log's writer waits for an upload that is over).
                    Err(e) => match log.end() {
                        Some(Err(why)) => {
                            return Err(PeerError::Local(format!("reading the log failed: {why}")))
                        }
                        _ => return Err(e),
                    },
                };
                if status.state != TransferState::Uploaded as u16 {
                    // Not waiting for the log's end: an answer without the body read (a log
                    // committed meanwhile) leaves an in-memory log's writer waiting for room.
                    return Err(PeerError::Protocol(format!(
                        "the recovery server did not confirm log {sequence} (state {})",
                        status.state
                    )));
                }
                let (log_hash, log_bytes) = ended(&log).await?;
                let confirmed = status.state == TransferState::Uploaded as u16
                    && status.log_hash.as_deref() == Some(log_hash.as_str());
                let Some(upload_id) = status.upload_id.filter(|_| confirmed) else {
                    return Err(PeerError::Protocol(format!(
                        "the recovery server did not confirm log {sequence} (state {})",
                        status.state
                    )));
                };
                let commit = protocol::Commit {
                    upload_id,
                    log_hash,
                    log_bytes,
                    wait_applied,
                    // A replica without the capability would refuse the field.
                    resync: resync && session.has("resync-commit"),
                };
                // The replica answers a commit that waits for the apply within 600 s.
                let limit = if wait_applied {
                    Duration::from_secs(620)
                } else {
                    REQUEST_TIMEOUT
                };
                commit_sent = true;
                let (_, done) = session
                    .json_within::<_, LogStatus>(Route::CommitLog(vm, sequence), Some(&commit), limit)
                    .await?;
                Ok(done)
            }
            .await;
            match result {
                Ok(status) => {
                    return Ok(Delivered {
                        status,
                        broken_connections: broken,
                    })
                }
                Err(e) if e.is_network() => {
                    if patience.per_outage && log.furthest_sent() > furthest {
                        // That attempt got further: this outage gets all the waits.
                        furthest = log.furthest_sent();
                        attempt = 0;
                    }
                    committing |= commit_sent;
                    if commit_sent && !unanswered && patience.unanswered.is_some() {
                        // Whether the log is committed only the recovery server can say: asked
                        // from now on with the waits after an unanswered commit.
                        unanswered = true;
                        attempt = 0;
                    }
                    if !patience.has(attempt, (unanswered, committing)) {
                        return Err(e);
                    }
                    broken += 1;
                    if unanswered {
                        tracing::info!(%vm, sequence, "the connection broke after the commit was sent ({}); asking whether it was committed", crate::error_chain(&e));
                    } else {
                        tracing::info!(%vm, sequence, "the connection broke ({}); sending again", crate::error_chain(&e));
                    }
                    if !patience.wait(attempt, (unanswered, committing)).await {
                        return Err(e);
                    }
                    attempt += 1;
                    match self.connect(target).await {
                        Ok(_) if patience.stops(committing) => return Err(e),
                        // The recovery server was upgraded or downgraded meanwhile: the log, in
                        // the format of the first connection, is built again by the next try.
                        Ok(s) if s.hello.log_format_version != session.hello.log_format_version => {
                            return Err(PeerError::Protocol(format!(
                                "the recovery server now agrees on log format {} (this log is in format {}): it is built again",
                                s.hello.log_format_version, session.hello.log_format_version
                            )));
                        }
                        Ok(s) => *session = s,
                        Err(e)
                            if e.is_network()
                                && patience.has(attempt, (unanswered, committing)) =>
                        {
                            broken += 1;
                            // The next round tries again on the old (broken) session and reconnects.
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn address(&self, t: &Target) -> Result<SocketAddr, PeerError> {
        if let Some(r) = self.resolve.get(&t.host.to_ascii_lowercase()) {
            return Ok(SocketAddr::new(r.ip, r.port.unwrap_or(t.port)));
        }
        let mut addrs = tokio::net::lookup_host((t.host.as_str(), t.port))
            .await
            .map_err(|e| PeerError::Resolve(format!("{}: {e}", t.host)))?;
        addrs
            .next()
            .ok_or_else(|| PeerError::Resolve(t.host.clone()))
    }

    /// Connects, authenticates both ways and says hello.
    pub async fn connect(&self, t: &Target) -> Result<Session, PeerError> {
        let config = client_config(&self.cert_dir, &t.thumbprint)
            .map_err(|e| PeerError::Certificate(crate::error_chain(&e)))?;
        let addr = self.address(t).await?;
        let shown = format!("{}:{} ({addr})", t.host, t.port);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| PeerError::Timeout(shown.clone()))?
            .map_err(|e| PeerError::Connect {
                addr: shown.clone(),
                why: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::try_from(t.host.clone())
            .map_err(|e| PeerError::Resolve(format!("{}: {e}", t.host)))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| PeerError::Timeout(shown.clone()))?
            .map_err(|e| PeerError::Tls {
                host: t.host.clone(),
                why: e.to_string(),
            })?;
        let mut tls = tls;
        let mut first = vec![0u8; 256];
        let refused = |why: String| PeerError::Tls {
            host: t.host.clone(),
            why: format!("the recovery server refused this host's certificate: {why}"),
        };
        let n = match tokio::time::timeout(CONNECT_TIMEOUT, tls.read(&mut first)).await {
            Err(_) => return Err(PeerError::Timeout(shown)),
            Ok(Err(e)) => return Err(refused(e.to_string())),
            Ok(Ok(0)) => return Err(refused("it closed the connection".into())),
            Ok(Ok(n)) => n,
        };
        first.truncate(n);
        let tls = Prefixed {
            prefix: Bytes::from(first),
            inner: tls,
        };
        let (send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .initial_stream_window_size(8 << 20)
                .initial_connection_window_size(32 << 20)
                .max_send_buf_size(4 << 20)
                .max_frame_size(1 << 20)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| PeerError::Tls {
                    host: t.host.clone(),
                    why: crate::error_chain(&e),
                })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("replication connection closed: {e}");
            }
        });
        let mut session = Session {
            send,
            authority: format!("{}:{}", t.host, t.port),
            bandwidth: self.bandwidth.clone(),
            hello: placeholder_hello(),
        };
        let hello = Hello {
            protocol_versions: PROTOCOL_VERSIONS.to_vec(),
            log_format_versions: wire::limits::FORMAT_VERSIONS.to_vec(),
            capabilities: protocol::CAPABILITIES
                .iter()
                .map(|c| c.to_string())
                .collect(),
            product: format!("vmreplica {}", env!("CARGO_PKG_VERSION")),
            host: self.host.clone(),
        };
        let (_, answer) = session
            .json::<_, HelloResponse>(Route::Hello, Some(&hello))
            .await?;
        if !PROTOCOL_VERSIONS.contains(&answer.protocol_version) {
            return Err(PeerError::Protocol(format!(
                "the recovery server chose protocol version {}",
                answer.protocol_version
            )));
        }
        if !wire::limits::FORMAT_VERSIONS.contains(&answer.log_format_version) {
            return Err(PeerError::Protocol(format!(
                "the recovery server chose log format version {}",
                answer.log_format_version
            )));
        }
        if answer.log_format_version < wire::limits::FORMAT_VERSION {
            tracing::debug!(
                server = %session.authority,
                log_format = answer.log_format_version,
                "the recovery server reads an older log format: logs to it are written in that one"
            );
        }
        session.hello = answer;
        Ok(session)
    }
}

fn placeholder_hello() -> HelloResponse {
    HelloResponse {
        protocol_version: 1,
        log_format_version: wire::limits::FORMAT_VERSION,
        capabilities: Vec::new(),
        product: String::new(),
        host: String::new(),
        authorized_as: String::new(),
        trust_group: String::new(),
        limits: protocol::Limits {
            max_json_bytes: 0,
            max_log_bytes: 0,
            max_parallel_uploads: 0,
            max_pending_apply: 0,
            compare_block_sizes: Vec::new(),
            max_compare_blocks: 0,
            idle_timeout_secs: 0,
        },
    }
}

/// The error an answer with HTTP status `status` (400 or more) and body `body` stands for.
fn refused(status: u16, body: &[u8]) -> PeerError {
    match decode::<ErrorBody>(body) {
        Ok(err) => PeerError::Refused(Box::new(err.error)),
        Err(e) => PeerError::Protocol(format!("HTTP {status} with an unreadable error: {e}")),
    }
}

impl Session {
    fn request(&self, route: Route) -> hyper::http::request::Builder {
        hyper::Request::builder()
            .method(route.method())
            .uri(format!("https://{}{}", self.authority, route.path()))
    }

    async fn send(
        &mut self,
        req: hyper::Request<WireBody>,
        timeout: Option<Duration>,
    ) -> Result<(u16, Bytes), PeerError> {
        self.send_limited(req, timeout, MAX_ANSWER).await
    }

    /// A GET of a binary resource of up to `max` bytes, handed to `sink` piece by piece as it
    /// arrives, so nothing of it is held here. There is no limit on the whole, which a large answer
    /// over a slow link would need to grow with it: the answer must begin, and each piece follow
    /// the one before, within the request limit. Returns the bytes received.
    pub async fn fetch_into(
        &mut self,
        route: Route,
        max: u64,
        mut sink: impl FnMut(&[u8]) -> Result<(), PeerError>,
    ) -> Result<u64, PeerError> {
        let req = self
            .request(route)
            .body(WireBody::bytes(Bytes::new()))
            .map_err(|e| PeerError::Protocol(e.to_string()))?;
        let authority = self.authority.clone();
        let timeout = || PeerError::Timeout(authority.clone());
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, async {
            self.send
                .ready()
                .await
                .map_err(|e| PeerError::Http(crate::error_chain(&e)))?;
            self.send
                .send_request(req)
                .await
                .map_err(|e| PeerError::Http(crate::error_chain(&e)))
        })
        .await
        .map_err(|_| timeout())??;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        if status >= 400 {
            let answer = tokio::time::timeout(
                REQUEST_TIMEOUT,
                http_body_util::Limited::new(body, MAX_ANSWER).collect(),
            )
            .await
            .map_err(|_| timeout())?
            .map_err(|e| PeerError::Http(e.to_string()))?
            .to_bytes();
            return Err(refused(status, &answer));
        }
        let mut received = 0u64;
        loop {
            let frame = tokio::time::timeout(REQUEST_TIMEOUT, body.frame())
                .await
                .map_err(|_| timeout())?;
            let Some(frame) = frame else {
                return Ok(received);
            };
            let frame = frame.map_err(body_error)?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            received += data.len() as u64;
            if received > max {
                return Err(PeerError::Protocol(format!(
                    "an answer longer than the {max} bytes it may have"
                )));
            }
            sink(&data)?;
        }
    }

    async fn send_limited(
        &mut self,
        req: hyper::Request<WireBody>,
        timeout: Option<Duration>,
        max: usize,
    ) -> Result<(u16, Bytes), PeerError> {
        let authority = self.authority.clone();
        let exchange = async {
            self.send
                .ready()
                .await
                .map_err(|e| PeerError::Http(crate::error_chain(&e)))?;
            let resp = self
                .send
                .send_request(req)
                .await
                .map_err(|e| PeerError::Http(crate::error_chain(&e)))?;
            let status = resp.status().as_u16();
            let body = http_body_util::Limited::new(resp.into_body(), max)
                .collect()
                .await
                .map_err(|e| PeerError::Http(e.to_string()))?
                .to_bytes();
            Ok::<_, PeerError>((status, body))
        };
        let (status, body) = match timeout {
            Some(t) => tokio::time::timeout(t, exchange)
                .await
                .map_err(|_| PeerError::Timeout(authority))??,
            None => exchange.await?,
        };
        if status >= 400 {
            return Err(refused(status, &body));
        }
        Ok((status, body))
    }

    /// A JSON request; the answer's status and decoded body.
    pub async fn json<B: Serialize, R: DeserializeOwned + Validate>(
        &mut self,
        route: Route,
        body: Option<&B>,
    ) -> Result<(u16, R), PeerError> {
        self.json_within(route, body, REQUEST_TIMEOUT).await
    }

    /// [`Session::json`] with another end-to-end limit (a commit that waits for the apply).
    pub async fn json_within<B: Serialize, R: DeserializeOwned + Validate>(
        &mut self,
        route: Route,
        body: Option<&B>,
        limit: Duration,
    ) -> Result<(u16, R), PeerError> {
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| PeerError::Protocol(e.to_string()))?,
            None => Vec::new(),
        };
        let req = self
            .request(route)
            .header("content-type", "application/json")
            .body(WireBody::bytes(bytes))
            .map_err(|e| PeerError::Protocol(e.to_string()))?;
        let (status, answer) = self.send(req, Some(limit)).await?;
        let value = decode::<R>(&answer).map_err(|e| PeerError::Protocol(e.to_string()))?;
        Ok((status, value))
    }

    /// A binary request (a compare range); the answer's body.
    pub async fn binary(
        &mut self,
        route: Route,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<Bytes, PeerError> {
        let req = self
            .request(route)
            .header("content-type", content_type)
            .body(WireBody::bytes(body))
            .map_err(|e| PeerError::Protocol(e.to_string()))?;
        Ok(self.send(req, Some(REQUEST_TIMEOUT)).await?.1)
    }

    /// Streams log `sequence` as the writer fills it (`log`: from `file`, or from memory), under
    /// `upload` (the upload's id and the offset to start at: 0, or to resume, the replica's offset
    /// under the interrupted upload's id); returns the answer.
    pub async fn upload_log(
        &mut self,
        vm: Uuid,
        sequence: u64,
        file: &Path,
        log: Arc<GrowingLog>,
        progress: Progress,
        upload: (Uuid, u64),
    ) -> Result<LogStatus, PeerError> {
        let (upload_id, start) = upload;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let path = file.to_path_buf();
        let growing = log.clone();
        let bandwidth = self.bandwidth.clone();
        let reader = if log.is_memory() {
            tokio::spawn(send_from_memory(
                log.clone(),
                start,
                tx,
                bandwidth,
                progress,
            ))
        } else {
            tokio::spawn(async move {
                // The writer may not have created the file yet.
                let mut opened = tokio::fs::File::open(&path).await;
                for _ in 0..2000 {
                    match &opened {
                        Err(e)
                            if e.kind() == std::io::ErrorKind::NotFound
                                && growing.end().is_none() =>
                        {
                            growing.wait().await;
                            opened = tokio::fs::File::open(&path).await;
                        }
                        _ => break,
                    }
                }
                let f = match opened {
                    Ok(f) => Arc::new(f.into_std().await),
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let mut sent = start;
                loop {
                    // Registered before `written` is read, so a write right after is not missed.
                    let more = growing.changed.notified();
                    tokio::pin!(more);
                    more.as_mut().enable();
                    let written = growing.written();
                    if sent >= written {
                        if over_at_end(&growing, sent, &tx, more).await {
                            return;
                        }
                        continue;
                    }
                    let capped = bandwidth.capped();
                    let chunk = if capped { SLICE } else { CHUNK };
                    let want = usize::try_from(written - sent).unwrap_or(chunk).min(chunk);
                    // Read with pread on the blocking pool straight into the chunk sent (tokio's File
                    // would read into its own buffer and copy).
                    let (file, at) = (f.clone(), sent);
                    let read = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; want];
                        let mut n = 0;
                        while n < want {
                            match std::os::unix::fs::FileExt::read_at(
                                &*file,
                                &mut buf[n..],
                                at + n as u64,
                            ) {
                                Ok(0) => break,
                                Ok(k) => n += k,
                                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                                Err(e) => return Err(e),
                            }
                        }
                        buf.truncate(n);
                        Ok(buf)
                    })
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                    match read.map(|buf| (buf.len(), buf)) {
                        Ok((0, _)) => growing.wait().await,
                        Ok((n, buf)) => {
                            sent += n as u64;
                            if capped {
                                bandwidth.take(n).await;
                            }
                            if tx.send(Ok(Bytes::from(buf))).await.is_err() {
                                return;
                            }
                            let total = growing.end().and_then(Result::ok).map_or(0, |(_, l)| l);
                            progress(sent, total);
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
            })
        };
        let known = log.end().and_then(Result::ok);
        let mut req = self
            .request(Route::UploadLog(vm, sequence))
            .header("content-type", protocol::LOG_CONTENT_TYPE)
            .header(headers::UPLOAD_ID, upload_id.to_string())
            .header(headers::UPLOAD_OFFSET, start.to_string());
        if let Some((hash, len)) = &known {
            req = req
                .header(headers::LOG_LENGTH, len.to_string())
                .header(headers::LOG_HASH, hash.as_str());
        }
        let req = req
            .body(WireBody::Stream(rx))
            .map_err(|e| PeerError::Protocol(e.to_string()))?;
        // The reader stops with the request, also when this future is dropped (a stopped cycle).
        let _reader = AbortOnDrop(reader);
        let (_, answer) = self.send(req, None).await?;
        decode::<LogStatus>(&answer).map_err(|e| PeerError::Protocol(e.to_string()))
    }
}

/// An error while an answer's body arrived. The recovery server resetting that one stream (e.g.
/// its read of what it sends failed) on a connection still up is its answer, not a broken
/// connection: `Protocol`, not retried over a new connection as `Http` is.
fn body_error(e: hyper::Error) -> PeerError {
    let reset = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h| h.is_remote() && h.is_reset());
    let text = crate::error_chain(&e);
    match reset {
        true => PeerError::Protocol(format!("the recovery server broke off its answer: {text}")),
        false => PeerError::Http(text),
    }
}

/// Aborts its task when dropped.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// At the end of what is written so far: true when the upload is over (the log complete and all of
/// it sent, or failed: its error handed to `tx`); else waits a little for more (`more`) and says no.
async fn over_at_end(
    log: &GrowingLog,
    sent: u64,
    tx: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    more: Pin<&mut tokio::sync::futures::Notified<'_>>,
) -> bool {
    match log.end() {
        Some(Ok((_, len))) if sent >= len => true,
        Some(Err(why)) => {
            let _ = tx.send(Err(std::io::Error::other(why))).await;
            true
        }
        _ => {
            let _ = tokio::time::timeout(Duration::from_millis(5), more).await;
            false
        }
    }
}

/// Feeds an in-memory log from offset `sent` to `tx` in pieces of at most [`CHUNK`] (or
/// [`SLICE`] under a bandwidth cap), as the writer adds them, without copying.
async fn send_from_memory(
    log: Arc<GrowingLog>,
    mut sent: u64,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    bandwidth: Arc<super::bandwidth::Bandwidth>,
    progress: Progress,
) {
    loop {
        // Registered before the log is looked at, so a write right after is not missed.
        let more = log.changed.notified();
        tokio::pin!(more);
        more.as_mut().enable();
        let capped = bandwidth.capped();
        let chunk = if capped { SLICE } else { CHUNK };
        match log.take(sent, chunk) {
            Taken::Bytes(piece) => {
                let n = piece.len();
                sent += n as u64;
                if capped {
                    bandwidth.take(n).await;
                }
                if tx.send(Ok(piece)).await.is_err() {
                    return;
                }
                let total = log.end().and_then(Result::ok).map_or(0, |(_, l)| l);
                progress(sent, total);
            }
            Taken::Gone(kept) => {
                let why = format!("bytes {sent}..{kept} of the log are no longer kept");
                let _ = tx.send(Err(std::io::Error::other(why))).await;
                return;
            }
            Taken::NotYet => {
                if over_at_end(&log, sent, &tx, more).await {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    /// The client's error reading an HTTP/2 answer over an in-memory connection after its first
    /// piece, when the server's body fails (hyper resets the stream) or the connection is cut.
    async fn answer_error(cut_connection: bool) -> PeerError {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let body = std::sync::Mutex::new(Some(rx));
        let service = hyper::service::service_fn(move |_req| {
            let rx = body.lock().unwrap().take().expect("one request");
            async move { Ok::<_, std::convert::Infallible>(hyper::Response::new(WireBody::Stream(rx))) }
        });
        let server = tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server_io), service),
        );
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, WireBody>(TokioIo::new(client_io))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = hyper::Request::get("http://peer/")
            .body(WireBody::bytes(Bytes::new()))
            .expect("request");
        let mut answer = send.send_request(req).await.expect("answer").into_body();
        tx.send(Ok(Bytes::from_static(b"a first piece")))
            .await
            .expect("send");
        let first = answer.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().expect("data"), &b"a first piece"[..]);
        if cut_connection {
            server.abort(); // drops the server's end of the connection
        } else {
            // The server's read of what it sends fails: hyper resets that stream.
            tx.send(Err(std::io::Error::other("the disk failed")))
                .await
                .expect("send");
        }
        loop {
            match answer.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return body_error(e),
                None => panic!("the answer ended without an error"),
            }
        }
    }

    #[tokio::test]
    async fn a_stream_the_peer_reset_is_its_answer_and_a_broken_connection_is_not() {
        let reset = answer_error(false).await;
        assert!(matches!(reset, PeerError::Protocol(_)), "{reset:?}");
        assert!(!reset.is_network());
        let cut = answer_error(true).await;
        assert!(matches!(cut, PeerError::Http(_)), "{cut:?}");
        assert!(cut.is_network());
    }
}
