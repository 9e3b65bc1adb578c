//! Helpers shared by the NBD tests (included with `#[path]`): server processes that die with the test,
//! QEMU tool invocations with deadlines, a raw QMP line client, and expected-extent arithmetic.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use disk::nbd::{push_merged, Extent};

/// Limit for any single external tool or server start-up.
pub const DEADLINE: Duration = Duration::from_secs(20);
pub const MIB: u64 = 1 << 20;

/// A server process, killed when dropped so a failing test never leaves it behind.
pub struct ServerGuard {
    child: Option<Child>,
    pub sock: PathBuf,
    log: PathBuf,
}

impl ServerGuard {
    /// Starts `program` with `args` and waits until `sock` accepts connections. Its output goes to a
    /// log next to the socket, printed if the test fails.
    pub fn start(program: &str, args: &[&str], sock: &Path) -> ServerGuard {
        let log = sock.with_extension("log");
        let file = std::fs::File::create(&log).expect("server log");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let mut guard = ServerGuard {
            child: Some(child),
            sock: sock.to_path_buf(),
            log,
        };
        let start = Instant::now();
        while UnixStream::connect(sock).is_err() {
            if let Some(status) = guard
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("{program} exited early with {status}");
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{program} did not open {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        guard
    }

    /// `qemu-nbd` exporting `image` as `disk0` on `dir/nbd.sock`; `extra` adds options.
    pub fn qemu_nbd(dir: &Path, image: &Path, format: &str, extra: &[&str]) -> ServerGuard {
        let sock = dir.join("nbd.sock");
        let (sock_s, image_s) = (sock.to_str().unwrap(), image.to_str().unwrap());
        let mut args = vec!["-k", sock_s, "-x", "disk0", "-f", format];
        args.extend_from_slice(extra);
        args.push(image_s);
        // The guard's readiness probe counts as a client (qemu-nbd logs that it hung up), so run
        // persistent servers and stop them explicitly with `stop`.
        args.push("--persistent");
        ServerGuard::start("qemu-nbd", &args, &sock)
    }

    /// Stops the server with SIGTERM (clean close of the image) and waits for it.
    pub fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            wait_deadline(&mut child, "server");
        }
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "server log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn wait_deadline(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("{what} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs a tool to completion under the deadline; returns (success, stdout+stderr).
pub fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out =
        std::env::temp_dir().join(format!("nbd-test-{}-{}.out", std::process::id(), unique()));
    let file = std::fs::File::create(&out).expect("output file");
    let mut child = Command::new(program)
        .args(args)
        .stdout(file.try_clone().expect("dup"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    let status = wait_deadline(&mut child, program);
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    (status.success(), text)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs `qemu-img` and panics with its output on failure.
pub fn qemu_img(args: &[&str]) -> String {
    let (ok, out) = run("qemu-img", args);
    assert!(ok, "qemu-img {args:?} failed: {out}");
    out
}

/// A QMP session over a unix socket, speaking raw JSON lines.
pub struct RawQmp {
    reader: BufReader<UnixStream>,
}

impl RawQmp {
    pub fn connect(path: &Path) -> RawQmp {
        let stream = UnixStream::connect(path).expect("connect QMP");
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let mut qmp = RawQmp {
            reader: BufReader::new(stream),
        };
        let greeting = qmp.line();
        assert!(
            greeting.contains("\"QMP\""),
            "not a QMP greeting: {greeting}"
        );
        qmp.execute(r#"{"execute":"qmp_capabilities"}"#);
        qmp
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("QMP read");
        assert!(!line.is_empty(), "QMP closed");
        line
    }

    /// Sends one command and returns its reply line, failing the test on `"error"`.
    pub fn execute(&mut self, json: &str) -> String {
        writeln!(self.reader.get_mut(), "{json}").expect("QMP write");
        loop {
            let line = self.line();
            if line.contains("\"event\"") {
                continue;
            }
            assert!(line.contains("\"return\""), "QMP {json} failed: {line}");
            return line;
        }
    }
}

/// Deterministic, position-dependent test bytes.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Dirty extents expected after writing `ranges` (offset, len), at bitmap granularity, over `size`.
pub fn expected_dirty(ranges: &[(u64, u64)], granularity: u64, size: u64) -> Vec<Extent> {
    let dirty = |block: u64| {
        ranges
            .iter()
            .any(|&(o, l)| o / granularity <= block && block <= (o + l - 1) / granularity)
    };
    let mut out = Vec::new();
    for block in 0..size.div_ceil(granularity) {
        let offset = block * granularity;
        let length = granularity.min(size - offset);
        push_merged(
            &mut out,
            Extent {
                offset,
                length,
                flags: u32::from(dirty(block)),
            },
        );
    }
    out
}

/// Parses `nbdinfo --map` output ("offset length type description" per line) into merged extents.
pub fn nbdinfo_map(context: &str, sock: &Path, export: &str) -> Option<Vec<Extent>> {
    if Command::new("nbdinfo").arg("--version").output().is_err() {
        return None;
    }
    let uri = format!("nbd+unix:///{export}?socket={}", sock.display());
    let (ok, out) = run("nbdinfo", &[&format!("--map={context}"), &uri]);
    assert!(ok, "nbdinfo failed: {out}");
    let mut extents = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let mut cols = line.split_whitespace().map(|c| c.parse::<u64>());
        let (Some(Ok(offset)), Some(Ok(length)), Some(Ok(flags))) =
            (cols.next(), cols.next(), cols.next())
        else {
            panic!("unexpected nbdinfo line {line:?}");
        };
        push_merged(
            &mut extents,
            Extent {
                offset,
                length,
                flags: flags as u32,
            },
        );
    }
    Some(extents)
}
