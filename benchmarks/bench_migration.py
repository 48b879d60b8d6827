"""Save/restore throughput and stream size for 256 MiB guests, beside a plain
copy of the same bytes measured in the same run.

    python benchmarks/bench_migration.py [--size-mib 256] [--mode software] [--json out.json]

Figures are medians of --repeats runs, in GB/s (10^9 bytes per second of
guest memory), with the ratio to the plain copy.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any, BinaryIO, cast

import numpy as np

import guestmem as gm
from guestmem import migration

PAGE = 4096


class CountingSink:
    """A sink that keeps only the byte count (the network is not measured)."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes | memoryview) -> int:
        self.bytes += len(data)
        return len(data)


def populate(mem: gm.GuestMemory, share: float, seed: int = 1) -> int:
    rng = np.random.default_rng(seed)
    region = mem.regions[0]
    pages = region.size // PAGE
    chosen = np.flatnonzero(rng.random(pages) < share)
    block = rng.integers(1, 256, PAGE * 64, dtype=np.uint8)
    for page in chosen.tolist():
        gpa = region.gpa + page * PAGE
        mem.write(gpa, block[(page % 64) * PAGE : (page % 64 + 1) * PAGE])
        if mem.tag_mode is not gm.TagMode.NONE:
            mem.set_tags(gpa, PAGE, (page + np.arange(256)) % 16)
    return int(chosen.size)


def median_seconds(run: Callable[[], object], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times) - min(times)


def measure(size: int, mode: str, share: float, repeats: int) -> dict[str, Any]:
    with gm.GuestMemory.anonymous(size, gpa=0x4000_0000, tags=mode) as src:
        nonzero = populate(src, share)
        view = src.view(0x4000_0000, size)
        target = np.empty(size, dtype=np.uint8)
        with gm.unchecked():
            copy, copy_spread = median_seconds(lambda: np.copyto(target, view), repeats)
        sink = cast(BinaryIO, CountingSink())
        save, save_spread = median_seconds(lambda: migration.save(src, sink), repeats)
        stream = io.BytesIO()
        migration.save(src, stream)
        data = stream.getvalue()
        with gm.GuestMemory.anonymous(size, gpa=0x4000_0000, tags=mode) as dst:
            restore, restore_spread = median_seconds(
                lambda: migration.restore(io.BytesIO(data), dst), repeats
            )
    pages = size // PAGE
    header = 28 + 16 + 8
    zero = pages - nonzero
    return {
        "mode": mode,
        "nonzero_share": share,
        "guest_bytes": size,
        "stream_bytes": len(data),
        "bytes_per_zero_page": 16,
        "bytes_per_nonzero_page": (len(data) - header - 16 - 16 * zero) / nonzero
        if nonzero
        else None,
        "plain_copy_gbps": size / copy / 1e9,
        "save_gbps": size / save / 1e9,
        "restore_gbps": size / restore / 1e9,
        "save_ratio_to_copy": copy / save,
        "restore_ratio_to_copy": copy / restore,
        "spread_s": {"copy": copy_spread, "save": save_spread, "restore": restore_spread},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    mode = gm.resolve_tag_mode(args.mode).name.lower()
    where = f"{platform.machine()} {platform.release()}, MTE: {gm.has_mte()}"
    results = [measure(args.size_mib << 20, mode, s, args.repeats) for s in (0.0, 0.5, 1.0)]
    print(f"migration, {args.size_mib} MiB guest, tag mode {mode}, on {where}")
    print(
        f"{'non-zero':>9} {'stream MiB':>11} {'copy GB/s':>10} {'save GB/s':>10} "
        f"{'x copy':>7} {'restore GB/s':>13} {'x copy':>7} {'B/nonzero pg':>13}"
    )
    for r in results:
        per_page = r["bytes_per_nonzero_page"]
        per_page_text = "-" if per_page is None else str(round(float(per_page)))
        print(
            f"{r['nonzero_share']:>9.0%} {r['stream_bytes'] / 2**20:>11.1f} "
            f"{r['plain_copy_gbps']:>10.2f} {r['save_gbps']:>10.2f} "
            f"{r['save_ratio_to_copy']:>7.2f} "
            f"{r['restore_gbps']:>13.2f} {r['restore_ratio_to_copy']:>7.2f} "
            f"{per_page_text:>13}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"platform": where, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
