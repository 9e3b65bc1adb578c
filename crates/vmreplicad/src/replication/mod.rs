//! Host-to-host replication (docs/protocol.md): the recovery server's listener, handlers and
//! apply task, the primary's client, and the certificates both use.

pub mod bandwidth;
pub mod body;
pub mod chain;
pub mod client;
pub mod failback;
pub mod growing;
pub mod journal;
pub mod limits;
pub mod peer_certs;
pub mod prehash;
pub mod primary;
pub mod records;
pub mod replica;
pub mod resync;
pub mod reverse;
pub mod sent;
pub mod server;
pub mod staged;
pub mod tls;
