//! Seeded initial replication: `StartReplication` type 3 on the primary (docs/protocol.md §5.5).
//!
//! The recovery server already holds a copy of the VM's disks (restored from a backup, say) as the
//! disks of a replica VM with the same GUID (RequestReplicationStateChange(2) there). The job hashes
//! every block of the turned-off VM (the block-hash maps of the next delta), asks the replica to
//! import its copy as point 1 and to compare its blocks with these hashes range by range, and sends
//! only the blocks that differ, as an ordinary delta log 2 (parent 1). A copy that is identical
//! costs the hashes and an empty log; nothing of the disks travels twice.
//!
//! A running VM is hashed and read from one frozen point of its QEMU process
//! ([`RunningPoint`]), taken once the replica is ready; tracking starts at that point, and it is
//! kept until the replica committed the log (or merged back if anything failed).

use std::sync::Arc;
use std::time::Duration;

use disk::scan::hashmap::MapReader;
use disk::scan::DEFAULT_BLOCK_SIZE;
use wire::protocol::{
    BeginCompare, CompareSession, HashRange, PutVm, RangeAnswer, Route, MAX_COMPARE_BLOCKS,
};
use wire::{Compression, LogHeader, LogWriter, PointType};

use super::initial::{disk_table, scan_image, scan_image_ranges};
use super::network::{freeze_if_running, open_empty_replica, running_failed, target, NetworkIr};
use super::running::RunningPoint;
use crate::clock::now;
use crate::jobs::{JobContext, JobFailure};
use crate::replication::chain::{ChainRow, StatEvent};
use crate::replication::client::{GrowingLog, PeerError};
use crate::store::{RelationshipRow, VmRow};

/// Blocks per compared range (256 MiB at 64 KiB): a range answers within seconds, in step with
/// the replica's own hashing (replication::prehash), far under the request timeout.
const RANGE_BLOCKS: usize = 4096;
const _: () = assert!(RANGE_BLOCKS <= MAX_COMPARE_BLOCKS as usize);

pub(super) fn fail(message: impl Into<String>, action: &str) -> JobFailure {
    JobFailure::failed(message, action)
}

pub(super) fn local(e: impl std::error::Error) -> JobFailure {
    fail(
        crate::error_chain(&e),
        "Check the data directory and the VM's disks.",
    )
}

/// The seeded IR job's work; returns the relationship with its replication time set.
pub async fn run(
    ctx: JobContext,
    job: NetworkIr,
    vm: VmRow,
    mut rel: RelationshipRow,
) -> Result<RelationshipRow, JobFailure> {
    let (session, put) = open_empty_replica(&job, &vm, &rel, 3).await?;
    frozen_compare_and_send(&ctx, &job, &vm, &mut rel, session, (put, None), (1, false)).await?;
    forget_hash_progress(&job.data_dir, vm.id, vm.disks.len());
    Ok(rel)
}

/// [`compare_and_send`] from a frozen point of a running VM (released afterwards: its bitmaps
/// restart there on success), or from the files of a turned-off one.
async fn frozen_compare_and_send(
    ctx: &JobContext,
    job: &NetworkIr,
    vm: &VmRow,
    rel: &mut RelationshipRow,
    session: crate::replication::client::Session,
    put: (PutVm, Option<wire::protocol::ReverseFrom>),
    kind: (u16, bool),
) -> Result<(), JobFailure> {
    let running = freeze_if_running(vm, &job.data_dir).await?;
    let result = compare_and_send(ctx, job, vm, rel, session, put, running.as_ref(), kind).await;
    if let Some(r) = running {
        if let Err(e) = r.finish(result.is_ok()).await {
            tracing::warn!(vm = %vm.id, "ending the frozen point: {}", e.message());
        }
    }
    result
}

