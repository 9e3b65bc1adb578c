"""The management plane driven by pywbem exactly as an orchestration tool drives Hyper-V.

Each test starts a real vmreplicad on a loopback port with its own data directory.
"""

import json
import shutil
import xml.etree.ElementTree as ET

import pywbem
from pywbem import CIMDateTime, Uint16

from conftest import NAMESPACE, free_port, thumbprint, wait_job

THUMBPRINT = thumbprint("hv1.example.org")


def service(conn):
    services = conn.EnumerateInstances("Msvm_ReplicationService")
    assert len(services) == 1
    return services[0]


def vm_by_name(conn, name):
    vms = conn.ExecQuery("WQL", f"SELECT * FROM Msvm_ComputerSystem WHERE ElementName = '{name}'")
    assert len(vms) == 1, vms
    return vms[0]


def settings_of(conn, vm):
    rsds = conn.Associators(vm.path, ResultClass="Msvm_ReplicationSettingData")
    assert len(rsds) == 1
    return rsds[0]


def enable_settings(rsd, **changes):
    rsd["RecoveryConnectionPoint"] = "replica.example.org"
    rsd["RecoveryServerPortNumber"] = Uint16(443)
    rsd["AuthenticationType"] = Uint16(2)
    rsd["CertificateThumbPrint"] = THUMBPRINT
    rsd["ReplicationInterval"] = Uint16(30)
    for k, v in changes.items():
        rsd[k] = v
    return rsd


def relationship_of(conn, vm):
    rels = conn.Associators(vm.path, AssocClass="Msvm_SystemReplicationRelationship")
    assert len(rels) <= 1
    return rels[0] if rels else None


def props(embedded):
    """PROPERTY name -> value text of an embedded instance. pywbem already decodes the out parameters
    marked EmbeddedObject="instance"; a plain string is read as Microsoft's sample reads it."""
    if isinstance(embedded, pywbem.CIMInstance):
        return {k: (None if v is None else str(v)) for k, v in embedded.items()}
    root = ET.fromstring(embedded)
    return {p.get("NAME"): (p.findtext("VALUE")) for p in root.iter() if p.tag.startswith("PROPERTY")}


