#!/usr/bin/env bash
# Fetch (once, cached on this machine) Debian's arm64 kernel for the
# arm64-kernel lane and print the path of its vmlinuz. The packages come from
# Debian's archive through apt inside the arm64 userland: linux-image-arm64 and
# the linux-image-6.1.0-*-arm64 it depends on. Only the kernel image is kept;
# everything the lane needs (KVM, MTE, devtmpfs, tmpfs, memfd) is built in.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${GUESTMEM_KERNEL_CACHE:-/var/cache/guestmem/kernel.v1}

if [ ! -f "$cache/vmlinuz" ]; then
    root=$(bash "$here/arm64-userland.sh")
    echo "fetching Debian's arm64 kernel into $cache" >&2
    rm -rf "$root/tmp/kernel"
    mkdir -p "$root/tmp/kernel"
    GUESTMEM_ARM64=$root bash "$here/in-arm64.sh" sh -c '
        set -e
        apt-get update -qq
        cd /tmp/kernel
        image=$(apt-cache depends linux-image-arm64 | sed -n "s/.*Depends: \(linux-image-[0-9].*-arm64\)$/\1/p" | head -n 1)
        [ -n "$image" ] || { echo "linux-image-arm64 names no kernel package" >&2; exit 1; }
        apt-get -qq -o APT::Sandbox::User=root download linux-image-arm64 "$image"
        dpkg -x "$image"_*.deb tree
        echo "$image" > package
    ' >&2
    rm -rf "$cache.tmp"
    mkdir -p "$cache.tmp"
    cp "$root"/tmp/kernel/tree/boot/vmlinuz-* "$cache.tmp/vmlinuz"
    cp "$root"/tmp/kernel/tree/boot/config-* "$cache.tmp/config"
    cp "$root/tmp/kernel/package" "$cache.tmp/package"
    rm -rf "$root/tmp/kernel" "$cache"
    mv "$cache.tmp" "$cache"
fi
for option in CONFIG_ARM64_MTE=y CONFIG_KVM=y CONFIG_DEVTMPFS=y CONFIG_MEMFD_CREATE=y; do
    grep -qx "$option" "$cache/config" || { echo "the cached kernel lacks $option" >&2; exit 1; }
done
echo "$cache/vmlinuz"
