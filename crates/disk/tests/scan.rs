//! Hash-scan change tracking on real images holding a real ext4 filesystem: the logs it produces,
//! applied to a copy, reproduce the source exactly (`qemu-img compare`), and only changed blocks
//! are shipped.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use disk::export::{ExportSpec, NbdExport};
use disk::scan::{hashmap, scan_disk, ScanError, Source, DEFAULT_BLOCK_SIZE};
use uuid::Uuid;
use wire::{Compression, Content, DiskInfo, Expect, LogHeader, LogReader, LogWriter, PointType};

const SIZE: u64 = 64 << 20;

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw image with an ext4 filesystem and a few files.
fn make_fs(dir: &Path) -> PathBuf {
    let raw = dir.join("v1.raw");
    run(Command::new("truncate")
        .arg("-s")
        .arg(SIZE.to_string())
        .arg(&raw));
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&raw));
    for (i, size) in [(1, 300_000), (2, 2_000_000), (3, 50_000)] {
        put_file(dir, &raw, &format!("file{i}"), size, i as u8);
    }
    raw
}

fn put_file(dir: &Path, raw: &Path, name: &str, size: usize, seed: u8) {
    let src = dir.join(format!("{name}.src"));
    let data: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    std::fs::write(&src, data).expect("write src");
    run(Command::new("debugfs")
        .arg("-w")
        .arg("-R")
        .arg(format!("write {} {name}", src.display()))
        .arg(raw));
}

fn to_qcow2(raw: &Path, out: &Path) {
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(raw)
        .arg(out));
}

fn header(seq: u64, parent: u64) -> LogHeader {
    LogHeader {
        vm: Uuid::from_u128(7),
        relationship: 0,
        sequence: seq,
        parent,
        point_time_micros: 1_700_000_000_000_000 + seq as i64,
        point_type: PointType::Standard,
        full_image: parent == 0,
        disks: vec![DiskInfo {
            id: "disk0".into(),
            virtual_size: SIZE,
        }],
    }
}

/// Scans `image` into a log file; returns (log path, stats, new map tmp path).
async fn scan(
    image: &Path,
    dir: &Path,
    seq: u64,
    previous: Option<&Path>,
) -> Result<(PathBuf, disk::scan::ScanStats, PathBuf), ScanError> {
    let export = NbdExport::start(&ExportSpec::new(image, "qcow2"), dir, &format!("scan{seq}"))
        .await
        .expect("export");
    let mut nbd = export.connect(&["base:allocation"]).await.expect("connect");
    let log_path = dir.join(format!("{seq}.vrlog"));
    let file = std::fs::File::create(&log_path).expect("log");
    let mut log = LogWriter::new(
        file,
        header(seq, if seq == 1 { 0 } else { seq - 1 }),
        Compression::default(),
    )
    .expect("writer");
    let result = scan_disk(
        &mut Source::Nbd(&mut nbd),
        0,
        previous,
        &dir.join("disk0.hashes"),
        DEFAULT_BLOCK_SIZE,
        &mut log,
    )
    .await;
    nbd.disconnect().await.expect("disconnect");
    export.stop().await;
    let (map, stats) = result?;
    log.finish().expect("finish");
    Ok((log_path, stats, map))
}

/// Applies a verified log onto a raw replica file.
fn apply(log: &Path, replica: &Path, seq: u64) {
    let expect = Expect {
        vm: Uuid::from_u128(7),
        relationship: 0,
        sequence: seq,
        parent: if seq == 1 { 0 } else { seq - 1 },
    };
    wire::verify(std::fs::File::open(log).expect("open"), &expect).expect("verify");
    let mut reader =
        LogReader::open(std::fs::File::open(log).expect("open"), &expect).expect("reader");
    let out = OpenOptions::new()
        .write(true)
        .open(replica)
        .expect("replica");
    while let Some(extent) = reader.next_extent().expect("extent") {
        match extent.content {
            Content::Data(bytes) => out.write_all_at(bytes, extent.offset).expect("write"),
            Content::Zero(len) => out
                .write_all_at(&vec![0u8; len as usize], extent.offset)
                .expect("zero"),
        }
    }
}

fn identical(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .status()
        .expect("compare")
        .success()
}

/// 64 KiB blocks that differ between two raw files.
fn differing_blocks(a: &Path, b: &Path) -> u64 {
    let (a, b) = (std::fs::read(a).expect("a"), std::fs::read(b).expect("b"));
    a.chunks(65536)
        .zip(b.chunks(65536))
        .filter(|(x, y)| x != y)
        .count() as u64
}