def test_enable_replication_the_way_microsofts_sample_does_and_everything_survives_a_restart(daemon, disk):
    images = [disk("web01.qcow2"), disk("web01-data.qcow2")]
    vm_id = daemon.add_vm("web01", images)
    conn = daemon.conn()

    svc = service(conn)
    assert svc["Name"] == "replicasvc"
    assert svc["Caption"] == "Hyper-V Replica Service"
    assert svc["SystemName"] == daemon.host_name

    vm = vm_by_name(conn, "web01")
    assert vm["Name"] == vm_id
    assert vm["ReplicationMode"] == 0 and vm["ReplicationState"] == 0
    assert vm["EnabledState"] == 3  # no QMP socket: off

    # A default Msvm_ReplicationSettingData exists before replication is enabled (spec §1).
    rsd = settings_of(conn, vm)
    assert rsd["InstanceID"] == f"Microsoft:{vm_id}\\HVR\\0"
    assert rsd["VirtualSystemType"] == "Microsoft:Hyper-V:Replica"
    assert rsd["ReplicationInterval"] == 300
    assert len(rsd["IncludedDisks"]) == 2
    disks = conn.Associators(vm.path, ResultClass="Msvm_StorageAllocationSettingData")
    assert sorted(d["HostResource"][0] for d in disks) == sorted(str(p) for p in images)

    # Change it, serialize it, pass it in (the sample's flow); the instance keeps its path.
    enable_settings(rsd, RecoveryHistory=Uint16(4), ApplicationConsistentSnapshotInterval=Uint16(2))
    rv, out = conn.InvokeMethod("CreateReplicationRelationship", svc.path,
                                ComputerSystem=vm.path, ReplicationSettingData=rsd.tocimxmlstr())
    assert rv == 4096
    job = wait_job(conn, out["Job"])
    assert job["JobState"] == 7, job["ErrorDescription"]
    assert job["JobType"] == 91
    assert job["PercentComplete"] == 100
    assert job["TimeBeforeRemoval"] == pywbem.CIMDateTime("00000000000500.000000:000")

    rel = relationship_of(conn, vm)
    assert rel["InstanceID"] == f"Microsoft:{vm_id}\\HVR\\0"
    assert rel["ReplicationState"] == 1
    vm = conn.GetInstance(vm.path)
    assert vm["ReplicationMode"] == 1 and vm["ReplicationState"] == 1
    rsd = settings_of(conn, vm)
    assert rsd["RecoveryConnectionPoint"] == "replica.example.org"
    assert rsd["ReplicationInterval"] == 30
    assert rsd["RecoveryHistory"] == 4
    assert rsd["ApplicationConsistentSnapshotInterval"] == 2
    assert rsd["CertificateThumbPrint"] == THUMBPRINT
    assert rsd["PrimaryConnectionPoint"] == daemon.host_name

    # Enabling twice is refused by the state machine and changes nothing.
    rv, _ = conn.InvokeMethod("CreateReplicationRelationship", svc.path,
                              ComputerSystem=vm.path, ReplicationSettingData=rsd.tocimxmlstr())
    assert rv == 32775

    # As with Hyper-V, enabling created the replica VM on the recovery server: same GUID, mode
    # Replica, waiting for initial replication (2).
    r = daemon.replica.conn()
    placeholder = vm_by_name(r, "web01")
    assert placeholder["Name"] == vm["Name"]
    assert placeholder["ReplicationMode"] == 2 and placeholder["ReplicationState"] == 2

    daemon.restart()
    conn = daemon.conn()
    vm = vm_by_name(conn, "web01")
    assert vm["ReplicationMode"] == 1 and vm["ReplicationState"] == 1
    assert relationship_of(conn, vm)["ReplicationState"] == 1
    assert settings_of(conn, vm)["ReplicationInterval"] == 30
    kept = conn.GetInstance(job.path)
    assert kept["JobState"] == 7 and kept["JobType"] == 91
    assert any(j["InstanceID"] == job["InstanceID"] for j in conn.EnumerateInstances("Msvm_ConcreteJob"))


def test_modify_then_remove_relationship(daemon, disk):
    daemon.add_vm("db01", [disk()])
    conn = daemon.conn()
    svc, vm = service(conn), vm_by_name(conn, "db01")
    rsd = enable_settings(settings_of(conn, vm))
    rv, out = conn.InvokeMethod("CreateReplicationRelationship", svc.path,
                                ComputerSystem=vm.path, ReplicationSettingData=rsd.tocimxmlstr())
    assert rv == 4096 and wait_job(conn, out["Job"])["JobState"] == 7

    rsd = settings_of(conn, vm)
    rsd["ReplicationInterval"] = Uint16(900)
    rv, out = conn.InvokeMethod("ModifyReplicationSettings", svc.path,
                                ComputerSystem=vm.path, ReplicationSettingData=rsd.tocimxmlstr())
    assert rv == 4096
    assert wait_job(conn, out["Job"])["JobType"] == 92
    assert settings_of(conn, vm)["ReplicationInterval"] == 900
    # The auto-resynchronization window is a local time of day (spec §6): a timestamp's own time
    # of day is kept, not moved by its offset as MonitoringStartTime's is.
    rsd = settings_of(conn, vm)
    rsd["AutoResynchronizeIntervalStart"] = CIMDateTime("20261128183000.000000+480")
    rv, out = conn.InvokeMethod("ModifyReplicationSettings", svc.path,
                                ComputerSystem=vm.path, ReplicationSettingData=rsd.tocimxmlstr())
    assert rv == 4096 and wait_job(conn, out["Job"])["JobState"] == 7
    start = settings_of(conn, vm)["AutoResynchronizeIntervalStart"]
    assert str(start) == "00000000183000.000000:000", start

    rsd["ReplicationInterval"] = Uint16(60)
    rv, _ = conn.InvokeMethod("ModifyReplicationSettings", svc.path,
                              ComputerSystem=vm.path, ReplicationSettingData=rsd.tocimxmlstr())
    assert rv == 32773
    assert settings_of(conn, vm)["ReplicationInterval"] == 900

    rel = relationship_of(conn, vm)
    rv, out = conn.InvokeMethod("RemoveReplicationRelationshipEx", svc.path, ComputerSystem=vm.path,
                                ReplicationRelationship=rel.tocimxmlstr())
    assert rv == 4096 and wait_job(conn, out["Job"])["JobType"] == 93
    vm = conn.GetInstance(vm.path)
    assert vm["ReplicationMode"] == 0 and vm["ReplicationState"] == 0
    assert relationship_of(conn, vm) is None
    # The default settings come back, as on a VM that never replicated.
    assert settings_of(conn, vm)["ReplicationInterval"] == 300


