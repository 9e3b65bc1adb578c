//! A log sent while it is written (docs/protocol.md §5.3): the build and the upload overlap.
//!
//! Two ways to hold it:
//! - **in a file** ([`GrowingLog::default`]): the writer fills a spool file and reports how far
//!   ([`GrowingFile`]); the upload reads the file behind it, and a re-send after a broken
//!   connection reads it again from wherever the replica's whole records end;
//! - **in memory** ([`GrowingLog::in_memory`], a log of the replication cycle or of the network
//!   initial replication): the writer's bytes go into a queue the upload takes them from, and no
//!   spool is written. Writing every byte of a log to a page-cache file and reading it back cost
//!   the primary's scan thread most of its time (docs/performance.md, "A seventh look"). The writer
//!   runs at most [`AHEAD`] bytes ahead of the upload (the scan waits for room: [`disk::scan::Pace`]),
//!   and the last [`KEEP`] bytes sent stay for a resume: what a broken connection loses is what the
//!   replica had not yet written down, at most its flow-control windows and a partial record, far
//!   less than that. A resume from further back than is kept is refused with a clear error, and the
//!   log is built again by the next attempt. Whole frames of data the scan writes straight from a
//!   read's buffer are kept as slices of that buffer, not copied ([`disk::scan::Pace::lend`]); the
//!   buffer is read into again only once the last slice of it is dropped.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;

/// Most bytes an in-memory log's writer runs ahead of its upload.
pub const AHEAD: u64 = 16 << 20;
/// Bytes an in-memory log keeps behind the furthest point sent, for a resume: more than a replica
/// can lose of it (what was in flight: its flow-control windows and a partial record).
pub const KEEP: u64 = 80 << 20;
/// [`KEEP`] for the network initial replication's log, which the replica stages: more, since a
/// restart of the replica also loses its bytes since the checkpoint it continues from
/// (replication::staged::CHECKPOINT_MAX_LAG, checked there).
pub const KEEP_STAGED: u64 = 112 << 20;

/// The buffer in front of a log's output ([`LogOut`]), for the small records. Smaller than a frame
/// of data, so a whole frame written from a scan's read passes through it to the output in one
/// write, unbuffered, and an in-memory log keeps it as a slice of the read
/// ([`disk::scan::Pace::lend`]).
pub const WRITE_BUFFER: usize = 1 << 20;
const _: () = assert!(WRITE_BUFFER < wire::limits::MAX_FRAME_RAW);

/// A log that may still be being written while it is sent: how much of it is written, and once
/// complete its hash and length.
#[derive(Default)]
pub struct GrowingLog {
    written: AtomicU64,
    end: Mutex<Option<Result<(String, u64), String>>>,
    pub(super) changed: tokio::sync::Notify,
    memory: Option<Memory>,
}

/// The bytes of an in-memory log not yet dropped.
struct Memory {
    kept: Mutex<Kept>,
    /// The upload took bytes, or gave up.
    room: tokio::sync::Notify,
    /// The read the scan writing the log is on ([`disk::scan::Pace::lend`]): bytes written from
    /// it are kept as slices of it, not copied.
    lent: Mutex<Option<Bytes>>,
}

#[derive(Default)]
struct Kept {
    /// Bytes kept behind the furthest offset sent ([`KEEP`] or [`KEEP_STAGED`]).
    keep: u64,
    /// Consecutive pieces, the first starting at `base`.
    chunks: VecDeque<Bytes>,
    base: u64,
    /// The furthest offset handed to a connection.
    sent: u64,
    /// The upload gave up: the writer stops.
    closed: bool,
    /// ... before the log was complete or had failed: a build that then fails failed because of it.
    closed_first: bool,
}

impl Kept {
    /// Drops what lies more than `keep` behind the furthest byte sent.
    fn trim(&mut self) {
        let floor = self.sent.saturating_sub(self.keep);
        while let Some(first) = self.chunks.front() {
            let len = first.len() as u64;
            if self.base + len > floor {
                break;
            }
            self.base += len;
            self.chunks.pop_front();
        }
    }
}

