"""Every bad input gets a clear error and the documented code, and the daemon keeps serving.

Protocol-level cases (HTTP status + CIMError header, DSP0200 §7.3) are sent as raw HTTP; the rest goes
through pywbem. One daemon serves the whole module; after every test an EnumerateInstances of
Msvm_ReplicationService must still answer. Refused replication calls must change nothing: the VM keeps
ReplicationState 0 and its Msvm_ReplicationSettingData is unchanged.
"""

import http.client
import json
import subprocess
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

import pytest
import pywbem
from pywbem import Uint16, Uint32

from conftest import NAMESPACE, Daemon, thumbprint, wait_job

MIB = 1024 * 1024
MISSING_GUID = "00000000-0000-4000-8000-0000000000AA"

# Return codes (spec §2.1).
INVALID_PARAMETER = 32773
NOT_SUPPORTED = 32770
INVALID_STATE = 32775
INCORRECT_DATA_TYPE = 32776
JOB_STARTED = 4096


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("badinput")
    d = Daemon(base / "data", replica=True).start()
    d.disks = {}
    for name in ("web01", "ctl01"):
        disk = base / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
        d.disks[name] = d.add_vm(name, [disk]).upper()
    yield d
    d.stop()  # asserts a clean exit (status 0) after all of the abuse


@pytest.fixture(autouse=True)
def still_serving(server):
    yield
    assert server.proc.poll() is None, f"vmreplicad died: {server.log.read_text()[-3000:]}"
    services = server.conn().EnumerateInstances("Msvm_ReplicationService")
    assert [s["Name"] for s in services] == ["replicasvc"]


@pytest.fixture
def conn(server):
    return server.conn()


def service_path(conn):
    (path,) = conn.EnumerateInstanceNames("Msvm_ReplicationService")
    return path


def vm_path(server, name="web01"):
    return pywbem.CIMInstanceName(
        "Msvm_ComputerSystem", namespace=NAMESPACE,
        keybindings={"CreationClassName": "Msvm_ComputerSystem", "Name": server.disks[name]})


# ---- raw HTTP ----

NS_XML = ('<LOCALNAMESPACEPATH><NAMESPACE NAME="root"/><NAMESPACE NAME="virtualization"/>'
          '<NAMESPACE NAME="v2"/></LOCALNAMESPACEPATH>')
ENUM_SERVICE = ('<IMETHODCALL NAME="EnumerateInstances">' + NS_XML
                + '<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="Msvm_ReplicationService"/></IPARAMVALUE>'
                '</IMETHODCALL>')
CIM_HEADERS = {
    "CIMOperation": "MethodCall",
    "CIMMethod": "EnumerateInstances",
    "CIMObject": "root%2Fvirtualization%2Fv2",
    "Content-Type": 'application/xml; charset="utf-8"',
}


def message(inner, msg_id="42"):
    return ('<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0">'
            f'<MESSAGE ID="{msg_id}" PROTOCOLVERSION="1.0">{inner}</MESSAGE></CIM>').encode()


def post(server, body, headers=None, chunked=False):
    """POSTs to /cimom; returns (status, headers, body text). A server that answers before reading the
    whole body (413) may close the socket under the sender: that is tolerated."""
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        try:
            c.request("POST", "/cimom", body=body, headers=CIM_HEADERS if headers is None else headers,
                      encode_chunked=chunked)
        except (BrokenPipeError, ConnectionResetError):
            pass
        r = c.getresponse()
        return r.status, r.headers, r.read().decode("utf-8", "replace")
    finally:
        c.close()


def assert_protocol_error(result, status, mentions):
    code, headers, body = result
    assert code == status, (code, dict(headers), body)
    assert headers.get("CIMError"), f"no CIMError header: {dict(headers)}"
    assert mentions.lower() in body.lower(), body


def test_sanity_raw_request_is_answered(server):
    code, headers, body = post(server, message(f"<SIMPLEREQ>{ENUM_SERVICE}</SIMPLEREQ>", "4711"))
    assert code == 200 and headers["CIMOperation"] == "MethodResponse", body
    root = ET.fromstring(body)
    assert root.find("MESSAGE").get("ID") == "4711"
    assert root.find(".//INSTANCENAME").get("CLASSNAME") == "Msvm_ReplicationService"


