"""The fixed cost of one small access from Python, per tag mode, beside an mmap slice.

python benchmarks/bench_small_access.py [--size 64] [--repeats 21] [--json out.json]

Times ``mem.read(gpa, n)``, ``mem.readinto(gpa, bytearray)`` and
``mem.write(gpa, bytes)`` (the default route, DMA: TCO) and ``mmap[a:b]`` of
the same size: nanoseconds per call, the median of the repeats, each repeat
20,000 calls. Only the public API is used, so the same script measures any
installed version (run two venvs' in turn to compare them).
"""

from __future__ import annotations

import argparse
import json
import mmap
import platform
import statistics
import sys
import time
from collections.abc import Callable

import guestmem as gm

GPA = 0x4000_0000
CALLS = 20_000


def _ns_per_call(call: Callable[[], object], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(CALLS):
            call()
        runs.append((time.perf_counter_ns() - start) / CALLS)
    return statistics.median(runs)


def _cases(mem: gm.GuestMemory, size: int, repeats: int) -> dict[str, float]:
    at = GPA + 4096
    into, data = bytearray(size), bytes(size)
    return {
        "read": _ns_per_call(lambda: mem.read(at, size), repeats),
        "readinto": _ns_per_call(lambda: mem.readinto(at, into), repeats),
        "write": _ns_per_call(lambda: mem.write(at, data), repeats),
    }


def measure(size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Nanoseconds per call of each case, by tag mode (and ``mmap`` for the slice)."""
    out: dict[str, dict[str, float]] = {}
    for mode in gm.available_tag_modes():
        with gm.GuestMemory.anonymous(1 << 20, gpa=GPA, tags=mode) as mem:
            out[mode.name] = _cases(mem, size, repeats)
    m = mmap.mmap(-1, 1 << 20)
    out["mmap"] = {"slice": _ns_per_call(lambda: m[4096 : 4096 + size], repeats)}
    m.close()
    return out


def main(argv: list[str]) -> int:
    """Print (and with --json write) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    figures = measure(args.size, args.repeats)
    for where, cases in figures.items():
        print(where, " ".join(f"{case} {ns:.0f} ns" for case, ns in cases.items()))
    if args.json:
        report = {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "size": args.size,
            "ns_per_call": figures,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
