//! Frame records: a table of extent entries and the raw data of the data extents, stored or
//! zstd-compressed. The writer encodes one frame at a time; the reader loads one frame at a time
//! into a [`LoadedFrame`], which checks the whole frame before the first extent is handed out.

use std::ops::Range;

use super::bytes::{Cursor, PutLe};
use super::data::FrameData;
use super::error::LogDecodeError;
use super::extent::{check_range, Content, Extent, ExtentError};
use super::header::DiskInfo;
use super::limits::{
    EXTENT_ENTRY_LEN, FRAME_FIXED_LEN, MAX_FRAME_EXTENTS, MAX_FRAME_RAW, MAX_FRAME_STORED,
};
use super::summary::LogCounts;

/// How a frame's data is stored. On the wire: 1, 2; 0 is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Stored = 1,
    Zstd = 2,
}

/// What an extent entry describes. On the wire: 1, 2; 0 is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    Data = 1,
    Zero = 2,
}

/// One entry of a frame's extent table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) kind: EntryKind,
    pub(crate) disk: u32,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

impl Entry {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_u8(self.kind as u8);
        out.put_u32(self.disk);
        out.put_u64(self.offset);
        out.put_u64(self.len);
    }

    /// Decodes one entry from `EXTENT_ENTRY_LEN` bytes.
    fn decode(bytes: &[u8]) -> Result<Self, ExtentError> {
        let mut c = Cursor::new(bytes);
        let (code, disk, offset, len) = (c.u8(), c.u32(), c.u64(), c.u64());
        let kind = match code {
            Some(1) => EntryKind::Data,
            Some(2) => EntryKind::Zero,
            other => return Err(ExtentError::InvalidKind(other.unwrap_or(0))),
        };
        match (disk, offset, len) {
            (Some(disk), Some(offset), Some(len)) => Ok(Entry {
                kind,
                disk,
                offset,
                len,
            }),
            // Only reachable with a short slice, which no caller passes.
            _ => Err(ExtentError::InvalidKind(0)),
        }
    }
}

/// Appends a frame body without its data: the data (`stored_len` bytes: the raw data, Stored, or
/// its compression, Zstd) follows it in the record, written by the caller from where it is. The
/// writer keeps within the frame limits.
pub(crate) fn encode_table(
    out: &mut Vec<u8>,
    encoding: Encoding,
    entries: &[Entry],
    raw_len: usize,
    stored_len: usize,
) {
    out.put_u8(encoding as u8);
    out.put_u32(entries.len() as u32);
    out.put_u32(raw_len as u32);
    out.put_u32(stored_len as u32);
    for entry in entries {
        entry.encode(out);
    }
}

/// Where the parts of a frame body are, after the fixed fields were checked: the fixed fields and
/// the table in one buffer, the stored data in another ([`super::record::Source::next_split`]).
#[derive(Debug, Clone)]
struct Layout {
    encoding: Encoding,
    raw_len: usize,
    table: Range<usize>,
}

/// The layout of the frame whose fixed fields and table are `body` and whose stored data is
/// `stored_len` bytes.
fn layout(body: &[u8], stored_len: usize) -> Result<Layout, &'static str> {
    let mut c = Cursor::new(body);
    let (Some(code), Some(count), Some(raw), Some(stored)) = (c.u8(), c.u32(), c.u32(), c.u32())
    else {
        return Err("shorter than its fixed fields");
    };
    let encoding = match code {
        1 => Encoding::Stored,
        2 => Encoding::Zstd,
        _ => return Err("unknown encoding"),
    };
    let (count, raw_len, stored) = (count as usize, raw as usize, stored as usize);
    if count == 0 || count > MAX_FRAME_EXTENTS {
        return Err("extent count is 0 or above the limit");
    }
    if raw_len > MAX_FRAME_RAW || stored > MAX_FRAME_STORED {
        return Err("data length above the limit");
    }
    if encoding == Encoding::Stored && stored != raw_len {
        return Err("stored data length differs from raw length");
    }
    if encoding == Encoding::Zstd && raw_len == 0 {
        return Err("compressed frame without data");
    }
    let table_end = FRAME_FIXED_LEN + count * EXTENT_ENTRY_LEN;
    if body.len() != table_end || stored_len != stored {
        return Err("record length differs from the lengths it declares");
    }
    Ok(Layout {
        encoding,
        raw_len,
        table: FRAME_FIXED_LEN..table_end,
    })
}

