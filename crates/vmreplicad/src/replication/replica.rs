//! The recovery server's handlers (docs/protocol.md §3, §5.1-§5.4) and its apply task.
//!
//! Files live only below the authorized entry's storage location, named from GUIDs and numbers
//! (§2.4): `<loc>/<vm-guid>/` is the VM's point store and `<loc>/<vm-guid>/incoming/` holds
//! uploads (`<seq:020>-<upload>.partial`, `.uploaded`) and committed logs (`<seq:020>.vrlog`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use disk::points::{ApplyError, PointStore, RetentionPolicy};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use tokio::sync::Notify;
use uuid::Uuid;
use vmreplica_core::command::PowerControl;
use vmreplica_core::settings::{AuthorizationEntry, ReplicationSettings};
use vmreplica_core::state::{ReplicationMode, ReplicationState};
use wire::protocol::{
    self, decode, headers, highest_common, Commit, DiskSpec, Empty, ErrorCode, ErrorDetail, Hello,
    HelloResponse, LastCommitted, Limits, LogStatus, PutVm, RefusalReason, ReplicaVm, TestResponse,
    TransferState, Validate, MAX_JSON_BYTES, PROTOCOL_VERSIONS,
};
use wire::{Expect, LogDecodeError, PointType};

use super::body::WireBody;
use super::records::{ReceivedLog, ReplicaVmRow, UploadRow};
use super::server::refusal;
use crate::clock::now;
use crate::store::{RelationshipRow, Store, VmRow};

/// Largest log accepted (`max_log_bytes`, §8).
pub const MAX_LOG_BYTES: u64 = 1 << 40;
/// Free space kept below the storage location: max(1 GiB, 2 %).
const MIN_RESERVE: u64 = 1 << 30;
/// A request body that stalls this long is cut off (408).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Uploads in progress at once from one primary host, and in all (`max_parallel_uploads`).
const MAX_UPLOADS_PER_PRIMARY: usize = 4;
const MAX_UPLOADS: usize = 32;
/// Committed logs of one VM waiting for their apply before new uploads wait (`max_pending_apply`).
const MAX_PENDING_APPLY: usize = 8;
/// What a `Busy` answer tells the primary to wait, seconds.
const RETRY_AFTER_SECS: &str = "5";
/// A partial upload untouched this long is deleted.
const ABANDONED_AFTER: Duration = Duration::from_secs(7 * 86_400);
/// Longest wait of a commit with `wait_applied`.
const WAIT_APPLIED: Duration = Duration::from_secs(600);

/// An error answer: `{"error": …}` with the code's HTTP status.
#[derive(Debug)]
pub struct ApiError(pub Box<ErrorDetail>);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError(Box::new(ErrorDetail::new(code, message)))
    }

    pub fn internal(e: impl std::error::Error) -> ApiError {
        ApiError::new(ErrorCode::Internal, crate::error_chain(&e))
    }

    pub fn into_response(self) -> Response<WireBody> {
        let status = self.0.error_code().map_or(500, ErrorCode::http_status);
        let busy = self.0.error_code() == Some(ErrorCode::Busy);
        let mut resp = json(status, &protocol::ErrorBody { error: *self.0 });
        if busy {
            resp.headers_mut().insert(
                "retry-after",
                hyper::header::HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        resp
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal(e)
    }
}

pub(super) fn json<T: Serialize>(status: u16, body: &T) -> Response<WireBody> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(WireBody::bytes(bytes))
        .unwrap_or_else(|_| Response::new(WireBody::bytes(Bytes::new())))
}

pub(super) type ApiResult = Result<Response<WireBody>, ApiError>;

/// The recovery server: shared by the listener's connections and the apply task.
pub struct ReplicaSide {
    pub store: Arc<Store>,
    pub host: String,
    pub cert_dir: PathBuf,
    /// The log format versions the hello agrees to: every one this build reads, unless
    /// `--log-formats` names fewer (a lab standing in for a recovery server of an older build).
    pub log_formats: Vec<u16>,
    /// Wakes the apply task after a commit.
    /// Wakes the apply task (a commit, a reverted failover).
    pub apply_wake: Arc<Notify>,
    /// The management plane's claims on VMs: a reverse turning a local primary into a replica
    /// holds the VM's claim, so no command races it.
    pub claims: crate::claims::VmClaims,
    /// Bumped after every apply, for commits that wait for it.
    pub applied: tokio::sync::watch::Sender<u64>,
    /// One upload or commit per VM at a time.
    locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
    /// The log bodies being received, each told to stop when the primary continues its log on a
    /// newer connection.
    receivers: Receivers,
    /// The VMs whose seed is being imported as point 1 (a seeded begin), cancelled or not.
    seed_imports: Arc<Mutex<std::collections::HashSet<Uuid>>>,
    /// Uploads in progress by authorized primary name.
    uploading: Mutex<HashMap<String, usize>>,
    /// The open compare session of each VM (§5.5), kept in memory: after a restart the primary
    /// begins again.
    compares: Mutex<HashMap<Uuid, Arc<Compare>>>,
    /// Staged uploads cut off by a broken connection (replication::staged).
    stagings: super::staged::Stagings,
    /// Where qemu-nbd helpers keep their sockets.
    pub data_dir: PathBuf,
    /// The failbacks this host runs as a new primary (`POST vms/{vm}/failback`), once wired.
    pub failback: std::sync::OnceLock<Arc<crate::engine::failback::NewPrimary>>,
}

/// The log bodies being received, by VM and sequence.
///
/// The primary continues a log on a new connection only after it gave up the old one. When only
/// the primary's end of the old connection broke (a reset that never reached this host, a
/// half-open link), the old handler would wait for bytes until `IDLE_TIMEOUT`, holding the VM's
/// lock, and the primary's status request and resume would wait for it, or time out. So a status
/// request for the same log, or an upload of it under the same upload id (the same delivery),
/// tells the old handler to stop at once: it keeps what arrived, as after a broken connection,
/// and lets go of the lock. An upload of it from offset 0 under another id (a primary that
/// restarted, maybe after its host crashed, sends the log again as a new delivery, which discards
/// any other attempt) tells it to stop once its body has been idle for [`ANEW_IDLE`]: a dead
/// connection's handler goes within seconds, an upload whose bytes keep coming (the new request
/// is then not the primary's latest word: delayed, or from a second sender) is not cut off, and
/// the new one waits its turn. (An upload under another id at another offset waits its turn too.)
/// The older handler is told before the new upload takes a place among its primary's uploads,
/// and waits for one as long as the older one may take to stop (`upload_slot_after`). The 2 s
/// rule holds while such an upload is still waiting: one that ends (Busy, refused, its stream
/// reset) takes it back ([`Waiting`]).
#[derive(Default)]
struct Receivers(Mutex<ReceiverMap>);

/// (VM, sequence) → (upload id, what the handler was told).
type ReceiverMap = HashMap<(Uuid, u64), (Option<Uuid>, Arc<Told>)>;

/// How long the body of an upload that an upload from offset 0 is waiting for may stay idle before
/// its handler stops ([`Receivers`]).
const ANEW_IDLE: Duration = Duration::from_secs(2);

/// What newer requests told the handler of a log body ([`Receivers`]).
#[derive(Default)]
struct Told {
    notify: Notify,
    /// Stop at once.
    now: std::sync::atomic::AtomicBool,
    /// Uploads from offset 0 waiting for this one: while there are any, stop once the body has
    /// been idle for [`ANEW_IDLE`].
    waiting: std::sync::atomic::AtomicUsize,
}

/// An upload from offset 0 waiting for an older handler of its log ([`Told::waiting`]), until it
/// is dropped with the request.
struct Waiting(Arc<Told>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0
            .waiting
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What [`Receivers::take_over`] did.
#[must_use]
enum TookOver {
    /// No handler was told.
    Nothing,
    /// The handler was told to stop at once.
    Stopped,
    /// The handler stops once idle, while this is held.
    Waiting { _held: Waiting },
}

/// The newer request for a log that stops the handler still receiving it ([`Receivers`]).
#[derive(Debug, Clone, Copy)]
enum Newer {
    /// A status request: a primary asks only after it gave up its connection.
    Status,
    /// An upload under this id: the same delivery, continued on a new connection.
    Continued(Uuid),
    /// An upload at offset 0 under this id: the log again from its start, which discards any
    /// other attempt (under the same id, the same delivery: as `Continued`).
    Anew(Uuid),
}

/// One body being received; dropping it ends its registration.
struct Receiving<'a> {
    all: &'a Receivers,
    key: (Uuid, u64),
    stop: Arc<Told>,
}

impl Receivers {
    fn map(&self) -> std::sync::MutexGuard<'_, ReceiverMap> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the handler of log `seq` of `vm` under its upload id.
    fn start(&self, vm: Uuid, seq: u64, upload: Option<Uuid>) -> Receiving<'_> {
        let stop = Arc::new(Told::default());
        self.map().insert((vm, seq), (upload, stop.clone()));
        Receiving {
            all: self,
            key: (vm, seq),
            stop,
        }
    }

    /// Tells the handler receiving log `seq` of `vm`, if any, to stop: at once for a status request
    /// or an upload under its upload id; once idle, while the returned [`Waiting`] is held, for an
    /// upload from the log's start under another id (an upload at another offset under another id
    /// tells nothing).
    fn take_over(&self, vm: Uuid, seq: u64, newer: Newer) -> TookOver {
        use std::sync::atomic::Ordering;
        let map = self.map();
        let Some((id, told)) = map.get(&(vm, seq)) else {
            return TookOver::Nothing;
        };
        let took = match newer {
            Newer::Status => TookOver::Stopped,
            Newer::Continued(u) | Newer::Anew(u) if *id == Some(u) => TookOver::Stopped,
            Newer::Continued(_) => return TookOver::Nothing,
            Newer::Anew(_) => {
                tracing::info!(%vm, sequence = seq, "an upload of this log from offset 0 waits for the one still arriving: that one stops once idle for 2 s");
                told.waiting.fetch_add(1, Ordering::AcqRel);
                TookOver::Waiting {
                    _held: Waiting(told.clone()),
                }
            }
        };
        if let TookOver::Stopped = took {
            tracing::info!(%vm, sequence = seq, "the primary continues this log on a newer connection: the older one stops");
            told.now.store(true, Ordering::Release);
        }
        told.notify.notify_one();
        took
    }
}

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        let mut map = self.all.map();
        if map
            .get(&self.key)
            .is_some_and(|(_, s)| Arc::ptr_eq(s, &self.stop))
        {
            map.remove(&self.key);
        }
    }
}

/// A seed import in progress: `vm` is in the set until this is dropped.
struct SeedImport {
    all: Arc<Mutex<std::collections::HashSet<Uuid>>>,
    vm: Uuid,
}

impl SeedImport {
    fn start(all: &Arc<Mutex<std::collections::HashSet<Uuid>>>, vm: Uuid) -> SeedImport {
        all.lock().unwrap_or_else(|p| p.into_inner()).insert(vm);
        SeedImport {
            all: all.clone(),
            vm,
        }
    }
}

impl Drop for SeedImport {
    fn drop(&mut self) {
        self.all
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.vm);
    }
}

/// Deletes the file at its path when dropped, if it is empty.
struct RemoveIfEmpty(PathBuf);

impl Drop for RemoveIfEmpty {
    fn drop(&mut self) {
        if std::fs::metadata(&self.0).is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// What [`ReplicaSide::import_point`] made.
pub(super) struct Imported {
    /// The images' block-hash maps (temporary files).
    pub maps: Vec<PathBuf>,
    /// Bytes of the full-image log that was applied.
    pub bytes: u64,
}

/// A block-hash comparison against the replica's copy (seeded initial replication).
pub struct Compare {
    id: Uuid,
    /// 1 Preparing (the seed is being imported), 2 Ready, 3 Closed.
    state: std::sync::atomic::AtomicU16,
    failed: Mutex<Option<String>>,
    baseline: u64,
    next: u64,
    block_size: u32,
    /// The images compared: path, format, virtual size (the seed's, or the latest point's layers).
    images: Vec<(String, String, u64)>,
    /// Kind 2: the log it leads to is a resynchronization.
    resync: bool,
    /// Kind 3: a failback's (the old primary offers its base, `replication::failback`).
    failback: bool,
    /// This side's hashes of `images`, made in the background once the session is ready.
    prehash: super::prehash::Prehash,
}

impl Compare {
    /// A session that is ready at once (kind 2), comparing with `images` of point `baseline`.
    pub(super) fn ready(
        baseline: u64,
        block_size: u32,
        images: Vec<(String, String, u64)>,
        resync: bool,
    ) -> Compare {
        Compare {
            id: Uuid::new_v4(),
            state: std::sync::atomic::AtomicU16::new(2),
            failed: Mutex::new(None),
            baseline,
            next: baseline + 1,
            block_size,
            prehash: super::prehash::Prehash::idle(images.len()),
            images,
            resync,
            failback: false,
        }
    }

    /// Starts hashing this side's images in the background (kinds 1 and 2, once ready), so the
    /// replica hashes while the primary does.
    pub(super) fn start_prehash(
        &self,
        kept: Option<Vec<PathBuf>>,
        prefixes: Vec<Vec<[u8; disk::scan::hashmap::HASH_LEN]>>,
        journal: Option<super::prehash::Journal>,
    ) {
        self.prehash.start(
            self.images.clone(),
            self.block_size,
            kept,
            prefixes,
            journal,
        );
    }

    /// The session of a failback (kind 3).
    pub(super) fn for_failback(mut self) -> Compare {
        self.failback = true;
        self
    }

    pub(super) fn failback(&self) -> bool {
        self.failback
    }

    pub(super) fn id(&self) -> Uuid {
        self.id
    }

    pub(super) fn session(&self) -> protocol::CompareSession {
        protocol::CompareSession {
            id: self.id,
            state: self.state.load(std::sync::atomic::Ordering::Acquire),
            baseline_sequence: self.baseline,
            next_sequence: self.next,
            block_size: self.block_size,
            disks: self
                .images
                .iter()
                .enumerate()
                .map(|(i, (_, _, size))| protocol::CompareDisk {
                    index: i as u32,
                    blocks: disk::scan::hashmap::block_count(*size, self.block_size),
                })
                .collect(),
        }
    }
}

/// A place among the uploads in progress; dropping it frees the place.
struct UploadSlot<'a> {
    side: &'a ReplicaSide,
    primary: String,
}

impl Drop for UploadSlot<'_> {
    fn drop(&mut self) {
        let mut map = self
            .side
            .uploading
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.primary) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.primary);
            }
        }
    }
}