#[tokio::test]
async fn a_full_scan_then_a_delta_reproduce_the_source_and_ship_only_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let v1 = make_fs(d);
    let src1 = d.join("src1.qcow2");
    to_qcow2(&v1, &src1);

    let (log1, stats1, map1) = scan(&src1, d, 1, None).await.expect("scan 1");
    hashmap::commit(&map1, &d.join("disk0.hashes")).expect("commit map");
    let replica = d.join("replica.raw");
    run(Command::new("truncate")
        .arg("-s")
        .arg(SIZE.to_string())
        .arg(&replica));
    apply(&log1, &replica, 1);
    assert!(
        identical(&replica, &v1),
        "the full image does not reproduce v1"
    );
    assert_eq!(stats1.zero_bytes, 0, "a full image ships no zero extents");
    assert!(
        stats1.read_bytes < SIZE,
        "holes must not be read ({} of {SIZE} read)",
        stats1.read_bytes
    );

    // Version 2: new and changed files, and a range of data overwritten with zeros.
    let v2 = d.join("v2.raw");
    std::fs::copy(&v1, &v2).expect("copy");
    put_file(d, &v2, "file4", 700_000, 4);
    put_file(d, &v2, "file2", 2_000_000, 9);
    let zeros = vec![0u8; 256 * 1024];
    let data_at = {
        let raw = std::fs::read(&v2).expect("read");
        (raw.len() / 2..raw.len())
            .step_by(65536)
            .find(|&o| raw[o..o + 65536].iter().any(|&b| b != 0))
            .unwrap_or(0) as u64
    };
    OpenOptions::new()
        .write(true)
        .open(&v2)
        .expect("v2")
        .write_all_at(&zeros, data_at & !0xFFFF)
        .expect("zeros");
    let src2 = d.join("src2.qcow2");
    to_qcow2(&v2, &src2);

    let (log2, stats2, map2) = scan(&src2, d, 2, Some(&d.join("disk0.hashes")))
        .await
        .expect("scan 2");
    apply(&log2, &replica, 2);
    assert!(
        identical(&replica, &v2),
        "full + delta does not reproduce v2"
    );
    assert_eq!(
        stats2.changed_blocks,
        differing_blocks(&v1, &v2),
        "the delta must hold exactly the changed blocks"
    );
    assert!(
        stats2.zero_bytes > 0,
        "data overwritten with zeros ships as zero extents"
    );
    let changed = differing_blocks(&v1, &v2) * 65536;
    assert!(
        stats2.data_bytes + stats2.zero_bytes <= changed,
        "shipped more than what changed"
    );
    hashmap::commit(&map2, &d.join("disk0.hashes")).expect("commit map 2");

    // Nothing changed: an empty delta.
    let (_, stats3, _) = scan(&src2, d, 3, Some(&d.join("disk0.hashes")))
        .await
        .expect("scan 3");
    assert_eq!(stats3.changed_blocks, 0);
}

#[tokio::test]
async fn a_size_change_requires_resynchronization() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = d.join("a.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(SIZE.to_string()));
    let (_, _, map) = scan(&img, d, 1, None).await.expect("scan");
    hashmap::commit(&map, &d.join("disk0.hashes")).expect("commit");
    run(Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(&img)
        .arg((SIZE * 2).to_string()));
    match scan(&img, d, 2, Some(&d.join("disk0.hashes"))).await {
        Err(ScanError::ResyncRequired(why)) => assert!(why.contains("size"), "{why}"),
        other => panic!("expected ResyncRequired, got {:?}", other.map(|r| r.1)),
    }
}