/// Resynchronize (docs/protocol.md §5.5 kind 2): the same comparison, against the replica's
/// latest recovery point instead of a seed; tracking (maps, and a running VM's bitmaps) restarts
/// from the point compared. Cancellable; a resync cut off before its commit changes nothing on the
/// replica, and the relationship goes back to 9.
pub async fn resync(
    ctx: JobContext,
    job: NetworkIr,
    vm: VmRow,
    mut rel: RelationshipRow,
    resume: bool,
) -> Result<RelationshipRow, JobFailure> {
    let target = target(&rel);
    let session = job
        .peers
        .connect(&target)
        .await
        .map_err(|e| e.into_failure("connecting to the recovery server"))?;
    let put = super::network::put_vm(&vm, &rel, &job.peers.host, 1)?;
    // After a reversed unplanned failover, the old primary first becomes the replica, its own
    // disks the point to compare with (docs/protocol.md §5.7).
    let reverse = job.store.failover(vm.id)?.map(|f| f.resync_reverse(false));
    // Refused before anything is frozen or sent (a seeded IR asks in `open_empty_replica`).
    session
        .require("seeded-compare")
        .map_err(|e| e.into_failure("comparing block hashes"))?;
    if reverse.is_some() {
        session
            .require("reverse")
            .map_err(|e| e.into_failure("making the old primary the replica"))?;
    }
    let result = frozen_compare_and_send(
        &ctx,
        &job,
        &vm,
        &mut rel,
        session,
        (put, reverse),
        (2, resume),
    )
    .await;
    if result.is_ok() {
        // The new direction is established: no failover left to reverse from.
        job.store.remove_failover(vm.id)?;
        forget_hash_progress(&job.data_dir, vm.id, vm.disks.len());
    }
    result.map(|()| rel)
}

/// Hashes, compares (`kind` 1 against a seed, 2 against the latest point) and sends; `running` is
/// the frozen point of a running VM. With `reverse`, the replica is first asked to take its own
/// disks as the point compared with (a resync after a reversed unplanned failover). With
/// `resume` (a paused resynchronization going on), the hashes of a turned-off VM's disks made
/// before the pause are kept while the files did not change ([`hash_kept`]).
#[allow(clippy::too_many_arguments)]
async fn compare_and_send(
    ctx: &JobContext,
    job: &NetworkIr,
    vm: &VmRow,
    rel: &mut RelationshipRow,
    mut session: crate::replication::client::Session,
    (put, reverse): (PutVm, Option<wire::protocol::ReverseFrom>),
    running: Option<&RunningPoint>,
    (kind, resume): (u16, bool),
) -> Result<(), JobFailure> {
    // 1. Both sides hash at the same time: this side its disks, while the replica takes in its
    //    copy (reverse: its own disks, hashed as they are copied) and hashes it in the background
    //    once the session begins (replication::prehash). Kind 1 begins (imports the seed) only
    //    after this side hashed; the replica then hashes the seed while the ranges start.
    let disks = disk_table(vm)?;
    let to = target(rel);
    let recovery = Recovery {
        ctx,
        job,
        vm,
        to: &to,
        // A seeded begin imports the seed: sent again only to a replica that then takes up what
        // it began or imported (`seeded-again`), never imports twice.
        begin_again: kind == 2 || session.has("seeded-again"),
        begin: &BeginCompare {
            kind,
            block_size: DEFAULT_BLOCK_SIZE,
            disks: put.disks.clone(),
        },
    };
    // The session begun, if this side's hashing fails (or is cancelled) after it did.
    let begun = std::sync::Mutex::new(None);
    let prepare = async {
        if let Some(from) = reverse {
            let mut put = put.clone();
            put.reverse = Some(from);
            session
                .json_within::<_, wire::protocol::ReplicaVm>(
                    Route::PutVm(vm.id),
                    Some(&put),
                    super::reverse::REVERSE_LIMIT,
                )
                .await
                .map_err(|e| e.into_failure("making the old primary the replica"))?;
        }
        let cs = match session
            .json::<_, CompareSession>(Route::BeginCompare(vm.id), Some(recovery.begin))
            .await
        {
            Ok((_, cs)) => cs,
            Err(e) => recovery.again(&mut session, None, e).await?,
        };
        *begun.lock().unwrap_or_else(|p| p.into_inner()) = Some(cs.id);
        Ok(cs)
    };
    let (own, cs) = if kind == 1 {
        // A seed is imported as point 1 at the begin, which a failure after it would leave
        // behind (the replica then holds a log): this side hashes first.
        let own = hash_own(ctx, job, vm, &disks, running, resume).await?;
        (own, prepare.await?)
    } else {
        // The first failure ends both (a refused begin stops the hashing at once). A session
        // begun meanwhile is cancelled, so the replica keeps the hashes it made of its point for
        // the next one (a pause, spec §13.6) and lets the point go.
        match tokio::try_join!(hash_own(ctx, job, vm, &disks, running, resume), prepare) {
            Ok(both) => both,
            Err(failure) => {
                let id = *begun.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(id) = id {
                    let _ = session
                        .json::<(), CompareSession>(Route::CancelCompare(vm.id, id), None)
                        .await;
                }
                return Err(failure);
            }
        }
    };
    let mut cs = cs;
    let result = compare_begun(
        ctx,
        job,
        vm,
        rel,
        &mut session,
        running,
        &recovery,
        &mut cs,
        own,
    )
    .await;
    if result.is_err() {
        // Best effort: the replica drops the session (and its pin) now rather than at the next;
        // the one held last (a recovery may have begun another).
        let _ = session
            .json::<(), CompareSession>(Route::CancelCompare(vm.id, cs.id), None)
            .await;
    }
    result
}

