//! Block access to VM disk images through QEMU's own tools.
//!
//! - [`qmp`]: a thin QMP client (QEMU Machine Protocol, JSON over a unix socket).
//! - [`nbd`]: an async NBD client with structured replies and BLOCK_STATUS meta contexts.
//! - [`scan`]: change tracking by hash scan, into a replication log.
//! - [`export`]: supervised qemu-nbd processes that export an image over a private unix socket.

pub mod export;
pub mod nbd;
pub mod qmp;
pub mod scan;
