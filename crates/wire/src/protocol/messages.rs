//! The JSON bodies of docs/protocol.md §3-§5, with the rules a decoded value must meet. Every
//! struct denies unknown fields; [`decode`] also bounds the size and nesting of the text first.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The protocol versions this build speaks.
pub const PROTOCOL_VERSIONS: &[u16] = &[1];
/// Largest JSON body in either direction (`max_json_bytes`).
pub const MAX_JSON_BYTES: usize = 64 * 1024;
/// Deepest nesting of arrays and objects accepted.
pub const MAX_JSON_DEPTH: usize = 16;
/// Content type of a replication log body.
pub const LOG_CONTENT_TYPE: &str = "application/vnd.vmreplica.log";

/// Why a JSON body was refused (400 `BadRequest` or 413 `TooLarge`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("the body has {0} bytes; at most {MAX_JSON_BYTES} are accepted")]
    TooLarge(usize),
    #[error("the body nests deeper than {MAX_JSON_DEPTH} levels")]
    TooDeep,
    #[error("the body is not a valid message: {0}")]
    Json(String),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> MessageError {
    MessageError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// A message with rules beyond its shape.
pub trait Validate {
    fn validate(&self) -> Result<(), MessageError>;
}

/// Decodes and validates a JSON body of type `T`.
pub fn decode<T: DeserializeOwned + Validate>(body: &[u8]) -> Result<T, MessageError> {
    if body.len() > MAX_JSON_BYTES {
        return Err(MessageError::TooLarge(body.len()));
    }
    check_depth(body)?;
    let value: T = serde_json::from_slice(body).map_err(|e| MessageError::Json(e.to_string()))?;
    value.validate()?;
    Ok(value)
}

/// Refuses nesting deeper than [`MAX_JSON_DEPTH`] before serde sees the text.
fn check_depth(body: &[u8]) -> Result<(), MessageError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(MessageError::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn check_text(field: &'static str, s: &str, min: usize, max: usize) -> Result<(), MessageError> {
    let n = s.chars().count();
    if n < min || n > max {
        return Err(invalid(
            field,
            format!("must have {min} to {max} characters, has {n}"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

fn check_versions(field: &'static str, v: &[u16]) -> Result<(), MessageError> {
    if v.is_empty() || v.len() > 16 || v.contains(&0) {
        return Err(invalid(
            field,
            "must list 1 to 16 versions, each at least 1",
        ));
    }
    Ok(())
}

fn check_capabilities(caps: &[String]) -> Result<(), MessageError> {
    if caps.len() > 32 {
        return Err(invalid("capabilities", "at most 32 names"));
    }
    for c in caps {
        let ok = (1..=32).contains(&c.len())
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(invalid(
                "capabilities",
                format!("{c:?} is not [a-z0-9-]{{1,32}}"),
            ));
        }
    }
    Ok(())
}

/// `POST /vmreplica/hello` request (§3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub protocol_versions: Vec<u16>,
    pub log_format_versions: Vec<u16>,
    pub capabilities: Vec<String>,
    pub product: String,
    pub host: String,
}

impl Validate for Hello {
    fn validate(&self) -> Result<(), MessageError> {
        check_versions("protocol_versions", &self.protocol_versions)?;
        check_versions("log_format_versions", &self.log_format_versions)?;
        check_capabilities(&self.capabilities)?;
        check_text("product", &self.product, 0, 256)?;
        check_text("host", &self.host, 0, 256)
    }
}

/// The replica's limits, announced in the hello answer (§8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_json_bytes: u64,
    pub max_log_bytes: u64,
    pub max_parallel_uploads: u32,
    pub max_pending_apply: u32,
    pub compare_block_sizes: Vec<u32>,
    pub max_compare_blocks: u32,
    pub idle_timeout_secs: u32,
}

/// `POST /vmreplica/hello` answer (§3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloResponse {
    pub protocol_version: u16,
    pub log_format_version: u16,
    pub capabilities: Vec<String>,
    pub product: String,
    pub host: String,
    pub authorized_as: String,
    pub trust_group: String,
    pub limits: Limits,
}

impl Validate for HelloResponse {
    fn validate(&self) -> Result<(), MessageError> {
        if self.protocol_version == 0 || self.log_format_version == 0 {
            return Err(invalid("protocol_version", "must be at least 1"));
        }
        check_capabilities(&self.capabilities)?;
        check_text("product", &self.product, 0, 256)?;
        check_text("host", &self.host, 0, 256)?;
        check_text("authorized_as", &self.authorized_as, 0, 256)?;
        check_text("trust_group", &self.trust_group, 0, 256)
    }
}

/// The highest value both lists hold.
pub fn highest_common(ours: &[u16], theirs: &[u16]) -> Option<u16> {
    ours.iter().filter(|v| theirs.contains(v)).max().copied()
}

/// An empty request body (`{}`), as `POST /vmreplica/v1/test` sends.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

impl Validate for Empty {
    fn validate(&self) -> Result<(), MessageError> {
        Ok(())
    }
}

/// `POST /vmreplica/v1/test` answer (§5.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestResponse {
    pub storage_free_bytes: u64,
    pub authorized_as: String,
    pub trust_group: String,
}

impl Validate for TestResponse {
    fn validate(&self) -> Result<(), MessageError> {
        Ok(())
    }
}

/// One disk of the placeholder: the log's disk table entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub id: String,
    pub virtual_size: u64,
}

/// The replication settings the replica keeps (and prunes by).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSettings {
    pub replication_interval: u16,
    pub recovery_history: u8,
    pub application_consistent_snapshot_interval: u8,
    pub compression_enabled: bool,
}

