//! Reading an image of another format (qcow2, a backing chain) without a server in the middle:
//! `qemu-img map --output=json` tells where every guest range lives — unallocated, zeros, or
//! uncompressed data at an offset in one file of the backing chain (`depth`) — and the scan then
//! reads those bytes with `pread`. QEMU's own tool does the format work; no qcow2 parsing here.
//!
//! Only for images nobody writes while the scan runs (a VM that is off): `qemu-img map` takes the
//! image lock and fails if a running QEMU holds it. Images with compressed or encrypted clusters,
//! or an external data file, are refused ([`MappedImage::open`] says why) so the caller falls back
//! to reading through qemu-nbd.

use std::fs::File;
use std::path::Path;
use std::process::Command;

use super::files::{FileMap, Range};
use crate::nbd::{Extent, STATE_HOLE, STATE_ZERO};

/// Why an image cannot be read through its map.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("qemu-img {step} on {image} failed: {why}")]
    QemuImg {
        step: &'static str,
        image: String,
        why: String,
    },
    #[error("{image} cannot be read directly: {why}")]
    Unsupported { image: String, why: String },
    #[error("cannot open {path}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// An image whose guest ranges are known and read directly from the files of its chain.
pub struct MappedImage {
    /// The files' names, the image first, then its backing files.
    names: Vec<String>,
    map: FileMap,
}

fn qemu_img_json(
    step: &'static str,
    args: &[&str],
    image: &Path,
) -> Result<serde_json::Value, MapError> {
    let shown = image.display().to_string();
    let out = Command::new("qemu-img")
        .args(args)
        .arg(image)
        .output()
        .map_err(|e| MapError::QemuImg {
            step,
            image: shown.clone(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(MapError::QemuImg {
            step,
            image: shown,
            why,
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| MapError::QemuImg {
        step,
        image: shown,
        why: e.to_string(),
    })
}

impl MappedImage {
    /// Maps `image` (format `format`) and opens the files of its backing chain.
    pub fn open(image: &Path, format: &str) -> Result<MappedImage, MapError> {
        let shown = image.display().to_string();
        let unsupported = |why: &str| MapError::Unsupported {
            image: shown.clone(),
            why: why.to_string(),
        };
        let chain = qemu_img_json(
            "info",
            &["info", "--backing-chain", "--output=json", "-f", format],
            image,
        )?;
        let chain = chain.as_array().cloned().unwrap_or_default();
        if chain.is_empty() {
            return Err(unsupported("qemu-img info returned no image"));
        }
        let mut files = Vec::new();
        let mut names = Vec::new();
        for layer in &chain {
            if layer["encrypted"].as_bool() == Some(true) {
                return Err(unsupported("it is encrypted"));
            }
            if layer["format-specific"]["data"]["data-file"].is_string() {
                return Err(unsupported("it has an external data file"));
            }
            let name = layer["filename"]
                .as_str()
                .ok_or_else(|| unsupported("a layer has no file name"))?;
            files.push(File::open(name).map_err(|source| MapError::Open {
                path: name.to_string(),
                source,
            })?);
            names.push(name.to_string());
        }
        let size = chain[0]["virtual-size"]
            .as_u64()
            .ok_or_else(|| unsupported("no virtual size"))?;
        let map = qemu_img_json("map", &["map", "--output=json", "-f", format], image)?;
        let mut ranges = Vec::new();
        for e in map.as_array().cloned().unwrap_or_default() {
            let (Some(start), Some(length)) = (e["start"].as_u64(), e["length"].as_u64()) else {
                return Err(unsupported(
                    "qemu-img map returned an entry without start or length",
                ));
            };
            if e["compressed"].as_bool() == Some(true) {
                return Err(unsupported("it has compressed clusters"));
            }
            let data = match (
                e["data"].as_bool(),
                e["offset"].as_u64(),
                e["depth"].as_u64(),
            ) {
                (Some(true), Some(offset), Some(depth)) => {
                    let depth = usize::try_from(depth).unwrap_or(usize::MAX);
                    if depth >= files.len() {
                        return Err(unsupported("qemu-img map names a layer beyond the chain"));
                    }
                    Some((depth, offset))
                }
                (Some(true), _, _) => return Err(unsupported("a data range has no host offset")),
                _ => None,
            };
            ranges.push(Range {
                start,
                length,
                data,
            });
        }
        Ok(MappedImage {
            names,
            map: FileMap::new(files, ranges, size),
        })
    }

    pub fn size(&self) -> u64 {
        self.map.size()
    }

    /// The files read: the image, then its backing files.
    pub fn file_names(&self) -> &[String] {
        &self.names
    }

    /// The ranges overlapping `[offset, offset+len)`, as allocation extents.
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<Extent> {
        let end = offset + len;
        let ranges = self.map.ranges();
        let first = ranges.partition_point(|r| r.start + r.length <= offset);
        ranges[first..]
            .iter()
            .take_while(|r| r.start < end)
            .map(|r| Extent {
                offset: r.start,
                length: r.length,
                flags: if r.data.is_some() {
                    0
                } else {
                    STATE_HOLE | STATE_ZERO
                },
            })
            .collect()
    }

    /// Reads guest bytes at `offset` into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.map.read(offset, buf)
    }

    pub(crate) fn file_map(&self) -> &FileMap {
        &self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_io(image: &Path, cmds: &[&str]) {
        let mut c = Command::new("qemu-io");
        for cmd in cmds {
            c.arg("-c").arg(cmd);
        }
        let out = c.arg(image).output().expect("qemu-io");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn a_backing_chain_reads_like_qemu_reads_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("8M")
            .status()
            .expect("create");
        assert!(ok.success());
        qemu_io(&base, &["write -P 1 1M 256k", "write -P 3 6M 100k"]);
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&top)
            .status()
            .expect("create top");
        assert!(ok.success());
        qemu_io(&top, &["write -P 2 1152k 64k", "write -z 6M 64k"]);
        let img = MappedImage::open(&top, "qcow2").expect("map");
        assert_eq!(img.size(), 8 << 20);
        let mut disk = vec![0u8; 8 << 20];
        img.read(0, &mut disk).expect("read all");
        // What QEMU reads, via qemu-img convert to raw.
        let raw = dir.path().join("top.raw");
        let ok = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&top)
            .arg(&raw)
            .status()
            .expect("convert");
        assert!(ok.success());
        assert!(
            disk == std::fs::read(&raw).expect("raw"),
            "the mapped read differs from QEMU's"
        );
        let mut piece = vec![0u8; 200_000];
        img.read((1 << 20) + 100_000, &mut piece)
            .expect("read piece");
        assert_eq!(&piece[..], &disk[(1 << 20) + 100_000..(1 << 20) + 300_000]);
        let alloc = img.allocation(0, 1 << 20);
        assert!(alloc.iter().all(|e| e.is_zero()), "{alloc:?}");
    }

    #[test]
    fn compressed_images_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw = dir.path().join("a.raw");
        std::fs::write(&raw, vec![5u8; 1 << 20]).expect("raw");
        let img = dir.path().join("a.qcow2");
        let ok = Command::new("qemu-img")
            .args(["convert", "-c", "-O", "qcow2"])
            .arg(&raw)
            .arg(&img)
            .status()
            .expect("convert");
        assert!(ok.success());
        match MappedImage::open(&img, "qcow2") {
            Err(MapError::Unsupported { why, .. }) => assert!(why.contains("compressed"), "{why}"),
            other => panic!("expected Unsupported, got {:?}", other.err()),
        }
    }
}
