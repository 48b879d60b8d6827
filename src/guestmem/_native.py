"""The native boundary: the compiled core, and the one place that builds its requests.

The only module that imports the compiled core (guestmem._gm). It builds
the native descriptions of guest ranges (spans) and access requests, and
turns every native status into a typed exception; the enums' values reach
Python through it (guestmem.kinds). The only place that handles cffi
objects untyped.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Sequence
from typing import Any, Protocol

from guestmem._gm import ffi, lib
from guestmem.errors import (
    LengthError,
    NativeOSError,
    TagCheckError,
    TagRaceError,
    UnsupportedError,
)

__all__ = [
    "access_request",
    "bounce_pool",
    "check",
    "closed_hot",
    "entry_address",
    "ffi",
    "hot_region",
    "lib",
    "pointer_keeping",
    "raise_for",
    "read_request",
    "scratch",
    "spans",
    "stream_regions",
    "virtqueue",
]


class SpanSource(Protocol):
    """Anything that can describe a range of itself as a native span (a GuestRegion)."""

    def fill_span(self, span: Any, offset: int, length: int) -> None:
        """Describe ``length`` bytes at ``offset`` in ``span``."""
        ...


def spans(pieces: Sequence[tuple[SpanSource, int, int]]) -> Any:
    """A native ``struct gm_span[]`` for ``(region, offset, length)`` pieces."""
    out = ffi.new("struct gm_span[]", len(pieces))
    for span, (region, offset, n) in zip(out, pieces, strict=True):
        region.fill_span(span, offset, n)
    return out


def stream_regions(mode: int, regions: Sequence[tuple[Any, Any, int, int]]) -> Any:
    """A native ``struct gm_stream_region[]`` for ``(base, table, gpa, size)`` entries.

    A NULL ``base`` only validates (decoding applies nothing). The KVM fd is
    -1: set it for each use, inside the VM's in-use scope.
    """
    out = ffi.new("struct gm_stream_region[]", len(regions))
    for entry, (base, table, gpa, size) in zip(out, regions, strict=True):
        entry.mode = mode
        entry.base = base
        entry.table = table
        entry.gpa = gpa
        entry.size = size
        entry.vm_fd = -1
    return out


def virtqueue(
    mode: int,
    size: int,
    event_idx: bool,
    regions: Sequence[tuple[int, int, Any]],
    rings: tuple[int, int, int],
) -> tuple[Any, Any, Any]:
    """A native ``struct gm_virtq``, its region table and its output words.

    ``regions`` are ``(gpa, size, base pointer)``; keep all three results,
    and the regions' owners, alive while the queue is used.
    """
    table = ffi.new("struct gm_virtq_region[]", len(regions))
    for entry, (gpa, length, base) in zip(table, regions, strict=True):
        entry.gpa = gpa
        entry.size = length
        entry.base = base
    out = ffi.new("uint64_t[]", lib.GM_VIRTQ_HEADER + 2 * size)
    queue = ffi.new("struct gm_virtq *")
    queue.mode = mode
    queue.size = size
    queue.event_idx = 1 if event_idx else 0
    queue.regions = table
    queue.nregions = len(regions)
    queue.desc_gpa, queue.avail_gpa, queue.used_gpa = rings
    queue.out = out
    return queue, table, out


def access_request(
    mode: int,
    route: int,
    tag: int,
    op: int,
    span_array: Any,
    count: int,
    buf: Any,
    fill: int,
    pool: Any,
) -> Any:
    """A native ``struct gm_access``; keep ``span_array`` alive while it is used."""
    request = ffi.new("struct gm_access *")
    request.mode = mode
    request.route = route
    request.op = op
    request.spans = span_array
    request.nspans = count
    request.buf = buf
    request.fill_byte = fill
    request.logical_tag = tag
    request.pool = pool
    request.vm_fd = -1  # set inside KvmVm.in_use() where CHECKED needs it
    return request


def bounce_pool(buffer_size: int, count: int) -> Any:
    """A pool of ``count`` untagged staging buffers of ``buffer_size`` bytes (BOUNCE route).

    Freed with its last reference.
    """
    sane = 0 < buffer_size < 1 << 40 and 0 < count < 1 << 20
    pool = lib.gm_pool_new(buffer_size, count) if sane else ffi.NULL
    if pool == ffi.NULL:
        raise LengthError("bounce pool: buffer size and count must be positive and sane")
    return ffi.gc(pool, lib.gm_pool_free)


def read_request(
    mode: int, route: int, tag: int | None, pieces: Sequence[tuple[SpanSource, int, int]],
    out: Any, pool: Any,
) -> tuple[int, tuple[Any, ...]]:  # fmt: skip
    """The address of a native ``struct gm_access`` reading ``pieces`` into buffer ``out``.

    With it, what keeps it valid: hold that while native code uses the
    address (the benchmarks' loops reuse one request many times).
    """
    span_array = spans(pieces)
    buf = ffi.from_buffer(out)
    request = access_request(
        mode, route, tag, lib.GM_OP_READ, span_array, len(pieces), buf, 0, pool
    )
    return int(ffi.cast("uintptr_t", request)), (request, span_array, buf)


def entry_address(name: str) -> int:
    """The address of the core's entry point ``name`` (e.g. ``gm_access``), for native loops."""
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))


