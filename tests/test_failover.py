"""Issue 5: the failover family driven by pywbem the way an outside tool would: test failover
(never disturbing replication underneath), failover, revert and commit, planned failover and
reverse, resynchronization, and InitiateFailback after an unplanned failover.
"""

import datetime
import json
import os
import re
import shutil
import time

import pytest

from pywbem import CIMDateTime, CIMInstanceName, Uint16

from conftest import free_port, wait_job
from test_two_hosts import (  # noqa: F401  (lab is a fixture)
    compare,
    file_size,
    latest_point_equals,
    plain_log,
    shipped_since,
    PRIMARY,
    REPLICA,
    Qsd,
    applied_sequence,
    ext4_disk,
    intruder,
    lab,
    peer_as,
    put_body,
    raw_peer,
    replicate_network,
    rrsc,
    run,
    settled,
    vm_by_name,
    wait_for,
    wait_port,
)


def test_a_test_failover_sees_one_point_while_three_cycles_run_underneath(lab, tmp_path):
    disk = ext4_disk(tmp_path / "tfo01.qcow2")
    vm_id = replicate_network(lab, tmp_path, "tfo01", [disk], "--no-compression")
    p = lab.primary.conn()
    pvm = vm_by_name(p, "tfo01")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="a delta")
    rrsc(p, pvm, 7)
    point = settled(lab, vm_id)
    expected = tmp_path / "at-point.raw"
    run("qemu-img", "convert", "-O", "raw", disk, expected)

    r = lab.replica.conn()
    rsvc = r.EnumerateInstances("Msvm_ReplicationService")[0]
    rvm = vm_by_name(r, "tfo01")
    rv, out = r.InvokeMethod("TestReplicaSystem", rsvc.path, ComputerSystem=rvm.path)
    assert rv == 4096, rv
    test_path = out["ResultingSystem"]
    job = wait_job(r, out["Job"])
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert job["JobType"] == 102
    test_vm = r.GetInstance(test_path)
    assert test_vm["ElementName"] == "tfo01 - Test"
    assert test_vm["ReplicationMode"] == 3
    assert test_vm["EnabledState"] == 3  # off: the administrator boots it on an isolated network
    linked = r.Associators(rvm.path, AssocClass="Msvm_ReplicaSystemDependency")
    assert [v["Name"] for v in linked] == [test_vm["Name"]]
    assert vm_by_name(r, "tfo01")["ReplicationState"] == 3  # the replica is not disturbed

    overlays = list((lab.storage / vm_id.lower() / "overlays").iterdir())
    assert len(overlays) == 1
    overlay = overlays[0] / "disk0.qcow2"
    same, text = compare(overlay, expected)
    assert same, text
    assert "No errors" in run("qemu-img", "check", overlay).stdout

    # One test VM at a time.
    rv, _ = r.InvokeMethod("TestReplicaSystem", rsvc.path, ComputerSystem=rvm.path)
    assert rv == 32774

    # The test VM writes into its overlay; replication goes on for three cycles underneath.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 2M 64k", overlay)
    run("qemu-img", "convert", "-O", "raw", overlay, tmp_path / "test-vm-view.raw")
    rrsc(p, pvm, 3)
    for k in range(3):
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {0x50 + k} {8 + k}M 128k", disk)
        shipped_since(lab, vm_id, time.time())
    rrsc(p, pvm, 7)
    latest = settled(lab, vm_id)
    same, text = compare(lab.storage / vm_id.lower() / "disk0" / f"p{latest:020}.qcow2", disk, "qcow2")
    assert same, text
    # What the test VM sees did not move: its point plus its own write.
    same, text = compare(overlay, tmp_path / "test-vm-view.raw")
    assert same, text
    # RecoveryHistory 0 keeps only the latest point, and the one the test VM stands on.
    kept = sorted(int(f.stem[1:]) for f in (lab.storage / vm_id.lower()).glob("p*.json"))
    assert kept == [point, latest], kept

    rel = r.Associators(rvm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
    rv, out = r.InvokeMethod("GetReplicationStatisticsEx", rsvc.path, ComputerSystem=rvm.path,
                             ReplicationRelationship=rel.tocimxmlstr())
    assert out["ReplicationStatistics"][0]["LastTestFailoverTime"] is not None

    # DestroySystem removes the test VM and what it wrote; the replica carries on.
    vsms = r.EnumerateInstanceNames("Msvm_VirtualSystemManagementService")[0]
    rv, _ = r.InvokeMethod("DestroySystem", vsms, AffectedSystem=rvm.path)
    assert rv == 32775  # not a test VM
    rv, _ = r.InvokeMethod("DestroySystem", vsms, AffectedSystem=test_path)
    assert rv == 0
    assert vm_by_name(r, "tfo01 - Test") is None
    assert r.Associators(rvm.path, AssocClass="Msvm_ReplicaSystemDependency") == []
    assert list((lab.storage / vm_id.lower() / "overlays").iterdir()) == []

    # Another one, from the CLI, at a point named by its snapshot: the latest.
    snaps = r.Associators(rvm.path, AssocClass="Msvm_SnapshotOfVirtualSystem")
    assert f"RecoveryPoint\\{latest}" in [s["InstanceID"].split("\\", 1)[1] for s in snaps]
    lab.replica.cli("failover", "tfo01", "--test", "--point", str(latest))
    overlays = list((lab.storage / vm_id.lower() / "overlays").iterdir())
    same, text = compare(overlays[0] / "disk0.qcow2", disk, "qcow2")
    assert same, text
    bad = lab.replica.cli("failover", "tfo01", "--test", check=False)
    assert bad.returncode != 0 and "32774" in bad.stdout + bad.stderr
    lab.replica.cli("stop-failover", "tfo01")
    assert vm_by_name(r, "tfo01 - Test") is None
    # A point that is not this VM's is refused.
    other = CIMInstanceName("Msvm_VirtualSystemSettingData", namespace=snaps[0].path.namespace, keybindings={
        "InstanceID": "Microsoft:00000000-0000-0000-0000-000000000000\\RecoveryPoint\\1"})
    rv, _ = r.InvokeMethod("TestReplicaSystem", rsvc.path, ComputerSystem=rvm.path, SnapshotSettingData=other)
    assert rv == 32773
    assert vm_by_name(r, "tfo01")["ReplicationState"] == 3


def vm_disks(daemon, name):
    listed = json.loads(daemon.cli("--output", "json", "vm", "list").stdout)
    return next(v["disks"] for v in listed["vms"] if v["name"] == name)


def test_unplanned_failover_to_an_earlier_point_then_revert_and_commit(lab, tmp_path):
    disk = ext4_disk(tmp_path / "ufo01.qcow2")
    vm_id = replicate_network(lab, tmp_path, "ufo01", [disk], "--no-compression")
    p = lab.primary.conn()
    pvm = vm_by_name(p, "ufo01")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="a delta")
    rrsc(p, pvm, 7)
    early = settled(lab, vm_id)
    run("qemu-img", "convert", "-O", "raw", disk, tmp_path / "early.raw")
    # A test VM keeps the early point while replication moves on (RecoveryHistory 0 keeps only the
    # latest otherwise).
    lab.replica.cli("failover", "ufo01", "--test", "--point", str(early))
    rrsc(p, pvm, 3)
    for k in range(2):
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {0x60 + k} {12 + k}M 256k", disk)
        shipped_since(lab, vm_id, time.time())
    rrsc(p, pvm, 7)
    latest = settled(lab, vm_id)
    assert latest > early
    lab.primary.stop()  # the primary is lost

    r = lab.replica.conn()
    rsvc = r.EnumerateInstances("Msvm_ReplicationService")[0]
    rvm = vm_by_name(r, "ufo01")
    snaps = {s["InstanceID"].rsplit("\\", 1)[1]: s for s in
             r.Associators(rvm.path, AssocClass="Msvm_SnapshotOfVirtualSystem")}
    assert {str(early), str(latest)} <= set(snaps)
    started = time.monotonic()
    rv, out = r.InvokeMethod("InitiateFailover", rsvc.path, ComputerSystem=rvm.path,
                             SnapshotSettingData=snaps[str(early)].path)
    assert rv == 4096, rv
    job = wait_job(r, out["Job"])
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert job["JobType"] == 97
    assert time.monotonic() - started < 10  # an overlay, not a copy
    assert vm_by_name(r, "ufo01")["ReplicationState"] == 5
    rel = r.Associators(rvm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
    assert rel["FailedOverReplicationType"] == 1
    (disk_now,) = vm_disks(lab.replica, "ufo01")
    same, text = compare(disk_now, tmp_path / "early.raw")
    assert same, text
    lab.replica.cli("stop-failover", "ufo01")  # the failover itself keeps the early point
    # The failed-over VM can be started from its definition: the start command finds its current
    # disk in $VMREPLICA_DISK0 (qemu-storage-daemon stands in for QEMU).
    qmp = tmp_path / "ufo01.qmp"
    start = ("qemu-storage-daemon --blockdev driver=file,node-name=f0,filename=$VMREPLICA_DISK0 "
             "--blockdev driver=qcow2,node-name=d0,file=f0 "
             f"--chardev socket,id=m0,path={qmp},server=on,wait=off --monitor chardev=m0 "
             f"--daemonize --pidfile {tmp_path / 'ufo01.pid'}")
    lab.replica.cli("vm", "power", "ufo01", "--qmp-socket", str(qmp), "--start-command", start)
    rv, _ = r.InvokeMethod("RequestStateChange", rvm.path, RequestedState=Uint16(2))
    assert rv == 0
    assert vm_by_name(r, "ufo01")["EnabledState"] == 2
    rv, _ = r.InvokeMethod("CommitFailover", rsvc.path, ComputerSystem=rvm.path)
    assert rv == 32775  # not while it runs
    rv, _ = r.InvokeMethod("RequestStateChange", rvm.path, RequestedState=Uint16(3))
    assert rv == 0 and vm_by_name(r, "ufo01")["EnabledState"] == 3
    # The failed-over VM writes; a bad choice is reverted and the queued state comes back.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x7a 1M 64k", disk_now)
    rv, out = r.InvokeMethod("RevertFailover", rsvc.path, ComputerSystem=rvm.path)
    assert rv == 4096 and wait_job(r, out["Job"])["JobState"] == 7
    assert vm_by_name(r, "ufo01")["ReplicationState"] == 3
    assert vm_disks(lab.replica, "ufo01") == []
    assert not (lab.storage / vm_id.lower() / "overlays" / "failover").exists()

    # Fail over again, to the latest point, from the CLI; then commit.
    lab.replica.cli("failover", "ufo01")
    assert vm_by_name(r, "ufo01")["ReplicationState"] == 5
    (disk_now,) = vm_disks(lab.replica, "ufo01")
    same, text = compare(disk_now, disk, "qcow2")
    assert same, text
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x7b 2M 64k", disk_now)
    run("qemu-img", "convert", "-O", "raw", disk_now, tmp_path / "failed-over.raw")
    lab.replica.cli("complete", "ufo01")
    assert vm_by_name(r, "ufo01")["ReplicationState"] == 6
    (committed,) = vm_disks(lab.replica, "ufo01")
    same, text = compare(committed, tmp_path / "failed-over.raw")
    assert same, text
    assert "No errors" in run("qemu-img", "check", committed).stdout
    assert "backing file" not in run("qemu-img", "info", committed).stdout  # standalone
    assert r.Associators(rvm.path, AssocClass="Msvm_SnapshotOfVirtualSystem") == []
    assert not (lab.storage / vm_id.lower()).exists()
    rv, _ = r.InvokeMethod("RevertFailover", rsvc.path, ComputerSystem=rvm.path)
    assert rv == 32775  # committed: no going back


def test_planned_failover_loses_nothing_and_can_be_cancelled(lab, tmp_path):
    disk = ext4_disk(tmp_path / "pfo01.qcow2")
    vm_id = replicate_network(lab, tmp_path, "pfo01", [disk], "--no-compression")
    p = lab.primary.conn()
    pvm = vm_by_name(p, "pfo01")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="a delta")
    # The last writes before the VM stopped; prepare at once, before any cycle could ship them.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x44 6M 320k", "-c", "write -z 7M 64k", disk)
    rv, out = p.InvokeMethod("RequestReplicationStateChange", pvm.path, RequestedState=Uint16(4))
    assert rv == 4096, rv
    job = wait_job(p, out["Job"], timeout=60)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert vm_by_name(p, "pfo01")["ReplicationState"] == 4
    prel = p.Associators(pvm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
    assert prel["LastReplicationType"] == 3  # planned
    # The replica got a planned point too (it said Regular for every log).
    r = lab.replica.conn()
    rrel = r.Associators(vm_by_name(r, "pfo01").path, AssocClass="Msvm_SystemReplicationRelationship")[0]
    assert rrel["LastReplicationType"] == 3
    # Locked from starting.
    rv, _ = p.InvokeMethod("RequestStateChange", pvm.path, RequestedState=Uint16(2))
    assert rv == 32775
    # The final point is applied and equals the disk: nothing is lost.
    # Its apply is over, the prune that follows it maybe not (it may hold the newest layer).
    seq = settled(lab, vm_id)
    meta = json.loads((lab.storage / vm_id.lower() / f"p{seq:020}.json").read_text())
    assert "PlannedFailover" in json.dumps(meta), meta
    same, text = compare(lab.storage / vm_id.lower() / "disk0" / f"p{seq:020}.qcow2", disk, "qcow2")
    assert same, text

    # The replica fails over to it: a planned failover.
    r = lab.replica.conn()
    rsvc = r.EnumerateInstances("Msvm_ReplicationService")[0]
    rvm = vm_by_name(r, "pfo01")
    lab.replica.cli("failover", "pfo01")
    rel = r.Associators(rvm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
    assert rel["ReplicationState"] == 5 and rel["FailedOverReplicationType"] == 3
    (disk_now,) = vm_disks(lab.replica, "pfo01")
    same, text = compare(disk_now, disk, "qcow2")
    assert same, text

    # Changed minds: revert on both sides; replication goes on from the primary.
    lab.replica.cli("revert", "pfo01")
    rv, out = p.InvokeMethod("RevertFailover", p.EnumerateInstances("Msvm_ReplicationService")[0].path,
                             ComputerSystem=pvm.path)
    assert rv in (0, 4096), rv
    if rv == 4096:
        assert wait_job(p, out["Job"])["JobState"] == 7
    assert vm_by_name(p, "pfo01")["ReplicationState"] == 3
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x45 9M 64k", disk)
    shipped_since(lab, vm_id, time.time())
    rrsc(p, pvm, 7)
    seq = settled(lab, vm_id)
    same, text = compare(lab.storage / vm_id.lower() / "disk0" / f"p{seq:020}.qcow2", disk, "qcow2")
    assert same, text


def serve(daemon, thumbprint, allowed, storage):
    """Makes `daemon` a recovery server for `allowed` on a free port; returns the port."""
    port = free_port()
    storage.mkdir(exist_ok=True)
    daemon.cli("server", "set", "--enable", "--thumbprint", thumbprint, "--https-port", str(port))
    daemon.cli("auth", "add", "--primary", allowed, "--storage", str(storage))
    wait_port(port)
    return port


def points_taken_after(store, t):
    """The sequences of the points in point store `store` taken after wall time `t` (their cycle
    began after it); a point pruned meanwhile is left out."""
    seqs = []
    for f in store.glob("p*.json"):
        try:
            if json.loads(f.read_text())["time_micros"] / 1e6 > t:
                seqs.append(int(f.stem[1:]))
        except FileNotFoundError:
            pass
    return seqs


def test_only_the_recovery_server_a_vm_replicates_to_can_reverse_it(lab, tmp_path):
    """A host the old primary's authorization table allows, but not the recovery server its
    turned-off VM replicates to, says it is (in the request's primary_connection_point) and asks
    the VM to become its replica, as after an unplanned failover. Refused: the sender is who its
    certificate names. (The request was believed: the VM became the intruder's replica and its
    chain to the recovery server was dropped.)"""
    disk = tmp_path / "own01.raw"
    run("truncate", "-s", "16M", disk)
    vm_id = replicate_network(lab, tmp_path, "own01", [disk], "--no-compression")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, what="initial replication")
    p = lab.primary.conn()
    rrsc(p, vm_by_name(p, "own01"), 7)
    hv1_storage = tmp_path / "hv1-storage"
    port1 = serve(lab.primary, lab.t1, "*.lab.example", hv1_storage)
    certs, t3 = intruder(lab)
    body = put_body("own01", [("disk0", 16 << 20)])
    body["primary_connection_point"] = REPLICA
    body["reverse"] = {"sequence": 1, "log_hash": "0" * 64, "resync": True}
    with peer_as(lab, certs, t3, port1) as c:
        res = c.put(f"/vmreplica/v1/vms/{vm_id.lower()}", json=body)
    assert res.status_code == 403 and res.json()["error"]["name"] == "AccessDenied", res.text
    pvm = vm_by_name(p, "own01")
    assert (pvm["ReplicationMode"], pvm["ReplicationState"]) == (1, 7)  # still the primary, suspended
    assert not hv1_storage.exists() or list(hv1_storage.iterdir()) == []
    rrsc(p, pvm, 3)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 3M 64k", disk)
    seq = shipped_since(lab, vm_id, time.time())
    same, text = compare(lab.storage / vm_id.lower() / "disk0" / f"p{seq:020}.qcow2", disk)
    assert same, text


def test_planned_failover_and_reverse_continue_without_resynchronization(lab, tmp_path):
    disk = ext4_disk(tmp_path / "rev01.qcow2")
    vm_id = replicate_network(lab, tmp_path, "rev01", [disk], "--no-compression")
    p, r = lab.primary.conn(), lab.replica.conn()
    pvm = vm_by_name(p, "rev01")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="a delta")
    # The old primary must accept replication from the replica once the roles swap.
    hv1_storage = tmp_path / "hv1-storage"
    port1 = serve(lab.primary, lab.t1, REPLICA, hv1_storage)

    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x4c 5M 128k", disk)
    lab.primary.cli("prepare-failover", "rev01")
    point = applied_sequence(lab, vm_id)
    lab.replica.cli("failover", "rev01")
    (new_disk,) = vm_disks(lab.replica, "rev01")
    # The failed-over VM writes before the reverse: that goes with the first log the other way.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x4d 17M 64k", new_disk)

    rvm = vm_by_name(r, "rev01")
    rsvc = r.EnumerateInstances("Msvm_ReplicationService")[0]
    rsd = r.Associators(rvm.path, ResultClass="Msvm_ReplicationSettingData")[0]
    rsd["RecoveryConnectionPoint"] = PRIMARY
    rsd["RecoveryServerPortNumber"] = Uint16(port1)
    rsd["AuthenticationType"] = Uint16(2)
    rsd["CertificateThumbPrint"] = lab.t2
    rv, out = r.InvokeMethod("ReverseReplicationRelationship", rsvc.path, ComputerSystem=rvm.path,
                             ReplicationSettingData=rsd.tocimxmlstr())
    assert rv == 4096, rv
    job = wait_job(r, out["Job"], timeout=60)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert job["JobType"] == 104
    rvm, pvm = vm_by_name(r, "rev01"), vm_by_name(p, "rev01")
    assert (rvm["ReplicationMode"], rvm["ReplicationState"]) == (1, 3)  # the new primary
    assert (pvm["ReplicationMode"], pvm["ReplicationState"]) == (2, 3)  # the new replica
    store1 = hv1_storage / vm_id.lower()
    # Its own disks, taken as the common point (a first delta from hv2 may already have pruned it).
    held = [int(f.stem[1:]) for f in store1.glob("p*.json")]
    assert held and min(held) >= point, held
    assert vm_disks(lab.primary, "rev01") == []  # a replica's data is its recovery points

    # Delta replication goes on in the new direction: only what the new primary wrote travels.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5d 11M 192k", new_disk)
    written = time.time()
    fresh = wait_for(lambda: points_taken_after(store1, written), timeout=30,
                     what="a point hv2 took after its write")
    # hv1 prunes the point before each new one, merging the new one down into it: the latest
    # layer may be locked or renamed for a moment, so the comparison is asked again then.
    latest_point_equals(store1, new_disk, "qcow2", at_least=min(fresh))
    rrsc(r, rvm, 7)
    rel = r.Associators(rvm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
    rv, out = r.InvokeMethod("GetReplicationStatisticsEx", rsvc.path, ComputerSystem=rvm.path,
                             ReplicationRelationship=rel.tocimxmlstr())
    stats = out["ReplicationStatistics"][0]
    # No resynchronization: the deltas carry the 192 KiB written, not the disk.
    assert 0 < int(stats["ReplicationSize"]) < 2 << 20, stats["ReplicationSize"]

    # And back: a planned failover to the old primary and a second reverse; replication continues
    # in the original direction.
    rrsc(r, rvm, 3)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x6e 13M 64k", new_disk)
    lab.replica.cli("prepare-failover", "rev01")
    back = max(int(f.stem[1:]) for f in store1.glob("p*.json"))
    lab.primary.cli("failover", "rev01")
    (home_disk,) = vm_disks(lab.primary, "rev01")
    same, text = compare(home_disk, new_disk, "qcow2")
    assert same, text
    # This time from the CLI (Set-VMReplication -Reverse).
    lab.primary.cli("reverse", "rev01", "--replica-server", REPLICA, "--replica-port", str(lab.port),
                    "--thumbprint", lab.t1)
    pvm, rvm = vm_by_name(p, "rev01"), vm_by_name(r, "rev01")
    assert (pvm["ReplicationMode"], pvm["ReplicationState"]) == (1, 3)
    assert (rvm["ReplicationMode"], rvm["ReplicationState"]) == (2, 3)
    # The overlay hv2 ran on was taken in as the common point and is gone.
    assert list((lab.storage / vm_id.lower() / "overlays").iterdir()) == []
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x7f 15M 64k", home_disk)
    assert shipped_since(lab, vm_id, time.time()) > back  # a log in the original direction
    rrsc(p, pvm, 7)
    seq = settled(lab, vm_id)
    same, text = compare(lab.storage / vm_id.lower() / "disk0" / f"p{seq:020}.qcow2", home_disk, "qcow2")
    assert same, text


def test_a_reverse_onto_disks_changed_behind_the_lock_is_refused(lab, tmp_path):
    disk = ext4_disk(tmp_path / "rev02.qcow2")
    vm_id = replicate_network(lab, tmp_path, "rev02", [disk], "--no-compression")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="a delta")
    port1 = serve(lab.primary, lab.t1, REPLICA, tmp_path / "hv1-storage")
    lab.primary.cli("prepare-failover", "rev02")
    lab.replica.cli("failover", "rev02")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x13 3M 64k", disk)  # behind the lock
    r = lab.replica.conn()
    rvm = vm_by_name(r, "rev02")
    rsd = r.Associators(rvm.path, ResultClass="Msvm_ReplicationSettingData")[0]
    rsd["RecoveryConnectionPoint"] = PRIMARY
    rsd["RecoveryServerPortNumber"] = Uint16(port1)
    rsd["CertificateThumbPrint"] = lab.t2
    rv, out = r.InvokeMethod("ReverseReplicationRelationship", r.EnumerateInstances("Msvm_ReplicationService")[0].path,
                             ComputerSystem=rvm.path, ReplicationSettingData=rsd.tocimxmlstr())
    assert rv == 4096
    job = wait_job(r, out["Job"], timeout=60)
    assert job["JobState"] != 7
    assert "changed after its final log" in job["ErrorDescription"], job["ErrorDescription"]
    # Nothing moved: both sides are where they were, and nothing is left on the old primary.
    assert vm_by_name(r, "rev02")["ReplicationState"] == 5
    assert vm_by_name(lab.primary.conn(), "rev02")["ReplicationState"] == 4
    assert not (tmp_path / "hv1-storage" / vm_id.lower()).exists()