/// What [`GrowingLog::take`] found at an offset.
pub(super) enum Taken {
    Bytes(Bytes),
    /// Not written yet.
    NotYet,
    /// Dropped already: kept bytes start at this offset.
    Gone(u64),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GrowingLog {
    /// A log written into memory and sent from there, without a spool file, keeping the last
    /// `keep` bytes sent for a resume ([`KEEP`], or [`KEEP_STAGED`] for a staged upload).
    pub fn in_memory(keep: u64) -> GrowingLog {
        GrowingLog {
            memory: Some(Memory {
                kept: Mutex::new(Kept {
                    keep,
                    ..Kept::default()
                }),
                room: tokio::sync::Notify::new(),
                lent: Mutex::new(None),
            }),
            ..GrowingLog::default()
        }
    }

    /// True for a log held in memory (no spool file).
    pub fn is_memory(&self) -> bool {
        self.memory.is_some()
    }

    /// Marks `bytes` as written (a log written before its upload started).
    pub fn advance_to(&self, bytes: u64) {
        self.written.store(bytes, Ordering::Release);
    }

    pub(super) fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    pub(super) fn end(&self) -> Option<Result<(String, u64), String>> {
        lock(&self.end).clone()
    }

    /// The writer finished the log: its trailer hash and length.
    pub fn finish(&self, hash: String, bytes: u64) {
        *lock(&self.end) = Some(Ok((hash, bytes)));
        self.changed.notify_waiters();
    }

    /// The writer gave up: the upload stops with `why`. Not once the log is complete (a cancel
    /// that came too late: the upload goes on to its commit).
    pub fn fail(&self, why: String) {
        lock(&self.end).get_or_insert(Err(why));
        self.changed.notify_waiters();
    }

    /// Waits until more is written or the log ended (at most a few milliseconds).
    pub(super) async fn wait(&self) {
        let _ = tokio::time::timeout(Duration::from_millis(5), self.changed.notified()).await;
    }

    /// Appends `buf` to an in-memory log: a slice of the lent read if it lies in it, else a copy.
    /// Fails once the upload gave up ([`GrowingLog::close`]), so the build stops instead of reading
    /// the rest of the disk for nothing.
    fn append(&self, buf: &[u8]) -> std::io::Result<()> {
        let Some(m) = &self.memory else {
            return Err(std::io::Error::other("not an in-memory log"));
        };
        let piece = match &*lock(&m.lent) {
            Some(lent) if within(lent, buf) => lent.slice_ref(buf),
            _ => Bytes::copy_from_slice(buf),
        };
        {
            let mut kept = lock(&m.kept);
            if kept.closed {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "the upload of this log stopped",
                ));
            }
            kept.chunks.push_back(piece);
            // Bytes before a resume's offset ([`GrowingLog::skip_to`]) are never sent.
            kept.trim();
        }
        self.written.fetch_add(buf.len() as u64, Ordering::AcqRel);
        self.changed.notify_waiters();
        Ok(())
    }

    /// The upload gave up for good (it returned, whatever the outcome): an in-memory log's writer
    /// is no longer held back and its next write fails.
    pub fn close(&self) {
        if let Some(m) = &self.memory {
            let open = self.end().is_none();
            let mut kept = lock(&m.kept);
            kept.closed = true;
            kept.closed_first = open;
            drop(kept);
            m.room.notify_waiters();
        }
    }

    /// True when the upload of an in-memory log gave up before the log was complete or had failed:
    /// a build that failed then stopped because of the upload, whose error says why.
    pub fn closed_first(&self) -> bool {
        self.memory
            .as_ref()
            .is_some_and(|m| lock(&m.kept).closed_first)
    }

    /// The first offset an in-memory log still holds (0 for a file).
    pub(super) fn kept_from(&self) -> u64 {
        self.memory.as_ref().map_or(0, |m| lock(&m.kept).base)
    }

    /// The furthest byte of an in-memory log sent so far (0 for a file).
    pub(super) fn furthest_sent(&self) -> u64 {
        self.memory.as_ref().map_or(0, |m| lock(&m.kept).sent)
    }

    /// Up to `max` bytes of an in-memory log from offset `from`, without copying; marks them sent
    /// and drops what lies more than its keep behind the furthest byte sent.
    pub(super) fn take(&self, from: u64, max: usize) -> Taken {
        let Some(m) = &self.memory else {
            return Taken::NotYet;
        };
        let mut kept = lock(&m.kept);
        if from < kept.base {
            return Taken::Gone(kept.base);
        }
        let mut at = kept.base;
        let mut found = None;
        for c in &kept.chunks {
            let len = c.len() as u64;
            if from < at + len {
                let start = (from - at) as usize;
                let end = c.len().min(start + max);
                found = Some(c.slice(start..end));
                break;
            }
            at += len;
        }
        let Some(piece) = found else {
            return Taken::NotYet;
        };
        kept.sent = kept.sent.max(from + piece.len() as u64);
        kept.trim();
        drop(kept);
        m.room.notify_waiters();
        Taken::Bytes(piece)
    }

    /// The upload of an in-memory log starts at `offset`, the replica holding the bytes before it
    /// from an earlier build of the same log (an initial replication run again after the primary
    /// restarted): the writer is not held back before it, and those bytes are dropped as written.
    pub(super) fn skip_to(&self, offset: u64) {
        if let Some(m) = &self.memory {
            let mut kept = lock(&m.kept);
            kept.sent = kept.sent.max(offset);
            kept.trim();
            drop(kept);
            m.room.notify_waiters();
        }
    }

    /// Waits while an in-memory log's writer is more than [`AHEAD`] bytes ahead of the upload;
    /// false once the upload gave up ([`GrowingLog::close`]): the writer should stop.
    async fn wait_for_room(&self) -> bool {
        let Some(m) = &self.memory else {
            return true;
        };
        loop {
            let more = m.room.notified();
            tokio::pin!(more);
            more.as_mut().enable();
            {
                let kept = lock(&m.kept);
                if kept.closed {
                    return false;
                }
                if self.written().saturating_sub(kept.sent) <= AHEAD {
                    return true;
                }
            }
            // A missed wake-up costs at most this long.
            let _ = tokio::time::timeout(Duration::from_millis(50), more).await;
        }
    }
}

