//! The replica's half of a block-hash comparison (docs/protocol.md §5.5), hashed while the primary
//! hashes its own: from the moment a compare session is ready, a background task hashes the images
//! it compares, block after block, and publishes the hashes as it goes. A range the primary sends
//! later takes the hashes already made (waiting for the task while it moves towards them) and
//! reads only the blocks a stalled or stopped task did not reach. So the two disks are read at the same time
//! instead of one after the other, and each replica block is read once.
//!
//! After a reversed unplanned failover, the old primary copies its own disks into its point store
//! when the resync asks it to (replication::reverse), and hashes them while it copies: those maps
//! are kept ([`keep_maps`]) and the session loads them instead of reading the point again.
//!
//! Memory is bounded: at most [`MAX_BLOCKS`] hashes per session (16 bytes each); the disks past
//! that budget are hashed on demand, range by range.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use disk::scan::hashmap::{block_count, MapReader, HASH_LEN};
use uuid::Uuid;

/// Hashes kept per session: 128 MiB, the disks of 512 GiB at 64 KiB blocks.
pub const MAX_BLOCKS: u64 = 8 << 20;
/// Blocks hashed between two publications (64 MiB at 64 KiB blocks); also the primary's step
/// between two looks at a cancel when it hashes its own disks (`engine::seeded::hash_kept`).
pub(crate) const STEP: u64 = 1024;
/// How long a range waits for a task that makes no progress before reading the rest itself.
const WAIT: Duration = Duration::from_secs(10);

type Hash = [u8; HASH_LEN];

struct Inner {
    /// Per image: the hashes of its first blocks, in order.
    hashes: Vec<Mutex<Vec<Hash>>>,
    /// Per image: the task will add no more (done, past the budget, failed or stopped).
    ended: Vec<AtomicBool>,
    stopped: AtomicBool,
    /// Blocks whose hashes ranges took from here, and blocks they had to read themselves.
    served: AtomicU64,
    read: AtomicU64,
}

/// The replica's own block hashes of one compare session. Dropping it stops the task.
pub struct Prehash {
    inner: Arc<Inner>,
}

impl Drop for Prehash {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Prehash {
    /// Nothing hashed yet, nothing running: ranges read what they ask about.
    pub fn idle(images: usize) -> Prehash {
        Prehash {
            inner: Arc::new(Inner {
                hashes: (0..images).map(|_| Mutex::new(Vec::new())).collect(),
                ended: (0..images).map(|_| AtomicBool::new(true)).collect(),
                stopped: AtomicBool::new(false),
                served: AtomicU64::new(0),
                read: AtomicU64::new(0),
            }),
        }
    }