def test_replica_side_state_changes_suspend_resume_and_authorization(daemon, disk):
    daemon.add_vm("app01", [disk()])
    conn = daemon.conn()
    svc, vm = service(conn), vm_by_name(conn, "app01")

    # Nothing to suspend before replication exists.
    rv, _ = conn.InvokeMethod("RequestReplicationStateChange", vm.path, RequestedState=Uint16(7))
    assert rv == 32775

    # Enable-VMReplication -AsReplica: RRSC(2) makes the VM a replica waiting for initial replication.
    rv, out = conn.InvokeMethod("RequestReplicationStateChange", vm.path, RequestedState=Uint16(2))
    assert rv == 4096
    assert wait_job(conn, out["Job"])["JobState"] == 7
    vm = conn.GetInstance(vm.path)
    assert vm["ReplicationMode"] == 2 and vm["ReplicationState"] == 2

    rel = relationship_of(conn, vm)
    rv, out = conn.InvokeMethod("RequestReplicationStateChangeEx", vm.path,
                                ReplicationRelationship=rel.tocimxmlstr(), RequestedState=Uint16(7))
    assert rv == 4096 and wait_job(conn, out["Job"])["JobState"] == 7
    assert relationship_of(conn, vm)["ReplicationState"] == 7

    # Resumed before any initial replication arrived: back to waiting for it (2), where an import
    # is still accepted (it went on to 3, and ImportInitialReplica was refused for good).
    rv, out = conn.InvokeMethod("RequestReplicationStateChange", vm.path, RequestedState=Uint16(3))
    assert rv == 4096 and wait_job(conn, out["Job"])["JobState"] == 7
    assert relationship_of(conn, vm)["ReplicationState"] == 2

    # A replica's primary relationship settings cannot be changed here (PS-IMPL).
    rsd = enable_settings(settings_of(conn, vm))
    rv, _ = conn.InvokeMethod("ModifyReplicationSettings", svc.path,
                              ComputerSystem=vm.path, ReplicationSettingData=rsd.tocimxmlstr())
    assert rv == 32775

    # The authorization table, then bind the replica to an entry, then remove it: replication stops.
    entry = pywbem.CIMInstance("Msvm_ReplicationAuthorizationSettingData", properties={
        "AllowedPrimaryHostSystem": "*.example.org", "TrustGroup": "DEFAULT",
        "ReplicaStorageLocation": "/srv/replicas"})
    rv, _ = conn.InvokeMethod("AddAuthorizationEntry", svc.path, AuthorizationEntry=entry.tocimxmlstr())
    assert rv == 0
    rv, _ = conn.InvokeMethod("AddAuthorizationEntry", svc.path, AuthorizationEntry=entry.tocimxmlstr())
    assert rv == 32773
    entry["TrustGroup"] = "G2"
    rv, _ = conn.InvokeMethod("ModifyAuthorizationEntry", svc.path, AuthorizationEntry=entry.tocimxmlstr())
    assert rv == 0
    entries = conn.Associators(svc.path, ResultClass="Msvm_ReplicationAuthorizationSettingData")
    assert [(e["AllowedPrimaryHostSystem"], e["TrustGroup"]) for e in entries] == [("*.example.org", "G2")]
    rv, _ = conn.InvokeMethod("SetAuthorizationEntry", svc.path, ComputerSystem=vm.path,
                              AuthorizationEntry=entries[0].tocimxmlstr())
    assert rv == 0
    rv, _ = conn.InvokeMethod("RemoveAuthorizationEntry", svc.path, AllowedPrimaryHostSystem="*.example.org")
    assert rv == 0
    assert relationship_of(conn, vm)["ReplicationState"] == 8
    assert conn.GetInstance(vm.path)["ReplicationHealth"] == 3
    assert conn.EnumerateInstances("Msvm_ReplicationAuthorizationSettingData") == []
    bad = pywbem.CIMInstance("Msvm_ReplicationAuthorizationSettingData", properties={
        "AllowedPrimaryHostSystem": "a.*.example.org", "TrustGroup": "DEFAULT",
        "ReplicaStorageLocation": "relative/path"})
    rv, _ = conn.InvokeMethod("AddAuthorizationEntry", svc.path, AuthorizationEntry=bad.tocimxmlstr())
    assert rv == 32773


