#!/usr/bin/env bash
# Run a command inside the arm64 userland ($GUESTMEM_ARM64 or the cached one)
# under qemu-aarch64, with /proc mounted and a clean environment; extra
# variables go before the command as NAME=VALUE words (env syntax).
set -euo pipefail
root=${GUESTMEM_ARM64:?set GUESTMEM_ARM64 to the userland path}
# mmdebstrap leaves no /etc/hosts in a bookworm root: without it "localhost"
# does not resolve there, as it does on any real machine.
[ -s "$root/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    > "$root/etc/hosts"
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
mountpoint -q "$root/dev" || mount --bind /dev "$root/dev"
exec env -i PATH=/opt/gm-venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    PIP_CERT=/etc/guestmem-host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ${CI:+CI=$CI} /usr/sbin/chroot "$root" /usr/bin/env "$@"
