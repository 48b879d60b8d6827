#!/usr/bin/env bash
# Build (once per recipe, cached on this machine) the initramfs of the nested
# guest that the reference VMM boots in the arm64-kernel lane, and print its
# path: Debian's busybox-static, the MTE, block and migration probes (tests/guest/*.c,
# compiled static by gcc in the arm64 userland) and tests/guest/init. The
# lane appends its kernel's modules (arm64-kernel.sh) as a second archive.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
root=$(bash "$here/arm64-userland.sh")
cache=/var/cache/guestmem
exec 8>"$cache/.guest-initramfs.lock"  # one build at a time
flock 8
key=$( (cat "$top/tests/guest/init" "$top"/tests/guest/*.[ch] "$0"; ls -a "$root" | grep '^\.[a-z]') \
    | sha256sum | cut -c1-16)
out=$cache/guest-initramfs-$key.cpio
if [ ! -f "$out" ]; then
    echo "building the nested guest's initramfs (once per recipe)" >&2
    rm -f "$cache"/guest-initramfs-*.cpio
    build=$root/tmp/guest-build
    rm -rf "$build"
    mkdir -p "$build"
    for probe in mte_probe blk_probe mig_probe; do
        cp "$top/tests/guest/$probe.c" "$top/tests/guest/mte.h" "$build/"
        GUESTMEM_ARM64=$root bash "$here/in-arm64.sh" gcc -static -O2 -Wall -Werror \
            -march=armv8.5-a+memtag -o "/tmp/guest-build/$probe" "/tmp/guest-build/$probe.c" >&2
    done
    stage=$(mktemp -d)
    mkdir -p "$stage/bin" "$stage/proc" "$stage/sys" "$stage/dev" "$stage/tmp"
    cp "$root/bin/busybox" "$stage/bin/busybox"
    ln -s busybox "$stage/bin/sh"
    cp "$build/mte_probe" "$build/blk_probe" "$build/mig_probe" "$stage/bin/"
    install -m 755 "$top/tests/guest/init" "$stage/init"
    (cd "$stage" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) > "$out.tmp"
    mv "$out.tmp" "$out"
    rm -rf "$stage" "$build"
fi
echo "$out"
