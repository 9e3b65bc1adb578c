"""Initial replication on offline media between two real daemons: StartReplication type 2 exports a
full-image replication log of the primary's disks (a real ext4 filesystem), ImportInitialReplica
applies it on the replica as recovery point 1, which `qemu-img compare` proves equal to the
primary's disk, and which the replica shows as an Msvm_VirtualSystemSettingData recovery snapshot."""

import subprocess
import uuid

import pytest
from pywbem import Uint16

from conftest import Daemon, free_port, thumbprint, wait_job

THUMBPRINT = thumbprint("hv1.example.org")


def run(*cmd):
    subprocess.run(cmd, check=True, capture_output=True)


def ext4_disk(path, files):
    raw = path.with_suffix(".raw")
    run("truncate", "-s", "64M", str(raw))
    run("mkfs.ext4", "-q", "-F", str(raw))
    for i, size in enumerate(files):
        src = path.parent / f"f{i}.bin"
        src.write_bytes(bytes((j * 7 + i) % 251 for j in range(size)))
        run("debugfs", "-w", "-R", f"write {src} file{i}", str(raw))
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    raw.unlink()
    return path


@pytest.fixture
def two_hosts(tmp_path):
    """hv2 is a recovery server for *.example.org storing below <replica data dir>/replicas; hv1
    reaches it by name (enabling replication creates the replica VM there, as with Hyper-V)."""
    replica = Daemon(tmp_path / "replica", host_name="hv2.example.org",
                     extra_args=["--replication-address", "127.0.0.1"]).start()
    port = replica.serve_replication(replica.data_dir / "replicas", primary="*.example.org")
    primary = Daemon(tmp_path / "primary", host_name="hv1.example.org",
                     extra_args=["--resolve", f"hv2.example.org=127.0.0.1:{port}"]).start()
    yield primary, replica
    primary.stop()
    replica.stop()