@pytest.mark.parametrize("body", [b"<CIM><MESSAGE", b"<CIM></MESSAGE></CIM>", b"", b"<CIM>&undefined;</CIM>"],
                         ids=["unclosed", "mismatched", "empty", "undefined-entity"])
def test_malformed_xml_is_400_with_cimerror(server, body):
    assert_protocol_error(post(server, body), 400, "well-formed")


def test_malformed_xml_cimerror_is_request_not_well_formed(server):
    _, headers, _ = post(server, b"<CIM><MESSAGE")
    assert headers.get("CIMError") == "request-not-well-formed"


def test_billion_laughs_is_refused_quickly(server):
    ents = '<!ENTITY a0 "lol">' + "".join(
        f'<!ENTITY a{i} "{("&a" + str(i - 1) + ";") * 10}">' for i in range(1, 10))
    body = f'<?xml version="1.0"?><!DOCTYPE CIM [{ents}]><CIM><MESSAGE ID="1">&a9;</MESSAGE></CIM>'
    code, headers, text = post(server, body.encode())
    assert code == 400 and headers.get("CIMError"), (code, text)


def test_non_utf8_body_is_400(server):
    body = message(f"<SIMPLEREQ>{ENUM_SERVICE}</SIMPLEREQ>").replace(b"Msvm_ReplicationService", b"Msvm_\xff\xfe")
    assert_protocol_error(post(server, body), 400, "UTF-8")


@pytest.mark.parametrize("value", [None, "MethodResponse", "ExportMethodCall", ""],
                         ids=["missing", "response", "export", "empty"])
def test_missing_or_wrong_cimoperation_header_is_400(server, value):
    headers = {k: v for k, v in CIM_HEADERS.items() if k != "CIMOperation"}
    if value is not None:
        headers["CIMOperation"] = value
    code, resp_headers, body = post(server, message(f"<SIMPLEREQ>{ENUM_SERVICE}</SIMPLEREQ>"), headers)
    assert code == 400, (code, body)
    assert resp_headers.get("CIMError") == "header-mismatch"
    assert "CIMOperation" in body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_4_mib_is_413(server, chunked):
    filler = b" " * (4 * MIB + 1 - len(b"<CIM>"))
    body = (b"<CIM>", filler) if chunked else b"<CIM>" + filler
    code, _, text = post(server, iter(body) if chunked else body, chunked=chunked)
    assert code == 413, (code, text[:200])
    assert "limit" in text


def test_body_of_exactly_4_mib_is_read(server):
    """The limit is on size, not a cut-off one byte early: 4 MiB of whitespace after a request is parsed."""
    req = message(f"<SIMPLEREQ>{ENUM_SERVICE}</SIMPLEREQ>")
    code, _, text = post(server, req + b" " * (4 * MIB - len(req)))
    assert code == 200, (code, text[:200])
    assert "Msvm_ReplicationService" in text


def add_entry_call(host):
    entry = pywbem.CIMInstance("Msvm_ReplicationAuthorizationSettingData", properties={
        "AllowedPrimaryHostSystem": host, "TrustGroup": "g", "ReplicaStorageLocation": "/nonexistent"})
    return ('<METHODCALL NAME="AddAuthorizationEntry"><LOCALINSTANCEPATH>' + NS_XML
            + '<INSTANCENAME CLASSNAME="Msvm_ReplicationService"><KEYBINDING NAME="Name">'
            '<KEYVALUE VALUETYPE="string">replicasvc</KEYVALUE></KEYBINDING></INSTANCENAME></LOCALINSTANCEPATH>'
            f'<PARAMVALUE NAME="AuthorizationEntry" PARAMTYPE="string"><VALUE>{escape(entry.tocimxmlstr())}'
            '</VALUE></PARAMVALUE></METHODCALL>')


def multireq():
    return message(f"<MULTIREQ><SIMPLEREQ>{add_entry_call('multi1.example.org')}</SIMPLEREQ>"
                   f"<SIMPLEREQ>{add_entry_call('multi2.example.org')}</SIMPLEREQ></MULTIREQ>")


