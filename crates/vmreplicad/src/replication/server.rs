//! The recovery server's listener (docs/protocol.md §2): HTTP/2 over TLS 1.3 with a mandatory client
//! certificate, on `HttpsPort`, running while `RecoveryServerEnabled` and certificate
//! authentication are set. A supervisor task (re)binds it whenever `ModifyServiceSettings` changes
//! what it should be; every request is authorized (§2.3) before its handler runs.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::body::WireBody;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::sync::Notify;
use vmreplica_core::settings::{AuthorizationEntry, ServiceSettings};
use wire::protocol::{ErrorCode, ErrorDetail, RefusalReason, Route, RouteError};

use super::peer_certs::{dns_names, sha1_thumbprint};
use super::replica::{ApiError, ReplicaSide};
use super::tls::{client_verifier, server_config};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::CertificateDer;

/// What the listener should be: bound to this port with this certificate, trusting the CAs of
/// these files (a CA taken out of `certs/trusted/` is not trusted by connections made after the
/// next check, within 10 s).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    port: u16,
    thumbprint: String,
    trusted: Vec<(std::path::PathBuf, u64, Option<std::time::SystemTime>)>,
}

fn wanted(s: &ServiceSettings, cert_dir: &std::path::Path) -> Option<Wanted> {
    let certificate = matches!(s.allowed_authentication_type, 2 | 3);
    match (
        &s.certificate_thumbprint,
        s.recovery_server_enabled && certificate,
    ) {
        (Some(t), true) if !t.is_empty() => Some(Wanted {
            port: s.https_port,
            thumbprint: t.clone(),
            trusted: super::peer_certs::trusted_files(cert_dir),
        }),
        _ => None,
    }
}

/// Handle used to tell the supervisor the service settings changed.
#[derive(Clone, Default)]
pub struct ListenerControl {
    changed: Arc<Notify>,
}

impl ListenerControl {
    pub fn settings_changed(&self) {
        self.changed.notify_one();
    }
}

/// Runs the listener supervisor until the process ends.
pub fn spawn_supervisor(replica: Arc<ReplicaSide>, bind: IpAddr, control: ListenerControl) {
    tokio::spawn(async move {
        let mut current: Option<(Wanted, Listening)> = None;
        loop {
            let want = match replica.store.service_settings() {
                Ok(s) => wanted(&s, &replica.cert_dir),
                Err(e) => {
                    tracing::error!(
                        "cannot read the service settings: {}",
                        crate::error_chain(&e)
                    );
                    current.as_ref().map(|c| c.0.clone())
                }
            };
            // The trusted CAs changed: an open connection goes on while its peer's chain is still
            // trusted (an upload is not cut for another CA's change), and is closed at once
            // otherwise, or when none can be read (no CA left, say), whether or not the listener
            // goes on (`cut_if_untrusted`). If only they changed, the listener goes on and new
            // connections are checked against them.
            if let (Some((have, l)), Some(w)) = (current.as_mut(), &want) {
                if have.trusted != w.trusted {
                    let verifier = client_verifier(&replica.cert_dir)
                        .inspect_err(|e| {
                            tracing::error!("the trusted CAs changed and cannot be read: {e}")
                        })
                        .ok();
                    l.trust.send_replace(verifier.clone());
                    let retrust = have.port == w.port
                        && have.thumbprint == w.thumbprint
                        && !l.task.is_finished();
                    // (Without a verifier, the listener stops below, and is tried again.)
                    if let (true, Some(verifier)) = (retrust, verifier) {
                        match server_config(&replica.cert_dir, &w.thumbprint, verifier) {
                            Ok(config) => {
                                *l.config.write().unwrap_or_else(|p| p.into_inner()) = config;
                                have.trusted = w.trusted.clone();
                                tracing::info!(
                                    port = w.port,
                                    "the trusted CAs changed: new connections are checked against them, and open ones again"
                                );
                            }
                            Err(e) => tracing::error!(
                                "the listener's TLS configuration cannot be built again: {e}"
                            ),
                        }
                    }
                }
            }
            let same = match (&current, &want) {
                (Some((have, l)), Some(w)) => have == w && !l.task.is_finished(),
                (None, None) => true,
                _ => false,
            };
            if !same {
                if let Some((have, l)) = current.take() {
                    l.task.abort();
                    // Open connections get GOAWAY: what they are doing ends, nothing new starts.
                    let _ = l.stop.send(true);
                    // The socket is closed once the task is gone: the port can be bound again.
                    let _ = l.task.await;
                    tracing::info!(
                        port = have.port,
                        "replication listener stopped; its connections drain for at most {} s",
                        DRAIN.as_secs()
                    );
                }
                if let Some(w) = want {
                    match start(replica.clone(), bind, &w).await {
                        Ok(task) => current = Some((w, task)),
                        Err(e) => tracing::error!(
                            port = w.port,
                            "the replication listener cannot start: {e:#}"
                        ),
                    }
                }
            }
            // Settings changes wake us at once; the periodic check retries a listener that could
            // not start (a certificate copied in later, a port freed) and notices a change of the
            // trusted CAs.
            let _ = tokio::time::timeout(Duration::from_secs(10), control.changed.notified()).await;
        }
    });
}