#[tokio::test]
async fn reading_a_raw_file_directly_finds_the_same_blocks_as_reading_through_qemu_nbd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let v1 = make_fs(d);
    let src = d.join("src.qcow2");
    to_qcow2(&v1, &src);
    let (_, via_nbd, nbd_map) = scan(&src, d, 1, None).await.expect("scan via NBD");

    let file = std::fs::File::open(&v1).expect("open raw");
    let log_path = d.join("direct.vrlog");
    let mut log = LogWriter::new(
        std::fs::File::create(&log_path).expect("log"),
        header(1, 0),
        Compression::default(),
    )
    .expect("writer");
    let (direct_map, direct) = scan_disk(
        &mut Source::RawFile(&file),
        0,
        None,
        &d.join("direct.hashes"),
        DEFAULT_BLOCK_SIZE,
        &mut log,
    )
    .await
    .expect("direct scan");
    log.finish().expect("finish");
    assert_eq!(direct.changed_blocks, via_nbd.changed_blocks);
    assert_eq!(direct.data_bytes, via_nbd.data_bytes);
    assert!(
        direct.read_bytes < SIZE,
        "holes of the raw file must not be read"
    );
    assert_eq!(
        std::fs::read(direct_map).expect("map"),
        std::fs::read(nbd_map).expect("map"),
        "the two maps differ"
    );
    let replica = d.join("replica.raw");
    run(Command::new("truncate")
        .arg("-s")
        .arg(SIZE.to_string())
        .arg(&replica));
    let expect = Expect {
        vm: Uuid::from_u128(7),
        relationship: 0,
        sequence: 1,
        parent: 0,
    };
    wire::verify(std::fs::File::open(&log_path).expect("open"), &expect).expect("verify");
    let mut reader =
        LogReader::open(std::fs::File::open(&log_path).expect("open"), &expect).expect("reader");
    let out = OpenOptions::new()
        .write(true)
        .open(&replica)
        .expect("replica");
    while let Some(extent) = reader.next_extent().expect("extent") {
        if let Content::Data(bytes) = extent.content {
            out.write_all_at(bytes, extent.offset).expect("write");
        }
    }
    assert!(identical(&replica, &v1));
}

/// Scans a raw file directly into a log, limited to `candidates`.
async fn scan_raw(
    image: &Path,
    dir: &Path,
    seq: u64,
    previous: Option<&Path>,
    candidates: Option<&[(u64, u64)]>,
) -> (PathBuf, disk::scan::ScanStats, PathBuf) {
    let file = std::fs::File::open(image).expect("image");
    let log_path = dir.join(format!("r{seq}.vrlog"));
    let mut log = LogWriter::new(
        std::fs::File::create(&log_path).expect("log"),
        header(seq, if seq == 1 { 0 } else { seq - 1 }),
        Compression::default(),
    )
    .expect("writer");
    let (map, stats) = disk::scan::scan_disk_ranges(
        &mut Source::RawFile(&file),
        0,
        previous,
        &dir.join("raw.hashes"),
        DEFAULT_BLOCK_SIZE,
        &mut log,
        candidates,
    )
    .await
    .expect("scan");
    log.finish().expect("finish");
    (log_path, stats, map)
}

#[tokio::test]
async fn a_scan_limited_to_changed_ranges_ships_only_real_changes_and_keeps_the_map_exact() {
    let tmp_dir = tempfile::tempdir().expect("tempdir");
    let dir = tmp_dir.path().to_path_buf();
    let raw = make_fs(&dir);
    let map_path = dir.join("raw.hashes");
    let (log1, _, tmp) = scan_raw(&raw, &dir, 1, None, None).await;
    hashmap::commit(&tmp, &map_path).expect("commit");
    let replica = dir.join("replica.raw");
    run(Command::new("truncate")
        .arg("-s")
        .arg(SIZE.to_string())
        .arg(&replica));
    apply(&log1, &replica, 1);

    // Three writes: block 100 gets new bytes, block 200 is rewritten with what it held (a bitmap
    // calls it dirty, its content did not change), block 300 changes but is not a candidate.
    let bs = u64::from(DEFAULT_BLOCK_SIZE);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&raw)
        .expect("raw");
    f.write_all_at(&vec![0xA5; 4096], 100 * bs + 512)
        .expect("write");
    let mut same = vec![0u8; bs as usize];
    f.read_exact_at(&mut same, 200 * bs).expect("read");
    f.write_all_at(&same, 200 * bs).expect("rewrite");
    f.write_all_at(&vec![0x5A; 4096], 300 * bs).expect("write");
    let candidates = [(100 * bs, bs), (200 * bs, 2 * bs)];
    let (log2, stats, tmp) = scan_raw(&raw, &dir, 2, Some(&map_path), Some(&candidates)).await;
    assert_eq!(stats.changed_blocks, 1, "{stats:?}");
    // Only candidate blocks are read (block 201 may be a hole and not read at all).
    assert!((2 * bs..=3 * bs).contains(&stats.read_bytes), "{stats:?}");
    hashmap::commit(&tmp, &map_path).expect("commit");
    apply(&log2, &replica, 2);
    assert_eq!(
        differing_blocks(&raw, &replica),
        1,
        "only block 300 still differs"
    );

    // The new map kept block 300's old hash, so a full scan against it finds that change.
    let (log3, stats, _) = scan_raw(&raw, &dir, 3, Some(&map_path), None).await;
    assert_eq!(stats.changed_blocks, 1);
    apply(&log3, &replica, 3);
    assert!(identical(&raw, &replica));
}