/// `PUT /vmreplica/v1/vms/{vm}` body (§5.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutVm {
    pub name: String,
    pub primary_connection_point: String,
    pub initial_replication_type: u16,
    pub disks: Vec<DiskSpec>,
    pub settings: VmSettings,
    /// Reverse replication after a planned failover (§5.7): the sender failed over to this point
    /// of the chain; the receiver, the prepared old primary whose last committed log it is, becomes
    /// the replica with its own disks as that point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse: Option<ReverseFrom>,
}

/// The common point of a reverse (`PutVm::reverse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReverseFrom {
    pub sequence: u64,
    /// BLAKE3 of that log, lowercase hex.
    pub log_hash: String,
    /// After an unplanned failover: the two sides may differ anywhere, and the sender resynchronizes
    /// (compare kind 2) right after; the receiver's disks are taken as they are.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resync: bool,
    /// `InitiateFailback` (§5.8, with `resync`): the receiver also works out which of its blocks
    /// may differ from point `sequence` (its logs after it, its writes since its last log) and
    /// offers them, with its block-hash maps, to the failback compare (kind 3) that follows.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub failback: bool,
}

impl Validate for PutVm {
    fn validate(&self) -> Result<(), MessageError> {
        check_text("name", &self.name, 1, 256)?;
        check_text(
            "primary_connection_point",
            &self.primary_connection_point,
            0,
            256,
        )?;
        if !(1..=3).contains(&self.initial_replication_type) {
            return Err(invalid(
                "initial_replication_type",
                "must be 1 (Network), 2 (Export) or 3 (Seeded)",
            ));
        }
        if self.disks.is_empty() || self.disks.len() > 64 {
            return Err(invalid("disks", "must list 1 to 64 disks"));
        }
        for (i, d) in self.disks.iter().enumerate() {
            if d.id.is_empty() || d.id.len() > 255 {
                return Err(invalid("disks", "an id must have 1 to 255 bytes"));
            }
            if d.virtual_size == 0 {
                return Err(invalid("disks", "a virtual size must be at least 1"));
            }
            if self.disks[..i].iter().any(|o| o.id == d.id) {
                return Err(invalid("disks", format!("id {:?} appears twice", d.id)));
            }
        }
        let s = &self.settings;
        if ![30, 300, 900].contains(&s.replication_interval) {
            return Err(invalid(
                "settings.replication_interval",
                "must be 30, 300 or 900",
            ));
        }
        if s.recovery_history > 24 {
            return Err(invalid("settings.recovery_history", "must be 0 to 24"));
        }
        if s.application_consistent_snapshot_interval > 12 {
            return Err(invalid(
                "settings.application_consistent_snapshot_interval",
                "must be 0 to 12",
            ));
        }
        if let Some(r) = &self.reverse {
            if r.sequence == 0 {
                return Err(invalid("reverse.sequence", "must be at least 1"));
            }
            check_hash("reverse.log_hash", &r.log_hash)?;
            if r.failback && !r.resync {
                return Err(invalid("reverse.failback", "needs resync"));
            }
        }
        Ok(())
    }
}

/// `POST /vmreplica/v1/vms/{vm}/failback` body (§5.8): the old primary asks the new primary to
/// bring its disks to a point of the new primary and to replicate to it from then on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartFailback {
    /// The old primary's name, as the new primary will reach its recovery server.
    pub host: String,
    /// The old primary's recovery-server port.
    pub port: u16,
    /// The settings of the new direction.
    pub settings: VmSettings,
    /// The `RecoveryPointIdentifier`: empty for a fresh point of the new primary's disks.
    #[serde(default)]
    pub point: String,
}

