//! Initial replication over the network: `StartReplication` type 1 on the primary
//! (docs/protocol.md §7, first diagram).
//!
//! The job connects to the recovery server with the relationship's certificate, creates or updates
//! the placeholder replica (`PUT vms/{vm}`), builds a full-image log of the VM (turned off, or one
//! frozen point of a running one) and streams it from memory as it is built (`PATCH logs/1`,
//! replication::growing: no spool file is written), and commits it. Only
//! the commit's 200 makes the block-hash maps the baseline of the next delta; the relationship then
//! goes to 3 while the replica applies the point on its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use disk::fingerprint::Fingerprint;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use wire::protocol::{DiskSpec, PutVm, ReplicaVm, Route, VmSettings};

use super::initial::{commit_baseline, disk_table, write_full_log};
use super::running::{RunningError, RunningPoint};
use crate::clock::now;
use crate::jobs::{JobContext, JobFailure};
use crate::power;
use crate::replication::chain::ChainRow;
use crate::replication::client::LogMode;
use crate::replication::client::{Peers, Target};
use crate::store::{RelationshipRow, Store, VmRow};

/// What the job needs besides the VM and its relationship.
pub struct NetworkIr {
    pub store: Arc<Store>,
    pub peers: Arc<Peers>,
    pub data_dir: PathBuf,
}

fn fail(message: impl Into<String>, action: &str) -> JobFailure {
    JobFailure::failed(message, action)
}

/// The target of `rel`'s recovery server.
pub fn target(rel: &RelationshipRow) -> Target {
    Target {
        host: rel.settings.recovery_connection_point.clone(),
        port: rel.settings.recovery_server_port_number,
        thumbprint: rel
            .settings
            .certificate_thumbprint
            .clone()
            .unwrap_or_default(),
    }
}

/// The placeholder's description of `vm` (§5.2).
pub fn put_vm(
    vm: &VmRow,
    rel: &RelationshipRow,
    host: &str,
    kind: u16,
) -> Result<PutVm, JobFailure> {
    let disks = disk_table(vm)?
        .iter()
        .enumerate()
        .map(|(i, (_, size))| DiskSpec {
            id: format!("disk{i}"),
            virtual_size: *size,
        })
        .collect();
    let s = &rel.settings;
    Ok(PutVm {
        name: vm.name.clone(),
        primary_connection_point: host.to_string(),
        initial_replication_type: kind,
        disks,
        settings: VmSettings {
            replication_interval: s.replication_interval,
            recovery_history: u8::try_from(s.recovery_history).unwrap_or(24),
            application_consistent_snapshot_interval: u8::try_from(
                s.application_consistent_snapshot_interval,
            )
            .unwrap_or(12),
            compression_enabled: s.compression_enabled,
        },
        reverse: None,
    })
}

/// Connects to the recovery server and creates or updates the placeholder for an initial
/// replication of `kind` (1 network, 3 seeded); the replica must hold no log yet.
pub async fn open_empty_replica(
    job: &NetworkIr,
    vm: &VmRow,
    rel: &RelationshipRow,
    kind: u16,
) -> Result<(crate::replication::client::Session, PutVm), JobFailure> {
    let target = target(rel);
    let mut session = job
        .peers
        .connect(&target)
        .await
        .map_err(|e| e.into_failure("connecting to the recovery server"))?;
    if kind == 3 {
        session
            .require("seeded-compare")
            .map_err(|e| e.into_failure("a seeded initial replication"))?;
    }
    let put = put_vm(vm, rel, &job.peers.host, kind)?;
    let (_, replica) = session
        .json::<_, ReplicaVm>(Route::PutVm(vm.id), Some(&put))
        .await
        .map_err(|e| e.into_failure("creating or finding the replica VM"))?;
    // A seeded one run again after it imported the seed as point 1 there goes on from that point
    // (`seeded-again`): the seed is not imported twice, and its copy here is compared again. So
    // does one whose replica VM kept the points of a removed relationship and was made a replica
    // again (`seeded-kept`): its latest point is the seed.
    let held = replica.last_committed.sequence;
    let seed_held = kind == 3
        && held >= 1
        && session.has(if held == 1 {
            "seeded-again"
        } else {
            "seeded-kept"
        })
        && replica.last_applied_sequence == held
        && replica.state
            == vmreplica_core::state::ReplicationState::WaitingToCompleteInitialReplication
                .as_u16();
    if held != 0 && !seed_held {
        return Err(fail(
            format!(
                "the replica of '{}' on {} already holds log {}; initial replication would start a second chain",
                vm.name, target.host, replica.last_committed.sequence
            ),
            "Remove the replica VM on the recovery server; or, to send only what changed, remove its replication there (its recovery points are kept), make it a replica again (RequestReplicationStateChange 2) and start a seeded initial replication (type 3).",
        ));
    }
    Ok((session, put))
}