def test_a_resync_after_the_tracking_data_was_deleted_sends_only_the_differing_blocks(lab, tmp_path):
    disk = ext4_disk(tmp_path / "rsy01.qcow2", payload_bytes=6_000_000)
    vm_id = replicate_network(lab, tmp_path, "rsy01", [disk], "--no-compression", "--recovery-history", "2")
    p = lab.primary.conn()
    pvm = vm_by_name(p, "rsy01")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="a delta")
    rrsc(p, pvm, 7)
    settled(lab, vm_id)
    # The tracking data is lost; the VM writes meanwhile.
    shutil.rmtree(lab.primary.data_dir / "tracking" / vm_id.upper())
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x21 30M 192k", "-c", "write -z 31M 64k", disk)
    rrsc(p, pvm, 3)
    wait_for(lambda: vm_by_name(p, "rsy01")["ReplicationState"] == 9, what="resynchronization required")
    before = applied_sequence(lab, vm_id)

    svc = p.EnumerateInstances("Msvm_ReplicationService")[0]
    # Scheduled 3 s ahead (StartTime): the job waits for it.
    start = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=3)
    t0 = time.monotonic()
    rv, out = p.InvokeMethod("Resynchronize", svc.path, ComputerSystem=pvm.path, StartTime=CIMDateTime(start))
    assert rv == 4096, rv
    job = wait_job(p, out["Job"], timeout=60)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert job["JobType"] == 107
    assert time.monotonic() - t0 >= 2, "it started before its StartTime"
    assert "Scheduled: starts at" in job["Description"], job["Description"]
    assert vm_by_name(p, "rsy01")["ReplicationState"] == 3
    wait_for(lambda: applied_sequence(lab, vm_id) > before, what="the resync applied")
    rrsc(p, pvm, 7)
    seq = settled(lab, vm_id)
    with raw_peer(lab) as c:
        sent = c.get(f"/vmreplica/v1/vms/{vm_id.lower()}/logs/{before + 1}").json()
    # Three changed blocks and one zeroed travel, not the 6 MB the disk holds.
    assert sent["log_bytes"] < 400_000, sent
    store = lab.storage / vm_id.lower()
    same, text = compare(store / "disk0" / f"p{seq:020}.qcow2", disk, "qcow2")
    assert same, text
    # The older recovery points are gone, as after a Hyper-V resync (whatever RecoveryHistory says).
    assert sorted(int(f.stem[1:]) for f in store.glob("p*.json")) == [before + 1]
    assert "resynchronization applied; the older recovery points go" in lab.replica.log.read_text()
    # Both sides hashed at once: every range found the replica's hashes already made.
    closed = re.findall(r"blocks_hashed_ahead=(\d+) blocks_read_by_ranges=(\d+)", plain_log(lab.replica))
    assert closed and int(closed[-1][0]) > 0 and closed[-1][1] == "0", closed

    # Deltas continue from the resynchronized point.
    rrsc(p, pvm, 3)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 33M 64k", disk)
    shipped_since(lab, vm_id, time.time())
    rrsc(p, pvm, 7)
    seq = settled(lab, vm_id)
    same, text = compare(store / "disk0" / f"p{seq:020}.qcow2", disk, "qcow2")
    assert same, text


