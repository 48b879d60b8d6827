"""Time a case inside the core: clock_gettime around a native loop (gm_bench_*)."""

from __future__ import annotations

from typing import Any

import guestmem as gm
from guestmem._native import check, ffi, lib
from guestmem.tools.bench import plan
from guestmem.tools.bench.model import BASELINE, CHECKS_OFF, Case
from guestmem.tools.bench.subject import CHECKED_TAG, Subject
from guestmem.tools.bench.timing import Timing, timed

_OP_READ = 0  # guest -> device buffer


def _request(subject: Subject, route: gm.Route, point: plan.Point, buf: Any) -> tuple[Any, Any]:
    """A ``struct gm_access`` for one read, and its span, which must outlive it."""
    tag = CHECKED_TAG if route is gm.Route.CHECKED else 0
    piece = (subject.region, point.offset, point.size)
    return subject.memory._request(route, _OP_READ, [piece], buf, 0, tag)


def time_native(
    subject: Subject, case: Case, point: plan.Point, slots: int, repeats: int, target_ns: int
) -> Timing:
    """Median GB/s of ``case`` at ``point`` over ``slots`` rotating places."""
    stride = plan.stride(point)
    out = ffi.from_buffer(subject.device)
    ns = ffi.new("uint64_t *")
    if case.route is None:
        if case.name == BASELINE:
            src = ffi.from_buffer(subject.source) + point.offset
        else:
            src = subject.guest_pointer(point.offset)
        checks_off = int(case.name == CHECKS_OFF)

        def run_memcpy(n: int) -> int:
            status = lib.gm_bench_memcpy(out, src, point.size, stride, slots, n, checks_off, ns)
            check(status, case.name)
            return int(ns[0])

        return timed(run_memcpy, point.size, repeats, target_ns)

    request, span = _request(subject, gm.Route[case.route], point, out)
    scope = int(case.thread_scope)

    def run_route(n: int) -> int:
        check(lib.gm_bench_access(request, stride, slots, n, scope, ns), case.name)
        return int(ns[0])

    result = timed(run_route, point.size, repeats, target_ns)
    del span
    return result