/// The header of a log of `vm` (disk table `disks`).
fn log_header(
    vm: &VmRow,
    disks: &[(String, u64)],
    sequence: u64,
    parent: u64,
    full_image: bool,
    point_time_micros: i64,
) -> LogHeader {
    LogHeader {
        vm: vm.id,
        relationship: 0,
        sequence,
        parent,
        point_time_micros,
        point_type: PointType::Standard,
        full_image,
        disks: super::initial::log_disks(disks),
    }
}

/// This side's block hashes, one map per disk (the maps of the next delta); no data is kept.
async fn hash_own(
    ctx: &JobContext,
    job: &NetworkIr,
    vm: &VmRow,
    disks: &[(String, u64)],
    running: Option<&RunningPoint>,
    resume: bool,
) -> Result<Vec<std::path::PathBuf>, JobFailure> {
    let tracking = job
        .data_dir
        .join("tracking")
        .join(vm.id.to_string().to_uppercase());
    std::fs::create_dir_all(&tracking).map_err(local)?;
    let mut hashes_only = LogWriter::new(
        std::io::sink(),
        log_header(vm, disks, 1, 0, true, now() * 1_000_000),
        Compression::Off,
    )
    .map_err(|e| fail(e.to_string(), "Report this as a bug."))?;
    let mut own = Vec::new();
    for (i, (format, _)) in disks.iter().enumerate() {
        ctx.check_cancelled()?;
        let map = tracking.join(format!("disk{i}.seed-hashes"));
        own.push(match running {
            Some(r) => r
                .read_disk(i, None, &map, &mut hashes_only)
                .await
                .map_err(|e| running_failed(vm, &e))?,
            None => match hash_kept(ctx, &tracking, i, &vm.disks[i], format, resume, &map).await? {
                Some(tmp) => tmp,
                // Read through qemu-nbd (compressed, encrypted): in one go.
                None => {
                    scan_image(
                        &vm.disks[i],
                        format,
                        i,
                        None,
                        &map,
                        &job.data_dir,
                        &mut hashes_only,
                    )
                    .await?
                }
            },
        });
    }
    Ok(own)
}

