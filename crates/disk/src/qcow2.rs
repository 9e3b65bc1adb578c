//! A writer of fresh, standalone qcow2 (version 3) images, for the one case where going through
//! qemu-nbd costs too much: applying a full-image replication log (initial replication, a
//! resynchronization's new base). Deltas still go through qemu-nbd onto a backing chain.
//!
//! Why: every byte of an NBD write crosses our process, a unix socket and qemu-nbd's single
//! thread; the benchmark (docs/performance.md) measured that path at 0.3–0.7x `qemu-img convert`.
//! Writing the image directly costs one copy.
//!
//! The image is laid out as it is written: cluster 0 is the header; data clusters are appended as
//! extents arrive (an extent that is not cluster-aligned is merged into its cluster in place);
//! on [`Qcow2Writer::finish`] the L2 tables, the L1 table, the refcount blocks and the refcount
//! table are appended and the header is written last. Clusters that are never written stay
//! unallocated and read as zeros, so zero extents cost nothing. Every allocated cluster has
//! refcount 1 and the COPIED flag, as `qemu-img check` expects. Memory: the L2 tables of the
//! allocated ranges (64 KiB per 512 MiB of written virtual space).
//!
//! A run of whole, not yet allocated clusters handed over in a buffer aligned to
//! [`DIRECT_ALIGN`] is written with `O_DIRECT` (one `pwrite` for the run, onto consecutive host
//! clusters): the data goes from our buffer to the disk without a copy into the page cache, which
//! on a replica nobody reads soon, and the caller's final `fsync` has little left to flush.
//! Everything else (partial clusters, rewrites, file systems without `O_DIRECT`) is written
//! through the page cache; Linux keeps the two paths coherent.
//!
//! | offset | field (big-endian) |
//! |---|---|
//! | 0 | magic `QFI\xfb`, version 3 |
//! | 20 | cluster_bits 16 |
//! | 24 | virtual size |
//! | 36 / 40 | L1 size / L1 table offset |
//! | 48 / 56 | refcount table offset / its clusters |
//! | 96 / 100 | refcount_order 4 (16-bit refcounts) / header length 104 |
//! | 104 | end of header extensions (type 0, length 0) |

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
const L2_ENTRIES: u64 = CLUSTER / 8;
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER / 2;
const COPIED: u64 = 1 << 63;
const HEADER_LENGTH: u32 = 104;
/// The largest virtual size accepted (qcow2 itself allows more; this bounds the L1 table).
pub const MAX_SIZE: u64 = 64 << 40;
/// Alignment of memory, file offset and length that `O_DIRECT` writes need here.
pub const DIRECT_ALIGN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Qcow2WriteError {
    #[error("cannot write the qcow2 image")]
    Io(#[from] std::io::Error),
    #[error("the extent at {offset} (+{len}) lies outside the {size}-byte disk")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("a virtual size of {0} bytes is not supported")]
    Size(u64),
}

/// Writes one standalone qcow2 image.
pub struct Qcow2Writer {
    file: File,
    /// The same file opened with `O_DIRECT`, when the file system supports it.
    direct: Option<File>,
    /// Bytes written through `direct`.
    direct_bytes: u64,
    size: u64,
    /// One optional L2 table per L1 entry: host offsets of the data clusters (0 = unallocated).
    l2: Vec<Option<Box<[u64]>>>,
    /// Next free host offset.
    end: u64,
    /// Every allocation so far, in host order: runs of consecutive guest clusters (first, count).
    /// The k-th cluster allocated lies at host offset `(1 + k) * CLUSTER`.
    runs: Vec<(u64, u64)>,
    zeros: Vec<u8>,
}

/// A run of allocations: the first guest cluster and how many clusters follow it, consecutive in
/// both guest and host order.
pub type Run = (u64, u64);

/// Where a [`Qcow2Writer`] stands: enough to take it up again after its process is gone
/// ([`Qcow2Writer::resume`]), once the data written until then is on disk
/// ([`Qcow2Writer::sync_data`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Progress {
    size: u64,
    runs: Vec<(u64, u64)>,
}

impl Qcow2Progress {
    /// The progress of an image of `size` bytes whose allocations are `runs` (in host order).
    pub fn new(size: u64, runs: Vec<(u64, u64)>) -> Qcow2Progress {
        Qcow2Progress { size, runs }
    }

