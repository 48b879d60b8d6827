"""The route comparison behind ``guestmem bench``.

TCO against bounce buffers and the rest, as throughput and as ratios to a
baseline measured in the same run.

Two layers are timed. ``native``: clock_gettime around a loop inside the C core
(gm_clock_access, gm_clock_memcpy), the routes' own cost. ``python``: the same
access called from Python once per iteration, which adds the binding's fixed
cost. Every figure is the median of ``repeats`` runs (11 at least), in GB/s
(10^9 bytes per second); the spread is the range of those runs.
"""

from __future__ import annotations

import mmap
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import guestmem as gm
from guestmem._native import check, ffi, lib

SCHEMA = "guestmem-bench/1"
GPA = 0x4000_0000
BASELINE = "memcpy untagged"
CHECKS_OFF = "memcpy checks off"  # also UNCHECKED_THREAD entered once per thread
ROUTE_CASES = ["TCO", "MATCH_ALL", "BOUNCE", "UNCHECKED_THREAD", "CHECKED"]
CASES = [BASELINE, CHECKS_OFF, *ROUTE_CASES]
QUICK_SIZES = [64, 1000, 4096, 4099, 65536, 1 << 20, 16 << 20]
FULL_SIZES = sorted({1 << k for k in range(6, 27)} | {1000, 4099, 65537, 1_000_003})
TARGET_NS = 2_000_000  # each repeat runs this long at least


@dataclass
class Result:
    """One case at one size: median throughput, spread, ratio to the baseline."""

    case: str
    mode: str
    layer: str  # "native" or "python"
    temperature: str  # "warm" (same buffer) or "cold" (rotating over > 4x LLC)
    size: int
    offset: int  # misalignment of the guest address within a page
    median_gbps: float
    spread_gbps: float
    ratio: float = 0.0  # to BASELINE, same layer, temperature and size, same run


@dataclass
class Report:
    """Everything one run measured, and where."""

    platform: dict[str, str]
    where: str
    results: list[Result] = field(default_factory=list)
    tag_ops: list[dict[str, Any]] = field(default_factory=list)
    read64: dict[str, float] = field(default_factory=dict)
    schema: str = SCHEMA

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def where_it_ran() -> str:
    """Native host, emulated arm64 (QEMU user mode), or a real arm64 machine."""
    lane = os.environ.get("GUESTMEM_LANE", "")
    machine = platform.machine()
    if lane == "arm64-user":
        return f"emulated {machine} (QEMU user mode; figures describe the emulator, not silicon)"
    if lane == "arm64-kernel":
        return f"emulated {machine} (QEMU system mode; figures describe the emulator)"
    return f"native {machine} host"