def test_unplanned_failover_reverse_and_resync_send_only_what_diverged(lab, tmp_path):
    disk = ext4_disk(tmp_path / "ufo02.qcow2", payload_bytes=6_000_000)
    vm_id = replicate_network(lab, tmp_path, "ufo02", [disk], "--no-compression")
    p, r = lab.primary.conn(), lab.replica.conn()
    pvm = vm_by_name(p, "ufo02")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="a delta")
    rrsc(p, pvm, 7)  # from here the old primary's writes never replicate
    settled(lab, vm_id)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x31 20M 256k", disk)
    hv1_storage = tmp_path / "hv1-storage"
    port1 = serve(lab.primary, lab.t1, REPLICA, hv1_storage)
    lab.primary.stop()  # the old primary is lost

    lab.replica.cli("failover", "ufo02")
    lab.replica.cli("complete", "ufo02")
    lab.replica.cli("reverse", "ufo02", "--replica-server", PRIMARY, "--replica-port", str(port1),
                    "--thumbprint", lab.t2)
    rvm = vm_by_name(r, "ufo02")
    assert (rvm["ReplicationMode"], rvm["ReplicationState"]) == (1, 9)  # waits for a resync
    (new_disk,) = vm_disks(lab.replica, "ufo02")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x32 40M 128k", new_disk)  # the new primary writes

    lab.primary.start()  # the old primary is back, holding writes that never replicated
    lab.replica.cli("resync", "ufo02")
    rvm, pvm = vm_by_name(r, "ufo02"), vm_by_name(p := lab.primary.conn(), "ufo02")
    assert (rvm["ReplicationMode"], rvm["ReplicationState"]) == (1, 3)
    assert pvm["ReplicationMode"] == 2
    store1 = hv1_storage / vm_id.lower()

    def points():
        return sorted(int(f.stem[1:]) for f in store1.glob("p*.json"))

    imported = points()[0]  # the old primary's own disks, as they were
    # The resync log is applied on top, then only it stays.
    wait_for(lambda: points() == [imported + 1], what="the resync applied on the old primary")
    latest_point_equals(store1, new_disk, "qcow2")  # (or a delta after it, which changes nothing)
    # Only what diverged travelled: 256 KiB on one side, 128 KiB on the other, not the disk.
    rel = r.Associators(rvm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
    rv, out = r.InvokeMethod("GetReplicationStatisticsEx", r.EnumerateInstances("Msvm_ReplicationService")[0].path,
                             ComputerSystem=rvm.path, ReplicationRelationship=rel.tocimxmlstr())
    divergent = (256 + 128) << 10
    sent = int(out["ReplicationStatistics"][0]["ReplicationSize"])  # the resync log, counted
    # The new primary's 128 KiB travel as data; the old primary's 256 KiB are undone by zero
    # records (those blocks were empty at the failover point), which carry no data.
    assert (128 << 10) < sent <= 1.1 * divergent + (64 << 10), sent
    # The old primary's own image file is kept as it was.
    assert disk.exists()
    # The old primary hashed its disks while it copied them: the compare read nothing more.
    log1 = plain_log(lab.primary)
    assert "the replica's hashes of disk 0 come from the map its copy made" in log1
    closed = re.findall(r"blocks_hashed_ahead=(\d+) blocks_read_by_ranges=(\d+)", log1)
    assert closed and int(closed[-1][0]) > 0 and closed[-1][1] == "0", closed
    # Deltas flow in the new direction.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 44M 64k", new_disk)
    wait_for(lambda: points()[-1] > imported + 1, what="a delta to the old primary")
    rrsc(r, rvm, 7)
    wait_for(lambda: compare(store1 / "disk0" / f"p{points()[-1]:020}.qcow2", new_disk, "qcow2")[0],
             what="the old primary's latest point to equal the new primary's disk")


def test_removing_a_failed_over_vms_replication_forgets_its_failover(lab, tmp_path):
    """The relationship of a replica VM failed over and committed is removed: its failover record
    goes with it, so a later relationship of the VM (a seeded replication, a resynchronization)
    does not take itself for the reverse of that failover."""
    import sqlite3

    disk = ext4_disk(tmp_path / "fgt01.qcow2")
    vm_id = replicate_network(lab, tmp_path, "fgt01", [disk], "--no-compression")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, what="point 1")
    lab.primary.stop()
    lab.replica.cli("failover", "fgt01")
    # Failed over, not committed: the VM runs on disks of a recovery point, so the removal is
    # refused (32775) until the failover is completed or cancelled, and nothing changes.
    (overlay,) = vm_disks(lab.replica, "fgt01")
    refused = lab.replica.cli("disable", "fgt01", check=False)
    assert refused.returncode != 0 and "32775" in refused.stderr, refused.stderr
    assert "CommitFailover" in refused.stderr, refused.stderr
    rvm = vm_by_name(lab.replica.conn(), "fgt01")
    assert (rvm["ReplicationMode"], rvm["ReplicationState"]) == (2, 5)
    assert vm_disks(lab.replica, "fgt01") == [overlay] and os.path.isfile(overlay)
    lab.replica.cli("complete", "fgt01")

    def failovers():
        db = sqlite3.connect(f"file:{lab.replica.data_dir / 'vmreplica.db'}?mode=ro", uri=True)
        try:
            return db.execute("SELECT count(*) FROM failovers WHERE vm = ?", (vm_id.lower(),)).fetchone()[0]
        finally:
            db.close()

    assert failovers() == 1
    lab.replica.cli("disable", "fgt01")
    assert vm_by_name(lab.replica.conn(), "fgt01")["ReplicationMode"] == 0
    assert failovers() == 0


def test_a_removed_relationship_and_vm_definition_let_replication_start_over(lab, tmp_path):
    disk = ext4_disk(tmp_path / "again01.qcow2")
    vm_id = replicate_network(lab, tmp_path, "again01", [disk], "--no-compression")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, what="point 1")
    bad = lab.replica.cli("vm", "remove", "again01", check=False)
    assert bad.returncode != 0 and "relationship" in bad.stderr  # disable first
    lab.primary.cli("disable", "again01")
    lab.replica.cli("disable", "again01")
    lab.replica.cli("vm", "remove", "again01")
    assert vm_by_name(lab.replica.conn(), "again01") is None
    # Replication starts over: the recovery server makes a new replica VM with the same GUID.
    lab.primary.cli("enable", "again01", "--replica-server", REPLICA, "--replica-port", str(lab.port),
                    "--thumbprint", lab.t1, "--frequency", "30", "--no-compression")
    lab.primary.cli("start", "again01")
    assert vm_by_name(lab.replica.conn(), "again01")["ReplicationMode"] == 2
    wait_for(lambda: vm_by_name(lab.replica.conn(), "again01")["ReplicationState"] == 3,
             what="the new replica applying its first point")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x2a 4M 64k", disk)
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="a delta of the new relationship")
    # The old recovery points were moved aside, not deleted.
    assert list(lab.storage.glob(f"{vm_id.lower()}.removed-*"))


def enable_seeded(lab, p, name):
    """Enables VM `name` on the primary `p` towards the lab's replica (which holds a copy already)
    and runs a seeded initial replication (StartReplication type 3) through pywbem to its end;
    returns the VM."""
    lab.primary.cli("enable", name, "--replica-server", REPLICA, "--replica-port", str(lab.port),
                    "--thumbprint", lab.t1, "--no-compression")
    svc = p.EnumerateInstances("Msvm_ReplicationService")[0]
    vm = vm_by_name(p, name)
    rv, out = p.InvokeMethod("StartReplication", svc.path, ComputerSystem=vm.path,
                             InitialReplicationType=Uint16(3))
    assert rv == 4096, rv
    job = wait_job(p, out["Job"], timeout=120)
    assert job["JobState"] == 7, job["ErrorDescription"]
    return vm


def test_a_replica_vm_kept_after_its_relationship_was_removed_seeds_the_next_one(lab, tmp_path):
    """Spec §13.7: removed on both sides, the replica VM stays and can seed a new relationship.
    Made a replica again, a seeded initial replication compares the primary's disk with the
    replica's latest point and sends only what changed since; replication goes on from there."""
    disk = ext4_disk(tmp_path / "kept01.qcow2", payload_bytes=6_000_000)
    vm_id = replicate_network(lab, tmp_path, "kept01", [disk], "--no-compression")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, what="point 1")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x2a 4M 64k", disk)
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="a delta")
    p = lab.primary.conn()
    rrsc(p, vm_by_name(p, "kept01"), 7)
    kept = settled(lab, vm_id)
    store = lab.storage / vm_id.lower()

    def points():
        return sorted(int(f.stem[1:]) for f in store.glob("p*.json"))

    lab.primary.cli("disable", "kept01")
    lab.replica.cli("disable", "kept01")
    # Written while nothing replicates: what the new relationship must send.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x2b 9M 128k", "-c", "write -z 1M 64k", disk)

    lab.replica.cli("enable-as-replica", "kept01")
    # An exported initial replica cannot go on top of the kept points: refused, saying the way.
    export = tmp_path / "usb" / f"kept01_{vm_id}"
    export.mkdir(parents=True)
    (export / "initial-replica.vrlog").write_bytes(b"not looked at")
    refused = lab.replica.cli("import", "kept01", "--path", str(tmp_path / "usb"), check=False)
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    assert "already holds recovery points" in said, said
    assert points()[-1] == kept
    assert vm_by_name(lab.replica.conn(), "kept01")["ReplicationState"] == 2
    vm = enable_seeded(lab, p, "kept01")
    assert vm_by_name(p, "kept01")["ReplicationState"] == 3
    wait_for(lambda: applied_sequence(lab, vm_id) >= kept + 1, what="the differences to be applied")
    with raw_peer(lab) as c:
        sent = c.get(f"/vmreplica/v1/vms/{vm_id.lower()}/logs/{kept + 1}").json()
    # The two changed ranges (192 KiB) travel, not the 6 MB the disk holds.
    assert sent["log_bytes"] < 400_000, sent
    assert "latest point this replica VM kept" in lab.replica.log.read_text()
    assert vm_by_name(lab.replica.conn(), "kept01")["ReplicationState"] == 3
    rrsc(p, vm, 7)
    latest_point_equals(store, disk, "qcow2", at_least=settled(lab, vm_id))
    # The old relationship's points went at its apply, as after a resynchronization (so the log
    # says; points this young would also merge under the hourly retention).
    assert all(n > kept for n in points()), points()
    assert re.search(rf"resynchronization applied; the older recovery points go.*sequence={kept + 1}\b",
                     plain_log(lab.replica)), plain_log(lab.replica)[-3000:]
    # Deltas go on from there.
    rrsc(p, vm, 3)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x2c 12M 64k", disk)
    shipped_since(lab, vm_id, time.time())
    rrsc(p, vm, 7)
    latest_point_equals(store, disk, "qcow2", at_least=settled(lab, vm_id))


