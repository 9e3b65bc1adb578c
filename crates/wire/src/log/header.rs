//! The header record: which VM, relationship and point the log belongs to, and the disk table
//! that extents refer to by index. The same `validate` runs in the writer before anything is
//! written and in the reader after decoding, so a writer cannot produce a header a reader rejects.

use std::collections::HashSet;

use uuid::Uuid;

use super::bytes::{Cursor, PutLe};
use super::limits::{MAX_DISKS, MAX_DISK_ID_LEN};

/// Bit 0 of the header flags: the log describes every byte of every disk (initial replication).
const FLAG_FULL_IMAGE: u16 = 1;

/// What kind of recovery point the log carries. On the wire: 1, 2, 3; 0 is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PointType {
    /// A crash-consistent point.
    Standard,
    /// A point taken with the guest's applications quiesced (VSS / fsfreeze).
    ApplicationConsistent,
    /// The final point shipped by a planned failover; nothing is lost after it.
    PlannedFailover,
}

impl PointType {
    fn code(self) -> u8 {
        match self {
            PointType::Standard => 1,
            PointType::ApplicationConsistent => 2,
            PointType::PlannedFailover => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(PointType::Standard),
            2 => Some(PointType::ApplicationConsistent),
            3 => Some(PointType::PlannedFailover),
            _ => None,
        }
    }
}

/// One entry of the disk table; extents name a disk by its position in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// The disk's identifier, 1 to 255 bytes of UTF-8, unique within the log.
    pub id: String,
    /// The disk's size in bytes as the guest sees it.
    pub virtual_size: u64,
}

/// The header of a replication log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogHeader {
    /// The VM the log belongs to.
    pub vm: Uuid,
    /// Index of the replication relationship: 0 primary, 1 extended.
    pub relationship: u8,
    /// Number of this log in the relationship's chain, at least 1.
    pub sequence: u64,
    /// Sequence of the point this log is a delta on; 0 exactly when `full_image` is set.
    pub parent: u64,
    /// When the point was taken, microseconds since the Unix epoch (UTC).
    pub point_time_micros: i64,
    /// What kind of point this is.
    pub point_type: PointType,
    /// The log describes every byte of every disk (initial replication) rather than a delta.
    pub full_image: bool,
    /// The disks, 1 to 64.
    pub disks: Vec<DiskInfo>,
}

/// A header that breaks a rule of the format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the header record ends before its fields do")]
    Short,
    #[error("the header record has bytes after its disk table")]
    TrailingBytes,
    #[error(
        "point type {0} is not 1 (Standard), 2 (ApplicationConsistent) or 3 (PlannedFailover)"
    )]
    InvalidPointType(u8),
    #[error("header flags {0:#06x} set reserved bits")]
    UnknownFlags(u16),
    #[error("the sequence number is 0; sequences start at 1")]
    ZeroSequence,
    #[error("a full image must have parent sequence 0, not {0}")]
    FullImageWithParent(u64),
    #[error("a delta log must name its parent sequence (it is 0)")]
    DeltaWithoutParent,
    #[error("parent sequence {parent} is not before sequence {sequence}")]
    ParentNotBefore { sequence: u64, parent: u64 },
    #[error("the header lists {0} disks; 1 to 64 are allowed")]
    DiskCount(usize),
    #[error("disk {index} has an id of {len} bytes; 1 to 255 are allowed")]
    DiskIdLength { index: usize, len: usize },
    #[error("the id of disk {index} is not UTF-8")]
    DiskIdNotUtf8 { index: usize },
    #[error("disk {index} repeats the id of an earlier disk")]
    DuplicateDiskId { index: usize },
}

impl LogHeader {
    /// Checks every rule the format puts on a header.
    pub fn validate(&self) -> Result<(), HeaderError> {
        if self.sequence == 0 {
            return Err(HeaderError::ZeroSequence);
        }
        match (self.full_image, self.parent) {
            (true, 0) => {}
            (true, parent) => return Err(HeaderError::FullImageWithParent(parent)),
            (false, 0) => return Err(HeaderError::DeltaWithoutParent),
            (false, parent) if parent >= self.sequence => {
                return Err(HeaderError::ParentNotBefore {
                    sequence: self.sequence,
                    parent,
                })
            }
            (false, _) => {}
        }
        if self.disks.is_empty() || self.disks.len() > MAX_DISKS {
            return Err(HeaderError::DiskCount(self.disks.len()));
        }
        let mut seen = HashSet::new();
        for (index, disk) in self.disks.iter().enumerate() {
            let len = disk.id.len();
            if len == 0 || len > MAX_DISK_ID_LEN {
                return Err(HeaderError::DiskIdLength { index, len });
            }
            if !seen.insert(disk.id.as_str()) {
                return Err(HeaderError::DuplicateDiskId { index });
            }
        }
        Ok(())
    }