def test_recovery_server_settings_statistics_and_certificates(daemon, disk, tmp_path):
    conn = daemon.conn()
    svc = service(conn)
    settings = conn.Associators(svc.path, ResultClass="Msvm_ReplicationServiceSettingData")
    assert len(settings) == 1
    s = settings[0]
    assert s["RecoveryServerEnabled"] is False and s["HttpsPort"] == 443 and s["MonitoringInterval"] == 43200

    s["RecoveryServerEnabled"] = True
    s["AllowedAuthenticationType"] = Uint16(2)
    s["CertificateThumbPrint"] = "ab" * 20
    s["HttpsPort"] = Uint16(free_port())
    rv, out = conn.InvokeMethod("ModifyServiceSettings", svc.path, SettingData=s.tocimxmlstr())
    assert rv == 32773  # no such certificate in the host's store
    issued = json.loads(daemon.cli("--output", "json", "cert", "new", "--host", "hv1.lab.example",
                                   "--out", str(tmp_path / "ca")).stdout)["hosts"][0]
    shutil.copytree(issued["certs_dir"], daemon.data_dir / "certs", dirs_exist_ok=True)
    s["CertificateThumbPrint"] = issued["thumbprint"]
    s["HttpsPort"] = Uint16(8443)
    rv, out = conn.InvokeMethod("ModifyServiceSettings", svc.path, SettingData=s.tocimxmlstr())
    assert rv == 4096
    assert wait_job(conn, out["Job"])["JobType"] == 90
    s = conn.EnumerateInstances("Msvm_ReplicationServiceSettingData")[0]
    assert s["RecoveryServerEnabled"] is True and s["HttpsPort"] == 8443

    s["AllowedAuthenticationType"] = Uint16(1)  # Kerberos only
    rv, _ = conn.InvokeMethod("ModifyServiceSettings", svc.path, SettingData=s.tocimxmlstr())
    assert rv == 32770

    # MonitoringStartTime given as a timestamp is a time of day taken to UTC with its offset:
    # 09:00 at UTC+8 is 01:00 UTC (it was stored as 09:00, the offset dropped).
    s = conn.Associators(svc.path, ResultClass="Msvm_ReplicationServiceSettingData")[0]
    s["MonitoringStartTime"] = CIMDateTime("20261128090000.000000+480")
    rv, out = conn.InvokeMethod("ModifyServiceSettings", svc.path, SettingData=s.tocimxmlstr())
    assert rv == 4096 and wait_job(conn, out["Job"])["JobState"] == 7
    s = conn.Associators(svc.path, ResultClass="Msvm_ReplicationServiceSettingData")[0]
    assert str(s["MonitoringStartTime"]) == "00000000010000.000000:000", s["MonitoringStartTime"]

    # Statistics of a fresh relationship: zero counters, the health message of IR not done.
    daemon.add_vm("stat01", [disk()])
    vm = vm_by_name(conn, "stat01")
    rv, _ = conn.InvokeMethod("GetReplicationStatistics", svc.path, ComputerSystem=vm.path)
    assert rv == 32775  # no relationship yet
    rv, out = conn.InvokeMethod("CreateReplicationRelationship", svc.path, ComputerSystem=vm.path,
                                ReplicationSettingData=enable_settings(settings_of(conn, vm)).tocimxmlstr())
    wait_job(conn, out["Job"])
    rel = relationship_of(conn, vm)
    rv, out = conn.InvokeMethod("GetReplicationStatisticsEx", svc.path, ComputerSystem=vm.path,
                                ReplicationRelationship=rel.tocimxmlstr())
    assert rv == 0
    stats = props(out["ReplicationStatistics"][0])
    assert stats["ReplicationSuccessCount"] == "0" and stats["ReplicationHealth"] == "2"
    # Counted from the relationship's creation to the end of its monitoring window: 12 h windows
    # from 01:00 UTC end at 01:00 or 13:00 (it was the creation time plus 12 h).
    start, end = (CIMDateTime(stats[k]).datetime for k in ("StartStatisticTime", "EndStatisticTime"))
    assert end.strftime("%H%M%S") in ("010000", "130000") and 0 < (end - start).total_seconds() <= 43200, (start, end)
    issues = [props(e)["Message"] for e in out["ReplicationHealthIssues"]]
    assert any("initial replication" in m.lower() for m in issues), issues
    rv, _ = conn.InvokeMethod("ResetReplicationStatisticsEx", svc.path, ComputerSystem=vm.path,
                              ReplicationRelationship=rel.tocimxmlstr())
    assert rv == 0

    # GetSystemCertificates reads the host's certificate store directory: each issued PEM holds a
    # host certificate and its CA (the lab's and the one issued above); keys and trusted/ are not listed.
    rv, out = conn.InvokeMethod("GetSystemCertificates", svc.path)
    assert rv == 0 and len(out["EncodedCertificates"]) == 4
    before = list(out["EncodedCertificates"])
    certs = daemon.data_dir / "certs"
    (certs / "aaa-host.pem").write_text("-----BEGIN CERTIFICATE-----\nQUJD\nREVG\n-----END CERTIFICATE-----\n")
    rv, out = conn.InvokeMethod("GetSystemCertificates", svc.path)
    assert rv == 0 and sorted(out["EncodedCertificates"]) == sorted(["QUJDREVG"] + before)