def test_export_then_import_gives_a_recovery_point_equal_to_the_primary_disk(two_hosts, tmp_path):
    primary, replica = two_hosts
    vm_id = str(uuid.uuid4()).upper()
    os_disk = ext4_disk(tmp_path / "web01-os.qcow2", [300_000, 1_500_000])
    data_disk = tmp_path / "web01-data.raw"
    run("truncate", "-s", "32M", str(data_disk))
    with open(data_disk, "r+b") as f:
        f.seek(5 << 20)
        f.write(b"data disk payload " * 5000)
    primary.cli("vm", "add", "--name", "web01", "--id", vm_id, "--disk", str(os_disk), "--disk", str(data_disk))

    p = primary.conn()
    svc = p.EnumerateInstances("Msvm_ReplicationService")[0]
    vm = p.ExecQuery("WQL", "SELECT * FROM Msvm_ComputerSystem WHERE ElementName = 'web01'")[0]
    rsd = p.Associators(vm.path, ResultClass="Msvm_ReplicationSettingData")[0]
    rsd["RecoveryConnectionPoint"] = "hv2.example.org"
    rsd["CertificateThumbPrint"] = THUMBPRINT
    rv, out = p.InvokeMethod("CreateReplicationRelationship", svc.path, ComputerSystem=vm.path,
                             ReplicationSettingData=rsd.tocimxmlstr())
    assert rv == 4096 and wait_job(p, out["Job"])["JobState"] == 7

    export_dir = tmp_path / "usb-drive"
    rv, out = p.InvokeMethod("StartReplication", svc.path, ComputerSystem=vm.path,
                             InitialReplicationType=Uint16(2), InitialReplicationExportLocation=str(export_dir))
    assert rv == 4096
    job = wait_job(p, out["Job"], timeout=120)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert job["JobType"] == 118 and job["PercentComplete"] == 100
    log = export_dir / f"web01_{vm_id}" / "initial-replica.vrlog"
    assert log.is_file()
    tracking = primary.data_dir / "tracking" / vm_id
    # The maps, and what a failback checks later: the qcow2 disk's bitmap of writes from before its
    # read on (added then, so its file changed too recently for a fingerprint to be trusted) and
    # what it marked once the point was made, and the raw disk's fingerprint once the file had been
    # left alone for two seconds.
    names = {p.name for p in tracking.iterdir()}
    required = {"disk0.hashes", "disk1.hashes", "disk0.offline-bitmap.json", "disk0.offline-marked.json"}
    assert required <= names <= required | {"disk1.fingerprint.json"}, names
    rel = p.Associators(vm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
    assert rel["ReplicationState"] == 2  # waiting for the import

    # The replica host: enabling created the replica VM (same GUID), waiting for initial replication.
    r = replica.conn()
    rsvc = r.EnumerateInstances("Msvm_ReplicationService")[0]
    rvm = r.ExecQuery("WQL", "SELECT * FROM Msvm_ComputerSystem WHERE ElementName = 'web01'")[0]
    assert r.Associators(rvm.path, ResultClass="Msvm_VirtualSystemSettingData") == []

    rv, out = r.InvokeMethod("ImportInitialReplica", rsvc.path, ComputerSystem=rvm.path,
                             InitialReplicationImportLocation=str(export_dir))
    assert rv == 4096
    job = wait_job(r, out["Job"], timeout=120)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert job["JobType"] == 95
    rrel = r.Associators(rvm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
    assert rrel["ReplicationState"] == 3
    assert rrel["LastReplicationTime"] is not None and rrel["LastApplyTime"] is not None

    points = r.Associators(rvm.path, ResultClass="Msvm_VirtualSystemSettingData")
    assert len(points) == 1
    assert points[0]["VirtualSystemType"] == "Microsoft:Hyper-V:Snapshot:Replica:Standard"
    assert points[0]["VirtualSystemIdentifier"] == vm_id

    store = replica.data_dir / "replicas" / vm_id.lower()
    if not store.exists():
        store = replica.data_dir / "replicas" / vm_id
    layers = sorted(store.glob("disk*/p*.qcow2"))
    assert len(layers) == 2, layers
    for layer, source, fmt in [(layers[0], os_disk, "qcow2"), (layers[1], data_disk, "raw")]:
        res = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", fmt, str(layer), str(source)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        check = subprocess.run(["qemu-img", "check", str(layer)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout

    # Importing again is refused by the state machine (the replica is replicating now).
    rv, _ = r.InvokeMethod("ImportInitialReplica", rsvc.path, ComputerSystem=rvm.path,
                           InitialReplicationImportLocation=str(export_dir))
    assert rv == 32775

    # The catalog survives a restart of the replica daemon.
    replica.restart()
    r = replica.conn()
    rvm = r.ExecQuery("WQL", "SELECT * FROM Msvm_ComputerSystem WHERE ElementName = 'web01'")[0]
    assert len(r.Associators(rvm.path, ResultClass="Msvm_VirtualSystemSettingData")) == 1


def test_a_damaged_export_is_refused_and_nothing_is_applied(two_hosts, tmp_path):
    primary, replica = two_hosts
    vm_id = str(uuid.uuid4()).upper()
    disk = tmp_path / "db01.raw"
    run("truncate", "-s", "16M", str(disk))
    with open(disk, "r+b") as f:
        f.write(b"x" * 1_000_000)
    primary.cli("vm", "add", "--name", "db01", "--id", vm_id, "--disk", str(disk))
    primary.cli("enable", "db01", "--replica-server", "hv2.example.org", "--thumbprint", THUMBPRINT)
    export_dir = tmp_path / "export"
    primary.cli("start", "db01", "--type", "export", "--path", str(export_dir))
    log = export_dir / f"db01_{vm_id}" / "initial-replica.vrlog"
    data = bytearray(log.read_bytes())
    data[len(data) // 2] ^= 0x40
    log.write_bytes(bytes(data))

    res = replica.cli("import", "db01", "--path", str(export_dir), check=False)
    assert res.returncode == 4, res.stderr
    assert "rejected" in res.stderr or "checksum" in res.stderr.lower(), res.stderr
    row = [r for r in __import__("json").loads(replica.cli("--output", "json", "status").stdout)["rows"]][0]
    assert row["state"] == "WaitingForInitialReplication"  # put back, nothing applied
    assert not list((replica.data_dir / "replicas").rglob("p*.qcow2"))


def test_an_export_of_a_running_vm_fails_clearly(two_hosts, tmp_path):
    primary, _ = two_hosts
    disk = tmp_path / "run01.raw"
    run("truncate", "-s", "8M", str(disk))
    qmp = tmp_path / "run01.qmp"
    import socket
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(qmp))
    listener.listen(1)
    try:
        primary.cli("vm", "add", "--name", "run01", "--disk", str(disk), "--qmp-socket", str(qmp))
        primary.cli("enable", "run01", "--replica-server", "hv2.example.org", "--thumbprint", THUMBPRINT)
        res = primary.cli("start", "run01", "--type", "export", "--path", str(tmp_path / "x"), check=False)
        assert res.returncode == 4 and "running" in res.stderr, res.stderr
        row = __import__("json").loads(primary.cli("--output", "json", "status").stdout)["rows"][0]
        assert row["state"] == "ReadyForInitialReplication"  # back to 1: the export can be retried
    finally:
        listener.close()
