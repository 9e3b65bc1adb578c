//! A full-image log staged while it arrives becomes its point only when committed, equal to what
//! applying the same log makes; a bad log leaves nothing.

#[path = "points_support.rs"]
mod support;

use disk::points::{ApplyError, PointStore};
use support::{check, same, Source};
use wire::LogReader;

#[tokio::test]
async fn a_staged_full_image_is_committed_as_point_1_and_a_bad_one_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Source::new(dir.path(), 2);
    let logs = src.logs(dir.path(), 20);
    let incoming = dir.path().join("incoming");
    std::fs::create_dir_all(&incoming).expect("mkdir");
    let store = PointStore::open(&dir.path().join("store"), support::vm())
        .await
        .expect("open");

    // A flipped byte in the middle: rejected at its record; the caller deletes the layers.
    let mut bad = std::fs::read(&logs[0]).expect("read");
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    let layers = vec![incoming.join("bad.layer")];
    let reader = LogReader::open(std::io::Cursor::new(bad), &Source::expect(1)).expect("header");
    let err = PointStore::stage_full_image(reader, &layers, &logs[0]).unwrap_err();
    assert!(matches!(err, ApplyError::Rejected { .. }), "{err}");

    // A delta is not staged.
    let delta = std::fs::File::open(&logs[1]).expect("open");
    let reader = LogReader::open(std::io::BufReader::new(delta), &Source::expect(2)).expect("hdr");
    let err = PointStore::stage_full_image(reader, &layers, &logs[1]).unwrap_err();
    assert!(
        matches!(err, ApplyError::FirstMustBeFull { sequence: 2 }),
        "{err}"
    );

    // The good log: staged layers, no point until committed.
    let layers = vec![incoming.join("good.layer")];
    let file = std::fs::File::open(&logs[0]).expect("open");
    let reader = LogReader::open(std::io::BufReader::new(file), &Source::expect(1)).expect("hdr");
    let (info, summary) = PointStore::stage_full_image(reader, &layers, &logs[0]).expect("stage");
    assert_eq!((info.sequence, info.full_image), (1, true));
    assert_eq!(
        summary.bytes,
        std::fs::metadata(&logs[0]).expect("meta").len()
    );
    assert!(store.list_points().expect("list").is_empty());
    check(&layers[0]);
    assert!(same(&layers[0], &src.raw(1)));

    let committed = store.commit_staged(&info, &layers).await.expect("commit");
    assert_eq!(committed, info);
    assert!(!layers[0].exists(), "the staged layer moved into the store");
    let points = store.list_points().expect("list");
    assert_eq!(points, vec![info.clone()]);
    let layer = store.point_path(1, 0).expect("path");
    check(&layer);
    assert!(same(&layer, &src.raw(1)));
    store.check_point(1).await.expect("check_point");
    // Committed again (a crash before the apply was recorded): the point as it is.
    assert_eq!(
        store.commit_staged(&info, &layers).await.expect("again"),
        info
    );
    // And the next log applies on top of it.
    let two = store
        .apply(&logs[1], &Source::expect(2))
        .await
        .expect("apply 2");
    assert!(same(
        &store.point_path(two.sequence, 0).expect("path"),
        &src.raw(2)
    ));
}