fn busy(message: String) -> ApiError {
    ApiError::new(ErrorCode::Busy, message)
}

fn incoming_dir(root: &Path, vm: Uuid) -> PathBuf {
    root.join(vm.hyphenated().to_string()).join("incoming")
}

pub(super) fn committed_log(root: &Path, vm: Uuid, seq: u64) -> PathBuf {
    incoming_dir(root, vm).join(format!("{seq:020}.vrlog"))
}

/// Deletes committed log `seq` of `vm`: its file, or a staged upload's record and layers.
pub(super) fn remove_committed(root: &Path, vm: Uuid, seq: u64) {
    let _ = std::fs::remove_file(committed_log(root, vm, seq));
    let staged = super::staged::committed_path(&incoming_dir(root, vm), seq);
    if let Ok(s) = super::staged::StagedPoint::read(&staged) {
        s.remove_layers();
    }
    let _ = std::fs::remove_file(staged);
}

fn upload_file(root: &Path, vm: Uuid, seq: u64, upload: Uuid, ext: &str) -> PathBuf {
    incoming_dir(root, vm).join(format!("{seq:020}-{upload}.{ext}"))
}

/// Free bytes of the file system holding `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path holds a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid C string and `st` a writable statvfs the call fills in.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialized `st`.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

fn reserve(free: u64) -> u64 {
    MIN_RESERVE.max(free / 50)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The `uploads` row of a verified log.
/// A verified log, if its format is one of `formats`, those this recovery server agrees to: all it
/// reads, unless `--log-formats` named fewer; then it refuses the others, as an older build would.
fn agreed_format(
    formats: &[u16],
    summary: wire::LogSummary,
) -> Result<wire::LogSummary, LogDecodeError> {
    if formats.contains(&summary.version) {
        return Ok(summary);
    }
    Err(LogDecodeError::UnsupportedVersion {
        found: summary.version,
        supported: formats.iter().copied().max().unwrap_or(0),
    })
}

fn upload_row(vm: Uuid, upload_id: Uuid, summary: &wire::LogSummary) -> UploadRow {
    UploadRow {
        vm,
        sequence: summary.header.sequence,
        upload_id,
        log_hash: hex::encode(summary.hash),
        log_bytes: summary.bytes,
        point_time: summary.header.point_time_micros,
        point_type: point_type_code(summary.header.point_type),
    }
}

/// A log header's disk table, as the placeholder records it.
pub(super) fn disk_specs(header: &wire::LogHeader) -> Vec<DiskSpec> {
    header
        .disks
        .iter()
        .map(|d| DiskSpec {
            id: d.id.clone(),
            virtual_size: d.virtual_size,
        })
        .collect()
}

fn point_type_code(p: PointType) -> u16 {
    match p {
        PointType::Standard => 1,
        PointType::ApplicationConsistent => 2,
        PointType::PlannedFailover => 3,
    }
}

async fn read_json<T: serde::de::DeserializeOwned + Validate>(
    body: Incoming,
) -> Result<T, ApiError> {
    let limited = http_body_util::Limited::new(body, MAX_JSON_BYTES);
    let bytes = match tokio::time::timeout(IDLE_TIMEOUT, limited.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            let mut d = ErrorDetail::new(
                ErrorCode::TooLarge,
                format!("a JSON body may have at most {MAX_JSON_BYTES} bytes"),
            );
            d.limit = Some(MAX_JSON_BYTES as u64);
            return Err(ApiError(Box::new(d)));
        }
        Ok(Err(e)) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("the request body could not be read: {e}"),
            ))
        }
        Err(_) => {
            return Err(ApiError::new(
                ErrorCode::Timeout,
                "the request body stalled",
            ))
        }
    };
    decode::<T>(&bytes).map_err(|e| {
        let mut d = ErrorDetail::new(ErrorCode::BadRequest, e.to_string());
        if let protocol::MessageError::Invalid { field, .. } = &e {
            d.field = Some((*field).to_string());
        }
        ApiError(Box::new(d))
    })
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn bad_header(name: &str, why: &str) -> ApiError {
    let mut d = ErrorDetail::new(ErrorCode::BadRequest, format!("header {name}: {why}"));
    d.field = Some(name.to_string());
    ApiError(Box::new(d))
}

impl ReplicaSide {
    pub fn new(
        store: Arc<Store>,
        host: String,
        cert_dir: PathBuf,
        data_dir: PathBuf,
        apply_wake: Arc<Notify>,
        claims: crate::claims::VmClaims,
        log_formats: Vec<u16>,
    ) -> ReplicaSide {
        ReplicaSide {
            claims,
            store,
            host,
            cert_dir,
            log_formats,
            apply_wake,
            applied: tokio::sync::watch::Sender::new(0),
            locks: Mutex::new(HashMap::new()),
            receivers: Receivers::default(),
            seed_imports: Arc::default(),
            uploading: Mutex::new(HashMap::new()),
            compares: Mutex::new(HashMap::new()),
            stagings: super::staged::Stagings::default(),
            data_dir,
            failback: std::sync::OnceLock::new(),
        }
    }

