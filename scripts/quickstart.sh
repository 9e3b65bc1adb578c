#!/usr/bin/env bash
# A one-machine tour of vmreplica on an embedded default: builds the tools, starts two vmreplicad
# hosts with data directories and SQLite databases they create themselves, makes a sample VM disk
# holding a real ext4 filesystem, and walks through what works today: defining the VM, the
# recovery-server settings and authorization table, enabling replication (a job), the
# Get-VMReplication-style status and statistics, initial replication on offline media (export on
# the primary, import on the replica, proved with qemu-img compare), and the CIM-XML endpoint a
# WBEM client talks to.
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

say "Starting two hosts: hv1 (primary, $VMREPLICA_URL) and hv2 (replica, port $((PORT + 1)))"
REPLICA_URL=http://127.0.0.1:$((PORT + 1))
vmreplicad --data-dir "$DATA/host1" --cim-listen "127.0.0.1:$PORT" --host-name hv1.example.org \
    2>"$DATA/vmreplicad-hv1.log" &
PID=$!
vmreplicad --data-dir "$DATA/host2" --cim-listen "127.0.0.1:$((PORT + 1))" --host-name hv2.example.org \
    2>"$DATA/vmreplicad-hv2.log" &
PID2=$!
if [ "$KEEP" != "--keep" ]; then
    trap 'kill $PID $PID2 2>/dev/null; wait $PID $PID2 2>/dev/null' EXIT
fi
for url in "$VMREPLICA_URL" "$REPLICA_URL"; do
    for _ in $(seq 50); do curl -sf "$url/healthz" >/dev/null && break; sleep 0.1; done
done

say "Define the VM on hv1 (vm add prints its GUID, Msvm_ComputerSystem.Name)"
printf '$ vmreplica vm add --name sample01 --disk %s\n' "$DISK"
VMID=$(vmreplica vm add --name sample01 --disk "$DISK")
echo "$VMID"
run vmreplica vm list

say "hv2 as a recovery server: enable it, allow primaries of *.example.org"
THUMB=$(printf '%s' sample | sha1sum | cut -c1-40)
run vmreplica --url "$REPLICA_URL" server set --enable --thumbprint "$THUMB"
run vmreplica --url "$REPLICA_URL" auth add --primary '*.example.org' --storage "$DATA/host2/replicas"
run vmreplica --url "$REPLICA_URL" auth list

say "Enable replication of sample01 every 30 s (CreateReplicationRelationship, a job)"
run vmreplica enable sample01 --replica-server hv2.example.org --thumbprint "$THUMB" --frequency 30 \
    --recovery-history 4 --vss-frequency 1
run vmreplica status
run vmreplica measure sample01

say "Bad input gets the documented return code: a 60 s interval is not 30/300/900"
run vmreplica set sample01 --frequency 60 || true

say "Initial replication on offline media: export on hv1 (StartReplication type 2)"
run vmreplica start sample01 --type export --path "$DATA/usb-drive"
ls -l "$DATA/usb-drive/sample01_$VMID"
run vmreplica status

say "Import on hv2: the same VM (same GUID) made a replica, then ImportInitialReplica"
qemu-img create -q -f qcow2 "$DATA/disks/placeholder.qcow2" 1M
run vmreplica --url "$REPLICA_URL" vm add --name sample01 --id "$VMID" --disk "$DATA/disks/placeholder.qcow2"
run vmreplica --url "$REPLICA_URL" enable-as-replica sample01
run vmreplica --url "$REPLICA_URL" auth bind sample01 --primary '*.example.org'
run vmreplica --url "$REPLICA_URL" import sample01 --path "$DATA/usb-drive"
run vmreplica --url "$REPLICA_URL" status
POINT=$(ls "$DATA"/host2/replicas/*/disk0/p*.qcow2)
say "The replica's recovery point equals the primary's disk"
run qemu-img compare "$POINT" "$DISK"
run qemu-img check -q "$POINT"
echo "(network replication between the hosts comes with the host-to-host protocol: docs/protocol.md)"

say "The same objects over CIM-XML (what pywbem and wbemcli send): EnumerateInstances of the service"
curl -s "$VMREPLICA_URL/cimom" -H 'CIMOperation: MethodCall' -H 'CIMMethod: EnumerateInstances' \
    -H 'CIMObject: root/virtualization/v2' -H 'Content-Type: application/xml' --data-binary @- <<'XML' |
<?xml version="1.0" encoding="utf-8"?><CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="1" PROTOCOLVERSION="1.0"><SIMPLEREQ><IMETHODCALL NAME="EnumerateInstances"><LOCALNAMESPACEPATH><NAMESPACE NAME="root"/><NAMESPACE NAME="virtualization"/><NAMESPACE NAME="v2"/></LOCALNAMESPACEPATH><IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="Msvm_ReplicationService"/></IPARAMVALUE></IMETHODCALL></SIMPLEREQ></MESSAGE></CIM>
XML
    sed -e 's/></>\n</g' | grep -E 'KEYVALUE|NAME="Caption"' -A1 | grep -v '^--' | head -12

say "Jobs"
run vmreplica job list
if [ "$KEEP" = "--keep" ]; then
    echo; echo "hv1 (pid $PID) on $VMREPLICA_URL and hv2 (pid $PID2) on $REPLICA_URL keep running; stop: kill $PID $PID2"
else
    echo; echo "Done. Run again with --keep to leave both daemons running for pywbem or wbemcli."
fi
