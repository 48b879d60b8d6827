#!/usr/bin/env bash
# The one test command: set up what is missing, then run every lane.
#   host        the full suite on this machine (SOFTWARE, NONE)
#   arm64-user  the arm64 wheel on QEMU's emulated MTE (HARDWARE, SOFTWARE, NONE)
#   arm64-trixie  the same abi3 wheel installed by pip into Debian 13 (Python
#               3.13, no compiler), on QEMU's emulated MTE (HARDWARE, SOFTWARE, NONE)
#   arm64-kernel-6.1, -6.12, -6.12-16k
#               the same wheel under Debian's arm64 kernels (Linux 6.1 and 6.12
#               with 4 KiB pages, 6.12 with 16 KiB pages) in qemu-system-aarch64
#               with MTE and nested KVM: what only a kernel shows (HARDWARE, KVM)
# With CI=true a lane that cannot start fails the run; elsewhere it is
# reported as not run, with the reason. Extra arguments go to pytest.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
declare -A result
failed=0

KERNELS=(6.1 6.12 6.12-16k)
LANES=(host arm64-user arm64-trixie "${KERNELS[@]/#/arm64-kernel-}")

# lane NAME SCRIPT [pytest args]; GUESTMEM_KERNEL picks the kernel lane's kernel.
lane() {
    local name=$1 script=$2; shift 2
    echo "===== lane $name ====="
    GUESTMEM_KERNEL=${name#arm64-kernel-} bash "$here/$script" "$@"
    local rc=$?
    if [ $rc -eq 0 ]; then
        result[$name]="passed"
    elif [ $rc -eq 3 ] && [ "${CI:-}" != "true" ]; then
        result[$name]="NOT RUN (could not start; see above)"
    else
        result[$name]="FAILED (exit $rc)"
        failed=1
    fi
}

# Build the arm64 lanes' caches (userlands, wheel, kernels, the nested guest's
# initramfs) in the background while the lanes before them run: on a cold
# machine this overlaps minutes of emulated package installs with the host
# lane and the arm64-user lane (which keep one core busy each). Every cache
# script takes its own lock, so a lane that needs one waits for it, or
# builds it itself if the background job failed (then with its errors shown).
prepare() {
    local root
    root=$(bash "$here/arm64-userland.sh") || return
    GUESTMEM_ARM64=$root bash "$here/arm64-wheel.sh" >/dev/null || return
    bash "$here/arm64-trixie-userland.sh" >/dev/null &
    for kernel in "${KERNELS[@]}"; do
        bash "$here/arm64-kernel.sh" "$kernel" >/dev/null || return
    done
    bash "$here/guest-initramfs.sh" >/dev/null
    wait
}

if [ "$(id -u)" -eq 0 ]; then
    bash "$here/host-deps.sh" || echo "host packages could not be installed: the arm64 lanes may not start"
    mkdir -p "$here/../lane-reports"
    prepare > "$here/../lane-reports/prepare.log" 2>&1 &
fi
lane host test-host.sh "$@"
for name in "${LANES[@]:1}"; do
    script=test-${name%%-[0-9]*}.sh  # arm64-kernel-6.12-16k -> test-arm64-kernel.sh
    if [ "$(id -u)" -eq 0 ]; then
        lane "$name" "$script" "$@"
    elif [ "${CI:-}" = "true" ]; then
        result[$name]="FAILED (needs root for chroot and binfmt_misc)"; failed=1
    else
        result[$name]="NOT RUN (needs root for chroot and binfmt_misc)"
    fi
done

wait  # the background preparation, if a lane did not need all of it
echo "===== lanes ====="
for name in "${LANES[@]}"; do
    printf '  %-22s %s\n' "$name" "${result[$name]}"
done
exit $failed
