#!/usr/bin/env bash
# Fetch (once, cached on this machine) Debian 12's amd64 kernel and build (once
# per recipe) the initramfs of the host lane's x86_64 guest, which QEMU boots
# under TCG with a vhost-user-blk disk (tests/test_vhost_user_qemu.py); print
# two lines: the kernel's path, then the initramfs's.
# The kernel: the linux-image that linux-image-amd64 depends on, from this
# Debian host's archive (apt-get download). Kept: vmlinux, the ELF inside the
# bzImage (its xz payload unpacked here: QEMU boots it directly through PVH,
# where TCG would spend about 6 s in the kernel's own decompressor), its config
# (checked for what the guest needs built in), and the modules the guest loads
# for its disk (virtio_ring, virtio, virtio_pci_modern_dev,
# virtio_pci_legacy_dev, virtio_pci, virtio_blk; one built in is left out).
# The initramfs: Debian's busybox-static (amd64), the checks
# tests/guest-x86/vublk_*.c compiled static by the host's gcc,
# tests/guest-x86/init and those modules.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
cache=/var/cache/guestmem  # for root; any other user: the user's cache directory
[ "$(id -u)" -eq 0 ] || cache=${XDG_CACHE_HOME:-$HOME/.cache}/guestmem
dir=${GUESTMEM_X86_CACHE:-$cache/x86-guest.v1}
mkdir -p "$dir"
exec 8>"$dir/.lock"  # one fetch or build at a time
flock 8
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)

if [ ! -f "$dir/kernel/vmlinux" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    kernel_package() {
        apt-cache depends linux-image-amd64 \
            | sed -n 's/.*Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n 1
    }
    download() { (cd "$work" && apt-get -qq -o APT::Sandbox::User=root download "$@") >&2; }
    image=$(kernel_package)
    echo "fetching Debian's amd64 kernel (${image:-none named}) and busybox-static into $dir" >&2
    if [ -z "$image" ] || ! download "$image" busybox-static; then
        # Lists older than the archive name a kernel it no longer has: refresh them (root only).
        [ "$(id -u)" -eq 0 ] || { echo "apt-get download failed; apt-get update may help" >&2; exit 1; }
        echo "refreshing apt's lists and trying again" >&2
        apt-get update -qq -o Dir::Etc::sourcelist=/dev/null >&2 || apt-get update -qq >&2 || true
        image=$(kernel_package)
        [ -n "$image" ] || { echo "linux-image-amd64 names no kernel package here" >&2; exit 1; }
        download "$image" busybox-static
    fi
    dpkg -x "$work/$image"_*.deb "$work/tree"
    dpkg -x "$work"/busybox-static_*.deb "$work/busybox"
    rm -rf "$dir/kernel.tmp"
    mkdir -p "$dir/kernel.tmp/modules"
    python3 - "$work"/tree/boot/vmlinuz-* "$dir/kernel.tmp/vmlinux" <<'PY'
import lzma, sys
bzimage = open(sys.argv[1], "rb").read()
start = bzimage.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit(f"{sys.argv[1]}: no xz payload (is CONFIG_KERNEL_XZ still Debian's choice?)")
elf = lzma.LZMADecompressor().decompress(bzimage[start:])
if elf[:4] != b"\x7fELF":
    sys.exit(f"{sys.argv[1]}: its xz payload is not an ELF image")
open(sys.argv[2], "wb").write(elf)
PY
    cp "$work"/tree/boot/config-* "$dir/kernel.tmp/config"
    echo "$image" > "$dir/kernel.tmp/package"
    cp "$work/busybox/bin/busybox" "$dir/kernel.tmp/busybox"
    for module in "${modules[@]}"; do
        found=$(find "$work/tree" -path '*/modules/*' -name "$module.ko*" | head -n 1)
        if [ -z "$found" ]; then
            if grep -qs "/$module.ko$" "$work"/tree/lib/modules/*/modules.builtin; then
                continue
            fi
            echo "kernel $image has no module $module, built in or not" >&2
            exit 1
        fi
        case $found in
            *.xz) xz -dc "$found" ;;
            *.zst) zstd -dcq "$found" ;;
            *) cat "$found" ;;
        esac > "$dir/kernel.tmp/modules/$module.ko"
    done
    rm -rf "$dir/kernel"
    mv "$dir/kernel.tmp" "$dir/kernel"
fi
for option in CONFIG_PVH=y CONFIG_DEVTMPFS=y CONFIG_BLK_DEV_INITRD=y CONFIG_SERIAL_8250_CONSOLE=y \
    CONFIG_PCI=y; do
    grep -qx "$option" "$dir/kernel/config" || { echo "the x86 guest's kernel lacks $option" >&2; exit 1; }
done

key=$( (cat "$top/tests/guest-x86/init" "$top"/tests/guest-x86/*.[ch] "$0" "$dir/kernel/package") \
    | sha256sum | cut -c1-16)
out=$dir/initramfs-$key.cpio
if [ ! -f "$out" ]; then
    echo "building the x86 guest's initramfs (once per recipe)" >&2
    rm -f "$dir"/initramfs-*.cpio
    stage=$(mktemp -d)
    mkdir -p "$stage/bin" "$stage/proc" "$stage/sys" "$stage/dev" "$stage/lib/modules"
    cp "$dir/kernel/busybox" "$stage/bin/busybox"
    ln -s busybox "$stage/bin/sh"
    for check in vublk_check vublk_migrate; do
        gcc -static -O2 -Wall -Wextra -Werror -pthread -o "$stage/bin/$check" \
            "$top/tests/guest-x86/$check.c" >&2
    done
    for module in "$dir"/kernel/modules/*.ko; do
        [ ! -e "$module" ] || cp "$module" "$stage/lib/modules/"
    done
    install -m 755 "$top/tests/guest-x86/init" "$stage/init"
    (cd "$stage" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) > "$out.tmp"
    mv "$out.tmp" "$out"
    rm -rf "$stage"
fi
echo "$dir/kernel/vmlinux"
echo "$out"
