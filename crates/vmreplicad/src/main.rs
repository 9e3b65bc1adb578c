//! `vmreplicad`: the vmreplica daemon (composition root).
//!
//! `vmreplicad --data-dir DIR --cim-listen HOST:PORT` runs in the foreground, logs to stderr, creates
//! DIR and its SQLite database on first start, and exits cleanly on SIGTERM or Ctrl-C.

mod auth;
mod certs;
mod claims;
mod clock;
mod crash;
mod durable;
mod engine;
mod http;
mod jobs;
mod power;
mod replication;
mod service;
mod store;
mod tls;
mod wbem;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "vmreplicad",
    version,
    about = "vmreplica daemon: Hyper-V Replica for QEMU/KVM"
)]
struct Args {
    /// Data directory (created on first start): holds vmreplica.db and certs/.
    #[arg(long, env = "VMREPLICA_DATA_DIR")]
    data_dir: PathBuf,
    /// Address of the CIM-XML (and JSON API) endpoint. Plain HTTP is only served on loopback.
    #[arg(long, default_value = "127.0.0.1:5988", env = "VMREPLICA_CIM_LISTEN")]
    cim_listen: SocketAddr,
    /// This host's name as the CIM objects show it (default: the system host name).
    #[arg(long)]
    host_name: Option<String>,
    /// Serve HTTPS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Accept client certificates signed by this PEM CA instead of credentials (needs --tls-cert).
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// File of `user:<argon2 PHC hash>` lines (`vmreplica credentials add` writes it). When given,
    /// every request needs HTTP Basic credentials from it (or a client certificate).
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Address the recovery server's replication listener binds (its port is HttpsPort of the
    /// recovery-server settings; it runs while certificate authentication is enabled).
    #[arg(long, default_value = "0.0.0.0", env = "VMREPLICA_REPLICATION_ADDRESS")]
    replication_address: std::net::IpAddr,
    /// Resolve a recovery server's name to this address instead of asking DNS (NAME=ADDR, or
    /// NAME=ADDR:PORT to also connect to another port than the relationship names; repeatable),
    /// for labs without DNS. The certificate must still carry NAME.
    #[arg(long = "resolve", value_parser = parse_resolve)]
    resolve: Vec<(String, replication::client::Resolved)>,
    /// Run replication cycles every SECS seconds instead of each VM's ReplicationInterval
    /// (30/300/900): for tests and demos only.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    cycle_interval_override: Option<u64>,
    /// How long a VM waits in "resynchronization required" (9) before an automatic
    /// resynchronization inside its AutoResynchronize window, and between two attempts.
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    auto_resync_delay: u64,
    /// Cap on what this host uploads to recovery servers, bytes per second (K/M/G suffixes are
    /// powers of 1024; 0 = none). Shared by every transfer; a log that cannot leave within its
    /// interval turns the next ticks into misses.
    #[arg(long, value_name = "BYTES_PER_SEC", default_value = "0", value_parser = parse_rate)]
    bandwidth_limit: u64,
    /// A weekly window, in this host's local time, with its own cap that replaces
    /// --bandwidth-limit while it holds: "[DAYS ]HH:MM-HH:MM=RATE", for example
    /// "Mon-Fri 08:00-18:00=10M" or "Sat,Sun 00:00-24:00=0" (0 = no cap). A window ending before
    /// it starts runs past midnight. Repeatable; the first window that holds wins.
    #[arg(long = "bandwidth-window", value_name = "WINDOW", value_parser = parse_window)]
    bandwidth_windows: Vec<String>,
    /// How many replication cycles of this host transfer at once (Hyper-V's
    /// MaximumActiveTransfers). `vmreplica host set` changes this and the bandwidth cap at run
    /// time; what it stores holds over these flags until `vmreplica host reset`.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    max_parallel_transfers: u16,
    /// The replication log format versions this recovery server agrees to in the handshake and
    /// accepts in uploads, comma-separated (default: every one this build reads, 1 and 2). For
    /// labs: `1` stands in for a recovery server of an older build.
    #[arg(long = "log-formats", value_name = "VERSIONS", value_delimiter = ',', value_parser = parse_log_format, hide = true)]
    log_formats: Vec<u16>,
    /// How long RemoveReplicationRelationship waits for the VM's replication cycle in flight to
    /// stop before its job ends (that VM's tracking then ends once the cycle did). For labs.
    #[arg(long, value_name = "SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=3600), hide = true)]
    removal_wait: u64,
    /// How often the recovery server tidies what uploads left in its storage (partial uploads
    /// cut back to whole records, abandoned ones deleted). For labs.
    #[arg(long, value_name = "SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86400), hide = true)]
    tidy_every: u64,
    /// Kills the daemon (SIGKILL) when it reaches this point (crash::POINTS). For labs.
    #[arg(long, value_name = "POINT", value_parser = clap::builder::PossibleValuesParser::new(crash::POINTS), hide = true)]
    crash_at: Option<String>,
}