/// The delivery of a VM's log 1, recorded before its upload starts
/// (`tracking/<VMID>/initial-delivery.json`), so that the initial replication run again after the
/// primary restarted (or, for a turned-off VM, after the job gave up on an outage) sends only what
/// the replica does not hold yet: it builds the same log again (the same point time and
/// compression, so the same bytes while what it reads is unchanged) and uploads it under the same
/// id, from the replica's offset (docs/protocol.md §5.3).
///
/// A turned-off VM's disk files whose fingerprints changed since (a VM started and stopped
/// meanwhile, a tool that wrote them) make a run start over at once. A running VM's log is read
/// from the frozen point its QEMU process holds (`frozen`: each disk's bitmap generation), which
/// stays there when this daemon stops: a run again goes on only if the process still holds all of
/// it ([`RunningPoint::adopt`]), and reads the disks as they were at the freeze. A change nothing
/// saw makes other bytes, which the replica's check of the whole log's hash refuses, and the job
/// then starts over under a new upload. Removed once the log is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Delivery {
    upload_id: Uuid,
    point_time_micros: i64,
    compression: bool,
    disks: Vec<String>,
    /// The disk files' fingerprints once this run's bitmaps were rotated, before they were read:
    /// what a later run compares before its own rotation changes them (empty: never compared
    /// equal).
    prints: Vec<Fingerprint>,
    /// The version of vmreplicad that built the log, and its log format ([`builder`]): another
    /// may build other bytes.
    built_by: String,
    /// A running VM's: the bitmap generation of each disk's frozen point; None for a turned-off
    /// VM's files.
    #[serde(default)]
    frozen: Option<Vec<u64>>,
}

/// Who builds a log, for [`Delivery::built_by`]: the product version and the log format version
/// (a log of one format resumed in another would be refused only at its trailer).
fn builder(format: u16) -> String {
    format!("{} log format {format}", env!("CARGO_PKG_VERSION"))
}

impl Delivery {
    fn file(tracking: &Path) -> PathBuf {
        tracking.join("initial-delivery.json")
    }

    /// The recorded delivery of this VM's log 1, if any.
    fn recorded(tracking: &Path) -> Option<Delivery> {
        serde_json::from_slice(&std::fs::read(Self::file(tracking)).ok()?).ok()
    }

    /// Why this delivery's log cannot be built again the same for `vm` now, if it cannot.
    fn changed(&self, vm: &VmRow, mode: LogMode) -> Option<&'static str> {
        if self.disks != vm.disks {
            return Some("the VM's disks are other files");
        }
        if self.compression != mode.zstd {
            return Some("its compression setting changed");
        }
        if self.built_by != builder(mode.format) {
            return Some("another version of vmreplicad, or another log format, built it");
        }
        let running = power::enabled_state(&vm.power) == power::ENABLED;
        match (running, self.frozen.is_some()) {
            // Whether its QEMU process still holds the point is asked next (`RunningPoint::adopt`).
            (true, true) => return None,
            (true, false) => return Some("the VM was turned off then and runs now"),
            (false, true) => return Some("the VM ran then and is turned off now"),
            (false, false) => {}
        }
        let now: Option<Vec<Fingerprint>> = fingerprints(&vm.disks);
        (now.as_ref() != Some(&self.prints) || self.prints.is_empty())
            .then_some("a disk file changed since")
    }

    /// Records it (synced); a failure only means a later run starts over.
    fn record(&self, tracking: &Path) {
        let saved = std::fs::create_dir_all(tracking).and_then(|()| {
            let tmp = tracking.join("initial-delivery.json.tmp");
            let body = serde_json::to_vec(self).map_err(std::io::Error::other)?;
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &body)?;
            f.sync_all()?;
            std::fs::rename(&tmp, Self::file(tracking))?;
            std::fs::File::open(tracking)?.sync_all()
        });
        if let Err(e) = saved {
            tracing::warn!(
                "cannot record the initial replication's delivery in {}: {e}",
                tracking.display()
            );
        }
    }

    fn forget(tracking: &Path) {
        let _ = std::fs::remove_file(Self::file(tracking));
    }
}