impl Validate for StartFailback {
    fn validate(&self) -> Result<(), MessageError> {
        check_text("host", &self.host, 1, 256)?;
        if self.port == 0 {
            return Err(invalid("port", "must be 1 to 65535"));
        }
        check_text("point", &self.point, 0, 256)?;
        if ![30, 300, 900].contains(&self.settings.replication_interval) {
            return Err(invalid(
                "settings.replication_interval",
                "must be 30, 300 or 900",
            ));
        }
        if self.settings.recovery_history > 24 {
            return Err(invalid("settings.recovery_history", "must be 0 to 24"));
        }
        if self.settings.application_consistent_snapshot_interval > 12 {
            return Err(invalid(
                "settings.application_consistent_snapshot_interval",
                "must be 0 to 12",
            ));
        }
        Ok(())
    }
}

/// A failback on the new primary as it answers `…/failback` (§5.8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailbackStatus {
    /// 1 Running, 2 Completed, 3 Failed.
    pub state: u16,
    pub percent: u16,
    /// The new primary's job (an `Msvm_ConcreteJob` InstanceID there).
    pub job: String,
    /// What the job says: the error of a failed one, or how the blocks were found.
    #[serde(default)]
    pub message: String,
    /// The log that brought the old primary to the point (state 2).
    #[serde(default)]
    pub sequence: u64,
    /// Bytes of that log.
    #[serde(default)]
    pub bytes: u64,
}

impl Validate for FailbackStatus {
    fn validate(&self) -> Result<(), MessageError> {
        if !(1..=3).contains(&self.state) {
            return Err(invalid("state", "must be 1, 2 or 3"));
        }
        if self.percent > 100 {
            return Err(invalid("percent", "must be 0 to 100"));
        }
        check_text("job", &self.job, 0, 256)?;
        check_text("message", &self.message, 0, 4096)
    }
}

/// Most candidate runs one disk's failback base may list.
pub const MAX_CANDIDATE_RUNS: u64 = 1 << 24;

/// One disk's failback base (`application/vnd.vmreplica.failback-base`, little-endian, §5.8):
/// `disk u32 | known u32 (0 or 1) | runs u64 | runs × (first_block u64, count u64) | map`. The
/// runs are the blocks that may differ from the failover point on the old primary, sorted and
/// apart (`known` 0: unknown, no runs); `map` is the rest of the body, the block-hash map of the
/// old primary's disk as imported (a `VMRHASH1` file, checked by whoever reads it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailbackBase {
    pub disk: u32,
    /// None when this side cannot tell which blocks it changed.
    pub candidates: Option<Vec<(u64, u64)>>,
    pub map: Vec<u8>,
}

impl FailbackBase {
    /// The bytes before the map: `disk | known | runs | runs × (first_block, count)`. The map
    /// follows them, so it can be sent from its file as it is read.
    pub fn encode_head(disk: u32, candidates: Option<&[(u64, u64)]>) -> Vec<u8> {
        let runs = candidates.unwrap_or_default();
        let mut out = Vec::with_capacity(16 + runs.len() * 16);
        out.extend_from_slice(&disk.to_le_bytes());
        out.extend_from_slice(&u32::from(candidates.is_some()).to_le_bytes());
        out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
        for (first, count) in runs {
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = FailbackBase::encode_head(self.disk, self.candidates.as_deref());
        out.extend_from_slice(&self.map);
        out
    }

    /// The head at the start of `body` (a base without its map) and its length in bytes, or None
    /// while `body` is shorter than the head: a receiver parses the head of a streamed base as
    /// soon as it arrived and writes the map that follows wherever it keeps it.
    pub fn parse_head(body: &[u8]) -> Result<Option<(FailbackBase, usize)>, MessageError> {
        let u64_at = |at: usize| {
            body.get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        if body.len() < 16 {
            return Ok(None);
        }
        let disk = u32::from_le_bytes(body[0..4].try_into().unwrap_or_default());
        let known = u32::from_le_bytes(body[4..8].try_into().unwrap_or_default());
        let runs = u64_at(8).unwrap_or_default();
        if known > 1 || (known == 0 && runs != 0) {
            return Err(invalid("known", "must be 1, or 0 with no runs"));
        }
        if runs > MAX_CANDIDATE_RUNS {
            return Err(invalid("runs", "more than a base may list"));
        }
        let len = 16 + runs as usize * 16;
        if body.len() < len {
            return Ok(None);
        }
        let mut list = Vec::with_capacity(runs as usize);
        let mut end = 0u64;
        for i in 0..runs as usize {
            let first = u64_at(16 + i * 16).unwrap_or_default();
            let count = u64_at(24 + i * 16).unwrap_or_default();
            let stop = first
                .checked_add(count)
                .filter(|_| count > 0 && (i == 0 || first > end))
                .ok_or_else(|| invalid("runs", "must be sorted, apart and not empty"))?;
            list.push((first, count));
            end = stop;
        }
        let head = FailbackBase {
            disk,
            candidates: (known == 1).then_some(list),
            map: Vec::new(),
        };
        Ok(Some((head, len)))
    }

    pub fn parse(body: &[u8]) -> Result<FailbackBase, MessageError> {
        let (mut base, len) = FailbackBase::parse_head(body)?
            .ok_or_else(|| invalid("body", "shorter than its head says"))?;
        base.map = body[len..].to_vec();
        Ok(base)
    }
}

/// The last committed log of a replica (sequence 0 = none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastCommitted {
    pub sequence: u64,
    pub log_hash: String,
    pub point_time: i64,
}

/// The placeholder replica as the replica describes it (§5.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaVm {
    pub vm: Uuid,
    pub name: String,
    pub mode: u16,
    pub state: u16,
    pub health: u16,
    pub disks: Vec<DiskSpec>,
    pub last_committed: LastCommitted,
    pub last_applied_sequence: u64,
    pub pending_apply: u32,
    pub resync_required: bool,
    pub upload: Option<LogStatus>,
}

