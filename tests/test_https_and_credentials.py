"""The endpoint off loopback: HTTPS with HTTP Basic credentials (what pywbem and wbemcli send) or a
client certificate; plain HTTP on a non-loopback address is refused at start-up.

The daemon listens on 0.0.0.0 (all addresses) and the tests connect through 127.0.0.1 only.
"""

import shutil
import subprocess

import pytest
import pywbem

from conftest import CLI, DAEMON, NAMESPACE, Daemon


@pytest.fixture(autouse=True)
def _own_ca_bundle(monkeypatch):
    """requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override the CA pywbem is given (requests #3829)."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A lab CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", "/CN=vmreplica test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name, ext in [("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                      ("client", "extendedKeyUsage=clientAuth")]:
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-subj", f"/CN={name}.example.org", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)
    return d


@pytest.fixture(scope="module")
def credentials(tmp_path_factory):
    path = tmp_path_factory.mktemp("creds") / "credentials"
    for user, pw in [("admin", "s3cret pass"), ("ops", "other")]:
        subprocess.run([str(CLI), "credentials", "add", "--file", str(path), "--name", user],
                       input=pw + "\n", text=True, check=True, capture_output=True)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    return path


class TlsDaemon(Daemon):
    def __init__(self, data_dir, extra):
        super().__init__(data_dir)
        self.extra = extra
        self.url = f"https://127.0.0.1:{self.port}"

    def start(self):
        import time
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [str(DAEMON), "--data-dir", str(self.data_dir), "--cim-listen", f"0.0.0.0:{self.port}",
             "--host-name", self.host_name, *self.extra], stdout=log, stderr=log)
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text())
            res = subprocess.run(["curl", "-sk", f"{self.url}/healthz"], capture_output=True, text=True)
            if res.stdout.strip() == "ok":
                return self
            time.sleep(0.05)
        raise RuntimeError("did not start")


@pytest.fixture
def tls_daemon(tmp_path, pki, credentials):
    d = TlsDaemon(tmp_path / "data", ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                                      "--client-ca", str(pki / "ca.pem"), "--credentials", str(credentials)]).start()
    yield d
    d.stop()


def test_plain_http_or_no_authentication_off_loopback_is_refused_at_start(tmp_path, pki):
    for extra, why in [([], "needs HTTPS"),
                       (["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")],
                        "without authentication")]:
        res = subprocess.run([str(DAEMON), "--data-dir", str(tmp_path / "d"), "--cim-listen", "0.0.0.0:0", *extra],
                             capture_output=True, text=True, timeout=20)
        assert res.returncode != 0
        assert why in res.stderr, res.stderr


def test_pywbem_over_https_with_basic_credentials(tls_daemon, pki):
    good = pywbem.WBEMConnection(tls_daemon.url, ("admin", "s3cret pass"), default_namespace=NAMESPACE,
                                 ca_certs=str(pki / "ca.pem"), timeout=30)
    assert good.EnumerateInstances("Msvm_ReplicationService")[0]["Name"] == "replicasvc"
    for creds in [None, ("admin", "wrong"), ("nobody", "s3cret pass")]:
        bad = pywbem.WBEMConnection(tls_daemon.url, creds, default_namespace=NAMESPACE,
                                    ca_certs=str(pki / "ca.pem"), timeout=30)
        with pytest.raises(pywbem.AuthError):
            bad.EnumerateInstances("Msvm_ReplicationService")
    # Nothing changes state without credentials: the refused client could not add an entry.
    bad = pywbem.WBEMConnection(tls_daemon.url, None, default_namespace=NAMESPACE,
                                ca_certs=str(pki / "ca.pem"), timeout=30)
    entry = pywbem.CIMInstance("Msvm_ReplicationAuthorizationSettingData", properties={
        "AllowedPrimaryHostSystem": "*", "TrustGroup": "DEFAULT", "ReplicaStorageLocation": "/srv/r"})
    svc_path = good.EnumerateInstanceNames("Msvm_ReplicationService")[0]
    with pytest.raises(pywbem.AuthError):
        bad.InvokeMethod("AddAuthorizationEntry", svc_path, AuthorizationEntry=entry.tocimxmlstr())
    assert good.EnumerateInstances("Msvm_ReplicationAuthorizationSettingData") == []


def test_client_certificate_is_accepted_instead_of_a_password(tls_daemon, pki):
    conn = pywbem.WBEMConnection(tls_daemon.url, None, default_namespace=NAMESPACE, ca_certs=str(pki / "ca.pem"),
                                 x509={"cert_file": str(pki / "client.pem"), "key_file": str(pki / "client.key")},
                                 timeout=30)
    assert len(conn.EnumerateInstances("Msvm_ReplicationService")) == 1


def test_cli_and_wbemcli_over_https(tls_daemon, pki, tmp_path):
    disk = tmp_path / "web01.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    base = [str(CLI), "--url", tls_daemon.url, "--ca-cert", str(pki / "ca.pem")]
    res = subprocess.run(base + ["--user", "ops", "--password", "other", "vm", "add", "--name", "web01",
                                 "--disk", str(disk)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    res = subprocess.run(base + ["vm", "list"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "credentials" in res.stderr

    wbemcli = shutil.which("wbemcli")
    if wbemcli is None:
        pytest.skip("wbemcli is not installed (scripts/test.sh installs sblim-wbemcli)")
    url = f"https://ops:other@127.0.0.1:{tls_daemon.port}/root/virtualization/v2:Msvm_ComputerSystem"
    res = subprocess.run([wbemcli, "-noverify", "ein", url], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2 and 'Name="hv1.example.org"' in lines[0], lines  # the host, then web01
    bad = url.replace("ops:other", "ops:nope")
    res = subprocess.run([wbemcli, "-noverify", "ein", bad], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 or "401" in res.stdout + res.stderr