    fn compare_of(&self, vm: Uuid, id: Uuid) -> Result<Arc<Compare>, ApiError> {
        let map = self.compares.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&vm).filter(|c| c.id == id).cloned().ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnknownCompare,
                format!("no compare session {id} for {vm}"),
            )
        })
    }

    pub(super) fn remember_compare(&self, vm: Uuid, c: Arc<Compare>) {
        let replaced = self
            .compares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vm, c);
        if let Some(old) = replaced {
            old.state.store(3, std::sync::atomic::Ordering::Release);
            old.prehash.stop();
        }
    }

    /// Stops the background hashing of `vm`'s open compare session, if any (a begin replacing it
    /// takes the hashes it recorded).
    pub(super) fn stop_compare_hashing(&self, vm: Uuid) {
        if let Some(c) = self
            .compares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vm)
        {
            c.prehash.stop();
        }
    }

    /// `POST …/compare` (§5.5). Kind 1, Seeded: the replica VM's own disks (a copy restored on this
    /// host, made a replica with RequestReplicationStateChange(2)) become point 1 here, then the
    /// primary compares block hashes with them and sends only what differs as log 2.
    async fn begin_compare(
        self: &Arc<Self>,
        entry: &AuthorizationEntry,
        vm: Uuid,
        begin: protocol::BeginCompare,
    ) -> ApiResult {
        let (_, rel) = self.bound_vm(entry, vm)?;
        if (begin.kind == 2 || begin.kind == 3)
            && begin.block_size == disk::scan::DEFAULT_BLOCK_SIZE
        {
            return self.begin_resync(entry, vm, &begin, rel.state).await;
        }
        if begin.block_size != disk::scan::DEFAULT_BLOCK_SIZE {
            let mut d = ErrorDetail::new(
                ErrorCode::BadRequest,
                "block_size must be one of compare_block_sizes",
            );
            d.field = Some("block_size".into());
            return Err(ApiError(Box::new(d)));
        }
        let waiting = ReplicationState::WaitingToCompleteInitialReplication.as_u16();
        // Held to the end of this begin: two seeded begins at once (a half-open connection's and
        // its successor's) must not both find no import and both import.
        let _held = self.lock_within(vm, 1).await?;
        // As it is now that this begin holds the VM.
        let (vm_row, rel) = self.bound_vm(entry, vm)?;
        if rel.state == waiting {
            if let Some(going) = self.seeded_again(vm, &begin).await? {
                return Ok(json(200, &going.session()));
            }
        }
        if rel.state != waiting || self.store.last_received_log(vm)?.is_some() {
            let mut d = ErrorDetail::new(
                ErrorCode::InvalidState,
                "a seeded initial replication needs a replica waiting for initial replication, holding no log",
            );
            d.replica_state = Some(rel.state);
            return Err(ApiError(Box::new(d)));
        }
        let mismatch = |why: String| {
            let mut d = ErrorDetail::new(ErrorCode::DiskTableMismatch, why);
            d.expected = None;
            ApiError(Box::new(d))
        };
        if vm_row.disks.len() != begin.disks.len() {
            return Err(mismatch(format!(
                "the replica VM has {} disks, the primary {}",
                vm_row.disks.len(),
                begin.disks.len()
            )));
        }
        let mut images = Vec::new();
        for (path, d) in vm_row.disks.iter().zip(&begin.disks) {
            let (format, size) = crate::engine::initial::disk_table(&VmRow {
                disks: vec![path.clone()],
                ..vm_row.clone()
            })
            .map_err(|f| ApiError::new(ErrorCode::StorageUnavailable, f.message))?
            .remove(0);
            if size != d.virtual_size {
                return Err(mismatch(format!(
                    "the replica's disk {path} has {size} bytes, the primary's {} {}",
                    d.id, d.virtual_size
                )));
            }
            images.push((path.clone(), format, size));
        }
        let compare = Arc::new(Compare {
            id: Uuid::new_v4(),
            state: std::sync::atomic::AtomicU16::new(1),
            failed: Mutex::new(None),
            baseline: 1,
            next: 2,
            block_size: begin.block_size,
            prehash: super::prehash::Prehash::idle(images.len()),
            images,
            resync: false,
            failback: false,
        });
        self.remember_compare(vm, compare.clone());
        let (me, c, disks) = (self.clone(), compare.clone(), begin.disks.clone());
        let importing = SeedImport::start(&self.seed_imports, vm);
        tokio::spawn(async move {
            let _importing = importing;
            let result = me.import_seed(vm, &c, disks).await;
            match result {
                Ok(()) => {
                    // Not if it was cancelled meanwhile (3).
                    use std::sync::atomic::Ordering::{AcqRel, Acquire};
                    if c.state.compare_exchange(1, 2, AcqRel, Acquire).is_ok() {
                        c.start_prehash(None, Vec::new(), None);
                    }
                }
                Err(why) => {
                    tracing::error!(%vm, "importing the seed failed: {why}");
                    *c.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                    c.state.store(3, std::sync::atomic::Ordering::Release);
                }
            }
        });
        tracing::info!(%vm, compare = %compare.id, "seeded comparison begun; importing the seed as point 1");
        Ok(json(201, &compare.session()))
    }

    /// A seeded begin asked again (its answer was lost, or this daemon restarted during the
    /// comparison): the session still going on, or, once the seed is point 1 and nothing came after
    /// it, a new session comparing with point 1 (its hashes recorded so far kept): the seed is never
    /// imported twice. Likewise a first begin on a replica VM that kept the points of a removed
    /// relationship, every log applied: a session on its latest point (next, the one after it).
    /// None when neither is so (a first begin that imports).
    async fn seeded_again(
        &self,
        vm: Uuid,
        begin: &protocol::BeginCompare,
    ) -> Result<Option<Arc<Compare>>, ApiError> {
        let going = self
            .compares
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&vm)
            .filter(|c| {
                !c.resync
                    && !c.failback
                    && c.block_size == begin.block_size
                    && c.images.len() == begin.disks.len()
                    && c.images
                        .iter()
                        .zip(&begin.disks)
                        .all(|((_, _, size), d)| *size == d.virtual_size)
                    && c.state.load(std::sync::atomic::Ordering::Acquire) != 3
            })
            .cloned();
        if let Some(c) = going {
            tracing::info!(%vm, compare = %c.id, "seeded comparison begun again: the session in progress goes on");
            return Ok(Some(c));
        }
        if self
            .seed_imports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&vm)
        {
            // Its session was cancelled, its import goes on: never two at once.
            return Err(busy(
                "the seed of a cancelled seeded comparison is still being imported as point 1; begin again shortly".into(),
            ));
        }
        let replica = self
            .store
            .replica_vm(vm)?
            .ok_or_else(|| ApiError::new(ErrorCode::UnknownVm, "no placeholder record"))?;
        let mut last = self.store.last_received_log(vm)?;
        if last.is_none() {
            last = self.recorded_seed(vm, &replica).await?;
        }
        // Point 1 is a seed imported before; a later point (every log applied) is the latest of
        // the points a removed relationship left this replica VM, made a replica again with
        // RequestReplicationStateChange(2) (spec §13.7: it can seed a new one).
        let Some(point) = last.filter(|l| l.applied).map(|l| l.sequence) else {
            return Ok(None);
        };
        if replica.disks != begin.disks {
            let mut d = ErrorDetail::new(
                ErrorCode::DiskTableMismatch,
                if point == 1 {
                    "the disks differ from those of the seed imported as point 1".to_string()
                } else {
                    format!("the disks differ from those of the replica's point {point}")
                },
            );
            d.expected = Some(replica.disks.clone());
            return Err(ApiError(Box::new(d)));
        }
        if point > 1 {
            // Its log ends the old relationship's points as a resynchronization's does: marked
            // now, not at its commit, so a restart of this daemon in between does not lose it.
            self.store.mark_resync_point(vm, point + 1)?;
        }
        let c = self
            .compare_point(vm, &replica, point, begin, (false, false))
            .await?;
        if point == 1 {
            tracing::info!(%vm, compare = %c.id, "seeded comparison begun again on the seed imported as point 1 before");
        } else {
            tracing::info!(%vm, compare = %c.id, point, "seeded comparison begun on the latest point this replica VM kept from its earlier relationship");
        }
        Ok(Some(c))
    }

    /// A seed that was made point 1 by an import this daemon did not live to record (it stopped
    /// between the point's commit and the log's row, `import_point`): a point is listed only once
    /// committed whole, so it is recorded now as that import would have. None when the store
    /// holds anything else.
    async fn recorded_seed(
        &self,
        vm: Uuid,
        replica: &ReplicaVmRow,
    ) -> Result<Option<ReceivedLog>, ApiError> {
        let root = PathBuf::from(&replica.store_root);
        if !root.join(vm.hyphenated().to_string()).is_dir() {
            return Ok(None);
        }
        let storage = |e: disk::points::StoreError| {
            ApiError::new(ErrorCode::StorageUnavailable, crate::error_chain(&e))
        };
        let points = PointStore::open(&root, vm).await.map_err(storage)?;
        let listed = points.list_points().map_err(storage)?;
        let [seed] = listed.as_slice() else {
            return Ok(None);
        };
        if seed.sequence != 1 || !seed.full_image {
            return Ok(None);
        }
        let same_disks = seed.disks.len() == replica.disks.len()
            && seed
                .disks
                .iter()
                .zip(&replica.disks)
                .all(|(p, d)| p.id == d.id && p.virtual_size == d.virtual_size);
        if !same_disks {
            // Not to be imported over either: the placeholder's disks changed since.
            let mut d = ErrorDetail::new(
                ErrorCode::DiskTableMismatch,
                "point 1 here holds a seed of other disks; remove the replica VM and start again",
            );
            d.expected = Some(replica.disks.clone());
            return Err(ApiError(Box::new(d)));
        }
        let log = ReceivedLog {
            vm,
            sequence: 1,
            log_hash: seed.log_hash.clone(),
            log_bytes: seed.log_bytes,
            point_time: seed.time_micros,
            applied: true,
        };
        self.store.record_applied_log(&log)?;
        self.store
            .put_recovery_points(vm, &[crate::engine::initial::point_row(vm, seed)])?;
        tracing::info!(%vm, "a seed imported as point 1 before a restart is recorded now");
        Ok(Some(log))
    }

    /// Writes the seed disks as a full-image log 1 and applies it (not through the upload path).
    async fn import_seed(&self, vm: Uuid, c: &Compare, disks: Vec<DiskSpec>) -> Result<(), String> {
        let imported = self.import_point(vm, 1, &c.images, &disks, None).await?;
        for map in imported.maps {
            let _ = std::fs::remove_file(map);
        }
        tracing::info!(%vm, bytes = imported.bytes, "seed imported as point 1");
        Ok(())
    }

    /// Makes the images (path, format, virtual size) point `sequence` of `vm`'s store: written as a
    /// full-image log and applied (not through the upload path), recorded as received and applied
    /// with `recorded_hash` (or the written log's hash), mirrored into `recovery_points`. Returns
    /// the images' block-hash maps (temporary files the caller deletes) and the log's size.
    pub(super) async fn import_point(
        &self,
        vm: Uuid,
        sequence: u64,
        images: &[(String, String, u64)],
        disks: &[DiskSpec],
        recorded_hash: Option<&str>,
    ) -> Result<Imported, String> {
        // The points are being replaced: hashes kept of an earlier one go.
        super::prehash::forget_prefixes(&self.data_dir, vm);
        let replica = self
            .store
            .replica_vm(vm)
            .map_err(|e| crate::error_chain(&e))?
            .ok_or("no placeholder record")?;
        let root = PathBuf::from(&replica.store_root);
        let dir = incoming_dir(&root, vm);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let path = dir.join(format!("import-{sequence}.vrlog"));
        let parent = 0; // a full image has no parent
        let header = wire::LogHeader {
            vm,
            relationship: 0,
            sequence,
            parent,
            point_time_micros: now() * 1_000_000,
            point_type: PointType::Standard,
            full_image: true,
            disks: super::reverse::spec_disks(disks),
        };
        let file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
        let mut log = wire::LogWriter::new(
            std::io::BufWriter::with_capacity(1 << 20, file),
            header,
            wire::Compression::Off,
        )
        .map_err(|e| e.to_string())?;
        let mut maps = Vec::new();
        for (i, (image, format, _)) in images.iter().enumerate() {
            let map = dir.join(format!("import-disk{i}.hashes"));
            let scanned = crate::engine::initial::scan_image(
                image,
                format,
                i,
                None,
                &map,
                &self.data_dir,
                &mut log,
            )
            .await;
            match scanned {
                Ok(tmp) => maps.push(tmp),
                Err(f) => {
                    for m in &maps {
                        let _ = std::fs::remove_file(m);
                    }
                    let _ = std::fs::remove_file(&path);
                    return Err(f.failure.message);
                }
            }
        }
        let (w, summary) = log.finish().map_err(|e| e.to_string())?;
        drop(w.into_inner().map_err(|e| e.to_string())?);
        let points = PointStore::open(&root, vm)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        let expect = Expect {
            vm,
            relationship: 0,
            sequence,
            parent,
        };
        let point = points.apply(&path, &expect).await;
        let _ = std::fs::remove_file(&path);
        let point = point.map_err(|e| crate::error_chain(&e))?;
        self.store
            .record_applied_log(&ReceivedLog {
                vm,
                sequence,
                log_hash: recorded_hash.map_or_else(|| hex::encode(summary.hash), str::to_string),
                log_bytes: summary.bytes,
                point_time: point.time_micros,
                applied: true,
            })
            .map_err(|e| crate::error_chain(&e))?;
        let rows: Vec<_> = points
            .list_points()
            .map_err(|e| crate::error_chain(&e))?
            .iter()
            .map(|p| crate::engine::initial::point_row(vm, p))
            .collect();
        self.store
            .put_recovery_points(vm, &rows)
            .map_err(|e| crate::error_chain(&e))?;
        Ok(Imported {
            maps,
            bytes: summary.bytes,
        })
    }

    /// `POST …/compare/{id}/ranges`: which of the primary's block hashes differ from the seed's.
    async fn compare_range(&self, c: &Compare, body: Incoming) -> ApiResult {
        match c.state.load(std::sync::atomic::Ordering::Acquire) {
            1 => return Err(busy("the seed is still being imported".into())),
            3 => {
                let why = c.failed.lock().unwrap_or_else(|p| p.into_inner()).clone();
                return Err(ApiError::new(
                    ErrorCode::InvalidState,
                    format!(
                        "the compare session is closed{}",
                        why.map(|w| format!(": {w}")).unwrap_or_default()
                    ),
                ));
            }
            _ => {}
        }
        let limit = 16 + protocol::MAX_COMPARE_BLOCKS as usize * protocol::BLOCK_HASH_LEN;
        let bytes = http_body_util::Limited::new(body, limit)
            .collect()
            .await
            .map_err(|e| ApiError::new(ErrorCode::TooLarge, format!("the range body: {e}")))?
            .to_bytes();
        let range = protocol::HashRange::parse(&bytes)
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?;
        let Some((image, format, size)) = c.images.get(range.disk as usize).cloned() else {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("no disk {}", range.disk),
            ));
        };
        let blocks = disk::scan::hashmap::block_count(size, c.block_size);
        let count = range.hashes.len() as u64;
        if range.first_block + count > blocks {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "the range goes past the end of the disk",
            ));
        }
        let first = range.first_block;
        // The hashes this side made ahead (prehash), the rest read now.
        let known = c.prehash.take(range.disk as usize, first, count).await;
        let block_size = c.block_size;
        c.prehash
            .count(known.len() as u64, count - known.len() as u64);
        let bits = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
            let mut hashes = known;
            let have = hashes.len() as u64;
            if have < count {
                let opened = super::prehash::Opened::open(&image, &format)?;
                let mut source = opened.source();
                tokio::runtime::Handle::current()
                    .block_on(disk::scan::hash_blocks(
                        &mut source,
                        first + have,
                        count - have,
                        block_size,
                        &mut hashes,
                    ))
                    .map_err(|e| crate::error_chain(&e))?;
            }
            if hashes.len() != range.hashes.len() {
                return Err(format!(
                    "{} hashes made for a range of {count} blocks",
                    hashes.len()
                ));
            }
            let mut bits = vec![0u8; (count as usize).div_ceil(8)];
            for (i, (mine, want)) in hashes.iter().zip(&range.hashes).enumerate() {
                if mine != want {
                    bits[i / 8] |= 1 << (i % 8);
                }
            }
            Ok(bits)
        })
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| ApiError::new(ErrorCode::Internal, e))?;
        let answer = protocol::RangeAnswer {
            disk: range.disk,
            first_block: first,
            count: count as u32,
            bits,
        };
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/vnd.vmreplica.block-bitmap")
            .body(WireBody::bytes(answer.encode()))
            .unwrap_or_else(|_| Response::new(WireBody::bytes(Bytes::new()))))
    }

    /// A place for one more upload from `primary`, or 503 `Busy`.
    fn upload_slot(&self, primary: &str) -> Result<UploadSlot<'_>, ApiError> {
        let mut map = self.uploading.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = map.values().sum();
        let mine = map.get(primary).copied().unwrap_or(0);
        if mine >= MAX_UPLOADS_PER_PRIMARY {
            return Err(busy(format!(
                "{primary} already has {mine} uploads in progress; at most {MAX_UPLOADS_PER_PRIMARY}"
            )));
        }
        if total >= MAX_UPLOADS {
            return Err(busy(format!(
                "{total} uploads are in progress on this recovery server; at most {MAX_UPLOADS}"
            )));
        }
        *map.entry(primary.to_string()).or_default() += 1;
        Ok(UploadSlot {
            side: self,
            primary: primary.to_string(),
        })
    }

    /// Tells the handler still receiving log `seq` of `vm` on an older connection, if any, what the
    /// upload `req` means for it (`Receivers`): the same delivery continued, or the log again from
    /// offset 0 (held as long as the upload is).
    fn tell_older(&self, req: &Request<Incoming>, vm: Uuid, seq: u64) -> TookOver {
        let Some(id) = header(req, headers::UPLOAD_ID).and_then(protocol::parse_guid) else {
            return TookOver::Nothing;
        };
        let anew = header(req, headers::UPLOAD_OFFSET).is_some_and(|o| o.parse::<u64>() == Ok(0));
        let newer = if anew {
            Newer::Anew(id)
        } else {
            Newer::Continued(id)
        };
        self.receivers.take_over(vm, seq, newer)
    }

    /// [`ReplicaSide::upload_slot`]; when `told` an older handler of the same log to stop, a place
    /// is waited for as long as that one may take to stop ([`ANEW_IDLE`] and a second).
    async fn upload_slot_after(
        &self,
        primary: &str,
        told: bool,
    ) -> Result<UploadSlot<'_>, ApiError> {
        let until = tokio::time::Instant::now()
            + if told {
                ANEW_IDLE + Duration::from_secs(1)
            } else {
                Duration::ZERO
            };
        loop {
            match self.upload_slot(primary) {
                Err(e)
                    if e.0.error_code() == Some(ErrorCode::Busy)
                        && tokio::time::Instant::now() < until =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                slot => return slot,
            }
        }
    }

    fn lock_for(&self, vm: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(vm).or_default().clone()
    }

    fn limits() -> Limits {
        Limits {
            max_json_bytes: MAX_JSON_BYTES as u64,
            max_log_bytes: MAX_LOG_BYTES,
            max_parallel_uploads: 4,
            max_pending_apply: 8,
            compare_block_sizes: vec![disk::scan::DEFAULT_BLOCK_SIZE],
            max_compare_blocks: 65_536,
            idle_timeout_secs: IDLE_TIMEOUT.as_secs() as u32,
        }
    }

    pub fn unsupported_version(&self, message: &str) -> ApiError {
        let mut d = ErrorDetail::new(ErrorCode::UnsupportedVersion, message);
        d.versions = Some(PROTOCOL_VERSIONS.to_vec());
        d.log_format_versions = Some(self.log_formats.clone());
        ApiError(Box::new(d))
    }

    pub async fn dispatch(
        self: &Arc<Self>,
        route: protocol::Route,
        entry: AuthorizationEntry,
        name: String,
        names: &[String],
        req: Request<Incoming>,
    ) -> ApiResult {
        use protocol::Route as R;
        match route {
            R::Hello => {
                let hello: Hello = read_json(req.into_body()).await?;
                self.hello(&entry, name, hello)
            }
            R::Test => {
                let _: Empty = read_json(req.into_body()).await?;
                self.test(&entry, name)
            }
            R::PutVm(vm) => {
                let put: PutVm = read_json(req.into_body()).await?;
                self.put_vm(&entry, names, vm, put).await
            }
            R::GetVm(vm) => {
                let (vm_row, rel) = self.bound_vm(&entry, vm)?;
                Ok(json(200, &self.describe(&vm_row, &rel)?))
            }
            R::UploadLog(vm, seq) => {
                // A handler still receiving this log on an older connection is told first: one a
                // crashed primary left frees its place among that primary's uploads within
                // seconds, and this upload waits that long for a place rather than being Busy.
                self.bound_vm(&entry, vm)?;
                let told = self.tell_older(&req, vm, seq);
                let _slot = self
                    .upload_slot_after(&name, !matches!(told, TookOver::Nothing))
                    .await?;
                self.upload(&entry, vm, seq, req).await
            }
            R::LogStatus(vm, seq) => {
                self.bound_vm(&entry, vm)?;
                Ok(json(200, &self.log_status(vm, seq).await?))
            }
            R::CommitLog(vm, seq) => {
                let commit: Commit = read_json(req.into_body()).await?;
                let answer = self.commit(&entry, vm, seq, commit).await;
                if answer.is_ok() {
                    crate::crash::point("log-committed");
                    // The log the compare asked for is committed: the session is done.
                    let mut map = self.compares.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(c) = map.remove(&vm) {
                        if c.next == seq {
                            let (ahead, read) = c.prehash.counts();
                            tracing::info!(%vm, compare = %c.id, blocks_hashed_ahead = ahead, blocks_read_by_ranges = read, "compare session closed by its log");
                            // Its point is no longer the latest: no session will compare it again.
                            c.prehash.stop();
                            let data = self.data_dir.clone();
                            tokio::task::spawn_blocking(move || {
                                super::prehash::forget_prefixes(&data, vm)
                            });
                        } else {
                            map.insert(vm, c);
                        }
                    }
                }
                answer
            }
            R::BeginCompare(vm) => {
                let begin: protocol::BeginCompare = read_json(req.into_body()).await?;
                self.clone().begin_compare(&entry, vm, begin).await
            }
            R::CompareStatus(vm, id) => {
                self.bound_vm(&entry, vm)?;
                Ok(json(200, &self.compare_of(vm, id)?.session()))
            }
            R::CancelCompare(vm, id) => {
                self.bound_vm(&entry, vm)?;
                let c = self.compare_of(vm, id)?;
                self.compares
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&vm);
                c.state.store(3, std::sync::atomic::Ordering::Release);
                // The hashes it made are on disk already, for the next session on its point.
                c.prehash.stop();
                Ok(json(200, &c.session()))
            }
            R::CompareRange(vm, id) => {
                self.bound_vm(&entry, vm)?;
                let c = self.compare_of(vm, id)?;
                self.compare_range(&c, req.into_body()).await
            }
            R::CompareBase(vm, id, disk) => {
                self.bound_vm(&entry, vm)?;
                let c = self.compare_of(vm, id)?;
                self.compare_base(vm, &c, disk)
            }
            R::StartFailback(vm) => {
                let start: protocol::StartFailback = read_json(req.into_body()).await?;
                self.start_failback(&entry, &name, vm, start).await
            }
            R::FailbackStatus(vm) => self.failback_status(&name, vm, false),
            R::CancelFailback(vm) => self.failback_status(&name, vm, true),
        }
    }

    fn hello(&self, entry: &AuthorizationEntry, name: String, h: Hello) -> ApiResult {
        // Every log format this build reads (unless --log-formats named fewer): a primary of an
        // older build writes an older one.
        let formats = &self.log_formats;
        let (Some(pv), Some(lv)) = (
            highest_common(PROTOCOL_VERSIONS, &h.protocol_versions),
            highest_common(formats, &h.log_format_versions),
        ) else {
            return Err(self.unsupported_version(&format!(
                "no common version: this recovery server speaks protocol {PROTOCOL_VERSIONS:?} and log format {formats:?}, the primary offered {:?} and {:?}",
                h.protocol_versions, h.log_format_versions
            )));
        };
        let capabilities = protocol::CAPABILITIES
            .iter()
            .filter(|c| h.capabilities.iter().any(|o| o == *c))
            .map(|c| c.to_string())
            .collect();
        Ok(json(
            200,
            &HelloResponse {
                protocol_version: pv,
                log_format_version: lv,
                capabilities,
                product: format!("vmreplica {}", env!("CARGO_PKG_VERSION")),
                host: self.host.clone(),
                authorized_as: name,
                trust_group: entry.trust_group.clone(),
                limits: Self::limits(),
            },
        ))
    }

    /// The entry's storage location, canonical, or 503 `StorageUnavailable`.
    fn location(entry: &AuthorizationEntry) -> Result<PathBuf, ApiError> {
        std::fs::canonicalize(&entry.replica_storage_location).map_err(|e| {
            ApiError::new(
                ErrorCode::StorageUnavailable,
                format!(
                    "the replica storage location {} is not usable: {e}",
                    entry.replica_storage_location
                ),
            )
        })
    }

    fn test(&self, entry: &AuthorizationEntry, name: String) -> ApiResult {
        let loc = Self::location(entry)?;
        let probe = loc.join(format!(".vmreplica-test-{}", Uuid::new_v4()));
        let unavailable = |e: std::io::Error| {
            ApiError::new(
                ErrorCode::StorageUnavailable,
                format!("cannot write below {}: {e}", loc.display()),
            )
        };
        std::fs::File::create(&probe)
            .and_then(|mut f| f.write_all(b"vmreplica"))
            .map_err(unavailable)?;
        std::fs::remove_file(&probe).map_err(unavailable)?;
        let free = free_bytes(&loc).map_err(unavailable)?;
        Ok(json(
            200,
            &TestResponse {
                storage_free_bytes: free,
                authorized_as: name,
                trust_group: entry.trust_group.clone(),
            },
        ))
    }

    /// §2.3 step 3: the VM must be a replica bound to this entry or its trust group.
    pub(super) fn check_binding(
        &self,
        entry: &AuthorizationEntry,
        rel: &RelationshipRow,
    ) -> Result<(), ApiError> {
        let Some(bound) = rel.authorization_entry.as_deref() else {
            return Ok(());
        };
        if bound.eq_ignore_ascii_case(&entry.allowed_primary_host_system) {
            return Ok(());
        }
        let entries = self.store.authorization_entries()?;
        match entries
            .iter()
            .find(|e| e.allowed_primary_host_system.eq_ignore_ascii_case(bound))
        {
            None => Err(refusal(
                RefusalReason::EntryRemoved,
                format!("the authorization entry '{bound}' this replica was bound to was removed"),
            )),
            Some(b)
                if !b.trust_group.is_empty()
                    && b.trust_group.eq_ignore_ascii_case(&entry.trust_group) =>
            {
                Ok(())
            }
            Some(_) => Err(refusal(
                RefusalReason::NotAuthorizedForVm,
                "this VM replicates from a primary of another trust group",
            )),
        }
    }

    /// The replica VM `vm`, bound to `entry` (404 `UnknownVm`, 403 otherwise).
    fn bound_vm(
        &self,
        entry: &AuthorizationEntry,
        vm: Uuid,
    ) -> Result<(VmRow, RelationshipRow), ApiError> {
        let unknown = || {
            ApiError::new(
                ErrorCode::UnknownVm,
                format!("no replica VM {vm} on this server"),
            )
        };
        let vm_row = self.store.get_vm(vm)?.ok_or_else(unknown)?;
        let mut rel = self.store.get_relationship(vm)?.ok_or_else(unknown)?;
        if vm_row.mode != ReplicationMode::Replica.as_u16() {
            return Err(unknown());
        }
        // A replica made here (RequestReplicationStateChange 2, an import) is bound to the first
        // primary that names it (§2.3 step 3); from then on only its entry or trust group may.
        if rel.authorization_entry.is_none() {
            if self
                .store
                .bind_replica(vm, &entry.allowed_primary_host_system)?
            {
                tracing::info!(%vm, entry = %entry.allowed_primary_host_system, "replica bound to the authorization entry of the first primary that named it");
            }
            rel = self.store.get_relationship(vm)?.ok_or_else(unknown)?;
        }
        self.check_binding(entry, &rel)?;
        Ok((vm_row, rel))
    }

    pub(super) fn describe(
        &self,
        vm: &VmRow,
        rel: &RelationshipRow,
    ) -> Result<ReplicaVm, ApiError> {
        let replica = self.store.replica_vm(vm.id)?;
        let last = self.store.last_received_log(vm.id)?;
        let applied = self.store.last_applied(vm.id)?;
        let pending = self
            .store
            .pending_apply()?
            .iter()
            .filter(|l| l.vm == vm.id)
            .count();
        let upload = match &last {
            Some(l) => self.store.upload(vm.id, l.sequence + 1)?,
            None => self.store.upload(vm.id, 1)?,
        };
        Ok(ReplicaVm {
            vm: vm.id,
            name: vm.name.clone(),
            mode: vm.mode,
            state: rel.state,
            health: 1,
            disks: replica
                .as_ref()
                .map(|r| r.disks.clone())
                .unwrap_or_default(),
            last_committed: match &last {
                Some(l) => LastCommitted {
                    sequence: l.sequence,
                    log_hash: l.log_hash.clone(),
                    point_time: l.point_time,
                },
                None => LastCommitted {
                    sequence: 0,
                    log_hash: String::new(),
                    point_time: 0,
                },
            },
            last_applied_sequence: applied,
            pending_apply: u32::try_from(pending).unwrap_or(u32::MAX),
            resync_required: replica.is_some_and(|r| r.resync_required),
            upload: upload.map(|u| uploaded_status(&u)),
        })
    }

    /// `PUT vms/{vm}` from the primary whose certificate carries the DNS names `names`.
    async fn put_vm(
        &self,
        entry: &AuthorizationEntry,
        names: &[String],
        vm: Uuid,
        put: PutVm,
    ) -> ApiResult {
        let lock = self.lock_for(vm);
        let _guard = lock.lock().await;
        let settings = |mut s: ReplicationSettings| {
            s.replication_interval = put.settings.replication_interval;
            s.recovery_history = u16::from(put.settings.recovery_history);
            s.application_consistent_snapshot_interval =
                u16::from(put.settings.application_consistent_snapshot_interval);
            s.compression_enabled = put.settings.compression_enabled;
            s
        };
        match self.store.get_vm(vm)? {
            Some(existing)
                if existing.mode == ReplicationMode::Primary.as_u16() && put.reverse.is_some() =>
            {
                let from = put
                    .reverse
                    .clone()
                    .unwrap_or_else(|| unreachable!("checked"));
                self.accept_reverse(entry, names, existing, &put, &from)
                    .await
            }
            Some(existing) if existing.mode != ReplicationMode::Replica.as_u16() => {
                Err(ApiError::new(
                    ErrorCode::VmExists,
                    format!(
                        "a VM with id {vm} ('{}') exists on this server and is not a replica",
                        existing.name
                    ),
                ))
            }
            Some(existing) => {
                let mut rel = self.store.get_relationship(vm)?.ok_or_else(|| {
                    ApiError::new(ErrorCode::UnknownVm, "the replica has no relationship")
                })?;
                self.check_binding(entry, &rel)?;
                let replica = match self.store.replica_vm(vm)? {
                    Some(r) => {
                        let committed = self.store.last_received_log(vm)?.is_some();
                        if committed && r.disks != put.disks {
                            let mut d = ErrorDetail::new(
                                ErrorCode::DiskTableMismatch,
                                "the disks differ from the replica's; a resynchronization or a new relationship is needed",
                            );
                            d.expected = Some(r.disks.clone());
                            return Err(ApiError(Box::new(d)));
                        }
                        ReplicaVmRow {
                            disks: put.disks.clone(),
                            ..r
                        }
                    }
                    None => self.new_store_root(entry, vm, &put.disks)?,
                };
                if rel.authorization_entry.is_none() {
                    rel.authorization_entry = Some(entry.allowed_primary_host_system.clone());
                }
                rel.primary_connection_point = Some(put.primary_connection_point.clone());
                rel.settings = settings(rel.settings.clone());
                let mut existing = existing;
                if existing.name != put.name {
                    self.store.rename_vm(vm, &put.name).map_err(|e| {
                        ApiError::new(
                            ErrorCode::VmExists,
                            format!(
                                "the replica cannot be renamed to '{}': {}",
                                put.name,
                                crate::error_chain(&e)
                            ),
                        )
                    })?;
                    existing.name = put.name.clone();
                }
                self.store.put_replica_vm(&replica)?;
                // Only what this request sets: an apply or a commit may write the rest meanwhile.
                if !self.store.put_replica_binding(
                    vm,
                    &rel.settings,
                    &put.primary_connection_point,
                    rel.authorization_entry.as_deref().unwrap_or_default(),
                )? {
                    return Err(ApiError::new(
                        ErrorCode::UnknownVm,
                        "the replica has no relationship",
                    ));
                }
                Ok(json(200, &self.describe(&existing, &rel)?))
            }
            None => {
                let replica = self.new_store_root(entry, vm, &put.disks)?;
                let vm_row = VmRow {
                    id: vm,
                    name: put.name.clone(),
                    disks: Vec::new(),
                    power: PowerControl::default(),
                    mode: ReplicationMode::Replica.as_u16(),
                };
                self.store.insert_vm(&vm_row).map_err(|e| {
                    ApiError::new(
                        ErrorCode::VmExists,
                        format!(
                            "the replica VM '{}' cannot be created: {}",
                            put.name,
                            crate::error_chain(&e)
                        ),
                    )
                })?;
                let mut rel = RelationshipRow::new(vm, now());
                rel.state = ReplicationState::WaitingToCompleteInitialReplication.as_u16();
                rel.settings = settings(ReplicationSettings::default());
                rel.primary_connection_point = Some(put.primary_connection_point.clone());
                rel.authorization_entry = Some(entry.allowed_primary_host_system.clone());
                self.store.put_replica_vm(&replica)?;
                self.store.put_relationship(&rel, vm_row.mode)?;
                tracing::info!(%vm, name = %put.name, primary = %put.primary_connection_point, "replica VM created");
                Ok(json(201, &self.describe(&vm_row, &rel)?))
            }
        }
    }

    /// Fixes the VM's store root below the entry's location (§2.3 step 4).
    pub(super) fn new_store_root(
        &self,
        entry: &AuthorizationEntry,
        vm: Uuid,
        disks: &[DiskSpec],
    ) -> Result<ReplicaVmRow, ApiError> {
        let loc = Self::location(entry)?;
        let dir = loc.join(vm.hyphenated().to_string());
        // Nothing is created through a link planted where the VM's folder goes (`loc` itself is
        // canonical, so `dir` is its only component that can be one).
        if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(refusal(
                RefusalReason::StorageEscape,
                format!(
                    "{} is a symbolic link; the storage location must hold the VM's folder itself",
                    dir.display()
                ),
            ));
        }
        std::fs::create_dir_all(dir.join("incoming")).map_err(|e| {
            ApiError::new(
                ErrorCode::StorageUnavailable,
                format!("cannot create {}: {e}", dir.display()),
            )
        })?;
        let real = std::fs::canonicalize(&dir).map_err(|e| {
            ApiError::new(
                ErrorCode::StorageUnavailable,
                format!("{}: {e}", dir.display()),
            )
        })?;
        if !real.starts_with(&loc) {
            return Err(refusal(
                RefusalReason::StorageEscape,
                format!("{} leads outside the storage location", dir.display()),
            ));
        }
        Ok(ReplicaVmRow {
            vm,
            disks: disks.to_vec(),
            store_root: loc.display().to_string(),
            resync_required: false,
        })
    }

    /// The VM's lock, if its holder (the handler of an upload) lets go of it within 10 s.
    async fn lock_within(
        &self,
        vm: Uuid,
        seq: u64,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>, ApiError> {
        tokio::time::timeout(Duration::from_secs(10), self.lock_for(vm).lock_owned())
            .await
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::Timeout,
                    format!("log {seq} is still arriving on another connection; ask again"),
                )
            })
    }

    async fn log_status(&self, vm: Uuid, seq: u64) -> Result<LogStatus, ApiError> {
        if let Some(l) = self.store.received_log(vm, seq)? {
            return Ok(received_status(&l));
        }
        if let Some(u) = self.store.upload(vm, seq)? {
            return Ok(uploaded_status(&u));
        }
        // Asked by a primary whose connection broke: the handler of that connection, if still
        // receiving, stops.
        let _ = self.receivers.take_over(vm, seq, Newer::Status);
        if self.stagings.is_arriving(vm, seq) {
            // Its connection may just have broken: wait (briefly) for its handler to keep it, or
            // for the end of an upload that arrived whole to be written (it holds the lock).
            let _held = self.lock_within(vm, seq).await?;
            if let Some(l) = self.store.received_log(vm, seq)? {
                return Ok(received_status(&l));
            }
            if let Some(u) = self.store.upload(vm, seq)? {
                return Ok(uploaded_status(&u));
            }
        }
        if let Some((id, fed)) = self.stagings.status(vm, seq) {
            // A staged upload keeps no file to hash: the primary continues it by its upload id.
            return Ok(LogStatus {
                sequence: seq,
                upload_id: Some(id),
                state: TransferState::Uploading as u16,
                offset: fed,
                prefix_hash: None,
                log_hash: None,
                log_bytes: None,
                point_time: None,
            });
        }
        if let Some(replica) = self.store.replica_vm(vm)? {
            let dir = incoming_dir(Path::new(&replica.store_root), vm);
            if let Some((files, cp)) = super::staged::find_checkpoint(&dir, seq) {
                // A staged upload this daemon was receiving when it stopped: it continues from its
                // last checkpoint.
                return Ok(LogStatus {
                    sequence: seq,
                    upload_id: Some(files.upload),
                    state: TransferState::Uploading as u16,
                    offset: cp.offset(),
                    prefix_hash: None,
                    log_hash: None,
                    log_bytes: None,
                    point_time: None,
                });
            }
            // The handler of a connection that just broke may still be appending to a partial
            // upload, or finishing it: it is cut back only once that handler has ended (it holds
            // the lock to its end).
            let _held = match find_partial(&dir, seq) {
                Some(_) => self.lock_within(vm, seq).await?,
                None => return Err(unknown_log(vm, seq)),
            };
            if let Some(u) = self.store.upload(vm, seq)? {
                return Ok(uploaded_status(&u));
            }
            if let Some((id, path)) = find_partial(&dir, seq) {
                let k = cut_back(path.clone()).await?;
                let prefix = prefix_hash(path, k).await?;
                return Ok(LogStatus {
                    sequence: seq,
                    upload_id: Some(id),
                    state: TransferState::Uploading as u16,
                    offset: k,
                    prefix_hash: Some(prefix),
                    log_hash: None,
                    log_bytes: None,
                    point_time: None,
                });
            }
        }
        Err(unknown_log(vm, seq))
    }

    /// Checks the relationship accepts logs now.
    fn accepting(&self, rel: &RelationshipRow, replica: &ReplicaVmRow) -> Result<(), ApiError> {
        if replica.resync_required {
            return Err(ApiError::new(
                ErrorCode::ResyncRequired,
                "the replica cannot continue its chain; resynchronize the primary",
            ));
        }
        let s = rel.state;
        if s == ReplicationState::Suspended.as_u16()
            || s == ReplicationState::ResynchronizationSuspended.as_u16()
        {
            return Err(ApiError::new(
                ErrorCode::Suspended,
                "replication is paused on the replica",
            ));
        }
        let ok = [
            ReplicationState::WaitingToCompleteInitialReplication.as_u16(),
            ReplicationState::Replicating.as_u16(),
            // A failback's log, and the deltas right after it.
            ReplicationState::FailbackInProgress.as_u16(),
            ReplicationState::FailbackComplete.as_u16(),
        ];
        if !ok.contains(&s) {
            let mut d = ErrorDetail::new(
                ErrorCode::InvalidState,
                format!("the replica is in state {s} and accepts no logs"),
            );
            d.replica_state = Some(s);
            return Err(ApiError(Box::new(d)));
        }
        Ok(())
    }

    /// Answer for a log at or below the last committed one (§5.4).
    fn already_committed(&self, l: &ReceivedLog, claimed_hash: Option<&str>) -> ApiResult {
        match claimed_hash {
            Some(h) if !h.eq_ignore_ascii_case(&l.log_hash) => {
                let mut d = ErrorDetail::new(
                    ErrorCode::SequenceConflict,
                    format!("log {} was committed with another hash", l.sequence),
                );
                d.stored_hash = Some(l.log_hash.clone());
                Err(ApiError(Box::new(d)))
            }
            _ => Ok(json(200, &received_status(l))),
        }
    }

    async fn upload(
        &self,
        entry: &AuthorizationEntry,
        vm: Uuid,
        seq: u64,
        req: Request<Incoming>,
    ) -> ApiResult {
        let (_vm_row, rel) = self.bound_vm(entry, vm)?;
        // A handler still receiving this log on an older connection was told (`tell_older`).
        let upload_id = header(&req, headers::UPLOAD_ID).and_then(protocol::parse_guid);
        // Held to the end of this upload (a staged one hands it to the task that finishes it).
        let guard = self.lock_for(vm).lock_owned().await;
        // From here on a newer connection's request for this log stops this one, even before
        // its body is read.
        let receiving = self.receivers.start(vm, seq, upload_id);
        let replica = self
            .store
            .replica_vm(vm)?
            .ok_or_else(|| ApiError::new(ErrorCode::UnknownVm, "no placeholder for this VM"))?;
        let claimed_hash = header(&req, headers::LOG_HASH).map(str::to_string);
        let last = self.store.last_received_log(vm)?;
        let c = last.as_ref().map_or(0, |l| l.sequence);
        if seq <= c {
            let l = self.store.received_log(vm, seq)?.ok_or_else(|| {
                ApiError::new(
                    ErrorCode::UnknownLog,
                    format!("log {seq} is no longer known"),
                )
            })?;
            return self.already_committed(&l, claimed_hash.as_deref());
        }
        self.accepting(&rel, &replica)?;
        let waiting = self
            .store
            .pending_apply()?
            .iter()
            .filter(|l| l.vm == vm)
            .count();
        if waiting >= MAX_PENDING_APPLY && seq == c + 1 {
            return Err(busy(format!(
                "{waiting} committed logs of this VM wait for their apply; at most {MAX_PENDING_APPLY}"
            )));
        }
        if seq > c + 1 {
            let mut d = ErrorDetail::new(
                ErrorCode::OutOfSequence,
                format!("the replica expects log {} next", c + 1),
            );
            d.expected_sequence = Some(c + 1);
            d.expected_parent = Some(c);
            return Err(ApiError(Box::new(d)));
        }
        let upload_id =
            upload_id.ok_or_else(|| bad_header(headers::UPLOAD_ID, "a GUID is required"))?;
        let offset: u64 = header(&req, headers::UPLOAD_OFFSET)
            .ok_or_else(|| bad_header(headers::UPLOAD_OFFSET, "required"))?
            .parse()
            .map_err(|_| bad_header(headers::UPLOAD_OFFSET, "not a number"))?;
        let root = PathBuf::from(&replica.store_root);
        let dir = incoming_dir(&root, vm);
        std::fs::create_dir_all(&dir).map_err(|e| {
            ApiError::new(
                ErrorCode::StorageUnavailable,
                format!("{}: {e}", dir.display()),
            )
        })?;
        let free = free_bytes(&dir).map_err(|e| {
            ApiError::new(
                ErrorCode::StorageUnavailable,
                format!("{}: {e}", dir.display()),
            )
        })?;
        let room = free.saturating_sub(reserve(free)).min(MAX_LOG_BYTES);
        if let Some(len) = header(&req, headers::LOG_LENGTH) {
            let len: u64 = len
                .parse()
                .map_err(|_| bad_header(headers::LOG_LENGTH, "not a number"))?;
            if len > MAX_LOG_BYTES {
                let mut d =
                    ErrorDetail::new(ErrorCode::TooLarge, "the log is larger than max_log_bytes");
                d.limit = Some(MAX_LOG_BYTES);
                return Err(ApiError(Box::new(d)));
            }
            if len > room {
                return Err(ApiError::new(
                    ErrorCode::StorageFull,
                    format!(
                        "the log needs {len} bytes; {room} are free below the storage location"
                    ),
                ));
            }
        }
        let expect = Expect {
            vm,
            relationship: 0,
            sequence: seq,
            parent: c,
        };
        // An initial replica is written into its layers as it arrives (replication::staged).
        let kept = self.stagings.take(vm, seq);
        if offset > 0 {
            if let Some(st) = kept {
                if st.upload != upload_id || st.fed != offset {
                    let mut d = ErrorDetail::new(
                        ErrorCode::OffsetMismatch,
                        "the upload to resume is not at that offset here; continue where this server says, or start again at 0",
                    );
                    d.upload_id = Some(st.upload);
                    d.offset = Some(st.fed);
                    self.stagings.keep(vm, st);
                    return Err(ApiError(Box::new(d)));
                }
                tracing::info!(%vm, sequence = seq, offset, "resuming an upload");
                return self
                    .upload_staged(
                        vm,
                        st,
                        req.into_body(),
                        room,
                        &replica,
                        (guard, &receiving.stop),
                    )
                    .await;
            }
            // A staged upload cut off by this daemon's restart continues from its checkpoint.
            if let Some((files, cp)) = super::staged::find_checkpoint(&dir, seq) {
                if seq != 1 || c != 0 {
                    // A point exists: the checkpoint is left over (the tidy-up deletes it).
                } else if files.upload != upload_id || cp.offset() != offset {
                    let mut d = ErrorDetail::new(
                        ErrorCode::OffsetMismatch,
                        "the upload to resume is not at that offset here; continue where this server says, or start again at 0",
                    );
                    d.upload_id = Some(files.upload);
                    d.offset = Some(cp.offset());
                    return Err(ApiError(Box::new(d)));
                } else {
                    tracing::info!(%vm, sequence = seq, offset, "resuming a staged upload from its checkpoint");
                    let st = super::staged::Staging::start(expect, files, &replica.disks, Some(cp));
                    return self
                        .upload_staged(
                            vm,
                            st,
                            req.into_body(),
                            room,
                            &replica,
                            (guard, &receiving.stop),
                        )
                        .await;
                }
            }
        } else {
            if let Some(old) = kept {
                // Ended first, its files deleted: they may carry this upload's names.
                let _ = old.discard().await;
            }
            let empty = seq == 1
                && c == 0
                && PointStore::open(&root, vm)
                    .await
                    .and_then(|points| points.list_points())
                    .is_ok_and(|points| points.is_empty());
            if empty {
                remove_uploads_of(&dir, seq);
                self.store.remove_uploads(vm)?;
                let files = super::staged::StageFiles::new(&dir, seq, upload_id);
                let st = super::staged::Staging::start(expect, files, &replica.disks, None);
                return self
                    .upload_staged(
                        vm,
                        st,
                        req.into_body(),
                        room,
                        &replica,
                        (guard, &receiving.stop),
                    )
                    .await;
            }
        }
        let (partial, resume_at) = if offset == 0 {
            // Offset 0 discards any other attempt at this sequence.
            remove_uploads_of(&dir, seq);
            self.store.remove_uploads(vm)?;
            (upload_file(&root, vm, seq, upload_id, "partial"), 0)
        } else {
            // A resume: the partial of this upload, cut back to its whole verified records, must
            // end exactly where the primary continues.
            let found = find_partial(&dir, seq);
            let here = match &found {
                Some((id, path)) => Some((*id, cut_back(path.clone()).await?)),
                None => None,
            };
            match (found, here) {
                (Some((id, path)), Some((_, k))) if id == upload_id && k == offset => (path, k),
                (_, here) => {
                    let mut d = ErrorDetail::new(
                        ErrorCode::OffsetMismatch,
                        "the upload to resume is not at that offset here; continue where this server says, or start again at 0",
                    );
                    d.upload_id = here.map(|(id, _)| id);
                    d.offset = Some(here.map_or(0, |(_, k)| k));
                    return Err(ApiError(Box::new(d)));
                }
            }
        };
        // The log is verified while it arrives (a reader thread fed by the receiving task), so the
        // answer follows the last byte instead of a second pass over the file.
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let earlier = match resume_at {
            0 => None,
            k => Some(
                std::fs::File::open(&partial)
                    .map_err(ApiError::internal)?
                    .take(k),
            ),
        };
        let verifier = tokio::task::spawn_blocking(move || {
            let arriving = ChannelReader {
                rx,
                current: Bytes::new(),
            };
            match earlier {
                // A resumed log is verified from its first byte: what was kept, then what arrives.
                Some(kept) => wire::verify(
                    std::io::BufReader::with_capacity(1 << 20, kept).chain(arriving),
                    &expect,
                ),
                None => wire::verify(arriving, &expect),
            }
        });
        if resume_at > 0 {
            tracing::info!(%vm, sequence = seq, offset = resume_at, "resuming an upload");
        }
        let mut got = 0u64;
        // However this handler ends (hyper drops it when the primary resets the stream, as one
        // whose log failed at once does, e.g. on finding its tracking lost), an empty partial
        // holds nothing to resume.
        let _empty = RemoveIfEmpty(partial.clone());
        let received = receive(
            req.into_body(),
            Some((&partial, resume_at > 0)),
            room.saturating_sub(resume_at),
            (&tx, &receiving.stop),
            &mut got,
        )
        .await;
        drop(tx);
        let verified = verifier
            .await
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()));
        let bytes = match received {
            Ok(()) => got + resume_at,
            Err(e)
                if e.0.code == ErrorCode::BadRequest as u16
                    || e.0.code == ErrorCode::Timeout as u16 =>
            {
                // The connection broke or stalled: the partial stays for a resume (its torn last
                // record is cut off when the primary asks where to continue).
                tracing::info!(%vm, sequence = seq, "upload interrupted; kept for a resume");
                return Err(e);
            }
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                // A log that failed verification explains the break better than the break.
                if let Ok(Err(bad)) = verified {
                    if !matches!(
                        bad,
                        LogDecodeError::Io(_) | LogDecodeError::Truncated { .. }
                    ) {
                        return Err(decode_error(bad, 0));
                    }
                }
                return Err(e);
            }
        };
        let verified = verified?;
        let summary = match verified.and_then(|s| agreed_format(&self.log_formats, s)) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(decode_error(e, bytes));
            }
        };
        if disk_specs(&summary.header) != replica.disks {
            let _ = std::fs::remove_file(&partial);
            let mut d = ErrorDetail::new(
                ErrorCode::DiskTableMismatch,
                "the log's disk table differs from the replica's",
            );
            d.expected = Some(replica.disks.clone());
            return Err(ApiError(Box::new(d)));
        }
        let uploaded = upload_file(&root, vm, seq, upload_id, "uploaded");
        std::fs::File::open(&partial)
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&partial, &uploaded))
            .and_then(|()| sync_dir(&dir))
            .map_err(ApiError::internal)?;
        let row = upload_row(vm, upload_id, &summary);
        self.store.put_upload(&row)?;
        tracing::info!(%vm, sequence = seq, bytes = summary.bytes, log_format = summary.version, "log uploaded and verified");
        Ok(json(200, &uploaded_status(&row)))
    }

    /// Feeds `st` (a staged upload: replication::staged) with `body`; once the whole log arrived
    /// and verified, records the upload as a written upload is recorded. A broken or stalled
    /// connection keeps it for a resume.
    async fn upload_staged(
        &self,
        vm: Uuid,
        st: super::staged::Staging,
        body: Incoming,
        room: u64,
        replica: &ReplicaVmRow,
        (guard, stop): (tokio::sync::OwnedMutexGuard<()>, &Told),
    ) -> ApiResult {
        use super::staged::StageError;
        let (seq, upload_id) = (st.sequence, st.upload);
        let mut arriving = self.stagings.arriving(vm, st);
        let st = arriving.staging();
        // `room` is what is free now: the bytes received before a resume are already written.
        let received = receive(body, None, room, (&st.tx, stop), &mut st.fed).await;
        let bytes = st.fed;
        let refused = move |e: StageError| -> ApiError {
            match e {
                StageError::Apply(ApplyError::Rejected { source, .. }) => {
                    decode_error(source, bytes)
                }
                StageError::Apply(e @ ApplyError::FirstMustBeFull { .. }) => ApiError::new(
                    ErrorCode::LogRejected,
                    format!(
                        "the log ({bytes} bytes) was rejected: {}",
                        crate::error_chain(&e)
                    ),
                ),
                StageError::Apply(e) => ApiError::new(
                    ErrorCode::StorageUnavailable,
                    format!(
                        "the log ({bytes} bytes) could not be written into its recovery point: {}",
                        crate::error_chain(&e)
                    ),
                ),
                StageError::DiskTable(expected) => {
                    let mut d = ErrorDetail::new(
                        ErrorCode::DiskTableMismatch,
                        "the log's disk table differs from the replica's",
                    );
                    d.expected = Some(expected);
                    ApiError(Box::new(d))
                }
            }
        };
        match received {
            Err(e)
                if e.0.code == ErrorCode::BadRequest as u16
                    || e.0.code == ErrorCode::Timeout as u16 =>
            {
                tracing::info!(%vm, sequence = seq, bytes, "staged upload interrupted; kept for a resume");
                arriving.keep();
                return Err(e);
            }
            Err(e) => {
                // A refusal of the log, or a layer that could not be written, explains the end
                // better than the receiving side.
                return match arriving.take().discard().await {
                    Ok(Err(StageError::Apply(ApplyError::Rejected {
                        source: LogDecodeError::Io(_) | LogDecodeError::Truncated { .. },
                        ..
                    }))) => Err(e),
                    Ok(Err(refusal)) => Err(refused(refusal)),
                    _ => Err(e),
                };
            }
            Ok(()) => {}
        }
        // The whole body arrived. The rest (the trailer's check, the layers' sync, the `.staged`
        // file and the upload's row) runs on a task of its own: a connection that breaks while the
        // primary waits for this answer drops this handler, not a log that arrived whole (the
        // primary then finds it Uploaded under its id and commits it).
        let st = arriving.take();
        let store = self.store.clone();
        let dir = incoming_dir(Path::new(&replica.store_root), vm);
        let files = st.files.clone();
        let formats = self.log_formats.clone();
        let finishing = tokio::spawn(async move {
            // Counts as arriving (its layers are not tidied away) until its `.staged` file exists,
            // and holds the VM's lock until its row is written: a status asked meanwhile waits.
            // (Dropped in reverse: the arriving mark goes before the lock does.)
            let _guard = guard;
            let _arriving = arriving;
            let layers = st.layers.clone();
            let verdict = st
                .finish()
                .await
                .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
            let (point, summary) = verdict.map_err(|e| {
                // Ended before its trailer, or refused: nothing will continue it.
                files.remove(layers.len());
                refused(e)
            })?;
            let summary = agreed_format(&formats, summary).map_err(|e| {
                files.remove(layers.len());
                decode_error(e, 0)
            })?;
            let staged = super::staged::StagedPoint { point, layers };
            if let Err(e) = staged.write(&super::staged::uploaded_path(&dir, seq, upload_id)) {
                files.remove(staged.layers.len());
                return Err(ApiError::internal(e));
            }
            // The `.staged` file stands for the upload now.
            files.remove_checkpoint(staged.layers.len());
            let row = upload_row(vm, upload_id, &summary);
            store.put_upload(&row)?;
            tracing::info!(%vm, sequence = seq, bytes = summary.bytes, log_format = summary.version, "log uploaded, verified and written into its point (staged)");
            Ok(row)
        });
        let row = finishing
            .await
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))??;
        Ok(json(200, &uploaded_status(&row)))
    }

    async fn commit(
        &self,
        entry: &AuthorizationEntry,
        vm: Uuid,
        seq: u64,
        commit: Commit,
    ) -> ApiResult {
        let (_, rel) = self.bound_vm(entry, vm)?;
        {
            let lock = self.lock_for(vm);
            let _guard = lock.lock().await;
            if let Some(l) = self.store.received_log(vm, seq)? {
                return self.already_committed(&l, Some(&commit.log_hash));
            }
            let replica = self
                .store
                .replica_vm(vm)?
                .ok_or_else(|| ApiError::new(ErrorCode::UnknownVm, "no placeholder for this VM"))?;
            self.accepting(&rel, &replica)?;
            let Some(up) = self.store.upload(vm, seq)? else {
                return Err(ApiError::new(
                    ErrorCode::UnknownLog,
                    format!("no verified upload of log {seq}"),
                ));
            };
            if up.upload_id != commit.upload_id
                || !up.log_hash.eq_ignore_ascii_case(&commit.log_hash)
                || up.log_bytes != commit.log_bytes
            {
                let mut d = ErrorDetail::new(
                    ErrorCode::SequenceConflict,
                    "the commit names another upload, hash or length than the one verified",
                );
                d.stored_hash = Some(up.log_hash.clone());
                d.upload_id = Some(up.upload_id);
                return Err(ApiError(Box::new(d)));
            }
            let root = PathBuf::from(&replica.store_root);
            let mut uploaded = upload_file(&root, vm, seq, up.upload_id, "uploaded");
            let mut committed = committed_log(&root, vm, seq);
            let dir = incoming_dir(&root, vm);
            let staged = super::staged::uploaded_path(&dir, seq, up.upload_id);
            if !uploaded.exists() && staged.exists() {
                (uploaded, committed) = (staged, super::staged::committed_path(&dir, seq));
            }
            // A commit cut off after its rename (a crash, or the store refusing the row) left the
            // file under its committed name and the upload's row in place: asked again, it only
            // writes the row.
            let mut renamed = false;
            if !uploaded.exists() {
                let staged_committed = super::staged::committed_path(&dir, seq);
                if super::staged::StagedPoint::read(&staged_committed)
                    .is_ok_and(|s| s.point.log_hash.eq_ignore_ascii_case(&up.log_hash))
                {
                    (committed, renamed) = (staged_committed, true);
                } else if committed_log_hash(&committed, up.log_bytes)
                    .is_some_and(|h| h.eq_ignore_ascii_case(&up.log_hash))
                {
                    renamed = true;
                }
                if renamed {
                    tracing::info!(%vm, seq, "log {seq} was renamed by a commit cut off before its row: committing it");
                }
            }
            // A resynchronization's log, marked (only now that this commit is checked) before the
            // commit wakes the apply task, which prunes after a resync. The primary says so too:
            // this replica may have lost the session (a restart) while the log was on its way.
            let resync = commit.resync
                || self
                    .compares
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&vm)
                    .is_some_and(|c| c.next == seq && c.resync);
            if resync {
                self.store.mark_resync_point(vm, seq)?;
            }
            if let Err(e) = (if renamed {
                Ok(())
            } else {
                std::fs::rename(&uploaded, &committed)
            })
            .and_then(|()| sync_dir(&incoming_dir(&root, vm)))
            {
                if resync && !committed.exists() {
                    let _ = self.store.take_resync_point(vm, seq);
                }
                return Err(ApiError::internal(e));
            }
            crate::crash::point("log-renamed");
            // LastReplicationType: the point's type (§4.2 numbers them as the log does).
            let done = self.store.commit_upload(&up, up.point_type)?;
            if done != super::records::Committed::Yes {
                remove_committed(&root, vm, seq);
                if resync {
                    let _ = self.store.take_resync_point(vm, seq);
                }
                return Err(if done == super::records::Committed::NoRelationship {
                    ApiError::new(
                        ErrorCode::UnknownVm,
                        "the relationship ended while the log was being committed",
                    )
                } else {
                    ApiError::new(
                        ErrorCode::UnknownLog,
                        format!("the upload of log {seq} was dropped meanwhile; send it again"),
                    )
                });
            }
            tracing::info!(%vm, sequence = seq, "log committed");
            // The replica's statistics (spec §10: per relationship, on both sides): one success
            // per log received, its size, and how old its point was when it arrived.
            let _ = self.store.record_stat(
                vm,
                super::chain::StatEvent::replicated(up.log_bytes, up.point_time),
            );
        }
        self.apply_wake.notify_one();
        if commit.wait_applied {
            let mut rx = self.applied.subscribe();
            let deadline = tokio::time::Instant::now() + WAIT_APPLIED;
            while self.store.last_applied(vm)? < seq {
                if tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        let l = self
            .store
            .received_log(vm, seq)?
            .ok_or_else(|| ApiError::new(ErrorCode::Internal, "the committed log vanished"))?;
        let status = if l.applied {
            200
        } else if commit.wait_applied {
            202
        } else {
            200
        };
        Ok(json(status, &received_status(&l)))
    }
}