const MAX_CONNECTIONS: usize = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopped listener's connections may finish what they do (docs/protocol.md §2.1).
const DRAIN: Duration = Duration::from_secs(30);

/// A running listener: its accept loop, the signal that makes its connections drain, the TLS
/// configuration each new connection is accepted with, and the verifier of the trusted CAs that
/// open connections check their peer against again when it changes.
struct Listening {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
    config: Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>,
    trust: tokio::sync::watch::Sender<Option<Arc<dyn ClientCertVerifier>>>,
}

async fn start(replica: Arc<ReplicaSide>, bind: IpAddr, w: &Wanted) -> anyhow::Result<Listening> {
    let verifier = client_verifier(&replica.cert_dir)?;
    let config = server_config(&replica.cert_dir, &w.thumbprint, verifier.clone())?;
    let addr = SocketAddr::new(bind, w.port);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, thumbprint = %w.thumbprint, "replication listener serving HTTP/2 over TLS 1.3");
    let config = Arc::new(std::sync::RwLock::new(config));
    let shared = config.clone();
    let (trust, _) = tokio::sync::watch::channel(Some(verifier));
    let trusted = trust.clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (tcp, addr) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(handshaking) = Place::take(
                &HANDSHAKING_BY_ADDRESS,
                &addr.ip().to_string(),
                MAX_HANDSHAKES_PER_ADDRESS,
            ) else {
                tracing::debug!(peer = %addr, "closed: {MAX_HANDSHAKES_PER_ADDRESS} handshakes from this address already");
                continue; // (the connection and the listener's place go at once)
            };
            // Watched before the configuration is read: a change after it is seen by the
            // connection, whichever configuration it was accepted with.
            let trust = trusted.subscribe();
            let acceptor = tokio_rustls::TlsAcceptor::from(
                shared.read().unwrap_or_else(|p| p.into_inner()).clone(),
            );
            let (replica, stopped) = (replica.clone(), stopped.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let watched = (stopped, trust);
                serve_connection(replica, acceptor, tcp, addr, watched, handshaking).await;
            });
        }
    });
    Ok(Listening {
        task,
        stop,
        config,
        trust,
    })
}

/// Who is on the other end of one connection, from its verified certificate.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub names: Vec<String>,
    pub thumbprint: String,
}