def entries(conn):
    return {e["AllowedPrimaryHostSystem"]
            for e in conn.EnumerateInstances("Msvm_ReplicationAuthorizationSettingData")}


def test_multireq_is_refused_and_nothing_runs(server, conn):
    code, headers, body = post(server, multireq())
    # DSP0200 §7.3: a server without multiple-operation support answers 501.
    assert code == 501, (code, body)
    assert headers.get("CIMError"), dict(headers)
    assert "MULTIREQ" in body
    assert not {"multi1.example.org", "multi2.example.org"} & entries(conn)


def test_multireq_is_501_multiple_requests_unsupported(server):
    code, headers, _ = post(server, multireq())
    assert (code, headers.get("CIMError")) == (501, "multiple-requests-unsupported")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_cimom_needs_an_xml_content_type(server, conn, content_type):
    """A browser can send these types cross-origin without a preflight; the daemon refuses them."""
    headers = {k: v for k, v in CIM_HEADERS.items() if k != "Content-Type"}
    if content_type:
        headers["Content-Type"] = content_type
    body = message(f"<SIMPLEREQ>{add_entry_call('browser.example.org')}</SIMPLEREQ>")
    code, _, text = post(server, body, headers={**headers, "CIMMethod": "AddAuthorizationEntry"})
    assert code == 415 and "Content-Type" in text
    assert "browser.example.org" not in entries(conn)


def test_json_api_needs_application_json_and_a_loopback_host(server):
    body = b'{"command":"add_authorization_entry","allowed_primary_host_system":"csrf.example.org",' \
           b'"trust_group":"DEFAULT","replica_storage_location":"/srv/r"}'
    for headers, expected in [({"Content-Type": "text/plain"}, 415),
                              ({"Content-Type": "application/json", "Host": "evil.example.com"}, 403),
                              ({"Content-Type": "application/json"}, 200)]:
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        c.request("POST", "/api/v1/command", body=body, headers=headers)
        resp = c.getresponse()
        resp.read()
        assert resp.status == expected, (headers, resp.status)


def test_cimom_with_a_foreign_host_header_is_refused(server, conn):
    """DNS rebinding: a page whose name resolves to 127.0.0.1 still sends its own name as Host."""
    body = message(f"<SIMPLEREQ>{add_entry_call('rebind.example.org')}</SIMPLEREQ>")
    code, _, _ = post(server, body, headers={**CIM_HEADERS, "CIMMethod": "AddAuthorizationEntry",
                                             "Host": "attacker.example.com:5988"})
    assert code == 403
    assert "rebind.example.org" not in entries(conn)


def test_json_replication_command_cannot_bypass_settings_validation(server):
    body = json.dumps({"command": "replication", "vm": "web01",
                       "operation": "CreateReplicationRelationship"}).encode()
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    c.request("POST", "/api/v1/command", body=body, headers={"Content-Type": "application/json"})
    resp = c.getresponse()
    answer = json.loads(resp.read())
    assert resp.status == 422 and answer["code"] == 32773 and "create_replication_relationship" in answer["message"]


@pytest.mark.parametrize("old,new,header", [
    ('CIMVERSION="2.0"', 'CIMVERSION="3.0"', "unsupported-cim-version"),
    ('DTDVERSION="2.0"', 'DTDVERSION="1.0"', "unsupported-dtd-version"),
    ('PROTOCOLVERSION="1.0"', 'PROTOCOLVERSION="2.0"', "unsupported-protocol-version"),
])
def test_unsupported_versions_are_501_with_the_dsp0200_cimerror(server, conn, old, new, header):
    body = message(f"<SIMPLEREQ>{add_entry_call('version.example.org')}</SIMPLEREQ>").decode()
    code, headers, _ = post(server, body.replace(old, new).encode())
    assert (code, headers.get("CIMError")) == (501, header)
    assert "version.example.org" not in entries(conn)