impl Validate for ReplicaVm {
    fn validate(&self) -> Result<(), MessageError> {
        check_text("name", &self.name, 1, 256)?;
        if self.disks.len() > 64 {
            return Err(invalid("disks", "at most 64 disks"));
        }
        Ok(())
    }
}

/// The state of one log on the replica (§5.3), a number on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferState {
    Uploading = 1,
    Uploaded = 2,
    Committed = 3,
    Applied = 4,
}

impl TransferState {
    pub fn from_u16(v: u16) -> Option<TransferState> {
        Some(match v {
            1 => TransferState::Uploading,
            2 => TransferState::Uploaded,
            3 => TransferState::Committed,
            4 => TransferState::Applied,
            _ => return None,
        })
    }
}

/// `GET …/logs/{seq}` answer, and the answer to a PATCH or commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogStatus {
    pub sequence: u64,
    pub upload_id: Option<Uuid>,
    pub state: u16,
    pub offset: u64,
    pub prefix_hash: Option<String>,
    pub log_hash: Option<String>,
    pub log_bytes: Option<u64>,
    pub point_time: Option<i64>,
}

impl Validate for LogStatus {
    fn validate(&self) -> Result<(), MessageError> {
        if TransferState::from_u16(self.state).is_none() {
            return Err(invalid(
                "state",
                format!("{} is not a transfer state", self.state),
            ));
        }
        for h in [&self.prefix_hash, &self.log_hash].into_iter().flatten() {
            check_hash("log_hash", h)?;
        }
        Ok(())
    }
}

fn check_hash(field: &'static str, h: &str) -> Result<(), MessageError> {
    if h.len() != 64
        || !h
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(invalid(field, "must be 64 lowercase hex digits"));
    }
    Ok(())
}

/// `POST …/logs/{seq}/commit` body (§5.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Commit {
    pub upload_id: Uuid,
    pub log_hash: String,
    pub log_bytes: u64,
    pub wait_applied: bool,
    /// The log a resynchronization sent (capability `resync-commit`; left out when false): the
    /// replica keeps only its point once it is applied, even if it lost the compare session.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resync: bool,
}

impl Validate for Commit {
    fn validate(&self) -> Result<(), MessageError> {
        check_hash("log_hash", &self.log_hash)
    }
}

/// `POST …/compare` body (§5.5): 1 Seeded, 2 Resync, 3 Failback (reserved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeginCompare {
    pub kind: u16,
    pub block_size: u32,
    pub disks: Vec<DiskSpec>,
}

impl Validate for BeginCompare {
    fn validate(&self) -> Result<(), MessageError> {
        if !(1..=3).contains(&self.kind) {
            return Err(invalid(
                "kind",
                "must be 1 (Seeded), 2 (Resync) or 3 (Failback)",
            ));
        }
        if self.block_size == 0 || !self.block_size.is_power_of_two() {
            return Err(invalid("block_size", "must be a power of two"));
        }
        if self.disks.is_empty() || self.disks.len() > 64 {
            return Err(invalid("disks", "must list 1 to 64 disks"));
        }
        Ok(())
    }
}

/// One disk of a compare session: how many blocks it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareDisk {
    pub index: u32,
    pub blocks: u64,
}

/// A compare session (§5.5): state 1 Preparing, 2 Ready, 3 Closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareSession {
    pub id: Uuid,
    pub state: u16,
    pub baseline_sequence: u64,
    pub next_sequence: u64,
    pub block_size: u32,
    pub disks: Vec<CompareDisk>,
}

