//! Extents reported by NBD_CMD_BLOCK_STATUS, with the flag meanings of the contexts we use.

/// `base:allocation`: the range is not allocated (a hole).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the range reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:<name>`: the range was written since the bitmap was created or cleared.
pub const STATE_DIRTY: u32 = 1 << 0;

/// Name of the allocation meta context.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Name of the meta context publishing QEMU dirty bitmap `bitmap`.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// A run of bytes sharing one status in one meta context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

impl Extent {
    /// First byte after the extent.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// `base:allocation`: unallocated.
    pub fn is_hole(&self) -> bool {
        self.flags & STATE_HOLE != 0
    }

    /// `base:allocation`: reads as zeroes, so it never needs to be read or shipped as data.
    pub fn is_zero(&self) -> bool {
        self.flags & STATE_ZERO != 0
    }

    /// `base:allocation`: holds data that must be read.
    pub fn is_data(&self) -> bool {
        !self.is_zero()
    }

    /// `qemu:dirty-bitmap:*`: changed since the bitmap started tracking.
    pub fn is_dirty(&self) -> bool {
        self.flags & STATE_DIRTY != 0
    }
}

/// Appends `next`, merging it into the last extent when they touch and share flags.
pub fn push_merged(list: &mut Vec<Extent>, next: Extent) {
    match list.last_mut() {
        Some(last) if last.end() == next.offset && last.flags == next.flags => {
            last.length += next.length
        }
        _ => list.push(next),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, length: u64, flags: u32) -> Extent {
        Extent {
            offset,
            length,
            flags,
        }
    }

    #[test]
    fn touching_extents_with_equal_flags_merge() {
        let mut v = vec![e(0, 10, 3)];
        push_merged(&mut v, e(10, 5, 3));
        assert_eq!(v, vec![e(0, 15, 3)]);
    }

    #[test]
    fn different_flags_or_gaps_do_not_merge() {
        let mut v = vec![e(0, 10, 3)];
        push_merged(&mut v, e(10, 5, 0));
        push_merged(&mut v, e(20, 5, 0));
        assert_eq!(v, vec![e(0, 10, 3), e(10, 5, 0), e(20, 5, 0)]);
    }

    #[test]
    fn allocation_flags_from_the_spec() {
        // NBD spec, base:allocation: bit 0 NBD_STATE_HOLE, bit 1 NBD_STATE_ZERO.
        assert!(e(0, 1, 1).is_hole() && !e(0, 1, 1).is_zero());
        assert!(e(0, 1, 3).is_zero() && !e(0, 1, 3).is_data());
        assert!(e(0, 1, 0).is_data());
        // qemu dirty bitmaps: bit 0 NBD_STATE_DIRTY.
        assert!(e(0, 1, 1).is_dirty() && !e(0, 1, 0).is_dirty());
    }
}
