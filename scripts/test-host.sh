#!/usr/bin/env bash
# The host lane: build and install the package into a cached venv, lint and
# type-check it, and run the whole suite on this machine (SOFTWARE and NONE).
set -euo pipefail
cd "$(dirname "$0")/.."
cache=/var/cache/guestmem  # for root; any other user: the user's cache directory
[ "$(id -u)" -eq 0 ] || cache=${XDG_CACHE_HOME:-$HOME/.cache}/guestmem
venv=${GUESTMEM_HOST_VENV:-$cache/host-venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
rm -rf build  # stale modules in build/lib would ship in the wheel
"$venv/bin/pip" install --quiet '.[dev]'
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy"
mkdir -p lane-reports
cd tests  # import the installed package, not ../src
GUESTMEM_LANE=host GUESTMEM_LANE_REPORT=../lane-reports/host.json \
    "$venv/bin/python" -m pytest -p no:cacheprovider --durations=10 "$@"
# 100,000 mutated streams and packets, with their outcomes counted.
"$venv/bin/python" -m pytest -p no:cacheprovider -q -s -m soak test_soak.py