impl Validate for CompareSession {
    fn validate(&self) -> Result<(), MessageError> {
        if !(1..=3).contains(&self.state) {
            return Err(invalid("state", "must be 1, 2 or 3"));
        }
        if self.block_size == 0 || self.disks.len() > 64 {
            return Err(invalid(
                "block_size",
                "must be at least 1, with at most 64 disks",
            ));
        }
        Ok(())
    }
}

/// Most blocks one range request may carry (`max_compare_blocks`).
pub const MAX_COMPARE_BLOCKS: u32 = 65_536;
/// Bytes of one block hash in a range request.
pub const BLOCK_HASH_LEN: usize = 16;

/// A range of block hashes (`application/vnd.vmreplica.block-hashes`, little-endian):
/// `disk u32 | first_block u64 | count u32 | count × 16-byte hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashRange {
    pub disk: u32,
    pub first_block: u64,
    pub hashes: Vec<[u8; BLOCK_HASH_LEN]>,
}

impl HashRange {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.hashes.len() * BLOCK_HASH_LEN);
        out.extend_from_slice(&self.disk.to_le_bytes());
        out.extend_from_slice(&self.first_block.to_le_bytes());
        out.extend_from_slice(&(self.hashes.len() as u32).to_le_bytes());
        for h in &self.hashes {
            out.extend_from_slice(h);
        }
        out
    }

    /// Parses a request body; the length must be exactly 16 + 16·count, count 1..=max.
    pub fn parse(body: &[u8]) -> Result<HashRange, MessageError> {
        if body.len() < 16 {
            return Err(invalid("body", "shorter than the 16-byte range head"));
        }
        let disk = u32::from_le_bytes(body[0..4].try_into().unwrap_or_default());
        let first_block = u64::from_le_bytes(body[4..12].try_into().unwrap_or_default());
        let count = u32::from_le_bytes(body[12..16].try_into().unwrap_or_default());
        if count == 0 || count > MAX_COMPARE_BLOCKS {
            return Err(invalid(
                "count",
                format!("must be 1 to {MAX_COMPARE_BLOCKS}"),
            ));
        }
        let want = 16 + count as usize * BLOCK_HASH_LEN;
        if body.len() != want {
            return Err(invalid(
                "body",
                format!("{} bytes; {want} expected for {count} hashes", body.len()),
            ));
        }
        first_block
            .checked_add(u64::from(count))
            .ok_or_else(|| invalid("first_block", "the range overflows"))?;
        let hashes = body[16..]
            .chunks_exact(BLOCK_HASH_LEN)
            .map(|c| {
                let mut h = [0u8; BLOCK_HASH_LEN];
                h.copy_from_slice(c);
                h
            })
            .collect();
        Ok(HashRange {
            disk,
            first_block,
            hashes,
        })
    }
}

/// The answer to a range (`application/vnd.vmreplica.block-bitmap`): `disk u32 | first_block u64 |
/// count u32 | differing u32 | ⌈count/8⌉ bytes`, bit `i % 8` of byte `i / 8` set when block
/// `first_block + i` differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeAnswer {
    pub disk: u32,
    pub first_block: u64,
    pub count: u32,
    pub bits: Vec<u8>,
}

impl RangeAnswer {
    pub fn differs(&self, i: u32) -> bool {
        i < self.count && self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    pub fn differing(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20 + self.bits.len());
        out.extend_from_slice(&self.disk.to_le_bytes());
        out.extend_from_slice(&self.first_block.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.differing().to_le_bytes());
        out.extend_from_slice(&self.bits);
        out
    }

    pub fn parse(body: &[u8]) -> Result<RangeAnswer, MessageError> {
        if body.len() < 20 {
            return Err(invalid("body", "shorter than the 20-byte answer head"));
        }
        let disk = u32::from_le_bytes(body[0..4].try_into().unwrap_or_default());
        let first_block = u64::from_le_bytes(body[4..12].try_into().unwrap_or_default());
        let count = u32::from_le_bytes(body[12..16].try_into().unwrap_or_default());
        let differing = u32::from_le_bytes(body[16..20].try_into().unwrap_or_default());
        if count == 0 || count > MAX_COMPARE_BLOCKS || body.len() != 20 + count.div_ceil(8) as usize
        {
            return Err(invalid("count", "does not match the answer's length"));
        }
        let mut bits = body[20..].to_vec();
        // Bits past `count` are ignored.
        if count % 8 != 0 {
            if let Some(last) = bits.last_mut() {
                *last &= (1u8 << (count % 8)) - 1;
            }
        }
        let answer = RangeAnswer {
            disk,
            first_block,
            count,
            bits,
        };
        if answer.differing() != differing {
            return Err(invalid("differing", "does not match the bitmap"));
        }
        Ok(answer)
    }
}

