//! `vmreplicad`: the vmreplica daemon (composition root).
//!
//! `vmreplicad --data-dir DIR --cim-listen HOST:PORT` runs in the foreground, logs to stderr, creates
//! DIR and its SQLite database on first start, and exits cleanly on SIGTERM or Ctrl-C.

mod certs;
mod clock;
mod http;
mod jobs;
mod power;
mod service;
mod store;
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if !args.cim_listen.ip().is_loopback() {
        bail!(
            "refusing to serve plain HTTP on {}: the endpoint is unauthenticated, so it binds only to a loopback \
             address until HTTPS with credentials is implemented",
            args.cim_listen
        );
    }
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
    let failed = jobs
        .recover_after_restart()
        .context("cannot recover jobs")?;
    if failed > 0 {
        tracing::warn!(
            failed,
            "jobs that were running when the daemon stopped are marked failed"
        );
    }
    let service = Arc::new(service::Service {
        store,
        jobs: jobs.clone(),
        host: args.host_name.clone().unwrap_or_else(system_host_name),
        cert_dir: args.data_dir.join("certs"),
    });
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
    tracing::info!(addr = %listener.local_addr()?, data_dir = %args.data_dir.display(), "vmreplicad serving CIM-XML on /cimom");
    axum::serve(listener, http::router(service))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("server failed")?;
    tracing::info!("vmreplicad stopped");
    Ok(())
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