def test_raw_add_authorization_entry_is_accepted(server, conn):
    """Control for the MULTIREQ case: the same call as a SIMPLEREQ does run."""
    code, _, body = post(server, message(f"<SIMPLEREQ>{add_entry_call('single.example.org')}</SIMPLEREQ>"),
                         headers={**CIM_HEADERS, "CIMMethod": "AddAuthorizationEntry",
                                  "CIMObject": "root%2Fvirtualization%2Fv2%3AMsvm_ReplicationService"})
    assert code == 200, body
    rv = ET.fromstring(body).find(".//RETURNVALUE/VALUE").text
    assert rv in ("0", "4096"), body
    if rv == "4096":
        job = ET.fromstring(body).find(".//PARAMVALUE[@NAME='Job']//KEYVALUE").text
        wait_job(conn, pywbem.CIMInstanceName("Msvm_ConcreteJob", {"InstanceID": job}, namespace=NAMESPACE))
    assert "single.example.org" in entries(conn)
    rv, _ = conn.InvokeMethod("RemoveAuthorizationEntry", service_path(conn),
                              AllowedPrimaryHostSystem="single.example.org")
    assert rv in (0, JOB_STARTED)


# ---- CIM errors (pywbem) ----

def assert_cim_error(status, fn, *mentions):
    with pytest.raises(pywbem.CIMError) as err:
        fn()
    assert err.value.status_code == status, (err.value.status_code_name, err.value.status_description)
    text = err.value.status_description or ""
    for m in mentions:
        assert m.lower() in text.lower(), text


def test_unknown_namespace(conn):
    assert_cim_error(pywbem.CIM_ERR_INVALID_NAMESPACE,
                     lambda: conn.EnumerateInstances("Msvm_ReplicationService", namespace="root/cimv2"),
                     "root/cimv2")
    path = service_path(conn).copy()
    path.namespace = "root/cimv2"
    assert_cim_error(pywbem.CIM_ERR_INVALID_NAMESPACE,
                     lambda: conn.InvokeMethod("GetSystemCertificates", path), "root/cimv2")


def test_unknown_class(conn):
    assert_cim_error(pywbem.CIM_ERR_INVALID_CLASS, lambda: conn.EnumerateInstances("Msvm_NoSuchClass"),
                     "Msvm_NoSuchClass")
    assert_cim_error(pywbem.CIM_ERR_INVALID_CLASS,
                     lambda: conn.GetInstance(pywbem.CIMInstanceName("Msvm_NoSuchClass", {"Name": "x"})),
                     "Msvm_NoSuchClass")
    # DSP0200: GetClass of a class the namespace lacks is CIM_ERR_NOT_FOUND (not INVALID_CLASS).
    assert_cim_error(pywbem.CIM_ERR_NOT_FOUND, lambda: conn.GetClass("Msvm_NoSuchClass"), "Msvm_NoSuchClass")


def test_get_instance_of_missing_vm_is_not_found(conn):
    path = pywbem.CIMInstanceName("Msvm_ComputerSystem",
                                  {"CreationClassName": "Msvm_ComputerSystem", "Name": MISSING_GUID})
    assert_cim_error(pywbem.CIM_ERR_NOT_FOUND, lambda: conn.GetInstance(path), MISSING_GUID)


def test_unknown_method(server, conn):
    assert_cim_error(pywbem.CIM_ERR_METHOD_NOT_FOUND,
                     lambda: conn.InvokeMethod("NoSuchMethod", service_path(conn)), "NoSuchMethod")
    assert_cim_error(pywbem.CIM_ERR_METHOD_NOT_FOUND,
                     lambda: conn.InvokeMethod("NoSuchMethod", vm_path(server)), "NoSuchMethod")


def test_unknown_parameter_name(server, conn):
    assert_cim_error(pywbem.CIM_ERR_INVALID_PARAMETER,
                     lambda: conn.InvokeMethod("GetSystemCertificates", service_path(conn), Bogus="x"), "Bogus")
    assert_cim_error(pywbem.CIM_ERR_INVALID_PARAMETER,
                     lambda: conn.InvokeMethod("RequestReplicationStateChange", vm_path(server),
                                               RequestedState=Uint16(7), Nonsense=Uint16(1)), "Nonsense")


