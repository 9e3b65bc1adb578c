#!/usr/bin/env python3
"""Issue 5's failback benchmark, in one run: a --size qcow2 (half allocated with random data) is
replicated from hv1 to hv2; hv1 is lost holding --divergence of writes that never replicated; hv2
fails over (unplanned), writes --divergence of its own (half before CommitFailover, half after);
hv1 comes back and `vmreplica failback` (InitiateFailback) brings its disk to hv2's.

Beside it: a full re-seed (the initial replication of the same image, over the same TLS
protocol) and rsync of hv2's disk onto hv1's over loopback (raw images, --inplace, rsync's own
delta algorithm). Reported: time and bytes sent, and the ratios the issue sets (failback bytes at
most 1.1x the divergent bytes, time at most 10 % of a full re-seed).

    python3 scripts/bench_failback.py [--size 8G] [--divergence 0.01] [--dir bench-data/failback] [--keep]
                                      [--resync]

With --resync, hv2 instead reverses the relationship and runs Resynchronize (Hyper-V's way back
without failback: both disks are hashed in full and compared, only the differing blocks travel).

Not part of CI. Needs about 4x --size of free space. Release binaries are built first.
"""

import argparse
import json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_two_hosts import (  # noqa: E402
    PRIMARY, REPLICA, Host, lab_certs, drop_caches, free_port, prepare, sh, size_arg, wait)

BLOCK = 64 << 10