def test_logs_a_replica_had_not_applied_when_its_relationship_was_removed_are_dropped_with_it(lab, tmp_path):
    """A log committed on the replica whose apply cannot go on (its point store made immutable)
    when the relationship is removed: the removal drops it and its file, and says so; the kept
    replica VM holds its latest applied point. Made a replica again, it waits for its initial
    replication (the old log used to be applied then, moving it to 3 with no primary), and a seeded
    start sends what differs from that point."""
    import subprocess

    disk = ext4_disk(tmp_path / "kept02.qcow2", payload_bytes=2_000_000)
    vm_id = replicate_network(lab, tmp_path, "kept02", [disk], "--no-compression")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 1, what="point 1")
    p = lab.primary.conn()
    vm = vm_by_name(p, "kept02")
    rrsc(p, vm, 7)
    kept = settled(lab, vm_id)
    store = lab.storage / vm_id.lower()
    frozen = [str(store), *map(str, store.glob("disk*"))]
    if subprocess.run(["chattr", "+i", *frozen], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 1M 64k", disk)
        rrsc(p, vm, 3)
        wait_for(lambda: re.search(rf"log committed.*sequence={kept + 1}\b", plain_log(lab.replica)),
                 what="the next log committed")
        rrsc(p, vm, 7)
        wait_for(lambda: "applying the log failed" in plain_log(lab.replica), what="its apply failing")
        committed = store / "incoming" / f"{kept + 1:020}.vrlog"
        assert committed.exists()
        lab.primary.cli("disable", "kept02")
        removed = lab.replica.cli("disable", "kept02")
    finally:
        subprocess.run(["chattr", "-i", *frozen], check=True)
    assert not committed.exists()
    assert "1 received log(s) not applied yet were dropped" in removed.stdout, removed.stdout
    assert max(int(f.stem[1:]) for f in store.glob("p*.json")) == kept

    lab.replica.cli("enable-as-replica", "kept02")
    time.sleep(6)  # the apply task retries a failed log within 5 s
    assert vm_by_name(lab.replica.conn(), "kept02")["ReplicationState"] == 2
    assert max(int(f.stem[1:]) for f in store.glob("p*.json")) == kept
    vm = enable_seeded(lab, p, "kept02")
    rrsc(p, vm, 7)
    latest_point_equals(store, disk, "qcow2", at_least=settled(lab, vm_id))


def test_failback_after_an_unplanned_failover_sends_only_what_diverged_and_the_vm_goes_home(lab, tmp_path):
    """The whole life of issue 5: replication, an unplanned failover to an earlier point, writes on
    both sides, InitiateFailback on the old primary, then a planned failover and a reverse home."""
    disk = ext4_disk(tmp_path / "fb01.qcow2", payload_bytes=6_000_000)
    vm_id = replicate_network(lab, tmp_path, "fb01", [disk], "--no-compression")
    p = lab.primary.conn()
    pvm = vm_by_name(p, "fb01")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="a delta")
    rrsc(p, pvm, 7)
    early = settled(lab, vm_id)
    lab.replica.cli("failover", "fb01", "--test", "--point", str(early))  # keeps the early point
    rrsc(p, pvm, 3)
    # Two logs the replica will never apply as the VM's state: the failover goes to `early`.
    for k in range(2):
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {0x21 + k} {20 + k}M 256k", disk)
        shipped_since(lab, vm_id, time.time())
    rrsc(p, pvm, 7)
    settled(lab, vm_id)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x23 30M 256k", disk)  # never replicated
    hv1_storage = tmp_path / "hv1-storage"
    port1 = serve(lab.primary, lab.t1, REPLICA, hv1_storage)
    lab.primary.stop()  # the primary is lost

    lab.replica.cli("failover", "fb01", "--point", str(early))
    lab.replica.cli("stop-failover", "fb01")
    (overlay,) = vm_disks(lab.replica, "fb01")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x24 40M 128k", overlay)  # before the commit
    lab.replica.cli("complete", "fb01")
    (new_disk,) = vm_disks(lab.replica, "fb01")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x25 44M 64k", new_disk)  # after it
    divergent = (256 * 3 + 128 + 64) << 10

    lab.primary.start()  # back, holding writes that never replicated
    p = lab.primary.conn()
    pvm = vm_by_name(p, "fb01")
    psvc = p.EnumerateInstances("Msvm_ReplicationService")[0]
    rsd = p.Associators(pvm.path, ResultClass="Msvm_ReplicationSettingData")[0]
    assert rsd["RecoveryConnectionPoint"] == REPLICA  # names the new primary
    rv, out = p.InvokeMethod("InitiateFailback", psvc.path, ComputerSystem=pvm.path,
                             ReplicationSettingData=rsd.tocimxmlstr(), RecoveryPointIdentifier="")
    assert rv == 4096, rv
    job = wait_job(p, out["Job"], timeout=120)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert job["JobType"] == 124
    assert "Only the blocks either side wrote" in job["Description"], job["Description"]
    print("failback job:", job["Description"])
    # The old primary's own writes since its last log came from its disk's bitmap, not a scan,
    # and the new primary read only its candidate blocks (its own 192 KiB; the old primary's
    # blocks are holes there), not its 64 MiB disk.
    assert "as its bitmap says" in job["Description"], job["Description"]
    read = float(re.search(r"([\d.]+) MiB of the disks read", job["Description"]).group(1))
    assert read <= 0.3, job["Description"]
    pvm = vm_by_name(p, "fb01")
    assert (pvm["ReplicationMode"], pvm["ReplicationState"]) == (2, 14)
    r = lab.replica.conn()
    rvm = vm_by_name(r, "fb01")
    assert (rvm["ReplicationMode"], rvm["ReplicationState"]) == (1, 3)
    store1 = hv1_storage / vm_id.lower()
    last = latest_point_equals(store1, new_disk, "qcow2")
    # The old primary's image file was taken in without a copy.
    assert not disk.exists()
    # Only what diverged travelled.
    rsvc = r.EnumerateInstances("Msvm_ReplicationService")[0]
    rel = r.Associators(rvm.path, AssocClass="Msvm_SystemReplicationRelationship")[0]
    rv, out = r.InvokeMethod("GetReplicationStatisticsEx", rsvc.path, ComputerSystem=rvm.path,
                             ReplicationRelationship=rel.tocimxmlstr())
    sent = int(out["ReplicationStatistics"][0]["ReplicationSize"])
    print(f"failback log: {sent} bytes for {divergent} divergent bytes")
    assert (192 << 10) < sent <= 1.1 * divergent + (64 << 10), sent

    # Deltas flow from the new primary; then a planned failover and a reverse bring the VM home.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x26 48M 64k", new_disk)
    wait_for(lambda: max(int(f.stem[1:]) for f in store1.glob("p*.json")) > last,
             timeout=30, what="a delta to the old primary")
    wait_for(lambda: vm_by_name(p, "fb01")["ReplicationState"] == 3, what="an ordinary replica again")
    lab.replica.cli("prepare-failover", "fb01")
    lab.primary.cli("failover", "fb01")
    (home_disk,) = vm_disks(lab.primary, "fb01")
    same, text = compare(home_disk, new_disk, "qcow2")
    assert same, text
    lab.primary.cli("reverse", "fb01", "--replica-server", REPLICA, "--replica-port", str(lab.port),
                    "--thumbprint", lab.t1)
    pvm, rvm = vm_by_name(p, "fb01"), vm_by_name(r, "fb01")
    assert (pvm["ReplicationMode"], pvm["ReplicationState"]) == (1, 3)  # no resynchronization
    assert (rvm["ReplicationMode"], rvm["ReplicationState"]) == (2, 3)
    back = applied_sequence(lab, vm_id)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x27 52M 64k", home_disk)
    assert shipped_since(lab, vm_id, time.time()) > back  # a log in the original direction
    rrsc(p, pvm, 7)
    seq = settled(lab, vm_id)
    same, text = compare(lab.storage / vm_id.lower() / "disk0" / f"p{seq:020}.qcow2", home_disk, "qcow2")
    assert same, text
    assert port1


def test_a_failback_to_a_named_recovery_point_before_the_commit_brings_both_hosts_to_that_point(lab, tmp_path):
    """InitiateFailback with a RecoveryPointIdentifier of the new primary while its failover is not
    committed: both hosts end at exactly that point (the new primary's uncommitted writes are
    dropped), and only the old primary's blocks written since that point are compared. Refused by
    the old primary, nothing is dropped; cancelled once the new primary moved, it runs again."""
    import os

    lab.replica.stop()
    lab.replica.extra_args += ["--bandwidth-limit", "2M"]  # the failback log takes seconds
    lab.replica.start()
    disk = ext4_disk(tmp_path / "fb04.qcow2")
    # Data there at the point, so the failback must send it back.
    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(16 << 20))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x50 20M 2M", "-c", "write -P 0x50 30M 1M",
        "-c", f"write -s {noise} 32M 16M", disk)
    vm_id = replicate_network(lab, tmp_path, "fb04", [disk], "--no-compression")
    p = lab.primary.conn()
    pvm = vm_by_name(p, "fb04")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="a delta")
    rrsc(p, pvm, 7)
    early = settled(lab, vm_id)
    point_disk = tmp_path / "early.raw"
    run("qemu-img", "convert", "-O", "raw", disk, point_disk)
    lab.replica.cli("failover", "fb04", "--test", "--point", str(early))  # keeps the early point
    rrsc(p, pvm, 3)
    for k in range(2):  # logs after the early point, applied on the replica
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {0x51 + k} {20 + k}M 256k", disk)
        shipped_since(lab, vm_id, time.time())
    rrsc(p, pvm, 7)
    settled(lab, vm_id)
    # Never replicated.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x53 30M 256k", "-c", "write -P 0x56 32M 16M", disk)
    divergent = 3 * (256 << 10) + (16 << 20)
    # A recovery server, but with no authorization entry for hv2 yet (see below).
    storage1 = tmp_path / "hv1-storage"
    serve(lab.primary, lab.t1, "nobody.lab.example", storage1)
    lab.primary.stop()  # the primary is lost

    r = lab.replica.conn()
    lab.replica.cli("failover", "fb04")  # to the latest point, not committed
    lab.replica.cli("stop-failover", "fb04")  # the test VM goes; the early point stays
    (overlay,) = vm_disks(lab.replica, "fb04")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x54 40M 128k", overlay)  # dropped by the failback
    rvm = vm_by_name(r, "fb04")
    assert rvm["ReplicationState"] == 5
    snaps = {s["InstanceID"].rsplit("\\", 1)[1]: s["InstanceID"] for s in
             r.Associators(rvm.path, AssocClass="Msvm_SnapshotOfVirtualSystem")}
    assert str(early) in snaps, snaps

    lab.primary.start()  # back, holding writes that never replicated
    p = lab.primary.conn()
    psvc = p.EnumerateInstances("Msvm_ReplicationService")[0]

    def failback(point):
        pvm = vm_by_name(p, "fb04")
        rsd = p.Associators(pvm.path, ResultClass="Msvm_ReplicationSettingData")[0]
        rv, out = p.InvokeMethod("InitiateFailback", psvc.path, ComputerSystem=pvm.path,
                                 ReplicationSettingData=rsd.tocimxmlstr(), RecoveryPointIdentifier=point)
        assert rv == 4096, rv
        return out["Job"]

    def untouched():
        assert vm_by_name(p, "fb04")["ReplicationMode"] == 1
        assert vm_by_name(r, "fb04")["ReplicationState"] == 5
        assert vm_disks(lab.replica, "fb04") == [overlay]
        assert str(early) in {s["InstanceID"].rsplit("\\", 1)[1] for s in
                              r.Associators(rvm.path, AssocClass="Msvm_SnapshotOfVirtualSystem")}

    # A point the new primary does not hold: refused there, nothing changes on either side.
    job = wait_job(p, failback(snaps[str(early)].replace(f"\\{early}", "\\999")))
    assert job["JobState"] == 10 and "not a recovery point" in job["ErrorDescription"], job["ErrorDescription"]
    untouched()
    # The old primary does not let the new one in: found before anything is dropped there.
    job = wait_job(p, failback(snaps[str(early)]))
    assert job["JobState"] == 10 and "AccessDenied" in job["ErrorDescription"], job["ErrorDescription"]
    untouched()
    lab.primary.cli("auth", "add", "--primary", REPLICA, "--storage", str(storage1))

    # Cancelled while the new primary sends, after it moved to the point and committed: it waits
    # in 9 at exactly that point, and the same call runs again from there.
    job = failback(snaps[str(early)])
    wait_for(lambda: vm_by_name(r, "fb04")["ReplicationState"] == 10, timeout=60, what="the new primary sending")
    time.sleep(1.5)
    rv, _ = p.InvokeMethod("RequestStateChange", job, RequestedState=Uint16(4))
    assert rv in (0, 4096), rv
    assert wait_job(p, job, timeout=60)["JobState"] == 8
    wait_for(lambda: vm_by_name(r, "fb04")["ReplicationState"] == 9, timeout=30, what="the new primary back in 9")
    assert vm_by_name(r, "fb04")["ReplicationMode"] == 1
    (new_disk,) = vm_disks(lab.replica, "fb04")
    assert "backing file" not in run("qemu-img", "info", new_disk).stdout  # committed, standalone
    same, text = compare(new_disk, point_disk)
    assert same, text
    assert r.Associators(rvm.path, AssocClass="Msvm_SnapshotOfVirtualSystem") == []

    res = lab.primary.cli("failback", "fb04", "--point", snaps[str(early)])  # the CLI, this time
    description = res.stdout + res.stderr
    print("failback job:", description)
    assert f"since the failover point {early} are read" in description, description
    # The old primary's writes since the point differ; the new primary's dropped write is not
    # even a candidate.
    assert re.search(r"\b268 blocks differed", description), description
    sent = int(re.search(r"log \d+ of (\d+) bytes sent", description).group(1))
    assert divergent < sent <= 1.1 * divergent + (64 << 10), sent
    pvm, rvm = vm_by_name(p, "fb04"), vm_by_name(r, "fb04")
    assert (pvm["ReplicationMode"], pvm["ReplicationState"]) == (2, 14)
    assert (rvm["ReplicationMode"], rvm["ReplicationState"]) == (1, 3)
    # Both hosts hold exactly the early point.
    store1 = storage1 / vm_id.lower()
    last = latest_point_equals(store1, point_disk)
    same, text = compare(new_disk, point_disk)
    assert same, text
    # Deltas flow from the new primary.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 48M 64k", new_disk)
    wait_for(lambda: max(int(f.stem[1:]) for f in store1.glob("p*.json")) > last,
             timeout=30, what="a delta to the old primary")


def initiate_failback(p, name):
    """InitiateFailback of VM `name` on the old primary `p` with its own settings; returns the job's
    reference (the call must answer 4096: a job started)."""
    pvm = vm_by_name(p, name)
    rsd = p.Associators(pvm.path, ResultClass="Msvm_ReplicationSettingData")[0]
    rv, out = p.InvokeMethod("InitiateFailback", p.EnumerateInstances("Msvm_ReplicationService")[0].path,
                             ComputerSystem=pvm.path, ReplicationSettingData=rsd.tocimxmlstr())
    assert rv == 4096, rv
    return out["Job"]