    /// Its runs of allocations, in host order: (first guest cluster, clusters).
    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// The image's virtual size.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Qcow2Writer {
    /// Creates (truncating) `path` for a disk of `size` bytes.
    pub fn create(path: &Path, size: u64) -> Result<Qcow2Writer, Qcow2WriteError> {
        Self::open(path, size, |p| File::create(p))
    }

    /// A writer of nothing yet over the file `open` opens at `path` (and the same file with
    /// `O_DIRECT`, where the file system allows it).
    fn open(
        path: &Path,
        size: u64,
        open: impl FnOnce(&Path) -> std::io::Result<File>,
    ) -> Result<Qcow2Writer, Qcow2WriteError> {
        if size == 0 || size > MAX_SIZE {
            return Err(Qcow2WriteError::Size(size));
        }
        let file = open(path)?;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        let l1_size = size.div_ceil(CLUSTER * L2_ENTRIES);
        Ok(Qcow2Writer {
            file,
            direct,
            direct_bytes: 0,
            size,
            l2: (0..l1_size).map(|_| None).collect(),
            end: CLUSTER, // cluster 0: the header
            runs: Vec::new(),
            zeros: vec![0; CLUSTER as usize],
        })
    }

    /// Where this writer stands; see [`Qcow2Progress`].
    pub fn progress(&self) -> Qcow2Progress {
        Qcow2Progress {
            size: self.size,
            runs: self.runs.clone(),
        }
    }

    /// The image's virtual size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many runs of allocations are final: every one but the last, which a later allocation
    /// may still extend. Runs are only added after it, in host order.
    pub fn final_runs(&self) -> usize {
        self.runs.len().saturating_sub(1)
    }

    /// The final runs from the `from`-th on, and the last run (open), if any: what a checkpoint
    /// that already holds the first `from` final runs needs to describe this writer.
    pub fn runs_since(&self, from: usize) -> (Vec<Run>, Option<Run>) {
        let end = self.final_runs();
        (
            self.runs
                .get(from.min(end)..end)
                .unwrap_or_default()
                .to_vec(),
            self.runs.last().copied(),
        )
    }

    /// Makes every byte written so far durable (the `O_DIRECT` ones included: `fdatasync` also
    /// flushes the device's cache).
    pub fn sync_data(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Another handle on the image file, to sync it from another thread while this one writes.
    pub fn sync_handle(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Takes up the image at `path` where `progress` saw it, its data synced then: what was
    /// written after is forgotten (clusters allocated later are allocated again, and whole, when
    /// their extents are written again). A progress that does not fit the file is refused.
    pub fn resume(path: &Path, progress: &Qcow2Progress) -> Result<Qcow2Writer, Qcow2WriteError> {
        let size = progress.size;
        let mut w = Self::open(path, size, |p| {
            OpenOptions::new().read(true).write(true).open(p)
        })?;
        let invalid = || {
            Qcow2WriteError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the saved progress does not fit this image",
            ))
        };
        let clusters = size.div_ceil(CLUSTER);
        for &(first, count) in &progress.runs {
            let end = first.checked_add(count).ok_or_else(invalid)?;
            if count == 0 || end > clusters {
                return Err(invalid());
            }
            for cluster in first..end {
                if w.lookup(cluster).is_some() {
                    return Err(invalid());
                }
                w.allocate(cluster);
            }
        }
        // The data of every allocation must be there (a layer nothing was allocated in yet, as a
        // later disk's while the first is written, may still be empty).
        if !progress.runs.is_empty() && w.file.metadata()?.len() < w.end {
            return Err(invalid());
        }
        Ok(w)
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), Qcow2WriteError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Qcow2WriteError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// The host offset of the cluster holding guest `offset`, if allocated.
    fn lookup(&self, cluster: u64) -> Option<u64> {
        let table = self.l2.get((cluster / L2_ENTRIES) as usize)?.as_ref()?;
        Some(table[(cluster % L2_ENTRIES) as usize]).filter(|&h| h != 0)
    }

    fn allocate(&mut self, cluster: u64) -> u64 {
        let host = self.end;
        self.end += CLUSTER;
        let slot = (cluster / L2_ENTRIES) as usize;
        let table =
            self.l2[slot].get_or_insert_with(|| vec![0u64; L2_ENTRIES as usize].into_boxed_slice());
        table[(cluster % L2_ENTRIES) as usize] = host;
        match self.runs.last_mut() {
            Some((first, count)) if *first + *count == cluster => *count += 1,
            _ => self.runs.push((cluster, 1)),
        }
        host
    }

