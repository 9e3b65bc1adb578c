//! Where a scan reads a disk from: an NBD export (any image format, through qemu-nbd) or, as
//! optimisations, the file itself for raw images (`pread`, holes found with SEEK_DATA/SEEK_HOLE)
//! and the files of a qcow2 chain located by `qemu-img map` ([`super::mapped`]).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use super::files::{FileMap, Prefetch};
use crate::nbd::{Extent, NbdClient, NbdError, BASE_ALLOCATION, STATE_HOLE, STATE_ZERO};

/// A disk to scan.
pub enum Source<'a> {
    /// An export connected with the `base:allocation` context (without it, nothing is skipped).
    Nbd(&'a mut NbdClient),
    /// A raw image file.
    RawFile(&'a File),
    /// An image of another format read through its `qemu-img map`.
    Mapped(&'a super::mapped::MappedImage),
}

impl Source<'_> {
    pub fn size(&self) -> Result<u64, NbdError> {
        match self {
            Source::Nbd(nbd) => Ok(nbd.size()),
            Source::RawFile(f) => Ok(super::files::raw_size(f)?),
            Source::Mapped(m) => Ok(m.size()),
        }
    }

    /// Allocation extents of `[offset, offset+len)`; ranges that read as zeros carry the ZERO flag.
    pub async fn allocation(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>, NbdError> {
        match self {
            Source::Nbd(nbd) if nbd.context_id(BASE_ALLOCATION).is_some() => {
                nbd.map(BASE_ALLOCATION, offset, len).await
            }
            Source::Nbd(_) => Ok(Vec::new()),
            Source::RawFile(f) => Ok(file_extents(f, offset, len)),
            Source::Mapped(m) => Ok(m.allocation(offset, len)),
        }
    }

    /// A reader of this disk's files that reads ahead of the scan (`O_DIRECT` where allowed), for
    /// reads of at most `run` bytes; None for an NBD export or when the files cannot be opened
    /// again (the scan then reads with [`Source::read`]).
    pub(crate) fn prefetch(&self, run: usize) -> Option<Prefetch> {
        let started = match self {
            Source::Nbd(_) => return None,
            Source::RawFile(f) => FileMap::raw(f).and_then(|m| Prefetch::start(&m, run)),
            Source::Mapped(m) => Prefetch::start(m.file_map(), run),
        };
        started.ok()
    }

    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        match self {
            Source::Nbd(nbd) => nbd.read(offset, buf).await,
            Source::RawFile(f) => Ok(f.read_exact_at(buf, offset)?),
            Source::Mapped(m) => Ok(m.read(offset, buf)?),
        }
    }
}

/// Data and hole extents of a file range, from lseek(SEEK_DATA / SEEK_HOLE).
fn file_extents(file: &File, offset: u64, len: u64) -> Vec<Extent> {
    let fd = file.as_raw_fd();
    let end = offset + len;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let Ok(at) = i64::try_from(pos) else { break };
        // SAFETY: lseek on a descriptor we own; it only moves the file offset.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after pos: the rest is a hole. Any other error: treat as data.
            let hole = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
            let flags = if hole { STATE_HOLE | STATE_ZERO } else { 0 };
            out.push(Extent {
                offset: pos,
                length: end - pos,
                flags,
            });
            break;
        }
        let data = (data as u64).min(end);
        if data > pos {
            out.push(Extent {
                offset: pos,
                length: data - pos,
                flags: STATE_HOLE | STATE_ZERO,
            });
        }
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        out.push(Extent {
            offset: data,
            length: hole - data,
            flags: 0,
        });
        pos = hole;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_and_data_of_a_sparse_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sparse.raw");
        let f = File::create(&path).expect("create");
        f.set_len(8 << 20).expect("size");
        f.write_all_at(&[1u8; 65536], 2 << 20).expect("write");
        let ext = file_extents(&f, 0, 8 << 20);
        let data: Vec<(u64, u64)> = ext
            .iter()
            .filter(|e| e.is_data())
            .map(|e| (e.offset, e.length))
            .collect();
        assert_eq!(data.len(), 1);
        assert!(
            data[0].0 <= 2 << 20 && data[0].0 + data[0].1 >= (2 << 20) + 65536,
            "{ext:?}"
        );
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 8 << 20);
        assert!(ext.first().is_some_and(|e| e.is_zero()));
    }
}
