//! A byte buffer whose contents start at an address aligned to [`DIRECT_ALIGN`], so whole blocks in
//! it can be read or written with `O_DIRECT` (the kernel wants the memory aligned as well as the
//! file offset and the length). Made of a plain `Vec` with padding in front; no unsafe code.

use crate::qcow2::DIRECT_ALIGN;

#[derive(Default)]
pub(crate) struct AlignedBuf {
    buf: Vec<u8>,
    pad: usize,
    cap: usize,
    len: usize,
}

impl AlignedBuf {
    /// An empty buffer with room for `capacity` bytes (zeroed once, here).
    pub(crate) fn with_capacity(capacity: usize) -> AlignedBuf {
        let buf = vec![0u8; capacity + DIRECT_ALIGN];
        let pad = buf.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf {
            buf,
            pad,
            cap: capacity,
            len: 0,
        }
    }

    /// The bytes held.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[self.pad..self.pad + self.len]
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Room for this many bytes without growing.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }

    /// The whole aligned area, to read into; [`AlignedBuf::set_len`] then says how much holds data.
    pub(crate) fn area_mut(&mut self) -> &mut [u8] {
        let end = self.pad + self.capacity();
        &mut self.buf[self.pad..end]
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity());
    }

    /// Appends `bytes`, growing (to at least `at_least` bytes, and at least doubling) when they do
    /// not fit.
    pub(crate) fn push(&mut self, bytes: &[u8], at_least: usize) {
        let need = self.len + bytes.len();
        if self.capacity() < need {
            let mut grown = AlignedBuf::with_capacity(need.max(at_least).max(2 * self.len));
            grown.area_mut()[..self.len].copy_from_slice(self.bytes());
            grown.len = self.len;
            *self = grown;
        }
        let at = self.pad + self.len;
        self.buf[at..at + bytes.len()].copy_from_slice(bytes);
        self.len = need;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_grows_and_keeps_its_bytes() {
        let mut b = AlignedBuf::default();
        assert_eq!(b.capacity(), 0);
        b.push(b"abc", 8);
        assert_eq!(b.bytes(), b"abc");
        assert!(b.capacity() >= 8);
        assert!((b.bytes().as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
        b.push(&[7u8; 100], 8);
        assert_eq!(b.len(), 103);
        assert_eq!(&b.bytes()[..3], b"abc");
        assert!((b.bytes().as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
        b.clear();
        assert!(b.bytes().is_empty());
        let mut r = AlignedBuf::with_capacity(4096);
        r.area_mut()[..2].copy_from_slice(b"hi");
        r.set_len(2);
        assert_eq!(r.bytes(), b"hi");
        r.set_len(1 << 20);
        assert_eq!(r.len(), 4096);
    }
}