def test_job_errors_and_cancel_of_a_finished_job(daemon, disk):
    daemon.add_vm("job01", [disk()])
    conn = daemon.conn()
    svc, vm = service(conn), vm_by_name(conn, "job01")
    rv, out = conn.InvokeMethod("CreateReplicationRelationship", svc.path, ComputerSystem=vm.path,
                                ReplicationSettingData=enable_settings(settings_of(conn, vm)).tocimxmlstr())
    job = wait_job(conn, out["Job"])
    rv, out = conn.InvokeMethod("GetErrorEx", job.path)
    assert rv == 0 and out["Errors"] == []
    rv, out = conn.InvokeMethod("GetError", job.path)
    assert rv == 0 and "Error" not in out  # no error to report
    rv, _ = conn.InvokeMethod("RequestStateChange", job.path, RequestedState=Uint16(4))
    assert rv == 32775  # already finished, nothing to cancel
    rv, _ = conn.InvokeMethod("RequestStateChange", job.path, RequestedState=Uint16(3))
    assert rv == 32770


def test_cli_defines_enables_and_reports(daemon, disk):
    vm_id = daemon.add_vm("cli01", [disk()])
    assert len(vm_id) == 36
    listed = json.loads(daemon.cli("--output", "json", "vm", "list").stdout)
    assert [v["name"] for v in listed["vms"]] == ["cli01"]

    daemon.cli("enable", "cli01", "--replica-server", "replica.example.org", "--thumbprint", THUMBPRINT,
               "--frequency", "30")
    status = json.loads(daemon.cli("--output", "json", "status").stdout)
    row = status["rows"][0]
    assert row["state"] == "ReadyForInitialReplication" and row["mode"] == "Primary"
    assert row["replication_interval"] == 30
    table = daemon.cli("status").stdout
    assert "cli01" in table and "ReadyForInitialReplication" in table

    refused = daemon.cli("set", "cli01", "--frequency", "60", check=False)
    assert refused.returncode == 3
    assert "ReplicationInterval" in refused.stderr and "32773" in refused.stderr

    # set changes only what it is given.
    daemon.cli("set", "cli01", "--recovery-history", "6", "--vss-frequency", "2")
    daemon.cli("set", "cli01", "--frequency", "900")
    shown = json.loads(daemon.cli("--output", "json", "settings", "cli01").stdout)
    assert (shown["replication_interval"], shown["recovery_history"]) == (900, 6)
    assert shown["application_consistent_snapshot_interval"] == 2
    assert shown["recovery_connection_point"] == "replica.example.org"

    # Initial replication over the network to the companion recovery server, from the CLI.
    started = daemon.cli("start", "cli01")
    assert "Start Inband Initial Replication" in started.stdout and "Completed" in started.stdout

    jobs = json.loads(daemon.cli("--output", "json", "job", "list").stdout)["jobs"]
    assert [j["job_type"] for j in jobs] == [91, 92, 92, 94]
    shown = json.loads(daemon.cli("--output", "json", "job", "wait", jobs[0]["id"]).stdout)
    assert shown["job_state"] == 7

    # The same VM seen through CIM.
    conn = daemon.conn()
    assert vm_by_name(conn, "cli01")["ReplicationState"] == 3
    missing = daemon.cli("vm", "add", "--name", "ghost", "--disk", "/nonexistent.qcow2", check=False)
    assert missing.returncode == 3 and "does not exist" in missing.stderr
    # A block device (an LVM volume) or another special file is refused for what it is.
    special = daemon.cli("vm", "add", "--name", "special", "--disk", "/dev/null", check=False)
    assert special.returncode == 3 and "not a regular file" in special.stderr and "32773" in special.stderr
    guid_name = daemon.cli("vm", "add", "--name", vm_id, "--disk", "/nonexistent.qcow2", check=False)
    assert guid_name.returncode == 3 and "GUID" in guid_name.stderr