fn parse_log_format(text: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|v| wire::limits::FORMAT_VERSIONS.contains(v))
        .ok_or_else(|| {
            format!(
                "{text} is not a log format version this build reads ({:?})",
                wire::limits::FORMAT_VERSIONS
            )
        })
}

fn parse_window(text: &str) -> Result<String, String> {
    replication::bandwidth::Window::parse(text, parse_rate).map(|_| text.to_string())
}

fn parse_rate(text: &str) -> Result<u64, String> {
    replication::bandwidth::parse_rate(text)
}

fn parse_resolve(s: &str) -> Result<(String, replication::client::Resolved), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=ADDR or NAME=ADDR:PORT"))?;
    let to = match addr.parse::<SocketAddr>() {
        Ok(sa) => replication::client::Resolved {
            ip: sa.ip(),
            port: Some(sa.port()),
        },
        Err(_) => replication::client::Resolved {
            ip: addr
                .parse()
                .map_err(|e| format!("{addr:?} is not an IP address or IP:PORT: {e}"))?,
            port: None,
        },
    };
    Ok((name.trim_end_matches('.').to_ascii_lowercase(), to))
}

/// Checks the listener's security before anything is served (see `auth`'s table).
fn auth_policy(args: &Args) -> anyhow::Result<auth::AuthPolicy> {
    let loopback = args.cim_listen.ip().is_loopback();
    if !loopback && args.tls_cert.is_none() {
        bail!(
            "refusing to serve plain HTTP on {}: a non-loopback address needs HTTPS (--tls-cert, --tls-key) and \
             credentials (--credentials) or client certificates (--client-ca)",
            args.cim_listen
        );
    }
    if !loopback && args.credentials.is_none() && args.client_ca.is_none() {
        bail!(
            "refusing to serve {} without authentication: give --credentials or --client-ca",
            args.cim_listen
        );
    }
    let credentials = match &args.credentials {
        Some(path) => Some(auth::Credentials::load(path)?),
        // With a client CA only, the credentials list is empty: certificates are the only way in.
        None if args.client_ca.is_some() => Some(auth::Credentials::empty()),
        None => None,
    };
    Ok(auth::AuthPolicy::new(credentials))
}