def write_when_unlocked(disk, command, timeout=60):
    """`qemu-io -c command` on the qcow2 `disk`, asked again while another process holds its lock
    (a replication cycle reading it)."""
    import subprocess

    def attempt():
        res = subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(disk)], capture_output=True, text=True)
        assert res.returncode == 0 or "lock" in res.stderr, res.stderr
        return res.returncode == 0

    wait_for(attempt, timeout=timeout, what=f"a write to {disk}")


def next_delta_reaches_the_old_primary(p, name, new_disk, store1):
    """After a failback of `name`: a write on the new primary's disk, then the old primary `p` is an
    ordinary replica (3) whose latest point in `store1` equals that disk."""
    write_when_unlocked(new_disk, "write -P 0x66 40M 64k")  # its next cycle may be reading it
    wait_for(lambda: vm_by_name(p, name)["ReplicationState"] == 3, timeout=60, what="an ordinary replica")

    def latest_equal():
        last = max(int(f.stem[1:]) for f in store1.glob("p*.json"))
        return compare(store1 / "disk0" / f"p{last:020}.qcow2", new_disk, "qcow2")[0]

    wait_for(latest_equal, timeout=90, what="the delta with that write")


def protected_and_suspended(lab, tmp_path, name):
    """An off VM `name` replicated to hv2, a delta applied, then replication suspended and settled;
    returns (disk, vm_id)."""
    disk = ext4_disk(tmp_path / f"{name}.qcow2")
    vm_id = replicate_network(lab, tmp_path, name, [disk], "--no-compression")
    p = lab.primary.conn()
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, timeout=60, what="a delta")
    rrsc(p, vm_by_name(p, name), 7)
    settled(lab, vm_id)
    return disk, vm_id


def lost_and_failed_over(lab, tmp_path, name):
    """hv1 becomes a recovery server for hv2 and is lost; hv2 fails over unplanned and commits.
    Returns (hv1's replica storage, hv2's disk)."""
    hv1_storage = tmp_path / "hv1-storage"
    lab.hv1_port = serve(lab.primary, lab.t1, REPLICA, hv1_storage)
    lab.primary.stop()
    lab.replica.cli("failover", name)
    lab.replica.cli("complete", name)
    (new_disk,) = vm_disks(lab.replica, name)
    return hv1_storage, new_disk


def diverged(lab, tmp_path, name):
    """VM `name` protected and suspended, then written on hv1 and never replicated (a raw copy of
    its disk then: `before`), hv1 lost, hv2 failed over and committed, and 16 MiB written there;
    returns (disk, vm_id, before, hv1's replica storage, hv2's disk)."""
    disk, vm_id = protected_and_suspended(lab, tmp_path, name)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x31 20M 256k", disk)  # never replicated
    before = tmp_path / "old-primary-before.raw"
    run("qemu-img", "convert", "-O", "raw", disk, before)
    hv1_storage, new_disk = lost_and_failed_over(lab, tmp_path, name)
    write_noise(tmp_path, new_disk)
    return disk, vm_id, before, hv1_storage, new_disk


def cap_new_primary(lab):
    """Restarts hv2, the new primary of the failbacks to come, capped at 2 MB/s: its failback log
    takes seconds."""
    lab.replica.stop()
    lab.replica.extra_args += ["--bandwidth-limit", "2M"]
    lab.replica.start()


def write_noise(tmp_path, disk):
    """Writes 16 MiB of random data at 32 MiB into the qcow2 `disk`."""
    import os

    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(16 << 20))
    run("qemu-io", "-f", "qcow2", "-c", f"write -s {noise} 32M 16M", disk)


def test_a_failback_cancelled_or_cut_off_by_sigkill_leaves_the_old_primary_as_it_was_and_runs_again(lab, tmp_path):
    import signal

    cap_new_primary(lab)
    disk, vm_id, before, hv1_storage, new_disk = diverged(lab, tmp_path, "fb02")
    lab.primary.start()
    p, r = lab.primary.conn(), lab.replica.conn()
    store1 = hv1_storage / vm_id.lower()

    def failback():
        job = initiate_failback(p, "fb02")
        wait_for(lambda: vm_by_name(r, "fb02")["ReplicationState"] == 10, timeout=30,
                 what="the new primary sending")
        time.sleep(1.5)
        return job

    def as_it_was():
        pvm = vm_by_name(p, "fb02")
        assert (pvm["ReplicationMode"], pvm["ReplicationState"]) == (2, 9)  # may run the failback again
        (base,) = sorted(store1.glob("p*.json"))
        same, text = compare(store1 / "disk0" / f"{base.stem}.qcow2", before)
        assert same, text  # its own disks, untouched

    # 1. Cancelled on the old primary: the new primary's job is cancelled too.
    job = failback()
    rv, _ = p.InvokeMethod("RequestStateChange", job, RequestedState=Uint16(4))
    assert rv in (0, 4096), rv
    assert wait_job(p, job, timeout=60)["JobState"] == 8  # Terminated
    wait_for(lambda: vm_by_name(r, "fb02")["ReplicationState"] == 9, timeout=30, what="the new primary back in 9")
    as_it_was()

    # 2. The new primary killed mid-way.
    job = failback()
    lab.replica.proc.send_signal(signal.SIGKILL)
    lab.replica.proc.wait()
    assert wait_job(p, job, timeout=60)["JobState"] == 10
    as_it_was()
    lab.replica.start()
    r = lab.replica.conn()
    assert vm_by_name(r, "fb02")["ReplicationState"] == 9  # not left in 10

    # 3. The old primary killed mid-way.
    failback()
    lab.primary.proc.send_signal(signal.SIGKILL)
    lab.primary.proc.wait()
    wait_for(lambda: vm_by_name(r, "fb02")["ReplicationState"] == 9, timeout=120, what="the new primary's job to fail")
    lab.primary.start()
    p = lab.primary.conn()
    as_it_was()

    # 4. Run again: to the end, and the disks equal the new primary's. The record of what the
    # failover overlay held is lost meanwhile: every block is compared, and the job says so.
    (lab.replica.data_dir / "tracking" / vm_id.upper() / "disk0.failover-writes").unlink()
    job = wait_job(p, initiate_failback(p, "fb02"), timeout=120)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert "Full hash compare" in job["Description"] and "not recorded" in job["Description"], job["Description"]
    assert (vm_by_name(p, "fb02")["ReplicationState"], vm_by_name(r, "fb02")["ReplicationState"]) == (14, 3)
    latest_point_equals(store1, new_disk, "qcow2")

    # 5. Run again once done (as after a restart that lost its answer): the new primary answers
    # that it is done, and the old primary ends complete again, not in the 13 the run showed;
    # the new primary's deltas go on.
    job = wait_job(p, initiate_failback(p, "fb02"), timeout=60)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert vm_by_name(p, "fb02")["ReplicationState"] in (14, 3)
    next_delta_reaches_the_old_primary(p, "fb02", new_disk, store1)


def test_a_failback_killed_while_it_takes_in_the_old_primarys_disks_loses_none_of_them(lab, tmp_path):
    """The old primary takes its own disks in as the first point of its new store without a copy
    (a second name each), becomes a replica, and only then drops their old names. Killed (a crash
    point: SIGKILL of itself) right after the point's commit, it is still the primary of disks
    that are where they were; killed right after it became a replica, its start drops the old names
    and the point holds the disks. Either way the failback run again ends with the new primary's
    disks. (The names used to go before the switch: a kill there left a primary without disks.)"""
    disk, vm_id, before, hv1_storage, new_disk = diverged(lab, tmp_path, "fb09")
    store1 = hv1_storage / vm_id.lower()
    r = lab.replica.conn()

    def killed_at(point):
        lab.primary.stop(companion=False)
        lab.primary.extra_args += ["--crash-at", point]
        lab.primary.start()
        initiate_failback(lab.primary.conn(), "fb09")
        assert lab.primary.proc.wait(timeout=60) == -9, "the crash point was not reached"
        lab.primary.proc = None
        lab.primary.extra_args = lab.primary.extra_args[:-2]
        wait_for(lambda: vm_by_name(r, "fb09")["ReplicationState"] == 9, timeout=120,
                 what="the new primary's job to fail")
        lab.primary.start()
        return lab.primary.conn()

    # 1. Killed after the adoption's commit, before the switch: the primary of its disk, as it was.
    p = killed_at("reverse-disks-taken")
    assert vm_by_name(p, "fb09")["ReplicationMode"] == 1
    assert vm_disks(lab.primary, "fb09") == [str(disk)]
    same, text = compare(disk, before)
    assert same, text
    assert "cut off before this VM became a replica" in lab.primary.log.read_text()

    # 2. Run again, killed after the switch: a replica; its start dropped the old name, and the
    # point holds the disk.
    p = killed_at("reverse-switched")
    pvm = vm_by_name(p, "fb09")
    assert (pvm["ReplicationMode"], pvm["ReplicationState"]) == (2, 9)
    assert not disk.exists()
    assert "finishing a reverse's switch to replica" in lab.primary.log.read_text()
    (base,) = sorted(store1.glob("p*.json"))
    same, text = compare(store1 / "disk0" / f"{base.stem}.qcow2", before)
    assert same, text
    assert not (store1 / "adopted.json").exists()

    # 3. Run again: to the end.
    job = wait_job(p, initiate_failback(p, "fb09"), timeout=120)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert (vm_by_name(p, "fb09")["ReplicationState"], vm_by_name(r, "fb09")["ReplicationState"]) == (14, 3)
    latest_point_equals(store1, new_disk, "qcow2")


def failback_committed_unanswered(lab, tmp_path, name):
    """A failback of `name` whose log the old primary (hv1) committed before it was killed, so
    the new primary (hv2) never got the answer; the old primary stays down. Returns (the new
    primary's disk, the old primary's point store)."""
    disk, vm_id = protected_and_suspended(lab, tmp_path, name)
    hv1_storage, new_disk = lost_and_failed_over(lab, tmp_path, name)
    write_noise(tmp_path, new_disk)
    lab.primary.extra_args += ["--crash-at", "log-committed"]
    lab.primary.start()
    initiate_failback(lab.primary.conn(), name)
    assert lab.primary.proc.wait(timeout=60) == -9, "the crash point was not reached"
    lab.primary.proc = None
    lab.primary.extra_args = lab.primary.extra_args[:-2]
    return new_disk, hv1_storage / vm_id.lower()


def test_a_failbacks_commit_whose_answer_is_lost_with_the_old_primary_down_for_a_while_completes(lab, tmp_path):
    """The old primary commits the failback's log and dies before it answers (a crash point), and
    stays down longer than a cycle's quick retries (1, 2, 4 s). The new primary keeps asking
    whether the log was committed (for minutes, not seconds): once the old primary is back, its
    job completes, the old primary applies the log, and the next delta makes it an ordinary
    replica. (Given up after 7 s, the new primary used to wait to resynchronize in 9 while the old
    primary was complete in 14, and neither could go on.)"""
    new_disk, store1 = failback_committed_unanswered(lab, tmp_path, "fb10")
    r = lab.replica.conn()
    time.sleep(10)  # longer than the quick retries
    assert vm_by_name(r, "fb10")["ReplicationState"] == 10  # still asking
    lab.primary.start()
    p = lab.primary.conn()
    wait_for(lambda: vm_by_name(r, "fb10")["ReplicationState"] == 3, timeout=90,
             what="the new primary's job to learn the commit")
    assert "asking whether it was committed" in lab.replica.log.read_text()
    wait_for(lambda: vm_by_name(p, "fb10")["ReplicationState"] in (14, 3), timeout=60,
             what="the old primary's apply of the failback's log")
    next_delta_reaches_the_old_primary(p, "fb10", new_disk, store1)


def test_a_failback_given_up_after_its_commit_goes_on_with_a_resynchronization(lab, tmp_path):
    """The old primary commits the failback's log and dies before it answers; the new primary's job
    is cancelled while it asks (as if it had given up), so it waits in 9 while the old primary,
    back, applies the log and is complete (14). Resynchronize on the new primary then goes on
    (a replica in 14 takes a resync: before, it refused and neither side could go on) and ships
    only what differs; the next delta makes the old primary an ordinary replica."""
    new_disk, store1 = failback_committed_unanswered(lab, tmp_path, "fb11")
    r = lab.replica.conn()
    wait_for(lambda: "asking whether it was committed" in lab.replica.log.read_text(), timeout=30,
             what="the new primary asking about its commit")
    (job,) = [j.path for j in r.EnumerateInstances("Msvm_ConcreteJob")
              if j["JobType"] == 124 and j["JobState"] == 4]
    rv, _ = r.InvokeMethod("RequestStateChange", job, RequestedState=Uint16(4))
    assert rv in (0, 4096), rv
    assert wait_job(r, job, timeout=60)["JobState"] != 7
    wait_for(lambda: vm_by_name(r, "fb11")["ReplicationState"] == 9, timeout=30,
             what="the new primary waiting to resynchronize")
    lab.primary.start()
    p = lab.primary.conn()
    wait_for(lambda: vm_by_name(p, "fb11")["ReplicationState"] == 14, timeout=60,
             what="the old primary's apply of the failback's log")
    rvm = vm_by_name(r, "fb11")
    rv, out = r.InvokeMethod("Resynchronize", r.EnumerateInstances("Msvm_ReplicationService")[0].path,
                             ComputerSystem=rvm.path)
    assert rv == 4096, rv
    done = wait_job(r, out["Job"], timeout=120)
    assert done["JobState"] == 7, done["ErrorDescription"]
    assert vm_by_name(r, "fb11")["ReplicationState"] == 3
    # The old primary's point already is the new primary's disk: nothing differs.
    sent = [l for l in plain_log(lab.replica).splitlines()
            if "compared blocks sent and committed" in l and "kind=2" in l]
    assert sent and "differing_blocks=0 " in sent[-1], sent
    next_delta_reaches_the_old_primary(p, "fb11", new_disk, store1)