def raw_state_change(server, value, paramtype):
    attr = f' PARAMTYPE="{paramtype}"' if paramtype else ""
    call = ('<METHODCALL NAME="RequestReplicationStateChange"><LOCALINSTANCEPATH>' + NS_XML
            + '<INSTANCENAME CLASSNAME="Msvm_ComputerSystem">'
            '<KEYBINDING NAME="CreationClassName"><KEYVALUE VALUETYPE="string">Msvm_ComputerSystem</KEYVALUE>'
            f'</KEYBINDING><KEYBINDING NAME="Name"><KEYVALUE VALUETYPE="string">{server.disks["web01"]}'
            '</KEYVALUE></KEYBINDING></INSTANCENAME></LOCALINSTANCEPATH>'
            f'<PARAMVALUE NAME="RequestedState"{attr}><VALUE>{value}</VALUE></PARAMVALUE></METHODCALL>')
    code, _, body = post(server, message(f"<SIMPLEREQ>{call}</SIMPLEREQ>", "99"),
                         headers={**CIM_HEADERS, "CIMMethod": "RequestReplicationStateChange"})
    assert code == 200, body
    root = ET.fromstring(body)
    assert root.find("MESSAGE").get("ID") == "99"
    return root.find(".//METHODRESPONSE")


@pytest.mark.parametrize("paramtype", ["uint16", None], ids=["pywbem-style", "wbemcli-style"])
@pytest.mark.parametrize("value", ["abc", "70000", "-1", "7.5", ""])
def test_uint16_parameter_with_a_non_uint16_value(server, conn, value, paramtype):
    resp = raw_state_change(server, value, paramtype)
    error = resp.find("ERROR")
    assert error is not None, ET.tostring(resp)
    assert int(error.get("CODE")) == pywbem.CIM_ERR_INVALID_PARAMETER
    assert "RequestedState" in error.get("DESCRIPTION")
    assert conn.GetInstance(vm_path(server))["ReplicationState"] == 0


def test_raw_uint16_control_reaches_the_method(server):
    """Same request with a well-typed value: a method-level refusal (no relationship), not a CIM error."""
    resp = raw_state_change(server, "7", "uint16")
    assert resp.find("ERROR") is None, ET.tostring(resp)
    assert resp.find("RETURNVALUE/VALUE").text == str(INVALID_STATE)


@pytest.mark.parametrize("text", ["this is not an instance", "<INSTANCE CLASSNAME=", "instance of {",
                                  "<VALUE>1</VALUE>", ""],
                         ids=["prose", "truncated-xml", "broken-mof", "not-an-instance", "empty"])
def test_embedded_instance_that_does_not_parse(conn, text):
    before = entries(conn)
    assert_cim_error(pywbem.CIM_ERR_INVALID_PARAMETER,
                     lambda: conn.InvokeMethod("AddAuthorizationEntry", service_path(conn), AuthorizationEntry=text),
                     "AuthorizationEntry")
    assert entries(conn) == before


def test_embedded_instance_of_the_wrong_class(server, conn):
    wrong = pywbem.CIMInstance("Msvm_ReplicationAuthorizationSettingData",
                               properties={"AllowedPrimaryHostSystem": "*"})
    assert_cim_error(pywbem.CIM_ERR_INVALID_PARAMETER,
                     lambda: conn.InvokeMethod("CreateReplicationRelationship", service_path(conn),
                                               ComputerSystem=vm_path(server),
                                               ReplicationSettingData=wrong.tocimxmlstr()),
                     "Msvm_ReplicationSettingData", "Msvm_ReplicationAuthorizationSettingData")
    rsd = conn.Associators(vm_path(server), ResultClass="Msvm_ReplicationSettingData")[0]
    assert_cim_error(pywbem.CIM_ERR_INVALID_PARAMETER,
                     lambda: conn.InvokeMethod("AddAuthorizationEntry", service_path(conn),
                                               AuthorizationEntry=rsd.tocimxmlstr()),
                     "Msvm_ReplicationAuthorizationSettingData")
    assert conn.GetInstance(vm_path(server))["ReplicationState"] == 0


