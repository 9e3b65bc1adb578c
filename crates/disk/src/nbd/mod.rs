//! An async NBD client for the data plane: QEMU's own tools (`qemu-nbd`, `qemu-storage-daemon`,
//! a running QEMU) open the disk image in whatever format it has and export it over a private socket;
//! this client reads, writes, zeroes and trims it, and asks BLOCK_STATUS which ranges are holes, zeroes
//! (`base:allocation`) or dirty (`qemu:dirty-bitmap:<name>`), so holes and zero ranges are never read
//! or shipped as data.
//!
//! Only the fixed newstyle handshake with structured replies is spoken (every QEMU since 2.11 does).
//! Everything the server sends goes through the pure parsers in [`parse`] and the per-request checks
//! in [`assemble`], both bounded and fuzzed (`fuzz/fuzz_targets/nbd_reply.rs`). A malformed reply, an
//! I/O error or a timeout leaves the client broken ([`NbdError::Broken`] afterwards); an error the
//! server reports for one request ([`NbdError::CommandFailed`]) does not.
//!
//! Limits: READ/WRITE at most 32 MiB (or the advertised maximum) per request, split by the client;
//! TRIM / WRITE_ZEROES / BLOCK_STATUS at most 1 GiB per request; a reply chunk at most 64 MiB; at
//! most 2^20 extents per BLOCK_STATUS chunk and 2^20 chunks per reply; option replies at most 64 KiB.
//!
//! ```no_run
//! # async fn demo() -> Result<(), disk::nbd::NbdError> {
//! use disk::nbd::{NbdClient, BASE_ALLOCATION};
//! let mut nbd = NbdClient::connect_unix("/run/x/nbd.sock".as_ref(), "disk0", &[BASE_ALLOCATION]).await?;
//! for extent in nbd.map(BASE_ALLOCATION, 0, nbd.size()).await? {
//!     if extent.is_data() {
//!         let mut buf = vec![0; extent.length as usize];
//!         nbd.read(extent.offset, &mut buf).await?;
//!     }
//! }
//! nbd.disconnect().await
//! # }
//! ```

pub mod assemble;
mod client;
mod conn;
mod error;
mod extent;
mod handshake;
pub mod parse;
pub mod wire;

pub use client::{NbdClient, DEFAULT_TIMEOUT, MAX_NON_DATA_REQUEST};
pub use conn::Transport;
pub use error::{CommandErrorCode, NbdError, NbdProtocolError, OptionErrorCode};
pub use extent::{
    dirty_bitmap_context, push_merged, Extent, BASE_ALLOCATION, STATE_DIRTY, STATE_HOLE, STATE_ZERO,
};
pub use handshake::{BlockSizes, MAX_PAYLOAD};

#[cfg(test)]
mod fake_server_tests;