/// `tracking/<VMID>/disk<i>.resync-hashes`: the hashes of a turned-off VM's disk made so far by a
/// seeded IR or a resynchronization (its first blocks, 16 bytes each, in order), and `….json`
/// beside it: what they describe (disk size, block size, and the file's fingerprint when they
/// began, taken only of a file left alone for a while: `journal::settled_fingerprint`).
fn hash_progress_files(
    tracking: &std::path::Path,
    i: usize,
) -> (std::path::PathBuf, std::path::PathBuf) {
    (
        tracking.join(format!("disk{i}.resync-hashes")),
        tracking.join(format!("disk{i}.resync-hashes.json")),
    )
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct HashProgress {
    image: String,
    format: String,
    size: u64,
    block_size: u32,
    /// The image's fingerprint, taken before it was opened (and mapped) for reading.
    print: disk::fingerprint::Fingerprint,
    /// Its backing files' (a qcow2 chain's layers below it, read too).
    backing: Vec<(String, disk::fingerprint::Fingerprint)>,
}

impl HashProgress {
    /// Why the hashes it describes no longer describe `image` as it is, if they do not.
    fn stale(&self) -> Option<String> {
        let files = std::iter::once((self.image.as_str(), &self.print))
            .chain(self.backing.iter().map(|(f, p)| (f.as_str(), p)));
        for (file, print) in files {
            if let Err(why) = disk::fingerprint::check(std::path::Path::new(file), print) {
                return Some(why);
            }
        }
        None
    }
}

/// Drops what [`hash_kept`] kept for `vm`'s `disks` disks (the comparison they served is over).
pub(super) fn forget_hash_progress(data_dir: &std::path::Path, vm: uuid::Uuid, disks: usize) {
    let tracking = data_dir
        .join("tracking")
        .join(vm.to_string().to_uppercase());
    for i in 0..disks {
        let (hashes, record) = hash_progress_files(&tracking, i);
        let _ = std::fs::remove_file(hashes);
        let _ = std::fs::remove_file(record);
    }
}

/// Hashes disk `i` (`image`, of `format`) of a turned-off VM into a map at `<map>.tmp` (returned),
/// keeping the hashes as they are made, [`STEP`](crate::replication::prehash::STEP) blocks at a time (written and synced), so
/// that a cancel loses at most one step: with `resume` (a paused resynchronization going on, spec
/// §13.6) the hashes kept before are the start, while the image and its backing files have the
/// fingerprints they had when they began; else (or when one changed) it starts over, and says
/// why. None when the image cannot be read without QEMU (the caller reads it through qemu-nbd).
async fn hash_kept(
    ctx: &JobContext,
    tracking: &std::path::Path,
    i: usize,
    image: &str,
    format: &str,
    resume: bool,
    map: &std::path::Path,
) -> Result<Option<std::path::PathBuf>, JobFailure> {
    use disk::scan::hashmap::{block_count, MapWriter, HASH_LEN};
    use std::io::{Read, Write};
    let (hashes, record) = hash_progress_files(tracking, i);
    let recorded = std::fs::read(&record)
        .ok()
        .and_then(|b| serde_json::from_slice::<HashProgress>(&b).ok());
    // Before the image is opened: the map `Opened::open` takes must not be older than the
    // fingerprint new hashes will be trusted by (a write between them would be in neither).
    let stale = recorded.as_ref().map(HashProgress::stale);
    let print = crate::replication::journal::settled_fingerprint(std::path::Path::new(image));
    let Ok(opened) = crate::replication::prehash::Opened::open(image, format) else {
        return Ok(None);
    };
    let mut source = opened.source();
    let size = source.size().map_err(local)?;
    let blocks = block_count(size, DEFAULT_BLOCK_SIZE);
    let had = std::fs::metadata(&hashes).map_or(0, |m| m.len() / HASH_LEN as u64);
    let mut kept = 0;
    if resume {
        match (&recorded, stale) {
            (Some(r), Some(None))
                if (r.image.as_str(), r.format.as_str(), r.size, r.block_size)
                    == (image, format, size, DEFAULT_BLOCK_SIZE) =>
            {
                kept = had.min(blocks)
            }
            (Some(_), Some(Some(why))) => {
                forget_disk_progress(&hashes, &record)?;
                ctx.note(&format!(
                    "disk {i}: the hashes made before the pause are not used ({why}); it is hashed again"
                ))?
            }
            (Some(_), _) => {
                forget_disk_progress(&hashes, &record)?;
                ctx.note(&format!(
                    "disk {i}: the hashes made before the pause describe another disk; it is hashed again"
                ))?
            }
            (None, _) => ctx.note(&format!(
                "disk {i}: no hashes of it were kept before the pause (none made yet, or its file had changed within 2 s of the start); it is hashed whole"
            ))?,
        }
    }
    if kept == 0 {
        // Emptied before the new record is written, so no crash leaves old hashes under it.
        forget_disk_progress(&hashes, &record)?;
        // Only hashes of files left alone can be trusted later (their times may not move for a
        // write in the same clock tick).
        let backing: Option<Vec<_>> = opened
            .backing_files()
            .iter()
            .map(|f| {
                crate::replication::journal::settled_fingerprint(std::path::Path::new(f))
                    .map(|p| (f.clone(), p))
            })
            .collect();
        if let (Some(print), Some(backing)) = (print, backing) {
            let r = HashProgress {
                image: image.to_string(),
                format: format.to_string(),
                size,
                block_size: DEFAULT_BLOCK_SIZE,
                print,
                backing,
            };
            let tmp = record.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(&r).map_err(local)?).map_err(local)?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(local)?;
            std::fs::rename(&tmp, &record).map_err(local)?;
        }
    } else {
        ctx.note(&format!(
            "disk {i}: {kept} of {blocks} blocks were hashed before the pause; only the rest is read"
        ))?;
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&hashes)
        .map_err(local)?;
    out.set_len(kept * HASH_LEN as u64).map_err(local)?;
    std::io::Seek::seek(&mut out, std::io::SeekFrom::End(0)).map_err(local)?;
    let mut next = kept;
    let mut step = Vec::with_capacity(crate::replication::prehash::STEP as usize);
    while next < blocks {
        ctx.check_cancelled()?;
        let n = crate::replication::prehash::STEP.min(blocks - next);
        step.clear();
        disk::scan::hash_blocks(&mut source, next, n, DEFAULT_BLOCK_SIZE, &mut step)
            .await
            .map_err(local)?;
        if step.len() as u64 != n {
            return Err(fail(
                format!("{image}: {} hashes for {n} blocks", step.len()),
                "Report this as a bug.",
            ));
        }
        // Synced: after a power cut a kept hash must not read back as zeros ("a block of zeros").
        out.write_all(&step.concat())
            .and_then(|()| out.sync_data())
            .map_err(local)?;
        next += n;
    }
    drop(out);
    // The map: those hashes, with its header and trailer.
    let mut writer = MapWriter::create(map, DEFAULT_BLOCK_SIZE, size).map_err(local)?;
    let mut input =
        std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&hashes).map_err(local)?);
    let mut h = [0u8; HASH_LEN];
    for _ in 0..blocks {
        input.read_exact(&mut h).map_err(local)?;
        writer.push(&h).map_err(local)?;
    }
    Ok(Some(writer.finish().map_err(local)?))
}

