//! The buffer a frame's data is read (or decompressed) into: its first byte sits at an address
//! aligned to [`DATA_ALIGN`], so a reader can hand the buffer whole to a writer that writes it
//! with `O_DIRECT` ([`super::reader::LogReader::next_frame`]) instead of copying the data into an
//! aligned buffer of its own. Made of a plain `Vec` with padding in front; no unsafe code.

/// Alignment of the first data byte of a [`FrameData`]: what `O_DIRECT` asks of memory on Linux
/// (the logical block size, 4 KiB at most on the disks this runs on).
pub const DATA_ALIGN: usize = 4096;

/// A frame's data, aligned to [`DATA_ALIGN`] (once it has room for any: an empty default has
/// none). Reused from frame to frame: it grows when a frame needs more room, and is zeroed only
/// when it grows.
#[derive(Default)]
pub struct FrameData {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl FrameData {
    /// An empty buffer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> FrameData {
        let mut data = FrameData::default();
        data.grow(capacity);
        data
    }

    /// The bytes held.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    /// How many bytes it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes it can hold without growing.
    pub fn capacity(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Makes it hold `len` bytes (what they are is left over from earlier use) and returns them,
    /// to be filled.
    pub(crate) fn fill(&mut self, len: usize) -> &mut [u8] {
        if self.capacity() < len {
            self.grow(len);
        }
        self.len = len;
        &mut self.buf[self.start..self.start + len]
    }

    /// Replaces the buffer with a zeroed one of room for `capacity` bytes.
    fn grow(&mut self, capacity: usize) {
        let buf = vec![0u8; capacity + DATA_ALIGN];
        let start = buf.as_ptr().align_offset(DATA_ALIGN);
        *self = FrameData { buf, start, len: 0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_starts_aligned_and_keeps_its_room() {
        let mut d = FrameData::default();
        assert!(d.is_empty());
        d.fill(10).copy_from_slice(b"0123456789");
        assert_eq!(d.bytes(), b"0123456789");
        assert_eq!(d.bytes().as_ptr() as usize % DATA_ALIGN, 0);
        let room = d.capacity();
        d.fill(3);
        assert_eq!(d.bytes(), b"012");
        assert_eq!(d.capacity(), room, "a shorter fill does not reallocate");
        d.fill(1 << 20)[..2].copy_from_slice(b"ab");
        assert_eq!(d.len(), 1 << 20);
        assert_eq!(&d.bytes()[..2], b"ab");
        assert_eq!(d.bytes().as_ptr() as usize % DATA_ALIGN, 0);
        let e = FrameData::with_capacity(5000);
        assert!(e.capacity() >= 5000 && e.is_empty());
    }
}
