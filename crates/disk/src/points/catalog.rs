//! Reading the store's committed state: the point and overlay metadata files. Lock-free: every
//! file read here is replaced only by atomic rename, so a reader sees a whole file or none.

use std::fs;
use std::io;
use std::path::Path;

use super::error::StoreError;
use super::layout::{file_name, parse_seq, Layout};
use super::meta::{OverlayInfo, PointInfo};

/// Every committed point, oldest first.
pub(crate) fn points(layout: &Layout) -> Result<Vec<PointInfo>, StoreError> {
    let mut seqs = Vec::new();
    let dir = &layout.vm_dir;
    for entry in fs::read_dir(dir).map_err(StoreError::io("list", dir))? {
        let entry = entry.map_err(StoreError::io("list", dir))?;
        if let Some(seq) = parse_seq(file_name(&entry.path()), "json") {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    let mut out = Vec::with_capacity(seqs.len());
    for seq in seqs {
        // A point pruned between the listing and this read is simply gone.
        if let Some(info) = point(layout, seq)? {
            out.push(info);
        }
    }
    Ok(out)
}

/// The committed point `seq`, if it exists.
pub(crate) fn point(layout: &Layout, seq: u64) -> Result<Option<PointInfo>, StoreError> {
    let path = layout.point_meta(seq);
    let Some(text) = read_optional(&path)? else {
        return Ok(None);
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| StoreError::BadPointMeta {
            path: path.display().to_string(),
            source,
        })
}

/// Every existing overlay (those whose `overlay.json` exists), by name.
pub(crate) fn overlays(layout: &Layout) -> Result<Vec<OverlayInfo>, StoreError> {
    let dir = layout.overlays_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io("list", &dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(StoreError::io("list", &dir))?;
        if let Some(info) = overlay(layout, file_name(&entry.path()))? {
            out.push(info);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The overlay `name`, if it exists.
pub(crate) fn overlay(layout: &Layout, name: &str) -> Result<Option<OverlayInfo>, StoreError> {
    let path = layout.overlay_meta(name);
    let Some(text) = read_optional(&path)? else {
        return Ok(None);
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| StoreError::BadOverlayMeta {
            path: path.display().to_string(),
            source,
        })
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io("read", path)(e)),
    }
}
