"""Two real daemons replicating over the host-to-host protocol (docs/protocol.md): HTTP/2 over TLS 1.3
with certificates from `vmreplica cert new` on both sides, the recovery server's authorization table,
TestReplicationConnection and initial replication over the network driven by pywbem, and a raw peer
(httpx over HTTP/2 with a client certificate) that sends what a broken or hostile primary would."""

import json
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
from pywbem import CIMDateTime, Uint16

from conftest import CLI, Daemon, free_port, wait_job

PRIMARY, REPLICA = "hv1.lab.example", "hv2.lab.example"
CYCLE = 1  # seconds between delta cycles in these tests (ReplicationInterval's 30 s is too slow)


def run(*cmd):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True)


def cert_new(out, *hosts):
    """`vmreplica cert new`; returns {host: thumbprint}."""
    args = [CLI, "--output", "json", "cert", "new", "--out", out]
    for h in hosts:
        args += ["--host", h]
    doc = json.loads(run(*args).stdout)
    return {h["host"]: h["thumbprint"] for h in doc["hosts"]}


def install_cert(ca_dir, host, thumbprint, data_dir):
    """Copies one issued certificate and key into a daemon's certificate store."""
    src = ca_dir / host / "certs"
    dst = data_dir / "certs"
    dst.mkdir(parents=True, exist_ok=True)
    for ext in ("pem", "key"):
        shutil.copy2(src / f"{thumbprint.lower()}.{ext}", dst / f"{thumbprint.lower()}.{ext}")


def ext4_disk(path, payload_bytes=2_000_000):
    raw = path.with_suffix(".raw")
    run("truncate", "-s", "64M", raw)
    run("mkfs.ext4", "-q", "-F", raw)
    src = path.parent / f"{path.stem}-payload.bin"
    src.write_bytes(bytes((j * 13) % 251 for j in range(payload_bytes)))
    run("debugfs", "-w", "-R", f"write {src} payload", raw)
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path)
    raw.unlink()
    return path


