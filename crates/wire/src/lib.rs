//! Bytes that cross hosts: the host-to-host protocol's messages ([`protocol`]) and the replication log, the unit in which a primary ships one
//! recovery point of one VM to its replica (docs/formats/replication-log.md has the byte tables;
//! this crate follows them field by field).
//!
//! A log is written in one pass by [`LogWriter`] while the primary reads changed extents, and read in
//! one pass by [`LogReader`], which yields extents one at a time. Memory is bounded by the frame
//! limits whatever the size of the log. Nothing read from a log may take effect before the trailer
//! matched: a consumer either calls [`verify`] first and reads the log again, or (as the replica's
//! point store does) writes what [`LogReader`] yields into uncommitted space and commits only when
//! the reader reported the end of a verified log.
//!
//! Everything here is pure apart from the `std::io::Read` / `Write` it is handed: no files, no
//! sockets, no clocks.

mod log;
pub mod protocol;

pub use log::data::{FrameData, DATA_ALIGN};
pub use log::error::{LogDecodeError, LogEncodeError};
pub use log::extent::{Content, Extent, ExtentError};
pub use log::frame::{OwnedContent, OwnedExtent, OwnedFrame};
pub use log::header::{DiskInfo, HeaderError, LogHeader, PointType};
pub use log::limits;
pub use log::reader::{
    trailer_hash, verify, whole_records_prefix, Expect, LogReader, ReaderCheckpoint,
};
pub use log::resumable::ResumableHasher;
pub use log::summary::{LogCounts, LogSummary};
pub use log::writer::{Compression, LogWriter};
