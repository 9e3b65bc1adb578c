"""What the benchmarks compare against must be on the machine: `rsync` (and its daemon) beside
QEMU's tools. Missing Debian packages are installed with apt-get when this runs as root (as the
README's test command does); otherwise the benchmark stops and says what to install."""

import os
import shutil
import subprocess
import sys

# command -> Debian package
TOOLS = {"rsync": "rsync", "qemu-img": "qemu-utils", "qemu-io": "qemu-utils", "qemu-nbd": "qemu-utils"}


def ensure(*commands):
    missing = sorted({TOOLS[c] for c in commands if shutil.which(c) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"this benchmark needs {', '.join(missing)}: sudo apt-get install -y {' '.join(missing)}")
    print(f"installing {', '.join(missing)} ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, stdout=subprocess.DEVNULL)