async fn serve_connection(
    replica: Arc<ReplicaSide>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    (mut stopped, trust): (
        tokio::sync::watch::Receiver<bool>,
        tokio::sync::watch::Receiver<Option<Arc<dyn ClientCertVerifier>>>,
    ),
    handshaking: Place,
) {
    let _ = tcp.set_nodelay(true);
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
    drop(handshaking);
    // The chain is checked again at this time when the trusted CAs change: only they decide.
    let verified_at = rustls_pki_types::UnixTime::now();
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::info!(peer = %addr, "connection closed before the TLS handshake ended");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(peer = %addr, "replication peer refused at the TLS handshake: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(peer = %addr, "TLS handshake timed out");
            return;
        }
    };
    let Some(chain) = stream
        .get_ref()
        .1
        .peer_certificates()
        .filter(|c| !c.is_empty())
        .map(|c| c.iter().map(|d| d.clone().into_owned()).collect::<Vec<_>>())
    else {
        return; // the verifier requires one; nothing to serve otherwise
    };
    let peer = Arc::new(Peer {
        addr,
        names: dns_names(&chain[0]),
        thumbprint: sha1_thumbprint(&chain[0]),
    });
    let key = peer
        .names
        .first()
        .map_or_else(|| peer.thumbprint.clone(), |n| n.to_ascii_lowercase());
    let Some(_place) = Place::take(&OPEN_BY_PRIMARY, &key, MAX_CONNECTIONS_PER_PRIMARY) else {
        tracing::warn!(peer = %addr, host = %key, "refused: more than {MAX_CONNECTIONS_PER_PRIMARY} connections from one primary host");
        return;
    };
    let who = peer.clone();
    let service = hyper::service::service_fn(move |req| {
        let (replica, peer) = (replica.clone(), peer.clone());
        async move { Ok::<_, Infallible>(handle(&replica, &peer, req).await) }
    });
    let io = hyper_util::rt::TokioIo::new(stream);
    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(32)
        .max_header_list_size(16 * 1024)
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(32 << 20)
        .max_send_buf_size(4 << 20)
        .max_frame_size(1 << 20)
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .serve_connection(io, service);
    tokio::pin!(conn);
    // The trusted CAs changed and no longer include this peer's: the connection is closed at
    // once, uploads in flight included (the primary is refused at its next handshake), also
    // while it drains. Looked at first: a CA taken out can stop the listener at the same time.
    let cut = cut_if_untrusted(trust, &chain, verified_at);
    tokio::pin!(cut);
    let closed = |e: String| {
        tracing::warn!(peer = %addr, names = ?who.names, thumbprint = %who.thumbprint, "replication connection closed: its certificate is no longer trusted ({e})");
    };
    let served = tokio::select! {
        biased;
        e = &mut cut => return closed(e),
        r = conn.as_mut() => r,
        // The listener stopped (or went away): GOAWAY, then at most DRAIN for the streams open.
        () = async { drop(stopped.wait_for(|s| *s).await) } => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                biased;
                e = &mut cut => return closed(e),
                r = tokio::time::timeout(DRAIN, conn.as_mut()) => match r {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::info!(peer = %addr, "replication connection closed: still busy {} s after its listener stopped", DRAIN.as_secs());
                        return;
                    }
                },
            }
        }
    };
    if let Err(e) = served {
        tracing::info!(peer = %addr, "replication connection ended: {}", crate::error_chain(&e));
    }
}