def test_raw_instance_parameter_of_the_wrong_class(server, conn):
    """An embedded instance sent as an <INSTANCE> element (not an escaped string) is checked for its
    class too: an Msvm_ComputerSystem is no authorization entry."""
    wrong = pywbem.CIMInstance("Msvm_ComputerSystem", properties={"AllowedPrimaryHostSystem": "raw.example.org"})
    call = ('<METHODCALL NAME="AddAuthorizationEntry"><LOCALINSTANCEPATH>' + NS_XML
            + '<INSTANCENAME CLASSNAME="Msvm_ReplicationService"><KEYBINDING NAME="Name">'
            '<KEYVALUE VALUETYPE="string">replicasvc</KEYVALUE></KEYBINDING></INSTANCENAME></LOCALINSTANCEPATH>'
            f'<PARAMVALUE NAME="AuthorizationEntry" PARAMTYPE="string">{wrong.tocimxmlstr()}'
            '</PARAMVALUE></METHODCALL>')
    code, _, body = post(server, message(f"<SIMPLEREQ>{call}</SIMPLEREQ>"),
                         headers={**CIM_HEADERS, "CIMMethod": "AddAuthorizationEntry",
                                  "CIMObject": "root%2Fvirtualization%2Fv2%3AMsvm_ReplicationService"})
    assert code == 200, body
    error = ET.fromstring(body).find(".//ERROR")
    assert error is not None and error.get("CODE") == str(pywbem.CIM_ERR_INVALID_PARAMETER), body
    assert "Msvm_ReplicationAuthorizationSettingData" in error.get("DESCRIPTION"), body
    assert "raw.example.org" not in entries(conn)


def test_a_snapshot_reference_that_names_no_recovery_point_is_refused(server, conn):
    """SnapshotSettingData null means the latest point; a reference to anything but a recovery
    point (here the VM itself) is an invalid parameter, not the latest point."""
    for method in ("InitiateFailover", "TestReplicaSystem"):
        assert_refused(conn, server, INVALID_PARAMETER, method, ComputerSystem=vm_path(server),
                       SnapshotSettingData=vm_path(server))


def test_a_method_of_a_service_that_is_not_here_is_not_found(server, conn):
    """A service's method called on a path naming another service (another Name, or another host's
    SystemName) is CIM_ERR_NOT_FOUND, and nothing runs."""
    entry = pywbem.CIMInstance("Msvm_ReplicationAuthorizationSettingData", properties={
        "AllowedPrimaryHostSystem": "elsewhere.example.org", "TrustGroup": "g", "ReplicaStorageLocation": "/nonexistent"})
    for key, value in (("Name", "bogus"), ("SystemName", "another-host")):
        path = service_path(conn).copy()
        path.keybindings[key] = value
        assert_cim_error(pywbem.CIM_ERR_NOT_FOUND,
                         lambda: conn.InvokeMethod("AddAuthorizationEntry", path, AuthorizationEntry=entry.tocimxmlstr()),
                         value)
    assert "elsewhere.example.org" not in entries(conn)
    (vsms,) = conn.EnumerateInstanceNames("Msvm_VirtualSystemManagementService")
    other = vsms.copy()
    other.keybindings["SystemName"] = "another-host"
    assert_cim_error(pywbem.CIM_ERR_NOT_FOUND,
                     lambda: conn.InvokeMethod("DestroySystem", other, AffectedSystem=vm_path(server, "ctl01")),
                     "another-host")
    assert conn.GetInstance(vm_path(server, "ctl01"))["ElementName"] == "ctl01"


def test_a_vm_path_with_its_guid_in_lower_case_names_the_same_vm(server, conn):
    """WMI compares string keys without regard to case: a VM's path with its GUID in lower case
    (as a tool that lower-cases GUIDs builds it) is the same instance."""
    lower = vm_path(server).copy()
    lower.keybindings["Name"] = server.disks["web01"].lower()
    assert conn.GetInstance(lower)["ElementName"] == "web01"
    rels = conn.Associators(lower, ResultClass="Msvm_ReplicationSettingData")
    assert len(rels) == 1