def test_concurrent_enables_of_one_vm_start_exactly_one_job(daemon, disk):
    """Two tools racing: one relationship, one job; the others are told the VM is busy or enabled."""
    import concurrent.futures

    daemon.add_vm("race01", [disk()])
    conn = daemon.conn()
    svc, vm = service(conn), vm_by_name(conn, "race01")
    payload = enable_settings(settings_of(conn, vm)).tocimxmlstr()

    def enable(_):
        c = daemon.conn()
        return c.InvokeMethod("CreateReplicationRelationship", svc.path,
                              ComputerSystem=vm.path, ReplicationSettingData=payload)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(enable, range(8)))
    codes = sorted(int(rv) for rv, _ in results)
    assert codes.count(4096) == 1, codes
    assert set(codes) <= {4096, 32774, 32775}, codes
    started = [out["Job"] for rv, out in results if rv == 4096]
    assert wait_job(conn, started[0])["JobState"] == 7
    jobs = conn.EnumerateInstances("Msvm_ConcreteJob")
    assert [j["JobType"] for j in jobs] == [91]
    assert relationship_of(conn, vm)["ReplicationState"] == 1


def test_a_job_running_when_the_daemon_stopped_is_reported_failed_after_restart(daemon):
    """A job is never silently lost: one left Running in the database (as a crash mid-job leaves it) is
    reported as failed, with a message and a recommended action, by the next daemon."""
    import sqlite3
    import time as _time

    daemon.stop()
    db = sqlite3.connect(daemon.data_dir / "vmreplica.db")
    now = int(_time.time())
    db.execute(
        "INSERT INTO jobs (id, job_type, state, percent, error_code, error_description, errors, vm, description,"
        " time_submitted, start_time, time_finished, last_change, cancellable)"
        " VALUES ('6D3C1A52-0000-4000-8000-000000000001', 94, 4, 37, 0, NULL, '[]', NULL, 'initial replication',"
        " ?, ?, NULL, ?, 1)", (now, now, now))
    db.commit()
    db.close()
    daemon.start()
    conn = daemon.conn()
    job = conn.GetInstance(pywbem.CIMInstanceName(
        "Msvm_ConcreteJob", {"InstanceID": "6D3C1A52-0000-4000-8000-000000000001"}, namespace=NAMESPACE))
    assert job["JobState"] == 10
    assert job["JobType"] == 94
    assert "daemon stopped" in job["ErrorDescription"]
    rv, out = conn.InvokeMethod("GetErrorEx", job.path)
    assert rv == 0 and len(out["Errors"]) == 1
    error = props(out["Errors"][0])
    assert "daemon stopped" in error["Message"]
    assert error["RecommendedActions"]


