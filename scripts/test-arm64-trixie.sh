#!/usr/bin/env bash
# The arm64-trixie lane: the one abi3 wheel (cp310-abi3, built by the
# arm64-user lane's recipe in Debian 12 with Python 3.11) installed by pip into
# a clean Debian 13 (trixie) arm64 userland with Python 3.13, numpy 2 and cffi
# 1.17 and NO compiler, then the tests of what a newer Python could break, in HARDWARE mode under qemu-aarch64 with
# emulated MTE, as in the arm64-user lane. It proves that an arm64 host with a
# newer Python gets a working guestmem from the wheel alone. Then GDB on the
# host against the stub running under trixie's Python (arm64-trixie-gdb).
# Exit 3 means the lane could not start (no userland, no binfmt).
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
build_root=$(bash "$top/scripts/arm64-userland.sh") \
    || { echo "arm64-trixie: the bookworm build userland could not be built" >&2; exit 3; }
root=$(bash "$top/scripts/arm64-trixie-userland.sh") \
    || { echo "arm64-trixie: the trixie userland could not be built" >&2; exit 3; }
in_trixie() { GUESTMEM_ARM64=$root bash "$top/scripts/in-arm64.sh" "$@"; }
in_trixie /bin/true || { echo "arm64-trixie: cannot run arm64 binaries (binfmt_misc/qemu)" >&2; exit 3; }
set -e

wheel_path=$(GUESTMEM_ARM64=$build_root bash "$top/scripts/arm64-wheel.sh")
wheel=$(basename "$wheel_path")
case $wheel in
    guestmem-*-cp310-abi3-manylinux_*_aarch64.whl) ;;
    *) echo "arm64-trixie: $wheel is not the cp310-abi3 manylinux wheel" >&2; exit 1 ;;
esac
# The tag is a claim; abi3audit (host venv, from .[dev]) checks the symbols the
# extension imports against the stable ABI of every version the tag names
# (3.10 and later), including 3.10, which no lane here runs.
host_venv=${GUESTMEM_HOST_VENV:-/var/cache/guestmem/host-venv}  # made by scripts/test-host.sh
[ -x "$host_venv/bin/abi3audit" ] || bash "$top/scripts/test-host.sh" --co -q >/dev/null
"$host_venv/bin/abi3audit" --strict --summary "$wheel_path"

# The proof is only honest if nothing here could have built the core instead.
found=$(in_trixie sh -c 'for t in gcc cc clang; do command -v $t; done
    ls /usr/include/python3*/Python.h 2>/dev/null; echo checked')
if [ "$found" != checked ]; then
    echo "arm64-trixie: this userland can compile extensions ($found); it proves nothing" >&2
    exit 1
fi

rm -rf "$root/src" "$root/opt/gm-test" "$root/wheels"
mkdir -p "$root/src" "$root/wheels"
if git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$top" ls-files -z --cached --others --exclude-standard -- tests benchmarks pyproject.toml \
        | (cd "$top" && xargs -0 cp --parents -t "$root/src")
else
    (cd "$top" && cp -a --parents tests benchmarks pyproject.toml "$root/src")
fi
cp "$wheel_path" "$root/wheels/"
echo "arm64-trixie: testing $wheel on $(in_trixie python3 --version)"
in_trixie python3 -m venv --system-site-packages /opt/gm-test
in_trixie /opt/gm-test/bin/pip install --quiet --no-index --no-deps "/wheels/$wheel"
# --no-deps skipped the resolver: the wheel's requirements (cffi, numpy) must
# still be met, by Debian's packages alone.
in_trixie /opt/gm-test/bin/pip check
# The limited-API module, loaded by 3.13: not a version-specific build.
in_trixie /opt/gm-test/bin/python -c '
import sys, guestmem, guestmem._gm as core
assert sys.version_info >= (3, 13), sys.version
assert core.__file__.endswith("_gm.abi3.so"), core.__file__
print("arm64-trixie:", core.__file__, "|", guestmem.platform_summary())'
# The arm64-user lane runs the whole suite on this same wheel; here, what a
# newer Python, numpy and cffi could break: every route through the native
# core, numpy arrays of tags, cffi buffers, the stream codec, the virtqueue,
# the stub and the errors (arguments given to test.sh replace this list).
[ $# -gt 0 ] || set -- test_routes.py test_memory.py test_checked.py test_faults.py \
    test_fastpath.py test_dma.py test_dma_io.py test_virtio.py test_migration.py \
    test_gdbstub_server.py test_errors.py
mkdir -p "$top/lane-reports"
set +e  # both test runs below report, whatever the first one's result
in_trixie GUESTMEM_LANE=arm64-trixie GUESTMEM_LANE_REPORT=/tmp/arm64-trixie.json \
    sh -c 'cd /src/tests && /opt/gm-test/bin/python -m pytest -p no:cacheprovider --durations=10 "$@"' pytest "$@"
status=$?
cp "$root/tmp/arm64-trixie.json" "$top/lane-reports/arm64-trixie.json" 2>/dev/null || true

# GDB is not in the trixie userland (and need not be): GDB on the host debugs
# the stub running under trixie's Python, over loopback.
echo "arm64-trixie: gdb-multiarch and lldb on the host against the stub under trixie's Python"
(cd "$top/tests" && GUESTMEM_LANE=arm64-trixie-gdb GUESTMEM_GDB_MODES=HARDWARE \
    GUESTMEM_LANE_REPORT="$top/lane-reports/arm64-trixie-gdb.json" \
    GUESTMEM_GDB_TARGET="env GUESTMEM_ARM64=$root bash $top/scripts/in-arm64.sh /opt/gm-test/bin/python /src/tests/gdb_target.py" \
    "$host_venv/bin/python" -m pytest -p no:cacheprovider test_gdb_client.py test_lldb_client.py)
gdb_status=$?
[ $status -ne 0 ] && exit $status
exit $gdb_status
