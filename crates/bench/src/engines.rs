//! The benchmark's steps and the engines it times.
//!
//! The disk is a raw image with a qcow2 metadata overlay (`disk::raw`): qemu-storage-daemon opens
//! the overlay, so a persistent dirty bitmap tracks the guest's writes, which land in the raw file
//! itself; rsync and the hash scan read that raw file.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use disk::bitmap::BitmapTracker;
use disk::export::{ExportSpec, NbdExport};
use disk::nbd::NbdClient;
use disk::scan::{hashmap, scan_disk, DEFAULT_BLOCK_SIZE};
use uuid::Uuid;
use wire::{Compression, DiskInfo, LogHeader, LogWriter, PointType};

use crate::measure::{run, Measured};

const BLOCK: u64 = 64 * 1024;

/// A fast deterministic generator of incompressible bytes.
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    fn below(&mut self, n: u64) -> u64 {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        u64::from_le_bytes(b) % n
    }
}

fn header(size: u64, seq: u64) -> LogHeader {
    LogHeader {
        vm: Uuid::from_u128(1),
        relationship: 0,
        sequence: seq,
        parent: seq - 1,
        point_time_micros: 0,
        point_type: PointType::Standard,
        full_image: seq == 1,
        disks: vec![DiskInfo {
            id: "disk0".into(),
            virtual_size: size,
        }],
    }
}

fn say(text: &str) {
    eprintln!("== {text}");
}

fn image_size(dir: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(dir.join("source.raw"))?.len())
}

/// One engine, in this (child) process.
pub async fn run_engine(name: &str, dir: &Path) -> anyhow::Result<()> {
    let size = image_size(dir)?;
    match name {
        "scan-qcow2" => {
            // The same disk as a qcow2 image, read where `qemu-img map` says the data is.
            let mapped = disk::scan::mapped::MappedImage::open(&dir.join("source.qcow2"), "qcow2")?;
            let log_path = dir.join("scan-qcow2.vrlog");
            let mut log = LogWriter::new(
                std::io::BufWriter::new(File::create(&log_path)?),
                header(size, 2),
                Compression::default(),
            )?;
            let map = dir.join("scan-qcow2.hashes");
            let previous = dir.join("map0.hashes");
            let (_, stats) = scan_disk(
                &mut disk::scan::Source::Mapped(&mapped),
                0,
                Some(&previous),
                &map,
                DEFAULT_BLOCK_SIZE,
                &mut log,
            )
            .await?;
            log.finish()?;
            std::fs::write(
                dir.join("scan-qcow2.result"),
                format!(
                    "{} {} {}",
                    stats.data_bytes, stats.zero_bytes, stats.read_bytes
                ),
            )?;
        }
        "scan-initial" | "scan" | "scan-nbd" => {
            // scan-initial / scan read the raw disk directly; scan-nbd reads it through qemu-nbd.
            let (seq, previous) = match name {
                "scan-initial" => (1, None),
                _ => (2, Some(dir.join("map0.hashes"))),
            };
            let log_path = dir.join(format!("{name}.vrlog"));
            let mut log = LogWriter::new(
                std::io::BufWriter::new(File::create(&log_path)?),
                header(size, seq),
                Compression::default(),
            )?;
            let map = dir.join(format!("{name}.hashes"));
            let raw = File::open(dir.join("source.raw"))?;
            let export = match name {
                "scan-nbd" => Some(
                    NbdExport::start(
                        &ExportSpec::new(dir.join("source.meta.qcow2"), "qcow2"),
                        &dir.join("run"),
                        name,
                    )
                    .await?,
                ),
                _ => None,
            };
            let mut nbd = match &export {
                Some(e) => Some(e.connect(&["base:allocation"]).await?),
                None => None,
            };
            let mut source = match nbd.as_mut() {
                Some(n) => disk::scan::Source::Nbd(n),
                None => disk::scan::Source::RawFile(&raw),
            };
            let (tmp, stats) = scan_disk(
                &mut source,
                0,
                previous.as_deref(),
                &map,
                DEFAULT_BLOCK_SIZE,
                &mut log,
            )
            .await?;
            log.finish()?;
            hashmap::commit(&tmp, &map)?;
            if let Some(n) = nbd {
                n.disconnect().await?;
            }
            if let Some(e) = export {
                e.stop().await;
            }
            std::fs::write(
                dir.join(format!("{name}.result")),
                format!(
                    "{} {} {}",
                    stats.data_bytes, stats.zero_bytes, stats.read_bytes
                ),
            )?;
        }
        "bitmap" => {
            let tracker = BitmapTracker::connect(&dir.join("qmp.sock"), &dir.join("run")).await?;
            let mut tracker = tracker.with_nbd_server(&dir.join("guest.sock"));
            let point = tracker.freeze(&["disk0"]).await?;
            let log_path = dir.join("bitmap.vrlog");
            let mut log = LogWriter::new(
                std::io::BufWriter::new(File::create(&log_path)?),
                header(size, 2),
                Compression::default(),
            )?;
            let stats = point.read_changes(0, 0, &mut log).await?;
            log.finish()?;
            point.commit(&mut tracker).await?;
            std::fs::write(
                dir.join("bitmap.result"),
                format!(
                    "{} {} {}",
                    stats.data_bytes, stats.zero_bytes, stats.dirty_bytes
                ),
            )?;
        }
        "apply" => {
            let store =
                disk::points::PointStore::open(&dir.join("replica-store"), Uuid::from_u128(1))
                    .await?;
            let expect = wire::Expect {
                vm: Uuid::from_u128(1),
                relationship: 0,
                sequence: 1,
                parent: 0,
            };
            store
                .apply(&dir.join("scan-initial.vrlog"), &expect)
                .await?;
        }
        other => bail!("unknown engine {other}"),
    }
    Ok(())
}

struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_qsd(dir: &Path) -> anyhow::Result<Qsd> {
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},cache.direct=off",
            dir.join("source.meta.qcow2").display()
        ))
        .args(["--blockdev", "driver=qcow2,node-name=disk0,file=file0"])
        .arg("--nbd-server")
        .arg(format!(
            "addr.type=unix,addr.path={}",
            dir.join("guest.sock").display()
        ))
        .args([
            "--export",
            "type=nbd,id=guest,node-name=disk0,name=guest,writable=on",
        ])
        .arg("--chardev")
        .arg(format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            dir.join("qmp.sock").display()
        ))
        .args(["--monitor", "chardev=qmp0"])
        .spawn()
        .context("qemu-storage-daemon")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(dir.join("qmp.sock").exists() && dir.join("guest.sock").exists()) {
        if Instant::now() > deadline {
            bail!("qemu-storage-daemon did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Qsd(child))
}

/// Whether every timed step starts from cold caches (`--cold`).
static COLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes dirty pages out before a timed step, so no step pays for the writeback of the one before;
/// with `--cold`, also drops the page cache, so every step reads its input from the disk.
fn settle() {
    let _ = Command::new("sync").status();
    if COLD.load(std::sync::atomic::Ordering::Relaxed) {
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
    }
}

fn engine(dir: &Path, name: &str) -> anyhow::Result<Measured> {
    settle();
    let me = std::env::current_exe()?;
    run(Command::new(me).arg("engine").arg(name).arg(dir))
}

fn result(dir: &Path, name: &str) -> anyhow::Result<Vec<u64>> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.result")))?;
    Ok(text
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect())
}

fn len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The whole benchmark; prints a table to stdout.
pub async fn data_plane(
    size: u64,
    change_percent: f64,
    dir: &Path,
    cold: bool,
) -> anyhow::Result<()> {
    let size = size / BLOCK * BLOCK;
    if cold {
        std::fs::write("/proc/sys/vm/drop_caches", "3\n")
            .context("--cold needs to write /proc/sys/vm/drop_caches (run as root)")?;
        COLD.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;
    let dir: PathBuf = std::fs::canonicalize(dir)?;
    let dir = dir.as_path();

    say(&format!(
        "writing a {} MiB image of random data",
        size >> 20
    ));
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    {
        let mut out =
            std::io::BufWriter::with_capacity(8 << 20, File::create(dir.join("source.raw"))?);
        let mut buf = vec![0u8; 4 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            out.write_all(&buf[..n])?;
            left -= n as u64;
        }
        out.flush()?;
    }
    // A raw disk, tracked through a qcow2 metadata overlay (the raw file stays plain raw).
    disk::raw::create_metadata_overlay(&dir.join("source.raw"), &dir.join("source.meta.qcow2"))?;
    std::fs::copy(dir.join("source.raw"), dir.join("replica.raw"))?;
    say("hash map of the unchanged image (the previous point)");
    let initial = engine(dir, "scan-initial")?;
    std::fs::rename(dir.join("scan-initial.hashes"), dir.join("map0.hashes"))?;

    say("the guest rewrites random 64 KiB blocks while a dirty bitmap tracks them");
    let qsd = start_qsd(dir)?;
    {
        let mut tracker = BitmapTracker::connect(&dir.join("qmp.sock"), &dir.join("run")).await?;
        tracker.start_tracking("disk0", 1).await?;
    }
    let blocks = size / BLOCK;
    let target = ((blocks as f64) * change_percent / 100.0).round() as u64;
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < target.min(blocks) {
        chosen.insert(rng.below(blocks));
    }
    // The guest's writes land in source.raw itself (data_file_raw), which rsync then reads.
    let mut guest = NbdClient::connect_unix(&dir.join("guest.sock"), "guest", &[]).await?;
    let mut data = vec![0u8; BLOCK as usize];
    for b in &chosen {
        rng.fill(&mut data);
        guest.write(b * BLOCK, &data).await?;
    }
    guest.flush().await?;
    guest.disconnect().await?;
    let changed = chosen.len() as u64 * BLOCK;

    say("bitmap engine");
    let bitmap = engine(dir, "bitmap")?;
    drop(qsd);
    say("hash-scan engine, raw file read directly");
    let scan = engine(dir, "scan")?;
    say("hash-scan engine, through qemu-nbd");
    let scan_nbd = engine(dir, "scan-nbd")?;
    say("hash-scan engine, the disk as qcow2 read through qemu-img map");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(dir.join("source.raw"))
        .arg(dir.join("source.qcow2")))?;
    let scan_qcow2 = engine(dir, "scan-qcow2")?;
    say("rsync --no-whole-file --inplace");
    settle();
    let rsync = run(Command::new("rsync")
        .args(["--no-whole-file", "--inplace"])
        .arg(dir.join("source.raw"))
        .arg(dir.join("replica.raw"))
        .stdout(Stdio::null()))?;
    say("qemu-img convert (full copy)");
    settle();
    let convert = run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(dir.join("source.raw"))
        .arg(dir.join("full-copy.qcow2")))?;
    // An applied point is fsynced before it counts; convert's copy is durable only after this.
    let convert_sync = {
        let t = Instant::now();
        Command::new("sync").status()?;
        t.elapsed()
    };
    say("apply the initial full-image log on the replica");
    let apply = engine(dir, "apply")?;
    let store_dir = dir
        .join("replica-store")
        .join(Uuid::from_u128(1).to_string())
        .join("disk0");
    let layer = store_dir.join("p00000000000000000001.qcow2");
    let check = Command::new("qemu-img").arg("check").arg(&layer).output()?;
    if !check.status.success() {
        bail!(
            "qemu-img check of {} failed: {}",
            layer.display(),
            String::from_utf8_lossy(&check.stdout)
        );
    }

    let b = result(dir, "bitmap")?;
    let s = result(dir, "scan")?;
    let sn = result(dir, "scan-nbd")?;
    let sq = result(dir, "scan-qcow2")?;
    let secs = |m: &Measured| m.wall.as_secs_f64();
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!();
    println!(
        "data plane: {} MiB image, {} blocks of 64 KiB rewritten ({} MiB, {change_percent}%)",
        size >> 20,
        chosen.len(),
        changed >> 20
    );
    println!();
    println!("| step | seconds | speed vs rsync | log bytes / changed bytes | peak memory (MiB) |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, m: &Measured, log: Option<(u64, u64)>| {
        let ratio = secs(&rsync) / secs(m).max(1e-9);
        let bytes = log.map_or("—".to_string(), |(raw, file)| {
            format!(
                "{:.3} raw, {:.3} on disk",
                raw as f64 / changed as f64,
                file as f64 / changed as f64
            )
        });
        println!(
            "| {name} | {:.2} | {ratio:.2}x | {bytes} | {:.0} |",
            secs(m),
            mib(m.max_rss_kib)
        );
    };
    row(
        "bitmap engine: freeze, read dirty extents, write log",
        &bitmap,
        Some((b[0] + b[1], len(&dir.join("bitmap.vrlog")))),
    );
    row(
        "hash-scan engine, raw file read directly: read, hash, compare, write log",
        &scan,
        Some((s[0] + s[1], len(&dir.join("scan.vrlog")))),
    );
    row(
        "hash-scan engine, through qemu-nbd",
        &scan_nbd,
        Some((sn[0] + sn[1], len(&dir.join("scan-nbd.vrlog")))),
    );
    row(
        "hash-scan engine, qcow2 read through its qemu-img map",
        &scan_qcow2,
        Some((sq[0] + sq[1], len(&dir.join("scan-qcow2.vrlog")))),
    );
    row("rsync --no-whole-file --inplace", &rsync, None);
    row("qemu-img convert (full copy)", &convert, None);
    row(
        "hash-scan engine, initial full image",
        &initial,
        Some((
            result(dir, "scan-initial")?[0],
            len(&dir.join("scan-initial.vrlog")),
        )),
    );
    row(
        "apply of the initial full-image log (replica)",
        &apply,
        None,
    );
    println!();
    println!(
        "hash scan read {} MiB of the {} MiB image.",
        s[2] >> 20,
        size >> 20
    );
    println!(
        "apply throughput: {:.0} MiB/s, {:.2}x qemu-img convert ({:.0} MiB/s); {:.2}x convert \
         followed by the sync that makes its copy as durable as an applied point ({:.2} s more).",
        (size >> 20) as f64 / secs(&apply),
        secs(&convert) / secs(&apply),
        (size >> 20) as f64 / secs(&convert),
        (secs(&convert) + convert_sync.as_secs_f64()) / secs(&apply),
        convert_sync.as_secs_f64(),
    );
    println!(
        "caches: {}.",
        if cold {
            "dropped before every timed step (--cold)"
        } else {
            "synced, not dropped, before every timed step"
        }
    );
    Ok(())
}