    /// Appends the header record body. The header must have passed `validate`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.vm.as_bytes());
        out.put_u8(self.relationship);
        out.put_u8(self.point_type.code());
        out.put_u16(if self.full_image { FLAG_FULL_IMAGE } else { 0 });
        out.put_u64(self.sequence);
        out.put_u64(self.parent);
        out.extend_from_slice(&self.point_time_micros.to_le_bytes());
        // Validated: at most 64 disks with ids of at most 255 bytes.
        out.put_u16(self.disks.len() as u16);
        for disk in &self.disks {
            out.put_u8(disk.id.len() as u8);
            out.extend_from_slice(disk.id.as_bytes());
            out.put_u64(disk.virtual_size);
        }
    }

    /// Decodes and validates a header record body.
    pub(crate) fn decode(body: &[u8]) -> Result<Self, HeaderError> {
        let mut c = Cursor::new(body);
        let vm = Uuid::from_bytes(c.array().ok_or(HeaderError::Short)?);
        let relationship = c.u8().ok_or(HeaderError::Short)?;
        let code = c.u8().ok_or(HeaderError::Short)?;
        let point_type = PointType::from_code(code).ok_or(HeaderError::InvalidPointType(code))?;
        let flags = c.u16().ok_or(HeaderError::Short)?;
        if flags & !FLAG_FULL_IMAGE != 0 {
            return Err(HeaderError::UnknownFlags(flags));
        }
        let sequence = c.u64().ok_or(HeaderError::Short)?;
        let parent = c.u64().ok_or(HeaderError::Short)?;
        let point_time_micros = c.i64().ok_or(HeaderError::Short)?;
        let disks = decode_disks(&mut c)?;
        if !c.is_empty() {
            return Err(HeaderError::TrailingBytes);
        }
        let header = LogHeader {
            vm,
            relationship,
            sequence,
            parent,
            point_time_micros,
            point_type,
            full_image: flags & FLAG_FULL_IMAGE != 0,
            disks,
        };
        header.validate()?;
        Ok(header)
    }
}

/// Decodes the disk table; the count is checked before anything is allocated for it.
fn decode_disks(c: &mut Cursor<'_>) -> Result<Vec<DiskInfo>, HeaderError> {
    let count = usize::from(c.u16().ok_or(HeaderError::Short)?);
    if count == 0 || count > MAX_DISKS {
        return Err(HeaderError::DiskCount(count));
    }
    let mut disks = Vec::with_capacity(count);
    for index in 0..count {
        let len = usize::from(c.u8().ok_or(HeaderError::Short)?);
        let raw = c.take(len).ok_or(HeaderError::Short)?;
        let id = std::str::from_utf8(raw).map_err(|_| HeaderError::DiskIdNotUtf8 { index })?;
        let virtual_size = c.u64().ok_or(HeaderError::Short)?;
        disks.push(DiskInfo {
            id: id.to_owned(),
            virtual_size,
        });
    }
    Ok(disks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> LogHeader {
        LogHeader {
            vm: Uuid::from_u128(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff),
            relationship: 1,
            sequence: 7,
            parent: 6,
            point_time_micros: -5,
            point_type: PointType::ApplicationConsistent,
            full_image: false,
            disks: vec![
                DiskInfo {
                    id: "scsi0".into(),
                    virtual_size: 1 << 30,
                },
                DiskInfo {
                    id: "ide1".into(),
                    virtual_size: 512,
                },
            ],
        }
    }

    fn encoded(h: &LogHeader) -> Vec<u8> {
        let mut out = Vec::new();
        h.encode(&mut out);
        out
    }

    #[test]
    fn round_trips_and_puts_fields_where_the_doc_says() {
        let h = header();
        let body = encoded(&h);
        assert_eq!(&body[..4], &[0x00, 0x11, 0x22, 0x33], "uuid in text order");
        assert_eq!(body[16], 1, "relationship");
        assert_eq!(body[17], 2, "ApplicationConsistent");
        assert_eq!(
            &body[20..28],
            &[7, 0, 0, 0, 0, 0, 0, 0],
            "sequence, little-endian"
        );
        assert_eq!(&body[44..46], &[2, 0], "disk count");
        assert_eq!(body[46], 5, "first id length");
        assert_eq!(LogHeader::decode(&body), Ok(h));
    }

    #[test]
    fn rejects_broken_rules() {
        type Change = fn(&mut LogHeader);
        let cases: Vec<(Change, HeaderError)> = vec![
            (|h| h.sequence = 0, HeaderError::ZeroSequence),
            (|h| h.parent = 0, HeaderError::DeltaWithoutParent),
            (|h| h.full_image = true, HeaderError::FullImageWithParent(6)),
            (
                |h| h.parent = 7,
                HeaderError::ParentNotBefore {
                    sequence: 7,
                    parent: 7,
                },
            ),
            (|h| h.disks.clear(), HeaderError::DiskCount(0)),
            (
                |h| h.disks[1].id = "scsi0".into(),
                HeaderError::DuplicateDiskId { index: 1 },
            ),
            (
                |h| h.disks[0].id.clear(),
                HeaderError::DiskIdLength { index: 0, len: 0 },
            ),
        ];
        for (change, expected) in cases {
            let mut h = header();
            change(&mut h);
            assert_eq!(h.validate(), Err(expected.clone()));
            assert_eq!(LogHeader::decode(&encoded(&h)), Err(expected));
        }
    }

    #[test]
    fn rejects_bad_codes_counts_and_shapes() {
        let body = encoded(&header());
        let mut bad = body.clone();
        bad[17] = 0;
        assert_eq!(
            LogHeader::decode(&bad),
            Err(HeaderError::InvalidPointType(0))
        );
        let mut bad = body.clone();
        bad[18] = 2;
        assert_eq!(LogHeader::decode(&bad), Err(HeaderError::UnknownFlags(2)));
        let mut bad = body.clone();
        bad[44] = 65;
        assert_eq!(LogHeader::decode(&bad), Err(HeaderError::DiskCount(65)));
        let mut bad = body.clone();
        bad[47] = 0xff;
        assert_eq!(
            LogHeader::decode(&bad),
            Err(HeaderError::DiskIdNotUtf8 { index: 0 })
        );
        let mut bad = body.clone();
        bad.push(0);
        assert_eq!(LogHeader::decode(&bad), Err(HeaderError::TrailingBytes));
        for len in 0..body.len() {
            assert_eq!(
                LogHeader::decode(&body[..len]),
                Err(HeaderError::Short),
                "prefix {len}"
            );
        }
    }
}