def test_computer_system_ref_to_missing_guid_is_not_found(server, conn):
    missing = pywbem.CIMInstanceName("Msvm_ComputerSystem",
                                     {"CreationClassName": "Msvm_ComputerSystem", "Name": MISSING_GUID},
                                     namespace=NAMESPACE)
    assert_cim_error(pywbem.CIM_ERR_NOT_FOUND,
                     lambda: conn.InvokeMethod("StartReplication", service_path(conn), ComputerSystem=missing,
                                               InitialReplicationType=Uint16(1)), MISSING_GUID)
    assert_cim_error(pywbem.CIM_ERR_NOT_FOUND,
                     lambda: conn.InvokeMethod("RequestReplicationStateChange", missing, RequestedState=Uint16(7)),
                     MISSING_GUID)
    assert_cim_error(pywbem.CIM_ERR_NOT_FOUND, lambda: conn.Associators(missing))


def test_computer_system_ref_to_another_class(conn):
    assert_cim_error(pywbem.CIM_ERR_INVALID_PARAMETER,
                     lambda: conn.InvokeMethod("StartReplication", service_path(conn),
                                               ComputerSystem=service_path(conn), InitialReplicationType=Uint16(1)),
                     "Msvm_ReplicationService")


@pytest.mark.parametrize("query", ["SELECT * FROM X WHERE a < 3", "SELECT * FROM Msvm_ComputerSystem WHERE",
                                   "SELECT * FROM Msvm_ComputerSystem WHERE ElementName = 'web01",
                                   "DELETE FROM Msvm_ComputerSystem", ""])
def test_bad_wql_is_invalid_query(conn, query):
    assert_cim_error(pywbem.CIM_ERR_INVALID_QUERY, lambda: conn.ExecQuery("WQL", query))


def test_query_language_cql_is_not_supported(conn):
    assert_cim_error(pywbem.CIM_ERR_QUERY_LANGUAGE_NOT_SUPPORTED,
                     lambda: conn.ExecQuery("CQL", "SELECT * FROM Msvm_ComputerSystem"), "CQL")


def test_create_and_delete_instance_are_not_supported(server, conn):
    assert_cim_error(pywbem.CIM_ERR_NOT_SUPPORTED,
                     lambda: conn.CreateInstance(pywbem.CIMInstance(
                         "Msvm_ComputerSystem", properties={"CreationClassName": "Msvm_ComputerSystem",
                                                            "Name": MISSING_GUID, "ElementName": "evil"})),
                     "CreateInstance")
    assert_cim_error(pywbem.CIM_ERR_NOT_SUPPORTED, lambda: conn.DeleteInstance(vm_path(server)), "DeleteInstance")
    assert conn.GetInstance(vm_path(server))["ElementName"] == "web01"
    assert not conn.ExecQuery("WQL", "SELECT * FROM Msvm_ComputerSystem WHERE ElementName = 'evil'")


# ---- method return codes: refused, and nothing changed ----

def settings(conn, server, name="web01", **changes):
    """The VM's RSD with a valid base, then `changes` (None sets a property to NULL)."""
    rsd = conn.Associators(vm_path(server, name), ResultClass="Msvm_ReplicationSettingData")[0]
    values = dict(RecoveryConnectionPoint="replica.example.org", CertificateThumbPrint=thumbprint(),
                  AuthenticationType=Uint16(2), RecoveryServerPortNumber=Uint16(443))
    values.update(changes)
    for prop, value in values.items():
        if value is None:
            rsd.properties[prop].value = None
        else:
            rsd[prop] = value
    return rsd.tocimxmlstr()


def observed(conn, server, name="web01"):
    vm = conn.GetInstance(vm_path(server, name))
    rsd = conn.Associators(vm_path(server, name), ResultClass="Msvm_ReplicationSettingData")[0]
    rels = conn.Associators(vm_path(server, name), ResultClass="Msvm_ReplicationRelationship")
    return (vm["ReplicationState"], vm["ReplicationMode"], dict(rsd.items()),
            sorted(str(r.path) for r in rels))


def assert_refused(conn, server, expected, method, target=None, name="web01", **params):
    before = observed(conn, server, name)
    assert before[0] in (0, 1), before
    rv, out = conn.InvokeMethod(method, target if target is not None else service_path(conn), **params)
    assert rv == expected, f"{method} returned {rv}, expected {expected}"
    assert out.get("Job") is None, f"a refused call started a job: {out}"
    assert observed(conn, server, name) == before


