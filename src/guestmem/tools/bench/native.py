"""Time a case inside the core: clock_gettime around a native loop (gm_bench_*).

The loops are the benchmarks' own extension (``_gmbench``); they call the
production core's entry points through pointers taken from it here.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import guestmem as gm
from guestmem._native import check
from guestmem._native import ffi as core_ffi
from guestmem._native import lib as core_lib
from guestmem.plan import resolve
from guestmem.tools.bench import plan
from guestmem.tools.bench._gmbench import ffi, lib
from guestmem.tools.bench.model import BASELINE, CHECKS_OFF, Case
from guestmem.tools.bench.subject import CHECKED_TAG, Subject
from guestmem.tools.bench.timing import Timing, timed


def _address(core_cdata: Any) -> int:
    return int(core_ffi.cast("uintptr_t", core_cdata))


@cache
def _core() -> Any:
    """The production core's entry points, as the loops call them."""
    core = ffi.new("struct gm_bench_core *")
    core.access = ffi.cast(
        "int (*)(struct gm_access *)", _address(core_ffi.addressof(core_lib, "gm_access"))
    )
    for field in ("unchecked_thread_enter", "unchecked_thread_exit"):
        pointer = core_ffi.addressof(core_lib, f"gm_{field}")
        setattr(core, field, ffi.cast("int (*)(void)", _address(pointer)))
    return core


def _request(subject: Subject, route: gm.Route, point: plan.Point, buf: Any) -> tuple[Any, Any]:
    """A ``struct gm_access`` for one read, and its span, which must outlive it."""
    tag = CHECKED_TAG if route is gm.Route.CHECKED else None
    plan = resolve(subject.memory.policy, gm.Access.DMA, route, tag)
    piece = (subject.region, point.offset, point.size)
    return subject.memory.access_request(plan, core_lib.GM_OP_READ, [piece], buf)  # guest -> device


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
            src = ffi.cast("uint8_t *", _address(subject.guest_pointer(point.offset)))
        checks_off = int(case.name == CHECKS_OFF)

        def run_memcpy(n: int) -> int:
            status = lib.gm_bench_memcpy(
                _core(), out, src, point.size, stride, slots, n, checks_off, ns
            )
            check(status, case.name)
            return int(ns[0])

        return timed(run_memcpy, point.size, repeats, target_ns)

    device = core_ffi.from_buffer(subject.device)
    request, span = _request(subject, gm.Route[case.route], point, device)
    access = ffi.cast("struct gm_access *", _address(request))
    scope = int(case.thread_scope)

    def run_route(n: int) -> int:
        check(lib.gm_bench_access(_core(), access, stride, slots, n, scope, ns), case.name)
        return int(ns[0])

    result = timed(run_route, point.size, repeats, target_ns)
    del span, request, device
    return result
