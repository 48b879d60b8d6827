"""Facts about the machine a benchmark runs on: where it is, how big its cache is."""

from __future__ import annotations

import os
import platform

LLC_FALLBACK = 32 << 20
_CACHE_DIR = "/sys/devices/system/cpu/cpu0/cache"


def _qemu_cpu() -> bool:
    """Whether the CPU is QEMU's: implementer 0x00 ("software use") in /proc/cpuinfo.

    QEMU user mode hides itself from /proc/self/maps but fakes cpuinfo with
    its own CPU model, as system mode shows it; no silicon uses 0x00.
    """
    try:
        with open("/proc/cpuinfo") as f:
            return any(
                line.split(":")[0].strip() == "CPU implementer"
                and line.split(":")[1].strip() == "0x00"
                for line in f
            )
    except OSError:
        return False


def where_it_ran() -> str:
    """Native host, emulated arm64 (QEMU user or system mode), or a real arm64 machine.

    GUESTMEM_LANE (``arm64-user``, ``arm64-trixie``, ``arm64-kernel``) names the lane when set.
    """
    lane = os.environ.get("GUESTMEM_LANE", "")
    machine = platform.machine()
    if lane in ("arm64-user", "arm64-trixie"):
        return f"emulated {machine} (qemu-user: figures describe the emulator, not silicon)"
    if lane == "arm64-kernel":
        return f"emulated {machine} (qemu-system: figures describe the emulator, not silicon)"
    if machine == "aarch64" and _qemu_cpu():
        return f"emulated {machine} (QEMU's CPU: figures describe the emulator, not silicon)"
    return f"native {machine} host"


def _cache_bytes(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    digits = text.rstrip("KMGkmg")
    return int(digits) * scale if digits.isdigit() else 0


def last_level_cache() -> int:
    """Bytes of cpu0's largest cache, from sysfs (32 MiB if unknown)."""
    best = 0
    entries = os.listdir(_CACHE_DIR) if os.path.isdir(_CACHE_DIR) else []
    for entry in entries:
        try:
            with open(os.path.join(_CACHE_DIR, entry, "size")) as f:
                best = max(best, _cache_bytes(f.read().strip()))
        except OSError:
            continue
    return best or LLC_FALLBACK
