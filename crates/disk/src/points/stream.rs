//! Streaming a verified log into the new layers: one blocking task reads the log and hands owned
//! batches of extents over a bounded channel to the writer, which sends them to one writable
//! qemu-nbd export per disk. Data extents become NBD writes; zero extents become NBD
//! WRITE_ZEROES without NO_HOLE, which qcow2 records as zero clusters (no data is allocated).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;
use wire::{Content, Expect, LogDecodeError, LogReader, LogSummary};

use super::error::ApplyError;
use super::layout::Layout;
use crate::export::{ExportSpec, NbdExport};
use crate::nbd::NbdClient;

/// Bytes of data per batch handed from the reader to the writer.
const BATCH_BYTES: usize = 4 << 20;
/// Batches in flight between reader and writer.
const BATCHES_IN_FLIGHT: usize = 4;

enum Piece {
    Data {
        disk: usize,
        offset: u64,
        bytes: Vec<u8>,
    },
    Zero {
        disk: usize,
        offset: u64,
        len: u64,
    },
}

/// Writes every extent of the (already verified) log in `file` into the layers `tmps` (one per
/// disk, in disk-table order), flushes them and stops their exports. Fails if the log read now
/// differs from the verified one.
pub(crate) async fn write_log(
    layout: &Layout,
    file: File,
    log: &Path,
    expect: &Expect,
    tmps: &[PathBuf],
    verified: &LogSummary,
) -> Result<(), ApplyError> {
    let sequence = verified.header.sequence;
    let mut exports = Vec::with_capacity(tmps.len());
    let mut clients = Vec::with_capacity(tmps.len());
    for (disk, tmp) in tmps.iter().enumerate() {
        let spec = ExportSpec::new(tmp, "qcow2").writable();
        let export = NbdExport::start(&spec, &layout.run_dir(), &format!("apply-disk{disk}"))
            .await
            .map_err(|source| ApplyError::Export {
                sequence,
                disk,
                source,
            })?;
        let client = export
            .connect(&[])
            .await
            .map_err(|source| ApplyError::Export {
                sequence,
                disk,
                source,
            })?;
        exports.push(export);
        clients.push(client);
    }
    let (tx, mut rx) = mpsc::channel(BATCHES_IN_FLIGHT);
    let expect = *expect;
    let reader = tokio::task::spawn_blocking(move || read_log(file, &expect, &tx));
    let mut failed = None;
    while let Some(batch) = rx.recv().await {
        if let Err(e) = write_batch(&mut clients, batch, sequence).await {
            failed = Some(e);
            break;
        }
    }
    drop(rx);
    let read = reader.await.map_err(ApplyError::ReaderTask)?;
    if let Some(e) = failed {
        return Err(e);
    }
    check_same_log(read, log, verified)?;
    for (disk, client) in clients.into_iter().enumerate() {
        finish(client).await.map_err(|source| ApplyError::Write {
            sequence,
            disk,
            source,
        })?;
    }
    for export in exports {
        export.stop().await;
    }
    Ok(())
}

/// The log read for applying must be the one verified: same trailer hash.
fn check_same_log(
    read: Result<Option<LogSummary>, LogDecodeError>,
    log: &Path,
    verified: &LogSummary,
) -> Result<(), ApplyError> {
    let path = log.display().to_string();
    match read {
        Ok(Some(summary)) if summary.hash == verified.hash => Ok(()),
        Ok(_) => Err(ApplyError::LogChanged { path, source: None }),
        Err(e) => Err(ApplyError::LogChanged {
            path,
            source: Some(e),
        }),
    }
}

async fn write_batch(
    clients: &mut [NbdClient],
    batch: Vec<Piece>,
    sequence: u64,
) -> Result<(), ApplyError> {
    for piece in batch {
        let (disk, result) = match piece {
            Piece::Data {
                disk,
                offset,
                bytes,
            } => (disk, clients[disk].write(offset, &bytes).await),
            Piece::Zero { disk, offset, len } => {
                (disk, clients[disk].write_zeroes(offset, len).await)
            }
        };
        result.map_err(|source| ApplyError::Write {
            sequence,
            disk,
            source,
        })?;
    }
    Ok(())
}

async fn finish(mut client: NbdClient) -> Result<(), crate::nbd::NbdError> {
    client.flush().await?;
    client.disconnect().await
}

/// Reads the log and sends its extents in batches. Ok(None): the writer stopped listening.
fn read_log(
    file: File,
    expect: &Expect,
    tx: &mpsc::Sender<Vec<Piece>>,
) -> Result<Option<LogSummary>, LogDecodeError> {
    let mut reader = LogReader::open(BufReader::with_capacity(1 << 20, file), expect)?;
    let mut batch = Vec::new();
    let mut bytes = 0;
    while let Some(extent) = reader.next_extent()? {
        let disk = extent.disk as usize;
        let offset = extent.offset;
        batch.push(match extent.content {
            Content::Data(data) => {
                bytes += data.len();
                Piece::Data {
                    disk,
                    offset,
                    bytes: data.to_vec(),
                }
            }
            Content::Zero(len) => Piece::Zero { disk, offset, len },
        });
        if (bytes >= BATCH_BYTES || batch.len() >= 4096) && !send(tx, &mut batch, &mut bytes) {
            return Ok(None);
        }
    }
    if !batch.is_empty() && !send(tx, &mut batch, &mut bytes) {
        return Ok(None);
    }
    Ok(reader.summary().cloned())
}

fn send(tx: &mpsc::Sender<Vec<Piece>>, batch: &mut Vec<Piece>, bytes: &mut usize) -> bool {
    *bytes = 0;
    tx.blocking_send(std::mem::take(batch)).is_ok()
}