fn unknown_log(vm: Uuid, seq: u64) -> ApiError {
    ApiError::new(
        ErrorCode::UnknownLog,
        format!("no upload or committed log {seq} of {vm}"),
    )
}

/// The partial upload of `seq` in `dir`, if any: its upload id and path.
fn find_partial(dir: &Path, seq: u64) -> Option<(Uuid, PathBuf)> {
    let prefix = format!("{seq:020}-");
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let id = name.strip_prefix(&prefix)?.strip_suffix(".partial")?;
        Some((protocol::parse_guid(id)?, e.path()))
    })
}

/// Cuts a partial upload back to its whole verified records; returns the new length.
async fn cut_back(path: PathBuf) -> Result<u64, ApiError> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let k = wire::whole_records_prefix(std::io::BufReader::with_capacity(1 << 20, &file));
        file.set_len(k)?;
        Ok::<_, std::io::Error>(k)
    })
    .await
    .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?
    .map_err(ApiError::internal)
}

/// The log hash (lowercase hex) the trailer of the log file at `path` claims, if the file is
/// `len` bytes long and ends with a whole trailer (only an upload verified whole is renamed to a
/// committed name, so its trailer tells which upload it was).
fn committed_log_hash(path: &Path, len: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    if file.metadata().ok()?.len() != len {
        return None;
    }
    let mut tail = [0u8; 128];
    let n = usize::try_from(len).ok()?.min(tail.len());
    file.seek(SeekFrom::End(-(n as i64))).ok()?;
    file.read_exact(&mut tail[..n]).ok()?;
    wire::trailer_hash(&tail[..n], len).map(hex::encode)
}