/// Resolves when the trusted CAs change and `chain` (an open connection's peer, verified at
/// `at`) no longer verifies against them as of `at`, or none can be read, with why; never while
/// it does, nor once the listener is gone. (As of `at`: a certificate that expired since is not
/// cut for another CA's change.)
async fn cut_if_untrusted(
    mut trust: tokio::sync::watch::Receiver<Option<Arc<dyn ClientCertVerifier>>>,
    chain: &[CertificateDer<'static>],
    at: rustls_pki_types::UnixTime,
) -> String {
    while trust.changed().await.is_ok() {
        let Some(verifier) = trust.borrow_and_update().clone() else {
            return "no trusted CA can be read".into();
        };
        if let Err(e) = verifier.verify_client_cert(&chain[0], &chain[1..], at) {
            return e.to_string();
        }
    }
    std::future::pending().await
}

/// Refusals logged per (peer IP, reason): at most one line a minute, with the count of those not
/// logged since (docs/protocol.md §2.3), so a peer retrying in a loop cannot flood the log.
fn refusal_log_due(ip: IpAddr, reason: &'static str) -> Option<u64> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    /// (peer IP, reason) → (last line logged, refusals not logged since).
    type Seen = HashMap<(IpAddr, &'static str), (std::time::Instant, u64)>;
    static SEEN: Mutex<Option<Seen>> = Mutex::new(None);
    let mut guard = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    let now = std::time::Instant::now();
    if map.len() > 4096 {
        map.retain(|_, (t, _)| now.duration_since(*t) < Duration::from_secs(60));
    }
    match map.get_mut(&(ip, reason)) {
        Some((last, suppressed)) if now.duration_since(*last) < Duration::from_secs(60) => {
            *suppressed += 1;
            None
        }
        Some((last, suppressed)) => {
            let n = *suppressed;
            *last = now;
            *suppressed = 0;
            Some(n)
        }
        None => {
            map.insert((ip, reason), (now, 0));
            Some(0)
        }
    }
}

/// Connections per authenticated primary host (its certificate's names), docs/protocol.md §8.
const MAX_CONNECTIONS_PER_PRIMARY: usize = 8;

/// TLS handshakes in progress from one address at most: a client that opens connections and sends
/// nothing holds no more of the listener's places than this, whatever it does, so primaries
/// elsewhere still get in at once.
const MAX_HANDSHAKES_PER_ADDRESS: usize = 32;

type Counts = std::sync::Mutex<Option<std::collections::HashMap<String, usize>>>;

/// Open connections by the certificate's first DNS name.
static OPEN_BY_PRIMARY: Counts = std::sync::Mutex::new(None);
/// Handshakes in progress by the peer's IP address.
static HANDSHAKING_BY_ADDRESS: Counts = std::sync::Mutex::new(None);

/// One of at most `limit` places of `key` in a count; dropping it frees the place.
struct Place {
    counts: &'static Counts,
    key: String,
}

impl Place {
    fn take(counts: &'static Counts, key: &str, limit: usize) -> Option<Place> {
        let mut guard = counts.lock().unwrap_or_else(|p| p.into_inner());
        let map = guard.get_or_insert_with(std::collections::HashMap::new);
        let n = map.entry(key.to_string()).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(Place {
            counts,
            key: key.to_string(),
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut guard = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(map) = guard.as_mut() {
            if let Some(n) = map.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&self.key);
                }
            }
        }
    }
}

/// The best authorization entry for the peer's names (§2.3 step 2): exact FQDN over `*.domain` over
/// `*`, ties to the earlier name. Returns the entry and the name that matched.
pub fn best_entry<'a>(
    entries: &'a [AuthorizationEntry],
    names: &[String],
) -> Option<(&'a AuthorizationEntry, String)> {
    let rank = |e: &AuthorizationEntry| match e.allowed_primary_host_system.as_str() {
        "*" => 0,
        p if p.starts_with("*.") => 1,
        _ => 2,
    };
    let mut best: Option<(&AuthorizationEntry, String, u8)> = None;
    for name in names {
        for e in entries.iter().filter(|e| e.matches_host(name)) {
            let r = rank(e);
            if best.as_ref().is_none_or(|b| r > b.2) {
                best = Some((e, name.trim_end_matches('.').to_ascii_lowercase(), r));
            }
        }
    }
    best.map(|(e, n, _)| (e, n))
}

pub fn refusal(reason: RefusalReason, message: impl Into<String>) -> ApiError {
    let mut detail = ErrorDetail::new(ErrorCode::AccessDenied, message);
    detail.reason = Some(reason as u16);
    ApiError(Box::new(detail))
}

