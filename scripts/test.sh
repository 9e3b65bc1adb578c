#!/usr/bin/env bash
# Runs every test of vmreplica, installing what the tests need first:
#   Debian packages (qemu-utils, sblim-wbemcli, e2fsprogs), a Python venv (.venv) with pywbem,
#   pywbemtools and pytest, and cargo-fuzz. Then: rustfmt, clippy -D warnings, the Rust tests, a short
#   run of every fuzz target, and the pytest suite that drives real daemons with pywbem/wbemcli.
# Environment: FUZZ_SECONDS (per target, default 15; 0 skips fuzzing).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FUZZ_SECONDS=${FUZZ_SECONDS:-15}

step() { printf '\n==> %s\n' "$*"; }

step "Debian packages"
missing=()
command -v qemu-img >/dev/null || missing+=(qemu-utils)
command -v wbemcli >/dev/null || missing+=(sblim-wbemcli)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
command -v nbdinfo >/dev/null || missing+=(libnbd-bin)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if ((${#missing[@]})); then
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "ok: qemu-img $(qemu-img --version | head -1 | awk '{print $3}'), wbemcli, mkfs.ext4, openssl, curl"

step "Python venv (.venv)"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
.venv/bin/python -c 'import pywbem; print("ok: pywbem", pywbem.__version__)'

step "rustfmt"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
cargo build --workspace --locked
cargo test --workspace --locked

if [ "$FUZZ_SECONDS" = 0 ]; then
    echo "fuzzing skipped (FUZZ_SECONDS=0)"
elif ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    # cargo-fuzz needs nightly; the machine image carries one and none can be downloaded here.
    echo "WARNING: no nightly toolchain, fuzz targets not run" >&2
else
    step "fuzz targets (${FUZZ_SECONDS}s each)"
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
    (
        cd fuzz
        cargo +nightly fuzz build -O
        mkdir -p corpus/cimxml_request corpus/embedded_instance
        cp ../crates/cim/tests/fixtures/*.xml corpus/cimxml_request/
        for target in $(cargo +nightly fuzz list); do
            mkdir -p "corpus/$target"
            printf '%-20s ' "$target"
            cargo +nightly fuzz run -O "$target" "corpus/$target" -- \
                -max_total_time="$FUZZ_SECONDS" -print_final_stats=1 2>&1 | grep -E '^(stat::number_of_executed_units|SUMMARY|==[0-9]+==ERROR)' \
                || { echo "fuzz target $target failed" >&2; exit 1; }
        done
    )
fi

step "integration tests (pytest: real daemons driven by pywbem, wbemcli, pywbemcli, the CLI)"
export PATH="$ROOT/.venv/bin:$PATH"
# One directory for the tests' files (disk images: about 13 GB), emptied by pytest at the start of
# each run, so runs do not pile up in /tmp.
.venv/bin/python -m pytest -q --basetemp="${TMPDIR:-/tmp}/vmreplica-tests" tests