def test_a_failback_followed_over_a_connection_that_breaks_goes_on_to_the_end(lab, tmp_path):
    """The old primary follows the new primary's failback job over a proxy that breaks the
    connection while the new primary sends: it connects again and follows the job to its end."""
    from test_two_hosts import Proxy

    cap_new_primary(lab)
    disk, vm_id = protected_and_suspended(lab, tmp_path, "fb05")
    hv1_storage, new_disk = lost_and_failed_over(lab, tmp_path, "fb05")
    write_noise(tmp_path, new_disk)
    lab.primary.start()
    p, r = lab.primary.conn(), lab.replica.conn()
    proxy = Proxy(lab.port, "cut", after=1 << 62)  # cut by hand, below
    try:
        # The old primary reaches the new one where it replicated to it: through the proxy now.
        lab.primary.cli("set", "fb05", "--replica-port", str(proxy.port))
        job = initiate_failback(p, "fb05")
        wait_for(lambda: vm_by_name(r, "fb05")["ReplicationState"] == 10, timeout=30,
                 what="the new primary sending")
        time.sleep(1)
        assert proxy.open, "the old primary follows through the proxy"
        proxy.cut()
        job = wait_job(p, job, timeout=120)
        assert job["JobState"] == 7, job["ErrorDescription"]
        assert "following the new primary's failback job over a new connection" in plain_log(lab.primary)
        assert (vm_by_name(p, "fb05")["ReplicationState"], vm_by_name(r, "fb05")["ReplicationState"]) == (14, 3)
        latest_point_equals(hv1_storage / vm_id.lower(), new_disk, "qcow2")
    finally:
        proxy.close()


def test_a_failback_after_a_backup_was_restored_over_the_old_primarys_disk_compares_every_block(lab, tmp_path):
    """The old primary's disk file is overwritten in place by an older copy of itself (a restore
    from backup, same inode) before it comes back: its bitmap then looks consistent but misses
    what the copy undid. The failback finds that the bitmap lost blocks it had marked and
    compares every block, so the disks still end equal."""
    disk, vm_id = protected_and_suspended(lab, tmp_path, "fb05")
    p = lab.primary.conn()
    backup = tmp_path / "fb05-backup.qcow2"
    shutil.copyfile(disk, backup)
    rrsc(p, vm_by_name(p, "fb05"), 3)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 24M 128k", disk)  # after the backup
    shipped_since(lab, vm_id, time.time())  # in the failover point
    rrsc(p, vm_by_name(p, "fb05"), 7)
    settled(lab, vm_id)
    hv1_storage, new_disk = lost_and_failed_over(lab, tmp_path, "fb05")
    inode = disk.stat().st_ino
    shutil.copyfile(backup, disk)  # restored in place: the write above is undone
    assert disk.stat().st_ino == inode
    lab.primary.start()
    p = lab.primary.conn()
    job = wait_job(p, initiate_failback(p, "fb05"), timeout=120)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert "lost blocks it had marked" in job["Description"], job["Description"]
    latest_point_equals(hv1_storage / vm_id.lower(), new_disk, "qcow2")


def test_a_failback_is_refused_to_an_old_primary_the_authorization_table_no_longer_binds(lab, tmp_path):
    """After an unplanned failover, the new primary's administrator removes the entry that bound
    the VM; the old primary still matches an entry of another trust group. Its InitiateFailback is
    refused and the failed-over VM is left as it was. (The failback route checked only the
    primary's name, not the VM's binding, and started sending the VM to it.)"""
    disk, vm_id = protected_and_suspended(lab, tmp_path, "fb09")
    hv1_storage, new_disk = lost_and_failed_over(lab, tmp_path, "fb09")
    other = tmp_path / "other-storage"
    other.mkdir()
    lab.replica.cli("auth", "remove", "*.lab.example")
    lab.replica.cli("auth", "add", "--primary", PRIMARY, "--storage", str(other), "--trust-group", "OTHER")
    r = lab.replica.conn()
    before = vm_by_name(r, "fb09")
    lab.primary.start()
    p = lab.primary.conn()
    job = wait_job(p, initiate_failback(p, "fb09"), timeout=120)
    assert job["JobState"] != 7 and "removed" in job["ErrorDescription"], job["ErrorDescription"]
    after = vm_by_name(r, "fb09")
    assert (after["ReplicationMode"], after["ReplicationState"]) == (before["ReplicationMode"], before["ReplicationState"])
    assert list(other.iterdir()) == [] and not list(hv1_storage.glob("*/p*.json"))


def test_a_failback_after_the_old_primary_ran_trusts_the_bitmap_its_qemu_kept(lab, tmp_path):
    """The old primary's last point came from its running VM's QEMU process, which also kept the
    offline bitmap: what that bitmap marked then was read from the process, so the failback after
    the VM stopped reads only the marked blocks again instead of hash-scanning the disk."""
    disk, vm_id = protected_and_suspended(lab, tmp_path, "fb06")
    p = lab.primary.conn()
    qsd_dir = tmp_path / "qsd"
    qsd_dir.mkdir()
    qsd = Qsd(disk, qsd_dir)  # the old primary runs the VM
    try:
        lab.primary.cli("vm", "power", "fb06", "--qmp-socket", str(qsd.qmp), "--nbd-socket", str(qsd.guest))
        assert vm_by_name(p, "fb06")["EnabledState"] == 2
        rrsc(p, vm_by_name(p, "fb06"), 3)
        qsd.write("write -P 0x71 24M 128k")
        shipped_since(lab, vm_id, time.time())  # a point read through the running QEMU
        rrsc(p, vm_by_name(p, "fb06"), 7)
        settled(lab, vm_id)
    finally:
        qsd.stop()  # a clean stop: QEMU writes its bitmaps back
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x72 28M 64k", disk)  # never replicated
    hv1_storage, new_disk = lost_and_failed_over(lab, tmp_path, "fb06")
    lab.primary.start()
    p = lab.primary.conn()
    job = wait_job(p, initiate_failback(p, "fb06"), timeout=120)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert "as its bitmap says" in job["Description"] and "hash-scanned" not in job["Description"], \
        job["Description"]
    latest_point_equals(hv1_storage / vm_id.lower(), new_disk, "qcow2")


def test_a_failback_while_the_new_primary_runs_reads_its_writes_from_its_qemu_process(lab, tmp_path):
    disk, vm_id = protected_and_suspended(lab, tmp_path, "fb03")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x41 20M 256k", disk)  # never replicated
    hv1_storage, new_disk = lost_and_failed_over(lab, tmp_path, "fb03")
    qsd_dir = tmp_path / "qsd"
    qsd_dir.mkdir()
    qsd = Qsd(new_disk, qsd_dir)  # the new primary runs the VM
    try:
        lab.replica.cli("vm", "power", "fb03", "--qmp-socket", str(qsd.qmp), "--nbd-socket", str(qsd.guest))
        r = lab.replica.conn()
        assert vm_by_name(r, "fb03")["EnabledState"] == 2
        qsd.write("write -P 0x42 40M 128k")  # recorded by the bitmap in its QEMU process
        lab.primary.start()
        p = lab.primary.conn()
        job = wait_job(p, initiate_failback(p, "fb03"), timeout=120)
        assert job["JobState"] == 7, job["ErrorDescription"]
        assert "Only the blocks either side wrote" in job["Description"], job["Description"]
        assert vm_by_name(p, "fb03")["ReplicationState"] == 14
        store1 = hv1_storage / vm_id.lower()
        last = latest_point_equals(store1, new_disk, "qcow2", shared=True)  # the VM runs on it
        # The running VM's next writes replicate from its dirty bitmap.
        qsd.write("write -P 0x43 44M 64k")
        wait_for(lambda: max(int(f.stem[1:]) for f in store1.glob("p*.json")) > last, timeout=30,
                 what="a delta from the running new primary")
    finally:
        qsd.stop()


def test_a_running_resynchronization_can_be_paused_and_cancelled(lab, tmp_path):
    import os

    lab.primary.stop()
    lab.primary.extra_args += ["--bandwidth-limit", "1M"]  # the resync log takes seconds
    lab.primary.start()
    disk, vm_id = protected_and_suspended(lab, tmp_path, "rsy02")
    p = lab.primary.conn()
    pvm = vm_by_name(p, "rsy02")
    shutil.rmtree(lab.primary.data_dir / "tracking" / vm_id.upper())  # tracking lost
    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(6 << 20))
    run("qemu-io", "-f", "qcow2", "-c", f"write -s {noise} 32M 6M", disk)
    rrsc(p, pvm, 3)
    wait_for(lambda: vm_by_name(p, "rsy02")["ReplicationState"] == 9, what="resynchronization required")
    svc = p.EnumerateInstances("Msvm_ReplicationService")[0]

    def resync_running():
        rv, out = p.InvokeMethod("Resynchronize", svc.path, ComputerSystem=pvm.path)
        assert rv == 4096, rv
        wait_for(lambda: vm_by_name(p, "rsy02")["ReplicationState"] == 10, what="resynchronizing")
        time.sleep(1.5)
        return out["Job"]

    def change(state):
        rv, out = p.InvokeMethod("RequestReplicationStateChange", pvm.path, RequestedState=Uint16(state))
        assert rv == 4096, rv
        return wait_job(p, out["Job"], timeout=60)

    # Suspend-VMReplication while it runs: 11, the resync's job stopped.
    job = resync_running()
    assert change(7)["JobState"] == 7
    assert vm_by_name(p, "rsy02")["ReplicationState"] == 11
    assert p.GetInstance(job)["JobState"] == 8  # Terminated
    # Stop-VMReplication while it runs again: back to 9.
    job = resync_running()
    assert change(9)["JobState"] == 7
    assert vm_by_name(p, "rsy02")["ReplicationState"] == 9
    assert p.GetInstance(job)["JobState"] == 8
    # Then to the end.
    before = applied_sequence(lab, vm_id)
    rv, out = p.InvokeMethod("Resynchronize", svc.path, ComputerSystem=pvm.path)
    assert rv == 4096 and wait_job(p, out["Job"], timeout=120)["JobState"] == 7
    assert vm_by_name(p, "rsy02")["ReplicationState"] == 3
    wait_for(lambda: applied_sequence(lab, vm_id) > before, what="the resync applied")
    rrsc(p, pvm, 7)
    seq = settled(lab, vm_id)
    same, text = compare(lab.storage / vm_id.lower() / "disk0" / f"p{seq:020}.qcow2", disk, "qcow2")
    assert same, text


@pytest.mark.parametrize("when", ["comparing", "uploading"])
def test_a_resynchronization_goes_on_after_its_recovery_server_restarts(lab, tmp_path, when):
    """The recovery server is lost in the middle of a resynchronization, then started again:
    - comparing: stopped (SIGSTOP) the moment its comparison session begins, while the primary
      still hashes its disk, then killed (the session is lost);
    - uploading: killed while the differing blocks arrive (capped at 1 MB/s).
    The primary's job connects again and goes on (a new session on the same point; the upload
    where the replica's kept records end): only the blocks that differ travel, the replica keeps
    only the resynchronized point, and it equals the disk."""
    import os
    import signal

    disk = tmp_path / "rsy04.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", disk, "1G")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 768M", disk)
    vm_id = replicate_network(lab, tmp_path, "rsy04", [disk], "--no-compression", "--recovery-history", "2")
    p = lab.primary.conn()
    pvm = vm_by_name(p, "rsy04")
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="a delta")
    rrsc(p, pvm, 7)
    before = settled(lab, vm_id)
    shutil.rmtree(lab.primary.data_dir / "tracking" / vm_id.upper())  # tracking lost
    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(6 << 20))
    run("qemu-io", "-f", "qcow2", "-c", f"write -s {noise} 700M 6M", "-c", "write -z 100M 64k", disk)
    if when == "uploading":
        lab.primary.cli("host", "set", "--bandwidth-limit", "1M")
    rrsc(p, pvm, 3)
    wait_for(lambda: vm_by_name(p, "rsy04")["ReplicationState"] == 9, what="resynchronization required")
    incoming = lab.storage / vm_id.lower() / "incoming"
    # The cycle that found the tracking lost had begun its upload: it leaves no empty partial.
    wait_for(lambda: not [f for f in incoming.glob("*.partial") if file_size(f) == 0], timeout=10,
             what="the empty partial of the cut-off cycle gone")
    svc = p.EnumerateInstances("Msvm_ReplicationService")[0]
    rv, out = p.InvokeMethod("Resynchronize", svc.path, ComputerSystem=pvm.path)
    assert rv == 4096, rv

    def lost():
        if "resynchronization comparison begun" not in plain_log(lab.replica):
            return False
        return when == "comparing" or any(f.name.endswith(".partial") and f.stat().st_size > 1 << 20
                                          for f in incoming.iterdir())
    deadline = time.time() + 60
    while not lost():
        assert time.time() < deadline, f"never {when}"
        time.sleep(0.01)
    if when == "comparing":
        lab.replica.proc.send_signal(signal.SIGSTOP)
        time.sleep(2)
    else:
        time.sleep(1.5)  # some of the log arrived
    lab.replica.proc.send_signal(signal.SIGKILL)
    lab.replica.proc.wait()
    lab.replica.start()
    job = wait_job(p, out["Job"], timeout=300)
    assert job["JobState"] == 7, job["ErrorDescription"]
    primary_log = plain_log(lab.primary)
    if when == "comparing":
        # The begin's answer may or may not have left before the stop: either way a new session.
        assert re.search(r"a new session on the same point goes on from where it was|the comparison began over "
                         r"a new connection", primary_log), primary_log[-3000:]
        assert plain_log(lab.replica).count("resynchronization comparison begun") == 2
    else:
        assert "resuming the upload" in primary_log, primary_log[-3000:]
    assert vm_by_name(p, "rsy04")["ReplicationState"] == 3
    wait_for(lambda: applied_sequence(lab, vm_id) > before, what="the resync applied")
    with raw_peer(lab) as c:
        sent = c.get(f"/vmreplica/v1/vms/{vm_id.lower()}/logs/{before + 1}").json()
    assert sent["log_bytes"] < 7_000_000, sent  # the 6 MiB written and a zeroed block, not 768 MiB
    rrsc(p, pvm, 7)
    seq = settled(lab, vm_id)
    store = lab.storage / vm_id.lower()
    # Pruned as after any resynchronization, though the replica lost the session (uploading).
    assert "resynchronization applied; the older recovery points go" in plain_log(lab.replica)
    assert sorted(int(f.stem[1:]) for f in store.glob("p*.json")) == [seq], seq
    same, text = compare(store / "disk0" / f"p{seq:020}.qcow2", disk, "qcow2")
    assert same, text