async fn handle(
    replica: &Arc<ReplicaSide>,
    peer: &Peer,
    req: Request<Incoming>,
) -> Response<WireBody> {
    let (method, path) = (
        req.method().as_str().to_string(),
        req.uri().path().to_string(),
    );
    let result = async {
        let route = Route::parse(&method, &path).map_err(|e| match e {
            RouteError::BadSegment { .. } => {
                ApiError::new(ErrorCode::BadRequest, format!("{method} {path}: {e}"))
            }
            RouteError::UnsupportedVersion(_) => replica.unsupported_version(&e.to_string()),
            RouteError::Unknown => ApiError::new(
                ErrorCode::UnknownResource,
                format!("{method} {path}: no such resource"),
            ),
        })?;
        let entries = replica
            .store
            .authorization_entries()
            .map_err(ApiError::internal)?;
        if peer.names.is_empty() {
            return Err(refusal(
                RefusalReason::NoCertificateName,
                "the client certificate carries no DNS name (subject alternative name)",
            ));
        }
        let Some((entry, name)) = best_entry(&entries, &peer.names) else {
            return Err(refusal(
                RefusalReason::NoMatchingEntry,
                format!(
                    "no authorization entry of this recovery server allows {}",
                    peer.names.join(", ")
                ),
            ));
        };
        replica
            .dispatch(route, entry.clone(), name, &peer.names, req)
            .await
    }
    .await;
    match result {
        Ok(resp) => resp,
        Err(err) => {
            let d = &err.0;
            if d.code == ErrorCode::AccessDenied as u16 {
                let reason = d
                    .reason
                    .and_then(RefusalReason::from_u16)
                    .map_or("?", RefusalReason::name);
                if let Some(suppressed) = refusal_log_due(peer.addr.ip(), reason) {
                    tracing::warn!(peer = %peer.addr, thumbprint = %peer.thumbprint, names = ?peer.names, reason, %method, %path, suppressed, "replication request refused: {}", d.message);
                }
            } else if d.code == ErrorCode::Internal as u16 {
                tracing::error!(peer = %peer.addr, %method, %path, "{}", d.message);
            } else {
                tracing::info!(peer = %peer.addr, %method, %path, code = d.name, "{}", d.message);
            }
            err.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(host: &str, group: &str) -> AuthorizationEntry {
        AuthorizationEntry {
            allowed_primary_host_system: host.into(),
            trust_group: group.into(),
            replica_storage_location: "/srv".into(),
        }
    }

    #[test]
    fn refusals_of_one_peer_and_reason_are_logged_once_a_minute() {
        let ip: IpAddr = "192.0.2.77".parse().unwrap();
        assert_eq!(refusal_log_due(ip, "NoMatchingEntry"), Some(0));
        assert_eq!(refusal_log_due(ip, "NoMatchingEntry"), None);
        assert_eq!(refusal_log_due(ip, "NoMatchingEntry"), None);
        assert_eq!(
            refusal_log_due(ip, "EntryRemoved"),
            Some(0),
            "another reason is its own line"
        );
    }

    #[test]
    fn a_primary_host_gets_at_most_eight_connections() {
        let places: Vec<_> = (0..MAX_CONNECTIONS_PER_PRIMARY)
            .map(|_| {
                Place::take(
                    &OPEN_BY_PRIMARY,
                    "p9.lab.example",
                    MAX_CONNECTIONS_PER_PRIMARY,
                )
                .expect("a place")
            })
            .collect();
        assert!(Place::take(
            &OPEN_BY_PRIMARY,
            "p9.lab.example",
            MAX_CONNECTIONS_PER_PRIMARY
        )
        .is_none());
        assert!(
            Place::take(
                &OPEN_BY_PRIMARY,
                "p10.lab.example",
                MAX_CONNECTIONS_PER_PRIMARY
            )
            .is_some(),
            "another host is not affected"
        );
        drop(places);
        assert!(Place::take(
            &OPEN_BY_PRIMARY,
            "p9.lab.example",
            MAX_CONNECTIONS_PER_PRIMARY
        )
        .is_some());
    }

    #[test]
    fn most_specific_entry_wins() {
        let entries = vec![
            entry("*", "any"),
            entry("*.lab.example", "lab"),
            entry("p1.lab.example", "p1"),
        ];
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let pick =
            |n: &[&str]| best_entry(&entries, &names(n)).map(|(e, m)| (e.trust_group.clone(), m));
        assert_eq!(
            pick(&["P1.lab.example"]),
            Some(("p1".into(), "p1.lab.example".into()))
        );
        assert_eq!(
            pick(&["p2.lab.example"]),
            Some(("lab".into(), "p2.lab.example".into()))
        );
        assert_eq!(
            pick(&["x.other.org", "p1.lab.example"]),
            Some(("p1".into(), "p1.lab.example".into()))
        );
        assert_eq!(
            pick(&["x.other.org"]),
            Some(("any".into(), "x.other.org".into()))
        );
        let strict = vec![entry("p1.lab.example", "p1")];
        assert!(best_entry(&strict, &names(&["p2.lab.example"])).is_none());
    }
}