/// The error codes of §4. Every one is a number on the wire; 0 is never valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    AccessDenied = 1,
    UnsupportedVersion = 2,
    BadRequest = 3,
    TooLarge = 4,
    UnknownVm = 5,
    UnknownResource = 6,
    VmExists = 7,
    InvalidState = 8,
    Suspended = 9,
    OutOfSequence = 10,
    SequenceConflict = 11,
    OffsetMismatch = 12,
    Incomplete = 13,
    UnknownLog = 14,
    ChecksumMismatch = 15,
    LogRejected = 16,
    DiskTableMismatch = 17,
    ResyncRequired = 18,
    StorageFull = 19,
    StorageUnavailable = 20,
    Busy = 21,
    Timeout = 22,
    UnknownCompare = 23,
    Internal = 24,
}

const ALL_CODES: [ErrorCode; 24] = [
    ErrorCode::AccessDenied,
    ErrorCode::UnsupportedVersion,
    ErrorCode::BadRequest,
    ErrorCode::TooLarge,
    ErrorCode::UnknownVm,
    ErrorCode::UnknownResource,
    ErrorCode::VmExists,
    ErrorCode::InvalidState,
    ErrorCode::Suspended,
    ErrorCode::OutOfSequence,
    ErrorCode::SequenceConflict,
    ErrorCode::OffsetMismatch,
    ErrorCode::Incomplete,
    ErrorCode::UnknownLog,
    ErrorCode::ChecksumMismatch,
    ErrorCode::LogRejected,
    ErrorCode::DiskTableMismatch,
    ErrorCode::ResyncRequired,
    ErrorCode::StorageFull,
    ErrorCode::StorageUnavailable,
    ErrorCode::Busy,
    ErrorCode::Timeout,
    ErrorCode::UnknownCompare,
    ErrorCode::Internal,
];

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        ALL_CODES.iter().copied().find(|c| *c as u16 == v)
    }

    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::AccessDenied => "AccessDenied",
            ErrorCode::UnsupportedVersion => "UnsupportedVersion",
            ErrorCode::BadRequest => "BadRequest",
            ErrorCode::TooLarge => "TooLarge",
            ErrorCode::UnknownVm => "UnknownVm",
            ErrorCode::UnknownResource => "UnknownResource",
            ErrorCode::VmExists => "VmExists",
            ErrorCode::InvalidState => "InvalidState",
            ErrorCode::Suspended => "Suspended",
            ErrorCode::OutOfSequence => "OutOfSequence",
            ErrorCode::SequenceConflict => "SequenceConflict",
            ErrorCode::OffsetMismatch => "OffsetMismatch",
            ErrorCode::Incomplete => "Incomplete",
            ErrorCode::UnknownLog => "UnknownLog",
            ErrorCode::ChecksumMismatch => "ChecksumMismatch",
            ErrorCode::LogRejected => "LogRejected",
            ErrorCode::DiskTableMismatch => "DiskTableMismatch",
            ErrorCode::ResyncRequired => "ResyncRequired",
            ErrorCode::StorageFull => "StorageFull",
            ErrorCode::StorageUnavailable => "StorageUnavailable",
            ErrorCode::Busy => "Busy",
            ErrorCode::Timeout => "Timeout",
            ErrorCode::UnknownCompare => "UnknownCompare",
            ErrorCode::Internal => "Internal",
        }
    }

    /// The HTTP status of the code (§4).
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::AccessDenied => 403,
            ErrorCode::UnsupportedVersion | ErrorCode::BadRequest => 400,
            ErrorCode::TooLarge => 413,
            ErrorCode::UnknownVm
            | ErrorCode::UnknownResource
            | ErrorCode::UnknownLog
            | ErrorCode::UnknownCompare => 404,
            ErrorCode::ChecksumMismatch | ErrorCode::LogRejected => 422,
            ErrorCode::StorageFull => 507,
            ErrorCode::StorageUnavailable | ErrorCode::Busy => 503,
            ErrorCode::Timeout => 408,
            ErrorCode::Internal => 500,
            _ => 409,
        }
    }
}

/// Why the replica refused a peer (§2.3), the `reason` detail of `AccessDenied`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    NoMatchingEntry = 1,
    EntryRemoved = 2,
    NotAuthorizedForVm = 3,
    StorageEscape = 4,
    NoCertificateName = 5,
}

