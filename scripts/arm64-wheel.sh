#!/usr/bin/env bash
# Build the arm64 wheel of this checkout inside the arm64 userland (native gcc
# under qemu-aarch64), repair it to a manylinux tag with auditwheel, and print
# its path on the host. Both arm64 lanes test this one wheel; it is rebuilt
# only when the files it is built from change.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
root=${GUESTMEM_ARM64:?set GUESTMEM_ARM64 to the userland path}

sources() {
    if git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
        git -C "$top" ls-files --cached --others --exclude-standard -- pyproject.toml setup.py csrc src
    else
        (cd "$top" && find pyproject.toml setup.py csrc src -type f ! -path '*/__pycache__/*')
    fi
}
key=$(cd "$top" && sources | sort | xargs sha256sum | sha256sum | cut -c1-16)
out=$root/wheelhouse/$key
exec 8>"$root/.wheel.lock"  # one build at a time: a second waits and finds the wheel
flock 8
if ! ls "$out"/guestmem-*manylinux*_aarch64.whl >/dev/null 2>&1; then
    # Wheels of other checkouts stay an hour: two checkouts testing at once
    # (a worktree beside main) must not delete each other's wheel in use.
    mkdir -p "$root/wheelhouse"
    find "$root/wheelhouse" -mindepth 1 -maxdepth 1 -mmin +60 -exec rm -rf {} +
    src=build-src-$key
    rm -rf "${root:?}/$src" "$root/tmp/dist-$key"
    mkdir -p "$root/$src"
    (cd "$top" && sources | tr '\n' '\0' | xargs -0 cp --parents -t "$root/$src")
    echo "arm64: building the arm64 wheel (native gcc under qemu-aarch64)" >&2
    bash "$top/scripts/in-arm64.sh" sh -c "cd /$src && python3 -m pip wheel --quiet --no-build-isolation --no-deps -w /tmp/dist-$key . \
        && auditwheel repair --wheel-dir /wheelhouse/$key /tmp/dist-$key/guestmem-*.whl && rm -rf /tmp/dist-$key" >&2
    rm -rf "${root:?}/$src"
fi
ls "$out"/guestmem-*manylinux*_aarch64.whl
