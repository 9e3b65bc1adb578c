//! Block access to VM disk images through QEMU's own tools.
//!
//! - [`qmp`]: a thin QMP client (QEMU Machine Protocol, JSON over a unix socket).
//! - [`nbd`]: an async NBD client with structured replies and BLOCK_STATUS meta contexts.
//! - [`bitmap`]: change tracking with QEMU persistent dirty bitmaps and image fleecing.
//! - [`scan`]: change tracking by hash scan, into a replication log.
//! - [`qcow2`]: a writer of fresh standalone qcow2 images, for full-image applies.
//! - [`raw`]: qcow2 metadata overlays that give raw disks persistent bitmaps.
//! - [`fingerprint`]: noticing an image changed while nothing tracked it.
//! - [`export`]: supervised qemu-nbd processes that export an image over a private unix socket.
//! - [`points`]: the replica's recovery-point store (one qcow2 backing chain per disk).

mod aligned;
pub mod bitmap;
pub mod export;
pub mod fingerprint;
pub mod nbd;
pub mod points;
pub mod qcow2;
pub mod qmp;
pub mod raw;
pub mod scan;
