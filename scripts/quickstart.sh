#!/usr/bin/env bash
# A one-machine tour of vmreplica on an embedded default: builds the tools, starts vmreplicad with a
# data directory and SQLite database it creates itself, makes a sample VM disk holding a real ext4
# filesystem, and walks through what works today: defining the VM, the recovery-server settings and
# authorization table, enabling replication (a job), the Get-VMReplication-style status, the
# statistics, and the CIM-XML endpoint a WBEM client talks to.
#
#   scripts/quickstart.sh [--keep]     --keep leaves the daemon running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=${1:-}
DATA=$PWD/quickstart-data
PORT=${VMREPLICA_PORT:-5988}
export VMREPLICA_URL=http://127.0.0.1:$PORT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

say "Building vmreplicad and vmreplica"
cargo build --workspace --locked --quiet
BIN=$PWD/target/debug
PATH=$BIN:$PATH

rm -rf "$DATA"
mkdir -p "$DATA/disks"
say "A sample VM disk: 256 MiB qcow2 holding an ext4 filesystem with a file in it"
DISK=$DATA/disks/sample01.qcow2
truncate -s 256M "$DATA/disks/sample01.raw"
mkfs.ext4 -q -F -L sample01 "$DATA/disks/sample01.raw"
echo "hello from sample01" > "$DATA/hello.txt"
debugfs -w -R "write $DATA/hello.txt hello.txt" "$DATA/disks/sample01.raw" >/dev/null 2>&1
run qemu-img convert -O qcow2 "$DATA/disks/sample01.raw" "$DISK"
rm "$DATA/disks/sample01.raw" "$DATA/hello.txt"
qemu-img info "$DISK" | sed -n '1,4p'

say "Starting vmreplicad (data directory $DATA/host1, CIM-XML on $VMREPLICA_URL/cimom)"
vmreplicad --data-dir "$DATA/host1" --cim-listen "127.0.0.1:$PORT" --host-name hv1.example.org \
    2>"$DATA/vmreplicad.log" &
PID=$!
if [ "$KEEP" != "--keep" ]; then trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null' EXIT; fi
for _ in $(seq 50); do curl -sf "$VMREPLICA_URL/healthz" >/dev/null && break; sleep 0.1; done

say "Define the VM (vm add prints its GUID, Msvm_ComputerSystem.Name)"
run vmreplica vm add --name sample01 --disk "$DISK"
run vmreplica vm list

say "This host as a recovery server: enable it, allow primaries of *.example.org"
THUMB=$(printf '%s' sample | sha1sum | cut -c1-40)
run vmreplica server set --enable --thumbprint "$THUMB"
run vmreplica auth add --primary '*.example.org' --storage "$DATA/host1/replicas"
run vmreplica auth list

say "Enable replication of sample01 every 30 s (CreateReplicationRelationship, a job)"
run vmreplica enable sample01 --replica-server replica.example.org --thumbprint "$THUMB" --frequency 30 \
    --recovery-history 4 --vss-frequency 1
run vmreplica status
run vmreplica measure sample01

say "Bad input gets the documented return code: a 60 s interval is not 30/300/900"
run vmreplica set sample01 --replica-server replica.example.org --thumbprint "$THUMB" --frequency 60 || true

say "Initial replication moves data: its engine arrives with the data plane, so today it says so"
run vmreplica start sample01 || true

say "The same objects over CIM-XML (what pywbem and wbemcli send): EnumerateInstances of the service"
curl -s "$VMREPLICA_URL/cimom" -H 'CIMOperation: MethodCall' -H 'CIMMethod: EnumerateInstances' \
    -H 'CIMObject: root/virtualization/v2' -H 'Content-Type: application/xml' --data-binary @- <<'XML' |
<?xml version="1.0" encoding="utf-8"?><CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="1" PROTOCOLVERSION="1.0"><SIMPLEREQ><IMETHODCALL NAME="EnumerateInstances"><LOCALNAMESPACEPATH><NAMESPACE NAME="root"/><NAMESPACE NAME="virtualization"/><NAMESPACE NAME="v2"/></LOCALNAMESPACEPATH><IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="Msvm_ReplicationService"/></IPARAMVALUE></IMETHODCALL></SIMPLEREQ></MESSAGE></CIM>
XML
    sed -e 's/></>\n</g' | grep -E 'KEYVALUE|NAME="Caption"' -A1 | grep -v '^--' | head -12

say "Jobs"
run vmreplica job list
if [ "$KEEP" = "--keep" ]; then
    echo; echo "vmreplicad keeps running (pid $PID) on $VMREPLICA_URL; stop it with: kill $PID"
else
    echo; echo "Done. Run again with --keep to leave the daemon running for pywbem or wbemcli."
fi