@pytest.mark.parametrize("when", ["importing", "comparing", "cancelled", "cancelled-importing", "unrecorded"])
def test_a_seeded_initial_replication_goes_on_after_its_recovery_server_restarts(lab, tmp_path, when):
    """The recovery server is stopped (SIGSTOP), then killed and started again, while it imports
    its copy of the disk as point 1, or once it did and the primary compares block hashes with it.
    The primary's job begins the seeded comparison again: the copy is imported once (again only
    if its import was cut off), and only the blocks that differ travel. Or the job is cancelled
    once the copy is imported, or while it is, and the operator starts the seeded replication again
    at once: it compares with the imported copy (once its import ended). Or (unrecorded) the
    replica stopped after the copy became point 1 but before it recorded the import's log, as a
    kill between the two leaves it: the copy is recorded then, not imported again."""
    import signal
    import uuid

    # Large enough for the replica to be stopped while it compares; the others need less (every
    # variant keeps three copies: the disk, the seed and the point).
    size = 768 if when == "comparing" else 256
    disk = tmp_path / "seed04.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", disk, "1G")
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size}M", disk)
    copy = tmp_path / "seed04-copy.qcow2"
    shutil.copy(disk, copy)
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x6c {size - 68}M 192k", "-c", "write -z 100M 64k", disk)
    vm_id = str(uuid.uuid4()).upper()
    lab.replica.cli("vm", "add", "--name", "seed04", "--id", vm_id, "--disk", str(copy))
    lab.replica.cli("enable-as-replica", "seed04")
    lab.primary.cli("vm", "add", "--name", "seed04", "--id", vm_id, "--disk", str(disk))
    lab.primary.cli("enable", "seed04", "--replica-server", REPLICA, "--replica-port", str(lab.port),
                    "--thumbprint", lab.t1, "--no-compression")
    p = lab.primary.conn()
    svc = p.EnumerateInstances("Msvm_ReplicationService")[0]
    rv, out = p.InvokeMethod("StartReplication", svc.path, ComputerSystem=vm_by_name(p, "seed04").path,
                             InitialReplicationType=Uint16(3))
    assert rv == 4096, rv
    mark = "seeded comparison begun; importing the seed" if "importing" in when else "seed imported as point 1"
    deadline = time.time() + 120
    while mark not in plain_log(lab.replica):
        assert time.time() < deadline, f"never {when}"
        time.sleep(0.01)
    if when.startswith("cancelled") or when == "unrecorded":
        rv, _ = p.InvokeMethod("RequestStateChange", out["Job"], RequestedState=Uint16(4))
        assert rv == 0, rv
        assert wait_job(p, out["Job"], timeout=60)["JobState"] == 8
        if when == "unrecorded":
            import sqlite3
            lab.replica.proc.send_signal(signal.SIGKILL)
            lab.replica.proc.wait()
            db = sqlite3.connect(lab.replica.data_dir / "vmreplica.db")
            with db:
                assert db.execute("DELETE FROM received_logs WHERE sequence = 1").rowcount == 1
            db.close()
            lab.replica.start()
            wait_port(lab.port)
        rv, out = p.InvokeMethod("StartReplication", svc.path, ComputerSystem=vm_by_name(p, "seed04").path,
                                 InitialReplicationType=Uint16(3))
        assert rv == 4096, rv
    else:
        lab.replica.proc.send_signal(signal.SIGSTOP)
        time.sleep(2)
        lab.replica.proc.send_signal(signal.SIGKILL)
        lab.replica.proc.wait()
        lab.replica.start()
    job = wait_job(p, out["Job"], timeout=300)
    assert job["JobState"] == 7, job["ErrorDescription"]
    replica_log = plain_log(lab.replica)
    # The copy was imported once: again only when its first import was cut off by the kill.
    assert replica_log.count("seed imported as point 1 vm=") == 1, replica_log[-3000:]
    if when == "importing":
        assert replica_log.count("seeded comparison begun; importing the seed") == 2, replica_log[-3000:]
    else:
        assert "seeded comparison begun again on the seed imported as point 1 before" in replica_log, \
            replica_log[-3000:]
    if when == "unrecorded":
        assert "a seed imported as point 1 before a restart is recorded now" in replica_log, replica_log[-3000:]
    assert vm_by_name(p, "seed04")["ReplicationState"] == 3
    wait_for(lambda: applied_sequence(lab, vm_id) >= 2, what="the differences applied")
    with raw_peer(lab) as c:
        sent = c.get(f"/vmreplica/v1/vms/{vm_id.lower()}/logs/2").json()
    assert sent["log_bytes"] < 400_000, sent  # 192 KiB written and a zeroed block, not the disk
    rrsc(p, vm_by_name(p, "seed04"), 7)
    seq = settled(lab, vm_id)
    same, text = compare(lab.storage / vm_id.lower() / "disk0" / f"p{seq:020}.qcow2", disk, "qcow2")
    assert same, text
    copy.unlink()  # the test run's disk space: the seed is in the point store now


def test_a_vm_that_lost_its_tracking_resynchronizes_by_itself_inside_its_window(lab, tmp_path):
    lab.primary.stop()
    lab.primary.extra_args += ["--auto-resync-delay", "2"]  # 300 s by default
    lab.primary.start()
    disk, vm_id = protected_and_suspended(lab, tmp_path, "auto01")
    p = lab.primary.conn()
    pvm = vm_by_name(p, "auto01")
    svc = p.EnumerateInstances("Msvm_ReplicationService")[0]
    # The whole day as the window (the default is 18:30-06:00, local time).
    rsd = p.Associators(pvm.path, ResultClass="Msvm_ReplicationSettingData")[0]
    rsd["AutoResynchronizeEnabled"] = True
    rsd["AutoResynchronizeIntervalStart"] = CIMDateTime("00000000000000.000000:000")
    rsd["AutoResynchronizeIntervalEnd"] = CIMDateTime("00000000235959.000000:000")
    rv, out = p.InvokeMethod("ModifyReplicationSettings", svc.path, ComputerSystem=pvm.path,
                             ReplicationSettingData=rsd.tocimxmlstr())
    assert rv == 4096 and wait_job(p, out["Job"])["JobState"] == 7
    shutil.rmtree(lab.primary.data_dir / "tracking" / vm_id.upper())  # tracking lost
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x51 30M 128k", disk)
    before = applied_sequence(lab, vm_id)
    rrsc(p, pvm, 3)
    wait_for(lambda: vm_by_name(p, "auto01")["ReplicationState"] == 9, what="resynchronization required")
    # Nobody calls Resynchronize: the daemon does, and replication goes on.
    wait_for(lambda: vm_by_name(p, "auto01")["ReplicationState"] == 3, timeout=60,
             what="the automatic resynchronization")
    jobs = [j for j in p.EnumerateInstances("Msvm_ConcreteJob") if j["JobType"] == 107]
    assert jobs and all(j["JobState"] == 7 for j in jobs), [(j["JobState"], j["ErrorDescription"]) for j in jobs]
    wait_for(lambda: applied_sequence(lab, vm_id) > before, what="the resync applied")
    rrsc(p, pvm, 7)
    seq = settled(lab, vm_id)
    same, text = compare(lab.storage / vm_id.lower() / "disk0" / f"p{seq:020}.qcow2", disk, "qcow2")
    assert same, text
    assert "automatic resynchronization" in lab.primary.log.read_text()


def peak_rss_mib(daemon):
    """The most memory `daemon`'s process has held since it started (VmHWM), in MiB."""
    with open(f"/proc/{daemon.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_failback_of_a_1_tib_disk_streams_the_base_map_and_holds_it_in_neither_daemon(lab, tmp_path):
    """The old primary's block-hash map of a 1 TiB disk is 256 MiB (16 bytes per 64 KiB block). It
    travels from the old primary's file to the new primary's file as a stream: neither daemon
    holds it in memory, so a failback's memory does not grow with the disk."""
    disk = tmp_path / "big01.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", disk, "1T")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x21 0 1M", "-c", "write -P 0x22 700G 1M", disk)
    vm_id = replicate_network(lab, tmp_path, "big01", [disk], "--no-compression")
    p = lab.primary.conn()
    rrsc(p, vm_by_name(p, "big01"), 7)
    settled(lab, vm_id)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x23 300G 256k", disk)  # never replicated
    hv1_storage, new_disk = lost_and_failed_over(lab, tmp_path, "big01")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x24 900G 512k", new_disk)
    lab.primary.start()
    p = lab.primary.conn()
    started = time.time()
    job = wait_job(p, initiate_failback(p, "big01"), timeout=300)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert "Only the blocks either side wrote" in job["Description"], job["Description"]
    # The old primary was restarted for the failback; the new primary's peak covers its whole
    # life (the initial replication and failover of the 1 TiB disk too): an upper bound.
    peaks = peak_rss_mib(lab.primary), peak_rss_mib(lab.replica)
    print(f"failback of 1 TiB: {time.time() - started:.1f} s; peak RSS (MiB) old, new primary: {peaks}")
    # A held map would be 256 MiB at least, twice over while it is encoded or parsed.
    assert max(peaks) < 160, peaks
    latest_point_equals(hv1_storage / vm_id.lower(), new_disk, "qcow2")


def test_a_failback_whose_connection_to_the_old_primary_breaks_while_it_fetches_the_base_goes_on(lab, tmp_path):
    """The new primary fetches the old primary's 256 MiB map of a 1 TiB disk through a proxy that
    passes 48 MiB/s; the proxy cuts the connection a part of the way in: the new primary connects
    again, fetches the base again and the failback ends with the old primary's disks equal to the
    new primary's."""
    from test_two_hosts import Proxy

    disk = tmp_path / "brk01.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", disk, "1T")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x21 0 1M", disk)
    vm_id = replicate_network(lab, tmp_path, "brk01", [disk], "--no-compression")
    p = lab.primary.conn()
    rrsc(p, vm_by_name(p, "brk01"), 7)
    settled(lab, vm_id)
    hv1_storage, new_disk = lost_and_failed_over(lab, tmp_path, "brk01")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x24 900G 512k", new_disk)
    proxy = Proxy(lab.hv1_port, "cut", after=1 << 62, down_rate=48 << 20)  # cut by hand, below
    try:
        # The new primary reaches the old one through the proxy.
        lab.replica.stop()
        lab.replica.extra_args = [f"{PRIMARY}=127.0.0.1:{proxy.port}" if a == f"{PRIMARY}=127.0.0.1" else a
                                  for a in lab.replica.extra_args]
        lab.replica.start()
        lab.primary.start()
        p = lab.primary.conn()
        base = lab.replica.data_dir / "tracking" / vm_id.upper() / "disk0.failback-base"
        whole = 20 + 16 * ((1 << 40) >> 16) + 32  # the map's header, 16 bytes per block, checksum
        job = initiate_failback(p, "brk01")
        wait_for(lambda: base.exists() and base.stat().st_size > (16 << 20), timeout=120,
                 what="the base fetch under way")
        assert proxy.open, "the new primary fetches through the proxy"
        proxy.cut()
        # (Gone at once if the job failed: its files are cleaned up.)
        assert (base.stat().st_size if base.exists() else 0) < whole, "the fetch ended before it was cut"
        job = wait_job(p, job, timeout=300)
        assert job["JobState"] == 7, job["ErrorDescription"]
        assert "reading the old primary's base: goes on over a new connection" in plain_log(lab.replica)
        states = vm_by_name(p, "brk01")["ReplicationState"], vm_by_name(lab.replica.conn(), "brk01")["ReplicationState"]
        assert states == (14, 3), states
        latest_point_equals(hv1_storage / vm_id.lower(), new_disk, "qcow2")
    finally:
        proxy.close()