#[tokio::test]
async fn hashing_blocks_in_pieces_gives_the_hashes_of_the_full_map_without_reading_holes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let v1 = make_fs(d);
    let src = d.join("src.qcow2");
    to_qcow2(&v1, &src);
    let (_, _, map) = scan(&src, d, 1, None).await.expect("scan via NBD");
    let mut reader = hashmap::MapReader::open(&map).expect("map");
    let mut want = Vec::new();
    while let Some(h) = reader.next_hash().expect("hash") {
        want.push(h);
    }
    let blocks = want.len() as u64;
    assert_eq!(blocks, SIZE / u64::from(DEFAULT_BLOCK_SIZE));

    let raw = std::fs::File::open(&v1).expect("raw");
    let mapped = disk::scan::mapped::MappedImage::open(&src, "qcow2").expect("map qcow2");
    for source in [Source::RawFile(&raw), Source::Mapped(&mapped)] {
        let mut source = source;
        let mut got = Vec::new();
        let mut read = 0;
        // Uneven pieces across read runs; the last asks past the disk's end.
        for (first, count) in [(0, 3), (3, 97), (100, 411), (511, 600)] {
            read +=
                disk::scan::hash_blocks(&mut source, first, count, DEFAULT_BLOCK_SIZE, &mut got)
                    .await
                    .expect("hash blocks");
        }
        assert_eq!(
            got.len(),
            want.len(),
            "one hash per block, none past the end"
        );
        assert!(got == want, "the hashes differ from the map's");
        assert!(read < SIZE / 2, "holes must not be read: {read} bytes read");
    }
}

/// A paced scan lends each read to the log's consumer while it writes from it
/// (`disk::scan::Pace::lend`): whole frames of data are written straight from the lent bytes, so a
/// consumer can keep slices of them instead of copies (vmreplicad's `GrowingLog` does).
#[tokio::test]
async fn a_paced_scan_writes_whole_frames_straight_from_the_read_it_lends() {
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Lender(Mutex<Option<bytes::Bytes>>);
    impl disk::scan::Pace for Lender {
        fn room(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
            Box::pin(async { true })
        }
        fn lend(&self, bytes: Option<bytes::Bytes>) {
            *self.0.lock().unwrap() = bytes;
        }
    }
    /// Counts the bytes written from within the lent read.
    struct Out {
        lender: Arc<Lender>,
        from_lent: u64,
    }
    impl std::io::Write for Out {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(lent) = &*self.lender.0.lock().unwrap() {
                let (start, at) = (lent.as_ptr() as usize, buf.as_ptr() as usize);
                if at >= start && at + buf.len() <= start + lent.len() {
                    self.from_lent += buf.len() as u64;
                }
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // 16 MiB of data, not compressible, in a 64 MiB raw file: four whole 4 MiB reads.
    let raw = d.join("data.raw");
    let file = std::fs::File::create(&raw).expect("raw");
    file.set_len(SIZE).expect("size");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..16 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    file.write_all_at(&data, 8 << 20).expect("data");
    file.sync_all().expect("sync");
    drop(file);

    let lender = Arc::new(Lender::default());
    let out = Out {
        lender: lender.clone(),
        from_lent: 0,
    };
    let mut log = LogWriter::new(out, header(1, 0), Compression::Off).expect("writer");
    let file = std::fs::File::open(&raw).expect("open raw");
    let mut source = Source::RawFile(&file);
    let map = d.join("lent.hashes");
    let scan = scan_disk(&mut source, 0, None, &map, DEFAULT_BLOCK_SIZE, &mut log);
    let (_, stats) = disk::scan::paced(lender.clone(), scan)
        .await
        .expect("paced scan");
    assert_eq!(stats.data_bytes, 16 << 20);
    let (out, _) = log.finish().expect("finish");
    assert!(
        lender.0.lock().unwrap().is_none(),
        "nothing stays lent after the scan"
    );
    assert_eq!(
        out.from_lent,
        16 << 20,
        "every data byte was written from the lent read"
    );
}