def last_level_cache() -> int:
    """Bytes of the largest CPU cache, from sysfs (32 MiB if unknown)."""
    best = 0
    root = "/sys/devices/system/cpu/cpu0/cache"
    for entry in os.listdir(root) if os.path.isdir(root) else []:
        try:
            with open(os.path.join(root, entry, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KM")) * scale)
    return best or 32 << 20


def _timed(run: Callable[[int], int], size: int, repeats: int) -> tuple[float, float]:
    """Median and range of GB/s over ``repeats`` runs; ``run(n)`` returns ns for n iterations."""
    per_call = max(run(1), 1)
    iterations = max(1, min(TARGET_NS // per_call, 1 << 20))
    rates = [size * iterations / max(run(iterations), 1) for _ in range(repeats)]
    return statistics.median(rates), max(rates) - min(rates)


class Bench:
    """The measurements for one tag mode over one GuestMemory."""

    def __init__(self, mode: gm.TagMode, window: int, repeats: int) -> None:
        """Map ``window`` bytes of guest memory in ``mode``."""
        self.mode = mode
        self.repeats = repeats
        self.memory = gm.GuestMemory.anonymous(window, gpa=GPA, tags=mode)
        self.region = self.memory.regions[0]
        self.window = window
        self.device = np.zeros(max(QUICK_SIZES[-1], 1 << 20), dtype=np.uint8)
        # Page-aligned like guest memory, so both see the same cache aliasing.
        self._source_map = mmap.mmap(-1, window)
        self.source = np.frombuffer(self._source_map, dtype=np.uint8)
        self.source[:] = 1
        # Written like the baseline's source: untouched pages all read the zero page.
        self.memory.fill(GPA, window, 1, route=gm.Route.TCO)

    def tags(self, uniform: int | None) -> None:
        """Runs of 16 granules (256 bytes: slab-sized objects), or one tag everywhere."""
        if self.mode is gm.TagMode.NONE:
            return
        granules = self.window // 16
        if uniform is None:
            layout = (np.arange(granules) // 16 % 15 + 1).astype(np.uint8)
            self.memory.set_tags(GPA, self.window, layout)
        else:
            self.memory.set_tags(GPA, self.window, uniform)

    def _device(self, size: int) -> np.ndarray:
        if self.device.size < size:
            self.device = np.zeros(size, dtype=np.uint8)
        return self.device

    def native(self, case: str, size: int, offset: int, slots: int) -> tuple[float, float]:
        """Time ``case`` inside the core."""
        stride = -(-(size + offset) // 4096) * 4096
        out = ffi.from_buffer(self._device(size))
        ns = ffi.new("uint64_t *")
        if case in (BASELINE, CHECKS_OFF):
            if case == BASELINE:
                src = ffi.from_buffer(self.source) + offset
            else:
                src = self.region._base + offset
            off = 1 if case == CHECKS_OFF else 0

            def run(n: int) -> int:
                check(lib.gm_clock_memcpy(out, src, size, stride, slots, n, off, ns), case)
                return int(ns[0])

            return _timed(run, size, self.repeats)
        span = ffi.new("struct gm_span *")
        self.region.fill_span(span, offset, size)
        request = ffi.new("struct gm_access *")
        request.mode = self.mode
        request.route = gm.Route[case]
        request.op = 0
        request.spans = span
        request.nspans = 1
        request.buf = out
        request.logical_tag = 5
        request.pool = self.memory._pool
        request.vm_fd = -1

        def run_route(n: int) -> int:
            check(lib.gm_clock_access(request, stride, slots, n, ns), case)
            return int(ns[0])

        return _timed(run_route, size, self.repeats)

    def python(self, case: str, size: int, offset: int) -> tuple[float, float]:
        """Time ``case`` called from Python, one call per iteration (warm)."""
        device = memoryview(self._device(size).data)[:size]
        if case == BASELINE:
            source = memoryview(self.source.data)[offset : offset + size]

            def call() -> None:
                device[:] = source

        elif case == CHECKS_OFF:
            guest = self.memory.view(GPA + offset, size)
            target = np.frombuffer(device, dtype=np.uint8)

            def call() -> None:
                np.copyto(target, guest)

        else:
            route = gm.Route[case]
            tag = 5 if route is gm.Route.CHECKED else None

            def call() -> None:
                self.memory.readinto(GPA + offset, device, route=route, tag=tag)

        def run(n: int) -> int:
            scope = gm.unchecked_thread() if case == CHECKS_OFF else _nothing()
            with scope:
                start = time.perf_counter_ns()
                for _ in range(n):
                    call()
                return time.perf_counter_ns() - start

        return _timed(run, size, self.repeats)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def read64_against_mmap(repeats: int) -> dict[str, float]:
    """Nanoseconds per ``mem.read(gpa, 64)`` and per 64-byte slice of an mmap object."""
    with gm.GuestMemory.anonymous(1 << 20, gpa=GPA) as mem:
        m = mmap.mmap(-1, 1 << 20)
        n = 20000

        def per(call: Callable[[], object]) -> float:
            runs = []
            for _ in range(repeats):
                start = time.perf_counter_ns()
                for _ in range(n):
                    call()
                runs.append((time.perf_counter_ns() - start) / n)
            return statistics.median(runs)

        slice_ns = per(lambda: m[4096:4160])
        read_ns = per(lambda: mem.read(GPA + 4096, 64))
        m.close()
    return {"mmap_slice_ns": slice_ns, "read_ns": read_ns, "ratio": read_ns / slice_ns}


def tag_ops(mode: gm.TagMode, size: int, repeats: int) -> dict[str, Any]:
    """Seconds per GiB of guest memory for set_tags and get_tags."""
    with gm.GuestMemory.anonymous(size, gpa=GPA, tags=mode) as mem:
        tags = (np.arange(size // 16) % 16).astype(np.uint8)

        def seconds(call: Callable[[], object]) -> float:
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                runs.append(time.perf_counter() - start)
            return statistics.median(runs) * (1 << 30) / size

        return {
            "mode": mode.name,
            "set_tags_s_per_gib": seconds(lambda: mem.set_tags(GPA, size, tags)),
            "get_tags_s_per_gib": seconds(lambda: mem.get_tags(GPA, size)),
        }


def run(
    *,
    full: bool = False,
    sizes: list[int] | None = None,
    repeats: int = 11,
    modes: list[gm.TagMode] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Measure every case in every tag mode here; ratios are to this run's baseline."""
    sizes = sizes or (FULL_SIZES if full else QUICK_SIZES)
    modes = modes or [m for m in gm.available_tag_modes() if m is not gm.TagMode.KVM]
    llc = last_level_cache()
    report = Report(platform=gm.platform_summary(), where=where_it_ran())
    for mode in modes:
        window = max(4 * llc + (16 << 20), 4 * max(sizes))
        bench = Bench(mode, -(-window // 4096) * 4096, repeats)
        try:
            for case in CASES:
                if case == "CHECKED" and mode is gm.TagMode.NONE:
                    continue
                bench.tags(5 if case == "CHECKED" else None)
                for size in sizes:
                    offset = 3 if size % 2 else 0  # odd sizes also start misaligned
                    temps = [("warm", 1)]
                    if full or size >= 65536:
                        temps.append(("cold", max(4, (4 * llc) // size + 1)))
                    for temperature, slots in temps:
                        if progress:
                            progress(f"{mode.name} {case} {size} B {temperature}")
                        med, spread = bench.native(case, size, offset, slots)
                        report.results.append(
                            Result(
                                case, mode.name, "native", temperature, size, offset, med, spread
                            )
                        )
                    if size <= (1 << 20) or full:
                        med, spread = bench.python(case, size, offset)
                        report.results.append(
                            Result(case, mode.name, "python", "warm", size, offset, med, spread)
                        )
        finally:
            bench.memory.close()
        if mode is not gm.TagMode.NONE:
            report.tag_ops.append(tag_ops(mode, 64 << 20, max(3, repeats // 3)))
    report.read64 = read64_against_mmap(repeats)
    _ratios(report.results)
    return report


def _ratios(results: list[Result]) -> None:
    base = {
        (r.layer, r.temperature, r.size, r.mode): r.median_gbps
        for r in results
        if r.case == BASELINE
    }
    for r in results:
        reference = base.get((r.layer, r.temperature, r.size, r.mode))
        r.ratio = r.median_gbps / reference if reference else 0.0