def scatter(image, blocks, seed, noise_dir):
    """Writes `blocks` random 64 KiB blocks of fresh random data at random block offsets of `image`
    (qcow2) with qemu-io; returns the offsets."""
    rng = random.Random(seed)
    size = int(json.loads(sh("qemu-img", "info", "--output=json", image).stdout)["virtual-size"])
    offsets = sorted(rng.sample(range(size // BLOCK), blocks))
    noise_dir.mkdir(parents=True, exist_ok=True)
    cmds = []
    for k, b in enumerate(offsets):
        src = noise_dir / f"{seed}-{k}"
        src.write_bytes(os.urandom(BLOCK))
        cmds += ["-c", f"write -s {src} {b * BLOCK} {BLOCK}"]
    for i in range(0, len(cmds), 400):
        sh("qemu-io", "-f", "qcow2", *cmds[i:i + 400], image)
    shutil.rmtree(noise_dir)
    return offsets


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def rsync_bytes(stats):
    m = re.search(r"Total bytes sent: ([\d,.]+)", stats)
    return int(m.group(1).replace(",", "").replace(".", "")) if m else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="8G")
    ap.add_argument("--divergence", type=float, default=0.01, help="share of the disk each side writes")
    ap.add_argument("--dir", default="bench-data/failback")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (daemon logs) afterwards")
    ap.add_argument("--resync", action="store_true", help="reverse + Resynchronize instead of failback")
    args = ap.parse_args()
    bench_tools.ensure("rsync", "qemu-img", "qemu-io")
    size = size_arg(args.size)
    work, image = prepare(args.dir, args.size)

    thumbs = lab_certs(work)
    port1, port2 = free_port(), free_port()
    hv1_args = ["--resolve", f"{REPLICA}=127.0.0.1", "--replication-address", "127.0.0.1",
                "--cycle-interval-override", "2"]
    hv1 = Host(work / "hv1", PRIMARY, hv1_args)
    hv2 = Host(work / "hv2", REPLICA, ["--resolve", f"{PRIMARY}=127.0.0.1", "--replication-address", "127.0.0.1",
                                       "--cycle-interval-override", "2"])
    storage1, storage2 = work / "hv1-storage", work / "hv2-storage"
    storage1.mkdir()
    storage2.mkdir()
    rows = []
    try:
        hv2.cli("server", "set", "--enable", "--thumbprint", thumbs[REPLICA], "--https-port", str(port2))
        hv2.cli("auth", "add", "--primary", PRIMARY, "--storage", str(storage2))
        hv1.cli("server", "set", "--enable", "--thumbprint", thumbs[PRIMARY], "--https-port", str(port1))
        hv1.cli("auth", "add", "--primary", REPLICA, "--storage", str(storage1))
        for p in (port1, port2):
            wait(lambda: listening(p), 20, "listener")
        vm_id = hv1.cli("vm", "add", "--name", "fb01", "--disk", str(image)).strip()
        hv1.cli("enable", "fb01", "--replica-server", REPLICA, "--replica-port", str(port2),
                "--thumbprint", thumbs[PRIMARY], "--frequency", "30", "--no-compression")
        points2 = storage2 / vm_id.lower()

        def kept():
            return sorted(int(f.stem[1:]) for f in points2.glob("p*.json"))

        print("initial replication (the full re-seed it is compared with) ...", flush=True)
        drop_caches()
        t = time.monotonic()
        hv1.cli("start", "fb01")
        hv1.cli("suspend", "fb01")
        wait(lambda: kept() == [1] and "Replicating" in hv2.cli("status"), 3600, "point 1 applied")
        reseed_secs = time.monotonic() - t
        reseed_bytes = json.loads((points2 / f"p{1:020}.json").read_text())["log_bytes"]
        rows.append(("full re-seed (initial replication over TLS)", reseed_secs, reseed_bytes))

        # One delta, so that the failover point is a delta's; then hv1 is lost with its own writes.
        hv1.cli("resume", "fb01")
        sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 1M", image)
        wait(lambda: kept()[-1] > 1, 600, "a delta")
        hv1.cli("suspend", "fb01")
        time.sleep(1)
        blocks = max(1, int(size * args.divergence) // BLOCK)
        print(f"divergence: {blocks} random 64 KiB blocks on each side ...", flush=True)
        a = scatter(image, blocks, 1, work / "noise")
        a_before = work / "hv1-before.raw"
        sh("qemu-img", "convert", "-O", "raw", image, a_before)
        hv1.stop()

        hv2.cli("failover", "fb01")
        (overlay,) = [d for v in json.loads(hv2.cli("--output", "json", "vm", "list"))["vms"]
                      if v["name"] == "fb01" for d in v["disks"]]
        b1 = scatter(Path(overlay), blocks // 2, 2, work / "noise")
        hv2.cli("complete", "fb01")
        (new_disk,) = [d for v in json.loads(hv2.cli("--output", "json", "vm", "list"))["vms"]
                       if v["name"] == "fb01" for d in v["disks"]]
        b2 = scatter(Path(new_disk), blocks - blocks // 2, 3, work / "noise")
        divergent = len(set(a) | set(b1) | set(b2)) * BLOCK

        if args.resync:
            hv2.cli("reverse", "fb01", "--replica-server", PRIMARY, "--replica-port", str(port1),
                    "--thumbprint", thumbs[REPLICA])
        hv1 = Host(work / "hv1", PRIMARY, hv1_args)
        print("resync ..." if args.resync else "failback ...", flush=True)
        drop_caches()
        t = time.monotonic()
        if args.resync:
            hv2.cli("resync", "fb01")
            wait(lambda: "resynchronization applied" in hv1.log.read_text(), 600, "the resync applied")
        else:
            hv1.cli("failback", "fb01")
        failback_secs = time.monotonic() - t
        measured = json.loads(hv2.cli("--output", "json", "measure", "fb01"))
        failback_bytes = measured.get("replication_size", 0)
        jobs = json.loads((hv2 if args.resync else hv1).cli("--output", "json", "job", "list"))["jobs"]
        said = [j["description"] for j in jobs if j.get("job_type") == (107 if args.resync else 124)][-1:]
        rows.append(("vmreplica reverse + Resynchronize" if args.resync else "vmreplica failback (InitiateFailback)",
                     failback_secs, failback_bytes))
        last = max(int(f.stem[1:]) for f in (storage1 / vm_id.lower()).glob("p*.json"))
        layer = storage1 / vm_id.lower() / "disk0" / f"p{last:020}.qcow2"
        same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(layer), new_disk],
                              capture_output=True, text=True).returncode == 0
        hv1.stop()
        hv2.stop()

        # rsync: hv2's disk (raw) onto hv1's disk as it was (raw), over loopback.
        b_raw = work / "hv2.raw"
        sh("qemu-img", "convert", "-O", "raw", new_disk, b_raw)
        dest = work / "rsync-dest"
        dest.mkdir()
        a_before.rename(dest / "hv2.raw")
        rport = free_port()
        conf = work / "rsyncd.conf"
        conf.write_text(f"use chroot = no\nuid = root\ngid = root\n[dest]\npath = {dest}\nread only = no\n")
        rsyncd = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--port={rport}", f"--config={conf}"])
        try:
            wait(lambda: listening(rport), 20, "rsyncd")
            drop_caches()
            t = time.monotonic()
            out = sh("rsync", "--inplace", "--no-whole-file", "--stats", str(b_raw),
                     f"rsync://127.0.0.1:{rport}/dest/").stdout
            rows.append(("rsync --inplace of the raw image over loopback", time.monotonic() - t, rsync_bytes(out)))
        finally:
            rsyncd.terminate()
    finally:
        for h in (hv1, hv2):
            try:
                h.stop()
            except Exception:  # noqa: BLE001
                pass

    print()
    print(f"{'Reverse + resync' if args.resync else 'Failback'} of a {args.size} disk, {blocks} random 64 KiB blocks written on each side "
          f"({divergent} divergent bytes); hv1's disk equals hv2's afterwards: {same}")
    if said:
        print(f"job: {said[0]}")
    print(f"| {'':48} | {'s':>7} | {'bytes sent':>13} | {'bytes / divergent':>17} | {'time / re-seed':>14} |")
    print(f"|{'-' * 50}|{'-' * 9}|{'-' * 15}|{'-' * 19}|{'-' * 16}|")
    for name, secs, sent in rows:
        print(f"| {name:48} | {secs:7.2f} | {sent:13} | {sent / divergent:16.2f}x | {secs / reseed_secs:13.3f}x |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
