//! The host-to-host protocol of docs/protocol.md: resources, JSON messages and error codes. No I/O;
//! the listener and the client live in `vmreplicad`. A log travels as the bytes of
//! docs/formats/replication-log.md and is checked by [`crate::LogReader`].

mod messages;
mod route;

pub use messages::*;
pub use route::{parse_guid, parse_sequence, Route, RouteError};

/// Capabilities this build offers (§3); a primary uses a feature only when the hello's intersection
/// holds its name (`extended` stays reserved).
pub const CAPABILITIES: &[&str] = &[
    "zstd",
    "resume",
    "seeded-compare",
    "planned-failover",
    "reverse",
    "failback",
    "resync-commit",
    "seeded-again",
    "seeded-kept",
];

/// Request headers of a log upload (§5.3).
pub mod headers {
    pub const UPLOAD_ID: &str = "vmreplica-upload-id";
    pub const UPLOAD_OFFSET: &str = "vmreplica-upload-offset";
    pub const LOG_LENGTH: &str = "vmreplica-log-length";
    pub const LOG_HASH: &str = "vmreplica-log-hash";
}
