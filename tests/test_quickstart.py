"""The README's first command keeps working: the quickstart tour runs to the end and its initial
replication over the network between its two daemons yields a recovery point identical to the sample disk."""

import os
import subprocess

from conftest import ROOT, free_port


def test_the_quickstart_tour_runs_and_its_replica_equals_the_sample_disk():
    ports = set()
    while len(ports) < 4:
        ports.add(free_port())
    main, replica, replication, replication1 = sorted(ports)
    env = dict(os.environ, VMREPLICA_PORT=str(main), VMREPLICA_REPLICA_PORT=str(replica),
               VMREPLICA_REPLICATION_PORT=str(replication), VMREPLICA_REPLICATION_PORT1=str(replication1))
    res = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "Images are identical." in out
    assert "Replicating" in out and "Completed" in out
    assert "return code 32773" in out  # the tour's bad-input step
