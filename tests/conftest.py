"""Fixtures that start real vmreplicad processes on loopback and talk to them the way outside tools do."""

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import pywbem

ROOT = Path(__file__).resolve().parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"
DAEMON = TARGET / "vmreplicad"
CLI = TARGET / "vmreplica"
NAMESPACE = "root/virtualization/v2"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """One vmreplicad process with its own data directory."""

    def __init__(self, data_dir, host_name="hv1.example.org", extra_args=()):
        self.data_dir = Path(data_dir)
        self.extra_args = list(extra_args)
        self.host_name = host_name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log = self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self):
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [str(DAEMON), "--data-dir", str(self.data_dir), "--cim-listen", f"127.0.0.1:{self.port}",
             "--host-name", self.host_name, *self.extra_args],
            stdout=log, stderr=log,
        )
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vmreplicad exited: {self.log.read_text()}")
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("vmreplicad did not start")

    def stop(self):
        """SIGTERM, and the daemon must exit cleanly (status 0)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(timeout=20)
            assert code == 0, f"vmreplicad exited with {code}: {self.log.read_text()}"
        self.proc = None

    def restart(self):
        self.stop()
        return self.start()

    def conn(self):
        return pywbem.WBEMConnection(self.url, default_namespace=NAMESPACE, timeout=30)

    def cli(self, *args, check=True):
        res = subprocess.run([str(CLI), "--url", self.url, *args], capture_output=True, text=True, timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"vmreplica {args} failed ({res.returncode}): {res.stderr}")
        return res

    def add_vm(self, name, disks):
        res = self.cli("vm", "add", "--name", name, *sum((["--disk", str(d)] for d in disks), []))
        return res.stdout.strip()


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "data").start()
    yield d
    d.stop()


@pytest.fixture
def disk(tmp_path):
    """A real qcow2 image made by qemu-img."""
    def make(name="disk0.qcow2", size="64M", fmt="qcow2"):
        path = tmp_path / name
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
        return path
    return make


def wait_job(conn, job_path, timeout=20):
    """Polls an Msvm_ConcreteJob as Microsoft's sample does, until JobState is terminal (>= 7)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = conn.GetInstance(job_path)
        if job["JobState"] >= 7:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_path} did not finish")
