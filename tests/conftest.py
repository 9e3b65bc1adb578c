"""Fixtures that start real vmreplicad processes on loopback and talk to them the way outside tools do."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
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


_HANDED_OUT = set()


def free_port():
    """A port free now, never one handed out before in this session: two daemons given the same
    port would not both listen, and the second's health check would reach the first."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


LAB_HOSTS = ("hv1.example.org", "hv2.example.org", "replica.example.org")
_LAB = {}


def lab():
    """One lab CA for the test session (`vmreplica cert new`): (directory, {host: thumbprint})."""
    if not _LAB:
        out = Path(tempfile.mkdtemp(prefix="vmreplica-lab-"))
        args = [str(CLI), "--output", "json", "cert", "new", "--out", str(out)]
        for h in LAB_HOSTS:
            args += ["--host", h]
        doc = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
        _LAB["dir"] = out
        _LAB["thumbs"] = {h["host"]: h["thumbprint"] for h in doc["hosts"]}
    return _LAB["dir"], _LAB["thumbs"]


def thumbprint(host="hv1.example.org"):
    """The thumbprint of the lab certificate of `host` (installed in that host's daemon)."""
    return lab()[1][host]


def wait_port(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


class Daemon:
    """One vmreplicad process with its own data directory. A host named like one of the lab's gets
    that lab certificate in its store. With `replica=True` a companion recovery server,
    replica.example.org, accepts every primary, and this daemon reaches it under that name on any
    port (`--resolve`), so relationships can be created as with a real recovery server."""

    def __init__(self, data_dir, host_name="hv1.example.org", extra_args=(), replica=False):
        self.data_dir = Path(data_dir)
        self.extra_args = list(extra_args)
        self.want_replica = replica
        self.replica = None
        self.replica_args = []
        self.host_name = host_name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log = self.data_dir.parent / f"{self.data_dir.name}.log"

    def install_certs(self):
        certs = self.data_dir / "certs"
        if self.host_name in LAB_HOSTS and not certs.exists():
            shutil.copytree(lab()[0] / self.host_name / "certs", certs)

    def serve_replication(self, storage, port=None, primary="*"):
        """Makes this daemon a recovery server for `primary` with its lab certificate; returns its port."""
        port = port or free_port()
        self.cli("server", "set", "--enable", "--thumbprint", thumbprint(self.host_name), "--https-port", str(port))
        Path(storage).mkdir(parents=True, exist_ok=True)
        added = self.cli("auth", "add", "--primary", primary, "--storage", str(storage), check=False)
        if added.returncode != 0:  # restarted with its data: the entry is there already
            self.cli("auth", "modify", "--primary", primary, "--storage", str(storage))
        wait_port(port)
        return port

    def start(self):
        self.install_certs()
        if self.want_replica and self.replica is None:
            self.replica = Daemon(self.data_dir.parent / f"{self.data_dir.name}-replica", "replica.example.org",
                                  ["--replication-address", "127.0.0.1"]).start()
            port = self.replica.serve_replication(self.data_dir.parent / f"{self.data_dir.name}-replicas")
            self.replica_args = ["--resolve", f"replica.example.org=127.0.0.1:{port}"]
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [str(DAEMON), "--data-dir", str(self.data_dir), "--cim-listen", f"127.0.0.1:{self.port}",
             "--host-name", self.host_name, *self.extra_args, *self.replica_args],
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

    def stop(self, companion=True):
        """SIGTERM, and the daemon must exit cleanly (status 0); its companion replica too."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(timeout=20)
            assert code == 0, f"vmreplicad exited with {code}: {self.log.read_text()}"
        self.proc = None
        if companion and self.replica:
            self.replica.stop()
            self.replica = None

    def restart(self):
        self.stop(companion=False)
        return self.start()

    def conn(self):
        return pywbem.WBEMConnection(self.url, default_namespace=NAMESPACE, timeout=30)

    def cli(self, *args, check=True, timeout=60):
        res = subprocess.run([str(CLI), "--url", self.url, *args], capture_output=True, text=True,
                             timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"vmreplica {args} failed ({res.returncode}): {res.stderr}")
        return res

    def add_vm(self, name, disks):
        res = self.cli("vm", "add", "--name", name, *sum((["--disk", str(d)] for d in disks), []))
        return res.stdout.strip()


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "data", replica=True).start()
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
