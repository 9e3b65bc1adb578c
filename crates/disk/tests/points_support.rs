//! Helpers for the recovery-point store tests (included with `#[path]`): a source disk holding a
//! real ext4 filesystem in successive versions, replication logs computed from the real
//! differences between versions, and checks with QEMU's own tools.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use wire::{Compression, DiskInfo, Expect, LogHeader, LogWriter, PointType};

pub const DISK_SIZE: u64 = 64 << 20;
pub const BLOCK: usize = 64 << 10;
pub const HOUR: i64 = 3_600_000_000;
/// Point time of version 1; later versions are `minutes` later (see [`Source::log`]).
pub const T0: i64 = 1_700_000_000_000_000;

pub fn vm() -> uuid::Uuid {
    uuid::Uuid::from_u128(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff)
}

pub fn run(program: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Deterministic pseudo-random bytes (xorshift), so the data compresses like real data does not.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The primary's disk: raw files `v<n>.raw`, one per version, each an ext4 filesystem.
pub struct Source {
    pub dir: PathBuf,
    pub versions: usize,
}

impl Source {
    /// Version 1: a fresh ext4 with one file; every later version writes or removes files.
    pub fn new(dir: &Path, versions: usize) -> Source {
        let v1 = dir.join("v1.raw");
        std::fs::File::create(&v1)
            .and_then(|f| f.set_len(DISK_SIZE))
            .expect("raw");
        run(
            "mkfs.ext4",
            &["-F", "-q", "-E", "lazy_itable_init=0", p(&v1)],
        );
        let mut src = Source {
            dir: dir.to_path_buf(),
            versions: 1,
        };
        src.put(1, "f1", 1 << 20);
        for n in 2..=versions {
            std::fs::copy(src.raw(n - 1), src.raw(n)).expect("copy version");
            src.versions = n;
            if n % 3 == 0 {
                src.rm(n, &format!("f{}", n - 2));
            }
            src.put(n, &format!("f{n}"), (n % 4 + 1) << 20);
        }
        src
    }

    pub fn raw(&self, version: usize) -> PathBuf {
        self.dir.join(format!("v{version}.raw"))
    }

    fn put(&self, version: usize, name: &str, len: usize) {
        let host = self.dir.join(format!("{name}.data"));
        std::fs::write(&host, noise(version as u64 * 1000 + len as u64, len)).expect("data");
        let cmd = format!("write {} {name}", p(&host));
        run("debugfs", &["-w", "-R", &cmd, p(&self.raw(version))]);
    }

    fn rm(&self, version: usize, name: &str) {
        run(
            "debugfs",
            &["-w", "-R", &format!("rm {name}"), p(&self.raw(version))],
        );
    }

    /// The expectation for the log of `version` (sequence = version, parent = version - 1).
    pub fn expect(version: usize) -> Expect {
        Expect {
            vm: vm(),
            relationship: 0,
            sequence: version as u64,
            parent: version as u64 - 1,
        }
    }

    /// Writes the log of `version` to `out`: the whole disk for version 1, otherwise the 64 KiB
    /// blocks that differ from the previous version (zero blocks as zero extents). `time` is the
    /// point time.
    pub fn log(&self, version: usize, time: i64, kind: PointType, out: &Path) {
        let header = LogHeader {
            vm: vm(),
            relationship: 0,
            sequence: version as u64,
            parent: version as u64 - 1,
            point_time_micros: time,
            point_type: kind,
            full_image: version == 1,
            disks: vec![DiskInfo {
                id: "scsi0".into(),
                virtual_size: DISK_SIZE,
            }],
        };
        let cur = std::fs::read(self.raw(version)).expect("read version");
        let prev =
            (version > 1).then(|| std::fs::read(self.raw(version - 1)).expect("read previous"));
        let file = std::io::BufWriter::new(std::fs::File::create(out).expect("log file"));
        let mut w = LogWriter::new(file, header, Compression::default()).expect("writer");
        for (i, block) in cur.chunks(BLOCK).enumerate() {
            let at = i * BLOCK;
            if prev
                .as_ref()
                .is_some_and(|prev| &prev[at..at + block.len()] == block)
            {
                continue;
            }
            if block.iter().all(|&b| b == 0) {
                w.write_zero(0, at as u64, block.len() as u64)
                    .expect("zero");
            } else {
                w.write_data(0, at as u64, block).expect("data");
            }
        }
        w.finish().expect("finish");
    }

    /// Writes the logs of every version into `dir` as `<n>.log` (standard points, one every
    /// `minutes`), returning their paths.
    pub fn logs(&self, dir: &Path, minutes: i64) -> Vec<PathBuf> {
        (1..=self.versions)
            .map(|n| {
                let path = dir.join(format!("{n}.log"));
                self.log(
                    n,
                    T0 + (n as i64 - 1) * minutes * 60_000_000,
                    PointType::Standard,
                    &path,
                );
                path
            })
            .collect()
    }
}

/// `qemu-img compare` of a qcow2 chain against a raw file: true when the guest sees the same bytes.
pub fn same(qcow2: &Path, raw: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args([
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p(qcow2),
            p(raw),
        ])
        .output()
        .expect("qemu-img compare");
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `qemu-img check` passes.
pub fn check(qcow2: &Path) {
    run("qemu-img", &["check", "-q", "-f", "qcow2", p(qcow2)]);
}

/// Every file under `dir` with its size and modification time: "nothing changed" means equal.
pub fn tree(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let meta = e.metadata().expect("metadata");
            if meta.is_dir() {
                todo.push(e.path());
            } else {
                out.push((e.path(), meta.len(), meta.modified().expect("mtime")));
            }
        }
    }
    out.sort();
    out
}
