//! The replication log: format constants, the record framing and the codecs of each record, and
//! the streaming writer and reader built from them.

pub(crate) mod bytes;
pub(crate) mod data;
pub(crate) mod error;
pub(crate) mod extent;
pub(crate) mod frame;
pub(crate) mod header;
pub mod limits;
pub(crate) mod reader;
pub(crate) mod record;
pub mod resumable;
pub(crate) mod summary;
pub(crate) mod writer;