    /// Starts hashing `images` (path, format, virtual size) in the background, in order, as many
    /// whole images as [`MAX_BLOCKS`] allows; an image whose map is in `maps` (one per image, as
    /// [`take_kept`] gives) is read from it instead, when it describes that image, and one with
    /// hashes of its first blocks in `prefixes` (as [`Journal::take_and_open`] gives) goes on after them.
    pub fn start(
        &self,
        images: Vec<(String, String, u64)>,
        block_size: u32,
        maps: Option<Vec<PathBuf>>,
        prefixes: Vec<Vec<Hash>>,
        journal: Option<Journal>,
    ) {
        let mut budget = MAX_BLOCKS;
        let mut planned = Vec::new();
        for (i, (_, _, size)) in images.iter().enumerate() {
            let blocks = block_count(*size, block_size);
            if blocks > budget || i >= self.inner.ended.len() {
                break;
            }
            budget -= blocks;
            self.inner.ended[i].store(false, Ordering::Release);
            planned.push((i, blocks));
        }
        if planned.is_empty() {
            for m in maps.iter().flatten() {
                let _ = std::fs::remove_file(m);
            }
            return;
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Handle::current();
            for (i, blocks) in planned {
                let (image, format, size) = &images[i];
                let map = maps.as_ref().and_then(|m| m.get(i));
                let loaded = map.is_some_and(|m| load_map(&inner, i, m, *size, block_size));
                if loaded {
                    tracing::info!(image = %image, "the replica's hashes of disk {i} come from the map its copy made");
                    if let Some(j) = &journal {
                        let hashes = inner.hashes[i]
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone();
                        j.restart(i);
                        j.record(i, 0, &hashes);
                    }
                }
                let mut from = 0;
                if let Some(prefix) = prefixes.get(i).filter(|p| !loaded && !p.is_empty()) {
                    if prefix.len() as u64 <= blocks {
                        from = prefix.len() as u64;
                        *inner.hashes[i].lock().unwrap_or_else(|p| p.into_inner()) = prefix.clone();
                        tracing::info!(image = %image, blocks = from, "the replica's hashes of the first blocks of disk {i} were kept from an earlier comparison of this point");
                    }
                }
                let hashed = || {
                    hash_image(
                        &rt,
                        &inner,
                        (i, image, format),
                        (from, blocks),
                        block_size,
                        journal.as_ref(),
                    )
                };
                if !loaded {
                    if let Err(e) = hashed() {
                        tracing::warn!(image = %image, "hashing the replica's copy ahead stopped: {e}; ranges read it themselves");
                    }
                }
                inner.ended[i].store(true, Ordering::Release);
            }
            for m in maps.iter().flatten() {
                let _ = std::fs::remove_file(m);
            }
            // Whatever was not reached (stopped): no range waits for it.
            for e in &inner.ended {
                e.store(true, Ordering::Release);
            }
        });
    }

    /// Counts a range's blocks: `served` from here, `read` by the range itself.
    pub fn count(&self, served: u64, read: u64) {
        self.inner.served.fetch_add(served, Ordering::Relaxed);
        self.inner.read.fetch_add(read, Ordering::Relaxed);
    }

