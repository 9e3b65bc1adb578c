"""Learning and changing a VM's power state, with qemu-storage-daemon standing in for the VM's QEMU."""

import subprocess
import time

import pytest

import pywbem
from pywbem import Uint16

from conftest import wait_job  # noqa: F401  (fixtures come from conftest)


def qsd_vm(tmp_path, name):
    image = tmp_path / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    qmp = tmp_path / f"{name}.qmp"
    start = (f"qemu-storage-daemon --blockdev driver=file,node-name=file0,filename={image} "
             f"--blockdev driver=qcow2,node-name=disk0,file=file0 "
             f"--chardev socket,id=qmp0,path={qmp},server=on,wait=off --monitor chardev=qmp0 "
             f"--daemonize --pidfile {tmp_path / (name + '.pid')}")
    return image, qmp, start


@pytest.fixture
def reap(tmp_path):
    """Kills a qemu-storage-daemon a failed test left running (its pid file is in tmp_path)."""
    yield
    import os
    import signal
    for pidfile in tmp_path.glob("*.pid"):
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def test_start_and_turn_off_through_cim_and_the_cli(daemon, tmp_path, reap):
    image, qmp, start = qsd_vm(tmp_path, "pw01")
    daemon.cli("vm", "add", "--name", "pw01", "--disk", str(image), "--qmp-socket", str(qmp),
               "--start-command", start)
    conn = daemon.conn()
    vm = conn.ExecQuery("WQL", "SELECT * FROM Msvm_ComputerSystem WHERE ElementName = 'pw01'")[0]
    assert vm["EnabledState"] == 3

    rv, _ = conn.InvokeMethod("RequestStateChange", vm.path, RequestedState=Uint16(2))
    assert rv == 0
    assert conn.GetInstance(vm.path)["EnabledState"] == 2
    rv, _ = conn.InvokeMethod("RequestStateChange", vm.path, RequestedState=Uint16(2))
    assert rv == 32775  # already running

    pid = int((tmp_path / "pw01.pid").read_text())
    rv, _ = conn.InvokeMethod("RequestStateChange", vm.path, RequestedState=Uint16(3))
    assert rv == 0
    assert conn.GetInstance(vm.path)["EnabledState"] == 3
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os_kill0(pid)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("qemu-storage-daemon still runs after turn-off")

    daemon.cli("vm", "start", "pw01")
    assert conn.GetInstance(vm.path)["EnabledState"] == 2
    daemon.cli("vm", "stop", "pw01", "--shutdown")  # no guest: falls back to quit
    assert conn.GetInstance(vm.path)["EnabledState"] == 3
    rv, _ = conn.InvokeMethod("RequestStateChange", vm.path, RequestedState=Uint16(9))
    assert rv == 32770


def test_a_vm_without_a_start_command_says_so(daemon, disk):
    daemon.add_vm("nostart", [disk()])
    res = daemon.cli("vm", "start", "nostart", check=False)
    assert res.returncode == 3 and "start-command" in res.stderr and "32770" in res.stderr


def test_a_failing_start_command_is_reported(daemon, disk):
    daemon.cli("vm", "add", "--name", "bad", "--disk", str(disk()), "--start-command", "echo no such hypervisor >&2; exit 3")
    res = daemon.cli("vm", "start", "bad", check=False)
    assert res.returncode == 3 and "no such hypervisor" in res.stderr and "32768" in res.stderr


def os_kill0(pid):
    import os
    os.kill(pid, 0)


def test_a_replica_vm_starts_only_once_failed_over(daemon, disk, tmp_path):
    """A replica VM (here made by Enable-VMReplication -AsReplica, waiting for its initial
    replication) is a copy of a VM that runs elsewhere: RequestStateChange(2) is refused and its
    start command never runs. (It ran: a second copy of the VM beside the primary, or QEMU writing
    a seed while it was being taken in.)"""
    ran = tmp_path / "started"
    daemon.cli("vm", "add", "--name", "rep02", "--disk", str(disk()), "--start-command", f"touch {ran}")
    daemon.cli("enable-as-replica", "rep02")
    conn = daemon.conn()
    vm = conn.ExecQuery("WQL", "SELECT * FROM Msvm_ComputerSystem WHERE ElementName = 'rep02'")[0]
    rv, _ = conn.InvokeMethod("RequestStateChange", vm.path, RequestedState=Uint16(2))
    assert rv == 32775
    res = daemon.cli("vm", "start", "rep02", check=False)
    assert res.returncode == 3 and "only after a failover" in res.stderr, res.stderr
    assert not ran.exists()
