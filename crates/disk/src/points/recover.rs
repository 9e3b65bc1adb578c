//! Recovery: what runs, under the store lock, before anything changes the store (and when it is
//! opened). It removes exactly what the crash-safety table calls garbage:
//!
//! 1. qemu-nbd helpers a killed applier left running (their pid files are in `run/`);
//! 2. every `*.tmp` file (an interrupted apply, prune, overlay creation or metadata write);
//! 3. every layer `disk<i>/p<seq>.qcow2` whose `p<seq>.json` does not exist: an apply that died
//!    after renaming a layer but before committing, or a prune that died after uncommitting a
//!    merged point but before deleting its layers — in both cases no file references the layer;
//! 4. every overlay directory without `overlay.json` (an interrupted create or remove).
//!
//! The layers of the point an interrupted merge is dropping (`merge.json`, see `prune`) are not
//! garbage: the child's chain still reads them until the next prune finishes the merge.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::Path;

use super::catalog;
use super::durable::{self, TMP_SUFFIX};
use super::error::StoreError;
use super::layout::{file_name, parse_disk_dir, parse_seq, Layout};
use crate::export::reap_stray_exports;

/// Returns to the last committed state. The caller holds the store lock.
pub(crate) fn run(layout: &Layout) -> Result<(), StoreError> {
    let reaped = reap_stray_exports(&layout.run_dir());
    if reaped > 0 {
        tracing::info!(
            reaped,
            "killed qemu-nbd helpers left by an interrupted apply"
        );
    }
    remove_tmp_files(&layout.vm_dir)?;
    let mut committed: BTreeSet<u64> = catalog::points(layout)?
        .iter()
        .map(|p| p.sequence)
        .collect();
    // A merge a crash cut off: its point's layers still serve the child (prune finishes it).
    committed.extend(super::prune::recover_merge(layout)?);
    for dir in disk_dirs(layout)? {
        remove_tmp_files(&dir)?;
        remove_uncommitted_layers(&dir, &committed)?;
    }
    remove_unfinished_overlays(layout)
}

/// The `disk<i>` directories that exist.
pub(crate) fn disk_dirs(layout: &Layout) -> Result<Vec<std::path::PathBuf>, StoreError> {
    let dir = &layout.vm_dir;
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(StoreError::io("list", dir))? {
        let path = entry.map_err(StoreError::io("list", dir))?.path();
        if parse_disk_dir(file_name(&path)).is_some() && path.is_dir() {
            out.push(path);
        }
    }
    Ok(out)
}

fn remove_tmp_files(dir: &Path) -> Result<(), StoreError> {
    for path in list(dir)? {
        if file_name(&path).ends_with(TMP_SUFFIX) && path.is_file() {
            tracing::debug!(path = %path.display(), "removing leftover temporary file");
            durable::remove_durable(&path).map_err(StoreError::io("remove", &path))?;
        }
    }
    Ok(())
}

fn remove_uncommitted_layers(dir: &Path, committed: &BTreeSet<u64>) -> Result<(), StoreError> {
    for path in list(dir)? {
        let Some(seq) = parse_seq(file_name(&path), "qcow2") else {
            continue;
        };
        if !committed.contains(&seq) {
            tracing::info!(path = %path.display(), "removing a layer of an uncommitted point");
            durable::remove_durable(&path).map_err(StoreError::io("remove", &path))?;
        }
    }
    Ok(())
}

fn remove_unfinished_overlays(layout: &Layout) -> Result<(), StoreError> {
    let dir = layout.overlays_dir();
    for path in list(&dir)? {
        let name = file_name(&path).to_string();
        if path.is_dir() && !layout.overlay_meta(&name).exists() {
            tracing::info!(path = %path.display(), "removing an unfinished overlay");
            fs::remove_dir_all(&path).map_err(StoreError::io("remove", &path))?;
            durable::sync_dir(&dir).map_err(StoreError::io("sync", &dir))?;
        }
    }
    Ok(())
}

/// The entries of `dir` (none if it does not exist).
pub(crate) fn list(dir: &Path) -> Result<Vec<std::path::PathBuf>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("list", dir)(e)),
    };
    entries
        .map(|e| e.map(|e| e.path()).map_err(StoreError::io("list", dir)))
        .collect()
}