/// Empties disk `i`'s kept hashes (synced) and removes their record.
fn forget_disk_progress(
    hashes: &std::path::Path,
    record: &std::path::Path,
) -> Result<(), JobFailure> {
    let _ = std::fs::remove_file(record);
    match std::fs::OpenOptions::new().write(true).open(hashes) {
        Ok(f) => f.set_len(0).and_then(|()| f.sync_all()).map_err(local),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(local(e)),
    }
}

/// [`compare_and_send`] once the replica began the session `cs` and this side's maps are `own`.
#[allow(clippy::too_many_arguments)]
async fn compare_begun(
    ctx: &JobContext,
    job: &NetworkIr,
    vm: &VmRow,
    rel: &mut RelationshipRow,
    session: &mut crate::replication::client::Session,
    running: Option<&RunningPoint>,
    recovery: &Recovery<'_>,
    cs: &mut CompareSession,
    own: Vec<std::path::PathBuf>,
) -> Result<(), JobFailure> {
    let kind = recovery.begin.kind;
    let disks = disk_table(vm)?;
    let tracking = job
        .data_dir
        .join("tracking")
        .join(vm.id.to_string().to_uppercase());
    ctx.progress(30)?;

    // 2. Once the replica is ready (kind 1: its copy imported as point 1), the ranges compare.
    // A broken connection, or a recovery server that lost the session (it restarted), is taken
    // up again where it was: the hashes compared so far stay compared.
    match wait_ready(ctx, vm, session, cs).await {
        Ok(ready) => ready?,
        Err(e) => recovery.take_up(session, cs, e).await?,
    }
    let bs = u64::from(DEFAULT_BLOCK_SIZE);
    let mut differing: Vec<Vec<(u64, u64)>> = Vec::new();
    let mut total = 0u64;
    for (i, map) in own.iter().enumerate() {
        let mut reader = MapReader::open(map).map_err(local)?;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut first = 0u64;
        loop {
            ctx.check_cancelled()?;
            let mut hashes = Vec::new();
            while hashes.len() < RANGE_BLOCKS {
                match reader.next_hash().map_err(local)? {
                    Some(h) => hashes.push(h),
                    None => break,
                }
            }
            if hashes.is_empty() {
                break;
            }
            let count = hashes.len() as u64;
            let range = HashRange {
                disk: i as u32,
                first_block: first,
                hashes,
            }
            .encode();
            let body = loop {
                match session
                    .binary(
                        Route::CompareRange(vm.id, cs.id),
                        range.clone(),
                        "application/vnd.vmreplica.block-hashes",
                    )
                    .await
                {
                    Ok(body) => break body,
                    Err(e) => recovery.take_up(session, cs, e).await?,
                }
            };
            let answer = RangeAnswer::parse(&body)
                .ok()
                .filter(|a| {
                    a.disk == i as u32 && a.first_block == first && u64::from(a.count) == count
                })
                .ok_or_else(|| {
                    fail(
                        "the recovery server answered a range with another range",
                        "Check the recovery server.",
                    )
                })?;
            for b in 0..answer.count {
                if answer.differs(b) {
                    let off = (first + u64::from(b)) * bs;
                    match ranges.last_mut() {
                        Some((o, l)) if *o + *l == off => *l += bs,
                        _ => ranges.push((off, bs)),
                    }
                    total += 1;
                }
            }
            first += count;
        }
        differing.push(ranges);
    }
    ctx.progress(60)?;
    tracing::info!(vm = %vm.id, kind, differing_blocks = total, "block comparison done");

    // 3. Log `next` (parent `baseline`) with exactly the differing blocks: a copy of this side's map
    // where those blocks' hashes are made to differ drives the ranged scan.
    let outgoing = job
        .data_dir
        .join("outgoing")
        .join(vm.id.to_string().to_uppercase());
    std::fs::create_dir_all(&outgoing).map_err(local)?;
    let spool = outgoing.join(format!("{:020}.vrlog", cs.next_sequence));
    let file = std::fs::File::create(&spool).map_err(local)?;
    let mut log = session
        .log_mode(rel.settings.compression_enabled)
        .writer(
            std::io::BufWriter::with_capacity(1 << 20, file),
            log_header(
                vm,
                &disks,
                cs.next_sequence,
                cs.baseline_sequence,
                false,
                // A running VM's point is its frozen view, however long hashing took since; a
                // turned-off one's files are read now.
                running.map_or(now() * 1_000_000, RunningPoint::frozen_at_micros),
            ),
        )
        .map_err(|e| fail(e.to_string(), "Report this as a bug."))?;
    // Per disk, the differing blocks: the log carries them, a later failback asks about them.
    let changed: Vec<_> = differing
        .iter()
        .map(|ranges| {
            let mut runs = Vec::new();
            for (off, len) in ranges {
                for b in off / bs..(off + len).div_ceil(bs) {
                    crate::replication::journal::push_block(&mut runs, b);
                }
            }
            runs
        })
        .collect();
    let mut maps = Vec::new();
    for (i, (format, _)) in disks.iter().enumerate() {
        let forced_tmp = tracking.join(format!("disk{i}.seed-forced"));
        crate::replication::journal::force_map(&own[i], &forced_tmp, &changed[i])
            .map_err(|e| fail(e, "Check the data directory."))?;
        let map = tracking.join(format!("disk{i}.hashes"));
        let tmp = match running {
            Some(r) => r
                .read_disk_ranges(i, Some(&forced_tmp), &map, &mut log, Some(&differing[i]))
                .await
                .map_err(|e| running_failed(vm, &e))?,
            None => {
                scan_image_ranges(
                    &vm.disks[i],
                    format,
                    i,
                    Some(&forced_tmp),
                    &map,
                    &job.data_dir,
                    &mut log,
                    Some(&differing[i]),
                )
                .await?
                .0
            }
        };
        let _ = std::fs::remove_file(&forced_tmp);
        let _ = std::fs::remove_file(&own[i]);
        maps.push((tmp, map));
    }
    let summary = send_compared(
        ctx,
        job,
        vm,
        rel,
        session,
        (log, &spool),
        &maps,
        &changed,
        kind == 2,
    )
    .await?;
    tracing::info!(vm = %vm.id, kind, differing_blocks = total, bytes = summary.bytes, "compared blocks sent and committed");
    Ok(())
}