/// BLAKE3 of the first `len` bytes of `path`, lowercase hex.
async fn prefix_hash(path: PathBuf, len: u64) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)?;
        let mut hasher = blake3::Hasher::new();
        std::io::copy(&mut std::io::Read::take(file, len), &mut hasher)?;
        Ok::<_, std::io::Error>(hasher.finalize().to_hex().to_string())
    })
    .await
    .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?
    .map_err(ApiError::internal)
}

fn remove_uploads_of(dir: &Path, seq: u64) {
    let prefix = format!("{seq:020}-");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Feeds the verifying thread: a `Read` over the chunks the receiving task sends; the end of the
/// channel is the end of the log.
pub(super) struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    pub(super) fn new(rx: tokio::sync::mpsc::Receiver<Bytes>) -> ChannelReader {
        ChannelReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Streams a request body to the verifier (or the staging thread) and, given a `path`, into that
/// file, refusing more than `room` bytes and a stalled body; counts what it took in `total`. Stops
/// early when the verifier has already rejected the log, and when told to by `stop` (the primary
/// continues on another connection: ended as a broken connection, what arrived is kept; told that
/// the log is sent again from its start, once the body has been idle for [`ANEW_IDLE`] while that
/// upload waits).
async fn receive(
    mut body: Incoming,
    path: Option<(&Path, bool)>,
    room: u64,
    (verifier, stop): (&tokio::sync::mpsc::Sender<Bytes>, &Told),
    total: &mut u64,
) -> Result<(), ApiError> {
    use std::sync::atomic::Ordering;
    let mut file = match path {
        None => None,
        Some((path, append)) => {
            let opened = if append {
                std::fs::OpenOptions::new().append(true).open(path)
            } else {
                std::fs::File::create(path)
            };
            Some(opened.map_err(|e| {
                ApiError::new(
                    ErrorCode::StorageUnavailable,
                    format!("{}: {e}", path.display()),
                )
            })?)
        }
    };
    let start = *total;
    let mut last = tokio::time::Instant::now();
    loop {
        let anew = stop.waiting.load(Ordering::Acquire) > 0;
        let idle = if anew { ANEW_IDLE } else { IDLE_TIMEOUT };
        let next = tokio::select! {
            biased;
            () = stop.notify.notified() => {
                if stop.now.load(Ordering::Acquire) {
                    return Err(ApiError::new(
                        ErrorCode::BadRequest,
                        format!(
                            "the upload was continued on a newer connection after {} bytes on this one",
                            *total - start
                        ),
                    ));
                }
                continue;
            }
            next = tokio::time::timeout_at(last + idle, body.frame()) => next,
        };
        let frame = match next {
            // The uploads that waited for this one went away meanwhile: the usual limit again.
            Err(_) if anew && stop.waiting.load(Ordering::Acquire) == 0 => continue,
            Err(_) if anew => {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "the primary sends this log again from its start on a newer connection, and this one was idle for {} s after {} bytes: it stops",
                        ANEW_IDLE.as_secs(),
                        *total - start
                    ),
                ));
            }
            Err(_) => {
                let mut d = ErrorDetail::new(ErrorCode::Timeout, "the log upload stalled");
                d.offset = Some(0);
                return Err(ApiError(Box::new(d)));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "the upload broke off after {} bytes: {}",
                        *total,
                        crate::error_chain(&e)
                    ),
                ))
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue; // bytes, not frames, keep an upload from being idle
        }
        let len = data.len() as u64;
        if *total - start + len > room {
            return Err(ApiError::new(
                ErrorCode::StorageFull,
                format!("the log exceeds the {room} bytes free below the storage location"),
            ));
        }
        // Writes go to the page cache; the file is synced once, after the trailer verified.
        if let Some(file) = &mut file {
            file.write_all(&data).map_err(ApiError::internal)?;
        }
        if verifier.send(data).await.is_err() {
            // The verifier stopped: the log is already known to be bad.
            return Err(ApiError::new(
                ErrorCode::LogRejected,
                format!("the log was rejected after {} bytes", *total + len),
            ));
        }
        *total += len;
        // Idle is time waiting for bytes: a writer that holds the body back does not count.
        last = tokio::time::Instant::now();
    }
    Ok(())
}

