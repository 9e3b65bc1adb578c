#!/usr/bin/env python3
"""Issue 4's benchmark: two vmreplicad hosts on loopback with TLS, in one run.

1. Initial replication of a --size qcow2 image, half of it allocated with random data, over the
   host-to-host protocol (HTTP/2, TLS 1.3, both hosts authenticated by certificate), beside
   `qemu-img convert` of the same image (as run by default, which leaves its copy in the page
   cache, and with `-t writeback`, which flushes it to disk as a committed replica point is) and
   `rsync` of it to an rsync daemon over loopback.
2. Sustained replication: the image is then held by qemu-storage-daemon (a running VM) and a guest
   writes random 64 KiB blocks through its NBD export. The time a cycle needs to ship --churn of
   such writes (dirty bitmaps, fleecing, upload, commit) gives the highest churn (MB/s) at which every
   30 s cycle completes within its interval.
3. With --live-churn 50,100,150: the guest writes at each steady rate (MB/s of random 64 KiB blocks,
   through one qemu-io over the NBD export) for three 30 s intervals while replication runs, and
   the table says whether every cycle finished within its interval (the live check of 2).

    python3 scripts/bench_two_hosts.py [--size 8G] [--churn 2G] [--dir bench-data/two-hosts]
                                       [--live-churn 50,100,150] [--dest /dev/shm] [--repeat 5]

With --repeat N, the initial replication table (1) is measured N times, each in a fresh run (a new
image, new hosts), and a summary gives each run's ratio and their median: on a shared machine
`qemu-img convert`'s own time moves a lot from run to run.

Both hosts share this machine's disk and cores; two real hosts each have their own. --dest puts
every copy (the replica's storage, the convert and rsync targets) on another device, as the
replica host's own disk would be. The CPU each daemon used for the initial replication is printed.

Not part of CI. Needs about 3x --size of free space. Release binaries are built first.
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time

import bench_tools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# VMREPLICA_BENCH_BIN: a directory holding vmreplicad and vmreplica to time instead of this tree's
# release build (nothing is built then), to compare two builds run after run.
BIN = Path(os.environ.get("VMREPLICA_BENCH_BIN") or ROOT / "target" / "release").resolve()
PRIMARY, REPLICA = "hv1.bench.example", "hv2.bench.example"
CHUNK = 64 << 20


def size_arg(text):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1].upper(), 1)
    return int(text[:-1] if mult > 1 else text) * mult


def sh(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drop_caches():
    """Each timed step starts from cold caches when the machine lets us, else from synced ones."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(fn):
    cold = drop_caches()
    t = time.monotonic()
    fn()
    return time.monotonic() - t, cold


class Host:
    def __init__(self, data, name, extra):
        self.data, self.name = data, name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data.parent / f"{data.name}.log"
        self.proc = subprocess.Popen(
            [BIN / "vmreplicad", "--data-dir", data, "--cim-listen", f"127.0.0.1:{self.port}",
             "--host-name", name, *extra],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"vmreplicad did not start: {self.log.read_text()}")

    def cli(self, *args):
        return sh(BIN / "vmreplica", "--url", self.url, *args, timeout=7200).stdout

    def cpu_seconds(self):
        """User and system CPU time the daemon has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def make_image(path, size):
    """A qcow2 of `size` whose even 64 MiB chunks hold random data and odd ones are unallocated."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 2 * CHUNK):
            f.seek(off)
            f.write(os.urandom(min(CHUNK, size - off)))
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
    raw.unlink()


def delta_lines(log):
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text())
    return [(int(m.group(1)), int(m.group(2)), int(m.group(3)))
            for m in re.finditer(r"delta replicated .*sequence=(\d+) bytes=(\d+) ms=(\d+)", text)]


def lab_certs(work):
    """A lab CA in work/ca, certificates for both hosts installed in work/hv1 and work/hv2;
    returns the thumbprint of each host."""
    doc = json.loads(sh(BIN / "vmreplica", "--output", "json", "cert", "new", "--host", PRIMARY,
                        "--host", REPLICA, "--out", work / "ca").stdout)
    for host, d in ((PRIMARY, "hv1"), (REPLICA, "hv2")):
        shutil.copytree(work / "ca" / host / "certs", work / d / "certs")
    return {h["host"]: h["thumbprint"] for h in doc["hosts"]}


def wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def prepare(dir_arg, size_text):
    """A fresh work directory, the release binaries built, and a `size_text` qcow2 half allocated
    with random data in it; returns (work directory, image)."""
    work = (ROOT / dir_arg).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if not os.environ.get("VMREPLICA_BENCH_BIN"):
        print("building release binaries ...", flush=True)
        sh("cargo", "build", "--release", "--locked", "-p", "vmreplicad", "-p", "vmreplica", cwd=ROOT)
    image = work / "vm.qcow2"
    print(f"making a {size_text} qcow2, half allocated with random data ...", flush=True)
    make_image(image, size_arg(size_text))
    return work, image


