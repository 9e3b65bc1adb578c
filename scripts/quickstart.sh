#!/usr/bin/env bash
# A one-machine tour of vmreplica on an embedded default: builds the tools, starts two vmreplicad
# hosts with data directories and SQLite databases they create themselves, makes a sample VM disk
# holding a real ext4 filesystem, and walks through what works today: a lab CA and host
# certificates (`vmreplica cert new`), defining the VM, the recovery-server settings and
# authorization table, a connection test over the host-to-host protocol (HTTP/2, TLS 1.3, both
# hosts authenticated by certificate), enabling replication (a job), initial replication over the
# network and a delta cycle proved with qemu-img compare, the Get-VMReplication-style status and
# statistics, suspend/resume, a test failover, a planned failover with reverse replication, an
# unplanned failover back and a failback (InitiateFailback) that sends only what diverged, and the
# CIM-XML endpoint a WBEM client talks to.
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

say "A lab CA and a certificate for each host (vmreplica cert new), copied into each host's store"
run vmreplica cert new --host hv1.lab.example --host hv2.lab.example --out "$DATA/lab-ca"
T1=$(basename "$(ls "$DATA"/lab-ca/hv1.lab.example/certs/*.pem)" .pem)
T2=$(basename "$(ls "$DATA"/lab-ca/hv2.lab.example/certs/*.pem)" .pem)
mkdir -p "$DATA/host1" "$DATA/host2"
cp -r "$DATA/lab-ca/hv1.lab.example/certs" "$DATA/host1/"
cp -r "$DATA/lab-ca/hv2.lab.example/certs" "$DATA/host2/"

PORT2=${VMREPLICA_REPLICA_PORT:-$((PORT + 1))}
RPORT=${VMREPLICA_REPLICATION_PORT:-$((PORT + 2))}
REPLICA_URL=http://127.0.0.1:$PORT2
say "Starting two hosts: hv1 (primary, $VMREPLICA_URL) and hv2 (replica, $REPLICA_URL; replication on $RPORT)"
# No DNS in this lab: hv1 resolves hv2's name to loopback (the certificate must still name it).
# --cycle-interval-override 3: this tour ships a delta every 3 s instead of waiting the 30 s interval.
vmreplicad --data-dir "$DATA/host1" --cim-listen "127.0.0.1:$PORT" --host-name hv1.lab.example \
    --resolve hv2.lab.example=127.0.0.1 --cycle-interval-override 3 --replication-address 127.0.0.1 \
    2>"$DATA/vmreplicad-hv1.log" &
PID=$!
start_hv2() {
    vmreplicad --data-dir "$DATA/host2" --cim-listen "127.0.0.1:$PORT2" --host-name hv2.lab.example \
        --replication-address 127.0.0.1 --resolve hv1.lab.example=127.0.0.1 --cycle-interval-override 3 \
        2>>"$DATA/vmreplicad-hv2.log" &
    PID2=$!
}
start_hv2
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

say "hv2 as a recovery server: certificate authentication on port $RPORT, allow primaries of *.lab.example"
run vmreplica --url "$REPLICA_URL" server set --enable --thumbprint "$T2" --https-port "$RPORT"
run vmreplica --url "$REPLICA_URL" auth add --primary '*.lab.example' --storage "$DATA/host2/replicas"
mkdir -p "$DATA/host2/replicas"
run vmreplica --url "$REPLICA_URL" auth list

say "hv1 tests the connection (TestReplicationConnection: TLS both ways, authorization, a write on hv2)"
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$RPORT") 2>/dev/null && break; sleep 0.1; done
run vmreplica test-connection --replica-server hv2.lab.example --replica-port "$RPORT" --thumbprint "$T1"

say "Enable replication of sample01 every 30 s (CreateReplicationRelationship, a job)"
run vmreplica enable sample01 --replica-server hv2.lab.example --replica-port "$RPORT" --thumbprint "$T1" \
    --frequency 30 --recovery-history 4 --vss-frequency 1
run vmreplica status

say "Bad input gets the documented return code: a 60 s interval is not 30/300/900"
run vmreplica set sample01 --frequency 60 || true

say "Initial replication over the network (StartReplication type 1): hv2 creates the replica VM"
START=$(date +%s.%N)
run vmreplica start sample01
printf 'initial replication took %.2f s\n' "$(echo "$(date +%s.%N) - $START" | bc)"
run vmreplica status
for _ in $(seq 100); do
    vmreplica --url "$REPLICA_URL" status | grep -q Replicating && break; sleep 0.1
