#!/usr/bin/env python3
"""Issue 5's failover-time benchmark: InitiateFailover, from the call to the job's completion, to the
latest and to the oldest retained recovery point, on disks of each --sizes, in one run. A failover
is an overlay on a retained point, so the time must not grow with the disk size; `qemu-img convert`
of the same image (what a copy-based failover would cost) is shown beside it.

    python3 scripts/bench_failover.py [--sizes 1G,8G] [--dir bench-data/failover]

Not part of CI. Needs about 3x the largest size of free space. Release binaries are built first.
The reused pieces (image maker, hosts, certificates) are those of bench_two_hosts.py.
"""

import argparse
import shutil
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_two_hosts import (  # noqa: E402
    PRIMARY, REPLICA, ROOT, Host, lab_certs, drop_caches, free_port, make_image, sh, size_arg, wait)


def one_size(work, size_text):
    size = size_arg(size_text)
    work.mkdir(parents=True)
    image = work / "vm.qcow2"
    make_image(image, size)
    drop_caches()
    t = time.monotonic()
    sh("qemu-img", "convert", "-O", "qcow2", image, work / "copy.qcow2")
    copy_secs = time.monotonic() - t
    (work / "copy.qcow2").unlink()

    thumbs = lab_certs(work)
    repl_port = free_port()
    hv1 = Host(work / "hv1", PRIMARY, ["--resolve", f"{REPLICA}=127.0.0.1", "--cycle-interval-override", "2"])
    hv2 = Host(work / "hv2", REPLICA, ["--replication-address", "127.0.0.1"])
    storage = work / "replica-storage"
    storage.mkdir()
    try:
        hv2.cli("server", "set", "--enable", "--thumbprint", thumbs[REPLICA], "--https-port", str(repl_port))
        hv2.cli("auth", "add", "--primary", "*.bench.example", "--storage", str(storage))
        wait(lambda: socket.create_connection(("127.0.0.1", repl_port), timeout=1).close() or True, 20, "listener")
        vm_id = hv1.cli("vm", "add", "--name", "fo01", "--disk", str(image)).strip()
        hv1.cli("enable", "fo01", "--replica-server", REPLICA, "--replica-port", str(repl_port),
                "--thumbprint", thumbs[PRIMARY], "--frequency", "30", "--no-compression")
        hv1.cli("start", "fo01")
        hv1.cli("suspend", "fo01")  # no delta before point 1 is pinned
        points = storage / vm_id.lower()

        def kept():
            return sorted(int(f.stem[1:]) for f in points.glob("p*.json"))

        wait(lambda: kept() == [1] and "Replicating" in hv2.cli("status"), 3600, "point 1 applied")
        # A test VM keeps the oldest point while three deltas arrive (RecoveryHistory 0 keeps only
        # the latest otherwise); it is removed before the failovers are timed.
        hv2.cli("failover", "fo01", "--test", "--point", "1")
        hv1.cli("resume", "fo01")
        for k in range(3):
            before = kept()[-1]
            sh("qemu-io", "-f", "qcow2", "-c", f"write -P {0x40 + k} {k * 64}M 1M", image)
            wait(lambda: kept()[-1] > before, 600, "a delta")
        hv1.cli("suspend", "fo01")
        oldest, latest = kept()[0], kept()[-1]
        hv2.cli("stop-failover", "fo01")
        # The failover itself pins the oldest point now; time both, reverting in between.
        results = {}
        for name, point in (("oldest", oldest), ("latest", latest)):
            drop_caches()
            t = time.monotonic()
            hv2.cli("failover", "fo01", "--point", str(point))
            results[name] = time.monotonic() - t
            hv2.cli("revert", "fo01")
        return copy_secs, results, (oldest, latest)
    finally:
        hv1.stop()
        hv2.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1G,8G")
    ap.add_argument("--dir", default="bench-data/failover")
    args = ap.parse_args()
    work = (ROOT / args.dir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    print("building release binaries ...", flush=True)
    sh("cargo", "build", "--release", "--locked", "-p", "vmreplicad", "-p", "vmreplica", cwd=ROOT)
    rows = []
    for size in args.sizes.split(","):
        print(f"{size}: image, initial replication, three deltas, failovers ...", flush=True)
        copy, r, (oldest, latest) = one_size(work / size, size)
        rows.append((size, oldest, latest, r["oldest"], r["latest"], copy))
        shutil.rmtree(work / size, ignore_errors=True)
    print()
    print("InitiateFailover, call to job complete (vmreplica failover, which waits for the job):")
    print(f"| {'disk':>5} | {'oldest point':>12} | {'s':>6} | {'latest point':>12} | {'s':>6} | "
          f"{'qemu-img convert s':>18} |")
    print(f"|{'-' * 7}|{'-' * 14}|{'-' * 8}|{'-' * 14}|{'-' * 8}|{'-' * 20}|")
    for size, oldest, latest, t_old, t_new, copy in rows:
        print(f"| {size:>5} | {oldest:>12} | {t_old:6.2f} | {latest:>12} | {t_new:6.2f} | {copy:18.2f} |")


if __name__ == "__main__":
    main()