/// Forgets the recorded delivery of `vm`'s log 1, if any: a new frozen point of the running VM
/// replaces the one it was read from ([`RunningPoint::freeze`]).
pub fn forget_delivery(data_dir: &Path, vm: Uuid) {
    Delivery::forget(&super::reverse::tracking_dir(data_dir, vm));
}

/// The fingerprints of every file of `disks` (None if one cannot be read).
fn fingerprints(disks: &[String]) -> Option<Vec<Fingerprint>> {
    disks
        .iter()
        .map(|d| Fingerprint::of(Path::new(d)).ok())
        .collect()
}

/// Whether the replica holds part or all of log 1 under `upload_id` (an error asking: no).
async fn replica_holds(
    session: &mut crate::replication::client::Session,
    vm: Uuid,
    upload_id: Uuid,
) -> bool {
    use wire::protocol::{LogStatus, TransferState};
    match session
        .json::<(), LogStatus>(Route::LogStatus(vm, 1), None)
        .await
    {
        Ok((_, s)) => {
            s.upload_id == Some(upload_id)
                && (s.state == TransferState::Uploading as u16 && s.offset > 0
                    || s.state == TransferState::Uploaded as u16)
        }
        Err(_) => false,
    }
}

/// The network IR job's work; returns the relationship with its replication time set.
pub async fn run(
    ctx: JobContext,
    job: NetworkIr,
    vm: VmRow,
    mut rel: RelationshipRow,
) -> Result<RelationshipRow, JobFailure> {
    let target = target(&rel);
    let (mut session, _) = open_empty_replica(&job, &vm, &rel, 1).await?;
    ctx.progress(2)?;
    // The log is sent from memory: this path only names it (nothing is written there).
    let log_path = job
        .data_dir
        .join("outgoing")
        .join(vm.id.to_string().to_uppercase())
        .join(format!("{:020}.vrlog", 1));
    let mode = session.log_mode(rel.settings.compression_enabled);
    // A turned-off VM's qcow2 disks record what is written to them from before they are read
    // (engine::offline), for a failback.
    let tracking = super::reverse::tracking_dir(&job.data_dir, vm.id);
    // The log can be built again the same after a restart of this host: its delivery is recorded,
    // and an earlier one goes on when the replica holds some of it and what it was read from is
    // still there: a turned-off VM's files as that one left them (checked before this run's
    // rotation changes them), a running VM's frozen point in its QEMU process (adopted before a
    // new freeze would clear it).
    let mut earlier = match Delivery::recorded(&tracking) {
        Some(d) => match d.changed(&vm, mode) {
            None if replica_holds(&mut session, vm.id, d.upload_id).await => Some(d),
            None => None,
            Some(why) => {
                tracing::info!(vm = %vm.id, "the initial replica starts over, not from its earlier delivery: {why}");
                None
            }
        },
        None => None,
    };
    let adopted = match earlier.as_ref().and_then(|d| d.frozen.as_deref()) {
        Some(generations) => match RunningPoint::adopt(&vm, &job.data_dir, generations).await {
            Ok(point) => point,
            Err(e) => {
                tracing::warn!(vm = %vm.id, "looking for the earlier delivery's frozen point: {}", e.message());
                None
            }
        },
        None => None,
    };
    if earlier.as_ref().is_some_and(|d| d.frozen.is_some()) && adopted.is_none() {
        tracing::info!(vm = %vm.id, "the initial replica starts over, not from its earlier delivery: the VM's QEMU process no longer holds its frozen point");
        earlier = None;
    }
    let running = match adopted {
        Some(point) => Some(point),
        None => freeze_if_running(&vm, &job.data_dir).await?,
    };
    let offline = running.is_none();
    let rotation = match running {
        None => super::offline::Rotation::before_read(&vm.disks, &tracking, true).await,
        Some(_) => super::offline::Rotation::none(),
    };
    // A turned-off VM's files as they were before they were read (replication::journal).
    let prints = running
        .is_none()
        .then(|| crate::replication::journal::fingerprints_before_read(&vm.disks));
    if let Some(d) = &earlier {
        tracing::info!(vm = %vm.id, upload_id = %d.upload_id, "the initial replica goes on from an earlier delivery of the same log");
    }
    let mut resumed = earlier.is_some();
    let mut delivery = earlier.unwrap_or_else(|| Delivery {
        upload_id: Uuid::new_v4(),
        point_time_micros: now() * 1_000_000,
        compression: mode.zstd,
        disks: vm.disks.clone(),
        prints: Vec::new(),
        built_by: builder(mode.format),
        frozen: running.as_ref().map(RunningPoint::generations),
    });
    let sent = loop {
        if offline {
            // As the rotation left the files, for the next run to compare.
            delivery.prints = fingerprints(&vm.disks).unwrap_or_default();
        }
        delivery.record(&tracking);
        let sent = send_full(
            &ctx,
            &job,
            &vm,
            &rel,
            &mut session,
            &log_path,
            (&delivery, resumed),
            running.as_ref(),
        )
        .await;
        // Only a resumed delivery starts over, so this runs at most twice.
        let Err((f, true)) = &sent else {
            break sent.map_err(|(f, _)| f);
        };
        tracing::warn!(vm = %vm.id, "the initial replica starts over under a new upload: the log built again for its earlier delivery was refused ({})", f.message);
        delivery.upload_id = Uuid::new_v4();
        if offline {
            // The files are read again now; a running VM's point stays the one frozen then.
            delivery.point_time_micros = now() * 1_000_000;
        }
        resumed = false;
    };
    if let Some(r) = running {
        if let Err(e) = r.finish(sent.is_ok()).await {
            tracing::warn!(vm = %vm.id, "ending the frozen point: {}", e.message());
        }
    }
    let committed = sent.and_then(|(log, hash)| {
        commit_baseline(&vm, &log, prints.as_deref()).map(|()| (log, hash))
    });
    let (log, hash) = match committed {
        Ok(c) => c,
        Err(f) => {
            // A kept record must describe the files as the rotation's undoing leaves them, unless
            // something else changed them meanwhile: then the next run starts over.
            let kept = Delivery::recorded(&tracking)
                .filter(|d| offline && fingerprints(&vm.disks).as_ref() == Some(&d.prints));
            rotation.abandon(&vm.disks).await;
            match kept {
                Some(mut d) => {
                    d.prints = fingerprints(&vm.disks).unwrap_or_default();
                    d.record(&tracking);
                }
                None => Delivery::forget(&tracking),
            }
            return Err(f);
        }
    };
    Delivery::forget(&tracking);
    rotation.after_commit(&vm.disks, &tracking).await;
    if prints.is_some() {
        super::offline::remember_marked(&job.data_dir, vm.id, &vm.disks, &tracking, 1).await;
    }
    let _ = std::fs::remove_file(&log.path);
    job.store.put_chain(&ChainRow {
        vm: vm.id,
        last_sequence: 1,
        last_log_hash: hash,
        next_due: now() + i64::from(rel.settings.replication_interval),
        retries: 0,
        retry_at: 0,
        last_error: None,
    })?;
    rel.last_replication_time = Some(log.summary.header.point_time_micros / 1_000_000);
    rel.last_replication_type = vmreplica_core::state::ReplicationType::Regular.as_u16();
    tracing::info!(vm = %vm.id, bytes = log.summary.bytes, server = %target.host, at = now(), "initial replica sent and committed");
    Ok(rel)
}

