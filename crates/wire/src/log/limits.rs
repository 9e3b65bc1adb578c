//! Format constants: the magic, the version and every limit a reader enforces before it allocates.
//! They are part of the format (docs/formats/replication-log.md, "Limits"); changing one that a
//! version-1 reader would reject needs a new format version.

/// The first 8 bytes of every log. Do not modify: it identifies the format across all versions.
pub const MAGIC: [u8; 8] = *b"\x89VMRLOG\n";

/// The format version this crate writes unless told otherwise: the highest it reads.
pub const FORMAT_VERSION: u16 = 2;

/// Every format version this crate reads and writes, oldest first. Version 2 differs from version 1
/// only in what the trailer's hash covers (docs/formats/replication-log.md, "Trailer record").
pub const FORMAT_VERSIONS: &[u16] = &[1, 2];

/// Version 2's data digest hashes the data of every Data extent in pieces that end where the disk
/// offset is a multiple of this: one BLAKE3 per 64 KiB block, the block hashes the primary's scan
/// computes anyway.
pub const DIGEST_PIECE: u64 = 64 * 1024;

/// Bytes of the preamble: magic and version.
pub const PREAMBLE_LEN: usize = 10;

/// Most disks a log may describe.
pub const MAX_DISKS: usize = 64;

/// Longest disk id, in bytes (its length is one byte on the wire).
pub const MAX_DISK_ID_LEN: usize = 255;

/// Fixed part of the header record body, before the disk table.
pub const HEADER_FIXED_LEN: usize = 46;

/// Longest header record body: the fixed part and 64 disks with the longest ids.
pub const MAX_HEADER_BODY: usize = HEADER_FIXED_LEN + MAX_DISKS * (1 + MAX_DISK_ID_LEN + 8);

/// Most extent entries in one frame.
pub const MAX_FRAME_EXTENTS: usize = 16 * 1024;

/// Most raw (uncompressed) data bytes in one frame.
pub const MAX_FRAME_RAW: usize = 4 * 1024 * 1024;

/// Most stored (possibly compressed) data bytes in one frame.
pub const MAX_FRAME_STORED: usize = MAX_FRAME_RAW;

/// Fixed part of a frame record body, before the extent table.
pub const FRAME_FIXED_LEN: usize = 13;

/// Bytes of one extent entry.
pub const EXTENT_ENTRY_LEN: usize = 21;

/// Longest frame record body.
pub const MAX_FRAME_BODY: usize =
    FRAME_FIXED_LEN + EXTENT_ENTRY_LEN * MAX_FRAME_EXTENTS + MAX_FRAME_STORED;

/// Exact length of the trailer record body.
pub const TRAILER_BODY_LEN: usize = 80;

/// Bytes of a record head (kind and length).
pub const RECORD_HEAD_LEN: usize = 5;

/// Bytes of a record checksum.
pub const RECORD_CHECKSUM_LEN: usize = 8;
