//! Block access to VM disk images through QEMU's own tools.
//!
//! - [`qmp`]: a thin QMP client (QEMU Machine Protocol, JSON over a unix socket).
//! - [`nbd`]: an async NBD client with structured replies and BLOCK_STATUS meta contexts.

pub mod nbd;
pub mod qmp;