/// A loaded frame's raw data: `data` as stored, or `raw`, its decompression.
fn raw_data<'a>(layout: &Layout, data: &'a FrameData, raw: &'a FrameData) -> &'a [u8] {
    match layout.encoding {
        Encoding::Stored => data.bytes(),
        Encoding::Zstd => raw.bytes(),
    }
}

/// The frame the reader is handing out extents from.
pub(crate) struct LoadedFrame {
    /// The body of the record last read; of a frame, its fixed fields and table.
    body: Vec<u8>,
    /// A frame's stored data.
    data: FrameData,
    /// A compressed frame's data, decompressed.
    raw: FrameData,
    layout: Option<Layout>,
    next: usize,
    data_pos: usize,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

/// A frame taken whole from the reader ([`super::reader::LogReader::next_frame`]): its extents not
/// handed out yet, in log order, and the buffer that holds their data.
pub struct OwnedFrame {
    pub extents: Vec<OwnedExtent>,
    /// The frame's raw data (decompressed), aligned to [`super::data::DATA_ALIGN`] when there is
    /// any (a frame of zero extents only has none).
    pub data: FrameData,
}

/// One extent of an [`OwnedFrame`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedExtent {
    /// Index into the header's disk table.
    pub disk: u32,
    /// Byte offset in the disk.
    pub offset: u64,
    pub content: OwnedContent,
}

/// What an [`OwnedExtent`]'s byte range holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedContent {
    /// These bytes of the frame's data.
    Data(Range<usize>),
    /// This many zero bytes.
    Zero(u64),
}

impl LoadedFrame {
    pub(crate) fn new() -> Self {
        LoadedFrame {
            body: Vec::new(),
            data: FrameData::default(),
            raw: FrameData::default(),
            layout: None,
            next: 0,
            data_pos: 0,
            decompressor: None,
        }
    }

    /// The buffers the next record is read into: its body (of a frame, the part before the data)
    /// and a frame's stored data.
    pub(crate) fn buffers(&mut self) -> (&mut Vec<u8>, &mut FrameData) {
        self.layout = None;
        (&mut self.body, &mut self.data)
    }

    /// The buffer the next record body is read into, whole.
    pub(crate) fn buffer(&mut self) -> &mut Vec<u8> {
        self.layout = None;
        self.data.fill(0);
        &mut self.body
    }

    /// Checks the frame now in the buffers against the disk table, adds it to `counts`, and
    /// decompresses its data. Nothing is handed out unless all of this succeeded.
    pub(crate) fn load(
        &mut self,
        offset: u64,
        disks: &[DiskInfo],
        counts: &mut LogCounts,
    ) -> Result<(), LogDecodeError> {
        let layout = layout(&self.body, self.data.len())
            .map_err(|problem| LogDecodeError::BadFrame { offset, problem })?;
        let mut frame = LogCounts {
            frames: 1,
            ..LogCounts::default()
        };
        for bytes in self.body[layout.table.clone()].chunks_exact(EXTENT_ENTRY_LEN) {
            let entry = Entry::decode(bytes)
                .and_then(|e| check_range(disks, e.disk, e.offset, e.len).map(|()| e))
                .map_err(|source| LogDecodeError::BadExtent { offset, source })?;
            frame.add(entry.kind, entry.len);
        }
        if frame.data_bytes != layout.raw_len as u64 {
            return Err(LogDecodeError::BadFrame {
                offset,
                problem: "data extents do not add up to the raw length",
            });
        }
        if layout.encoding == Encoding::Zstd {
            self.decompress(&layout, offset)?;
        }
        counts.merge(&frame);
        self.next = layout.table.start;
        self.data_pos = 0;
        self.layout = Some(layout);
        Ok(())
    }

    fn decompress(&mut self, layout: &Layout, offset: u64) -> Result<(), LogDecodeError> {
        let decompressor = match &mut self.decompressor {
            Some(d) => d,
            empty => empty.insert(
                zstd::bulk::Decompressor::new()
                    .map_err(|source| LogDecodeError::Decompress { offset, source })?,
            ),
        };
        let produced = decompressor
            .decompress_to_buffer(self.data.bytes(), self.raw.fill(layout.raw_len))
            .map_err(|source| LogDecodeError::Decompress { offset, source })?;
        if produced != layout.raw_len {
            return Err(LogDecodeError::BadFrame {
                offset,
                problem: "data decompresses to a different length",
            });
        }
        Ok(())
    }