CREATE_REFUSALS = [
    ({"ReplicationInterval": Uint16(60)}, INVALID_PARAMETER),
    ({"ReplicationInterval": Uint16(0)}, INVALID_PARAMETER),
    ({"RecoveryHistory": Uint16(25)}, INVALID_PARAMETER),
    ({"ApplicationConsistentSnapshotInterval": Uint16(1), "RecoveryHistory": Uint16(0)}, INVALID_PARAMETER),
    ({"AuthenticationType": Uint16(1)}, NOT_SUPPORTED),
    ({"AuthenticationType": Uint16(2), "CertificateThumbPrint": None}, INVALID_PARAMETER),
    ({"RecoveryServerPortNumber": Uint16(0)}, INVALID_PARAMETER),
    ({"RecoveryConnectionPoint": "not a host!"}, INVALID_PARAMETER),
    ({"RecoveryConnectionPoint": ""}, INVALID_PARAMETER),
    ({"ReplicationInterval": "abc"}, INCORRECT_DATA_TYPE),
    ({"RecoveryHistory": Uint32(70000)}, INCORRECT_DATA_TYPE),
]


@pytest.mark.parametrize("changes,expected", CREATE_REFUSALS,
                         ids=["interval-60", "interval-0", "history-25", "appconsistent-without-history",
                              "kerberos", "cert-without-thumbprint", "port-0", "bad-host", "empty-host",
                              "interval-abc", "history-70000"])
def test_create_relationship_refusals(server, conn, changes, expected):
    assert_refused(conn, server, expected, "CreateReplicationRelationship",
                   ComputerSystem=vm_path(server), ReplicationSettingData=settings(conn, server, **changes))


def test_create_relationship_with_settings_of_another_vm(server, conn):
    other = settings(conn, server, name="ctl01")
    assert_refused(conn, server, INVALID_PARAMETER, "CreateReplicationRelationship",
                   ComputerSystem=vm_path(server), ReplicationSettingData=other)


def test_start_replication_without_relationship_is_invalid_state(server, conn):
    assert_refused(conn, server, INVALID_STATE, "StartReplication",
                   ComputerSystem=vm_path(server), InitialReplicationType=Uint16(1))


def test_start_replication_with_unknown_type(server, conn):
    assert_refused(conn, server, INVALID_PARAMETER, "StartReplication",
                   ComputerSystem=vm_path(server), InitialReplicationType=Uint16(9))


def test_request_replication_state_change_to_unknown_state(server, conn):
    assert_refused(conn, server, INVALID_PARAMETER, "RequestReplicationStateChange",
                   target=vm_path(server), RequestedState=Uint16(42))


def test_request_replication_state_change_without_relationship(server, conn):
    assert_refused(conn, server, INVALID_STATE, "RequestReplicationStateChange",
                   target=vm_path(server), RequestedState=Uint16(7))


def test_valid_settings_are_accepted(server, conn):
    """Control: the base settings used above are good, so each refusal above is caused by its one change."""
    vm = vm_path(server, "ctl01")
    rv, out = conn.InvokeMethod("CreateReplicationRelationship", service_path(conn),
                                ComputerSystem=vm, ReplicationSettingData=settings(conn, server, name="ctl01"))
    assert rv == JOB_STARTED
    job = wait_job(conn, out["Job"])
    assert job["JobState"] == 7, (job["ErrorCode"], job["ErrorDescription"])
    assert job["JobType"] == 91
    assert conn.GetInstance(vm)["ReplicationState"] == 1
    rsd = conn.Associators(vm, ResultClass="Msvm_ReplicationSettingData")[0]
    assert rsd["RecoveryConnectionPoint"] == "replica.example.org"
    assert rsd["CertificateThumbPrint"].lower() == thumbprint().lower()
    assert rsd["RecoveryServerPortNumber"] == 443

    # Now Ready (1): a bad InitialReplicationType is still refused as a bad value and leaves the VM at 1.
    assert_refused(conn, server, INVALID_PARAMETER, "StartReplication", name="ctl01",
                   ComputerSystem=vm, InitialReplicationType=Uint16(9))
    assert conn.GetInstance(vm)["ReplicationState"] == 1