done
run vmreplica --url "$REPLICA_URL" status
run vmreplica measure sample01
# The newest recovery point under a host's replica storage.
newest() { { ls "$1"/*/disk0/p*.qcow2 2>/dev/null || true; } | sort | tail -1; }
# `on_newest DIR CMD ARGS...` runs CMD on the newest point under DIR (`{}` in ARGS) and prints it,
# asked again (150 times, 0.2 s apart) while it fails. This tour reads points' files straight from
# the store while replication goes on: the replica prunes the point before each new one by merging
# the new one down into it and renaming the result, so a listed layer may vanish at once or be held
# open for writing for a moment (its data never changes; -U reads without the images' locks). A VM
# or tool that keeps a point uses a (test) failover instead, as below.
on_newest() {
    local dir=$1 p="" out="" rc=1
    shift
    for _ in $(seq 150); do
        p=$(newest "$dir")
        if [ -n "$p" ]; then out=$("${@//\{\}/"$p"}" 2>&1) && { rc=0; break; }; fi
        sleep 0.2
    done
    printf '$ %s\n' "${*//\{\}/"$p"}"
    [ -z "$out" ] || printf '%s\n' "$out"
    return $rc
}
POINT=$(newest "$DATA/host2/replicas")
say "The replica's recovery point equals the primary's disk"
on_newest "$DATA/host2/replicas" du -h --apparent-size "$DISK" {}
on_newest "$DATA/host2/replicas" qemu-img compare -U {} "$DISK"
on_newest "$DATA/host2/replicas" qemu-img check -U -q {}

say "Delta replication: the VM (off here) changes 1 MiB; the next cycle ships only that"
head -c 1M /dev/urandom > "$DATA/new-data.bin"
run qemu-io -f qcow2 -c "write -s $DATA/new-data.bin 100M 1M" "$DISK"
LAST=$(basename "$POINT")
for _ in $(seq 100); do
    NEWEST=$(newest "$DATA/host2/replicas")
    [ "$(basename "$NEWEST")" != "$LAST" ] && qemu-img compare -U -q "$NEWEST" "$DISK" 2>/dev/null && break
    sleep 0.2
done
sed 's/\x1b\[[0-9;]*m//g' "$DATA/vmreplicad-hv1.log" | grep -o 'delta replicated.*' | tail -1
run vmreplica measure sample01
run vmreplica suspend sample01      # nothing in flight from here on, so the newest point is final
on_newest "$DATA/host2/replicas" qemu-img compare -U {} "$DISK"
run vmreplica resume sample01

R="vmreplica --url $REPLICA_URL"
elapsed() { printf '   (%.2f s)\n' "$(echo "$(date +%s.%N) - $1" | bc)"; }
disk_of() { vmreplica --url "$1" --output json vm list |
    python3 -c 'import json,sys; print([v["disks"][0] for v in json.load(sys.stdin)["vms"] if v["name"]=="sample01"][0])'; }

say "Test failover on hv2 (TestReplicaSystem): a test VM on an overlay of the latest point, made in O(1)"
T=$(date +%s.%N); run $R failover sample01 --test; elapsed "$T"
run $R vm list
TESTDISK=$(ls "$DATA"/host2/replicas/*/overlays/*/disk0.qcow2)
run qemu-img compare "$TESTDISK" "$DISK"
echo "Replication goes on underneath; the test VM is removed with DestroySystem (Stop-VMFailover):"
run $R stop-failover sample01

say "Planned failover to hv2 and reverse: no data lost, no resynchronization"
echo "hv1 becomes a recovery server too, so that hv2 can replicate back to it:"
RPORT1=${VMREPLICA_REPLICATION_PORT1:-$((PORT + 3))}
run vmreplica server set --enable --thumbprint "$T1" --https-port "$RPORT1"
# The listener starts in the background: wait for it, as for hv2's above.
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$RPORT1") 2>/dev/null && break; sleep 0.1; done
mkdir -p "$DATA/host1/replicas"
run vmreplica auth add --primary '*.lab.example' --storage "$DATA/host1/replicas"
run qemu-io -f qcow2 -c "write -P 0x5a 120M 512k" "$DISK"      # the last writes before the VM stops
T=$(date +%s.%N); run vmreplica prepare-failover sample01; elapsed "$T"
run $R failover sample01
T=$(date +%s.%N)
run $R reverse sample01 --replica-server hv1.lab.example --replica-port "$RPORT1" --thumbprint "$T2"
elapsed "$T"
run $R status
run vmreplica status
DISK2=$(disk_of "$REPLICA_URL")
echo "hv2 runs the VM now ($DISK2); its writes replicate to hv1:"
run qemu-io -f qcow2 -c "write -P 0x6b 130M 256k" "$DISK2"
on_newest "$DATA/host1/replicas" qemu-img compare -U {} "$DISK2"   # once hv2's next log applied
run $R measure sample01

say "Unplanned failover back to hv1: hv2 is lost holding writes that never replicated"
run $R suspend sample01
run qemu-io -f qcow2 -c "write -P 0x7c 140M 256k" "$DISK2"     # never replicated
kill "$PID2"; wait "$PID2" 2>/dev/null || true
echo "hv2 is down."
T=$(date +%s.%N); run vmreplica failover sample01; elapsed "$T"
run vmreplica complete sample01
DISK1=$(disk_of "$VMREPLICA_URL")
run qemu-io -f qcow2 -c "write -P 0x8d 150M 128k" "$DISK1"     # hv1 runs the VM and writes
echo "hv2 comes back. InitiateFailback on hv2 brings its disk to hv1's, reading and sending only the"
echo "blocks either side wrote since the failover, and makes hv2 hv1's replica:"
start_hv2
for _ in $(seq 50); do curl -sf "$REPLICA_URL/healthz" >/dev/null && break; sleep 0.1; done
T=$(date +%s.%N); run $R failback sample01; elapsed "$T"
run vmreplica measure sample01
on_newest "$DATA/host2/replicas" qemu-img compare -U {} "$DISK1"
run $R status

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
