//! Reading the guest bytes of an image file (a raw file, or the files of a qcow2 chain located by
//! `qemu-img map`) and reading them ahead of a scan.
//!
//! A scan of a turned-off VM's image reads every allocated byte once. Through the page cache that
//! costs a copy of every byte on the scanning thread (a third of its time, measured), and it
//! evicts whatever the host had cached. So a scan reads with `O_DIRECT` into aligned buffers
//! wherever the file system and the alignment allow, on [`READERS`] threads of their own that
//! stay a few reads ahead (without the kernel's readahead, a read waited for right before its bytes
//! are hashed would leave the scan idle). Unaligned pieces, file systems that refuse `O_DIRECT`
//! and any failed direct read go through the page cache as before; the bytes are the same.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use bytes::Bytes;

use crate::aligned::AlignedBuf;
use crate::qcow2::DIRECT_ALIGN;

/// Threads reading ahead of one scan: two reads in flight suit disks that serve several requests at
/// once (on this VM's virtual disk, one and two did the same, within noise).
const READERS: usize = 2;
/// Reads of each reader done and not yet taken by the scan (each up to 4 MiB).
const BUFFERS: usize = 2;

/// One range of the guest disk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Range {
    pub start: u64,
    pub length: u64,
    /// (file index, host offset) for data; None reads as zeros.
    pub data: Option<(usize, u64)>,
}

/// A piece of one read: its place in the read, its length, and where its bytes are (file index
/// and host offset; None reads as zeros).
type Piece = (usize, usize, Option<(usize, u64)>);

/// Where the guest bytes of an image lie in its files.
pub(crate) struct FileMap {
    files: Vec<File>,
    /// The same files opened with `O_DIRECT` (only in a map made for a reader thread).
    direct: Vec<Option<File>>,
    ranges: Arc<[Range]>,
    size: u64,
}

impl FileMap {
    /// `ranges` sorted by `start`, not overlapping; bytes outside them read as zeros.
    pub(crate) fn new(files: Vec<File>, ranges: Vec<Range>, size: u64) -> FileMap {
        let direct = files.iter().map(|_| None).collect();
        FileMap {
            files,
            direct,
            ranges: ranges.into(),
            size,
        }
    }

    /// A raw image: guest offset = file offset.
    pub(crate) fn raw(file: &File) -> io::Result<FileMap> {
        let size = raw_size(file)?;
        let range = Range {
            start: 0,
            length: size,
            data: Some((0, 0)),
        };
        Ok(FileMap::new(vec![file.try_clone()?], vec![range], size))
    }

    pub(crate) fn ranges(&self) -> &[Range] {
        &self.ranges
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// The same map with descriptors of its own for a reader thread, and every file opened again
    /// with `O_DIRECT` where the file system allows it.
    fn for_direct_reads(&self) -> io::Result<FileMap> {
        let mut files = Vec::with_capacity(self.files.len());
        let mut direct = Vec::with_capacity(self.files.len());
        for f in &self.files {
            files.push(f.try_clone()?);
            // A new open file description of the same file (not a dup: O_DIRECT must not
            // change how the caller's descriptor reads).
            direct.push(
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
                    .ok(),
            );
        }
        Ok(FileMap {
            files,
            direct,
            ranges: Arc::clone(&self.ranges),
            size: self.size,
        })
    }

    /// The pieces of `[offset, offset+len)`: (position in the read, length, where the bytes are).
    fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        let first = self
            .ranges
            .partition_point(|r| r.start + r.length <= offset);
        let mut piece = |from: u64, to: u64, data| {
            out.push(((from - offset) as usize, (to - from) as usize, data));
        };
        for r in &self.ranges[first..] {
            if pos >= end {
                break;
            }
            let stop = (r.start + r.length).min(end);
            if stop <= pos {
                continue;
            }
            if r.start > pos {
                piece(pos, r.start.min(end), None);
                pos = r.start.min(end);
                if pos >= end {
                    break;
                }
            }
            piece(
                pos,
                stop,
                r.data.map(|(f, host)| (f, host + (pos - r.start))),
            );
            pos = stop;
        }
        if pos < end {
            piece(pos, end, None);
        }
        out
    }