def wait_port(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


class Lab:
    pass


@pytest.fixture
def lab(tmp_path):
    lab = Lab()
    lab.ca = tmp_path / "lab-ca"
    thumbs = cert_new(lab.ca, PRIMARY, REPLICA)
    lab.t1, lab.t2 = thumbs[PRIMARY], thumbs[REPLICA]
    lab.port = free_port()
    # Symmetric, so that a reverse (issue 5) can make either host the primary.
    lab.primary = Daemon(tmp_path / "hv1", PRIMARY, ["--resolve", f"{REPLICA}=127.0.0.1",
                                                     "--cycle-interval-override", str(CYCLE),
                                                     "--replication-address", "127.0.0.1"])
    lab.replica = Daemon(tmp_path / "hv2", REPLICA, ["--replication-address", "127.0.0.1",
                                                     "--resolve", f"{PRIMARY}=127.0.0.1",
                                                     "--cycle-interval-override", str(CYCLE)])
    shutil.copytree(lab.ca / PRIMARY / "certs", lab.primary.data_dir / "certs")
    shutil.copytree(lab.ca / REPLICA / "certs", lab.replica.data_dir / "certs")
    lab.primary.start()
    lab.replica.start()
    lab.storage = tmp_path / "replica-storage"
    lab.storage.mkdir()

    r = lab.replica.conn()
    svc = r.EnumerateInstances("Msvm_ReplicationService")[0]
    s = r.EnumerateInstances("Msvm_ReplicationServiceSettingData")[0]
    s["RecoveryServerEnabled"] = True
    s["AllowedAuthenticationType"] = Uint16(2)
    s["CertificateThumbPrint"] = lab.t2
    s["HttpsPort"] = Uint16(lab.port)
    rv, out = r.InvokeMethod("ModifyServiceSettings", svc.path, SettingData=s.tocimxmlstr())
    assert rv == 4096 and wait_job(r, out["Job"])["JobState"] == 7
    lab.replica.cli("auth", "add", "--primary", "*.lab.example", "--storage", str(lab.storage))
    wait_port(lab.port)
    yield lab
    lab.primary.stop()
    lab.replica.stop()


def connection_test(conn, port, thumbprint):
    svc = conn.EnumerateInstances("Msvm_ReplicationService")[0]
    rv, out = conn.InvokeMethod("TestReplicationConnection", svc.path, RecoveryConnectionPoint=REPLICA,
                                RecoveryServerPortNumber=Uint16(port), AuthenticationType=Uint16(2),
                                CertificateThumbPrint=thumbprint, BypassProxyServer=False)
    assert rv == 4096
    return wait_job(conn, out["Job"])


def vm_by_name(conn, name):
    found = conn.ExecQuery("WQL", f"SELECT * FROM Msvm_ComputerSystem WHERE ElementName = '{name}'")
    return found[0] if found else None


def wait_for(predicate, timeout=30, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_certificate_for_a_thumbprint_not_in_the_store_is_refused(lab):
    r = lab.replica.conn()
    svc = r.EnumerateInstances("Msvm_ReplicationService")[0]
    s = r.EnumerateInstances("Msvm_ReplicationServiceSettingData")[0]
    s["CertificateThumbPrint"] = "ab" * 20
    rv, _ = r.InvokeMethod("ModifyServiceSettings", svc.path, SettingData=s.tocimxmlstr())
    assert rv == 32773


def test_stopping_the_listener_sends_goaway_to_open_connections_and_starting_it_again_serves(lab):
    hello = {"protocol_versions": [1], "log_format_versions": [1], "capabilities": [], "product": "t",
             "host": PRIMARY}
    r = lab.replica.conn()
    svc = r.EnumerateInstances("Msvm_ReplicationService")[0]

    def recovery_server(enabled):
        s = r.EnumerateInstances("Msvm_ReplicationServiceSettingData")[0]
        s["RecoveryServerEnabled"] = enabled
        rv, out = r.InvokeMethod("ModifyServiceSettings", svc.path, SettingData=s.tocimxmlstr())
        assert rv == 4096 and wait_job(r, out["Job"])["JobState"] == 7

    with raw_peer(lab) as c:
        assert c.post("/vmreplica/hello", json=hello).status_code == 200
        recovery_server(False)
        wait_for(lambda: "replication listener stopped" in lab.replica.log.read_text(), what="the stop")
        # The connection opened before got GOAWAY: nothing new is served on it, and no new
        # connection is accepted.
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):
            c.post("/vmreplica/hello", json=hello)
    recovery_server(True)
    wait_port(lab.port)
    with raw_peer(lab) as c:
        assert c.post("/vmreplica/hello", json=hello).status_code == 200


def test_network_initial_replication_of_a_real_filesystem(lab, tmp_path):
    p = lab.primary.conn()
    job = connection_test(p, lab.port, lab.t1)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert job["JobType"] == 115
    assert list(lab.storage.iterdir()) == []  # the probe file is gone again

    vm_id = str(uuid.uuid4()).upper()
    disk = ext4_disk(tmp_path / "web01.qcow2")
    lab.primary.cli("vm", "add", "--name", "web01", "--id", vm_id, "--disk", str(disk))
    svc = p.EnumerateInstances("Msvm_ReplicationService")[0]
    vm = vm_by_name(p, "web01")
    rsd = p.Associators(vm.path, ResultClass="Msvm_ReplicationSettingData")[0]
    rsd["RecoveryConnectionPoint"] = REPLICA
    rsd["RecoveryServerPortNumber"] = Uint16(lab.port)
    rsd["AuthenticationType"] = Uint16(2)
    rsd["CertificateThumbPrint"] = lab.t1
    rv, out = p.InvokeMethod("CreateReplicationRelationship", svc.path, ComputerSystem=vm.path,
                             ReplicationSettingData=rsd.tocimxmlstr())
    assert rv == 4096 and wait_job(p, out["Job"])["JobState"] == 7

    rv, out = p.InvokeMethod("StartReplication", svc.path, ComputerSystem=vm.path,
                             InitialReplicationType=Uint16(1))
    assert rv == 4096
    job = wait_job(p, out["Job"], timeout=120)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert job["JobType"] == 94 and job["PercentComplete"] == 100
    rel = p.Associators(vm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
    assert rel["ReplicationState"] == 3 and rel["LastReplicationTime"] is not None

    # The placeholder replica: same GUID, mode Replica, applied asynchronously to state 3.
    r = lab.replica.conn()
    rvm = wait_for(lambda: vm_by_name(r, "web01"), what="the replica VM")
    assert rvm["Name"] == vm_id and rvm["ReplicationMode"] == 2

    def applied():
        rrel = r.Associators(rvm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
        return rrel if rrel["ReplicationState"] == 3 and rrel["LastApplyTime"] is not None else None
    rrel = wait_for(applied, what="the initial replica to be applied")
    assert rrel["LastReplicationTime"] is not None
    # Deltas follow every CYCLE s, and each one's apply prunes the point before (RecoveryHistory 0)
    # by merging the new one down into it: suspended and settled, the store holds still.
    rrsc(p, vm, 7)
    seq = settled(lab, vm_id)
    points = r.Associators(rvm.path, ResultClass="Msvm_VirtualSystemSettingData")
    assert len(points) == 1 and points[0]["VirtualSystemIdentifier"] == vm_id

    layer = lab.storage / vm_id.lower() / "disk0" / f"p{seq:020}.qcow2"
    res = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(layer), str(disk)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert subprocess.run(["qemu-img", "check", str(layer)], capture_output=True).returncode == 0
    assert list((lab.storage / vm_id.lower() / "incoming").iterdir()) == []
    # The log was sent from memory: the primary made no spool (not even its directory).
    assert not (lab.primary.data_dir / "outgoing" / vm_id).exists()
    rrsc(p, vm, 3)

    # The state machine refuses a second initial replication; the CLI's connection test passes.
    rv, _ = p.InvokeMethod("StartReplication", svc.path, ComputerSystem=vm.path, InitialReplicationType=Uint16(1))
    assert rv == 32775
    res = lab.primary.cli("test-connection", "--replica-server", REPLICA, "--replica-port", str(lab.port),
                          "--thumbprint", lab.t1)
    assert "Completed" in res.stdout


def test_unknown_ca_and_disallowed_names_are_refused_and_nothing_is_written(lab, tmp_path):
    p = lab.primary.conn()
    # Same host name, but issued by a CA the recovery server does not trust: refused at TLS.
    rogue_ca = tmp_path / "rogue-ca"
    rogue = cert_new(rogue_ca, PRIMARY)[PRIMARY]
    install_cert(rogue_ca, PRIMARY, rogue, lab.primary.data_dir)
    job = connection_test(p, lab.port, rogue)
    assert job["JobState"] == 10 and job["ErrorCode"] == 32769, job["ErrorDescription"]

    # A trusted CA, but a name no authorization entry allows: refused by the table.
    other_ca = tmp_path / "other-ca"
    other = cert_new(other_ca, "x.other.org")["x.other.org"]
    install_cert(other_ca, "x.other.org", other, lab.primary.data_dir)
    shutil.copy2(other_ca / "ca" / "ca.pem", lab.replica.data_dir / "certs" / "trusted" / "other-ca.pem")
    lab.replica.restart()
    wait_port(lab.port)
    job = connection_test(p, lab.port, other)
    assert job["JobState"] == 10 and job["ErrorCode"] == 32769, job["ErrorDescription"]
    assert "authorization entry" in job["ErrorDescription"]

    # The right certificate still works, so the refusals above were about the certificates.
    job = connection_test(p, lab.port, lab.t1)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert list(lab.storage.iterdir()) == []
    log = lab.replica.log.read_text()
    assert "NoMatchingEntry" in log and "TLS handshake" in log


def raw_peer(lab):
    """An HTTP/2 client presenting the primary's certificate, as a hostile primary would."""
    return peer_as(lab, lab.primary.data_dir / "certs", lab.t1, lab.port)


def peer_as(lab, certs, thumbprint, port, keepalive=5.0):
    """An HTTP/2 client to 127.0.0.1:`port` presenting certificate `thumbprint` from `certs`,
    keeping an idle connection open for `keepalive` seconds."""
    ctx = ssl.create_default_context(cafile=str(lab.ca / "ca" / "ca.pem"))
    ctx.check_hostname = False  # it dials 127.0.0.1; the server is not what is under test here
    ctx.load_cert_chain(certs / f"{thumbprint.lower()}.pem", certs / f"{thumbprint.lower()}.key")
    return httpx.Client(http2=True, verify=ctx, base_url=f"https://127.0.0.1:{port}", timeout=30,
                        limits=httpx.Limits(keepalive_expiry=keepalive))


def intruder(lab):
    """A third host's certificate from the lab CA, hv3.lab.example, which the recovery server's
    `*.lab.example` entry allows: (its certificates directory, its thumbprint)."""
    host = "hv3.lab.example"
    return lab.ca / host / "certs", cert_new(lab.ca, host)[host]


def put_body(name, disks):
    return {"name": name, "primary_connection_point": PRIMARY, "initial_replication_type": 1,
            "disks": [{"id": i, "virtual_size": s} for i, s in disks],
            "settings": {"replication_interval": 30, "recovery_history": 0,
                         "application_consistent_snapshot_interval": 0, "compression_enabled": True}}


def test_a_hostile_peer_gets_clear_errors_and_writes_nothing_outside_the_store(lab, tmp_path):
    with raw_peer(lab) as c:
        hello = c.post("/vmreplica/hello", json={"protocol_versions": [1], "log_format_versions": [1],
                                                 "capabilities": ["zstd", "future-thing"], "product": "test",
                                                 "host": PRIMARY})
        assert hello.http_version == "HTTP/2" and hello.status_code == 200, hello.text
        assert hello.json()["authorized_as"] == PRIMARY and hello.json()["capabilities"] == ["zstd"]
        # Every feature this build has is offered (docs/protocol.md §3); `extended` is reserved.
        every = ["zstd", "resume", "seeded-compare", "planned-failover", "reverse", "failback", "resync-commit",
                 "seeded-again", "seeded-kept", "extended"]
        all_of_them = c.post("/vmreplica/hello", json={"protocol_versions": [1], "log_format_versions": [1],
                                                       "capabilities": every, "product": "test", "host": PRIMARY})
        assert sorted(all_of_them.json()["capabilities"]) == sorted(every[:-1]), all_of_them.text
        nothing_common = c.post("/vmreplica/hello", json={"protocol_versions": [9], "log_format_versions": [1],
                                                          "capabilities": [], "product": "", "host": ""})
        assert nothing_common.status_code == 400
        assert nothing_common.json()["error"]["name"] == "UnsupportedVersion"
        assert nothing_common.json()["error"]["versions"] == [1]

        for path in ["/vmreplica/v1/vms/..%2F..%2Fetc", "/vmreplica/v1/vms/not-a-guid",
                     "/vmreplica/v1/vms/{5c3e4e2a-9f1b-4d5e-8a7b-1c2d3e4f5a6b}"]:
            res = c.put(path, json=put_body("x", [("disk0", 1 << 20)]))
            assert res.status_code == 400 and res.json()["error"]["name"] == "BadRequest", path
        assert c.post("/vmreplica/v2/test", json={}).json()["error"]["name"] == "UnsupportedVersion"
        assert c.post(f"/vmreplica/v1/vms/{uuid.uuid4()}/reverse").status_code == 404

        # Names from the peer stay text: files appear only below <storage>/<vm-guid>/.
        vm = uuid.uuid4()
        res = c.put(f"/vmreplica/v1/vms/{vm}", json=put_body("../../etc/x", [("../../root/k", 1 << 20)]))
        assert res.status_code == 201, res.text
        assert res.json()["mode"] == 2 and res.json()["state"] == 2
        assert sorted(p.name for p in lab.storage.iterdir()) == [str(vm)]
        assert not (tmp_path / "etc").exists()
        again = c.put(f"/vmreplica/v1/vms/{vm}", json=put_body("renamed", [("../../root/k", 1 << 20)]))
        assert again.status_code == 200 and again.json()["name"] == "renamed"
        # A link planted where a VM's folder goes: refused before anything is made through it.
        planted, elsewhere = uuid.uuid4(), tmp_path / "elsewhere"
        elsewhere.mkdir()
        (lab.storage / str(planted)).symlink_to(elsewhere)
        res = c.put(f"/vmreplica/v1/vms/{planted}", json=put_body("linked", [("disk0", 1 << 20)]))
        assert res.status_code == 403 and res.json()["error"]["name"] == "AccessDenied", res.text
        assert list(elsewhere.iterdir()) == []
        (lab.storage / str(planted)).unlink()

        bad = c.put(f"/vmreplica/v1/vms/{uuid.uuid4()}", json={**put_body("y", [("d", 1)]), "extra": 1})
        assert bad.status_code == 400
        dup = c.put(f"/vmreplica/v1/vms/{uuid.uuid4()}", json=put_body("y", [("d", 1), ("d", 2)]))
        assert dup.status_code == 400 and dup.json()["error"]["field"] == "disks"
        huge = c.put(f"/vmreplica/v1/vms/{uuid.uuid4()}", content=b" " * (65 * 1024),
                     headers={"content-type": "application/json"})
        assert huge.status_code == 413

        # Logs: garbage is rejected and deleted, a jump in sequence is refused before any byte is kept.
        headers = {"vmreplica-upload-id": str(uuid.uuid4()), "vmreplica-upload-offset": "0"}
        res = c.patch(f"/vmreplica/v1/vms/{vm}/logs/1", content=b"not a log" * 100, headers=headers)
        assert res.status_code == 422 and res.json()["error"]["name"] == "LogRejected", res.text
        res = c.patch(f"/vmreplica/v1/vms/{vm}/logs/5", content=b"x", headers=headers)
        assert res.status_code == 409 and res.json()["error"]["expected_sequence"] == 1
        res = c.get(f"/vmreplica/v1/vms/{vm}/logs/1")
        assert res.status_code == 404 and res.json()["error"]["name"] == "UnknownLog"
        assert list((lab.storage / str(vm) / "incoming").iterdir()) == []

        unknown = c.get(f"/vmreplica/v1/vms/{uuid.uuid4()}")
        assert unknown.status_code == 404 and unknown.json()["error"]["name"] == "UnknownVm"

    # The daemon kept serving through all of it.
    assert lab.replica.cli("status").returncode == 0


def export_log(lab, tmp_path, name):
    """A real full-image log of a VM holding ext4, made by the primary's export (StartReplication 2)."""
    vm_id = str(uuid.uuid4()).upper()
    disk = ext4_disk(tmp_path / f"{name}.qcow2")
    lab.primary.cli("vm", "add", "--name", name, "--id", vm_id, "--disk", str(disk))
    lab.primary.cli("enable", name, "--replica-server", REPLICA, "--replica-port", str(lab.port),
                    "--thumbprint", lab.t1)
    out = tmp_path / "export"
    lab.primary.cli("start", name, "--type", "export", "--path", str(out))
    size = int(json.loads(run("qemu-img", "info", "--output=json", disk).stdout)["virtual-size"])
    return uuid.UUID(vm_id), disk, size, (out / f"{name}_{vm_id}" / "initial-replica.vrlog").read_bytes()


def test_uploads_are_verified_committed_once_and_applied(lab, tmp_path):
    vm, disk, size, log = export_log(lab, tmp_path, "db01")
    # hv1 waits for the import of its export and would ship deltas (each pruning the point before)
    # once the log below is committed; this test plays the primary itself.
    lab.primary.stop(companion=False)
    with raw_peer(lab) as c:
        # Enabling on the primary created the placeholder; a PUT of the same description updates it.
        assert c.put(f"/vmreplica/v1/vms/{vm}", json=put_body("db01", [("disk0", size)])).status_code == 200

        def patch(body, upload=None, seq=1):
            upload = upload or str(uuid.uuid4())
            return upload, c.patch(f"/vmreplica/v1/vms/{vm}/logs/{seq}", content=body,
                                   headers={"vmreplica-upload-id": upload, "vmreplica-upload-offset": "0"})

        flipped = bytearray(log)
        flipped[len(log) // 2] ^= 0x40
        _, res = patch(bytes(flipped))
        assert res.status_code == 422 and res.json()["error"]["name"] == "ChecksumMismatch", res.text
        _, res = patch(log[: len(log) - 100])
        assert res.status_code in (409, 422), res.text
        assert list((lab.storage / str(vm).lower() / "incoming").iterdir()) == []

        # Log 1 into an empty store is written into its layers as it arrives (a staged upload).
        # Cut off mid-body (the connection closes), it is kept in memory at the exact byte it
        # reached, not at a record boundary, and continues there under the same upload id.
        import threading
        upload = str(uuid.uuid4())
        cut = len(log) // 2 + 7
        incoming = lab.storage / str(vm).lower() / "incoming"
        give_up = threading.Event()

        def half():
            yield log[:cut]
            give_up.wait(30)
            raise RuntimeError("the primary gives up mid-body")

        def send_half():
            with raw_peer(lab) as gone:  # leaving it closes the connection
                try:
                    gone.patch(f"/vmreplica/v1/vms/{vm}/logs/1", content=half(),
                               headers={"vmreplica-upload-id": upload, "vmreplica-upload-offset": "0"})
                except RuntimeError:
                    pass

        sender = threading.Thread(target=send_half)
        sender.start()
        # The header arrived and the layer exists: the upload is being staged. Then the connection goes.
        wait_for(lambda: any(f.name.endswith(".layer") for f in incoming.iterdir()) if incoming.exists() else False,
                 what="the staged layer")
        time.sleep(0.5)
        give_up.set()
        sender.join(30)
        status = wait_for(lambda: (lambda r: r.json() if r.status_code == 200 else None)(
            c.get(f"/vmreplica/v1/vms/{vm}/logs/1")), what="the staged upload kept")
        assert status["state"] == 1 and status["upload_id"] == upload and status.get("prefix_hash") is None
        kept = status["offset"]
        assert 0 < kept <= cut
        # Its layer, and the runs file its checkpoints count (none yet: the log is under 4 MiB).
        assert sorted(f.suffix for f in incoming.iterdir()) == [".layer", ".runs"]
        wrong = c.patch(f"/vmreplica/v1/vms/{vm}/logs/1", content=log[kept + 1:],
                        headers={"vmreplica-upload-id": upload, "vmreplica-upload-offset": str(kept + 1)})
        assert wrong.status_code == 409 and wrong.json()["error"]["name"] == "OffsetMismatch"
        assert wrong.json()["error"]["offset"] == kept
        res = c.patch(f"/vmreplica/v1/vms/{vm}/logs/1", content=log[kept:],
                      headers={"vmreplica-upload-id": upload, "vmreplica-upload-offset": str(kept)})
        assert res.status_code == 200, res.text
        status = res.json()
        assert status["state"] == 2 and status["log_bytes"] == len(log)
        log_hash = status["log_hash"]
        bad = c.post(f"/vmreplica/v1/vms/{vm}/logs/1/commit",
                     json={"upload_id": upload, "log_hash": "0" * 64, "log_bytes": len(log), "wait_applied": False})
        assert bad.status_code == 409 and bad.json()["error"]["name"] == "SequenceConflict"
        done = c.post(f"/vmreplica/v1/vms/{vm}/logs/1/commit",
                      json={"upload_id": upload, "log_hash": log_hash, "log_bytes": len(log), "wait_applied": True})
        assert done.status_code == 200 and done.json()["state"] == 4, done.text

        # A re-sent committed log is acknowledged, never applied twice; another log under that
        # sequence is a conflict.
        _, res = patch(log)
        assert res.status_code == 200 and res.json()["state"] == 4 and res.json()["log_hash"] == log_hash
        res = c.patch(f"/vmreplica/v1/vms/{vm}/logs/1", content=log,
                      headers={"vmreplica-upload-id": str(uuid.uuid4()), "vmreplica-upload-offset": "0",
                               "vmreplica-log-hash": "1" * 64})
        assert res.status_code == 409 and res.json()["error"]["name"] == "SequenceConflict"
        described = c.get(f"/vmreplica/v1/vms/{vm}").json()
        assert described["last_committed"]["sequence"] == 1 and described["last_applied_sequence"] == 1
        assert described["state"] == 3
        # The staged layer became point 1: nothing is left in incoming/.
        assert list(incoming.iterdir()) == []

    layers = sorted((lab.storage / str(vm).lower() / "disk0").glob("p*.qcow2"))
    assert len(layers) == 1
    res = subprocess.run(["qemu-img", "compare", "-F", "qcow2", str(layers[0]), str(disk)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def rrsc(conn, vm, state):
    rv, out = conn.InvokeMethod("RequestReplicationStateChange", vm.path, RequestedState=Uint16(state))
    assert rv == 4096, rv
    job = wait_job(conn, out["Job"], timeout=60)
    assert job["JobState"] == 7, job["ErrorDescription"]


def remove_relationship(conn, name):
    """RemoveReplicationRelationshipEx of VM `name` through pywbem, as Remove-VMReplication calls
    it; returns (the VM's path, its finished job)."""
    svc = conn.EnumerateInstances("Msvm_ReplicationService")[0]
    vm = vm_by_name(conn, name)
    rel = conn.Associators(vm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
    rv, out = conn.InvokeMethod("RemoveReplicationRelationshipEx", svc.path, ComputerSystem=vm.path,
                                ReplicationRelationship=rel.tocimxmlstr())
    assert rv == 4096, rv
    return vm.path, wait_job(conn, out["Job"], timeout=60)


def enable_running(lab, name, disk, qsd):
    """Defines `name` on the primary as a running VM whose QEMU process is `qsd` (its QMP socket,
    and its own NBD server when it has one) holding `disk`, and enables it without compression;
    returns its id."""
    vm_id = str(uuid.uuid4()).upper()
    served = ["--nbd-socket", str(qsd.guest)] if qsd.guest.exists() else []
    lab.primary.cli("vm", "add", "--name", name, "--id", vm_id, "--disk", str(disk),
                    "--qmp-socket", str(qsd.qmp), *served)
    lab.primary.cli("enable", name, "--replica-server", REPLICA, "--replica-port", str(lab.port),
                    "--thumbprint", lab.t1, "--no-compression")
    return vm_id


def replicate_network(lab, tmp_path, name, disks, *enable_args):
    """Defines `name` on the primary with `disks`, enables it and runs network IR; returns its id."""
    vm_id = str(uuid.uuid4()).upper()
    lab.primary.cli("vm", "add", "--name", name, "--id", vm_id, *sum((["--disk", str(d)] for d in disks), []))
    lab.primary.cli("enable", name, "--replica-server", REPLICA, "--replica-port", str(lab.port),
                    "--thumbprint", lab.t1, "--frequency", "30", *enable_args)
    lab.primary.cli("start", name)
    return vm_id


def random_raw(path, size, data):
    """A raw disk of `size` (truncate's units) whose first `data` bytes are random; returns its path."""
    import os

    run("truncate", "-s", size, path)
    with open(path, "r+b") as f:
        f.write(os.urandom(data))
    return path


def applied_sequence(lab, vm_id):
    with raw_peer(lab) as c:
        return c.get(f"/vmreplica/v1/vms/{vm_id.lower()}").json()["last_applied_sequence"]


def shipped_since(lab, vm_id, t):
    """Waits until the replica applied a point taken after wall time `t` (a cycle that began after
    a write ending at `t` holds it; one already running when it was written may not); returns it."""
    def done():
        with raw_peer(lab) as c:
            d = c.get(f"/vmreplica/v1/vms/{vm_id.lower()}").json()
        last = d["last_committed"]
        fresh = last["point_time"] / 1e6 > t and d["last_applied_sequence"] >= last["sequence"]
        return last["sequence"] if fresh else None
    return wait_for(done, what="a point taken after the write")


def settled(lab, vm_id):
    """After a suspend: waits until every committed log is applied and the prune that follows each
    apply is over (no merge in progress, the points on disk unchanged for 0.5 s: a merge renames
    layers, so a reader opening a point's files by name meanwhile may miss one); returns the last
    sequence."""
    def done():
        with raw_peer(lab) as c:
            d = c.get(f"/vmreplica/v1/vms/{vm_id.lower()}").json()
        seq = d["last_committed"]["sequence"]
        return seq if d["pending_apply"] == 0 and d["last_applied_sequence"] == seq else None
    seq = wait_for(done, what="the replica to apply what it committed")
    store = lab.storage / vm_id.lower()

    def points():
        return None if (store / "merge.json").exists() else sorted(f.name for f in store.glob("p*.json"))

    def quiet():
        first = points()
        time.sleep(0.5)
        return first is not None and first == points()
    wait_for(quiet, what="the replica's prune to end")
    return seq


def plain_log(daemon):
    """A daemon's log without its terminal colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", daemon.log.read_text())


def file_size(path):
    """The size of `path`, 0 once it is gone (an upload's partial is renamed or deleted at any time)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def compare(a, b, fmt_b="raw", shared=False):
    """`qemu-img compare` of qcow2 `a` with `b` (format `fmt_b`; `shared`: without taking locks);
    (equal, what it printed)."""
    res = subprocess.run(["qemu-img", "compare", *(["-U"] if shared else []), "-f", "qcow2", "-F", fmt_b,
                          str(a), str(b)], capture_output=True, text=True)
    return res.returncode == 0, res.stdout + res.stderr


def latest_point_equals(store, other, fmt="raw", shared=False, at_least=0):
    """Waits until the latest point (at least `at_least`) of the point store `store` compares equal
    with `other`; returns its sequence. Replication may go on meanwhile (the tests call this while
    the other side writes nothing new): the next delta's apply and prune may hold or rename the
    latest layer for a moment, so a lock or a vanished file is asked again; any other difference
    fails at once."""
    def check():
        last = max(int(f.stem[1:]) for f in store.glob("p*.json"))
        if last < at_least:
            return None
        same, text = compare(store / "disk0" / f"p{last:020}.qcow2", other, fmt, shared)
        assert same or "lock" in text or "No such file" in text, text
        return last if same else None
    return wait_for(check, timeout=30, what="the latest point to compare")


def point_equals_running_disk(lab, vm_id, seq, qsd):
    """Point `seq` of disk 0 on the replica compares equal with the disk `qsd` serves over NBD."""
    layer = lab.storage / vm_id.lower() / "disk0" / f"p{seq:020}.qcow2"
    res = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(layer), qsd.url],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def latest_layers(lab, vm_id, seq):
    store = lab.storage / vm_id.lower()
    return [store / f"disk{i}" / f"p{seq:020}.qcow2" for i in range(2)]


def test_delta_cycles_suspend_and_resume_ship_exactly_the_primary_state(lab, tmp_path):
    os_disk = ext4_disk(tmp_path / "app01-os.qcow2")
    data_disk = tmp_path / "app01-data.raw"
    run("truncate", "-s", "32M", data_disk)
    vm_id = replicate_network(lab, tmp_path, "app01", [os_disk, data_disk], "--no-compression")
    p = lab.primary.conn()
    vm = vm_by_name(p, "app01")
    svc = p.EnumerateInstances("Msvm_ReplicationService")[0]
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="the first delta cycle")

    for k in range(1, 6):
        # Suspend: nothing is sent, and once the job is done no cycle is in flight.
        rrsc(p, vm, 7)
        assert vm_by_name(p, "app01")["ReplicationState"] == 7
        before = settled(lab, vm_id)  # what was committed before the suspend is applied
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {0x30 + k} {k}M 300k", "-c", f"write -z {20 + k}M 64k", os_disk)
        run("qemu-io", "-f", "raw", "-c", f"write -P {0x60 + k} {k * 3}M 1M", "-c", f"write -z {(k - 1) * 3}M 64k", data_disk)
        expected = [tmp_path / f"expected{k}-{i}.raw" for i in range(2)]
        run("qemu-img", "convert", "-O", "raw", os_disk, expected[0])
        shutil.copy(data_disk, expected[1])
        time.sleep(3 * CYCLE)  # three intervals while suspended: nothing arrives
        assert applied_sequence(lab, vm_id) == before
        rrsc(p, vm, 3)  # resume: the accumulated changes go with the next cycle
        seq = wait_for(lambda: applied_sequence(lab, vm_id) > before and applied_sequence(lab, vm_id),
                       what=f"the cycle after resume {k}")
        # Suspend again before comparing, so the point compared is the one just shipped and the
        # disks do not change meanwhile.
        rrsc(p, vm, 7)
        seq = settled(lab, vm_id)
        for layer, want in zip(latest_layers(lab, vm_id, seq), expected):
            res = subprocess.run(["qemu-img", "compare", "-F", "raw", str(layer), str(want)],
                                 capture_output=True, text=True)
            assert res.returncode == 0, f"cycle {k}, point {seq}: {res.stdout}{res.stderr}"
        rrsc(p, vm, 3)

    rv, out = p.InvokeMethod("GetReplicationStatisticsEx", svc.path, ComputerSystem=vm.path,
                             ReplicationRelationship=p.Associators(
                                 vm.path, AssocClass="Msvm_SystemReplicationRelationship")[0].tocimxmlstr())
    assert rv == 0
    stats = {k: (None if v is None else str(v)) for k, v in out["ReplicationStatistics"][0].items()}
    assert int(stats["ReplicationSuccessCount"]) >= 5
    # Only what changed travelled: the 5 x 1.3 MiB written (uncompressed, in 64 KiB blocks), plus
    # record overhead, not the disks.
    written = 5 * (300 * 1024 + (1 << 20))
    assert written <= int(stats["ReplicationSize"]) < written + 5 * (256 << 10), stats
    assert stats["ReplicationHealth"] == "1", stats
    rel = p.Associators(vm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
    assert rel["ReplicationState"] == 3 and rel["ReplicationHealth"] == 1
    # The replica counts what it received too (spec §10: per relationship, on both sides).
    r = lab.replica.conn()
    rvm = vm_by_name(r, vm["ElementName"])
    rsvc = r.EnumerateInstances("Msvm_ReplicationService")[0]
    rv, out = r.InvokeMethod("GetReplicationStatistics", rsvc.path, ComputerSystem=rvm.path)
    assert rv == 0
    received = out["ReplicationStatistics"][0]
    assert int(received["ReplicationSuccessCount"]) >= 5
    assert int(received["ReplicationSize"]) >= written, received["ReplicationSize"]


class Qsd:
    """qemu-storage-daemon holding a disk the way a running VM's QEMU does: QMP socket, and an NBD
    export through which the test "guest" writes."""

    def __init__(self, image, dir, fmt="qcow2", guest=True):
        """`guest`: an NBD server of the process's own (the guest's export) is running; else none,
        and vmreplica starts one."""
        self.qmp, self.guest = dir / "qmp.sock", dir / "guest.sock"
        for sock in (self.qmp, self.guest):
            sock.unlink(missing_ok=True)
        served = ["--nbd-server", f"addr.type=unix,addr.path={self.guest}",
                  "--export", "type=nbd,id=guest,node-name=disk0,name=guest,writable=on"]
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=file0,filename={image}",
             "--blockdev", f"driver={fmt},node-name=disk0,file=file0",
             *(served if guest else []),
             "--chardev", f"socket,id=qmp0,path={self.qmp},server=on,wait=off",
             "--monitor", "chardev=qmp0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.qmp.exists() and (self.guest.exists() or not guest), 10, "qemu-storage-daemon")

    @property
    def url(self):
        return f"nbd+unix:///guest?socket={self.guest}"

    def write(self, *commands):
        args = ["qemu-io", "-f", "raw"]
        for c in commands:
            args += ["-c", c]
        run(*args, self.url)

    def qmp_execute(self, command, **arguments):
        """Runs one QMP command in a session of its own; returns its result."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.qmp))
            f = s.makefile("rw")
            json.loads(f.readline())  # the greeting
            result = None
            for name, args in (("qmp_capabilities", {}), (command, arguments)):
                f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
                f.flush()
                reply = json.loads(f.readline())
                while "event" in reply:
                    reply = json.loads(f.readline())
                assert "return" in reply, reply
                result = reply["return"]
            return result

    def ours(self):
        """What of vmreplica's the process holds: node names, block jobs, export ids, bitmaps."""
        nodes = self.qmp_execute("query-named-block-nodes", flat=True)
        return {
            "nodes": [n["node-name"] for n in nodes if n["node-name"].startswith("vmr-")],
            "jobs": [j["device"] for j in self.qmp_execute("query-block-jobs")],
            "exports": [e["id"] for e in self.qmp_execute("query-block-exports") if e["id"] != "guest"],
            "bitmaps": [b["name"] for n in nodes for b in n.get("dirty-bitmaps", []) if "name" in b],
        }

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_a_running_vm_replicates_through_dirty_bitmaps_while_it_keeps_writing(lab, tmp_path):
    import threading

    disk = ext4_disk(tmp_path / "run01.qcow2")
    qsd = Qsd(disk, tmp_path)
    try:
        vm_id = enable_running(lab, "run01", disk, qsd)
        p = lab.primary.conn()
        vm = vm_by_name(p, "run01")
        assert vm["EnabledState"] == 2  # running
        lab.primary.cli("start", "run01")  # initial replication of the running VM

        stop = threading.Event()
        written = []

        def guest():
            k = 0
            while not stop.is_set():
                k += 1
                off = (k * 7919 % 900) * 65536
                qsd.write(f"write -P {k % 200 + 1} {off} 96k")
                written.append(off)
                time.sleep(0.05)

        writer = threading.Thread(target=guest)
        writer.start()
        try:
            wait_for(lambda: applied_sequence(lab, vm_id) >= 6, timeout=60, what="five cycles while writing")
        finally:
            stop.set()
            writer.join()
        assert len(written) > 10
        last = applied_sequence(lab, vm_id)
        wait_for(lambda: applied_sequence(lab, vm_id) >= last + 2, timeout=30, what="two quiet cycles")
        rrsc(p, vm, 7)  # nothing in flight from here on
        point_equals_running_disk(lab, vm_id, settled(lab, vm_id), qsd)

        rel = p.Associators(vm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
        rv, out = p.InvokeMethod("GetReplicationStatisticsEx", p.EnumerateInstances("Msvm_ReplicationService")[0].path,
                                 ComputerSystem=vm.path, ReplicationRelationship=rel.tocimxmlstr())
        stats = {k: (None if v is None else str(v)) for k, v in out["ReplicationStatistics"][0].items()}
        # Deltas carry what the guest wrote (96 KiB writes touch two or three 64 KiB blocks), not the
        # 64 MiB disk each time.
        assert int(stats["ReplicationSize"]) < len(written) * 200 * 1024 + (4 << 20), stats
        log = lab.primary.log.read_text()
        assert "delta replicated" in log and "cycle failed" not in log

        # PendingReplicationSize: what the dirty bitmaps hold while suspended (sampled from QEMU
        # between cycles), back to nothing once a cycle shipped it.
        def pending():
            rel = p.Associators(vm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
            rv, out = p.InvokeMethod("GetReplicationStatisticsEx", p.EnumerateInstances("Msvm_ReplicationService")[0].path,
                                     ComputerSystem=vm.path, ReplicationRelationship=rel.tocimxmlstr())
            return int(out["ReplicationStatistics"][0]["PendingReplicationSize"])

        qsd.write("write -P 0x42 40M 2M")
        wait_for(lambda: pending() >= 2 << 20, timeout=30, what="the 2 MiB written while suspended to show as pending")
        assert pending() < 3 << 20
        rrsc(p, vm, 3)
        wait_for(lambda: pending() == 0, timeout=30, what="the pending size to drop once shipped")

        # QEMU is killed: its persistent bitmaps come back inconsistent. The next cycle hash-scans
        # the frozen view once, tracking restarts, and nothing written is lost. (Resumed above.)
        qsd.write("write -P 0xee 5M 64k")
        qsd.proc.kill()
        qsd.proc.wait()
        qsd = Qsd(disk, tmp_path)
        qsd.write("write -P 0xdd 7M 128k")
        before = applied_sequence(lab, vm_id)
        wait_for(lambda: applied_sequence(lab, vm_id) >= before + 2, timeout=30, what="cycles after the crash")
        rrsc(p, vm, 7)
        point_equals_running_disk(lab, vm_id, settled(lab, vm_id), qsd)
    finally:
        qsd.stop()


def test_a_running_vm_with_a_raw_disk_is_tracked_while_its_qemu_runs(lab, tmp_path):
    # A raw image cannot store bitmaps: they live in the QEMU process, and after it stopped the
    # disk is hash-scanned once.
    disk = tmp_path / "raw01.raw"
    run("truncate", "-s", "32M", disk)
    qsd = Qsd(disk, tmp_path, fmt="raw")
    try:
        vm_id = enable_running(lab, "raw01", disk, qsd)
        lab.primary.cli("start", "raw01")
        p = lab.primary.conn()
        vm = vm_by_name(p, "raw01")

        def shipped_equal():
            rrsc(p, vm, 7)
            seq = settled(lab, vm_id)
            point_equals_running_disk(lab, vm_id, seq, qsd)
            rrsc(p, vm, 3)
            return seq

        for k in range(3):
            qsd.write(f"write -P {0x21 + k} {k * 5}M 192k")
            shipped_since(lab, vm_id, time.time())
        seq = shipped_equal()
        log = lab.primary.log.read_text()
        assert "replication cycle failed" not in log, log[-2000:]
        assert "hash-scanning it once" not in log  # every delta came from the bitmap

        qsd.stop()
        qsd = Qsd(disk, tmp_path, fmt="raw")
        qsd.write("write -P 0x7e 9M 64k")
        shipped_since(lab, vm_id, time.time())
        shipped_equal()
        assert "hash-scanning it once" in lab.primary.log.read_text()
    finally:
        qsd.stop()


def test_offline_initial_replication_then_deltas_continue_over_the_network(lab, tmp_path):
    vm_id = str(uuid.uuid4()).upper()
    disk = ext4_disk(tmp_path / "off01.qcow2")
    lab.primary.cli("vm", "add", "--name", "off01", "--id", vm_id, "--disk", str(disk))
    lab.primary.cli("enable", "off01", "--replica-server", REPLICA, "--replica-port", str(lab.port),
                    "--thumbprint", lab.t1)
    media = tmp_path / "usb"
    lab.primary.cli("start", "off01", "--type", "export", "--path", str(media))
    p = lab.primary.conn()
    vm = vm_by_name(p, "off01")
    assert vm["ReplicationState"] == 2

    # On the recovery server: enabling created the replica VM (same GUID); the media is imported.
    lab.replica.cli("import", "off01", "--path", str(media))

    # The primary notices the import and replicates from there.
    wait_for(lambda: vm_by_name(p, "off01")["ReplicationState"] == 3, what="the primary to see the import")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 3M 256k", disk)
    shipped_since(lab, vm_id, time.time())
    rrsc(p, vm_by_name(p, "off01"), 7)
    seq = settled(lab, vm_id)
    layer = lab.storage / vm_id.lower() / "disk0" / f"p{seq:020}.qcow2"
    res = subprocess.run(["qemu-img", "compare", "-F", "qcow2", str(layer), str(disk)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_removing_replication_stops_the_log_in_flight_at_once(lab, tmp_path):
    """RemoveReplicationRelationshipEx while a cycle uploads a big log: the log is of no use any
    more, so its upload stops and the job ends within seconds, not once the log is through."""
    import os

    lab.primary.stop()
    lab.primary.extra_args += ["--bandwidth-limit", "1M"]  # a 32 MiB log takes 32 s
    lab.primary.start()
    disk = tmp_path / "rm01.raw"
    run("truncate", "-s", "64M", disk)
    vm_id = replicate_network(lab, tmp_path, "rm01", [disk], "--no-compression")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, what="initial replication")
    incoming = lab.storage / vm_id.lower() / "incoming"
    with open(disk, "r+b") as f:
        f.seek(8 << 20)
        f.write(os.urandom(32 << 20))

    def uploading():
        return [q for q in incoming.glob("*.partial") if file_size(q) > (1 << 20)]

    (partial,) = wait_for(uploading, timeout=30, what="a big log in flight")
    p = lab.primary.conn()
    started = time.monotonic()
    path, job = remove_relationship(p, "rm01")
    took = time.monotonic() - started
    assert job["JobState"] == 7 and job["JobType"] == 93, job
    assert took < 10, f"the removal waited {took:.1f} s for the log in flight"
    vm = p.GetInstance(path)
    assert vm["ReplicationMode"] == 0 and vm["ReplicationState"] == 0
    # Nothing more of that log is sent, and its cycle counts for nothing.
    size = file_size(partial)
    assert size < (24 << 20), size
    time.sleep(3)
    assert file_size(partial) == size
    log = lab.primary.log.read_text()
    assert "cycle stopped: the VM's replication was removed" in log
    stopped = int(partial.name[:20])  # <sequence:020>-<upload id>.partial
    with raw_peer(lab) as c:
        assert c.get(f"/vmreplica/v1/vms/{vm_id.lower()}").json()["last_committed"]["sequence"] < stopped


def test_sigkill_of_either_daemon_mid_cycle_loses_nothing(lab, tmp_path):
    import os
    import random
    import signal

    disk = tmp_path / "kill01.raw"
    run("truncate", "-s", "128M", disk)
    vm_id = replicate_network(lab, tmp_path, "kill01", [disk], "--no-compression")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, what="initial replication")
    rng = random.Random(4)
    # The primary sends a cycle's log from memory while it builds it; the replica's partial upload
    # shows a cycle in flight.
    incoming = lab.storage / vm_id.lower() / "incoming"
    for round_ in range(8):
        # A partial the last kill left is not a new cycle: wait for an upload not seen before.
        seen = set(incoming.glob("*.partial"))
        with open(disk, "r+b") as f:
            f.seek(rng.randrange(0, 100) << 20)
            f.write(os.urandom(24 << 20))
        # Kill while a log of this VM is being built or sent.
        wait_for(lambda: set(incoming.glob("*.partial")) - seen, timeout=10, what="a cycle in flight")
        time.sleep(rng.uniform(0, 0.15))
        victim = lab.primary if round_ % 2 == 0 else lab.replica
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        victim.start()
        if victim is lab.replica:
            wait_port(lab.port)
    # Quiet now: two more cycles ship whatever the kills interrupted.
    last = applied_sequence(lab, vm_id)
    wait_for(lambda: applied_sequence(lab, vm_id) >= last + 2, timeout=60, what="cycles after the kills")
    p = lab.primary.conn()
    rrsc(p, vm_by_name(p, "kill01"), 7)
    seq = settled(lab, vm_id)
    store = lab.storage / vm_id.lower()
    layer = store / "disk0" / f"p{seq:020}.qcow2"
    res = subprocess.run(["qemu-img", "compare", "-F", "raw", str(layer), str(disk)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    for point in store.glob("disk0/p*.qcow2"):
        assert subprocess.run(["qemu-img", "check", "-q", str(point)]).returncode == 0, point
    # Every committed log was applied exactly once, in order, and nothing committed waits.
    with raw_peer(lab) as c:
        described = c.get(f"/vmreplica/v1/vms/{vm_id.lower()}").json()
    assert described["pending_apply"] == 0
    assert described["last_applied_sequence"] == described["last_committed"]["sequence"] == seq


def test_a_restarted_replica_kills_the_qemu_nbd_helpers_its_killed_run_left(lab, tmp_path):
    """A replica daemon SIGKILLed in an apply leaves the apply's qemu-nbd running (it is not its
    child any more, and nothing else ends it); the daemon's next start kills it even when no log of
    that VM arrives again (here the primary is down)."""
    import signal

    disk = tmp_path / "nbd01.raw"
    run("truncate", "-s", "16M", disk)
    vm_id = replicate_network(lab, tmp_path, "nbd01", [disk], "--no-compression")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, what="initial replication")
    lab.primary.stop()
    lab.replica.proc.send_signal(signal.SIGKILL)
    lab.replica.proc.wait()
    # What the killed apply left: a qemu-nbd serving a layer, its pid file (pid, socket) in run/.
    store = lab.storage / vm_id.lower()
    layer = next(store.glob("disk0/p*.qcow2"))
    socket_path = tmp_path / "left.sock"
    helper = subprocess.Popen(["qemu-nbd", "-r", "--persistent", "-f", "qcow2", "-k", str(socket_path),
                               "-x", "disk", str(layer)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(socket_path.exists, 10, "the helper listening")
        (store / "run").mkdir(exist_ok=True)
        (store / "run" / "apply-disk0.nbd.pid").write_text(f"{helper.pid}\n{socket_path}\n")
        lab.replica.start()
        wait_port(lab.port)
        wait_for(lambda: helper.poll() is not None, 10, "the helper killed")
        assert not (store / "run" / "apply-disk0.nbd.pid").exists()
        assert "killed qemu-nbd helpers an interrupted apply left" in lab.replica.log.read_text()
    finally:
        helper.kill()
        helper.wait()


class Proxy:
    """A TCP proxy in front of the replica's listener that, once, cuts a connection or flips one byte
    of what the primary sends after `after` bytes (inside TLS records: TLS must notice). With
    `down_rate`, what the listener answers passes at most that many bytes a second."""

    def __init__(self, target_port, mode, after, down_rate=None):
        import threading
        self.target, self.mode, self.after = target_port, mode, after
        self.down_rate = down_rate
        self.fired = threading.Event()
        self.open = []  # every connection's two sockets, for cut()
        self.kept = set()  # sockets to the replica left open, unread, by cut_primary_side()
        self.forwarded = 0  # bytes passed on from the primary
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        import threading
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.open.append((client, server))
            threading.Thread(target=self.pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self.pump, args=(server, client, False), daemon=True).start()

    def pump(self, src, dst, upstream):
        seen = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream and not self.fired.is_set() and seen + len(data) > self.after:
                    self.fired.set()
                    if self.mode == "cut":
                        dst.sendall(data[: self.after - seen])
                        break
                    i = self.after - seen
                    data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
                seen += len(data)
                dst.sendall(data)
                if upstream:
                    self.forwarded += len(data)
                elif self.down_rate:
                    time.sleep(len(data) / self.down_rate)
        except OSError:
            pass
        for s in (src, dst):
            if s in self.kept:
                continue
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def cut(self):
        """Breaks every connection open now (later ones pass)."""
        for pair in self.open:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.open = []
        self.fired.set()

    def cut_primary_side(self):
        """Breaks every connection open now on the primary's side only: the replica's end stays
        open and silent, as after a reset that never reached the replica (later ones pass)."""
        for client, server in self.open:
            self.kept.add(server)
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.open = []
        self.fired.set()

    def close(self):
        # shutdown() wakes the accept() blocked on this socket. A close() alone leaves it blocked,
        # and its file descriptor, freed, can be the next test's proxy's: this one's thread would
        # then take that proxy's connections and hand them to this test's dead replica.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for s in self.kept:
            s.close()


@pytest.mark.parametrize("mode", ["cut", "flip"])
def test_a_connection_cut_or_corrupted_mid_log_is_retried_and_applied_once(lab, tmp_path, mode):
    import os

    disk = random_raw(tmp_path / "net01.raw", "64M", 8 << 20)
    proxy = Proxy(lab.port, mode, after=6 << 20)  # inside the initial replica's log (8 MiB of data)
    try:
        vm_id = str(uuid.uuid4()).upper()
        lab.primary.cli("vm", "add", "--name", "net01", "--id", vm_id, "--disk", str(disk))
        lab.primary.cli("enable", "net01", "--replica-server", REPLICA, "--replica-port", str(proxy.port),
                        "--thumbprint", lab.t1, "--no-compression")
        # The broken upload is sent again on a new connection a second later: the job completes.
        lab.primary.cli("start", "net01")
        assert proxy.fired.is_set()
        # The new connection continues where the replica's whole verified records end.
        assert "resuming the upload" in lab.primary.log.read_text()
        resumed = re.search(r"resuming an upload .*offset=(\d+)", plain_log(lab.replica))
        # What was kept ends at a record boundary: at least the header record (how many of the 4 MiB
        # data records arrived whole before the cut depends on timing).
        assert resumed and int(resumed.group(1)) > 0, "the upload resumed after what was kept"

        p = lab.primary.conn()
        with open(disk, "r+b") as f:
            f.seek(20 << 20)
            f.write(os.urandom(4 << 20))
        wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="a delta")
        rrsc(p, vm_by_name(p, "net01"), 7)
        seq = settled(lab, vm_id)
        layer = lab.storage / vm_id.lower() / "disk0" / f"p{seq:020}.qcow2"
        res = subprocess.run(["qemu-img", "compare", "-F", "raw", str(layer), str(disk)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        with raw_peer(lab) as c:
            described = c.get(f"/vmreplica/v1/vms/{vm_id.lower()}").json()
        assert described["last_applied_sequence"] == described["last_committed"]["sequence"] == seq
        if mode == "flip":
            assert "decrypt" in lab.replica.log.read_text().lower() or "bad record" in lab.replica.log.read_text().lower()
    finally:
        proxy.close()


def test_removing_the_authorization_entry_stops_replication_of_its_vms(lab, tmp_path):
    disk = ext4_disk(tmp_path / "auth01.qcow2")
    vm_id = replicate_network(lab, tmp_path, "auth01", [disk])
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="a delta")
    # Another entry still lets the primary in, but not to this VM, bound to the removed entry.
    other = tmp_path / "other-storage"
    other.mkdir()
    lab.replica.cli("auth", "add", "--primary", "*", "--storage", str(other), "--trust-group", "OTHER")
    lab.replica.cli("auth", "remove", "*.lab.example")
    r = lab.replica.conn()
    assert vm_by_name(r, "auth01")["ReplicationState"] == 8
    p = lab.primary.conn()
    wait_for(lambda: vm_by_name(p, "auth01")["ReplicationState"] == 8, what="the primary to stop")
    assert "EntryRemoved" in lab.replica.log.read_text()
    assert list(other.iterdir()) == []
    rel = p.Associators(vm_by_name(p, "auth01").path, AssocClass="Msvm_SystemReplicationRelationship")[0]
    assert rel["ReplicationHealth"] == 3  # Critical

    # The operator puts the entry back and resumes both sides (RRSC 3 from 8): what the VM wrote
    # meanwhile arrives.
    lab.replica.cli("auth", "add", "--primary", "*.lab.example", "--storage", str(lab.storage))
    rrsc(r, vm_by_name(r, "auth01"), 3)
    before = applied_sequence(lab, vm_id)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 3M 1M", disk)
    rrsc(p, vm_by_name(p, "auth01"), 3)
    wait_for(lambda: applied_sequence(lab, vm_id) > before, what="a delta after the resume")
    assert vm_by_name(p, "auth01")["ReplicationState"] == 3
    latest_point_equals(lab.storage / vm_id.lower(), disk, "qcow2", at_least=before + 1)


def host_settings(daemon):
    """`vmreplica host show` of `daemon`, as JSON."""
    return json.loads(daemon.cli("host", "show", "--output", "json").stdout)


@pytest.mark.parametrize("cap", [["--bandwidth-limit", "4M"],
                                 # A weekly window in local time that holds all week.
                                 ["--bandwidth-window", "Mon-Sun 00:00-24:00=4M"],
                                 # Set at run time with the CLI, over the daemon's flags.
                                 None])
def test_the_bandwidth_cap_paces_what_the_primary_sends(lab, tmp_path, cap):
    import threading

    lab.primary.stop()
    lab.primary.extra_args += cap or ["--bandwidth-limit", "64M"]
    lab.primary.start()
    if cap is None:
        bad = lab.primary.cli("host", "set", "--bandwidth-window", "Mon 8-18=1M", check=False)
        assert bad.returncode != 0 and "bandwidth window" in bad.stderr, bad.stderr
        assert host_settings(lab.primary)["source"] == "flags"
        lab.primary.cli("host", "set", "--bandwidth-limit", "4M", "--max-parallel-transfers", "2")
        shown = host_settings(lab.primary)
        assert (shown["bandwidth_limit"], shown["max_parallel_transfers"], shown["source"]) == \
            (4 << 20, 2, "stored"), shown
    disk = random_raw(tmp_path / "bw01.raw", "64M", 16 << 20)
    # While the initial replication runs, PendingReplicationSize is the disk file's size scaled by
    # what the job has still to do.
    seen, done = [], threading.Event()

    def watch():
        p = lab.primary.conn()
        svc = p.EnumerateInstances("Msvm_ReplicationService")[0]
        while not done.is_set():
            vm = vm_by_name(p, "bw01")
            rels = vm and p.Associators(vm.path, AssocClass="Msvm_SystemReplicationRelationship")
            if rels and rels[0]["ReplicationState"] == 2:
                rv, out = p.InvokeMethod("GetReplicationStatisticsEx", svc.path, ComputerSystem=vm.path,
                                         ReplicationRelationship=rels[0].tocimxmlstr())
                seen.append(int(out["ReplicationStatistics"][0]["PendingReplicationSize"]))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    try:
        vm_id = replicate_network(lab, tmp_path, "bw01", [disk], "--no-compression")
    finally:
        done.set()
        watcher.join()
    elapsed = time.monotonic() - started
    # 16 MiB at 4 MiB/s after a 4 MiB burst: at least 3 s; uncapped this takes well under one.
    assert 2.8 <= elapsed < 30, elapsed
    assert any(0 < n <= 64 << 20 for n in seen), seen
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, what="initial replication applied")
    latest_point_equals(lab.storage / vm_id.lower(), disk, at_least=1)
    if cap is None:
        # Kept over the flags after a restart, until reset.
        lab.primary.stop()
        lab.primary.start()
        assert host_settings(lab.primary)["bandwidth_limit"] == 4 << 20
        lab.primary.cli("host", "reset")
        shown = host_settings(lab.primary)
        assert (shown["bandwidth_limit"], shown["max_parallel_transfers"], shown["source"]) == \
            (64 << 20, 3, "flags"), shown


def test_a_suspend_while_a_log_is_in_flight_keeps_that_logs_replication_time(lab, tmp_path):
    import os

    lab.primary.stop()
    lab.primary.extra_args += ["--bandwidth-limit", "4M"]
    lab.primary.start()
    disk = tmp_path / "sus01.raw"
    run("truncate", "-s", "64M", disk)
    vm_id = replicate_network(lab, tmp_path, "sus01", [disk], "--no-compression")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, what="initial replication applied")
    p = lab.primary.conn()
    vm = vm_by_name(p, "sus01")
    with open(disk, "r+b") as f:
        f.write(os.urandom(12 << 20))
    # The next cycle's log (12 MiB at 4 MiB/s) is arriving: suspend now. The job ends once it did.
    incoming = lab.storage / vm_id.lower() / "incoming"
    wait_for(lambda: any(f.name.endswith(".partial") for f in incoming.iterdir()) if incoming.exists() else False,
             what="the delta log arriving")
    rrsc(p, vm, 7)
    with raw_peer(lab) as c:
        last = c.get(f"/vmreplica/v1/vms/{vm_id.lower()}").json()["last_committed"]
    assert last["sequence"] >= 2, last
    rel = p.Associators(vm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
    assert rel["ReplicationState"] == 7
    assert int(rel["LastReplicationTime"].datetime.timestamp()) == last["point_time"] // 1_000_000
    rrsc(p, vm, 3)
    latest_point_equals(lab.storage / vm_id.lower(), disk, at_least=2)


def test_a_primary_gets_busy_beyond_four_uploads_at_once(lab, tmp_path):
    import threading

    vm, disk, size, log = export_log(lab, tmp_path, "busy01")
    started = threading.Semaphore(0)

    def slow_body():
        # The first to hold the VM is never idle (an upload from offset 0 would tell an idle one to
        # stop, and free its place); the others wait for it, each holding its place.
        yield log[:200]
        started.release()
        for at in range(200, 240):  # 8 s: longer than the fifth waits for a place (3 s)
            time.sleep(0.2)
            yield log[at:at + 1]

    def upload():
        with raw_peer(lab) as c:
            c.patch(f"/vmreplica/v1/vms/{vm}/logs/1", content=slow_body(),
                    headers={"vmreplica-upload-id": str(uuid.uuid4()), "vmreplica-upload-offset": "0"})

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(4):
        assert started.acquire(timeout=10), "four uploads in progress"
    time.sleep(0.5)
    with raw_peer(lab) as c:
        res = c.patch(f"/vmreplica/v1/vms/{vm}/logs/1", content=log,
                      headers={"vmreplica-upload-id": str(uuid.uuid4()), "vmreplica-upload-offset": "0"})
    assert res.status_code == 503 and res.json()["error"]["name"] == "Busy", res.text
    assert res.headers["retry-after"] == "5"
    for t in threads:
        t.join()
    # Once they are gone, the same upload is taken.
    with raw_peer(lab) as c:
        res = c.patch(f"/vmreplica/v1/vms/{vm}/logs/1", content=log,
                      headers={"vmreplica-upload-id": str(uuid.uuid4()), "vmreplica-upload-offset": "0"})
    assert res.status_code == 200 and res.json()["state"] == 2, res.text


def test_connections_that_never_begin_their_handshake_do_not_keep_primaries_out(lab):
    """A client on another address opens 300 connections to the recovery server and sends nothing.
    A primary's request still gets in at once: one address holds at most 32 handshakes in progress.
    (Each such connection held one of the listener's 256 places for the 10 s handshake limit, so a
    primary waited in the kernel's queue for that long, again and again.)"""
    idle = []
    try:
        for _ in range(300):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", lab.port))
            idle.append(s)
        time.sleep(1)  # accepted (or queued) by now
        t = time.time()
        with raw_peer(lab) as c:
            assert c.post("/vmreplica/v1/test", json={}).status_code == 200
        assert time.time() - t < 5, time.time() - t
    finally:
        for s in idle:
            s.close()


def test_a_ca_taken_out_of_the_recovery_servers_trusted_store_is_no_longer_trusted(lab, tmp_path):
    """The recovery server's administrator takes the lab CA out of `certs/trusted/`, where another
    CA stays: within one check (10 s) a primary whose certificate the lab CA signed is refused at
    the handshake of a new connection, and its connection already open (an upload, say) is closed,
    while one from a host of the other CA goes on (the listener is not restarted for it); put
    back, the lab CA is trusted again. (The trusted CAs were read once, when the listener started:
    a CA taken out stayed trusted until the daemon restarted; then open connections of its hosts
    went on until they ended.)"""
    trusted = lab.replica.data_dir / "certs" / "trusted"
    saved = tmp_path / "saved-trusted"
    shutil.copytree(trusted, saved)
    # hv9.lab.example matches the `*.lab.example` entry; another CA signed its certificate.
    other = tmp_path / "other-ca"
    t9 = cert_new(other, "hv9.lab.example")["hv9.lab.example"]
    shutil.copy(other / "ca" / "ca.pem", trusted / "other.pem")

    def accepted(certs, thumbprint):
        try:
            with peer_as(lab, certs, thumbprint, lab.port) as c:
                return c.post("/vmreplica/v1/test", json={}).status_code == 200
        except (httpx.HTTPError, ssl.SSLError, OSError):
            return False

    lab_host = (lab.primary.data_dir / "certs", lab.t1)
    other_host = (other / "hv9.lab.example" / "certs", t9)
    wait_for(lambda: accepted(*other_host), timeout=30, what="the other CA trusted")
    # Connections made before (uploads in progress, say), kept open.
    open_lab = peer_as(lab, *lab_host, lab.port, keepalive=120)
    open_other = peer_as(lab, *other_host, lab.port, keepalive=120)
    for c in (open_lab, open_other):
        assert c.post("/vmreplica/v1/test", json={}).status_code == 200
    for f in trusted.iterdir():
        if f.name != "other.pem":
            f.unlink()

    wait_for(lambda: not accepted(*lab_host), timeout=30, what="the lab CA no longer trusted")
    # The listener was not restarted for it: the other CA's connection goes on.
    assert open_other.post("/vmreplica/v1/test", json={}).status_code == 200
    # The lab CA's connection was closed by the server, not left to end on its own.
    wait_for(lambda: "replication connection closed: its certificate is no longer trusted"
             in plain_log(lab.replica), timeout=10, what="the open connection closed")
    with pytest.raises((httpx.HTTPError, ssl.SSLError, OSError)):
        open_lab.post("/vmreplica/v1/test", json={})
    assert 'names=["hv1.lab.example"]' in plain_log(lab.replica)
    assert 'names=["hv9.lab.example"]' not in plain_log(lab.replica)
    for c in (open_lab, open_other):
        c.close()
    (trusted / "other.pem").unlink()
    for f in saved.iterdir():
        shutil.copy(f, trusted / f.name)
    wait_for(lambda: accepted(*lab_host), timeout=30, what="the lab CA trusted again")
    wait_for(lambda: not accepted(*other_host), timeout=30, what="the other CA no longer trusted")

    # No CA left at all (the listener stops until one is put back): the open connection is closed
    # at once too, not left to drain.
    cut = "replication connection closed: its certificate is no longer trusted (no trusted CA can be read)"
    open_lab = peer_as(lab, *lab_host, lab.port, keepalive=120)
    assert open_lab.post("/vmreplica/v1/test", json={}).status_code == 200
    for f in trusted.iterdir():
        f.unlink()
    wait_for(lambda: cut in plain_log(lab.replica), timeout=30, what="the open connection closed")
    with pytest.raises((httpx.HTTPError, ssl.SSLError, OSError)):
        open_lab.post("/vmreplica/v1/test", json={})
    open_lab.close()
    for f in saved.iterdir():
        shutil.copy(f, trusted / f.name)
    wait_for(lambda: accepted(*lab_host), timeout=30, what="the lab CA trusted again")


def test_a_replica_made_here_is_bound_to_the_first_primary_that_names_it(lab, tmp_path):
    """A replica made on the recovery server (Enable-VMReplication -AsReplica) has no binding until
    a primary names it: the first one binds it, and a primary of another trust group is refused
    from then on. (It stayed unbound until a PUT, and any authorized primary could upload to it.)"""
    disk = tmp_path / "bind01.raw"
    run("truncate", "-s", "16M", disk)
    vm_id = str(uuid.uuid4()).upper()
    lab.replica.cli("vm", "add", "--name", "bind01", "--id", vm_id, "--disk", str(disk))
    lab.replica.cli("enable-as-replica", "bind01")
    certs, t3 = intruder(lab)
    other = tmp_path / "other-storage"
    other.mkdir()
    lab.replica.cli("auth", "add", "--primary", "hv3.lab.example", "--storage", str(other),
                    "--trust-group", "OTHER")
    with raw_peer(lab) as c:
        res = c.get(f"/vmreplica/v1/vms/{vm_id.lower()}")
        assert res.status_code == 200, res.text
    with peer_as(lab, certs, t3, lab.port) as c:
        res = c.get(f"/vmreplica/v1/vms/{vm_id.lower()}")
        assert res.status_code == 403 and res.json()["error"]["name"] == "AccessDenied", res.text
        res = c.patch(f"/vmreplica/v1/vms/{vm_id.lower()}/logs/1", content=b"x" * 64,
                      headers={"vmreplica-upload-id": str(uuid.uuid4()), "vmreplica-upload-offset": "0"})
        assert res.status_code == 403, res.text
    with raw_peer(lab) as c:
        assert c.get(f"/vmreplica/v1/vms/{vm_id.lower()}").status_code == 200
    assert list(other.iterdir()) == []


@pytest.mark.parametrize("running", [False, True], ids=["off", "running"])
def test_seeded_initial_replication_sends_only_the_blocks_that_differ(lab, tmp_path, running):
    disk = ext4_disk(tmp_path / "seed01.qcow2", payload_bytes=6_000_000)
    # The recovery server got a copy earlier (a restored backup); the VM changed a little since.
    copy = tmp_path / "seed01-copy.qcow2"
    shutil.copy(disk, copy)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 40M 192k", "-c", "write -z 41M 64k", disk)
    vm_id = str(uuid.uuid4()).upper()
    lab.replica.cli("vm", "add", "--name", "seed01", "--id", vm_id, "--disk", str(copy))
    lab.replica.cli("enable-as-replica", "seed01")
    # A running VM is hashed and read from a frozen point of its QEMU process.
    qsd = Qsd(disk, tmp_path) if running else None
    held = ["--qmp-socket", str(qsd.qmp), "--nbd-socket", str(qsd.guest)] if running else []
    current = qsd.url if running else str(disk)

    def write(command):
        if running:
            qsd.write(command)
        else:
            run("qemu-io", "-f", "qcow2", "-c", command, disk)

    def equal(at_least):
        # Replication goes on (empty deltas): the latest point, with retries.
        latest_point_equals(lab.storage / vm_id.lower(), current, "raw" if running else "qcow2",
                            at_least=at_least)

    try:
        lab.primary.cli("vm", "add", "--name", "seed01", "--id", vm_id, "--disk", str(disk), *held)
        lab.primary.cli("enable", "seed01", "--replica-server", REPLICA, "--replica-port", str(lab.port),
                        "--thumbprint", lab.t1, "--no-compression")
        p = lab.primary.conn()
        svc = p.EnumerateInstances("Msvm_ReplicationService")[0]
        vm = vm_by_name(p, "seed01")
        assert vm["EnabledState"] == (2 if running else 3)
        rv, out = p.InvokeMethod("StartReplication", svc.path, ComputerSystem=vm.path, InitialReplicationType=Uint16(3))
        assert rv == 4096
        job = wait_job(p, out["Job"], timeout=120)
        assert job["JobState"] == 7, job["ErrorDescription"]
        assert job["JobType"] == 117
        assert vm_by_name(p, "seed01")["ReplicationState"] == 3
        wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="the differences to be applied")
        with raw_peer(lab) as c:
            sent = c.get(f"/vmreplica/v1/vms/{vm_id.lower()}/logs/2").json()
        # Three changed blocks and one zeroed travel (about 256 KiB), not the 6 MB the disk holds.
        assert sent["log_bytes"] < 400_000, sent
        if not running:
            equal(2)
        # Deltas continue from there (for a running VM, from its dirty bitmap).
        write("write -P 0x6b 50M 64k")
        shipped_since(lab, vm_id, time.time())
        rrsc(p, vm, 7)
        equal(settled(lab, vm_id))
        if running:
            assert "hash-scanning it once" not in lab.primary.log.read_text()
    finally:
        if qsd:
            qsd.stop()


def start_network_ir(lab, name, disk, cap=None, port=None):
    """Defines `name` with `disk` on the primary (its sends capped at `cap` bytes/s when given),
    enables it without compression (to the replica's `port`, by default its listener) and starts
    its network initial replication through pywbem; returns (its id, the primary's connection, the
    job's path)."""
    if cap:
        lab.primary.stop()
        lab.primary.extra_args += ["--bandwidth-limit", cap]
        lab.primary.start()
    vm_id = str(uuid.uuid4()).upper()
    lab.primary.cli("vm", "add", "--name", name, "--id", vm_id, "--disk", str(disk))
    lab.primary.cli("enable", name, "--replica-server", REPLICA, "--replica-port", str(port or lab.port),
                    "--thumbprint", lab.t1, "--no-compression")
    p = lab.primary.conn()
    rv, out = p.InvokeMethod("StartReplication", p.EnumerateInstances("Msvm_ReplicationService")[0].path,
                             ComputerSystem=vm_by_name(p, name).path, InitialReplicationType=Uint16(1))
    assert rv == 4096
    return vm_id, p, out["Job"]


def staged_checkpoint_offset(path):
    """The log offset a staged upload's checkpoint file continues from (disk::points::StageCheckpoint:
    magic, the reader's part's length, then the reader's magic, format version and offset); 0 if it
    is gone."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # the upload ended meanwhile
        return 0
    assert data[:8] == b"VRSTAGE2" and data[16:24] == b"VRLOGCP2", data[:24]
    assert data[24:26] == (2).to_bytes(2, "little"), data[24:26]
    return int.from_bytes(data[26:34], "little")


def test_an_upload_whose_connection_broke_on_the_primarys_side_only_goes_on_at_once(lab, tmp_path):
    """The replica's handler of the old connection would wait a minute for bytes that never come,
    holding the VM: the primary's status request on its new connection stops it instead."""
    disk = random_raw(tmp_path / "half01.raw", "64M", 48 << 20)
    proxy = Proxy(lab.port, "cut", after=1 << 40)  # passes everything until told
    try:
        vm_id, p, job = start_network_ir(lab, "half01", disk, cap="8M", port=proxy.port)
        wait_for(lambda: proxy.forwarded > 16 << 20, timeout=30, what="16 MiB of the log sent")
        proxy.cut_primary_side()
        cut = time.monotonic()
        job = wait_job(p, job, timeout=120)
        took = time.monotonic() - cut
        assert job["JobState"] == 7, job["ErrorDescription"]
        # About 32 MiB were left at 8 MiB/s. Waiting for the old handler's idle timeout (60 s), or
        # 10 s per status request that found it busy, took far longer.
        assert took < 20, took
        replica_log = plain_log(lab.replica)
        assert "the primary continues this log on a newer connection" in replica_log, replica_log[-3000:]
        assert "resuming an upload" in replica_log, replica_log[-3000:]
        latest_point_equals(lab.storage / vm_id.lower(), disk, fmt="raw")
    finally:
        proxy.close()


def test_an_upload_from_offset_0_that_went_away_leaves_the_older_upload_its_usual_limit(lab, tmp_path):
    """The 2 s idle rule holds only while the upload from offset 0 still waits: one that went away
    (here its connection closed, 0.6 s after the first's last bytes; a Busy answer, say) leaves a
    slow but live upload alone."""
    import threading

    import httpx

    vm, disk, size, log = export_log(lab, tmp_path, "slow01")
    lab.primary.stop(companion=False)  # this test plays the primary (see the upload test)
    answers = {}
    under_way = threading.Event()

    def gaps():  # four pieces 3 s apart: longer gaps than the 2 s rule allows
        piece = len(log) // 4 + 1
        for n, at in enumerate(range(0, len(log), piece)):
            yield log[at:at + piece]
            under_way.set()
            if at + piece < len(log):
                time.sleep(3)

    def first():
        with raw_peer(lab) as c:
            answers["first"] = c.patch(f"/vmreplica/v1/vms/{vm}/logs/1", content=gaps(),
                                       headers={"vmreplica-upload-id": str(uuid.uuid4()),
                                                "vmreplica-upload-offset": "0"})

    with raw_peer(lab) as c:  # the second waits for the VM, gives up after 0.5 s and closes
        c.get(f"/vmreplica/v1/vms/{vm}")  # connected before the first starts: no handshake later
        slow = threading.Thread(target=first)
        slow.start()
        assert under_way.wait(10)
        time.sleep(0.1)
        with pytest.raises(httpx.ReadTimeout):  # sent, and no answer while the first holds the VM
            c.patch(f"/vmreplica/v1/vms/{vm}/logs/1", content=log, timeout=0.5,
                    headers={"vmreplica-upload-id": str(uuid.uuid4()), "vmreplica-upload-offset": "0"})
    slow.join()
    assert answers["first"].status_code == 200 and answers["first"].json()["state"] == 2, answers["first"].text
    replica_log = plain_log(lab.replica)
    assert "an upload of this log from offset 0 waits for the one still arriving" in replica_log
    assert "sends this log again from its start" not in replica_log


def test_a_crashed_primarys_dead_uploads_do_not_make_its_restarted_cycles_busy(lab, tmp_path):
    """Three VMs' logs were arriving when their primary's host crashed: their handlers hold three of
    the primary's four places on the replica until they stop. The restarted primary's three uploads
    each tell theirs to stop and wait for a place, instead of meeting Busy (and, at a real interval,
    waiting all of it)."""
    import os
    import signal

    proxy = Proxy(lab.port, "cut", after=1 << 40)  # passes everything until told
    try:
        vms = []
        for i in range(3):
            disk = tmp_path / f"half1{i}.raw"
            run("truncate", "-s", "64M", disk)
            vm_id, p, job = start_network_ir(lab, f"half1{i}", disk, cap="8M" if i == 0 else None,
                                             port=proxy.port)
            assert wait_job(p, job, timeout=60)["JobState"] == 7
            vms.append((vm_id, disk))
        for vm_id, _ in vms:
            wait_for(lambda: applied_sequence(lab, vm_id) >= 1, what="point 1")
        # 32 MiB each, written back to back: at 8 MB/s for all three, they are all in flight.
        noise = os.urandom(32 << 20)
        for _, disk in vms:
            with open(disk, "r+b") as f:
                f.seek(8 << 20)
                f.write(noise)

        def arriving():
            found = {}
            for vm_id, _ in vms:
                for q in (lab.storage / vm_id.lower() / "incoming").glob("*.partial"):
                    if file_size(q) > (1 << 20):
                        found[vm_id] = int(q.name[:20])  # <sequence:020>-<upload id>.partial
            return found if len(found) == len(vms) else None
        cuts = wait_for(arriving, timeout=30, what="the three deltas arriving")
        proxy.cut_primary_side()
        lab.primary.proc.send_signal(signal.SIGKILL)
        lab.primary.proc.wait()
        lab.primary.start()
        for vm_id, disk in vms:
            latest_point_equals(lab.storage / vm_id.lower(), disk, fmt="raw", at_least=cuts[vm_id])
        replica_log = plain_log(lab.replica)
        assert replica_log.count("sends this log again from its start") >= len(vms), replica_log[-3000:]
        assert not re.search(r"uploads (are )?in progress", replica_log), replica_log[-3000:]
    finally:
        proxy.close()


def test_an_upload_from_offset_0_waits_for_one_whose_bytes_still_flow(lab, tmp_path):
    """An upload from offset 0 under another id stops the handler of an older connection only once
    that one's body is idle: a live upload (the new request is not the primary's latest word) is
    received to its end, then replaced."""
    import threading

    vm, disk, size, log = export_log(lab, tmp_path, "flow01")
    lab.primary.stop(companion=False)  # this test plays the primary (see the upload test)
    piece = len(log) // 20 + 1
    answers = {}
    under_way = threading.Event()

    def steady():  # the whole log over about 4 s, a piece every 0.2 s
        for n, at in enumerate(range(0, len(log), piece)):
            yield log[at:at + piece]
            if n == 3:
                under_way.set()
            time.sleep(0.2)
        answers["body ended"] = time.monotonic()  # before the request's end reaches the replica

    def first():
        with raw_peer(lab) as c:
            answers["first"] = c.patch(f"/vmreplica/v1/vms/{vm}/logs/1", content=steady(),
                                       headers={"vmreplica-upload-id": str(uuid.uuid4()),
                                                "vmreplica-upload-offset": "0"})

    flowing = threading.Thread(target=first)
    flowing.start()
    assert under_way.wait(10)  # its handler holds the VM and has been receiving for 0.6 s
    with raw_peer(lab) as c:
        second = c.patch(f"/vmreplica/v1/vms/{vm}/logs/1", content=log,
                         headers={"vmreplica-upload-id": str(uuid.uuid4()), "vmreplica-upload-offset": "0"})
        second_at = time.monotonic()
    flowing.join()
    assert answers["first"].status_code == 200 and answers["first"].json()["state"] == 2, answers["first"].text
    assert second.status_code == 200 and second.json()["state"] == 2, second.text
    assert answers["body ended"] <= second_at  # the second waited for the first
    replica_log = plain_log(lab.replica)
    assert "sends this log again from its start" not in replica_log


def test_a_primary_restarted_after_its_host_crashed_mid_log_sends_it_again_at_once(lab, tmp_path):
    """A host that crashed mid-upload leaves the replica's handler of its connection waiting for
    bytes (a minute) and holding the VM: the restarted primary's first upload of that log, a new
    delivery from offset 0, stops it instead of waiting its turn."""
    import os
    import signal

    disk = tmp_path / "half02.raw"
    run("truncate", "-s", "64M", disk)
    proxy = Proxy(lab.port, "cut", after=1 << 40)  # passes everything until told
    try:
        vm_id, p, job = start_network_ir(lab, "half02", disk, cap="8M", port=proxy.port)
        assert wait_job(p, job, timeout=60)["JobState"] == 7
        wait_for(lambda: applied_sequence(lab, vm_id) >= 1, what="point 1")
        with open(disk, "r+b") as f:
            f.seek(8 << 20)
            f.write(os.urandom(40 << 20))
        incoming = lab.storage / vm_id.lower() / "incoming"
        (partial,) = wait_for(lambda: [q for q in incoming.glob("*.partial") if file_size(q) > (8 << 20)],
                              timeout=30, what="8 MiB of the delta received")
        cut = int(partial.name[:20])  # <sequence:020>-<upload id>.partial
        # The host crashes: the primary's end of the connection is gone without a word, the
        # replica's stays open.
        proxy.cut_primary_side()
        lab.primary.proc.send_signal(signal.SIGKILL)
        lab.primary.proc.wait()
        lab.primary.start()
        restarted = time.monotonic()
        # The 40 MiB go again at 8 MiB/s; waiting for the old handler's idle timeout took 60 s more.
        latest_point_equals(lab.storage / vm_id.lower(), disk, fmt="raw", at_least=cut)
        took = time.monotonic() - restarted
        assert took < 25, took
        replica_log = plain_log(lab.replica)
        assert "sends this log again from its start on a newer connection" in replica_log, replica_log[-3000:]
    finally:
        proxy.close()


@pytest.mark.parametrize("stop,cap", [("kill", "24M"), ("term", "24M"), ("kill", None)])
def test_an_initial_replication_continues_from_its_checkpoint_after_the_replica_stops(lab, tmp_path, stop, cap):
    """Capped, the replica is stopped at a chosen byte; uncapped, its queues are full (its disk is the
    slower side) and the checkpoint lags as far as it can behind what the primary sent."""
    import os
    import signal

    size = 224 if cap else 768
    disk = tmp_path / "ckpt01.raw"
    run("truncate", "-s", f"{size + 96}M", disk)
    with open(disk, "r+b") as f:
        for _ in range(size // 32):
            f.write(os.urandom(32 << 20))
        f.seek((size + 40) << 20)
        f.write(os.urandom(8 << 20))
    # Capped, slow enough to be stopped mid-way.
    vm_id, p, job = start_network_ir(lab, "ckpt01", disk, cap)
    incoming = lab.storage / vm_id.lower() / "incoming"

    # Past the 112 MiB the primary keeps of a log it sends from memory: it no longer holds the first
    # byte, so without the checkpoint a restart of the replica here failed the initial replication.
    past = (128 if cap else 256) << 20

    def far():
        return [c for c in incoming.glob("*.checkpoint") if staged_checkpoint_offset(c) > past]

    wait_for(far, timeout=60, what="a checkpoint far enough")
    if stop == "kill":
        lab.replica.proc.send_signal(signal.SIGKILL)
        lab.replica.proc.wait()
    else:
        lab.replica.stop()  # SIGTERM: a clean exit keeps the upload's checkpoint too
        # Down for longer than the quick retries (1, 2, 4 s) of a cycle: an initial replication
        # waits for its recovery server (up to an hour).
        time.sleep(10)
    saved = staged_checkpoint_offset(far()[0])
    lab.replica.start()
    wait_port(lab.port)
    job = wait_job(p, job, timeout=60)
    assert job["JobState"] == 7, (job["JobState"], job["ErrorDescription"])
    replica_log = plain_log(lab.replica)
    # Continued at the checkpoint's byte, not sent again from the start.
    assert f"resuming a staged upload from its checkpoint vm={vm_id.lower()} sequence=1 offset={saved}" \
        in replica_log, replica_log[-3000:]
    assert not list(incoming.glob("*.checkpoint")), "the checkpoint goes once the upload is whole"
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, timeout=60, what="point 1")
    latest_point_equals(lab.storage / vm_id.lower(), disk, at_least=1)
    assert vm_by_name(p, "ckpt01")["ReplicationState"] == 3


def network_ir_under_way(lab, tmp_path, name):
    """A network initial replication of a 224 MiB disk at 24 MB/s, once the replica checkpointed
    more than 32 MiB of it: (the disk, the VM's id, the primary's connection, the job's path)."""
    disk = random_raw(tmp_path / f"{name}.raw", "256M", 224 << 20)
    vm_id, p, job = start_network_ir(lab, name, disk, "24M")
    incoming = lab.storage / vm_id.lower() / "incoming"
    wait_for(lambda: [c for c in incoming.glob("*.checkpoint") if staged_checkpoint_offset(c) > 32 << 20],
             timeout=30, what="an initial replication under way")
    return disk, vm_id, p, job


def resumed_past_32_mib(lab, vm_id):
    """The replica continued log 1 past 32 MiB (where it stood), not from its start."""
    resumed = re.findall(rf"resuming an upload vm={vm_id.lower()} sequence=1 offset=(\d+)", plain_log(lab.replica))
    assert resumed and int(resumed[-1]) > 32 << 20, plain_log(lab.replica)[-3000:]


def test_a_network_initial_replication_is_cancelled_mid_disk_and_a_run_again_goes_on_from_there(lab, tmp_path):
    """Stop-VMInitialReplication (RequestStateChange 4 on the job) while one disk is being sent: the
    job ends Terminated at once, not once the whole disk went, and the relationship is ready again
    (1); the replica keeps what arrived, and StartReplication again continues from there."""
    disk, vm_id, p, job = network_ir_under_way(lab, tmp_path, "cancel01")
    asked = time.monotonic()
    rv, _ = p.InvokeMethod("RequestStateChange", job, RequestedState=Uint16(4))
    assert rv in (0, 4096), rv
    ended = wait_job(p, job, timeout=30)
    took = time.monotonic() - asked
    # 224 MiB at 24 MB/s: the rest of the disk would have taken several more seconds.
    assert ended["JobState"] == 8, (ended["JobState"], ended["ErrorDescription"])
    assert took < 3, took
    assert vm_by_name(p, "cancel01")["ReplicationState"] == 1
    assert "staged upload interrupted; kept for a resume" in plain_log(lab.replica)
    rv, out = p.InvokeMethod("StartReplication", p.EnumerateInstances("Msvm_ReplicationService")[0].path,
                             ComputerSystem=vm_by_name(p, "cancel01").path, InitialReplicationType=Uint16(1))
    assert rv == 4096
    again = wait_job(p, out["Job"], timeout=60)
    assert again["JobState"] == 7, (again["JobState"], again["ErrorDescription"])
    resumed_past_32_mib(lab, vm_id)
    latest_point_equals(lab.storage / vm_id.lower(), disk, at_least=1)
    assert vm_by_name(p, "cancel01")["ReplicationState"] == 3


def test_a_network_initial_replication_suspended_while_it_runs_goes_on_from_there_when_resumed(lab, tmp_path):
    """Suspend-VMReplication while the initial replication runs (state 2, from which spec §3.3
    allows it; it answered 32774 while the initial replication's job held the VM): the transfer
    stops at once and the VM reads Suspended (7); Resume-VMReplication runs the initial
    replication again, which continues where the replica stood and ends Replicating (3)."""
    disk, vm_id, p, job = network_ir_under_way(lab, tmp_path, "susp01")
    asked = time.monotonic()
    rrsc(p, vm_by_name(p, "susp01"), 7)
    assert time.monotonic() - asked < 3
    assert wait_job(p, job)["JobState"] == 8
    assert vm_by_name(p, "susp01")["ReplicationState"] == 7
    # Tracking and the replica's part wait: nothing more is sent while suspended.
    time.sleep(3)
    assert vm_by_name(p, "susp01")["ReplicationState"] == 7
    assert applied_sequence(lab, vm_id) == 0
    rrsc(p, vm_by_name(p, "susp01"), 3)  # waits for the initial replication it runs again
    resumed_past_32_mib(lab, vm_id)
    latest_point_equals(lab.storage / vm_id.lower(), disk, at_least=1)
    assert vm_by_name(p, "susp01")["ReplicationState"] == 3


def test_an_initial_replication_waiting_for_its_stopped_recovery_server_is_cancelled_at_once(lab, tmp_path):
    import signal

    disk = random_raw(tmp_path / "wait01.raw", "128M", 96 << 20)
    vm_id, p, job = start_network_ir(lab, "wait01", disk, "24M")
    incoming = lab.storage / vm_id.lower() / "incoming"
    wait_for(lambda: [c for c in incoming.glob("*.checkpoint") if staged_checkpoint_offset(c) > 16 << 20],
             timeout=30, what="an initial replication under way")
    lab.replica.proc.send_signal(signal.SIGKILL)
    lab.replica.proc.wait()
    # Past the quick retries of a cycle (1, 2, 4 s): the job still waits for its recovery server.
    time.sleep(9)
    assert p.GetInstance(job)["JobState"] == 4
    started = time.monotonic()
    rv, _ = p.InvokeMethod("RequestStateChange", job, RequestedState=Uint16(4))
    assert rv in (0, 4096), rv
    assert wait_job(p, job, timeout=10)["JobState"] == 8  # Terminated
    assert time.monotonic() - started < 5
    assert vm_by_name(p, "wait01")["ReplicationState"] == 1  # Ready: the IR can run again
    # And it does, to the end, once the recovery server is back.
    lab.replica.start()
    wait_port(lab.port)
    lab.primary.cli("start", "wait01")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, timeout=60, what="point 1 after the rerun")
    latest_point_equals(lab.storage / vm_id.lower(), disk, at_least=1)


def kill_primary_mid_log_1(lab, vm_id):
    """SIGKILLs the primary once the replica holds 4 MiB of `vm_id`'s log 1; returns the offset the
    replica reports for the cut-off upload."""
    import signal

    incoming = lab.storage / vm_id.lower() / "incoming"
    # Asked by file: a status request would stop the replica's handler of the upload at once.
    wait_for(lambda: [c for c in incoming.glob("*.checkpoint") if staged_checkpoint_offset(c) >= 4 << 20],
             timeout=30, what="4 MiB of log 1 on the replica")
    lab.primary.proc.send_signal(signal.SIGKILL)
    lab.primary.proc.wait()
    with raw_peer(lab) as c:
        res = c.get(f"/vmreplica/v1/vms/{vm_id.lower()}/logs/1")
    assert res.status_code == 200 and res.json()["state"] == 1, res.text
    return res.json()["offset"]


def cut_off_network_ir(lab, tmp_path, name, fmt="raw"):
    """A turned-off VM's network initial replication (24 MiB of data at 2 MB/s) cut off by a SIGKILL
    of the primary once the replica holds some of it; the primary is started again. Returns (its id,
    its disk, the primary's connection, the replica's offset in the cut-off upload)."""
    disk = random_raw(tmp_path / f"{name}.raw", "64M", 24 << 20)
    if fmt == "qcow2":  # its bitmaps rotate before it is read (engine::offline)
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", disk, tmp_path / f"{name}.qcow2")
        disk.unlink()
        disk = tmp_path / f"{name}.qcow2"
    vm_id, p, job_path = start_network_ir(lab, name, disk, "2M")  # slow enough to be cut off
    wait_for(lambda: vm_by_name(p, name)["ReplicationState"] == 2, what="initial replication running")
    offset = kill_primary_mid_log_1(lab, vm_id)
    lab.primary.start()
    p = lab.primary.conn()
    assert vm_by_name(p, name)["ReplicationState"] == 1  # back to Ready, not stuck in 2
    job = p.GetInstance(job_path)
    assert job["JobState"] == 10  # Exception: the stop cut it off
    assert "back in their state before it" in lab.primary.log.read_text()
    return vm_id, disk, p, offset


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_an_initial_replication_cut_off_by_sigkill_runs_again_from_where_the_replica_stands(lab, tmp_path, fmt):
    vm_id, disk, p, offset = cut_off_network_ir(lab, tmp_path, "cut01", fmt)
    lab.primary.cli("start", "cut01")  # runs again to the end
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, timeout=60, what="point 1 after the rerun")
    latest_point_equals(lab.storage / vm_id.lower(), disk, fmt=fmt, at_least=1)
    # The same log was built again and only the rest of it sent, under the same upload.
    log = plain_log(lab.primary)
    assert "the initial replica goes on from an earlier delivery of the same log" in log
    resumed = [int(m) for m in re.findall(r"resuming the upload.* offset=(\d+)", log)]
    assert resumed and resumed[0] >= offset > 0, (resumed, offset)


def cut_off_running_ir(lab, tmp_path, name, qsd):
    """A running VM's network initial replication (its disk `qsd` holds `<name>.qcow2`, 24 MiB of
    data at 2 MB/s) cut off by a SIGKILL of the primary once the replica holds some of it; the next
    cycle comes 15 s after a commit. Returns (its id, the replica's offset in the cut-off upload)."""
    lab.primary.stop()
    interval = lab.primary.extra_args.index("--cycle-interval-override") + 1
    lab.primary.extra_args[interval] = "15"
    lab.primary.extra_args += ["--bandwidth-limit", "2M"]
    lab.primary.start()
    vm_id = enable_running(lab, name, tmp_path / f"{name}.qcow2", qsd)
    p = lab.primary.conn()
    vm = vm_by_name(p, name)
    assert vm["EnabledState"] == 2  # running
    rv, _ = p.InvokeMethod("StartReplication", p.EnumerateInstances("Msvm_ReplicationService")[0].path,
                           ComputerSystem=vm.path, InitialReplicationType=Uint16(1))
    assert rv == 4096
    return vm_id, kill_primary_mid_log_1(lab, vm_id)


def test_a_running_vms_initial_replication_cut_off_by_sigkill_goes_on_from_its_frozen_point(lab, tmp_path):
    """The primary's daemon is killed during a running VM's network initial replication. The point
    it froze stays in the VM's QEMU process while the guest keeps writing, and the run again goes on
    from it: only the rest of the log is sent, point 1 is the disk as it was at the freeze, and the
    next cycle ships what the guest wrote meanwhile."""
    reference = random_raw(tmp_path / "frz01.raw", "64M", 24 << 20)  # the disk at the freeze
    disk = tmp_path / "frz01.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", reference, disk)
    qsd = Qsd(disk, tmp_path)
    try:
        vm_id, offset = cut_off_running_ir(lab, tmp_path, "frz01", qsd)
        # The guest writes while the primary is down: over data the replica holds, and over data
        # not sent yet.
        qsd.write("write -P 0x5a 0 1M", "write -P 0xa5 20M 512k")
        lab.primary.start()
        lab.primary.cli("start", "frz01")  # runs again to the end
        wait_for(lambda: applied_sequence(lab, vm_id) >= 1, timeout=60, what="point 1 after the rerun")
        point1 = lab.storage / vm_id.lower() / "disk0" / f"p{1:020}.qcow2"
        res = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(point1), str(reference)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        log = plain_log(lab.primary)
        assert "the initial replica goes on from an earlier delivery of the same log" in log, log[-3000:]
        resumed = [int(m) for m in re.findall(r"resuming the upload.* offset=(\d+)", log)]
        assert resumed and resumed[0] >= offset > 0, (resumed, offset)
        # What the guest wrote since the freeze is the next cycle's, from the bitmap that recorded it.
        latest_point_equals(lab.storage / vm_id.lower(), qsd.url, "raw", at_least=2)
        assert "hash-scanning it once" not in plain_log(lab.primary)
    finally:
        qsd.stop()


@pytest.mark.parametrize("own_server", [True, False], ids=["vms-nbd-server", "no-nbd-server"])
def test_removing_a_running_vms_replication_ends_what_it_left_in_its_qemu_process(lab, tmp_path, own_server):
    """RemoveReplicationRelationshipEx of a running VM whose initial replication a SIGKILL of the
    primary cut off: the frozen point left in the VM's QEMU process (fleecing overlay, backup job,
    export) and the tracking bitmaps go, and so does the primary's state of the VM. The VM's own
    NBD server keeps serving; one vmreplica started (the VM had none) is stopped."""
    random_raw(tmp_path / "rmr01.raw", "64M", 24 << 20)
    disk = tmp_path / "rmr01.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", tmp_path / "rmr01.raw", disk)
    qsd = Qsd(disk, tmp_path, guest=own_server)
    try:
        vm_id, _ = cut_off_running_ir(lab, tmp_path, "rmr01", qsd)
        left = qsd.ours()
        assert left["nodes"] and left["jobs"] and left["exports"] and left["bitmaps"], left
        tracking = lab.primary.data_dir / "tracking" / vm_id
        run_dir = lab.primary.data_dir / "run" / f"vm-{vm_id.lower().replace('-', '')}"
        assert tracking.exists(), tracking
        assert any(run_dir.glob("*.qcow2")), run_dir
        # Where vmreplica starts its NBD server (engine/running.rs: a socket path has 107 bytes).
        sock = run_dir / "fleece.sock"
        if len(str(sock)) > 107:
            sock = Path(tempfile.gettempdir()) / f"vmreplica-{vm_id.lower().replace('-', '')}.sock"
        assert sock.exists() != own_server, sock
        lab.primary.start()
        p = lab.primary.conn()
        path, job = remove_relationship(p, "rmr01")
        assert job["JobState"] == 7 and "not ended" not in job["Description"], job
        assert qsd.ours() == {"nodes": [], "jobs": [], "exports": [], "bitmaps": []}
        assert not tracking.exists() and not run_dir.exists() and not sock.exists()
        assert p.GetInstance(path)["ReplicationMode"] == 0
        if own_server:
            qsd.write("write -P 0x11 0 1M")  # the guest goes on
        else:  # no NBD server runs in the process any more: another may start
            qsd.qmp_execute("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "b.sock")}})
    finally:
        qsd.stop()


def test_a_removal_whose_cycle_outlives_its_wait_ends_the_tracking_once_that_cycle_ended(lab, tmp_path):
    """RemoveReplicationRelationshipEx while a running VM's cycle is stuck in a QEMU process that
    stopped answering (SIGSTOP): the job ends after its wait and says the tracking was not ended
    yet; once the process answers again and the cycle ended, the daemon ends it (frozen point,
    bitmaps and the primary's state of the VM gone)."""
    import os
    import signal

    lab.primary.stop()
    lab.primary.extra_args += ["--bandwidth-limit", "1M", "--removal-wait", "3"]
    lab.primary.start()
    random_raw(tmp_path / "rml01.raw", "64M", 1 << 20)
    disk = tmp_path / "rml01.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", tmp_path / "rml01.raw", disk)
    qsd = Qsd(disk, tmp_path)
    stopped = False
    try:
        vm_id = enable_running(lab, "rml01", disk, qsd)
        lab.primary.cli("start", "rml01")
        wait_for(lambda: applied_sequence(lab, vm_id) >= 1, timeout=60, what="initial replication")
        qsd.write("write -P 0x33 8M 16M")  # a 16 MiB delta: 16 s at 1 MiB/s
        incoming = lab.storage / vm_id.lower() / "incoming"
        wait_for(lambda: [q for q in incoming.glob("*.partial") if file_size(q) > (1 << 20)],
                 timeout=60, what="the delta in flight")
        os.kill(qsd.proc.pid, signal.SIGSTOP)
        stopped = True
        p = lab.primary.conn()
        path, job = remove_relationship(p, "rml01")
        assert job["JobState"] == 7 and "not ended yet" in job["Description"], job
        assert p.GetInstance(path)["ReplicationMode"] == 0
        tracking = lab.primary.data_dir / "tracking" / vm_id
        run_dir = lab.primary.data_dir / "run" / f"vm-{vm_id.lower().replace('-', '')}"
        assert tracking.exists()
        # Enabled again meanwhile: refused while that cycle still holds the VM.
        again = lab.primary.cli("enable", "rml01", "--replica-server", REPLICA, "--replica-port", str(lab.port),
                                "--thumbprint", lab.t1, check=False)
        assert again.returncode != 0 and "32774" in again.stderr and "still ending" in again.stderr, again.stderr
        os.kill(qsd.proc.pid, signal.SIGCONT)
        stopped = False
        wait_for(lambda: not tracking.exists() and not run_dir.exists(), timeout=90,
                 what="the tracking ended after the cycle")
        assert qsd.ours() == {"nodes": [], "jobs": [], "exports": [], "bitmaps": []}
        assert "its tracking ended after the replication cycle that outlived its removal" in \
            plain_log(lab.primary)
        qsd.write("write -P 0x11 0 1M")  # the guest goes on
    finally:
        if stopped:
            os.kill(qsd.proc.pid, signal.SIGCONT)
        qsd.stop()


def test_removing_a_turned_off_vms_replication_removes_its_bitmaps_and_state(lab, tmp_path):
    """`vmreplica disable` of a turned-off qcow2 VM whose initial replication was cut off: the
    bitmaps vmreplica added to its file and the primary's state of the VM go."""
    vm_id, disk, p, _ = cut_off_network_ir(lab, tmp_path, "rmo01", "qcow2")
    bitmaps = [b["name"] for b in json.loads(run("qemu-img", "info", "-U", "--output=json", disk).stdout)
               ["format-specific"]["data"].get("bitmaps", [])]
    assert any(b.startswith("vmr-offline-writes") for b in bitmaps), bitmaps
    tracking = lab.primary.data_dir / "tracking" / vm_id
    assert tracking.exists()
    lab.primary.cli("disable", "rmo01")
    wait_for(lambda: vm_by_name(p, "rmo01")["ReplicationMode"] == 0, what="the relationship removed")
    wait_for(lambda: not tracking.exists(), what="the VM's tracking state removed")
    info = json.loads(run("qemu-img", "info", "--output=json", disk).stdout)
    assert info["format-specific"]["data"].get("bitmaps", []) == [], info
    run("qemu-img", "check", disk)


def test_an_initial_replication_run_again_after_its_disk_changed_starts_over(lab, tmp_path):
    import os

    vm_id, disk, p, offset = cut_off_network_ir(lab, tmp_path, "cut02")
    # A block the replica already holds changes while the primary is down: the same log cannot be
    # built again, and what the replica holds must not end up in a point beside the new data.
    with open(disk, "r+b") as f:
        f.write(os.urandom(64 << 10))
    lab.primary.cli("start", "cut02")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, timeout=60, what="point 1 after the rerun")
    latest_point_equals(lab.storage / vm_id.lower(), disk, at_least=1)
    log = plain_log(lab.primary)
    assert "starts over, not from its earlier delivery: a disk file changed since" in log
    assert "resuming the upload" not in log


def test_a_disk_change_the_fingerprints_miss_makes_the_replica_refuse_the_resumed_log(lab, tmp_path):
    """The safety net under the fingerprints: the replica's check of the whole log's hash."""
    import json
    import os

    vm_id, disk, p, offset = cut_off_network_ir(lab, tmp_path, "cut03")
    with open(disk, "r+b") as f:
        f.write(os.urandom(64 << 10))
    # As if the write had left the file's times as they were: the record describes the file now.
    record = lab.primary.data_dir / "tracking" / vm_id.upper() / "initial-delivery.json"
    d = json.loads(record.read_text())
    st = os.stat(disk)
    d["prints"] = [{"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                    "inode": st.st_ino, "device": st.st_dev}]
    record.write_text(json.dumps(d))
    # The replica refuses the log built again (its hash is not the one of what it holds and what
    # follows); the job starts over under a new upload at once, and the point is the disk now.
    lab.primary.cli("start", "cut03", timeout=180)
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, timeout=120, what="point 1 after the rerun")
    latest_point_equals(lab.storage / vm_id.lower(), disk, at_least=1)
    log = plain_log(lab.primary)
    assert "goes on from an earlier delivery" in log
    assert "starts over under a new upload: the log built again for its earlier delivery was refused" in log
    assert "ChecksumMismatch" in log, log[-3000:]
    wait_for(lambda: not record.exists(), what="the record removed with the commit")


def test_a_recovery_server_of_an_older_build_gets_its_log_format(lab, tmp_path):
    """A recovery server that reads only log format 1 (as a build before format 2: `--log-formats
    1` makes it answer 1 in the hello and refuse any other format) gets the initial replica and the
    cycles in format 1, and every point is the disk. Everywhere else the lab runs format 2
    (staged_checkpoint_offset)."""
    import os

    lab.replica.stop()
    lab.replica.extra_args += ["--log-formats", "1"]
    lab.replica.start()
    wait_port(lab.port)
    disk = random_raw(tmp_path / "old01.raw", "64M", 24 << 20)
    vm_id, p, job = start_network_ir(lab, "old01", disk, "4M")
    incoming = lab.storage / vm_id.lower() / "incoming"
    # The replica's place in the arriving log names the stream's format: 1 (VRLOGCP1, no version).
    magic = []

    def checkpointed():
        for c in incoming.glob("*.checkpoint"):
            try:
                magic.append(c.read_bytes()[16:24])
                return True
            except FileNotFoundError:
                pass
        return False

    wait_for(checkpointed, timeout=30, what="a checkpoint of log 1 on the replica")
    assert magic[0] == b"VRLOGCP1", magic
    assert wait_job(p, job)["JobState"] == 7
    latest_point_equals(lab.storage / vm_id.lower(), disk, at_least=1)
    # A cycle of the turned-off VM after a write: format 1 again, and the point is the disk.
    with open(disk, "r+b") as f:
        f.seek(40 << 20)
        f.write(os.urandom(1 << 20))
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, timeout=60, what="a delta cycle")
    latest_point_equals(lab.storage / vm_id.lower(), disk, at_least=2)
    # What the replica read: both logs in format 1, each verified as such.
    read = re.findall(r"log uploaded[^\n]* sequence=(\d+) bytes=\d+ log_format=(\d+)", plain_log(lab.replica))
    assert ("1", "1") in read and ("2", "1") in read and all(f == "1" for _, f in read), read


def replica_restarted_to_crash_at(lab, point):
    """Restarts the lab's recovery server so that it kills itself (SIGKILL) at crash point `point`."""
    lab.replica.stop()
    lab.replica.extra_args += ["--crash-at", point]
    lab.replica.start()
    wait_port(lab.port)


def replica_crashed(lab, timeout=60):
    """Waits for the recovery server armed by replica_restarted_to_crash_at to reach its point."""
    assert lab.replica.proc.wait(timeout=timeout) == -9, "the crash point was not reached"
    lab.replica.proc = None
    lab.replica.extra_args = lab.replica.extra_args[:-2]


def failed_cycles(lab):
    return plain_log(lab.primary).count("replication cycle failed")


def test_a_log_committed_whose_answer_was_lost_becomes_the_baseline_of_the_next(lab, tmp_path):
    """The replica commits a delta and dies before it answers, and stays down longer than the
    cycle's quick retries, so the primary's chain stays one log behind. Meanwhile the guest writes
    a block back to the bytes it had before that log. The next cycle finds the replica ahead: the
    maps the primary kept of that log become its baseline, so the block written back is shipped.
    (Built against the older maps, the next log skipped it: its hash equalled the old one, and the
    replica kept the lost log's bytes for good.)"""
    began = time.time()
    disk = random_raw(tmp_path / "lost01.raw", "32M", 8 << 20)
    vm_id = replicate_network(lab, tmp_path, "lost01", [disk], "--no-compression")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, what="initial replication")
    with open(disk, "rb") as f:
        f.seek(2 << 20)
        before = f.read(64 << 10)
    replica_restarted_to_crash_at(lab, "log-committed")
    with open(disk, "r+b") as f:
        f.seek(2 << 20)
        f.write(b"\x5a" * (64 << 10))
    replica_crashed(lab)
    failed = failed_cycles(lab)
    wait_for(lambda: failed_cycles(lab) > failed, timeout=30, what="the cycle to give up")
    with open(disk, "r+b") as f:
        f.seek(2 << 20)
        f.write(before)
    lab.replica.start()
    wait_port(lab.port)
    shipped_since(lab, vm_id, time.time())
    p = lab.primary.conn()
    rrsc(p, vm_by_name(p, "lost01"), 7)
    seq = settled(lab, vm_id)
    same, text = compare(lab.storage / vm_id.lower() / "disk0" / f"p{seq:020}.qcow2", disk)
    assert same, text
    assert "whose answer was lost: its block-hash maps are now the baseline" in plain_log(lab.primary)
    # Every delta, the adopted one too, counts as a success (the adopted one was only a failure).
    svc, vm = p.EnumerateInstances("Msvm_ReplicationService")[0], vm_by_name(p, "lost01")

    def successes():
        rv, out = p.InvokeMethod("GetReplicationStatistics", svc.path, ComputerSystem=vm.path)
        stats = out["ReplicationStatistics"][0]
        if CIMDateTime(stats["StartStatisticTime"]).datetime.timestamp() > began:
            return seq - 1  # (a monitoring window began during the test: nothing to compare)
        return int(stats["ReplicationSuccessCount"])

    wait_for(lambda: successes() == seq - 1, timeout=10, what=f"{seq - 1} deltas counted")


@pytest.mark.parametrize("log", ["initial", "delta"])
def test_a_commit_cut_off_after_its_rename_is_committed_when_asked_again(lab, tmp_path, log):
    """The recovery server dies between renaming a verified log to its committed name and writing
    the row that commits it: an initial replication's staged point, or a delta's log file. Back,
    it is asked to commit the same upload again: it finds the file under its committed name (by
    the staged point's hash, or the log's trailer) and writes the row. (Before, the rename found no
    file and every commit failed: the initial replication could not end, and the delta's cycle
    failed and built its log again.)"""
    import os

    disk = random_raw(tmp_path / "ren01.raw", "32M", 8 << 20)
    if log == "initial":
        replica_restarted_to_crash_at(lab, "log-renamed")
        vm_id, p, job = start_network_ir(lab, "ren01", disk)
        replica_crashed(lab)
        lab.replica.start()
        wait_port(lab.port)
        done = wait_job(p, job, timeout=120)
        assert done["JobState"] == 7, done["ErrorDescription"]
    else:
        vm_id = replicate_network(lab, tmp_path, "ren01", [disk], "--no-compression")
        wait_for(lambda: applied_sequence(lab, vm_id) >= 1, what="initial replication")
        replica_restarted_to_crash_at(lab, "log-renamed")
        with open(disk, "r+b") as f:
            f.seek(4 << 20)
            f.write(os.urandom(1 << 20))
        replica_crashed(lab)
        # Back within the cycle's quick retries (1, 2, 4 s), which ask and commit again.
        failed = failed_cycles(lab)
        lab.replica.start()
        wait_port(lab.port)
        p = lab.primary.conn()
    wait_for(lambda: "was renamed by a commit cut off before its row" in plain_log(lab.replica),
             timeout=30, what="the commit asked again")
    wait_for(lambda: vm_by_name(p, "ren01")["ReplicationState"] == 3, timeout=30,
             what="the primary replicating")
    rrsc(p, vm_by_name(p, "ren01"), 7)
    settled(lab, vm_id)
    latest_point_equals(lab.storage / vm_id.lower(), disk)
    if log == "delta":
        assert failed_cycles(lab) == failed, "the cycle whose commit was cut off failed"


def test_a_disk_whose_tracking_restarted_is_scanned_until_a_scan_of_it_is_committed(lab, tmp_path):
    """A running VM's raw disk loses its bitmap with its QEMU process, after a write no log holds
    yet. The next cycle hash-scans the disk and restarts tracking, but its log is never committed
    (the recovery server dies before the commit's row). The cycle after must scan the disk again:
    its bitmap, merged back from the failed cycle, holds only writes since the restart. (It was
    trusted, and the write made before the restart never reached the replica.)"""
    disk = tmp_path / "mark01.raw"
    run("truncate", "-s", "32M", disk)
    qsd = Qsd(disk, tmp_path, fmt="raw")
    try:
        vm_id = enable_running(lab, "mark01", disk, qsd)
        lab.primary.cli("start", "mark01")
        qsd.write("write -P 0x21 1M 64k")
        shipped_since(lab, vm_id, time.time())
        # The recovery server is down (cycles fail before they freeze anything) while the guest
        # writes and its QEMU process restarts without the bitmap that held the write.
        lab.replica.stop()
        lab.replica.extra_args += ["--crash-at", "log-renamed"]
        qsd.write("write -P 0x5a 9M 64k")
        qsd.stop()
        qsd = Qsd(disk, tmp_path, fmt="raw")
        lab.replica.start()
        wait_port(lab.port)
        replica_crashed(lab)
        failed = failed_cycles(lab)
        wait_for(lambda: failed_cycles(lab) > failed, timeout=30, what="the cycle to give up")
        assert "hash-scanning it once" in plain_log(lab.primary)
        lab.replica.start()
        wait_port(lab.port)
        shipped_since(lab, vm_id, time.time())
        assert "no scan of it was committed yet: hash-scanning it" in plain_log(lab.primary)
        p = lab.primary.conn()
        rrsc(p, vm_by_name(p, "mark01"), 7)
        point_equals_running_disk(lab, vm_id, settled(lab, vm_id), qsd)
    finally:
        qsd.stop()


def restored_then_running(lab, name, vm_id, disk, backup, tmp_path):
    """With replication of the turned-off VM `name` suspended: `backup` is restored over `disk`
    (undoing the write at 9M), the VM started and replication resumed; after a write, the point
    shipped must equal the running disk. Returns the VM's QEMU (a Qsd) for the caller to stop."""
    p = lab.primary.conn()
    vm = vm_by_name(p, name)
    shutil.copyfile(backup, disk)  # restored in place
    qsd = Qsd(disk, tmp_path)
    try:
        rrsc(p, vm, 3)
        qsd.write("write -P 0x33 5M 64k")
        shipped_since(lab, vm_id, time.time())
        rrsc(p, vm, 7)
        point_equals_running_disk(lab, vm_id, settled(lab, vm_id), qsd)
    except BaseException:
        qsd.stop()
        raise
    return qsd


def test_a_running_vms_disk_replaced_by_an_older_copy_of_itself_is_scanned(lab, tmp_path):
    """A backup of a running VM's qcow2 disk, taken while the VM was off, is restored over it while
    it is off again, after a write the replica got. The copy's bitmap is consistent but older than
    the last point: it knows nothing of the write the copy undid. The next cycle must hash-scan the
    disk and send the block back. (It trusted the copy's bitmap, and the replica kept the undone
    write for good.)"""
    disk = tmp_path / "older01.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", disk, "32M")
    qsd = Qsd(disk, tmp_path)
    try:
        vm_id = enable_running(lab, "older01", disk, qsd)
        lab.primary.cli("start", "older01")
        qsd.write("write -P 0x21 1M 64k")
        shipped_since(lab, vm_id, time.time())
        p = lab.primary.conn()
        vm = vm_by_name(p, "older01")
        rrsc(p, vm, 7)
        qsd.stop()
        backup = tmp_path / "backup.qcow2"
        shutil.copyfile(disk, backup)
        qsd = Qsd(disk, tmp_path)
        rrsc(p, vm, 3)
        qsd.write("write -P 0x5a 9M 64k")
        shipped_since(lab, vm_id, time.time())
        rrsc(p, vm, 7)
        qsd.stop()
        qsd = restored_then_running(lab, "older01", vm_id, disk, backup, tmp_path)
        assert "older than the one recording since the last point" in plain_log(lab.primary)
    finally:
        qsd.stop()


def test_a_turned_off_vms_disk_replaced_by_an_older_copy_after_an_offline_point_is_scanned_when_it_runs(lab, tmp_path):
    """A VM that ran is turned off; a backup of its qcow2 disk is taken, a tool writes the disk and
    a turned-off point ships that write; then the backup is restored and the VM started before the
    next turned-off point. The copy's bitmap has the expected generation but lacks the mark of the
    write it undid: the first cycle of the running VM must hash-scan the disk. (It trusted the
    bitmap, and the replica kept the undone write for good.)"""
    disk = tmp_path / "older02.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", disk, "32M")
    qsd = Qsd(disk, tmp_path)
    try:
        vm_id = enable_running(lab, "older02", disk, qsd)
        lab.primary.cli("start", "older02")
        qsd.write("write -P 0x21 1M 64k")
        shipped_since(lab, vm_id, time.time())
        qsd.stop()  # turned off: the next points are read from the file
        shipped_since(lab, vm_id, time.time())
        p = lab.primary.conn()
        vm = vm_by_name(p, "older02")
        rrsc(p, vm, 7)
        backup = tmp_path / "backup.qcow2"
        shutil.copyfile(disk, backup)
        rrsc(p, vm, 3)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 9M 64k", disk)
        shipped_since(lab, vm_id, time.time() + 2.5)  # (a file is read once left alone 2 s)
        rrsc(p, vm, 7)
        qsd = restored_then_running(lab, "older02", vm_id, disk, backup, tmp_path)
        assert "lost blocks it marked when the last turned-off point" in plain_log(lab.primary)
    finally:
        qsd.stop()


def test_the_recovery_servers_tidy_leaves_a_partial_upload_still_arriving_alone(lab, tmp_path):
    """The recovery server tidies its uploads (hourly; here every second) while a slow delta
    arrives: a partial upload still being written is neither cut back nor deleted. (A cut under its
    writer left a hole in the file whose stream had verified, so the committed log could not be
    applied and the VM needed a resynchronization.)"""
    import os

    lab.replica.stop()
    lab.replica.extra_args += ["--tidy-every", "1"]
    lab.replica.start()
    wait_port(lab.port)
    disk = tmp_path / "tidy01.raw"
    run("truncate", "-s", "64M", disk)
    vm_id = replicate_network(lab, tmp_path, "tidy01", [disk], "--no-compression")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, what="initial replication")
    lab.primary.stop()
    lab.primary.extra_args += ["--bandwidth-limit", "2M"]  # the 12 MiB delta takes 6 s
    lab.primary.start()
    with open(disk, "r+b") as f:
        f.seek(8 << 20)
        f.write(os.urandom(12 << 20))
    t = time.time()
    incoming = lab.storage / vm_id.lower() / "incoming"
    wait_for(lambda: any(incoming.glob("*.partial")), timeout=15, what="the delta arriving")
    shipped_since(lab, vm_id, t)
    p = lab.primary.conn()
    rrsc(p, vm_by_name(p, "tidy01"), 7)
    seq = settled(lab, vm_id)
    same, text = compare(lab.storage / vm_id.lower() / "disk0" / f"p{seq:020}.qcow2", disk)
    assert same, text
    assert "cannot be applied" not in plain_log(lab.replica)
