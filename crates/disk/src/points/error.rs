//! What can go wrong in the recovery-point store, one enum per operation. Messages are sentences
//! that do not repeat their source; the binary prints the whole chain.

use std::io;
use std::path::Path;

use wire::LogDecodeError;

use super::qemu_img::QemuImgError;
use crate::export::ExportError;
use crate::nbd::NbdError;

/// The store's files could not be read, written or understood.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("the point metadata {path} is unreadable")]
    BadPointMeta {
        path: String,
        source: serde_json::Error,
    },
    #[error("the adoption record {path} is unreadable")]
    BadAdoptionRecord {
        path: String,
        source: serde_json::Error,
    },
    #[error("the overlay metadata {path} is unreadable")]
    BadOverlayMeta {
        path: String,
        source: serde_json::Error,
    },
    #[error("recovery point {sequence} does not exist (it was never applied or was pruned)")]
    UnknownPoint { sequence: u64 },
    #[error("recovery point {sequence} has no disk {disk}")]
    UnknownDisk { sequence: u64, disk: usize },
}

impl StoreError {
    pub(crate) fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.display().to_string();
        move |source| StoreError::Io {
            action,
            path,
            source,
        }
    }
}

/// A replication log could not be applied. Whatever the variant, every retained point is intact
/// and the log can be applied again.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the replication log {path} was rejected; nothing was applied")]
    Rejected {
        path: String,
        source: LogDecodeError,
    },
    #[error("the log is for VM {log} but this store holds VM {store}")]
    WrongVm { store: uuid::Uuid, log: uuid::Uuid },
    #[error("the store holds no point yet, so the first log must be a full image (sequence {sequence} is a delta)")]
    FirstMustBeFull { sequence: u64 },
    #[error("log {sequence} applies on top of point {parent}, but the latest point is {latest}")]
    NotNext {
        sequence: u64,
        parent: u64,
        latest: u64,
    },
    #[error(
        "log {sequence} is older than the latest point {latest} and its point is not retained"
    )]
    Superseded { sequence: u64, latest: u64 },
    #[error("point {sequence} was already applied from a different log (hash {stored}, this log {offered})")]
    SequenceTaken {
        sequence: u64,
        stored: String,
        offered: String,
    },
    #[error(
        "log {sequence} changes the disk table of point {parent} (disks added, removed or resized)"
    )]
    DiskTableChanged { sequence: u64, parent: u64 },
    #[error("writing disk {disk} of point {sequence} failed")]
    Write {
        sequence: u64,
        disk: usize,
        source: NbdError,
    },
    #[error("cannot write the standalone layer of disk {disk} of point {sequence}")]
    WriteLayer {
        sequence: u64,
        disk: usize,
        source: crate::qcow2::Qcow2WriteError,
    },
    #[error("cannot export disk {disk} of point {sequence}")]
    Export {
        sequence: u64,
        disk: usize,
        source: ExportError,
    },
    #[error("a task reading the log or writing a layer failed")]
    ReaderTask(#[source] tokio::task::JoinError),
    #[error(transparent)]
    QemuImg(#[from] QemuImgError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Pruning stopped. Points merged so far are gone; every other point is intact.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("merging point {sequence} into point {child} failed")]
    Merge {
        sequence: u64,
        child: u64,
        source: QemuImgError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An overlay could not be created, removed or committed.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("{0:?} is not a valid overlay name (1 to 64 of A-Z, a-z, 0-9, '-', '_')")]
    BadName(String),
    #[error("an overlay named {0:?} already exists")]
    Exists(String),
    #[error("no overlay is named {0:?}")]
    Unknown(String),
    #[error(transparent)]
    QemuImg(#[from] QemuImgError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A retained point failed its consistency check.
#[derive(Debug, thiserror::Error)]
pub enum PointCheckError {
    #[error("disk {disk} of point {sequence} fails qemu-img check")]
    Check {
        sequence: u64,
        disk: usize,
        source: QemuImgError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}