fn decode_error(e: LogDecodeError, bytes: u64) -> ApiError {
    use LogDecodeError as E;
    let (code, offset) = match &e {
        E::ChecksumMismatch { offset } => (ErrorCode::ChecksumMismatch, Some(*offset)),
        E::HashMismatch | E::TrailerMismatch { .. } => (ErrorCode::ChecksumMismatch, None),
        E::WrongVm { .. }
        | E::WrongRelationship { .. }
        | E::OutOfOrder { .. }
        | E::ParentMismatch { .. } => (ErrorCode::OutOfSequence, None),
        E::Truncated { offset } => (ErrorCode::Incomplete, Some(*offset)),
        _ => (ErrorCode::LogRejected, None),
    };
    let mut d = ErrorDetail::new(
        code,
        format!(
            "the log ({bytes} bytes) was rejected and deleted: {}",
            crate::error_chain(&e)
        ),
    );
    d.offset = offset;
    d.decode_error = Some(e.to_string());
    ApiError(Box::new(d))
}

fn uploaded_status(u: &UploadRow) -> LogStatus {
    LogStatus {
        sequence: u.sequence,
        upload_id: Some(u.upload_id),
        state: TransferState::Uploaded as u16,
        offset: u.log_bytes,
        prefix_hash: None,
        log_hash: Some(u.log_hash.clone()),
        log_bytes: Some(u.log_bytes),
        point_time: Some(u.point_time),
    }
}