impl RefusalReason {
    pub fn from_u16(v: u16) -> Option<RefusalReason> {
        Some(match v {
            1 => RefusalReason::NoMatchingEntry,
            2 => RefusalReason::EntryRemoved,
            3 => RefusalReason::NotAuthorizedForVm,
            4 => RefusalReason::StorageEscape,
            5 => RefusalReason::NoCertificateName,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            RefusalReason::NoMatchingEntry => "NoMatchingEntry",
            RefusalReason::EntryRemoved => "EntryRemoved",
            RefusalReason::NotAuthorizedForVm => "NotAuthorizedForVm",
            RefusalReason::StorageEscape => "StorageEscape",
            RefusalReason::NoCertificateName => "NoCertificateName",
        }
    }
}

/// The `error` object of every 4xx/5xx answer: code, name, a sentence, and details by code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    pub code: u16,
    pub name: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<Vec<u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format_versions: Option<Vec<u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_state: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_parent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<Vec<DiskSpec>>,
}

impl ErrorDetail {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorDetail {
        ErrorDetail {
            code: code.as_u16(),
            name: code.name().to_string(),
            message: message.into(),
            reason: None,
            field: None,
            limit: None,
            versions: None,
            log_format_versions: None,
            replica_state: None,
            expected_sequence: None,
            expected_parent: None,
            stored_hash: None,
            upload_id: None,
            offset: None,
            decode_error: None,
            expected: None,
        }
    }

    /// The code, when it is one this build knows.
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::from_u16(self.code)
    }
}

/// `{"error": {…}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