def repeat(n):
    """Runs this script `n` times with --ir-only (the same binaries, built once) and summarizes the
    initial replication's ratios."""
    env = dict(os.environ)
    if not env.get("VMREPLICA_BENCH_BIN"):
        print("building release binaries ...", flush=True)
        sh("cargo", "build", "--release", "--locked", "-p", "vmreplicad", "-p", "vmreplica", cwd=ROOT)
        env["VMREPLICA_BENCH_BIN"] = str(BIN)
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip or a.startswith("--repeat="):
            skip = False
        elif a == "--repeat":
            skip = True
        else:
            argv.append(a)
    rows = []
    for run in range(1, n + 1):
        print(f"run {run} of {n}", flush=True)
        out = subprocess.run([sys.executable, __file__, *argv, "--ir-only"], env=env, check=True,
                             capture_output=True, text=True).stdout
        print(out, flush=True)
        secs = {}
        for name in ("qemu-img convert (local full copy)", "qemu-img convert -t writeback",
                     "vmreplica initial replication over TLS (committed)"):
            line = next(l for l in out.splitlines() if l.startswith(f"| {name}"))
            secs[name] = float(line.split("|")[2])
        if "replica point 1 equals the image: True" not in out:
            sys.exit(f"run {run}: the replica's point 1 does not equal the image")
        rows.append(tuple(secs.values()))
    print(f"Initial replication, {n} runs:")
    print("| run | convert s | convert flushed s | vmreplica s | vs convert | vs flushed |")
    print("|---|---|---|---|---|---|")
    for i, (plain, flushed, ours) in enumerate(rows, 1):
        print(f"| {i} | {plain:.2f} | {flushed:.2f} | {ours:.2f} | {plain / ours:.2f}x | {flushed / ours:.2f}x |")
    ratios = sorted(p / o for p, _, o in rows)
    flushed = sorted(f / o for _, f, o in rows)
    print(f"| median | | | {sorted(o for *_, o in rows)[n // 2]:.2f} | {ratios[n // 2]:.2f}x "
          f"| {flushed[n // 2]:.2f}x |")
    print(f"vs convert: {min(ratios):.2f}x to {max(ratios):.2f}x; at least 0.7x in "
          f"{sum(r >= 0.7 for r in ratios)} of {n} runs")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="8G")
    ap.add_argument("--churn", default="2G", help="random 64 KiB writes shipped by one cycle")
    ap.add_argument("--dir", default="bench-data/two-hosts")
    ap.add_argument("--live-churn", default="",
                    help="comma-separated MB/s rates: a guest writes random 64 KiB blocks at each rate for "
                         "three 30 s intervals while replication runs; reports whether every cycle kept up")
    ap.add_argument("--dest", default="",
                    help="where every copy lands (the replica's storage, the convert and rsync targets) "
                         "instead of --dir: another device, as the replica host's own disk would be")
    ap.add_argument("--ir-only", action="store_true", help="stop after the initial replication table")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure the initial replication this many times (implies --ir-only) and "
                         "summarize the ratios")
    ap.add_argument("--perf", default="",
                    help="record `perf record -a` into this file during the initial replication")
    args = ap.parse_args()
    if args.repeat > 1:
        return repeat(args.repeat)
    bench_tools.ensure("rsync", "qemu-img", "qemu-io")
    size, churn = size_arg(args.size), size_arg(args.churn)
    work, image = prepare(args.dir, args.size)
    allocated = int(json.loads(sh("qemu-img", "info", "--output=json", image).stdout)["actual-size"])

    # With --dest, the copies land in a directory of our own below it, removed at the end.
    dest = Path(args.dest).resolve() / "vmreplica-bench" if args.dest else work
    if args.dest:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
    rows = []
    t, cold = timed(lambda: sh("qemu-img", "convert", "-O", "qcow2", image, dest / "convert.qcow2"))
    rows.append(("qemu-img convert (local full copy)", t))
    (dest / "convert.qcow2").unlink()
    # convert's default cache mode for its output is "unsafe": it never flushes, so the copy may
    # still be in the page cache when it returns. A replica point is on disk when it is committed;
    # `-t writeback` makes convert flush its copy at the end too.
    t, _ = timed(lambda: sh("qemu-img", "convert", "-t", "writeback", "-O", "qcow2", image,
                            dest / "convert.qcow2"))
    rows.append(("qemu-img convert -t writeback (copy flushed)", t))
    (dest / "convert.qcow2").unlink()

    rsync_dir = dest / "rsync-dest"
    rsync_dir.mkdir()
    rport = free_port()
    conf = work / "rsyncd.conf"
    conf.write_text(f"use chroot = no\nuid = {os.getuid()}\ngid = {os.getgid()}\n"
                    f"[dest]\npath = {rsync_dir}\nread only = no\n")
    rsyncd = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--port={rport}", f"--config={conf}",
                               "--address=127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        t, _ = timed(lambda: sh("rsync", "--sparse", str(image), f"rsync://127.0.0.1:{rport}/dest/"))
        rows.append(("rsync to an rsync daemon over loopback", t))
    finally:
        rsyncd.terminate()
        shutil.rmtree(rsync_dir)

    thumbs = lab_certs(work)
    repl_port = free_port()
    hv1 = Host(work / "hv1", PRIMARY, ["--resolve", f"{REPLICA}=127.0.0.1"])
    hv2 = Host(work / "hv2", REPLICA, ["--replication-address", "127.0.0.1"])
    storage = dest / "replica-storage"
    storage.mkdir()
    qsd = None
    try:
        hv2.cli("server", "set", "--enable", "--thumbprint", thumbs[REPLICA], "--https-port", str(repl_port))
        hv2.cli("auth", "add", "--primary", "*.bench.example", "--storage", str(storage))
        wait(lambda: socket.create_connection(("127.0.0.1", repl_port), timeout=1).close() or True, 20, "listener")
        qmp, guest = work / "qmp.sock", work / "guest.sock"
        vm_id = hv1.cli("vm", "add", "--name", "bench01", "--disk", str(image), "--qmp-socket", str(qmp),
                        "--nbd-socket", str(guest)).strip()
        hv1.cli("enable", "bench01", "--replica-server", REPLICA, "--replica-port", str(repl_port),
                "--thumbprint", thumbs[PRIMARY], "--frequency", "30", "--no-compression")
        drop_caches()
        perf = None
        if args.perf:
            # VMREPLICA_BENCH_PERF_ARGS: more `perf record` options, e.g. "--call-graph dwarf".
            extra = os.environ.get("VMREPLICA_BENCH_PERF_ARGS", "").split()
            perf = subprocess.Popen(["perf", "record", "-a", "-F", "999", *extra, "-o", args.perf],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        cpu0 = hv1.cpu_seconds(), hv2.cpu_seconds()
        t0 = time.monotonic()
        hv1.cli("start", "bench01")
        rows.append(("vmreplica initial replication over TLS (committed)", time.monotonic() - t0))
        layer = storage / vm_id.lower() / "disk0" / f"p{1:020}.qcow2"
        wait(layer.exists, 3600, "the replica to apply point 1")
        rows.append(("vmreplica, until the replica applied point 1", time.monotonic() - t0))
        cpu = hv1.cpu_seconds() - cpu0[0], hv2.cpu_seconds() - cpu0[1]
        if perf:
            perf.send_signal(2)
            perf.wait()
        res = subprocess.run(["qemu-img", "compare", "-F", "qcow2", str(layer), str(image)],
                             capture_output=True, text=True)
        identical = res.returncode == 0

        base, flushed = rows[0][1], rows[1][1]
        print()
        print(f"Initial replication of a {args.size} qcow2 ({allocated / 2**30:.2f} GiB allocated), "
              f"caches {'dropped' if cold else 'synced (not dropped)'} before each step:")
        print(f"| {'what':<52} | {'seconds':>8} | {'MB/s':>7} | {'speed vs qemu-img convert':>26} "
              f"| {'vs convert, copy flushed':>24} |")
        print(f"|{'-' * 54}|{'-' * 10}|{'-' * 9}|{'-' * 28}|{'-' * 26}|")
        for name, secs in rows:
            print(f"| {name:<52} | {secs:8.2f} | {allocated / secs / 1e6:7.0f} | {base / secs:25.2f}x "
                  f"| {flushed / secs:23.2f}x |")
        print(f"CPU used by the initial replication: primary {cpu[0]:.2f} s, replica {cpu[1]:.2f} s")
        print(f"replica point 1 equals the image: {identical}")
        if args.ir_only:
            return

        # Sustained replication: the VM runs (qemu-storage-daemon holds the image).
        for s in (qmp, guest):
            s.unlink(missing_ok=True)
        qsd = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=file0,filename={image}",
             "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
             "--nbd-server", f"addr.type=unix,addr.path={guest}",
             "--export", "type=nbd,id=guest,node-name=disk0,name=guest,writable=on",
             "--chardev", f"socket,id=qmp0,path={qmp},server=on,wait=off", "--monitor", "chardev=qmp0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(lambda: qmp.exists() and guest.exists(), 20, "qemu-storage-daemon")

        def cycle_after(writes):
            hv1.cli("suspend", "bench01")
            before = len(delta_lines(hv1.log))
            if writes:
                pattern = work / "pattern.bin"
                pattern.write_bytes(os.urandom(64 << 10))
                rng = random.Random(len(writes))
                blocks = size // (64 << 10)
                cmds = "".join(f"write -q -s {pattern} {rng.randrange(blocks) * 65536} 64k\n"
                               for _ in range(writes[0]))
                subprocess.run(["qemu-io", "-f", "raw", f"nbd+unix:///guest?socket={guest}"],
                               input=cmds, text=True, check=True, capture_output=True)
            hv1.cli("resume", "bench01")
            return wait(lambda: delta_lines(hv1.log)[before:] and delta_lines(hv1.log)[before], 3600, "a cycle")

        # The first cycle of the running VM has no bitmap yet: one hash scan of the frozen view.
        _, scan_bytes, scan_ms = cycle_after(None)
        n = churn // (64 << 10)
        _, churn_bytes, churn_ms = cycle_after([n])
        rate = churn_bytes / (churn_ms / 1000) / 1e6
        print()
        print("Sustained replication of the running VM (interval 30 s):")
        print(f"| {'cycle':<60} | {'log MB':>7} | {'seconds':>8} |")
        print(f"|{'-' * 62}|{'-' * 9}|{'-' * 10}|")
        print(f"| {'first cycle after the VM started (hash scan of the frozen view)':<60} | {scan_bytes / 1e6:7.1f} | {scan_ms / 1000:8.2f} |")
        print(f"| {f'{n} random 64 KiB writes ({args.churn}), read through the dirty bitmap':<60} | {churn_bytes / 1e6:7.1f} | {churn_ms / 1000:8.2f} |")
        print(f"A cycle ships such churn at {rate:.0f} MB/s, so every 30 s cycle completes within its interval up to "
              f"about {rate:.0f} MB/s of sustained random-write churn (unique blocks; less when the guest "
              f"rewrites the same blocks, which ship once).")

        if args.live_churn:
            # Replication runs (cycle_after resumed it).
            blocks = size // (64 << 10)
            rng = random.Random(7)
            print()
            print("Live churn: a guest writes at a steady rate for three 30 s intervals while replication runs")
            print(f"| {'asked MB/s':>10} | {'written MB/s':>12} | {'cycles':>6} | {'longest cycle s':>15} | {'log MB/cycle':>12} | kept up |")
            print(f"|{'-' * 12}|{'-' * 14}|{'-' * 8}|{'-' * 17}|{'-' * 14}|---------|")
            for asked in (float(r) for r in args.live_churn.split(",")):
                before = len(delta_lines(hv1.log))
                # One qemu-io writes about 100 MB/s of 64 KiB writes here (one at a time over
                # NBD): higher rates are shared among several, as a guest's queues would.
                writers = [subprocess.Popen(["qemu-io", "-f", "raw", f"nbd+unix:///guest?socket={guest}"],
                                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, text=True)
                           for _ in range(max(1, math.ceil(asked / 75)))]
                per_second = asked * 1e6 / 65536
                start, n = time.monotonic(), 0
                while (elapsed := time.monotonic() - start) < 90:
                    due = int(elapsed * per_second)
                    if due > n:
                        # A new byte per write: a block rewritten with what it already holds would
                        # hash equal and not ship, which would make the load lighter than it looks.
                        for k in range(n, due):
                            w = writers[k % len(writers)]
                            w.stdin.write(f"write -q -P {rng.randrange(1, 256)} "
                                          f"{rng.randrange(blocks) * 65536} 64k\n")
                        for w in writers:
                            w.stdin.flush()
                        n = due
                    time.sleep(0.005)
                for w in writers:
                    w.stdin.close()
                for w in writers:
                    w.wait()  # what qemu-io had not written yet, too
                elapsed = time.monotonic() - start
                # The cycle that ships the last writes.
                wait(lambda: len(delta_lines(hv1.log)) > before + 3, 600, "the cycles of the trial")
                cycles = delta_lines(hv1.log)[before:]
                longest = max(ms for _, _, ms in cycles) / 1000
                per_cycle = sum(b for _, b, _ in cycles) / len(cycles) / 1e6
                written = n * 65536 / elapsed / 1e6
                print(f"| {asked:10.0f} | {written:12.1f} | {len(cycles):6} | {longest:15.2f} | {per_cycle:12.1f} | "
                      f"{'yes' if longest < 30 else 'NO':>7} |", flush=True)
    finally:
        if qsd:
            qsd.terminate()
            qsd.wait()
        hv1.stop()
        hv2.stop()
        if args.dest:
            shutil.rmtree(dest, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
