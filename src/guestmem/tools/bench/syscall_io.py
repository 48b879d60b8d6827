"""System-call I/O into guest memory: ``mem.dma.io``'s routes beside ``os.readv``.

Each access writes SIZE bytes into a pipe and reads them back: into an
untagged bytearray with ``os.readv`` (the baseline), or into guest memory
with ``dma.io.readv_from`` on one route. Guest memory holds one tag run, or
one run per RUN_BYTES bytes, where MATCH_ALL passes one buffer per run. TCO
is not here: it is not safe for system calls. Timed from Python per access,
medians of the repeats, all in the same run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

import guestmem as gm
from guestmem.tools.bench.subject import GPA
from guestmem.tools.bench.timing import timed

SIZE = 64 << 10  # one pipe's default capacity: the write never blocks
RUN_BYTES = 256
ROUTES = (gm.Route.MATCH_ALL, gm.Route.BOUNCE, gm.Route.UNCHECKED_THREAD)
BASELINE = "os.readv"


def syscall_io(mode: gm.TagMode, repeats: int, target_ns: int) -> list[dict[str, Any]]:
    """GB/s of a pipe write + read per route and tag layout, with the ratio to os.readv."""
    r, w = os.pipe()
    payload = bytes(range(256)) * (SIZE // 256)
    try:
        with gm.GuestMemory.anonymous(SIZE, gpa=GPA, tags=mode) as mem:
            plain = bytearray(SIZE)
            base = _figure(mode, BASELINE, 1, repeats, target_ns, lambda: os.readv(r, [plain]), w)
            rows = [base]
            layouts = [1, SIZE // RUN_BYTES] if mode is not gm.TagMode.NONE else [1]
            for runs in layouts:
                if mode is not gm.TagMode.NONE:
                    mem.set_tags(GPA, SIZE, _run_tags(runs))
                for route in ROUTES:

                    def read(route: gm.Route = route) -> int:
                        return mem.dma.io.readv_from(r, [(GPA, SIZE)], route=route)

                    rows.append(_figure(mode, route.name, runs, repeats, target_ns, read, w))
            for row in rows:
                row["ratio"] = row["median_gbps"] / base["median_gbps"]
            if mem.read(GPA, SIZE, route=gm.Route.TCO) != payload:
                raise AssertionError("the benchmark's reads did not deliver the payload")
    finally:
        os.close(r)
        os.close(w)
    return rows


def _run_tags(runs: int) -> npt.NDArray[np.uint8]:
    granules = SIZE // gm.GRANULE
    return ((np.arange(granules) * runs // granules + 5) % 16).astype(np.uint8)


def _figure(
    mode: gm.TagMode,
    name: str,
    runs: int,
    repeats: int,
    target_ns: int,
    read: Callable[[], int],
    w: int,
) -> dict[str, Any]:
    payload = bytes(range(256)) * (SIZE // 256)

    def run(n: int) -> int:
        start = time.perf_counter_ns()
        for _ in range(n):
            os.write(w, payload)
            if read() != SIZE:
                raise AssertionError(f"{name}: a short read from a full pipe")
        return time.perf_counter_ns() - start

    timing = timed(run, SIZE, repeats, target_ns)
    return {
        "mode": mode.name,
        "route": name,
        "tag_runs": runs,
        "size": SIZE,
        "repeats": repeats,
        "iterations": timing.iterations,
        "median_gbps": timing.median_gbps,
        "spread_gbps": timing.spread_gbps,
        "ratio": 0.0,
    }