fn received_status(l: &ReceivedLog) -> LogStatus {
    let state = if l.applied {
        TransferState::Applied
    } else {
        TransferState::Committed
    };
    LogStatus {
        sequence: l.sequence,
        upload_id: None,
        state: state as u16,
        offset: l.log_bytes,
        prefix_hash: None,
        log_hash: Some(l.log_hash.clone()),
        log_bytes: Some(l.log_bytes),
        point_time: Some(l.point_time),
    }
}

/// Tidies every replica VM's `incoming/`: partial uploads are cut back to their whole verified
/// records (a crash may have left a torn one) or deleted after 7 days untouched, and verified
/// uploads nobody can commit any more (no `uploads` row) are deleted. Committed logs stay.
async fn tidy_incoming(replica: &ReplicaSide) {
    let Ok(vms) = replica.store.list_vms() else {
        return;
    };
    for vm in vms {
        let Ok(Some(r)) = replica.store.replica_vm(vm.id) else {
            continue;
        };
        let dir = incoming_dir(Path::new(&r.store_root), vm.id);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let age = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            if name.ends_with(".partial") {
                // An upload writes its partial file under the VM's lock, to the end: one still
                // arriving is neither cut nor deleted (a cut under its writer would leave a hole
                // or a gap in the file its stream verified).
                let lock = replica.lock_for(vm.id);
                let Ok(_held) = lock.try_lock() else {
                    continue;
                };
                if age > ABANDONED_AFTER {
                    tracing::info!(vm = %vm.id, file = %name, "deleting an upload abandoned for 7 days");
                    let _ = std::fs::remove_file(&path);
                } else if let Err(e) = cut_back(path).await {
                    tracing::warn!(vm = %vm.id, file = %name, "cannot cut back a partial upload: {}", e.0.message);
                }
            } else if let Some(stem) = name
                .strip_suffix(".uploaded")
                .or_else(|| name.strip_suffix(".staged").filter(|s| s.contains('-')))
            {
                // Written before its row, under the VM's lock: the row is looked for, and the file
                // deleted, only while this holds the lock (else its row may be on the way).
                let lock = replica.lock_for(vm.id);
                let Ok(_held) = lock.try_lock() else {
                    continue;
                };
                let seq = stem.split('-').next().and_then(|s| s.parse::<u64>().ok());
                let known = match seq {
                    Some(seq) => replica.store.upload(vm.id, seq).ok().flatten().is_some(),
                    None => false,
                };
                if !known {
                    if name.ends_with(".staged") {
                        if let Ok(staged) = super::staged::StagedPoint::read(&path) {
                            staged.remove_layers();
                        }
                    }
                    let _ = std::fs::remove_file(&path);
                }
            } else if name.ends_with(".checkpoint")
                || name.ends_with(".checkpoint.tmp")
                || name.ends_with(".staged.tmp")
            {
                // Its layers go with the `.layer` rule below once it is gone or old. One of an
                // upload arriving or kept here stays (a slow upload saves one rarely).
                let live = name.strip_suffix(".checkpoint").is_some_and(|stem| {
                    replica
                        .stagings
                        .holds(&dir.join(format!("{stem}.disk0.layer")))
                });
                if age > super::staged::ABANDONED_AFTER && !live {
                    tracing::info!(vm = %vm.id, file = %name, "deleting what a staged upload nobody continued left");
                    let _ = std::fs::remove_file(&path);
                }
            } else if name.ends_with(".runs")
                && age > super::staged::ABANDONED_AFTER
                && !recent_checkpoint_of(&dir, &name)
                && !name.rsplit_once(".disk").is_some_and(|(stem, _)| {
                    replica
                        .stagings
                        .holds(&dir.join(format!("{stem}.disk0.layer")))
                })
            {
                // The allocations a checkpoint counts: they go when it did or is old.
                tracing::info!(vm = %vm.id, file = %name, "deleting what a staged upload nobody continued left");
                let _ = std::fs::remove_file(&path);
            } else if name.ends_with(".layer")
                && age > super::staged::ABANDONED_AFTER
                && !replica.stagings.holds(&path)
            {
                // A staged layer belongs to an upload arriving or kept in memory, to a verified
                // upload's `.staged` file (uploaded or committed), or to an upload cut off by a
                // restart whose checkpoint is recent; any other was abandoned.
                let referenced = staged_layers(&dir).iter().any(|l| l == &path)
                    || recent_checkpoint_of(&dir, &name);
                if !referenced {
                    tracing::info!(vm = %vm.id, file = %name, "deleting the layer of an abandoned staged upload");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

/// True if the staged layer `layer` (`<seq>-<upload>.s<nonce>.disk<i>.layer`) has a checkpoint in `dir`
/// younger than [`super::staged::ABANDONED_AFTER`]: its upload may still be continued.
fn recent_checkpoint_of(dir: &Path, layer: &str) -> bool {
    let Some((stem, _)) = layer.rsplit_once(".disk") else {
        return false;
    };
    std::fs::metadata(dir.join(format!("{stem}.checkpoint")))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age <= super::staged::ABANDONED_AFTER)
}

/// The layers named by the `.staged` files in `dir` (verified and committed staged uploads).
fn staged_layers(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".staged"))
        .filter_map(|e| super::staged::StagedPoint::read(&e.path()).ok())
        .flat_map(|s| s.layers)
        .collect()
}

/// Applies committed logs in order, one VM after the other, until the process ends; tidies the
/// uploads at start and then every `tidy_every` (an hour, but for labs).
pub fn spawn_apply_task(replica: Arc<ReplicaSide>, tidy_every: Duration) {
    tokio::spawn(async move {
        let mut failures: HashMap<(Uuid, u64), u32> = HashMap::new();
        let mut tidied: Option<tokio::time::Instant> = None;
        loop {
            if tidied.is_none_or(|t| t.elapsed() > tidy_every) {
                tidy_incoming(&replica).await;
                tidied = Some(tokio::time::Instant::now());
            }
            let pending = match replica.store.pending_apply() {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!("cannot list logs to apply: {}", crate::error_chain(&e));
                    Vec::new()
                }
            };
            let mut blocked = std::collections::HashSet::new();
            let mut retry_soon = false;
            for listed in pending {
                // Asked again under the VM's apply lock: a removal that held it dropped the log (or
                // another log of a new chain took its sequence meanwhile).
                let _applying = replica.claims.applying(listed.vm).await;
                if blocked.contains(&listed.vm) || !applies_now(&replica.store, listed.vm) {
                    continue;
                }
                let log = match replica.store.received_log(listed.vm, listed.sequence) {
                    Ok(Some(l)) if !l.applied => l,
                    _ => continue,
                };
                match apply_one(&replica, &log).await {
                    Ok(()) => {
                        failures.remove(&(log.vm, log.sequence));
                        replica.applied.send_modify(|n| *n += 1);
                    }
                    Err(ApplyOutcome::Retry(msg)) => {
                        blocked.insert(log.vm);
                        let n = failures.entry((log.vm, log.sequence)).or_default();
                        *n += 1;
                        tracing::warn!(vm = %log.vm, sequence = log.sequence, attempt = *n, "applying the log failed: {msg}");
                        if *n >= 3 {
                            // An operator resumes it (RRSC 3); it then gets three more attempts.
                            failures.remove(&(log.vm, log.sequence));
                            mark_state(&replica.store, log.vm, ReplicationState::Critical);
                        } else {
                            retry_soon = true;
                        }
                    }
                    Err(ApplyOutcome::Resync(msg)) => {
                        blocked.insert(log.vm);
                        tracing::error!(vm = %log.vm, sequence = log.sequence, "the log cannot be applied; resynchronization required: {msg}");
                        if let Ok(Some(mut r)) = replica.store.replica_vm(log.vm) {
                            r.resync_required = true;
                            let _ = replica.store.put_replica_vm(&r);
                        }
                        // A failback's log (13): the failback can run again from 9, whether or
                        // not its job still waits here (after a restart none does).
                        let _ = replica.store.move_state(
                            log.vm,
                            ReplicationState::FailbackInProgress.as_u16(),
                            ReplicationState::WaitingToStartResynchronization.as_u16(),
                        );
                    }
                }
            }
            let wait = Duration::from_secs(if retry_soon { 5 } else { 30 }).min(tidy_every);
            let _ = tokio::time::timeout(wait, replica.apply_wake.notified()).await;
        }
    });
}

