#!/usr/bin/env bash
# The main job: install guestmem (with rich and matplotlib) into a cached venv
# and run `guestmem bench` on this machine; arguments go to it
# (e.g. --full, --json results.json, --plot routes.png).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${GUESTMEM_HOST_VENV:-/var/cache/guestmem/host-venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet '.[bench]'
exec "$venv/bin/guestmem" bench "$@"