    /// Reads guest bytes at `offset` into `buf` through the page cache.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (at, n, data) in self.pieces(offset, buf.len() as u64) {
            let into = &mut buf[at..at + n];
            match data {
                Some((file, host)) => self.files[file].read_exact_at(into, host)?,
                None => into.fill(0),
            }
        }
        Ok(())
    }

    /// Reads `len` guest bytes at `offset` into `out`, with `O_DIRECT` for every piece whose file
    /// offset and place in the buffer are aligned.
    fn read_direct(&mut self, offset: u64, len: usize, out: &mut AlignedBuf) -> io::Result<()> {
        if out.capacity() < len + DIRECT_ALIGN {
            // Room to round the last piece up to the alignment.
            *out = AlignedBuf::with_capacity(len + DIRECT_ALIGN);
        }
        out.set_len(0);
        for (at, n, data) in self.pieces(offset, len as u64) {
            let area = out.area_mut();
            let Some((file, host)) = data else {
                area[at..at + n].fill(0);
                continue;
            };
            let align = DIRECT_ALIGN as u64;
            if let (Some(direct), true) = (
                &self.direct[file],
                host.is_multiple_of(align) && at.is_multiple_of(DIRECT_ALIGN),
            ) {
                // The read is rounded up to whole blocks: the bytes past `n` land where the next
                // piece (read after this one) or the buffer's spare room is.
                let span = n.next_multiple_of(DIRECT_ALIGN);
                match read_at_least(direct, &mut area[at..at + span], host, n) {
                    Ok(()) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        // The file system opened the file with O_DIRECT but refuses the read:
                        // from now on this file is read through the page cache.
                        self.direct[file] = None;
                    }
                    Err(_) => {} // the read below says what is wrong
                }
            }
            self.files[file].read_exact_at(&mut area[at..at + n], host)?;
        }
        out.set_len(len);
        Ok(())
    }
}

/// The size of a raw image: a regular file's length, or a block device's (an LVM volume, say),
/// whose `st_size` is 0.
pub fn raw_size(file: &File) -> io::Result<u64> {
    use std::io::Seek;
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        // Only the descriptor's offset moves: every read here says where it reads.
        let mut f = file;
        return f.seek(io::SeekFrom::End(0));
    }
    Ok(meta.len())
}