enum ApplyOutcome {
    Retry(String),
    Resync(String),
}

/// Whether the apply task applies `vm`'s queued logs now: not once the VM is no longer a replica
/// (reversed), not while it is failed over (a RevertFailover applies them), and not in Critical
/// until an operator resumes it (RRSC 3).
///
/// The failover row is read before the mode: a reverse deletes it in the transaction that makes
/// the VM a primary, so either read sees its end.
fn applies_now(store: &Store, vm: Uuid) -> bool {
    if !matches!(store.failover(vm), Ok(None)) {
        return false;
    }
    let critical = store
        .get_relationship(vm)
        .ok()
        .flatten()
        .is_some_and(|r| r.state == ReplicationState::Critical.as_u16());
    let replica = store
        .get_vm(vm)
        .ok()
        .flatten()
        .is_some_and(|v| v.mode == ReplicationMode::Replica.as_u16());
    replica && !critical
}

fn mark_state(store: &Store, vm: Uuid, state: ReplicationState) {
    let _ = store.set_state(vm, state.as_u16());
}

async fn apply_one(replica: &ReplicaSide, log: &ReceivedLog) -> Result<(), ApplyOutcome> {
    use disk::points::ApplyError as A;
    let store = &replica.store;
    let retry = |e: &dyn std::error::Error| ApplyOutcome::Retry(crate::error_chain(e));
    let r = store
        .replica_vm(log.vm)
        .map_err(|e| retry(&e))?
        .ok_or_else(|| ApplyOutcome::Resync("the placeholder record is missing".into()))?;
    let root = PathBuf::from(&r.store_root);
    let points = PointStore::open(&root, log.vm)
        .await
        .map_err(|e| retry(&e))?;
    let path = committed_log(&root, log.vm, log.sequence);
    let expect = Expect {
        vm: log.vm,
        relationship: 0,
        sequence: log.sequence,
        parent: log.sequence - 1,
    };
    // Verified as a whole when it arrived (before its commit): not hashed again.
    let verified = hex::decode(&log.log_hash)
        .ok()
        .and_then(|h| <[u8; 32]>::try_from(h).ok());
    // A staged upload was written into its layers as it arrived (replication::staged).
    let staged_path = super::staged::committed_path(&incoming_dir(&root, log.vm), log.sequence);
    let applied = if staged_path.is_file() {
        let staged = super::staged::StagedPoint::read(&staged_path)
            .map_err(|e| ApplyOutcome::Resync(format!("{}: {e}", staged_path.display())))?;
        points.commit_staged(&staged.point, &staged.layers).await
    } else {
        match verified {
            Some(hash) => points.apply_verified(&path, &expect, hash).await,
            None => points.apply(&path, &expect).await,
        }
    };
    match applied {
        Ok(point) => {
            tracing::info!(vm = %log.vm, sequence = point.sequence, "recovery point applied");
        }
        Err(
            e @ (A::Write { .. }
            | A::WriteLayer { .. }
            | A::Export { .. }
            | A::ReaderTask(_)
            | A::QemuImg(_)
            | A::Store(_)),
        ) => {
            return Err(retry(&e));
        }
        Err(e) => return Err(ApplyOutcome::Resync(crate::error_chain(&e))),
    }
    let settings = store
        .get_relationship(log.vm)
        .map_err(|e| retry(&e))?
        .map(|r| r.settings)
        .unwrap_or_default();
    // The mark goes only once this apply pruned: an apply a crash cuts off before that is done
    // again (the same log: its point is found committed) or, if it was counted applied, its
    // resync's prune comes with the next log's.
    let (resynced, unpruned) = store
        .resync_points(log.vm, log.sequence)
        .map_err(|e| retry(&e))?;
    let policy = if resynced {
        tracing::info!(vm = %log.vm, sequence = log.sequence, "resynchronization applied; the older recovery points go");
        // The point it compared is no longer the latest: its hashes go (also when this replica
        // lost the session in a restart, before the log closed it).
        super::prehash::forget_prefixes(&replica.data_dir, log.vm);
        super::resync::AFTER_RESYNC
    } else if unpruned {
        tracing::info!(vm = %log.vm, sequence = log.sequence, "an earlier resynchronization's point was not pruned yet: the older recovery points go");
        super::resync::AFTER_RESYNC
    } else {
        RetentionPolicy {
            recovery_history: u32::from(settings.recovery_history),
            keep_app_consistent: settings.application_consistent_snapshot_interval > 0,
        }
    };
    let list_points = |points: &PointStore| -> Result<(), ApplyOutcome> {
        let rows: Vec<_> = points
            .list_points()
            .map_err(|e| retry(&e))?
            .iter()
            .map(|p| crate::engine::initial::point_row(log.vm, p))
            .collect();
        store
            .put_recovery_points(log.vm, &rows)
            .map_err(|e| retry(&e))
    };
    // The state first, then the point counts as applied: a crash between the two applies the
    // log again, which finds the state already moved. Both before pruning, which may merge a
    // whole base image (after a resync or failback) and take a while; an interrupted prune is
    // done at the next apply.
    list_points(&points)?;
    // The apply time and the state the log moves the relationship to, written only if the state
    // is still the one read (a command may move it meanwhile: read again then), and nothing else
    // of the row: a write of the whole row read before would undo such a move.
    let mut noted = false;
    for _ in 0..3 {
        let Ok(Some(rel)) = store.get_relationship(log.vm) else {
            noted = true; // removed meanwhile: nothing to note
            break;
        };
        let mut state = rel.state;
        if state == ReplicationState::WaitingToCompleteInitialReplication.as_u16() {
            state = ReplicationState::Replicating.as_u16();
        }
        // The failback's log: the old primary's disks are the new primary's point now.
        // (9: a failback job here was cut off after the log was committed.)
        let failback = state == ReplicationState::FailbackInProgress.as_u16()
            || (state == ReplicationState::WaitingToStartResynchronization.as_u16()
                && super::failback::base_dir(&replica.data_dir, log.vm)
                    .join("base.json")
                    .is_file());
        let complete = resynced && failback;
        if complete {
            state = ReplicationState::FailbackComplete.as_u16();
        } else if !resynced && state == ReplicationState::FailbackComplete.as_u16() {
            // The next delta after a failback: an ordinary replica again.
            state = ReplicationState::Replicating.as_u16();
        }
        match store.note_apply(log.vm, rel.state, state, now()) {
            Ok(true) => {
                if complete {
                    tracing::info!(vm = %log.vm, sequence = log.sequence, "failback complete: the disks equal the new primary's point");
                }
                // Its base describes a point that is no longer the latest: never offered again.
                // (Also when the state read was 14 already: a stop came before this, last time.)
                if resynced && state == ReplicationState::FailbackComplete.as_u16() {
                    super::failback::retire_base(&replica.data_dir, log.vm);
                }
                noted = true;
                break;
            }
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(vm = %log.vm, "cannot record the apply: {}", crate::error_chain(&e));
                noted = true;
                break;
            }
        }
    }
    if !noted {
        tracing::warn!(vm = %log.vm, sequence = log.sequence, "the apply's time and state were not recorded: the relationship kept changing");
    }
    store
        .mark_applied(log.vm, log.sequence)
        .map_err(|e| retry(&e))?;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&staged_path);
    // A point a failover or a test failover chose stays, though its overlay may not exist yet
    // (the failover's job waits for this apply to end; a test VM's job makes its overlay).
    let chosen = || {
        [
            store.failover(log.vm).ok().flatten().map(|f| f.point),
            store.test_system_of(log.vm).ok().flatten().map(|t| t.point),
        ]
        .into_iter()
        .flatten()
        .collect()
    };
    match points
        .prune_keeping(&policy, now() * 1_000_000, chosen)
        .await
    {
        Ok(_) if resynced || unpruned => {
            if let Err(e) = store.forget_resync_points(log.vm, log.sequence) {
                // The next log prunes to its point alone, as after a crash here.
                tracing::warn!(vm = %log.vm, "forgetting the resynchronization's mark failed: {}", crate::error_chain(&e));
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(vm = %log.vm, "pruning recovery points failed: {}", crate::error_chain(&e))
        }
    }
    list_points(&points)?;
    Ok(())
}