def test_define_system_over_cim_is_the_same_as_vm_add(daemon, disk):
    """A WBEM tool defines the VM itself (Msvm_VirtualSystemManagementService.DefineSystem)."""
    conn = daemon.conn()
    vsms = conn.EnumerateInstanceNames("Msvm_VirtualSystemManagementService")[0]
    image = disk("cim01.qcow2")
    system = pywbem.CIMInstance("Msvm_VirtualSystemSettingData", properties={
        "ElementName": "cim01", "VirtualSystemIdentifier": "1B4E28BA-2FA1-11D2-883F-0016D3CCA427"})
    sasd = pywbem.CIMInstance("Msvm_StorageAllocationSettingData", properties={
        "HostResource": [str(image)], "ResourceType": Uint16(31)})
    rv, out = conn.InvokeMethod("DefineSystem", vsms, SystemSettings=system.tocimxmlstr(),
                                ResourceSettings=[sasd.tocimxmlstr()])
    assert rv == 0
    vm = conn.GetInstance(out["ResultingSystem"])
    assert vm["ElementName"] == "cim01" and vm["Name"] == "1B4E28BA-2FA1-11D2-883F-0016D3CCA427"
    listed = json.loads(daemon.cli("--output", "json", "vm", "list").stdout)["vms"]
    assert [(v["name"], v["disks"]) for v in listed] == [("cim01", [str(image)])]

    rv, _ = conn.InvokeMethod("DefineSystem", vsms, SystemSettings=system.tocimxmlstr(),
                              ResourceSettings=[sasd.tocimxmlstr()])
    assert rv == 32773  # the name (and GUID) already exist
    missing = pywbem.CIMInstance("Msvm_StorageAllocationSettingData", properties={
        "HostResource": ["/nonexistent/disk.qcow2"]})
    other = pywbem.CIMInstance("Msvm_VirtualSystemSettingData", properties={"ElementName": "cim02"})
    rv, _ = conn.InvokeMethod("DefineSystem", vsms, SystemSettings=other.tocimxmlstr(),
                              ResourceSettings=[missing.tocimxmlstr()])
    assert rv == 32779
    rv, _ = conn.InvokeMethod("DestroySystem", vsms, AffectedSystem=vm.path)
    assert rv == 32775  # only test VMs are destroyed there


def test_cli_replica_side_verbs_and_completions(daemon, disk):
    daemon.add_vm("rep01", [disk()])
    daemon.cli("auth", "add", "--primary", "primary.example.org", "--storage", "/srv/replicas")
    not_replica = daemon.cli("auth", "bind", "rep01", "--primary", "primary.example.org", check=False)
    assert not_replica.returncode == 3 and "32775" in not_replica.stderr
    daemon.cli("enable-as-replica", "rep01")
    daemon.cli("auth", "bind", "rep01", "--primary", "primary.example.org")
    unknown = daemon.cli("auth", "bind", "rep01", "--primary", "other.example.org", check=False)
    assert unknown.returncode == 3 and "no authorization entry" in unknown.stderr
    daemon.cli("suspend", "rep01")
    row = json.loads(daemon.cli("--output", "json", "status").stdout)["rows"][0]
    assert (row["mode"], row["state"]) == ("Replica", "Suspended")
    daemon.cli("resume", "rep01")
    row = json.loads(daemon.cli("--output", "json", "status").stdout)["rows"][0]
    assert row["state"] == "WaitingForInitialReplication"  # none arrived yet
    daemon.cli("auth", "remove", "primary.example.org")
    row = json.loads(daemon.cli("--output", "json", "status").stdout)["rows"][0]
    assert (row["state"], row["health"]) == ("Error", "Critical")
    script = daemon.cli("completions", "bash").stdout
    assert "enable-as-replica" in script


