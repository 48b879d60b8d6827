#!/usr/bin/env bash
# Install the host's Debian packages for every lane (idempotent; root).
#   qemu-user-static, mmdebstrap    -> arm64-user lane (emulated MTE)
#   qemu-system-arm (bookworm-backports: 10.0; 7.2 stores tags wrongly)
#                                   -> arm64-kernel lane
#   qemu-system-x86, qemu-utils (bookworm-backports: 10.0; qemu-storage-daemon)
#                                   -> the host lane's vhost-user guest (x86_64, TCG)
#   gdb-multiarch, lldb             -> the GDB- and LLDB-driven debug tests
#   swig                            -> builds pylibfdt (the VMM's device tree) for the host venv
set -euo pipefail

stamp=/var/cache/guestmem/host-deps.v6
[ -f "$stamp" ] && exit 0
mkdir -p /var/cache/guestmem

backports=/etc/apt/sources.list.d/guestmem-backports.sources
if [ ! -f "$backports" ]; then
    cat >"$backports" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

export DEBIAN_FRONTEND=noninteractive
# Other vendors' lists on the machine may be unreachable; Debian's must not be.
apt-get update -o APT::Update::Error-Mode=any \
    -o Dir::Etc::sourcelist=/dev/null 2>&1 | tail -n 3 || apt-get update || true
apt-get install -y --no-install-recommends mmdebstrap arch-test binfmt-support gdb-multiarch lldb cpio swig openssl
apt-get install -y --no-install-recommends -t bookworm-backports qemu-user-static qemu-system-arm \
    qemu-system-x86 qemu-utils
qemu-system-aarch64 --version | head -n 1
qemu-system-x86_64 --version | head -n 1
qemu-storage-daemon --version | head -n 1
touch "$stamp"
