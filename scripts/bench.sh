#!/usr/bin/env bash
# The main job: install guestmem (with rich and matplotlib) into a cached venv
# and run `guestmem bench` on this machine; arguments go to it
# (e.g. --full, --json results.json, --plot routes.png). Any user can run it.
set -euo pipefail
cd "$(dirname "$0")/.."
# Caches: /var/cache/guestmem for root, the user's cache directory otherwise.
cache=/var/cache/guestmem
[ "$(id -u)" -eq 0 ] || cache=${XDG_CACHE_HOME:-$HOME/.cache}/guestmem
venv=${GUESTMEM_HOST_VENV:-$cache/host-venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet '.[bench]'
exec "$venv/bin/guestmem" bench "$@"