impl Validate for ErrorBody {
    fn validate(&self) -> Result<(), MessageError> {
        if self.error.error_code().is_none() {
            return Err(invalid(
                "error.code",
                format!("{} is not an error code", self.error.code),
            ));
        }
        if let Some(r) = self.error.reason {
            if RefusalReason::from_u16(r).is_none() {
                return Err(invalid(
                    "error.reason",
                    format!("{r} is not a refusal reason"),
                ));
            }
        }
        check_text("error.message", &self.error.message, 0, 4096)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failback_base_round_trips_and_bad_runs_are_refused() {
        let base = FailbackBase {
            disk: 2,
            candidates: Some(vec![(0, 3), (10, 1), (u64::MAX - 5, 5)]),
            map: b"VMRHASH1 and the rest".to_vec(),
        };
        assert_eq!(FailbackBase::parse(&base.encode()), Ok(base));
        let unknown = FailbackBase {
            disk: 0,
            candidates: None,
            map: Vec::new(),
        };
        assert_eq!(FailbackBase::parse(&unknown.encode()), Ok(unknown));
        for runs in [
            vec![(5u64, 1u64), (5, 1)], // overlapping
            vec![(5, 2), (7, 1)],       // adjacent: one run
            vec![(9, 1), (2, 1)],       // not sorted
            vec![(1, 0)],               // empty
            vec![(u64::MAX, 2)],        // overflows
        ] {
            let body = FailbackBase {
                disk: 0,
                candidates: Some(runs.clone()),
                map: Vec::new(),
            }
            .encode();
            assert!(FailbackBase::parse(&body).is_err(), "{runs:?}");
        }
        let mut body = unknown_with_runs();
        assert!(FailbackBase::parse(&body).is_err());
        body.truncate(10);
        assert!(FailbackBase::parse(&body).is_err());
        // More runs announced than the body holds.
        let mut short = FailbackBase {
            disk: 0,
            candidates: Some(vec![(1, 1)]),
            map: Vec::new(),
        }
        .encode();
        short[8] = 200;
        assert!(FailbackBase::parse(&short).is_err());
    }

    #[test]
    fn a_streamed_failback_base_head_is_known_once_it_arrived_whole() {
        let base = FailbackBase {
            disk: 1,
            candidates: Some(vec![(4, 2), (100, 7)]),
            map: b"VMRHASH1 map bytes".to_vec(),
        };
        let body = base.encode();
        let head_len = FailbackBase::encode_head(1, base.candidates.as_deref()).len();
        assert_eq!(head_len, 16 + 2 * 16);
        for cut in 0..head_len {
            assert_eq!(
                FailbackBase::parse_head(&body[..cut]),
                Ok(None),
                "{cut} bytes"
            );
        }
        let (head, len) = FailbackBase::parse_head(&body).unwrap().unwrap();
        assert_eq!(len, head_len);
        assert_eq!((head.disk, head.candidates), (1, base.candidates.clone()));
        assert!(head.map.is_empty(), "the map is the caller's");
        assert_eq!(&body[len..], base.map.as_slice());
        // A bad head is refused as soon as its first 16 bytes show it.
        let mut bad = body.clone();
        bad[8..16].copy_from_slice(&(MAX_CANDIDATE_RUNS + 1).to_le_bytes());
        assert!(FailbackBase::parse_head(&bad[..16]).is_err());
    }

    fn unknown_with_runs() -> Vec<u8> {
        let mut body = FailbackBase {
            disk: 0,
            candidates: Some(vec![(1, 1)]),
            map: Vec::new(),
        }
        .encode();
        body[4] = 0;
        body
    }

    fn put() -> PutVm {
        PutVm {
            name: "web01".into(),
            primary_connection_point: "p1.lab.example".into(),
            initial_replication_type: 1,
            disks: vec![DiskSpec {
                id: "disk0".into(),
                virtual_size: 1 << 30,
            }],
            settings: VmSettings {
                replication_interval: 300,
                recovery_history: 4,
                application_consistent_snapshot_interval: 0,
                compression_enabled: true,
            },
            reverse: None,
        }
    }

    #[test]
    fn messages_round_trip() {
        let p = put();
        let text = serde_json::to_vec(&p).unwrap();
        assert!(!String::from_utf8_lossy(&text).contains("reverse"));
        assert_eq!(decode::<PutVm>(&text).unwrap(), p);
        let mut r = put();
        r.reverse = Some(ReverseFrom {
            sequence: 7,
            log_hash: "ab".repeat(32),
            resync: true,
            failback: true,
        });
        let text = serde_json::to_vec(&r).unwrap();
        assert_eq!(decode::<PutVm>(&text).unwrap(), r);
        r.reverse = Some(ReverseFrom {
            sequence: 0,
            log_hash: "ab".repeat(32),
            resync: false,
            failback: false,
        });
        assert!(matches!(
            decode::<PutVm>(&serde_json::to_vec(&r).unwrap()),
            Err(MessageError::Invalid {
                field: "reverse.sequence",
                ..
            })
        ));
        let e = ErrorBody {
            error: ErrorDetail {
                reason: Some(1),
                ..ErrorDetail::new(ErrorCode::AccessDenied, "no entry")
            },
        };
        let text = serde_json::to_vec(&e).unwrap();
        assert_eq!(decode::<ErrorBody>(&text).unwrap(), e);
    }

    #[test]
    fn bad_bodies_are_refused() {
        let mut p = put();
        p.disks.push(p.disks[0].clone());
        assert!(matches!(
            decode::<PutVm>(&serde_json::to_vec(&p).unwrap()),
            Err(MessageError::Invalid { field: "disks", .. })
        ));
        let mut p = put();
        p.settings.replication_interval = 60;
        assert!(decode::<PutVm>(&serde_json::to_vec(&p).unwrap()).is_err());
        let mut v = serde_json::to_value(put()).unwrap();
        v["extra"] = 1.into();
        assert!(matches!(
            decode::<PutVm>(&serde_json::to_vec(&v).unwrap()),
            Err(MessageError::Json(_))
        ));
        let deep = "[".repeat(17) + &"]".repeat(17);
        assert_eq!(decode::<Empty>(deep.as_bytes()), Err(MessageError::TooDeep));
        let nested_in_string = format!(
            "{{\"error\":{{\"code\":3,\"name\":\"x\",\"message\":\"{}\"}}}}",
            "[".repeat(40)
        );
        assert!(decode::<ErrorBody>(nested_in_string.as_bytes()).is_ok());
        assert!(matches!(
            decode::<Empty>(&vec![b' '; MAX_JSON_BYTES + 1]),
            Err(MessageError::TooLarge(_))
        ));
        let zero = r#"{"error":{"code":0,"name":"Invalid","message":""}}"#;
        assert!(decode::<ErrorBody>(zero.as_bytes()).is_err());
    }

    #[test]
    fn ranges_round_trip_and_bad_lengths_are_refused() {
        let r = HashRange {
            disk: 1,
            first_block: 7,
            hashes: vec![[1; 16], [2; 16], [3; 16]],
        };
        assert_eq!(HashRange::parse(&r.encode()).unwrap(), r);
        let mut short = r.encode();
        short.pop();
        assert!(HashRange::parse(&short).is_err());
        let a = RangeAnswer {
            disk: 1,
            first_block: 7,
            count: 10,
            bits: vec![0b1000_0001, 0b10],
        };
        let parsed = RangeAnswer::parse(&a.encode()).unwrap();
        assert_eq!(parsed, a);
        assert!(parsed.differs(0) && parsed.differs(7) && parsed.differs(9) && !parsed.differs(1));
        let mut lying = a.encode();
        lying[16] = 9;
        assert!(RangeAnswer::parse(&lying).is_err());
    }

    #[test]
    fn codes_are_stable() {
        for (i, c) in ALL_CODES.iter().enumerate() {
            assert_eq!(c.as_u16() as usize, i + 1);
            assert_eq!(ErrorCode::from_u16(c.as_u16()), Some(*c));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(highest_common(&[1, 2, 3], &[3, 2, 9]), Some(3));
        assert_eq!(highest_common(&[1], &[2]), None);
    }
}