/// Writes, uploads and commits log 1; returns it and its hash.
#[allow(clippy::too_many_arguments)]
async fn send_full(
    ctx: &JobContext,
    job: &NetworkIr,
    vm: &VmRow,
    rel: &RelationshipRow,
    session: &mut crate::replication::client::Session,
    log_path: &std::path::Path,
    (delivery, resumed): (&Delivery, bool),
    running: Option<&RunningPoint>,
) -> Result<(super::initial::FullLog, String), (JobFailure, bool)> {
    // The log is sent while it is written: the scan and the transfer overlap.
    let growing = std::sync::Arc::new(crate::replication::client::GrowingLog::in_memory(
        crate::replication::growing::KEEP_STAGED,
    ));
    let progress_ctx = ctx.clone();
    let progress: crate::replication::client::Progress =
        std::sync::Arc::new(move |sent: u64, total: u64| {
            if let Some(share) = (sent * 50).checked_div(total) {
                let _ = progress_ctx.progress((45 + share as u16).min(95));
            }
        });
    let target = target(rel);
    let build = disk::scan::paced(
        growing.clone(),
        write_full_log(
            ctx,
            vm,
            log_path,
            delivery.point_time_micros,
            // The delivery's compression, in the format this connection agreed on (the one the
            // delivery was recorded with: `Delivery::changed`).
            LogMode {
                zstd: delivery.compression,
                format: session.hello.log_format_version,
            },
            &job.data_dir,
            45,
            running,
            Some(growing.clone()),
        ),
    );
    let send = job.peers.deliver(
        &target,
        session,
        vm.id,
        1,
        log_path,
        growing.clone(),
        progress,
        crate::replication::client::CommitAs::default(),
        crate::replication::client::Patience::initial({
            let ctx = ctx.clone();
            std::sync::Arc::new(move || ctx.is_cancelled())
        }),
        (Some(delivery.upload_id), resumed),
    );
    // A cancel stops the scan and the upload where they are (within 200 ms), not at the end of
    // the disk: the upload stops as after a broken connection, so the replica keeps what arrived
    // for a run again, and the scan's next write into the log fails. (Once the log is complete
    // the upload goes on to its commit; once the commit was sent, its answer is awaited:
    // `client::Patience`.)
    let _watch = crate::replication::client::AbortOnDrop(tokio::spawn({
        let (ctx, growing) = (ctx.clone(), growing.clone());
        async move {
            while !ctx.is_cancelled() {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            growing.fail("the job was cancelled".into());
            growing.close();
        }
    }));
    let (built, delivered) = tokio::join!(build, send);
    // The delivery stays recorded for a run after this host's restart, a broken connection or a
    // cancel; an upload refused for another reason starts over. A log built again for an earlier
    // delivery and refused (the disks no longer make its bytes) starts over at once (`true`).
    let mut start_over = false;
    if let Err(e) = &delivered {
        if !e.is_network() && !ctx.is_cancelled() {
            Delivery::forget(&super::reverse::tracking_dir(&job.data_dir, vm.id));
            start_over = resumed;
        }
    }
    let log = match built {
        Ok(log) => log,
        Err(f) => {
            let _ = std::fs::remove_file(log_path);
            // A build stopped because the upload gave up: the upload's error says why.
            return match delivered {
                // A cancel that ended the wait for the recovery server says so.
                Err(_) if ctx.is_cancelled() => Err((JobFailure::cancelled(), false)),
                Err(e) if growing.closed_first() => {
                    Err((e.into_failure("sending the initial replica"), start_over))
                }
                _ => Err((f, false)),
            };
        }
    };
    let hash = hex::encode(log.summary.hash);
    let done = match delivered {
        Ok(d) => d.status,
        Err(e) => {
            let _ = std::fs::remove_file(&log.path);
            ctx.check_cancelled().map_err(|f| (f, false))?;
            return Err((e.into_failure("sending the initial replica"), start_over));
        }
    };
    if done.log_hash.as_deref() != Some(hash.as_str()) {
        return Err((
            fail(
                "the recovery server committed log 1 with another hash",
                "Resynchronize the VM.",
            ),
            false,
        ));
    }
    Ok((log, hash))
}

/// A running VM is read from one frozen point of its QEMU process, where tracking starts; None for
/// a turned-off VM, whose files are read.
pub async fn freeze_if_running(
    vm: &VmRow,
    data_dir: &std::path::Path,
) -> Result<Option<RunningPoint>, JobFailure> {
    if power::enabled_state(&vm.power) != power::ENABLED {
        return Ok(None);
    }
    RunningPoint::freeze(vm, data_dir, true)
        .await
        .map(Some)
        .map_err(|e| running_failed(vm, &e))
}

/// The job failure of a running VM's point that could not be taken or read.
pub fn running_failed(vm: &VmRow, e: &RunningError) -> JobFailure {
    fail(
        format!(
            "cannot take or read a point of the running VM '{}': {}",
            vm.name,
            e.message()
        ),
        "Check the VM's QMP socket, or turn the VM off.",
    )
}