    /// The body of the record last read into the buffer.
    pub(crate) fn body(&self) -> &[u8] {
        &self.body
    }

    /// The loaded frame's body before its data: the fixed fields and the extent table.
    pub(crate) fn table(&self) -> &[u8] {
        self.layout
            .as_ref()
            .map_or(&[], |l| &self.body[..l.table.end])
    }

    /// Feeds `feed` the loaded frame's data digest (format version 2): the BLAKE3 hash of every
    /// piece ([`super::record::digest_pieces`]) of every Data extent, in table order.
    pub(crate) fn digest(&self, feed: &mut dyn FnMut(&[u8])) {
        let Some(layout) = self.layout.as_ref() else {
            return;
        };
        let data = raw_data(layout, &self.data, &self.raw);
        let mut pos = 0usize;
        for bytes in self.body[layout.table.clone()].chunks_exact(EXTENT_ENTRY_LEN) {
            // `load` decoded and checked every entry, and that the lengths add up.
            let Ok(entry) = Entry::decode(bytes) else {
                return;
            };
            if entry.kind != EntryKind::Data {
                continue;
            }
            let end = pos.saturating_add(usize::try_from(entry.len).unwrap_or(usize::MAX));
            let Some(extent) = data.get(pos..end) else {
                return;
            };
            super::record::digest_pieces(entry.offset, extent, |_, piece| {
                feed(blake3::hash(piece).as_bytes());
            });
            pos = end;
        }
    }

    /// Whether the loaded frame has extents left to hand out.
    pub(crate) fn has_next(&self) -> bool {
        self.layout
            .as_ref()
            .is_some_and(|l| self.next < l.table.end)
    }

    /// The next extent of the loaded frame, or `None` when it is used up.
    pub(crate) fn next_extent(&mut self) -> Option<Extent<'_>> {
        let layout = self.layout.as_ref()?;
        if self.next >= layout.table.end {
            return None;
        }
        let bytes = &self.body[self.next..self.next + EXTENT_ENTRY_LEN];
        self.next += EXTENT_ENTRY_LEN;
        // `load` decoded and checked every entry already.
        let entry = Entry::decode(bytes).ok()?;
        let content = match entry.kind {
            EntryKind::Zero => Content::Zero(entry.len),
            EntryKind::Data => {
                let data = raw_data(layout, &self.data, &self.raw);
                // `load` checked that the data lengths add up to the data's length.
                let start = self.data_pos;
                self.data_pos = start.checked_add(usize::try_from(entry.len).ok()?)?;
                Content::Data(data.get(start..self.data_pos)?)
            }
        };
        Some(Extent {
            disk: entry.disk,
            offset: entry.offset,
            content,
        })
    }

    /// The extents of the loaded frame not handed out yet, with the buffer holding its raw data,
    /// which `spare` replaces; `None` when it has none left.
    pub(crate) fn take(&mut self, spare: FrameData) -> Option<OwnedFrame> {
        let layout = self.layout.as_ref()?;
        if self.next >= layout.table.end {
            return None;
        }
        let mut extents = Vec::with_capacity((layout.table.end - self.next) / EXTENT_ENTRY_LEN);
        for bytes in self.body[self.next..layout.table.end].chunks_exact(EXTENT_ENTRY_LEN) {
            // `load` decoded and checked every entry already, and that the data lengths add up.
            let entry = Entry::decode(bytes).ok()?;
            let content = match entry.kind {
                EntryKind::Zero => OwnedContent::Zero(entry.len),
                EntryKind::Data => {
                    let start = self.data_pos;
                    self.data_pos = start.checked_add(usize::try_from(entry.len).ok()?)?;
                    OwnedContent::Data(start..self.data_pos)
                }
            };
            extents.push(OwnedExtent {
                disk: entry.disk,
                offset: entry.offset,
                content,
            });
        }
        self.next = layout.table.end;
        let data = match layout.encoding {
            Encoding::Stored => std::mem::replace(&mut self.data, spare),
            Encoding::Zstd => std::mem::replace(&mut self.raw, spare),
        };
        Some(OwnedFrame { extents, data })
    }
}
