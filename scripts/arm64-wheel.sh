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
if ! ls "$out"/guestmem-*manylinux*_aarch64.whl >/dev/null 2>&1; then
    rm -rf "$root/wheelhouse" "$root/build-src"
    mkdir -p "$root/build-src"
    (cd "$top" && sources | tr '\n' '\0' | xargs -0 cp --parents -t "$root/build-src")
    echo "arm64: building the arm64 wheel (native gcc under qemu-aarch64)" >&2
    bash "$top/scripts/in-arm64.sh" sh -c "cd /build-src && python3 -m pip wheel --quiet --no-build-isolation --no-deps -w /tmp/dist . \
        && auditwheel repair --wheel-dir /wheelhouse/$key /tmp/dist/guestmem-*.whl && rm -rf /tmp/dist" >&2
    rm -rf "$root/build-src"
fi
ls "$out"/guestmem-*manylinux*_aarch64.whl
