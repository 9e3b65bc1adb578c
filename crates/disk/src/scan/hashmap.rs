//! The persisted block-hash map of the last shipped point of one disk.
//!
//! One 16-byte truncated BLAKE3 per block; an all-zero (or unallocated) block is stored as sixteen
//! zero bytes, so holes are never read to be compared. The map is read and written as a stream, so
//! the memory a scan needs does not grow with the disk.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `VMRHASH1` (do not modify) |
//! | 8 | 4 | block size, u32 LE (a power of two, 4 KiB – 16 MiB) |
//! | 12 | 8 | disk size in bytes, u64 LE |
//! | 20 | 16 × n | block hashes, n = ceil(disk size / block size) |
//! | end | 32 | BLAKE3 of everything before |
//!
//! A map is written to `<name>.tmp` and becomes the map of record only when [`commit`] renames it,
//! after the consumer confirmed the point it describes is durable.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"VMRHASH1";
pub const HASH_LEN: usize = 16;
/// The hash recorded for a block that holds only zeros.
pub const ZERO: [u8; HASH_LEN] = [0; HASH_LEN];
const HEADER_LEN: usize = 20;
const MIN_BLOCK: u32 = 4096;
const MAX_BLOCK: u32 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HashMapError {
    #[error("cannot use the hash map {path}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a block-hash map")]
    NotAMap { path: String },
    #[error("{path} is damaged: {what}")]
    Damaged { path: String, what: &'static str },
    #[error("block size {0} is not a power of two between 4 KiB and 16 MiB")]
    BlockSize(u32),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> HashMapError + '_ {
    move |source| HashMapError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The hash of one block's bytes (ZERO for a block of zeros).
pub fn block_hash(data: &[u8]) -> [u8; HASH_LEN] {
    block_digest(data).0
}

/// The hash of one block's bytes as the map keeps it (ZERO for a block of zeros), and the full
/// BLAKE3 it was cut from (none for a block of zeros, which is not hashed), which a replication
/// log takes as the block's digest instead of hashing it again.
pub fn block_digest(data: &[u8]) -> ([u8; HASH_LEN], Option<[u8; 32]>) {
    if data.iter().all(|&b| b == 0) {
        return (ZERO, None);
    }
    let full = *blake3::hash(data).as_bytes();
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(&full[..HASH_LEN]);
    // A real block must never read as "zeros": nudge the (2^-128 likely) collision away.
    if out == ZERO {
        out[0] = 1;
    }
    (out, Some(full))
}

pub fn check_block_size(block_size: u32) -> Result<(), HashMapError> {
    if block_size.is_power_of_two() && (MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        Ok(())
    } else {
        Err(HashMapError::BlockSize(block_size))
    }
}

pub fn block_count(disk_size: u64, block_size: u32) -> u64 {
    disk_size.div_ceil(u64::from(block_size))
}

/// Reads a map block by block, verifying the trailing hash when the last block has been read.
pub struct MapReader {
    path: PathBuf,
    input: BufReader<File>,
    hasher: blake3::Hasher,
    pub block_size: u32,
    pub disk_size: u64,
    remaining: u64,
}

impl MapReader {
    pub fn open(path: &Path) -> Result<MapReader, HashMapError> {
        let file = File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        let mut input = BufReader::with_capacity(1 << 20, file);
        let mut header = [0u8; HEADER_LEN];
        input
            .read_exact(&mut header)
            .map_err(|_| HashMapError::NotAMap {
                path: path.display().to_string(),
            })?;
        if &header[..8] != MAGIC {
            return Err(HashMapError::NotAMap {
                path: path.display().to_string(),
            });
        }
        let mut field4 = [0u8; 4];
        field4.copy_from_slice(&header[8..12]);
        let block_size = u32::from_le_bytes(field4);
        let mut field8 = [0u8; 8];
        field8.copy_from_slice(&header[12..20]);
        let disk_size = u64::from_le_bytes(field8);
        check_block_size(block_size)?;
        let count = block_count(disk_size, block_size);
        let expected = (HEADER_LEN as u64)
            .checked_add(count.saturating_mul(HASH_LEN as u64))
            .and_then(|n| n.checked_add(32));
        if expected != Some(len) {
            return Err(HashMapError::Damaged {
                path: path.display().to_string(),
                what: "its length does not match its header",
            });
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header);
        Ok(MapReader {
            path: path.to_path_buf(),
            input,
            hasher,
            block_size,
            disk_size,
            remaining: count,
        })
    }

    /// The next block's hash; after the last one, the trailer is verified.
    pub fn next_hash(&mut self) -> Result<Option<[u8; HASH_LEN]>, HashMapError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let mut h = [0u8; HASH_LEN];
        self.input.read_exact(&mut h).map_err(io(&self.path))?;
        self.hasher.update(&h);
        self.remaining -= 1;
        if self.remaining == 0 {
            let mut trailer = [0u8; 32];
            self.input
                .read_exact(&mut trailer)
                .map_err(io(&self.path))?;
            if self.hasher.finalize().as_bytes() != &trailer {
                return Err(HashMapError::Damaged {
                    path: self.path.display().to_string(),
                    what: "its checksum does not match",
                });
            }
        }
        Ok(Some(h))
    }
}

/// Writes a new map to `<final>.tmp`.
pub struct MapWriter {
    tmp: PathBuf,
    out: BufWriter<File>,
    hasher: blake3::Hasher,
    remaining: u64,
}

impl MapWriter {
    pub fn create(
        final_path: &Path,
        block_size: u32,
        disk_size: u64,
    ) -> Result<MapWriter, HashMapError> {
        check_block_size(block_size)?;
        let tmp = tmp_path(final_path);
        let file = File::create(&tmp).map_err(io(&tmp))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut header = Vec::with_capacity(HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&block_size.to_le_bytes());
        header.extend_from_slice(&disk_size.to_le_bytes());
        out.write_all(&header).map_err(io(&tmp))?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header);
        Ok(MapWriter {
            tmp,
            out,
            hasher,
            remaining: block_count(disk_size, block_size),
        })
    }

    pub fn push(&mut self, hash: &[u8; HASH_LEN]) -> Result<(), HashMapError> {
        if self.remaining == 0 {
            return Err(HashMapError::Damaged {
                path: self.tmp.display().to_string(),
                what: "more blocks than the disk has",
            });
        }
        self.remaining -= 1;
        self.hasher.update(hash);
        self.out.write_all(hash).map_err(io(&self.tmp))
    }

    /// Writes the trailer and syncs the file; returns the temporary path, ready for [`commit`].
    pub fn finish(mut self) -> Result<PathBuf, HashMapError> {
        if self.remaining != 0 {
            return Err(HashMapError::Damaged {
                path: self.tmp.display().to_string(),
                what: "fewer blocks than the disk has",
            });
        }
        let trailer = *self.hasher.finalize().as_bytes();
        self.out.write_all(&trailer).map_err(io(&self.tmp))?;
        let file = self.out.into_inner().map_err(|e| HashMapError::Io {
            path: self.tmp.display().to_string(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io(&self.tmp))?;
        Ok(self.tmp)
    }
}

fn tmp_path(final_path: &Path) -> PathBuf {
    let mut name = final_path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Makes a finished map the map of record: rename over the old one, then sync the directory.
pub fn commit(tmp: &Path, final_path: &Path) -> Result<(), HashMapError> {
    std::fs::rename(tmp, final_path).map_err(io(final_path))?;
    if let Some(dir) = final_path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_round_trips_and_damage_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk0.hashes");
        let mut w = MapWriter::create(&path, 65536, 65536 * 3 + 1).expect("create");
        let hashes = [block_hash(b"a"), ZERO, block_hash(b"b"), block_hash(b"c")];
        for h in &hashes {
            w.push(h).expect("push");
        }
        let tmp = w.finish().expect("finish");
        commit(&tmp, &path).expect("commit");
        let mut r = MapReader::open(&path).expect("open");
        assert_eq!((r.block_size, r.disk_size), (65536, 65536 * 3 + 1));
        for h in &hashes {
            assert_eq!(r.next_hash().expect("read"), Some(*h));
        }
        assert_eq!(r.next_hash().expect("end"), None);

        let mut bytes = std::fs::read(&path).expect("read");
        bytes[HEADER_LEN + 3] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        let mut r = MapReader::open(&path).expect("open");
        let result: Result<Vec<_>, _> = (0..4).map(|_| r.next_hash()).collect();
        assert!(matches!(result, Err(HashMapError::Damaged { .. })));
        std::fs::write(&path, &bytes[..bytes.len() - 1]).expect("write");
        assert!(matches!(
            MapReader::open(&path),
            Err(HashMapError::Damaged { .. })
        ));
    }

    #[test]
    fn zero_blocks_hash_to_zero_and_nothing_else_does() {
        assert_eq!(block_hash(&[0u8; 4096]), ZERO);
        assert_ne!(block_hash(&[0u8, 1]), ZERO);
        assert!(matches!(
            check_block_size(3000),
            Err(HashMapError::BlockSize(3000))
        ));
    }
}
