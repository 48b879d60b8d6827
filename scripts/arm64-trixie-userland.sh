#!/usr/bin/env bash
# Build (once, cached on this machine) a clean Debian 13 (trixie, Python 3.13)
# arm64 userland WITHOUT a compiler, and print its path. The arm64-trixie lane
# installs the abi3 wheel built in the bookworm userland (Python 3.11) into it:
# a machine with a newer Python and no gcc must get a working guestmem from
# pip alone. Only Debian packages: Python, numpy and cffi (the wheel's own
# dependencies), and what the test suite imports. Idempotent (an interrupted
# build starts over); root. A recipe change must bump the version in the path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=${GUESTMEM_TRIXIE_ROOT:-/var/cache/guestmem/arm64-trixie.v2}
work=$root.tmp

bash "$here/host-deps.sh" >&2
bash "$here/binfmt-aarch64.sh" >&2
exec 8>"$root.lock"  # one builder at a time
flock 8

if [ ! -f "$root/.complete" ]; then
    rm -rf "$work"
    echo "building the arm64 trixie userland in $root (a few minutes, once)" >&2
    # Debian 12's debian-archive-keyring (2023.3+deb12u2) already carries the
    # trixie archive keys; name them so apt never falls back to a wrong one.
    mmdebstrap --arch=arm64 --variant=apt \
        --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        --include=python3,python3-venv,python3-pip,python3-numpy,python3-cffi,python3-pytest,python3-hypothesis,python3-libfdt \
        trixie "$work" http://deb.debian.org/debian >&2
    # The lane's honesty rests on this: nothing here can compile an extension.
    for tool in gcc cc c99 clang; do
        if chroot "$work" sh -c "command -v $tool" >/dev/null 2>&1; then
            echo "arm64-trixie: the userland has a compiler ($tool): the recipe is wrong" >&2
            exit 1
        fi
    done
    if ls "$work"/usr/include/python3*/Python.h >/dev/null 2>&1; then
        echo "arm64-trixie: the userland has the Python headers (python3-dev): the recipe is wrong" >&2
        exit 1
    fi
    touch "$work/.complete"
    mv "$work" "$root"
fi
echo "$root"
