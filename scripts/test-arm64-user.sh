#!/usr/bin/env bash
# The arm64-user lane: in the cached arm64 userland, under qemu-aarch64 with
# emulated MTE, build the arm64 wheel, repair it to a manylinux tag, install
# it in a fresh venv and run the suite against it in HARDWARE mode.
# Exit 3 means the lane could not start (no userland, no binfmt).
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
root=$(bash "$top/scripts/arm64-userland.sh") || { echo "arm64-user: the userland could not be built" >&2; exit 3; }
export GUESTMEM_ARM64=$root
in_arm64() { bash "$top/scripts/in-arm64.sh" "$@"; }
in_arm64 /bin/true || { echo "arm64-user: cannot run arm64 binaries (binfmt_misc/qemu)" >&2; exit 3; }
set -e

wheel_path=$(bash "$top/scripts/arm64-wheel.sh")
wheel=$(basename "$wheel_path")
rm -rf "$root/src" "$root/opt/gm-test"
mkdir -p "$root/src"
if git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$top" ls-files -z --cached --others --exclude-standard | (cd "$top" && xargs -0 cp --parents -t "$root/src")
else
    cp -a "$top/." "$root/src"
fi
echo "arm64-user: testing $wheel"
in_arm64 python3 -m venv --system-site-packages /opt/gm-test
in_arm64 /opt/gm-test/bin/pip install --quiet --no-deps "${wheel_path#"$root"}"
mkdir -p "$top/lane-reports"
cp "$wheel_path" "$top/lane-reports/"
set +e  # both test runs below report, whatever the first one's result
in_arm64 GUESTMEM_LANE=arm64-user GUESTMEM_LANE_REPORT=/tmp/arm64-user.json \
    sh -c 'cd /src/tests && /opt/gm-test/bin/python -m pytest -p no:cacheprovider --durations=20 "$@"' pytest "$@"
status=$?
cp "$root/tmp/arm64-user.json" "$top/lane-reports/arm64-user.json" 2>/dev/null || true

# Real GDB on the host against the stub under emulation (HARDWARE tags), over loopback.
echo "arm64-user: gdb-multiarch and lldb on the host against the arm64 stub"
host_python=${GUESTMEM_HOST_VENV:-/var/cache/guestmem/host-venv}/bin/python  # made by scripts/test-host.sh
[ -x "$host_python" ] || bash "$top/scripts/test-host.sh" --co -q >/dev/null
(cd "$top/tests" && GUESTMEM_LANE=arm64-user-gdb GUESTMEM_GDB_MODES=HARDWARE \
    GUESTMEM_LANE_REPORT="$top/lane-reports/arm64-user-gdb.json" \
    GUESTMEM_GDB_TARGET="bash $top/scripts/in-arm64.sh /opt/gm-test/bin/python /src/tests/gdb_target.py" \
    "$host_python" -m pytest -p no:cacheprovider test_gdb_client.py test_lldb_client.py)
gdb_status=$?
[ $status -ne 0 ] && exit $status
exit $gdb_status