/// A staged image cut off mid-log (the replica's restart) continues from its last checkpoint: the
/// layers as the checkpoint saw them, the reader at its offset, and the point is the same.
#[tokio::test]
async fn a_staged_full_image_continues_from_a_saved_checkpoint_after_a_crash() {
    use disk::points::{Checkpoints, StageCheckpoint};

    let dir = tempfile::tempdir().expect("tempdir");
    // A raw disk with 12 MiB of noise in pieces, and its full-image log: several frames.
    let raw = dir.path().join("disk.raw");
    let mut image = vec![0u8; support::DISK_SIZE as usize];
    for (i, at) in [0usize, 5 << 20, 9 << 20, 30 << 20, 63 << 20]
        .iter()
        .enumerate()
    {
        let len = (3 << 20).min(image.len() - at) - 4096 * i;
        image[*at..at + len].copy_from_slice(&support::noise(i as u64 + 7, len));
    }
    std::fs::write(&raw, &image).expect("raw");
    let log = dir.path().join("full.vrlog");
    std::fs::write(&log, full_image_log(&image, support::BLOCK)).expect("log");
    let logs = [log];
    let bytes = std::fs::read(&logs[0]).expect("read");
    let incoming = dir.path().join("incoming");
    std::fs::create_dir_all(&incoming).expect("mkdir");
    let layers = vec![incoming.join("staged.layer")];
    let runs = vec![incoming.join("staged.runs")];

    // The whole log with a checkpoint after every frame, to learn where they fall.
    let (whole, saved) = stage_saving_every_checkpoint(&bytes, &layers, &logs[0], &runs);
    assert!(saved.len() >= 2, "checkpoints: {}", saved.len());

    // Again, cut off past the middle checkpoint: the bytes after it are lost with the process.
    let middle = StageCheckpoint::from_bytes(&saved[saved.len() / 2]).expect("reads back");
    let cut = (middle.offset() as usize + 1000).min(bytes.len() - 1);
    let reader = LogReader::open_resumable(
        std::io::Cursor::new(bytes[..cut].to_vec()),
        &Source::expect(1),
    )
    .expect("header");
    // Checkpoints are taken while it runs; they are lost with the process.
    let checkpoints = Checkpoints {
        every: 1,
        max_lag: 0,
        saved: Box::new(|_: StageCheckpoint| true),
        runs: runs.clone(),
    };
    let err = PointStore::stage_checkpointed(reader, &layers, &logs[0], Some(checkpoints), None)
        .unwrap_err();
    assert!(matches!(err, ApplyError::Rejected { .. }), "{err}");

    // After the restart: the rest of the log from the checkpoint's offset.
    let rest = std::io::Cursor::new(bytes[middle.offset() as usize..].to_vec());
    let reader = LogReader::resume(rest, &middle.reader, &Source::expect(1)).expect("resume");
    let progress = middle
        .progress(&runs)
        .expect("the runs file holds the checkpoint's runs");
    let (info, summary) =
        PointStore::stage_checkpointed(reader, &layers, &logs[0], None, Some(&progress))
            .expect("the rest stages");
    assert_eq!((info.clone(), summary), whole);
    check(&layers[0]);
    assert!(same(&layers[0], &raw));

    // A damaged checkpoint is not taken up, nor one whose runs file lost runs it counts.
    let mut bad = saved[0].clone();
    bad[20] ^= 1;
    assert!(StageCheckpoint::from_bytes(&bad).is_none());
    let last = StageCheckpoint::from_bytes(saved.last().unwrap()).expect("reads back");
    assert!(last.layers[0].kept > 0, "{:?}", last.layers);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&runs[0])
        .expect("runs");
    assert!(last.runs_present(&runs));
    file.set_len(last.layers[0].kept * 16 - 1).expect("cut");
    assert!(!last.runs_present(&runs));
    assert!(last.progress(&runs).is_err());
}

