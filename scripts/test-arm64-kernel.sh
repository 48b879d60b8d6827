#!/usr/bin/env bash
# The arm64-kernel lane: one of Debian's arm64 Linux kernels (GUESTMEM_KERNEL:
# 6.1, 6.12 or 6.12-16k; see arm64-kernel.sh) under qemu-system-aarch64 (QEMU
# 10 from bookworm-backports) with mte=on and virtualization=on, so the tests
# meet a real kernel's MTE: uaccess tag checks in system calls, tags on shared
# memfd mappings, signal handlers starting with TCO=0, nested KVM with
# KVM_CAP_ARM_MTE, and host pages of 4 or 16 KiB. The root is an initramfs: a
# cached, trimmed copy of the arm64 userland, plus the arm64 wheel (unpacked),
# the tests, /init, and the reference VMM's nested guest (this kernel and
# guest-initramfs.sh's initramfs, in /opt/guest). /init runs `pytest -m kernel` and powers the VM off; its
# result comes back on the serial console. Extra arguments go to pytest.
# Exit 3 means the lane could not start (no userland, no kernel, no boot).
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
timeout_s=${GUESTMEM_KERNEL_TIMEOUT:-1800}
cache=/var/cache/guestmem
cannot_start() { echo "arm64-kernel: $*" >&2; exit 3; }

root=$(bash "$top/scripts/arm64-userland.sh") || cannot_start "the arm64 userland could not be built"
kernel=${GUESTMEM_KERNEL:-6.1}
vmlinuz=$(bash "$top/scripts/arm64-kernel.sh" "$kernel") || cannot_start "Debian's arm64 kernel $kernel could not be fetched"
command -v qemu-system-aarch64 >/dev/null || cannot_start "qemu-system-aarch64 is not installed"
qemu_major=$(qemu-system-aarch64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p')
[ "${qemu_major:-0}" -ge 10 ] || cannot_start "QEMU $qemu_major stores MTE tags wrongly in system emulation; need 10+"
wheel=$(GUESTMEM_ARM64=$root bash "$top/scripts/arm64-wheel.sh") || cannot_start "the arm64 wheel could not be built"
guest_initrd=$(bash "$top/scripts/guest-initramfs.sh") || cannot_start "the nested guest's initramfs could not be built"

# The base archive depends only on the userland (its versioned path and its
# stamp files) and on kernel_root.py.
base_key=$( (echo "$root"; ls -a "$root" | grep '^\.[a-z]'; cat "$top/scripts/kernel_root.py") \
    | sha256sum | cut -c1-16)
base=$cache/kernel-root-$base_key.cpio
if [ ! -f "$base" ]; then
    echo "arm64-kernel: staging the trimmed root (once per userland)"
    rm -f "$cache"/kernel-root-*.cpio
    stage=$(mktemp -d)
    python3 "$top/scripts/kernel_root.py" "$root" "$stage/root" || cannot_start "the kernel root could not be staged"
    (cd "$stage/root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) > "$base.tmp" \
        && mv "$base.tmp" "$base"
    rm -rf "$stage"
    [ -f "$base" ] || cannot_start "the kernel root could not be archived"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
overlay=$work/overlay
mkdir -p "$overlay/opt/guestmem" "$overlay/src"
python3 -m zipfile -e "$wheel" "$overlay/opt/guestmem"
if git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$top" ls-files -z --cached --others --exclude-standard -- tests pyproject.toml \
        | (cd "$top" && xargs -0 cp --parents -t "$overlay/src")
else
    cp -a "$top/tests" "$top/pyproject.toml" "$overlay/src/"
fi
for arg in "$@"; do printf '%s\n' "$arg"; done > "$overlay/pytest-args"
# The reference VMM's nested guest: this same kernel, and its own initramfs.
mkdir -p "$overlay/opt/guest"
cp "$vmlinuz" "$overlay/opt/guest/Image"
mkdir -p "$work/guest-modules/lib/modules"
cp "$(dirname "$vmlinuz")"/modules/*.ko "$work/guest-modules/lib/modules/"
(cd "$work/guest-modules" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
    | cat "$guest_initrd" - > "$overlay/opt/guest/initrd"
cp "$top/scripts/kernel-init.sh" "$overlay/init"
chmod 755 "$overlay/init"
(cd "$overlay" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) > "$work/overlay.cpio"
cat "$base" "$work/overlay.cpio" > "$work/initrd"

echo "arm64-kernel: booting $kernel ($(cat "$(dirname "$vmlinuz")/package"), $(cat "$(dirname "$vmlinuz")/page-size")-byte pages) with $(basename "$wheel") (timeout ${timeout_s}s)"
log=$work/console.log
timeout --foreground -k 10 "$timeout_s" qemu-system-aarch64 \
    -machine virt,mte=on,virtualization=on,gic-version=3 -cpu max -smp 2 -m 2048 \
    -nographic -nic none -no-reboot -kernel "$vmlinuz" -initrd "$work/initrd" \
    -append "console=ttyAMA0 rdinit=/init quiet panic=-1" </dev/null 2>&1 | tee "$log"
qemu_status=${PIPESTATUS[0]}

mkdir -p "$top/lane-reports"
sed -n '/^GUESTMEM-LANE-REPORT-BEGIN/,/^GUESTMEM-LANE-REPORT-END/{//!p}' "$log" | tr -d '\r' \
    > "$top/lane-reports/arm64-kernel-$kernel.json"
grep -q "GUESTMEM-KERNEL-LANE-START" "$log" \
    || cannot_start "the VM did not reach /init (qemu exit $qemu_status); see the console above"
status=$(tr -d '\r' < "$log" | sed -n 's/^GUESTMEM-KERNEL-LANE-EXIT=\([0-9]*\)$/\1/p' | tail -n 1)
if [ -z "$status" ]; then
    [ "$qemu_status" -eq 124 ] && echo "arm64-kernel: timed out after ${timeout_s}s" >&2
    echo "arm64-kernel: the tests did not finish (qemu exit $qemu_status)" >&2
    exit 1
fi
echo "arm64-kernel: pytest exit $status"
exit "$status"