/// Reads into `buf` from `at` until at least `need` bytes arrived.
fn read_at_least(file: &File, buf: &mut [u8], at: u64, need: usize) -> io::Result<()> {
    let mut got = 0;
    while got < need {
        match file.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // After a short read (the end of the file) the next offset is not aligned: that
            // EINVAL is no refusal of O_DIRECT, so it does not go back as one.
            Err(e) if got > 0 => return Err(io::Error::new(e.kind(), e.to_string())),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads asked for in order, done ahead by [`READERS`] threads (read `k` by thread `k % READERS`,
/// so a slow read holds up only its own turn); taken back in the same order.
pub(crate) struct Prefetch {
    readers: Vec<Reader>,
    /// The reader of the next read asked for, and of the next one taken.
    next_ask: usize,
    next_take: usize,
}

struct Reader {
    asks: std_mpsc::Sender<(u64, usize)>,
    filled: tokio::sync::mpsc::Receiver<io::Result<(u64, Bytes)>>,
}

/// A read's buffer, shared as [`Bytes`]: it goes back to its reader thread once every reference to
/// it is dropped (the scan's, and those of a log sent from memory that kept slices of it instead of
/// copying them: `vmreplicad`'s `GrowingLog`).
struct Pooled {
    buf: AlignedBuf,
    home: std_mpsc::Sender<AlignedBuf>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf.bytes()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let _ = self.home.send(std::mem::take(&mut self.buf));
    }
}

impl Prefetch {
    /// Starts the reader threads on `map`'s files (descriptors of their own). They end when this
    /// is dropped.
    pub(crate) fn start(map: &FileMap, run: usize) -> io::Result<Prefetch> {
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            readers.push(Reader::start(map.for_direct_reads()?, run)?);
        }
        Ok(Prefetch {
            readers,
            next_ask: 0,
            next_take: 0,
        })
    }

    /// Asks for the `len` bytes at guest `offset` (at most the `run` given to [`Prefetch::start`]
    /// for no reallocation).
    pub(crate) fn ask(&mut self, offset: u64, len: usize) {
        let _ = self.readers[self.next_ask].asks.send((offset, len));
        self.next_ask = (self.next_ask + 1) % self.readers.len();
    }

    /// The oldest read asked for and not yet taken: its offset and bytes, whose buffer goes back
    /// to its reader once they are dropped.
    pub(crate) async fn next(&mut self) -> io::Result<(u64, Bytes)> {
        let from = self.next_take;
        self.next_take = (from + 1) % self.readers.len();
        match self.readers[from].filled.recv().await {
            Some(read) => read,
            None => Err(io::Error::other("the scan's reader thread stopped")),
        }
    }
}

impl Reader {
    fn start(mut map: FileMap, run: usize) -> io::Result<Reader> {
        let (asks, ask_rx) = std_mpsc::channel::<(u64, usize)>();
        let (filled_tx, filled) = tokio::sync::mpsc::channel(BUFFERS);
        let (recycle, recycle_rx) = std_mpsc::channel::<AlignedBuf>();
        std::thread::Builder::new()
            .name("scan-read".into())
            .spawn(move || {
                // The buffer of a read that failed: not handed out, so it is used next.
                let mut spare = None;
                for (offset, len) in ask_rx {
                    // A buffer given back, else a new one. Reads done ahead are at most BUFFERS
                    // + 1 (the channel below, and the one waiting to be sent); the rest are held by
                    // the scan or by the log it writes, which bounds what it keeps (a log sent from
                    // memory: its pacing), so this never waits for one: a log that keeps slices of
                    // every buffer would wait for the scan's next read forever.
                    let mut buf = spare
                        .take()
                        .or_else(|| recycle_rx.try_recv().ok())
                        .unwrap_or_else(|| AlignedBuf::with_capacity(run + DIRECT_ALIGN));
                    let read = match map.read_direct(offset, len, &mut buf) {
                        Ok(()) => Ok((
                            offset,
                            Bytes::from_owner(Pooled {
                                buf,
                                home: recycle.clone(),
                            }),
                        )),
                        Err(e) => {
                            spare = Some(buf);
                            Err(e)
                        }
                    };
                    // A scan that ended early dropped its end: this thread stops (after at most
                    // the one read it was doing, which nobody waits for).
                    if filled_tx.blocking_send(read).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Reader { asks, filled })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Reads through the page cache and ahead with O_DIRECT give the same bytes, for aligned
    /// pieces, unaligned ones, holes between ranges and a file whose size is not a block multiple.
    /// A directory on a disk-backed file system (a tmpfs may refuse O_DIRECT).
    fn disk_dir() -> tempfile::TempDir {
        tempfile::tempdir_in("/var/tmp")
            .or_else(|_| tempfile::tempdir())
            .expect("tempdir")
    }

    #[tokio::test]
    async fn direct_reads_ahead_equal_buffered_reads() {
        let dir = disk_dir();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, pattern(3 << 20, 1)).expect("a");
        std::fs::write(&b, pattern((1 << 20) + 1000, 2)).expect("b");
        let files = vec![File::open(&a).expect("a"), File::open(&b).expect("b")];
        let ranges = vec![
            Range {
                start: 0,
                length: 1 << 20,
                data: Some((0, 1 << 20)),
            },
            // A hole from 1 MiB to 1 MiB + 64 KiB (no range), then an unaligned host offset.
            Range {
                start: (1 << 20) + 65536,
                length: 65536,
                data: Some((0, 12345)),
            },
            Range {
                start: (1 << 20) + 131072,
                length: 65536,
                data: None,
            },
            // Up to the end of file b, which is not a multiple of 4096.
            Range {
                start: (1 << 20) + 196608,
                length: (1 << 20) + 1000 - 8192,
                data: Some((1, 8192)),
            },
        ];
        let size = (2 << 20) + 196608 + 1000 - 8192;
        let map = FileMap::new(files, ranges, size);
        let mut whole = vec![0xaau8; size as usize];
        map.read(0, &mut whole).expect("buffered");
        let a_bytes = pattern(3 << 20, 1);
        assert_eq!(&whole[..1 << 20], &a_bytes[1 << 20..2 << 20]);
        assert!(whole[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0));
        assert_eq!(
            &whole[(1 << 20) + 65536..(1 << 20) + 131072],
            &a_bytes[12345..12345 + 65536]
        );

        let run = 1 << 20;
        let mut ahead = Prefetch::start(&map, run).expect("start");
        let asks: Vec<(u64, usize)> = (0..size)
            .step_by(run)
            .map(|o| (o, run.min((size - o) as usize)))
            .chain([(4096, 1 << 19), (65536 * 17 + 500, 70_000)])
            .collect();
        for &(o, n) in &asks {
            ahead.ask(o, n);
        }
        let direct = map.for_direct_reads().expect("reopen");
        if direct.direct.iter().any(Option::is_none) {
            // Then every piece goes through the page cache: still compared below.
            eprintln!("this file system refused O_DIRECT: only the fallback is tested");
        }
        // Every read is kept, as a log sent from memory keeps slices of them: the readers do not
        // wait for buffers to come back.
        let mut kept = Vec::new();
        for (o, n) in asks {
            let (at, got) = ahead.next().await.expect("read");
            assert_eq!(at, o);
            assert_eq!(&got[..], &whole[o as usize..o as usize + n], "at {o}");
            kept.push(got);
        }
        drop(kept);

        // A buffer dropped goes back to its reader and is read into again: reads alternate
        // between the two readers, so the third read is the first one's reader's next.
        let mut ahead = Prefetch::start(&map, run).expect("start");
        ahead.ask(0, 4096);
        let first = ahead.next().await.expect("read").1;
        let at = first.as_ptr();
        drop(first);
        ahead.ask(4096, 4096);
        let _second = ahead.next().await.expect("read").1;
        ahead.ask(8192, 4096);
        let third = ahead.next().await.expect("read").1;
        assert_eq!(&third[..], &whole[8192..12288]);
        assert_eq!(third.as_ptr(), at, "the buffer given back was used again");
    }

    /// A block device's size is what the kernel says (`/sys/block/<dev>/size`, 512-byte sectors),
    /// not its `st_size` of 0. Needs a readable block device (root, or a disk group member).
    #[test]
    fn a_block_device_has_its_size() {
        let mut tried = 0;
        for entry in std::fs::read_dir("/sys/block")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            let sectors: u64 = std::fs::read_to_string(entry.path().join("size"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            if sectors == 0 {
                continue;
            }
            let Ok(dev) = File::open(format!("/dev/{name}")) else {
                continue;
            };
            tried += 1;
            assert_eq!(dev.metadata().expect("stat").len(), 0, "/dev/{name}");
            assert_eq!(raw_size(&dev).expect("size"), sectors * 512, "/dev/{name}");
            let map = FileMap::raw(&dev).expect("map");
            assert_eq!(map.size(), sectors * 512);
        }
        let dir = disk_dir();
        if tried == 0 {
            // None readable here: a loop device over a file of a known size, where allowed.
            let backing = dir.path().join("loop.raw");
            std::fs::write(&backing, vec![0u8; 3 << 20]).expect("backing");
            let attached = std::process::Command::new("losetup")
                .args(["-f", "--show"])
                .arg(&backing)
                .output();
            match attached {
                Ok(out) if out.status.success() => {
                    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    let size = File::open(&dev).and_then(|f| raw_size(&f));
                    let _ = std::process::Command::new("losetup")
                        .args(["-d", &dev])
                        .status();
                    assert_eq!(size.expect("loop size"), 3 << 20, "{dev}");
                }
                _ => eprintln!("no readable block device here: only regular files were tested"),
            }
        }
        let f = dir.path().join("f");
        std::fs::write(&f, [1u8; 1000]).expect("f");
        assert_eq!(raw_size(&File::open(&f).expect("f")).expect("size"), 1000);
    }

    #[tokio::test]
    async fn a_read_past_the_files_end_is_an_error() {
        let dir = disk_dir();
        let a = dir.path().join("a");
        std::fs::write(&a, pattern(8192, 3)).expect("a");
        let range = Range {
            start: 0,
            length: 65536,
            data: Some((0, 0)),
        };
        let map = FileMap::new(vec![File::open(&a).expect("a")], vec![range], 65536);
        let mut ahead = Prefetch::start(&map, 65536).expect("start");
        ahead.ask(0, 65536);
        let err = ahead.next().await.expect_err("an error");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