/// However fragmented the image, a checkpoint stays a few dozen bytes per layer: the runs of
/// allocations go to the runs file, each once, and a resume from any checkpoint reads them back.
#[tokio::test]
async fn checkpoints_of_a_fragmented_image_stay_small_and_resume_it() {
    use disk::points::StageCheckpoint;

    const CLUSTER: usize = 64 << 10;
    let dir = tempfile::tempdir().expect("tempdir");
    // Every other cluster holds data: 256 runs of allocations in 32 MiB.
    let size = 32usize << 20;
    let mut image = vec![0u8; size];
    for (k, at) in (0..size).step_by(2 * CLUSTER).enumerate() {
        image[at..at + CLUSTER].copy_from_slice(&support::noise(k as u64 + 100, CLUSTER));
    }
    let raw = dir.path().join("frag.raw");
    std::fs::write(&raw, &image).expect("raw");
    let bytes = full_image_log(&image, CLUSTER);
    let log = dir.path().join("frag.vrlog");
    std::fs::write(&log, &bytes).expect("log");
    let layers = vec![dir.path().join("frag.layer")];
    let runs = vec![dir.path().join("frag.runs")];
    let (whole, saved) = stage_saving_every_checkpoint(&bytes, &layers, &log, &runs);
    assert!(saved.len() >= 4, "checkpoints: {}", saved.len());
    // Beside the reader's place (its hash state holds at most 64 KiB of the stream), 48 bytes.
    let layer_bytes: Vec<usize> = saved
        .iter()
        .map(|c| {
            let cp = StageCheckpoint::from_bytes(c).expect("reads back");
            c.len() - cp.reader.to_bytes().len() - 8 - 8 - 32
        })
        .collect();
    assert!(layer_bytes.iter().all(|&n| n == 48), "{layer_bytes:?}");
    // Each final run was written once: the file holds no more than the image's runs.
    assert!(std::fs::metadata(&runs[0]).expect("runs").len() <= 256 * 16);
    let last = StageCheckpoint::from_bytes(saved.last().unwrap()).expect("reads back");
    assert!(last.layers[0].kept >= 200, "{:?}", last.layers);

    // Taken up from a checkpoint late in the log: the same point.
    let from = StageCheckpoint::from_bytes(&saved[saved.len() * 3 / 4]).expect("reads back");
    let progress = from.progress(&runs).expect("progress");
    assert_eq!(progress[0].runs().len() as u64, from.layers[0].kept + 1);
    let rest = std::io::Cursor::new(bytes[from.offset() as usize..].to_vec());
    let reader = LogReader::resume(rest, &from.reader, &Source::expect(1)).expect("resume");
    let again = PointStore::stage_checkpointed(reader, &layers, &log, None, Some(&progress))
        .expect("the rest stages");
    assert_eq!(again, whole);
    check(&layers[0]);
    assert!(same(&layers[0], &raw));
}

/// Log 1 of a one-disk VM whose disk is `image`: a full image, its blocks of `block` bytes that hold
/// anything as data extents.
fn full_image_log(image: &[u8], block: usize) -> Vec<u8> {
    let header = wire::LogHeader {
        vm: support::vm(),
        relationship: 0,
        sequence: 1,
        parent: 0,
        point_time_micros: support::T0,
        point_type: wire::PointType::Standard,
        full_image: true,
        disks: vec![wire::DiskInfo {
            id: "scsi0".into(),
            virtual_size: image.len() as u64,
        }],
    };
    let mut w = wire::LogWriter::new(Vec::new(), header, wire::Compression::Off).expect("w");
    for (i, data) in image.chunks(block).enumerate() {
        if data.iter().any(|&b| b != 0) {
            w.write_data(0, (i * block) as u64, data).expect("data");
        }
    }
    w.finish().expect("finish").0
}

/// Stages the full-image log `bytes` (named `log`) into `layers`, saving every checkpoint (its
/// runs into `runs`); the point and summary, and every checkpoint's bytes in order.
fn stage_saving_every_checkpoint(
    bytes: &[u8],
    layers: &[std::path::PathBuf],
    log: &std::path::Path,
    runs: &[std::path::PathBuf],
) -> ((disk::points::PointInfo, wire::LogSummary), Vec<Vec<u8>>) {
    use disk::points::{Checkpoints, StageCheckpoint};
    use std::sync::{Arc, Mutex};

    let saved = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let keep = saved.clone();
    let checkpoints = Checkpoints {
        every: 1,
        max_lag: 0, // every checkpoint is saved
        saved: Box::new(move |c: StageCheckpoint| {
            keep.lock().unwrap().push(c.to_bytes());
            true
        }),
        runs: runs.to_vec(),
    };
    let reader =
        LogReader::open_resumable(std::io::Cursor::new(bytes.to_vec()), &Source::expect(1))
            .expect("header");
    let whole = PointStore::stage_checkpointed(reader, layers, log, Some(checkpoints), None)
        .expect("stage");
    let saved = saved.lock().unwrap().clone();
    (whole, saved)
}