impl disk::scan::Pace for GrowingLog {
    fn room(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(self.wait_for_room())
    }

    fn lend(&self, bytes: Option<Bytes>) {
        if let Some(m) = &self.memory {
            *lock(&m.lent) = bytes;
        }
    }
}

/// True when `part` lies within `whole`'s bytes ([`Bytes::slice_ref`] then takes it without a
/// copy).
fn within(whole: &Bytes, part: &[u8]) -> bool {
    let (start, end) = (
        whole.as_ptr() as usize,
        whole.as_ptr() as usize + whole.len(),
    );
    let at = part.as_ptr() as usize;
    !part.is_empty() && at >= start && at + part.len() <= end
}

/// Waits for the log to be complete: its hash and length, or why it could not be written.
pub(super) async fn ended(log: &GrowingLog) -> Result<(String, u64), super::client::PeerError> {
    loop {
        match log.end() {
            Some(Ok(done)) => return Ok(done),
            Some(Err(why)) => {
                return Err(super::client::PeerError::Local(format!(
                    "reading the log failed: {why}"
                )))
            }
            None => log.wait().await,
        }
    }
}

/// The file a growing log is written to; every write is reported to the [`GrowingLog`].
pub struct GrowingFile {
    pub file: std::fs::File,
    pub log: Arc<GrowingLog>,
}

impl std::io::Write for GrowingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.log.written.fetch_add(n as u64, Ordering::AcqRel);
        self.log.changed.notify_waiters();
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Where a log's bytes go: a file (an export), a spool file sent while written, or memory.
pub enum LogOut {
    File(std::fs::File),
    Growing(GrowingFile),
    Memory(Arc<GrowingLog>),
}

impl LogOut {
    /// The output for a log at `path`: memory for an in-memory growing log (no file is created),
    /// else the file, created, reporting to `growing` if given.
    pub fn create(
        path: &std::path::Path,
        growing: Option<Arc<GrowingLog>>,
    ) -> std::io::Result<LogOut> {
        match growing {
            Some(log) if log.is_memory() => Ok(LogOut::Memory(log)),
            Some(log) => Ok(LogOut::Growing(GrowingFile {
                file: std::fs::File::create(path)?,
                log,
            })),
            None => Ok(LogOut::File(std::fs::File::create(path)?)),
        }
    }
}

