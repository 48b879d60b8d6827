"""Repeat a timed loop and reduce it to a median rate and its spread."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

MAX_ITERATIONS = 1 << 20


@dataclass(frozen=True)
class Timing:
    """Median and spread (max - min) of GB/s over the repeats, and accesses per repeat."""

    median_gbps: float
    spread_gbps: float
    iterations: int


def timed(run: Callable[[int], int], size: int, repeats: int, target_ns: int) -> Timing:
    """Time ``run(n)`` (which returns nanoseconds for ``n`` accesses of ``size`` bytes).

    One untimed call warms up and calibrates ``n`` so that a repeat lasts
    about ``target_ns``; then ``repeats`` repeats are timed. GB/s is 10^9
    bytes per second, i.e. bytes per nanosecond.
    """
    per_call = max(min(run(1), run(1)), 1)
    iterations = max(1, min(target_ns // per_call, MAX_ITERATIONS))
    rates = [size * iterations / max(run(iterations), 1) for _ in range(repeats)]
    return Timing(statistics.median(rates), max(rates) - min(rates), iterations)
