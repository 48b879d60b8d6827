"""Tag operations per GiB of guest memory, and the fixed cost of a tiny read."""

from __future__ import annotations

import mmap
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import guestmem as gm
from guestmem.tools.bench.subject import GPA

TAG_OPS_SIZE = 64 << 20  # --full; a quick run uses a quarter
READ64_CALLS = 20000


def _median_seconds(call: Callable[[], object], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def tag_ops(mode: gm.TagMode, repeats: int, size: int = TAG_OPS_SIZE) -> dict[str, Any]:
    """Seconds per GiB of guest memory for set_tags (one tag per granule) and get_tags."""
    with gm.GuestMemory.anonymous(size, gpa=GPA, tags=mode) as mem:
        mem.fill(GPA, size, 0, route=gm.Route.TCO)
        tags = (np.arange(size // gm.GRANULE) % 16).astype(np.uint8)
        per_gib = (1 << 30) / size
        set_s = _median_seconds(lambda: mem.set_tags(GPA, size, tags), repeats)
        uniform_s = _median_seconds(lambda: mem.set_tags(GPA, size, 7), repeats)
        get_s = _median_seconds(lambda: mem.get_tags(GPA, size), repeats)
    return {
        "mode": mode.name,
        "bytes": size,
        "repeats": repeats,
        "set_tags_s_per_gib": set_s * per_gib,
        "set_uniform_tag_s_per_gib": uniform_s * per_gib,
        "get_tags_s_per_gib": get_s * per_gib,
    }


def read64_against_mmap(repeats: int) -> dict[str, float]:
    """Nanoseconds per ``mem.read(gpa, 64)`` and per 64-byte slice of an mmap object."""
    with gm.GuestMemory.anonymous(1 << 20, gpa=GPA) as mem:
        m = mmap.mmap(-1, 1 << 20)

        def per_call(call: Callable[[], object]) -> float:
            def many() -> None:
                for _ in range(READ64_CALLS):
                    call()

            return _median_seconds(many, repeats) * 1e9 / READ64_CALLS

        slice_ns = per_call(lambda: m[4096:4160])
        read_ns = per_call(lambda: mem.read(GPA + 4096, 64))
        m.close()
    return {"mmap_slice_ns": slice_ns, "read_ns": read_ns, "ratio": read_ns / slice_ns}