/// Waits until the compare session `cs` is Ready (2); an error of the recovery server's is the
/// caller's to take up, a failed preparation the job's.
async fn wait_ready(
    ctx: &JobContext,
    vm: &VmRow,
    session: &mut crate::replication::client::Session,
    cs: &mut CompareSession,
) -> Result<Result<(), JobFailure>, PeerError> {
    while cs.state == 1 {
        if let Err(f) = ctx.check_cancelled() {
            return Ok(Err(f));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        *cs = session
            .json::<(), CompareSession>(Route::CompareStatus(vm.id, cs.id), None)
            .await?
            .1;
    }
    Ok(match cs.state {
        2 => Ok(()),
        _ => Err(fail(
            "the recovery server could not import the replica VM's disks",
            "Check the replica VM's disks and the recovery server's log.",
        )),
    })
}

/// Takes a comparison up again after a broken connection or a restart of the recovery server.
struct Recovery<'a> {
    ctx: &'a JobContext,
    job: &'a NetworkIr,
    vm: &'a VmRow,
    to: &'a crate::replication::client::Target,
    begin: &'a BeginCompare,
    /// Whether `begin` may be sent again when its answer, or the session, was lost.
    begin_again: bool,
}

impl Recovery<'_> {
    /// After `err` on the session `cs`: see [`Recovery::again`]; `cs` becomes the session taken up.
    async fn take_up(
        &self,
        session: &mut crate::replication::client::Session,
        cs: &mut CompareSession,
        err: PeerError,
    ) -> Result<(), JobFailure> {
        *cs = self.again(session, Some(cs), err).await?;
        Ok(())
    }

    /// After `err`: when the connection broke, or the recovery server no longer knows the session
    /// `cs` (it restarted), connects again (for about an hour, as a network initial
    /// replication waits) and goes on in that session, or in a new one on the same point, ready;
    /// without `cs` (its begin got no answer), begins one. Any other error, a cancel, or a replica
    /// that now compares another point ends the job.
    async fn again(
        &self,
        session: &mut crate::replication::client::Session,
        cs: Option<&CompareSession>,
        err: PeerError,
    ) -> Result<CompareSession, JobFailure> {
        let what = match cs {
            Some(_) => "comparing block hashes",
            None => "beginning the comparison",
        };
        if cs.is_none() && !self.begin_again {
            return Err(err.into_failure(what));
        }
        let mut last = err;
        let mut schedule = crate::replication::client::INITIAL_RETRIES.iter();
        // Said once: an import may take hours.
        let mut waited_for_import = false;
        loop {
            // A seeded begin answered Busy waits for the import of an earlier (cancelled)
            // session's seed, which goes on, however long that takes (a cancel ends the wait);
            // a resync's Busy (logs that may never be applied) is not waited for.
            let importing = self.begin.kind == 1 && busy(&last);
            if !(last.is_network() || unknown_compare(&last) || importing) {
                return Err(last.into_failure(what));
            }
            let secs = match importing {
                true => SEED_IMPORT_POLL_SECS,
                false => match schedule.next() {
                    Some(&secs) => secs,
                    None => break,
                },
            };
            if importing && waited_for_import {
                tracing::debug!(vm = %self.vm.id, "{what}: {last}; trying again in {secs} s");
            } else {
                tracing::warn!(vm = %self.vm.id, "{what}: {last}; trying again in {secs} s");
            }
            waited_for_import |= importing;
            let until = tokio::time::Instant::now() + Duration::from_secs(secs);
            while tokio::time::Instant::now() < until {
                self.ctx.check_cancelled()?;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            self.ctx.check_cancelled()?;
            let mut fresh = match self.job.peers.connect(self.to).await {
                Ok(s) => s,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let status = match cs {
                Some(cs) => fresh
                    .json::<(), CompareSession>(Route::CompareStatus(self.vm.id, cs.id), None)
                    .await
                    .map(|(_, same)| Some(same)),
                None => Ok(None),
            };
            let mut taken = match status {
                Ok(Some(same)) => same,
                Err(e) if !unknown_compare(&e) => {
                    last = e;
                    continue;
                }
                Ok(None) | Err(_) if !self.begin_again => {
                    return Err(fail(
                        format!("{what}: the recovery server lost the comparison ({last})"),
                        "Run the operation again.",
                    ))
                }
                Ok(None) | Err(_) => match fresh
                    .json::<_, CompareSession>(Route::BeginCompare(self.vm.id), Some(self.begin))
                    .await
                {
                    Ok((_, new)) => new,
                    Err(e) => {
                        last = e;
                        continue;
                    }
                },
            };
            *session = fresh;
            let Some(cs) = cs else {
                tracing::info!(vm = %self.vm.id, compare = %taken.id, "the comparison began over a new connection");
                return Ok(taken);
            };
            let same_point = (
                taken.baseline_sequence,
                taken.next_sequence,
                taken.block_size,
                &taken.disks,
            ) == (
                cs.baseline_sequence,
                cs.next_sequence,
                cs.block_size,
                &cs.disks,
            );
            if !same_point {
                let _ = session
                    .json::<(), CompareSession>(Route::CancelCompare(self.vm.id, taken.id), None)
                    .await;
                return Err(fail(
                    format!(
                        "the recovery server now compares point {} (log {} next), not point {} as when the comparison began",
                        taken.baseline_sequence, taken.next_sequence, cs.baseline_sequence
                    ),
                    "Run the operation again.",
                ));
            }
            match wait_ready(self.ctx, self.vm, session, &mut taken).await {
                Ok(ready) => ready?,
                Err(e) => {
                    last = e;
                    continue;
                }
            }
            if taken.id != cs.id {
                tracing::info!(vm = %self.vm.id, compare = %taken.id, "the recovery server lost the comparison (a restart); a new session on the same point goes on from where it was");
            } else {
                tracing::info!(vm = %self.vm.id, compare = %taken.id, "the comparison goes on over a new connection");
            }
            return Ok(taken);
        }
        Err(last.into_failure(what))
    }
}

/// How often a seeded begin is sent again while the recovery server imports an earlier seed.
const SEED_IMPORT_POLL_SECS: u64 = 5;

/// The recovery server asks to be asked again shortly (a seed import still running, logs still
/// being applied).
fn busy(e: &PeerError) -> bool {
    matches!(e, PeerError::Refused(d) if d.error_code() == Some(wire::protocol::ErrorCode::Busy))
}

/// The recovery server does not know the compare session asked about.
fn unknown_compare(e: &PeerError) -> bool {
    matches!(e, PeerError::Refused(d) if d.error_code() == Some(wire::protocol::ErrorCode::UnknownCompare))
}

/// Finishes `log` (spooled at `spool`), sends and commits it as the next log of `vm`'s chain, then
/// [`commit_sent`].
#[allow(clippy::too_many_arguments)]
pub(super) async fn send_compared<W: std::io::Write>(
    ctx: &JobContext,
    job: &NetworkIr,
    vm: &VmRow,
    rel: &mut RelationshipRow,
    session: &mut crate::replication::client::Session,
    (log, spool): (LogWriter<std::io::BufWriter<W>>, &std::path::Path),
    maps: &[(std::path::PathBuf, std::path::PathBuf)],
    changed: &[crate::replication::journal::Runs],
    count: bool,
) -> Result<wire::LogSummary, JobFailure> {
    let (w, summary) = log
        .finish()
        .map_err(|e| fail(e.to_string(), "Check free space."))?;
    w.into_inner()
        .map_err(|e| fail(e.to_string(), "Check free space."))?;
    let growing = Arc::new(GrowingLog::default());
    growing.advance_to(summary.bytes);
    growing.finish(hex::encode(summary.hash), summary.bytes);
    let to = target(rel);
    let deliver = job.peers.deliver(
        &to,
        session,
        vm.id,
        summary.header.sequence,
        spool,
        growing,
        Arc::new(|_, _| {}),
        crate::replication::client::CommitAs {
            wait_applied: false,
            resync: count,
        },
        // As long as a comparison waits for its recovery server (`Recovery::take_up`).
        crate::replication::client::Patience::initial({
            let ctx = ctx.clone();
            Arc::new(move || ctx.is_cancelled())
        }),
        (None, false),
    );
    // A cancel (or RRSC 9/7) stops the upload at once; the replica keeps its point.
    let delivered = tokio::select! {
        d = deliver => Some(d),
        () = async {
            while ctx.check_cancelled().is_ok() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        } => None,
    };
    let _ = std::fs::remove_file(spool);
    let Some(delivered) = delivered else {
        ctx.check_cancelled()?;
        return Err(fail("cancelled", "Start the operation again."));
    };
    let done = delivered.map_err(|e| e.into_failure("sending the differing blocks"))?;
    commit_sent(job, vm, rel, &summary, &done, maps, changed, count)?;
    Ok(summary)
}

/// After the replica committed the log `summary` (`done`): makes `maps` (new map, map) the
/// baseline, records `changed` (per disk, the blocks it carries) for a later failback, and moves
/// the chain to it. With `count`, its bytes count as a replication (Measure-VMReplication).
#[allow(clippy::too_many_arguments)]
pub(super) fn commit_sent(
    job: &NetworkIr,
    vm: &VmRow,
    rel: &mut RelationshipRow,
    summary: &wire::LogSummary,
    done: &crate::replication::client::Delivered,
    maps: &[(std::path::PathBuf, std::path::PathBuf)],
    changed: &[crate::replication::journal::Runs],
    count: bool,
) -> Result<(), JobFailure> {
    let hash = hex::encode(summary.hash);
    let sequence = summary.header.sequence;
    if done.status.log_hash.as_deref() != Some(hash.as_str()) {
        return Err(fail(
            "the recovery server committed another log",
            "Resynchronize the VM.",
        ));
    }
    job.store.record_sent_blocks(vm.id, sequence, changed)?;
    for (tmp, map) in maps {
        disk::scan::hashmap::commit(tmp, map).map_err(local)?;
    }
    job.store.put_chain(&ChainRow {
        vm: vm.id,
        last_sequence: sequence,
        last_log_hash: hash,
        next_due: now() + i64::from(rel.settings.replication_interval),
        retries: 0,
        retry_at: 0,
        last_error: None,
    })?;
    rel.last_replication_time = Some(summary.header.point_time_micros / 1_000_000);
    rel.last_replication_type = vmreplica_core::state::ReplicationType::Regular.as_u16();
    if count {
        job.store.record_stat(
            vm.id,
            StatEvent::replicated(summary.bytes, summary.header.point_time_micros),
        )?;
    }
    Ok(())
}
