"""Time a case called from Python once per access: the binding's fixed cost shows."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import guestmem as gm
from guestmem.tools.bench import plan
from guestmem.tools.bench.model import BASELINE, CHECKS_OFF, Case
from guestmem.tools.bench.subject import CHECKED_TAG, GPA, Subject
from guestmem.tools.bench.timing import Timing, timed


def _call(subject: Subject, case: Case, point: plan.Point) -> Callable[[], object]:
    device = subject.device.data[: point.size]
    lo, hi = point.offset, point.offset + point.size
    if case.name == BASELINE:
        source = subject.source.data[lo:hi]

        def copy() -> None:
            device[:] = source

        return copy
    if case.name == CHECKS_OFF:
        guest = subject.memory.view(GPA + lo, point.size).data

        def copy_guest() -> None:
            device[:] = guest

        return copy_guest
    assert case.route is not None
    route = gm.Route[case.route]
    tag = CHECKED_TAG if route is gm.Route.CHECKED else None
    readinto = subject.memory.readinto
    gpa = GPA + lo
    return lambda: readinto(gpa, device, route=route, tag=tag)


def time_python(
    subject: Subject, case: Case, point: plan.Point, repeats: int, target_ns: int
) -> Timing:
    """Median GB/s of ``case`` at ``point`` (warm), one Python call per access."""
    call = _call(subject, case, point)
    in_scope = case.thread_scope or case.name == CHECKS_OFF

    def run(n: int) -> int:
        scope: AbstractContextManager[None] = gm.unchecked_thread() if in_scope else nullcontext()
        with scope:
            start = time.perf_counter_ns()
            for _ in range(n):
                call()
            return time.perf_counter_ns() - start

    return timed(run, point.size, repeats, target_ns)