/// The error and its whole `source()` chain, as one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn system_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs move through buffers of 1-4 MiB. With glibc's defaults every thread's arena gives the
    // pages of a freed buffer back to the kernel and faults fresh zeroed ones in for the next one
    // (docs/performance.md, "A seventh look"); keep up to 256 MiB and map only larger buffers.
    // SAFETY: mallopt only sets allocator parameters (under the allocator's own locks).
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(point) = &args.crash_at {
        crash::arm(point);
    }
    let policy = Arc::new(auth_policy(&args)?);
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key, args.client_ca.as_deref())?),
        _ => None,
    };
    std::fs::create_dir_all(&args.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            args.data_dir.display()
        )
    })?;
    let db = args.data_dir.join("vmreplica.db");
    let store =
        Arc::new(store::Store::open(&db).with_context(|| format!("cannot open {}", db.display()))?);
    let jobs = jobs::JobEngine::new(store.clone());
    let restored = store
        .restore_interrupted_states()
        .context("cannot restore the states of interrupted jobs")?;
    if !restored.is_empty() {
        tracing::warn!(vms = ?restored, "relationships whose job the last stop cut off are back in their state before it");
    }
    let failed = jobs
        .recover_after_restart()
        .context("cannot recover jobs")?;
    if failed > 0 {
        tracing::warn!(
            failed,
            "jobs that were running when the daemon stopped are marked failed"
        );
    }
    let host = args.host_name.clone().unwrap_or_else(system_host_name);
    let stored = store.host_settings().unwrap_or_else(|e| {
        tracing::warn!("the stored host settings are not used: {e}");
        None
    });
    let limits = Arc::new(
        replication::limits::HostLimits::new(
            vmreplica_core::command::HostSettings {
                bandwidth_limit: args.bandwidth_limit,
                bandwidth_windows: args.bandwidth_windows.clone(),
                max_parallel_transfers: args.max_parallel_transfers,
                source: String::new(),
            },
            stored,
        )
        .map_err(|why| anyhow::anyhow!("--bandwidth-limit / --bandwidth-window: {why}"))?,
    );
    let cert_dir = args.data_dir.join("certs");
    let peers = Arc::new(replication::client::Peers {
        cert_dir: cert_dir.clone(),
        resolve: args.resolve.iter().cloned().collect(),
        host: host.clone(),
        bandwidth: limits.bandwidth.clone(),
    });
    let claims = claims::VmClaims::default();
    let in_flight = Arc::new(replication::primary::InFlight::default());
    let primary = Arc::new(replication::primary::PrimarySide::new(
        store.clone(),
        args.data_dir.clone(),
        peers.clone(),
        claims.clone(),
        args.cycle_interval_override,
        in_flight.clone(),
        i64::try_from(args.auto_resync_delay).unwrap_or(300),
        limits.transfers.clone(),
    ));
    let apply_wake = Arc::new(tokio::sync::Notify::new());
    let engine = engine::LocalEngine {
        store: store.clone(),
        jobs: jobs.clone(),
        data_dir: args.data_dir.clone(),
        peers: peers.clone(),
        apply_wake: apply_wake.clone(),
        primary: primary.clone(),
    };
    let replica = Arc::new(replication::replica::ReplicaSide::new(
        store.clone(),
        host.clone(),
        cert_dir.clone(),
        args.data_dir.clone(),
        apply_wake,
        claims.clone(),
        if args.log_formats.is_empty() {
            wire::limits::FORMAT_VERSIONS.to_vec()
        } else {
            args.log_formats.clone()
        },
    ));
    let _ = replica
        .failback
        .set(Arc::new(engine::failback::NewPrimary::new(
            store.clone(),
            jobs.clone(),
            peers.clone(),
            args.data_dir.clone(),
            claims.clone(),
        )));
    // Before anything can use a replica store: qemu-nbd helpers of an apply this daemon's earlier
    // run was killed in would otherwise keep serving (deleted) layers until that store's next
    // apply.
    for (vm, root) in store.replica_stores().unwrap_or_default() {
        let reaped = disk::points::PointStore::reap_helpers(std::path::Path::new(&root), vm);
        if reaped > 0 {
            tracing::warn!(%vm, reaped, "killed qemu-nbd helpers an interrupted apply left");
        }
    }
    replication::reverse::finish_cut_off_reverses(&store).await;
    replication::replica::spawn_apply_task(
        replica.clone(),
        std::time::Duration::from_secs(args.tidy_every),
    );
    let listener_control = replication::server::ListenerControl::default();
    replication::server::spawn_supervisor(
        replica,
        args.replication_address,
        listener_control.clone(),
    );
    let reaped = disk::export::reap_stray_exports(&args.data_dir.join("run"));
    if reaped > 0 {
        tracing::warn!(reaped, "killed qemu-nbd processes left by an earlier run");
    }
    let scheduler = primary.clone();
    replication::primary::spawn_scheduler(primary);
    let service = Arc::new(service::Service {
        store,
        jobs: jobs.clone(),
        host,
        cert_dir,
        engine: Arc::new(engine),
        claims,
        peers,
        in_flight,
        listener: listener_control,
        limits,
        removal_wait: std::time::Duration::from_secs(args.removal_wait),
    });
    let resync_with = service.clone();
    let _ = scheduler.auto_resync.set(Box::new(move |vm| {
        let service = resync_with.clone();
        tokio::spawn(async move {
            let cmd = vmreplica_core::command::Command::Replication {
                vm: vm.to_string(),
                operation: vmreplica_core::machine::Operation::Resynchronize,
                args: vmreplica_core::command::OperationArgs::default(),
            };
            if let Err(e) = service.execute(cmd).await {
                tracing::info!(%vm, "the automatic resynchronization did not start: {e:?}");
            }
        });
    }));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            if let Err(e) = jobs.purge() {
                tracing::warn!("cannot purge finished jobs: {}", error_chain(&e));
            }
        }
    });
    let listener = tokio::net::TcpListener::bind(args.cim_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.cim_listen))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(addr = %listener.local_addr()?, scheme, data_dir = %args.data_dir.display(), "vmreplicad serving CIM-XML on /cimom");
    let app = http::router(service, policy);
    match tls {
        None => axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("server failed")?,
        Some(config) => serve_tls(listener, app, config).await,
    }
    tracing::info!("vmreplicad stopped");
    Ok(())
}

/// Most TLS connections served at once; further clients wait in the accept queue.
const MAX_TLS_CONNECTIONS: usize = 256;
/// Time a client gets to finish the TLS handshake, and then to send its request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts TLS connections until a shutdown signal; each connection is served by the same router.
/// Slow or idle clients are cut off, and the number of connections is bounded, so clients that never
/// authenticate cannot exhaust the daemon.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    config: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TLS_CONNECTIONS));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            () = &mut shutdown => return,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let has_cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            let app = if has_cert {
                app.layer(axum::Extension(auth::ClientCertificate))
            } else {
                app
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let io = hyper_util::rt::TokioIo::new(stream);
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(io, service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, "connection ended: {e}");
            }
        });
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down");
}
