//! Extents: a byte range of one disk that either carries data or reads as zeros, and the rules
//! every extent obeys (a known disk, at least one byte, inside the disk's virtual size). The writer
//! and the reader check the same rules with the same function.

use super::header::DiskInfo;

/// One extent as the reader yields it. Data borrows from the reader's current frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent<'a> {
    /// Index into the header's disk table.
    pub disk: u32,
    /// Byte offset in the disk.
    pub offset: u64,
    /// What the range holds.
    pub content: Content<'a>,
}

/// What an extent's byte range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content<'a> {
    /// These bytes.
    Data(&'a [u8]),
    /// This many zero bytes.
    Zero(u64),
}

impl Extent<'_> {
    /// Length of the range in bytes.
    pub fn len(&self) -> u64 {
        match self.content {
            Content::Data(data) => data.len() as u64,
            Content::Zero(len) => len,
        }
    }

    /// Whether the range is empty (never true for an extent read from a valid log).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An extent that breaks a rule of the format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtentError {
    #[error("extent names disk {disk} but the log has {disks} disks")]
    UnknownDisk { disk: u32, disks: usize },
    #[error("extent on disk {disk} at offset {offset} is empty")]
    Empty { disk: u32, offset: u64 },
    #[error(
        "extent on disk {disk} at offset {offset}, {len} bytes, ends past the disk's {size} bytes"
    )]
    OutOfRange {
        disk: u32,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("extent kind {0} is not 1 (data) or 2 (zero)")]
    InvalidKind(u8),
}

/// Checks that `len` bytes at `offset` lie within disk `disk` of `disks`.
pub(crate) fn check_range(
    disks: &[DiskInfo],
    disk: u32,
    offset: u64,
    len: u64,
) -> Result<(), ExtentError> {
    let info = usize::try_from(disk)
        .ok()
        .and_then(|i| disks.get(i))
        .ok_or(ExtentError::UnknownDisk {
            disk,
            disks: disks.len(),
        })?;
    if len == 0 {
        return Err(ExtentError::Empty { disk, offset });
    }
    match offset.checked_add(len) {
        Some(end) if end <= info.virtual_size => Ok(()),
        _ => Err(ExtentError::OutOfRange {
            disk,
            offset,
            len,
            size: info.virtual_size,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ranges_up_to_the_end_and_nothing_past_it() {
        let disks = [DiskInfo {
            id: "a".into(),
            virtual_size: 4096,
        }];
        assert_eq!(check_range(&disks, 0, 0, 4096), Ok(()));
        assert_eq!(check_range(&disks, 0, 4095, 1), Ok(()));
        assert!(matches!(
            check_range(&disks, 0, 4095, 2),
            Err(ExtentError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(&disks, 0, u64::MAX, 2),
            Err(ExtentError::OutOfRange { .. })
        ));
        assert_eq!(
            check_range(&disks, 0, 7, 0),
            Err(ExtentError::Empty { disk: 0, offset: 7 })
        );
        assert_eq!(
            check_range(&disks, 1, 0, 1),
            Err(ExtentError::UnknownDisk { disk: 1, disks: 1 })
        );
    }
}