impl std::io::Write for LogOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            LogOut::File(f) => f.write(buf),
            LogOut::Growing(g) => g.write(buf),
            LogOut::Memory(m) => m.append(buf).map(|()| buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            LogOut::File(f) => f.flush(),
            LogOut::Growing(g) => g.flush(),
            LogOut::Memory(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn bytes_of(t: Taken) -> Bytes {
        match t {
            Taken::Bytes(b) => b,
            Taken::NotYet => panic!("not yet"),
            Taken::Gone(k) => panic!("gone, kept from {k}"),
        }
    }

    #[test]
    fn pieces_are_taken_across_writes_and_dropped_only_past_keep() {
        let log = Arc::new(GrowingLog::in_memory(KEEP));
        let mut out = LogOut::Memory(log.clone());
        let piece = vec![7u8; 1 << 20];
        let (written, sent) = (KEEP + (32 << 20), KEEP + (22 << 20));
        for _ in 0..written >> 20 {
            out.write_all(&piece).unwrap();
        }
        assert_eq!(log.written(), written);
        // A take stops at a write's end and never copies.
        let first = bytes_of(log.take(100, 4 << 20));
        assert_eq!(first.len(), (1 << 20) - 100);
        let mut at = 0u64;
        while at < sent {
            at += bytes_of(log.take(at, 1 << 20)).len() as u64;
        }
        // KEEP + 22 MiB sent: what lies more than KEEP behind is gone, the rest is still there.
        assert_eq!(log.kept_from(), sent - KEEP);
        assert!(matches!(log.take(0, 10), Taken::Gone(k) if k == sent - KEEP));
        assert_eq!(bytes_of(log.take(sent - KEEP, 10)).len(), 10);
        assert!(matches!(log.take(written, 10), Taken::NotYet));
    }

    #[test]
    fn bytes_written_from_the_lent_read_are_kept_as_slices_of_it() {
        use disk::scan::Pace;
        let log = Arc::new(GrowingLog::in_memory(KEEP));
        let mut out = LogOut::Memory(log.clone());
        let read = Bytes::from(vec![9u8; 1 << 20]);
        log.lend(Some(read.clone()));
        out.write_all(b"head").unwrap(); // not in the read: copied
        out.write_all(&read[4096..8192]).unwrap(); // a slice of it
        log.lend(None);
        out.write_all(&read[..10]).unwrap(); // no longer lent: copied
        assert_eq!(&bytes_of(log.take(0, 100))[..], b"head");
        let slice = bytes_of(log.take(4, 1 << 20));
        assert_eq!(slice.len(), 4096);
        assert_eq!(slice.as_ptr(), read[4096..].as_ptr(), "kept without a copy");
        let copied = bytes_of(log.take(4 + 4096, 100));
        assert_eq!(&copied[..], &read[..10]);
        assert_ne!(copied.as_ptr(), read.as_ptr());
    }

    #[tokio::test]
    async fn a_log_resumed_at_an_offset_is_written_up_to_it_without_waiting_or_keeping_it() {
        let log = Arc::new(GrowingLog::in_memory(KEEP));
        let mut out = LogOut::Memory(log.clone());
        let skip = KEEP + 3 * AHEAD;
        log.skip_to(skip);
        let piece = vec![5u8; 1 << 20];
        for _ in 0..(skip + AHEAD) >> 20 {
            assert!(
                tokio::time::timeout(Duration::from_secs(1), log.wait_for_room())
                    .await
                    .expect("the writer is not held back before the offset"),
            );
            out.write_all(&piece).unwrap();
        }
        // Up to AHEAD past the offset, then it waits for the upload again.
        out.write_all(&piece).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), log.wait_for_room())
                .await
                .is_err(),
            "more than AHEAD past the offset holds the writer"
        );
        // Only KEEP before the offset is still held, and the upload takes from the offset.
        assert_eq!(log.kept_from(), skip - KEEP);
        assert!(matches!(log.take(0, 10), Taken::Gone(k) if k == skip - KEEP));
        assert_eq!(bytes_of(log.take(skip, 1 << 20)).len(), 1 << 20);
    }

    #[tokio::test]
    async fn the_writer_waits_for_the_upload_and_stops_when_it_gives_up() {
        let log = Arc::new(GrowingLog::in_memory(KEEP));
        let mut out = LogOut::Memory(log.clone());
        out.write_all(&vec![1u8; (AHEAD + 1) as usize]).unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(200), log.wait_for_room()).await;
        assert!(
            waiting.is_err(),
            "more than AHEAD unsent must hold the writer"
        );
        let _ = log.take(0, 1 << 20);
        assert!(
            tokio::time::timeout(Duration::from_secs(1), log.wait_for_room())
                .await
                .expect("room after a take"),
            "an open log's writer goes on"
        );
        out.write_all(&vec![1u8; (AHEAD * 2) as usize]).unwrap();
        log.close();
        assert!(
            !tokio::time::timeout(Duration::from_secs(1), log.wait_for_room())
                .await
                .expect("a closed log holds nobody"),
            "a closed log's writer stops"
        );
        let err = out.write_all(b"x").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    }
}