    /// (blocks served from here, blocks ranges read themselves) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.inner.served.load(Ordering::Relaxed),
            self.inner.read.load(Ordering::Relaxed),
        )
    }

    /// The task stops at its next step; ranges no longer wait for it.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::Release);
    }

    /// The hashes of image `disk`'s blocks `first..first + count` made so far: all of them, or a
    /// prefix (possibly empty) whose rest the caller hashes. Waits while the task is on its way to
    /// them and moving (it gives up after [`WAIT`] without progress).
    pub async fn take(&self, disk: usize, first: u64, count: u64) -> Vec<Hash> {
        let (Some(hashes), Some(ended)) = (self.inner.hashes.get(disk), self.inner.ended.get(disk))
        else {
            return Vec::new();
        };
        let end = first.saturating_add(count);
        let mut seen = 0;
        let mut deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let done = ended.load(Ordering::Acquire) || self.inner.stopped.load(Ordering::Acquire);
            {
                let h = hashes.lock().unwrap_or_else(|p| p.into_inner());
                let have = h.len() as u64;
                let now = tokio::time::Instant::now();
                if have >= end || done || now >= deadline {
                    let from = usize::try_from(first).unwrap_or(usize::MAX).min(h.len());
                    let to = usize::try_from(end).unwrap_or(usize::MAX).min(h.len());
                    return h[from..to].to_vec();
                }
                if have > seen {
                    seen = have;
                    deadline = now + WAIT;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Loads image `i`'s hashes from `map` when it describes a disk of `size` bytes in blocks of
/// `block_size` and reads back whole and verified; else nothing is published and false returned.
fn load_map(inner: &Inner, i: usize, map: &Path, size: u64, block_size: u32) -> bool {
    let read = || -> Result<Vec<Hash>, String> {
        let mut reader = MapReader::open(map).map_err(|e| e.to_string())?;
        if reader.disk_size != size || reader.block_size != block_size {
            return Err("it describes another disk".into());
        }
        let mut out = Vec::new();
        while let Some(h) = reader.next_hash().map_err(|e| e.to_string())? {
            out.push(h);
        }
        Ok(out)
    };
    match read() {
        Ok(hashes) => {
            *inner.hashes[i].lock().unwrap_or_else(|p| p.into_inner()) = hashes;
            true
        }
        Err(why) => {
            tracing::warn!(map = %map.display(), "the map kept from the copy is not used: {why}");
            false
        }
    }
}

/// `<data>/prehash/<VMID>/`: the maps of the point a reverse took in, kept for its resync.
fn kept_dir(data_dir: &Path, vm: Uuid) -> PathBuf {
    data_dir
        .join("prehash")
        .join(vm.hyphenated().to_string().to_uppercase())
}

/// Keeps `maps` (temporary files, one per disk, moved) as the hashes of `vm`'s point `sequence`
/// whose log hash is `identity`, for the resync that follows. Best effort: without them, the
/// resync reads the point again.
pub fn keep_maps(data_dir: &Path, vm: Uuid, sequence: u64, identity: &str, maps: Vec<PathBuf>) {
    let dir = kept_dir(data_dir, vm);
    remove_kept_maps(&dir);
    let kept = std::fs::create_dir_all(&dir).is_ok()
        && maps.iter().enumerate().all(|(i, m)| {
            let to = dir.join(format!("disk{i}.hashes"));
            // Another file system (the replica storage's): copied.
            std::fs::rename(m, &to).is_ok() || std::fs::copy(m, &to).is_ok()
        })
        && std::fs::write(dir.join("point"), format!("{sequence} {identity}")).is_ok();
    for m in &maps {
        let _ = std::fs::remove_file(m);
    }
    if !kept {
        remove_kept_maps(&dir);
    }
}

/// Deletes the maps [`keep_maps`] kept in `dir`, not the journal beside them ([`prefix_dir`]).
fn remove_kept_maps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name() != "prefix" {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The maps [`keep_maps`] kept for `vm`'s point `sequence` with log hash `identity` (`disks` of
/// them), handed over: the caller deletes them. Maps kept for any other point (another sequence,
/// or the same sequence of another chain) are deleted, and None returned.
pub fn take_kept(
    data_dir: &Path,
    vm: Uuid,
    sequence: u64,
    identity: &str,
    disks: usize,
) -> Option<Vec<PathBuf>> {
    let dir = kept_dir(data_dir, vm);
    let point = std::fs::read_to_string(dir.join("point")).ok()?;
    let maps: Vec<PathBuf> = (0..disks)
        .map(|i| dir.join(format!("disk{i}.hashes")))
        .collect();
    let usable = !identity.is_empty()
        && point.trim() == format!("{sequence} {identity}")
        && maps.iter().all(|m| m.is_file());
    let _ = std::fs::remove_file(dir.join("point"));
    if !usable {
        remove_kept_maps(&dir);
        return None;
    }
    Some(maps)
}

/// `<data>/prehash/<VMID>/prefix/`: the hashes compare sessions made of their point as they went
/// ([`Journal`]), for the next session on the same point (after a pause, spec §13.6, or a restart).
fn prefix_dir(data_dir: &Path, vm: Uuid) -> PathBuf {
    kept_dir(data_dir, vm).join("prefix")
}

/// What kept hashes describe: a point (its sequence and log hash), the block size and the size of
/// each image; empty (nothing is kept or taken) without a log hash.
pub fn prefix_tag(sequence: u64, identity: &str, block_size: u32, sizes: &[u64]) -> String {
    match identity.is_empty() {
        true => String::new(),
        false => format!("{sequence} {identity} {block_size} {sizes:?}"),
    }
}

/// Journal writes and takes, one at a time in this process, and the generation of each journal
/// directory: opening a journal (or forgetting the hashes) makes a new one, and a journal of an
/// older generation records nothing more. So a session being replaced, or one that ended and
/// still writes what it hashed last, never writes into the next session's files (of another point,
/// possibly).
static JOURNALS: Mutex<Option<std::collections::HashMap<PathBuf, u64>>> = Mutex::new(None);

fn journals() -> std::sync::MutexGuard<'static, Option<std::collections::HashMap<PathBuf, u64>>> {
    JOURNALS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A new generation of the journal directory `dir` (the caller holds [`journals`]).
fn next_generation(all: &mut Option<std::collections::HashMap<PathBuf, u64>>, dir: &Path) -> u64 {
    let g = all
        .get_or_insert_with(Default::default)
        .entry(dir.to_path_buf())
        .or_insert(0);
    *g += 1;
    *g
}

/// Where a session's hashes of its point go as they are made ([`prefix_dir`]): `disk<i>`, 16
/// bytes per block from block 0, and `point`: the tag ([`prefix_tag`]) on its first line, then the
/// count of hashes of each disk that are synced. So a later session on the same point — after a
/// pause, a cancel or a restart of this daemon — starts after them ([`Journal::take_and_open`]): a point
/// never changes, so they cannot go stale.
pub struct Journal {
    dir: PathBuf,
    generation: u64,
    tag: String,
    /// Synced hashes per disk, as `point` says.
    counts: Mutex<Vec<u64>>,
    /// A write failed: nothing more is recorded (and what is there stays true).
    broken: AtomicBool,
}

impl Journal {
    /// The hashes recorded of the point `tag` names (as [`take_locked`] gives them, one prefix per
    /// disk of `disks`), and the journal of `vm`'s new session on it, which records on after them:
    /// both under one hold of the lock, so nothing deletes the files between. None without a tag,
    /// or when the directory cannot be made (best effort: a later session then hashes the point
    /// again).
    pub fn take_and_open(
        data_dir: &Path,
        vm: Uuid,
        tag: &str,
        disks: usize,
    ) -> (Vec<Vec<Hash>>, Option<Journal>) {
        let mut all = journals();
        let prefixes = take_locked(&mut all, data_dir, vm, tag, disks);
        if tag.is_empty() {
            return (prefixes, None);
        }
        let dir = prefix_dir(data_dir, vm);
        let counts: Vec<u64> = prefixes.iter().map(|p| p.len() as u64).collect();
        let journal = Journal {
            generation: next_generation(&mut all, &dir),
            dir,
            tag: tag.to_string(),
            counts: Mutex::new(counts),
            broken: AtomicBool::new(false),
        };
        let made = std::fs::create_dir_all(&journal.dir)
            .and_then(|()| journal.write_point())
            .and_then(|()| sync_dir(journal.dir.parent().unwrap_or(&journal.dir)));
        match made {
            Ok(()) => (prefixes, Some(journal)),
            Err(e) => {
                tracing::warn!(%vm, "the hashes of this comparison are not kept: {e}");
                (prefixes, None)
            }
        }
    }

    /// Records the hashes of image `i`'s blocks `from..` (`step`), unless a newer journal of the
    /// same directory was opened since: written, synced, then counted in `point` (renamed into
    /// place).
    fn record(&self, i: usize, from: u64, step: &[Hash]) {
        use std::os::unix::fs::FileExt;
        let all = journals();
        let current = all.as_ref().and_then(|m| m.get(&self.dir)) == Some(&self.generation);
        if !current || self.broken.load(Ordering::Acquire) || step.is_empty() {
            return;
        }
        // Only right after what is counted: a gap would read back as zero hashes (blocks of zeros).
        let counted = self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(i)
            .copied()
            .unwrap_or(0);
        if from != counted {
            tracing::warn!(dir = %self.dir.display(), disk = i, from, counted, "the hashes of this comparison are no longer kept: they would leave a gap");
            self.broken.store(true, Ordering::Release);
            return;
        }
        let written = (|| {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(self.dir.join(format!("disk{i}")))?;
            file.write_all_at(step.as_flattened(), from * HASH_LEN as u64)?;
            file.sync_data()?;
            {
                let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
                if counts.len() <= i {
                    counts.resize(i + 1, 0);
                }
                counts[i] = from + step.len() as u64;
            }
            self.write_point()
        })();
        if let Err(e) = written {
            tracing::warn!(dir = %self.dir.display(), "the hashes of this comparison are no longer kept: {e}");
            self.broken.store(true, Ordering::Release);
        }
    }

    /// Image `i`'s hashes are recorded again from its first block (a kept map replaces them).
    fn restart(&self, i: usize) {
        if let Some(c) = self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(i)
        {
            *c = 0;
        }
    }

    fn write_point(&self) -> std::io::Result<()> {
        let counts = self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let text = format!(
            "{}\n{}\n",
            self.tag,
            counts
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        );
        let tmp = self.dir.join("point.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, self.dir.join("point"))?;
        sync_dir(&self.dir)
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The tag in `dir`'s `point` file and its counts (None: the whole files count, as written before
/// there were counts).
fn read_point(dir: &Path) -> Option<(String, Option<Vec<u64>>)> {
    let text = std::fs::read_to_string(dir.join("point")).ok()?;
    let mut lines = text.lines();
    let tag = lines.next()?.to_string();
    let counts = lines.next().map(|l| {
        l.split_whitespace()
            .map(|n| n.parse().ok())
            .collect::<Option<Vec<u64>>>()
    });
    match counts {
        Some(None) => None, // unreadable
        Some(Some(c)) => Some((tag, Some(c))),
        None => Some((tag, None)),
    }
}

/// [`take_locked`], for the tests.
#[cfg(test)]
fn take_prefixes(data_dir: &Path, vm: Uuid, tag: &str, disks: usize) -> Vec<Vec<Hash>> {
    take_locked(&mut journals(), data_dir, vm, tag, disks)
}

/// The hashes a session on the point `tag` names made of it ([`Journal`]), one (possibly empty)
/// prefix per disk of `disks`: what `point` counts. They stay, for the [`Journal`] of the session
/// that takes them to go on after. Hashes kept for anything else are deleted, and empty prefixes
/// returned. The caller holds [`journals`].
fn take_locked(
    all: &mut Option<std::collections::HashMap<PathBuf, u64>>,
    data_dir: &Path,
    vm: Uuid,
    tag: &str,
    disks: usize,
) -> Vec<Vec<Hash>> {
    let dir = prefix_dir(data_dir, vm);
    let point = read_point(&dir);
    let usable = !tag.is_empty() && point.as_ref().is_some_and(|(t, _)| t == tag);
    if !usable {
        next_generation(all, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        return vec![Vec::new(); disks];
    }
    let counts = point.and_then(|(_, c)| c);
    (0..disks)
        .map(|i| {
            let bytes = std::fs::read(dir.join(format!("disk{i}"))).unwrap_or_default();
            let whole = (bytes.len() / HASH_LEN) as u64;
            let n = counts
                .as_ref()
                .map_or(whole, |c| c.get(i).copied().unwrap_or(0).min(whole));
            bytes
                .chunks_exact(HASH_LEN)
                .take(usize::try_from(n).unwrap_or(0))
                .map(|c| {
                    let mut h = [0u8; HASH_LEN];
                    h.copy_from_slice(c);
                    h
                })
                .collect()
        })
        .collect()
}

/// Drops any hashes kept for `vm` (its points are being replaced: an import, an adoption; or the
/// point they describe was resynchronized).
pub fn forget_prefixes(data_dir: &Path, vm: Uuid) {
    let mut all = journals();
    let dir = prefix_dir(data_dir, vm);
    next_generation(&mut all, &dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An image opened for reading without QEMU in between: the file of a raw image, or the files of
/// another format's chain located by `qemu-img map`.
pub(crate) enum Opened {
    Raw(std::fs::File),
    Mapped(disk::scan::mapped::MappedImage),
}

impl Opened {
    pub(crate) fn open(image: &str, format: &str) -> Result<Opened, String> {
        if format == "raw" {
            return std::fs::File::open(image)
                .map(Opened::Raw)
                .map_err(|e| format!("{image}: {e}"));
        }
        disk::scan::mapped::MappedImage::open(Path::new(image), format)
            .map(Opened::Mapped)
            .map_err(|e| crate::error_chain(&e))
    }

    /// The backing files read besides the image itself (none for a raw image).
    pub(crate) fn backing_files(&self) -> &[String] {
        match self {
            Opened::Raw(_) => &[],
            Opened::Mapped(m) => m.file_names().get(1..).unwrap_or_default(),
        }
    }

    pub(crate) fn source(&self) -> disk::scan::Source<'_> {
        match self {
            Opened::Raw(f) => disk::scan::Source::RawFile(f),
            Opened::Mapped(m) => disk::scan::Source::Mapped(m),
        }
    }
}

/// Hashes blocks `from..blocks` of one image into `inner.hashes[i]` (which holds the hashes of
/// blocks `..from`), [`STEP`] at a time.
fn hash_image(
    rt: &tokio::runtime::Handle,
    inner: &Inner,
    (i, image, format): (usize, &str, &str),
    (from, blocks): (u64, u64),
    block_size: u32,
    journal: Option<&Journal>,
) -> Result<(), String> {
    let opened = Opened::open(image, format)?;
    let mut source = opened.source();
    inner.hashes[i]
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .reserve_exact(usize::try_from(blocks - from).unwrap_or(0));
    let mut next = from;
    let mut step = Vec::with_capacity(STEP as usize);
    // Hashes not yet recorded in the journal (from block `recorded`): it is written at most once
    // a second, and at the image's end, so its syncs cost the hashing next to nothing.
    let mut unrecorded: Vec<Hash> = Vec::new();
    let mut recorded = from;
    let mut last_record = std::time::Instant::now();
    let result = (|| {
        while next < blocks {
            if inner.stopped.load(Ordering::Acquire) {
                return Ok(());
            }
            let n = STEP.min(blocks - next);
            step.clear();
            rt.block_on(disk::scan::hash_blocks(
                &mut source,
                next,
                n,
                block_size,
                &mut step,
            ))
            .map_err(|e| crate::error_chain(&e))?;
            if step.len() as u64 != n {
                return Err(format!("{} hashes for {n} blocks", step.len()));
            }
            inner.hashes[i]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(&step);
            next += n;
            if let Some(j) = journal {
                unrecorded.extend_from_slice(&step);
                if last_record.elapsed() >= JOURNAL_EVERY {
                    j.record(i, recorded, &unrecorded);
                    recorded = next;
                    unrecorded.clear();
                    last_record = std::time::Instant::now();
                }
            }
        }
        Ok(())
    })();
    // Done, stopped (a pause keeps what it hashed) or failed: what was hashed is recorded.
    if let Some(j) = journal {
        j.record(i, recorded, &unrecorded);
    }
    result
}

/// How often a session's hashes are recorded while it hashes ([`Journal`]).
const JOURNAL_EVERY: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use disk::scan::hashmap::{block_hash, MapWriter, ZERO};
    use std::os::unix::fs::FileExt;

    const BS: u32 = 64 << 10;

    /// A fresh directory, removed when dropped.
    struct Dir(PathBuf);
    impl Dir {
        fn new() -> Dir {
            let d = std::env::temp_dir().join(format!("vmr-prehash-{}", Uuid::new_v4()));
            std::fs::create_dir_all(&d).expect("dir");
            Dir(d)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A sparse raw image of `blocks` blocks whose block k (k % 3 == 0) holds the byte k + 1.
    fn image(dir: &Path, blocks: u64) -> (PathBuf, Vec<Hash>) {
        let path = dir.join("disk.raw");
        let f = std::fs::File::create(&path).expect("create");
        f.set_len(blocks * u64::from(BS)).expect("size");
        let mut want = Vec::new();
        for k in 0..blocks {
            if k % 3 == 0 {
                let data = vec![(k + 1) as u8; BS as usize];
                f.write_all_at(&data, k * u64::from(BS)).expect("write");
                want.push(block_hash(&data));
            } else {
                want.push(ZERO);
            }
        }
        (path, want)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_background_hashes_are_the_blocks_hashes_and_ranges_get_them() {
        let dir = Dir::new();
        let blocks = 2 * STEP + 5;
        let (path, want) = image(dir.path(), blocks);
        let p = Prehash::idle(1);
        assert!(
            p.take(0, 0, 10).await.is_empty(),
            "idle: nothing to wait for"
        );
        let size = blocks * u64::from(BS);
        p.start(
            vec![(path.display().to_string(), "raw".into(), size)],
            BS,
            None,
            Vec::new(),
            None,
        );
        assert_eq!(
            p.take(0, STEP - 2, 9).await,
            want[(STEP - 2) as usize..(STEP + 7) as usize]
        );
        assert_eq!(
            p.take(0, blocks - 3, 3).await,
            want[(blocks - 3) as usize..]
        );
        // Past the end, or another disk: only what exists.
        assert_eq!(p.take(0, blocks - 1, 10).await.len(), 1);
        assert!(p.take(1, 0, 1).await.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kept_maps_are_loaded_for_their_point_only_and_a_wrong_one_is_not_used() {
        let dir = Dir::new();
        let data = dir.path().join("data");
        let vm = Uuid::from_u128(9);
        let (path, want) = image(dir.path(), 7);
        let size = 7 * u64::from(BS);
        // A map that lies (every block zero): used only when it is the kept one for the point.
        let write_map = |name: &str, disk_size: u64| {
            let target = dir.path().join(name);
            let mut w = MapWriter::create(&target, BS, disk_size).expect("map");
            for _ in 0..block_count(disk_size, BS) {
                w.push(&ZERO).expect("push");
            }
            w.finish().expect("finish")
        };
        keep_maps(&data, vm, 5, "h5", vec![write_map("a.hashes", size)]);
        assert!(
            take_kept(&data, vm, 6, "h5", 1).is_none(),
            "kept for point 5, not 6"
        );
        assert!(
            take_kept(&data, vm, 5, "h5", 1).is_none(),
            "a wrong point's maps are deleted"
        );

        keep_maps(&data, vm, 5, "h5", vec![write_map("a2.hashes", size)]);
        assert!(
            take_kept(&data, vm, 5, "other", 1).is_none(),
            "point 5 of another chain"
        );
        keep_maps(&data, vm, 5, "h5", vec![write_map("b.hashes", size)]);
        let kept = take_kept(&data, vm, 5, "h5", 1).expect("kept");
        let p = Prehash::idle(1);
        let images = vec![(path.display().to_string(), "raw".to_string(), size)];
        p.start(images.clone(), BS, Some(kept.clone()), Vec::new(), None);
        assert_eq!(
            p.take(0, 0, 7).await,
            vec![ZERO; 7],
            "loaded from the map, not read"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!kept[0].exists(), "a loaded map is deleted");

        // A map of another disk size is not used: the image is read instead.
        keep_maps(&data, vm, 5, "h5", vec![write_map("c.hashes", size * 2)]);
        let kept = take_kept(&data, vm, 5, "h5", 1).expect("kept");
        let p = Prehash::idle(1);
        p.start(images, BS, Some(kept), Vec::new(), None);
        assert_eq!(p.take(0, 0, 7).await, want);
    }

    /// The hashes a session records as it goes, once the journal counts them all.
    async fn recorded(data: &Path, vm: Uuid, tag: &str, blocks: u64) -> Vec<Hash> {
        for _ in 0..500 {
            let kept = take_prefixes(data, vm, tag, 1).remove(0);
            if kept.len() as u64 == blocks {
                return kept;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the session never recorded its {blocks} hashes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hashes_recorded_as_a_session_goes_start_the_next_on_the_same_point_only() {
        let dir = Dir::new();
        let data = dir.path().join("data");
        let vm = Uuid::from_u128(11);
        let blocks = STEP + 7;
        let (path, want) = image(dir.path(), blocks);
        let size = blocks * u64::from(BS);
        let images = vec![(path.display().to_string(), "raw".to_string(), size)];
        let tag = prefix_tag(4, "h4", BS, &[size]);
        // A session on point 4 of chain "h4" records every step as it goes: nothing is kept at
        // its end, so a session cut off by a restart leaves what it hashed.
        let (prefix, journal) = Journal::take_and_open(&data, vm, &tag, 1);
        assert!(prefix[0].is_empty());
        let p = Prehash::idle(1);
        p.start(images.clone(), BS, None, prefix, journal);
        assert_eq!(p.take(0, 0, blocks).await, want);
        assert_eq!(
            recorded(&data, vm, &tag, blocks).await,
            want,
            "all of them, in order"
        );
        assert_eq!(
            take_prefixes(&data, vm, &tag, 1)[0],
            want,
            "they stay for the next session"
        );
        assert!(
            take_prefixes(&data, vm, &prefix_tag(4, "h4", BS, &[size * 2]), 1)[0].is_empty(),
            "another disk size: nothing"
        );
        assert!(
            take_prefixes(&data, vm, &tag, 1)[0].is_empty(),
            "a wrong point's hashes are deleted"
        );

        // Only what `point` counts is taken (a step written but not yet counted when the daemon
        // stopped is not), and the next session records the rest after it.
        let (prefix, journal) = Journal::take_and_open(&data, vm, &tag, 1);
        let p = Prehash::idle(1);
        p.start(images.clone(), BS, None, prefix, journal);
        assert_eq!(recorded(&data, vm, &tag, blocks).await, want);
        let point = prefix_dir(&data, vm).join("point");
        std::fs::write(&point, format!("{tag}\n{STEP}\n")).expect("point");
        let (prefix, journal) = Journal::take_and_open(&data, vm, &tag, 1);
        assert_eq!(prefix[0], want[..STEP as usize]);
        let p = Prehash::idle(1);
        p.start(images.clone(), BS, None, prefix, journal);
        assert_eq!(p.take(0, 0, blocks).await, want);
        assert_eq!(recorded(&data, vm, &tag, blocks).await, want);
        // Written before there were counts (the tag alone): the whole files count.
        std::fs::write(&point, &tag).expect("point");
        assert_eq!(take_prefixes(&data, vm, &tag, 1)[0], want);
        // A journal replaced by a newer one (a session on another point, possibly) records
        // nothing more, nor one whose hashes were forgotten.
        forget_prefixes(&data, vm);
        let old = Journal::take_and_open(&data, vm, &tag, 1)
            .1
            .expect("journal");
        let other = prefix_tag(5, "h5", BS, &[size]);
        let new = Journal::take_and_open(&data, vm, &other, 1)
            .1
            .expect("journal");
        old.record(0, 0, &want[..4]);
        assert!(take_prefixes(&data, vm, &other, 1)[0].is_empty());
        new.record(0, 0, &want[..4]);
        assert_eq!(take_prefixes(&data, vm, &other, 1)[0], want[..4]);
        // Never with a gap after what is counted (it would read back as hashes of zeros).
        new.record(0, 5, &want[5..8]);
        assert_eq!(take_prefixes(&data, vm, &other, 1)[0], want[..4]);
        let again = Journal::take_and_open(&data, vm, &other, 1)
            .1
            .expect("journal");
        again.record(0, 4, &want[4..8]);
        assert_eq!(take_prefixes(&data, vm, &other, 1)[0], want[..8]);
        forget_prefixes(&data, vm);
        again.record(0, 8, &want[8..12]);
        assert!(!prefix_dir(&data, vm).exists());

        // A prefix is taken as it is (here one that lies: zeros), and only the rest is read.
        let p = Prehash::idle(1);
        p.start(images, BS, None, vec![vec![ZERO; STEP as usize]], None);
        let got = p.take(0, 0, blocks).await;
        assert_eq!(got[..STEP as usize], vec![ZERO; STEP as usize][..]);
        assert_eq!(got[STEP as usize..], want[STEP as usize..]);
    }
}