    /// Writes `data` at guest `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Qcow2WriteError> {
        self.check(offset, data.len() as u64)?;
        let mut done = self.write_direct(offset, data)?;
        while done < data.len() {
            let at = offset + done as u64;
            let cluster = at / CLUSTER;
            let within = at % CLUSTER;
            let n = ((CLUSTER - within) as usize).min(data.len() - done);
            let piece = &data[done..done + n];
            match self.lookup(cluster) {
                Some(host) => self.file.write_all_at(piece, host + within)?,
                None if n as u64 == CLUSTER => {
                    let host = self.allocate(cluster);
                    self.file.write_all_at(piece, host)?;
                }
                None => {
                    let host = self.allocate(cluster);
                    let mut buf = self.zeros.clone();
                    buf[within as usize..within as usize + n].copy_from_slice(piece);
                    self.file.write_all_at(&buf, host)?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Writes the longest leading run of whole clusters of `data` that are all unallocated with
    /// one `O_DIRECT` write, if the buffer is aligned; returns the bytes written (0 when the
    /// fast path does not apply).
    fn write_direct(&mut self, offset: u64, data: &[u8]) -> Result<usize, Qcow2WriteError> {
        let Some(direct) = self.direct.as_ref() else {
            return Ok(0);
        };
        if !offset.is_multiple_of(CLUSTER) || !(data.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
        {
            return Ok(0);
        }
        let first = offset / CLUSTER;
        let whole = data.len() as u64 / CLUSTER;
        let run = (0..whole)
            .take_while(|&i| self.lookup(first + i).is_none())
            .count() as u64;
        if run == 0 {
            return Ok(0);
        }
        let len = (run * CLUSTER) as usize;
        if let Err(e) = direct.write_all_at(&data[..len], self.end) {
            if e.raw_os_error() == Some(libc::EINVAL) {
                // The file system opened the file with O_DIRECT but refuses this write: from now
                // on everything goes through the page cache (the clusters are written there).
                self.direct = None;
                return Ok(0);
            }
            return Err(e.into());
        }
        self.direct_bytes += len as u64;
        for i in 0..run {
            self.allocate(first + i);
        }
        Ok(len)
    }

    /// Bytes that went to the disk with `O_DIRECT` so far.
    pub fn direct_bytes(&self) -> u64 {
        self.direct_bytes
    }

    /// Makes guest `[offset, offset+len)` read as zeros: clusters never written already do;
    /// allocated ones are overwritten with zeros.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), Qcow2WriteError> {
        self.check(offset, len)?;
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let cluster = at / CLUSTER;
            let within = at % CLUSTER;
            let n = (CLUSTER - within).min(end - at);
            if let Some(host) = self.lookup(cluster) {
                self.file
                    .write_all_at(&self.zeros[..n as usize], host + within)?;
            }
            at += n;
        }
        Ok(())
    }

    /// Writes the metadata and the header; the caller fsyncs and renames the file.
    pub fn finish(mut self) -> Result<File, Qcow2WriteError> {
        // The image's data must be a whole number of clusters long before metadata follows.
        let mut l1 = vec![0u64; self.l2.len()];
        let tables: Vec<(usize, Box<[u64]>)> = self
            .l2
            .iter_mut()
            .enumerate()
            .filter_map(|(i, t)| t.take().map(|t| (i, t)))
            .collect();
        for (i, table) in tables {
            let host = self.end;
            self.end += CLUSTER;
            let mut bytes = Vec::with_capacity(CLUSTER as usize);
            for &entry in table.iter() {
                let value = if entry == 0 { 0 } else { entry | COPIED };
                bytes.extend_from_slice(&value.to_be_bytes());
            }
            self.file.write_all_at(&bytes, host)?;
            l1[i] = host | COPIED;
        }
        let l1_offset = self.end;
        let l1_clusters = ((l1.len() as u64) * 8).div_ceil(CLUSTER).max(1);
        let l1_bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.file.write_all_at(&l1_bytes, l1_offset)?;
        self.end += l1_clusters * CLUSTER;

        // Refcount blocks and table go at the end and must count themselves: grow until stable.
        let data_clusters = self.end / CLUSTER;
        let (mut blocks, mut table_clusters) = (1u64, 1u64);
        loop {
            let total = data_clusters + blocks + table_clusters;
            let need_blocks = total.div_ceil(REFCOUNTS_PER_BLOCK);
            let need_table = (need_blocks * 8).div_ceil(CLUSTER);
            if need_blocks <= blocks && need_table <= table_clusters {
                break;
            }
            blocks = need_blocks.max(blocks);
            table_clusters = need_table.max(table_clusters);
        }
        let blocks_offset = self.end;
        let table_offset = blocks_offset + blocks * CLUSTER;
        let total = data_clusters + blocks + table_clusters;
        let mut table = Vec::with_capacity((table_clusters * CLUSTER) as usize);
        for b in 0..blocks {
            let first = b * REFCOUNTS_PER_BLOCK;
            let mut block = Vec::with_capacity(CLUSTER as usize);
            for c in first..first + REFCOUNTS_PER_BLOCK {
                let refcount: u16 = u16::from(c < total);
                block.extend_from_slice(&refcount.to_be_bytes());
            }
            self.file
                .write_all_at(&block, blocks_offset + b * CLUSTER)?;
            table.extend_from_slice(&(blocks_offset + b * CLUSTER).to_be_bytes());
        }
        table.resize((table_clusters * CLUSTER) as usize, 0);
        self.file.write_all_at(&table, table_offset)?;

        let mut header = Vec::with_capacity(CLUSTER as usize);
        header.extend_from_slice(&0x5146_49fb_u32.to_be_bytes()); // magic "QFI\xfb"
        header.extend_from_slice(&3u32.to_be_bytes()); // version
        header.extend_from_slice(&0u64.to_be_bytes()); // backing file offset
        header.extend_from_slice(&0u32.to_be_bytes()); // backing file size
        header.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
        header.extend_from_slice(&self.size.to_be_bytes());
        header.extend_from_slice(&0u32.to_be_bytes()); // no encryption
        header.extend_from_slice(&u32::try_from(l1.len()).unwrap_or(u32::MAX).to_be_bytes());
        header.extend_from_slice(&l1_offset.to_be_bytes());
        header.extend_from_slice(&table_offset.to_be_bytes());
        header.extend_from_slice(
            &u32::try_from(table_clusters)
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        header.extend_from_slice(&0u32.to_be_bytes()); // no snapshots
        header.extend_from_slice(&0u64.to_be_bytes()); // snapshots offset
        header.extend_from_slice(&0u64.to_be_bytes()); // incompatible features
        header.extend_from_slice(&0u64.to_be_bytes()); // compatible features
        header.extend_from_slice(&0u64.to_be_bytes()); // autoclear features
        header.extend_from_slice(&4u32.to_be_bytes()); // refcount order: 16-bit
        header.extend_from_slice(&HEADER_LENGTH.to_be_bytes());
        header.extend_from_slice(&[0u8; 8]); // end of header extensions
        header.resize(CLUSTER as usize, 0);
        self.file.write_all_at(&header, 0)?;
        self.file.set_len(table_offset + table_clusters * CLUSTER)?;
        Ok(self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&str]) -> (bool, String) {
        let out = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// Writes the same operations into our qcow2 and into a raw file; qemu-img must call the qcow2
    /// clean and identical to the raw file. Returns the bytes written with `O_DIRECT`.
    fn check_against_raw(size: u64, ops: &[(u64, Option<Vec<u8>>, u64)]) -> u64 {
        check_against_raw_from(size, ops, false)
    }

    /// The same, with every data buffer copied to an address aligned for `O_DIRECT` first.
    /// `qemu-img check` finds no error in `img`, and it reads the same as the raw file `raw`.
    fn assert_valid_and_equal(img: &Path, raw: &Path) {
        let (ok, text) = qemu_img(&["check", &img.display().to_string()]);
        assert!(ok && text.contains("No errors"), "qemu-img check: {text}");
        let (same, text) = qemu_img(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            &img.display().to_string(),
            &raw.display().to_string(),
        ]);
        assert!(same, "qemu-img compare: {text}");
    }

    fn check_against_raw_from(
        size: u64,
        ops: &[(u64, Option<Vec<u8>>, u64)],
        aligned: bool,
    ) -> u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let (img, raw) = (dir.path().join("a.qcow2"), dir.path().join("a.raw"));
        let mut w = Qcow2Writer::create(&img, size).expect("create");
        let r = File::create(&raw).expect("raw");
        r.set_len(size).expect("size");
        for (offset, data, len) in ops {
            match data {
                Some(d) => {
                    let mut room = vec![0u8; d.len() + DIRECT_ALIGN];
                    let at = if aligned {
                        room.as_ptr().align_offset(DIRECT_ALIGN)
                    } else {
                        // Never aligned: one byte past an aligned address.
                        (room.as_ptr().align_offset(DIRECT_ALIGN) + 1) % DIRECT_ALIGN
                    };
                    room[at..at + d.len()].copy_from_slice(d);
                    w.write(*offset, &room[at..at + d.len()]).expect("write");
                    r.write_all_at(d, *offset).expect("raw write");
                }
                None => {
                    w.write_zeroes(*offset, *len).expect("zero");
                    r.write_all_at(&vec![0; *len as usize], *offset)
                        .expect("raw zero");
                }
            }
        }
        let direct = w.direct_bytes();
        w.finish().expect("finish").sync_all().expect("sync");
        assert_valid_and_equal(&img, &raw);
        direct
    }

    #[test]
    fn a_writer_taken_up_at_its_saved_progress_after_a_crash_writes_the_same_image() {
        let mib = 1u64 << 20;
        let size = 64 * mib;
        let ops: Vec<(u64, Option<Vec<u8>>, u64)> = vec![
            (0, Some(pattern(CLUSTER as usize, 1)), 0),
            (3 * mib + 100, Some(pattern(200_000, 2)), 0),
            (10 * mib, Some(pattern(mib as usize, 6)), 0),
            (20 * mib, None, 5 * mib),
            // After the checkpoint: new clusters, and changes inside clusters allocated before.
            (40 * mib, Some(pattern(3 * CLUSTER as usize, 3)), 0),
            (3 * mib + 150_000, Some(pattern(10, 4)), 0),
            (10 * mib + 70_000, None, 100_000),
            (5 * mib + 7, Some(pattern(5000, 5)), 0),
        ];
        let aligned = |d: &[u8]| {
            let mut room = vec![0u8; d.len() + DIRECT_ALIGN];
            let at = room.as_ptr().align_offset(DIRECT_ALIGN);
            room[at..at + d.len()].copy_from_slice(d);
            (room, at)
        };
        let apply =
            |w: &mut Qcow2Writer, (offset, data, len): &(u64, Option<Vec<u8>>, u64)| match data {
                Some(d) => {
                    let (room, at) = aligned(d);
                    w.write(*offset, &room[at..at + d.len()]).expect("write");
                }
                None => w.write_zeroes(*offset, *len).expect("zero"),
            };
        let dir = tempfile::tempdir().expect("tempdir");
        let (img, raw) = (dir.path().join("a.qcow2"), dir.path().join("a.raw"));
        let saved = {
            let mut w = Qcow2Writer::create(&img, size).expect("create");
            for op in &ops[..4] {
                apply(&mut w, op);
            }
            w.sync_data().expect("sync");
            let saved = w.progress();
            // Written after the checkpoint, then the process dies: part of what the replay
            // writes again, and a cluster the replay never writes.
            for op in &ops[4..6] {
                apply(&mut w, op);
            }
            apply(&mut w, &(50 * mib, Some(pattern(CLUSTER as usize, 9)), 0));
            saved
        };
        let progress = saved;
        let mut w = Qcow2Writer::resume(&img, &progress).expect("resume");
        for op in &ops[4..] {
            apply(&mut w, op);
        }
        w.finish().expect("finish").sync_all().expect("sync");

        let r = File::create(&raw).expect("raw");
        r.set_len(size).expect("size");
        for (offset, data, len) in &ops {
            match data {
                Some(d) => r.write_all_at(d, *offset).expect("raw write"),
                None => r
                    .write_all_at(&vec![0; *len as usize], *offset)
                    .expect("raw zero"),
            }
        }
        assert_valid_and_equal(&img, &raw);

        // A progress that does not fit is refused, not trusted.
        let overlapping = Qcow2Progress {
            size,
            runs: vec![(0, 4), (2, 1)],
        };
        assert!(Qcow2Writer::resume(&img, &overlapping).is_err());
        let outside = Qcow2Progress {
            size,
            runs: vec![(size / CLUSTER, 1)],
        };
        assert!(Qcow2Writer::resume(&img, &outside).is_err());
        let short = dir.path().join("short.qcow2");
        std::fs::write(&short, [0u8; 100]).unwrap();
        assert!(Qcow2Writer::resume(&short, &progress).is_err());
        // A layer nothing was written to yet (a later disk's) is taken up as it is: still empty.
        let empty = dir.path().join("empty.qcow2");
        let untouched = Qcow2Writer::create(&empty, size)
            .expect("create")
            .progress();
        let mut w = Qcow2Writer::resume(&empty, &untouched).expect("an empty layer resumes");
        w.write(0, &pattern(5000, 1)).expect("write");
        w.finish().expect("finish");
        let (ok, text) = qemu_img(&["check", &empty.display().to_string()]);
        assert!(ok && text.contains("No errors"), "qemu-img check: {text}");
    }

    #[test]
    fn aligned_unaligned_overlapping_and_zeroed_writes_match_a_raw_file() {
        let mib = 1u64 << 20;
        check_against_raw(
            64 * mib,
            &[
                (0, Some(pattern(CLUSTER as usize, 1)), 0),
                (3 * mib + 100, Some(pattern(200_000, 2)), 0),
                (3 * mib + 150_000, Some(pattern(10, 3)), 0),
                (3 * mib + 60_000, None, 70_000),
                (64 * mib - 4096, Some(pattern(4096, 4)), 0),
                (20 * mib, None, 5 * mib),
                (0, Some(pattern(7, 5)), 0),
                // A run of whole clusters written with one call, then changed inside and across it.
                (10 * mib, Some(pattern(mib as usize, 6)), 0),
                (10 * mib + 70_000, Some(pattern(100_000, 7)), 0),
                (11 * mib - 1000, Some(pattern(3 * CLUSTER as usize, 8)), 0),
                (10 * mib + 65_536, None, 65_536),
            ],
        );
    }

    #[test]
    fn aligned_runs_of_new_clusters_go_direct_and_mix_with_buffered_writes() {
        let mib = 1u64 << 20;
        let c = CLUSTER as usize;
        let direct = check_against_raw_from(
            32 * mib,
            &[
                // Whole new clusters: direct.
                (4 * mib, Some(pattern(16 * c, 1)), 0),
                // Rewrites inside and across them: buffered onto the allocated clusters.
                (4 * mib + 1000, Some(pattern(3000, 2)), 0),
                (4 * mib + 15 * CLUSTER, Some(pattern(2 * c, 3)), 0),
                // Whole clusters then a partial one: the run direct, the tail buffered.
                (8 * mib, Some(pattern(2 * c + 4096, 4)), 0),
                // A partial cluster first, then whole clusters over it: the run stops at the
                // allocated cluster, which is written through the page cache.
                (12 * mib + CLUSTER, Some(pattern(100, 5)), 0),
                (12 * mib, Some(pattern(4 * c, 6)), 0),
                (4 * mib + 2 * CLUSTER, None, 3 * CLUSTER),
                // Not cluster-aligned: buffered.
                (20 * mib + 4096, Some(pattern(2 * c, 7)), 0),
            ],
            true,
        );
        // 16 + 2 + 1 clusters took the direct path where the file system allows O_DIRECT.
        let supported = {
            let dir = tempfile::tempdir().expect("tempdir");
            let w = Qcow2Writer::create(&dir.path().join("t.qcow2"), mib).expect("create");
            w.direct.is_some()
        };
        if supported {
            assert_eq!(direct, 19 * CLUSTER);
        }
        // Unaligned buffers never go direct.
        assert_eq!(
            check_against_raw(16 * mib, &[(0, Some(pattern(4 * c, 8)), 0)]),
            0
        );
    }

    #[test]
    fn a_disk_spanning_several_l2_tables_and_refcount_blocks_is_valid() {
        // 3 GiB virtual: 6 L2 tables; writes in each 512 MiB range, and enough clusters for the
        // refcount computation to matter.
        let gib = 1u64 << 30;
        let mut ops = Vec::new();
        for i in 0..6u64 {
            ops.push((i * gib / 2 + 12345, Some(pattern(300_000, i as u8)), 0));
        }
        ops.push((3 * gib - 65536, Some(pattern(65536, 9)), 0));
        check_against_raw(3 * gib, &ops);
    }

    #[test]
    fn an_empty_image_and_bad_extents() {
        check_against_raw(1 << 20, &[]);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = Qcow2Writer::create(&dir.path().join("b.qcow2"), 1 << 20).expect("create");
        assert!(matches!(
            w.write((1 << 20) - 1, &[1, 2]),
            Err(Qcow2WriteError::OutOfRange { .. })
        ));
        assert!(matches!(
            w.write_zeroes(u64::MAX, 2),
            Err(Qcow2WriteError::OutOfRange { .. })
        ));
        assert!(matches!(
            Qcow2Writer::create(&dir.path().join("c.qcow2"), 0),
            Err(Qcow2WriteError::Size(0))
        ));
    }
}
