"""Which sizes, misalignments and cache temperatures a run measures, and where.

A cold access rotates over slots ``stride`` bytes apart that together cover
more than four times the last-level cache, so every access misses it.
"""

from __future__ import annotations

from dataclasses import dataclass

LINE = 64  # the stride's unit: a cache line, a multiple of the 16-byte granule
PAGE = 4096
COLD_FACTOR = 4


@dataclass(frozen=True)
class Point:
    """One size at one misalignment, and whether it is also measured cold."""

    size: int
    offset: int = 0
    cold: bool = False

    def label(self) -> str:
        """``4 KiB``, ``4099 B +3``: the size, then the misalignment if any."""
        for unit, shift in (("MiB", 20), ("KiB", 10)):
            if self.size >= 1 << shift and self.size % (1 << shift) == 0:
                text = f"{self.size >> shift} {unit}"
                break
        else:
            text = f"{self.size} B"
        return f"{text} +{self.offset}" if self.offset else text


QUICK: tuple[Point, ...] = (
    Point(64, cold=True),
    Point(1000, 3),
    Point(4096, cold=True),
    Point(4099, 3),
    Point(65536, cold=True),
    Point(65536, 8),
    Point(1 << 20, cold=True),
    Point(16 << 20, cold=True),
)
FULL: tuple[Point, ...] = tuple(
    sorted(
        [Point(1 << k, cold=True) for k in range(6, 27)]
        + [
            Point(1000, 3, True),
            Point(4096, 8, True),
            Point(4099, 3, True),
            Point(65536, 1, True),
            Point(65537, 5, True),
            Point(1_000_003, 7, True),
        ],
        key=lambda p: (p.size, p.offset),
    )
)
PYTHON_LIMIT_QUICK = 1 << 20  # larger sizes are timed from Python only with --full


def points(full: bool, sizes: list[int] | None = None) -> tuple[Point, ...]:
    """The default points, or ``sizes`` (odd ones misaligned by 3, all also cold)."""
    if sizes:
        return tuple(Point(s, 3 if s % 2 else 0, cold=True) for s in sizes)
    return FULL if full else QUICK


def stride(point: Point) -> int:
    """Distance between two slots: the access's bytes rounded up to a cache line."""
    return -(-(point.size + point.offset) // LINE) * LINE


def cold_slots(point: Point, llc: int) -> int:
    """Slots enough to cover more than COLD_FACTOR times the last-level cache."""
    return max(2, (COLD_FACTOR * llc) // stride(point) + 1)


def window(chosen: tuple[Point, ...], llc: int) -> int:
    """Bytes of guest memory (and of the baseline's source) every point fits in."""
    need = max(stride(p) * (cold_slots(p, llc) if p.cold else 1) for p in chosen)
    return -(-need // PAGE) * PAGE