def test_the_ex_methods_act_only_on_a_relationship_of_the_vm_they_name(daemon, disk):
    """RemoveReplicationRelationshipEx, Get/ResetReplicationStatisticsEx and
    RequestReplicationStateChangeEx name a relationship (`Microsoft:<VMID>\\HVR\\<0|1>`): one of
    another VM is an invalid parameter, and nothing of either VM changes (it used to act on the
    VM the call named); relationship 1 (extended replication) is not supported."""
    conn = daemon.conn()
    svc = service(conn)
    for name in ("exa01", "exb01"):
        daemon.add_vm(name, [disk(f"{name}.qcow2")])
        vm = vm_by_name(conn, name)
        rsd = enable_settings(settings_of(conn, vm))
        rv, out = conn.InvokeMethod("CreateReplicationRelationship", svc.path,
                                    ComputerSystem=vm.path, ReplicationSettingData=rsd.tocimxmlstr())
        assert rv == 4096 and wait_job(conn, out["Job"])["JobState"] == 7
    a, b = vm_by_name(conn, "exa01"), vm_by_name(conn, "exb01")
    rel_b = relationship_of(conn, b)
    for method in ("RemoveReplicationRelationshipEx", "GetReplicationStatisticsEx",
                   "ResetReplicationStatisticsEx"):
        rv, out = conn.InvokeMethod(method, svc.path, ComputerSystem=a.path,
                                    ReplicationRelationship=rel_b.tocimxmlstr())
        assert rv == 32773, (method, rv)
        assert out.get("Job") is None
    rv, _ = conn.InvokeMethod("RequestReplicationStateChangeEx", a.path, RequestedState=Uint16(7),
                              ReplicationRelationship=rel_b.tocimxmlstr())
    assert rv == 32773
    own_id = relationship_of(conn, a)["InstanceID"]
    extended = pywbem.CIMInstance("Msvm_ReplicationRelationship", properties={"InstanceID": own_id[:-1] + "1"})
    rv, _ = conn.InvokeMethod("RemoveReplicationRelationshipEx", svc.path, ComputerSystem=a.path,
                              ReplicationRelationship=extended.tocimxmlstr())
    assert rv == 32770
    for vm in (a, b):
        vm = conn.GetInstance(vm.path)
        assert vm["ReplicationMode"] == 1 and vm["ReplicationState"] == 1, vm["ElementName"]
        assert relationship_of(conn, vm) is not None
    # Its own relationship, InstanceID in lower case as a client may send it: removed.
    own = pywbem.CIMInstance("Msvm_ReplicationRelationship", properties={"InstanceID": own_id.lower()})
    rv, out = conn.InvokeMethod("RemoveReplicationRelationshipEx", svc.path, ComputerSystem=a.path,
                                ReplicationRelationship=own.tocimxmlstr())
    assert rv == 4096 and wait_job(conn, out["Job"])["JobState"] == 7
    assert relationship_of(conn, conn.GetInstance(a.path)) is None
    assert relationship_of(conn, conn.GetInstance(b.path)) is not None


def test_a_replication_provider_other_than_the_built_in_one_is_not_supported(daemon, disk):
    """ReplicationProvider may name the built-in host-to-host provider (its GUID, or the path of its
    Msvm_ReplicationProvider instance); a path to any other provider is not supported (32770)."""
    daemon.add_vm("prov01", [disk()])
    conn = daemon.conn()
    svc, vm = service(conn), vm_by_name(conn, "prov01")
    (provider,) = conn.EnumerateInstanceNames("Msvm_ReplicationProvider")
    other = provider.copy()
    other["InstanceID"] = "Microsoft:elsewhere\\ReplicationProvider\\SomeoneElsesProvider"
    rsd = enable_settings(settings_of(conn, vm), ReplicationProvider=str(other))
    rv, out = conn.InvokeMethod("CreateReplicationRelationship", svc.path,
                                ComputerSystem=vm.path, ReplicationSettingData=rsd.tocimxmlstr())
    assert rv == 32770 and out.get("Job") is None
    assert conn.GetInstance(vm.path)["ReplicationMode"] == 0
    rsd = enable_settings(settings_of(conn, vm), ReplicationProvider=str(provider))
    rv, out = conn.InvokeMethod("CreateReplicationRelationship", svc.path,
                                ComputerSystem=vm.path, ReplicationSettingData=rsd.tocimxmlstr())
    assert rv == 4096 and wait_job(conn, out["Job"])["JobState"] == 7
