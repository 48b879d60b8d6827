#!/usr/bin/env bash
# Fetch (once per kernel, cached on this machine) one of Debian's arm64
# kernels for the arm64-kernel lane and print the path of its vmlinuz:
#   6.1       Debian 12's linux-image-arm64                (4 KiB pages)
#   6.12      bookworm-backports' linux-image-arm64        (4 KiB pages)
#   6.12-16k  bookworm-backports' linux-image-arm64-16k    (16 KiB pages)
# The packages come from Debian's archive through apt inside the arm64
# userland: the meta package and the versioned linux-image it depends on. Kept:
# the kernel image, its config (checked for what the lane needs built in: KVM,
# MTE, devtmpfs, tmpfs, memfd), and the few modules the reference VMM's nested
# guest loads (virtio_mmio, virtio_blk, virtio_console, and fat, msdos and
# nls_cp437 for busybox's mkdosfs; uncompressed, in modules/; one the kernel
# has built in is left out).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
name=${1:?usage: arm64-kernel.sh 6.1|6.12|6.12-16k}
case $name in
    6.1) meta=linux-image-arm64 suite=bookworm page=4096 ;;
    6.12) meta=linux-image-arm64 suite=bookworm-backports page=4096 ;;
    6.12-16k) meta=linux-image-arm64-16k suite=bookworm-backports page=16384 ;;
    *) echo "arm64-kernel.sh: no kernel named $name (6.1, 6.12, 6.12-16k)" >&2; exit 2 ;;
esac
cache=${GUESTMEM_KERNEL_CACHE:-/var/cache/guestmem/kernels.v5}/$name
mkdir -p "$(dirname "$cache")"
exec 8>"$(dirname "$cache")/.lock"  # one fetch at a time: they share the userland's /tmp/kernel
flock 8

if [ ! -f "$cache/vmlinuz" ]; then
    root=$(bash "$here/arm64-userland.sh")
    echo "fetching Debian's arm64 kernel $name ($meta from $suite) into $cache" >&2
    rm -rf "$root/tmp/kernel"
    mkdir -p "$root/tmp/kernel"
    GUESTMEM_ARM64=$root bash "$here/in-arm64.sh" sh -c '
        set -e
        meta=$1 suite=$2
        # The userland knows bookworm only; backports are named for this fetch alone.
        list=/etc/apt/sources.list.d/guestmem-kernel-backports.list
        echo "deb http://deb.debian.org/debian bookworm-backports main" > "$list"
        trap "rm -f $list" EXIT
        apt-get update -qq
        cd /tmp/kernel
        image=$(apt-cache -t "$suite" depends "$meta" \
            | sed -n "s/.*Depends: \(linux-image-[0-9].*-arm64[-0-9k]*\)$/\1/p" | head -n 1)
        [ -n "$image" ] || { echo "$meta ($suite) names no kernel package" >&2; exit 1; }
        apt-get -qq -t "$suite" -o APT::Sandbox::User=root download "$image"
        dpkg -x "$image"_*.deb tree
        echo "$image" > package
    ' sh "$meta" "$suite" >&2
    rm -rf "$cache.tmp"
    mkdir -p "$cache.tmp"
    cp "$root"/tmp/kernel/tree/boot/vmlinuz-* "$cache.tmp/vmlinuz"
    cp "$root"/tmp/kernel/tree/boot/config-* "$cache.tmp/config"
    cp "$root/tmp/kernel/package" "$cache.tmp/package"
    mkdir -p "$cache.tmp/modules"
    for module in virtio_mmio virtio_blk virtio_console fat msdos nls_cp437; do
        found=$(find "$root/tmp/kernel/tree" -path '*/modules/*' -name "$module.ko*" | head -n 1)
        if [ -z "$found" ]; then
            tree=$root/tmp/kernel/tree
            if grep -qs "/$module.ko$" "$tree"/lib/modules/*/modules.builtin \
                "$tree"/usr/lib/modules/*/modules.builtin; then
                continue
            fi
            echo "kernel $name has no module $module, built in or not" >&2
            exit 1
        fi
        case $found in
            *.xz) xz -dc "$found" ;;
            *.zst) zstd -dcq "$found" ;;
            *) cat "$found" ;;
        esac > "$cache.tmp/modules/$module.ko"
    done
    echo "$page" > "$cache.tmp/page-size"
    rm -rf "$root/tmp/kernel" "$cache"
    mv "$cache.tmp" "$cache"
fi
for option in CONFIG_ARM64_MTE=y CONFIG_KVM=y CONFIG_DEVTMPFS=y CONFIG_MEMFD_CREATE=y; do
    grep -qx "$option" "$cache/config" || { echo "kernel $name lacks $option" >&2; exit 1; }
done
case $(cat "$cache/page-size") in
    4096) grep -qx CONFIG_ARM64_4K_PAGES=y "$cache/config" ;;
    16384) grep -qx CONFIG_ARM64_16K_PAGES=y "$cache/config" ;;
esac || { echo "kernel $name does not have the page size it is named for" >&2; exit 1; }
echo "$cache/vmlinuz"