def hot_region(
    mode: int, base: Any, table: Any, gpa: int, size: int, pool: Any, owner: object
) -> Any:
    """A native ``struct gm_hot`` for one region; it keeps ``owner`` alive as long as it lives.

    ``owner`` must hold what ``base``, ``table`` and ``pool`` point into.
    """
    hot = ffi.new("struct gm_hot *")
    hot.mode = mode
    hot.base = base
    hot.table = table
    hot.gpa = gpa
    hot.size = size
    hot.pool = pool
    return ffi.gc(hot, _holding(owner))


def closed_hot() -> Any:
    """A ``struct gm_hot`` no access fits in (the fast path always misses it)."""
    return ffi.new("struct gm_hot *")


SCRATCH_SIZE = 4096


def scratch() -> tuple[Any, Any]:
    """A ``char[SCRATCH_SIZE]`` to read into, and its buffer: ``buffer[:n]`` is its bytes."""
    buf = ffi.new("char[]", SCRATCH_SIZE)
    return buf, ffi.buffer(buf)


def raise_for(status: int, what: str, span_gpas: Sequence[int] = ()) -> None:
    """Raise the exception for a native status other than GM_OK (none for GM_OK).

    A tag-check failure becomes TagCheckError with the GPA of the first
    mismatching granule: ``span_gpas`` holds the first GPA of each span of
    the request that failed.
    """
    if status == lib.GM_ERR_TAG_CHECK:
        fault = ffi.new("struct gm_fault *")
        lib.gm_last_fault(fault)
        gpa = span_gpas[fault.span] + fault.offset if fault.span < len(span_gpas) else None
        raise TagCheckError(gpa, fault.logical_tag, fault.allocation_tag)
    check(status, what)


def check(status: int, what: str) -> None:
    """Turn a native status other than GM_OK into a typed exception."""
    if status == lib.GM_OK:
        return
    if status == lib.GM_ERR_UNSUPPORTED:
        raise UnsupportedError(f"{what}: not available in this tag mode or on this CPU")
    if status == lib.GM_ERR_RACE:
        raise TagRaceError(f"{what}: the guest kept changing tags under the access")
    code = ffi.errno or _errno.EIO
    raise NativeOSError(code, f"{what}: {os.strerror(code)}")


def _holding(owner: object) -> Any:
    def release(_pointer: Any) -> None:
        del _pointer
        _ = owner

    return release


def pointer_keeping(address: int, owner: object) -> Any:
    """A ``uint8_t *`` at ``address`` that keeps ``owner`` alive as long as it lives.

    Buffers made from it (ffi.buffer, memoryview slices, numpy views) keep
    it, and so the mapping, alive: memory is never unmapped under a view.
    """
    return ffi.gc(ffi.cast("uint8_t *", address), _holding(owner))