def test_failover_network_settings_are_kept_shown_and_given_to_the_failed_over_vms_start_command(lab, tmp_path):
    """SetFailoverNetworkAdapterSettings (Set-VMNetworkAdapterFailoverConfiguration) stores each
    adapter's guest IP settings on the replica, shows them as Msvm_FailoverNetworkAdapterSettingData,
    refuses bad ones with 32773, and hands them to the start command of the VM once it failed over."""
    from pywbem import CIMInstance, CIMProperty

    disk = ext4_disk(tmp_path / "net01.qcow2")
    vm_id = replicate_network(lab, tmp_path, "net01", [disk], "--no-compression")
    r = lab.replica.conn()
    rsvc = r.EnumerateInstances("Msvm_ReplicationService")[0]
    rvm = vm_by_name(r, "net01")

    def setting(instance_id=None, **props):
        inst = CIMInstance("Msvm_FailoverNetworkAdapterSettingData")
        for name, value in props.items():
            array = isinstance(value, list)
            inst[name] = CIMProperty(name, value, type="string" if array else None, is_array=array)
        if instance_id:
            inst["InstanceID"] = instance_id
        return inst.tocimxmlstr()

    def put(*entries):
        return r.InvokeMethod("SetFailoverNetworkAdapterSettings", rsvc.path, ComputerSystem=rvm.path,
                              NetworkSettings=list(entries))

    v4 = setting(DHCPEnabled=False, IPAddresses=["192.0.2.10"], Subnets=["255.255.255.0"],
                 DefaultGateways=["192.0.2.1"], DNSServers=["192.0.2.53", "192.0.2.54"])
    v6 = setting(f"Microsoft:{vm_id.upper()}\\FailoverNetworkAdapter\\1", ProtocolIFType=Uint16(4097),
                 DHCPEnabled=False, IPAddresses=["2001:db8::10"], Subnets=["64"], DefaultGateways=["2001:db8::1"])
    rv, out = put(v4, v6)
    assert rv == 4096, rv
    assert wait_job(r, out["Job"])["JobState"] == 7
    shown = {s["InstanceID"]: s for s in r.EnumerateInstances("Msvm_FailoverNetworkAdapterSettingData")}
    first = shown[f"Microsoft:{vm_id.upper()}\\FailoverNetworkAdapter\\0\\4096"]
    assert (first["DHCPEnabled"], list(first["IPAddresses"]), list(first["Subnets"])) == (
        False, ["192.0.2.10"], ["255.255.255.0"])  # IPv4 subnets as masks, as Hyper-V shows them
    assert list(first["DNSServers"]) == ["192.0.2.53", "192.0.2.54"]
    second = shown[f"Microsoft:{vm_id.upper()}\\FailoverNetworkAdapter\\1\\4097"]
    assert list(second["DefaultGateways"]) == ["2001:db8::1"]
    assert len(r.Associators(rvm.path, ResultClass="Msvm_FailoverNetworkAdapterSettingData")) == 2

    # Bad settings: 32773 and nothing changes.
    def everything():
        return sorted((i.path.to_wbem_uri(), sorted((k, str(v)) for k, v in i.items()))
                      for i in r.EnumerateInstances("Msvm_FailoverNetworkAdapterSettingData"))
    before = everything()
    for bad in (
        setting(DHCPEnabled=False, IPAddresses=["192.0.2.300"], Subnets=["24"]),
        setting(DHCPEnabled=False, IPAddresses=["192.0.2.11"], Subnets=["255.0.255.0"]),
        setting(DHCPEnabled=False, IPAddresses=["192.0.2.11"], Subnets=[]),
        setting(DHCPEnabled=False, IPAddresses=[], Subnets=[]),
        setting("Microsoft:00000000-0000-0000-0000-000000000000\\FailoverNetworkAdapter\\0",
                DHCPEnabled=True, IPAddresses=[]),
        setting(DHCPEnabled=False, Subnets=["24"]),  # no IPAddresses at all
        setting(f"Microsoft:{vm_id.upper()}\\FailoverNetworkAdapter\\1\\4097", ProtocolIFType=Uint16(4096),
                DHCPEnabled=False, IPAddresses=["192.0.2.11"], Subnets=["24"]),  # protocols disagree
        setting(f"Microsoft:{vm_id.upper()}\\FailoverNetworkAdapter\\1\\junk", DHCPEnabled=True, IPAddresses=[]),
    ):
        rv, _ = put(bad)
        assert rv == 32773, rv
    rv, _ = put(v4, v4)  # the same adapter and protocol twice
    assert rv == 32773, rv
    assert everything() == before

    # A mixed entry is split per protocol, each replacing that protocol's settings; an IPv6 entry
    # with nothing in it clears IPv6 (DHCPEnabled is an IPv4 setting).
    mixed = setting(f"Microsoft:{vm_id.upper()}\\FailoverNetworkAdapter\\2", DHCPEnabled=False,
                    IPAddresses=["192.0.2.20", "2001:db8::20"], Subnets=["255.255.255.128", "48"])
    rv, out = put(mixed)
    assert rv == 4096 and wait_job(r, out["Job"])["JobState"] == 7
    ids = {s["InstanceID"]: s for s in r.EnumerateInstances("Msvm_FailoverNetworkAdapterSettingData")}
    two4, two6 = (ids[f"Microsoft:{vm_id.upper()}\\FailoverNetworkAdapter\\2\\{p}"] for p in (4096, 4097))
    assert (list(two4["IPAddresses"]), list(two4["Subnets"])) == (["192.0.2.20"], ["255.255.255.128"])
    assert (list(two6["IPAddresses"]), list(two6["Subnets"])) == (["2001:db8::20"], ["48"])
    rv, out = put(setting(f"Microsoft:{vm_id.upper()}\\FailoverNetworkAdapter\\2\\4097", DHCPEnabled=False,
                          IPAddresses=[], Subnets=[]))
    assert rv == 4096 and wait_job(r, out["Job"])["JobState"] == 7
    ids = {s["InstanceID"] for s in r.EnumerateInstances("Msvm_FailoverNetworkAdapterSettingData")}
    assert f"Microsoft:{vm_id.upper()}\\FailoverNetworkAdapter\\2\\4097" not in ids
    assert f"Microsoft:{vm_id.upper()}\\FailoverNetworkAdapter\\2\\4096" in ids
    lab.replica.cli("failover-network", "clear", "net01", "--adapter", "2")

    # The CLI: clear adapter 1, change adapter 0, show.
    lab.replica.cli("failover-network", "clear", "net01", "--adapter", "1")
    lab.replica.cli("failover-network", "set", "net01", "--ip", "198.51.100.7/25", "--gateway", "198.51.100.1",
                    "--dns", "198.51.100.53")
    shown = lab.replica.cli("failover-network", "show", "net01").stdout
    assert "198.51.100.7/25" in shown and "2001:db8::10" not in shown, shown
    bad = lab.replica.cli("failover-network", "set", "net01", "--ip", "198.51.100.7", check=False)
    assert bad.returncode != 0 and "prefix length" in bad.stderr, bad.stderr

    # The failed-over VM's start command gets them.
    seen = tmp_path / "net01.env"
    lab.replica.cli("vm", "power", "net01", "--start-command",
                    f"printf '%s' \"${{VMREPLICA_FAILOVER_NETWORK-unset}}\" > {seen}")
    lab.primary.stop()
    lab.replica.cli("failover", "net01")
    rv, _ = r.InvokeMethod("RequestStateChange", rvm.path, RequestedState=Uint16(2))
    assert rv == 0, rv
    given = json.loads(seen.read_text())
    assert given == [{"adapter": 0, "protocol_if_type": 4096, "dhcp_enabled": False,
                      "ip_addresses": ["198.51.100.7"], "subnets": ["25"],
                      "default_gateways": ["198.51.100.1"], "dns_servers": ["198.51.100.53"]}], given


def test_a_paused_resynchronization_keeps_its_progress_unless_the_disk_changed(lab, tmp_path):
    """Suspend-VMReplication during a resynchronization (11) keeps what it hashed on both hosts;
    Resume goes on from there (spec §13.6). A disk written during the pause is hashed again, so
    the write still reaches the replica."""
    disk = tmp_path / "rsy03.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", disk, "1G")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 768M", disk)
    vm_id = replicate_network(lab, tmp_path, "rsy03", [disk], "--no-compression")
    p = lab.primary.conn()
    pvm = vm_by_name(p, "rsy03")
    rrsc(p, pvm, 7)
    settled(lab, vm_id)
    tracking = lab.primary.data_dir / "tracking" / vm_id.upper()
    shutil.rmtree(tracking)  # tracking lost: a resynchronization is needed
    rrsc(p, pvm, 3)
    wait_for(lambda: vm_by_name(p, "rsy03")["ReplicationState"] == 9, what="resynchronization required")
    hashes = tracking / "disk0.resync-hashes"
    svc = p.EnumerateInstances("Msvm_ReplicationService")[0]

    def change(state):
        rv, out = p.InvokeMethod("RequestReplicationStateChange", pvm.path, RequestedState=Uint16(state))
        assert rv == 4096, rv
        return out["Job"]

    def pause_while_hashing():
        wait_for(lambda: hashes.exists() and hashes.stat().st_size >= 2048 * 16, timeout=60,
                 what="the disk half hashed")
        assert wait_job(p, change(7), timeout=60)["JobState"] == 7
        assert vm_by_name(p, "rsy03")["ReplicationState"] == 11
        kept = hashes.stat().st_size // 16
        assert 0 < kept < 16384, kept  # stopped part way (1 GiB: 16384 blocks)
        return kept

    time.sleep(2.5)  # the file left alone: its hashes can be kept
    rv, out = p.InvokeMethod("Resynchronize", svc.path, ComputerSystem=pvm.path)
    assert rv == 4096, rv
    pause_while_hashing()
    # Written during the pause, in a block hashed before it.
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 64k", disk)
    time.sleep(2.5)
    job = change(3)
    wait_for(lambda: "hashed again" in p.GetInstance(job)["Description"], timeout=30,
             what="the job to say the disk changed during the pause")
    assert "not used" in p.GetInstance(job)["Description"]
    kept = pause_while_hashing()
    time.sleep(2.5)
    job = wait_job(p, change(3), timeout=300)
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert f"{kept} of 16384 blocks were hashed before the pause" in job["Description"], job["Description"]
    # A later session on the replica started from the hashes an earlier one made (the replica
    # publishes them 64 MiB at a time, so a pause that comes early on a loaded machine may find
    # none yet to keep).
    assert "kept from an earlier comparison" in plain_log(lab.replica)
    assert vm_by_name(p, "rsy03")["ReplicationState"] == 3
    assert not hashes.exists()  # done: nothing kept
    rrsc(p, pvm, 7)
    seq = settled(lab, vm_id)
    same, text = compare(lab.storage / vm_id.lower() / "disk0" / f"p{seq:020}.qcow2", disk, "qcow2")
    assert same, text  # the write made during the pause is there


@pytest.mark.parametrize("left", ["images", "images-and-their-record"])
def test_a_commit_whose_failover_disks_are_gone_never_takes_an_earlier_failovers_images(lab, tmp_path, left):
    """A failed-over VM whose failover disks are gone (as a RevertFailover cut off right after it
    deleted them leaves it, still in 5) is not committed onto the images an earlier failover's
    commit left in its `<vm>.failed-over/` directory: CommitFailover fails and every recovery point
    stays. (It took those images as its own, made them the VM's disks and deleted every point.)
    Also when that earlier commit, cut off, recorded the very point and log this failover has (a
    failover to the same point, reverted): a failover begun anew forgets that record."""
    disk, vm_id = protected_and_suspended(lab, tmp_path, "stale01")
    with raw_peer(lab) as c:
        last = c.get(f"/vmreplica/v1/vms/{vm_id.lower()}").json()["last_committed"]
    lab.primary.stop()
    r = lab.replica.conn()
    stale = lab.storage / f"{vm_id.lower()}.failed-over"
    stale.mkdir()
    run("qemu-img", "create", "-q", "-f", "qcow2", stale / "disk0.qcow2", "256M")
    if left == "images-and-their-record":
        (stale / "flattened-for.json").write_text(json.dumps(
            {"point": last["sequence"], "log_hash": last["log_hash"], "maps": False}))
    lab.replica.cli("failover", "stale01")
    assert vm_by_name(r, "stale01")["ReplicationState"] == 5
    shutil.rmtree(lab.storage / vm_id.lower() / "overlays" / "failover")
    points = sorted(p.name for p in (lab.storage / vm_id.lower()).glob("p*.json"))
    assert points
    rsvc = r.EnumerateInstances("Msvm_ReplicationService")[0]
    rv, out = r.InvokeMethod("CommitFailover", rsvc.path, ComputerSystem=vm_by_name(r, "stale01").path)
    assert rv == 4096, rv
    job = wait_job(r, out["Job"], timeout=60)
    assert job["JobState"] != 7, "committed onto an earlier failover's images"
    assert "cannot flatten the failover disks" in job["ErrorDescription"]
    assert vm_by_name(r, "stale01")["ReplicationState"] == 5
    assert sorted(p.name for p in (lab.storage / vm_id.lower()).glob("p*.json")) == points
    assert str(stale / "disk0.qcow2") not in vm_disks(lab.replica, "stale01")
