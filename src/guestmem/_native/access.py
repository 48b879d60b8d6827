"""Access requests: the native descriptions of guest ranges and the calls that move data.

Spans, access requests, the per-region fast-path struct (``gm_hot``), the
bounce pool, and the entry points that copy, fill, tag and do system-call
I/O over them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from guestmem._gm import ffi, lib
from guestmem._native.mapping import holding
from guestmem.errors import LengthError

OP_READ: int = lib.GM_OP_READ
OP_WRITE: int = lib.GM_OP_WRITE
OP_FILL: int = lib.GM_OP_FILL
OP_STAGE: int = lib.GM_OP_STAGE  # flag: the caller's buffer is tagged guest memory
IO_INTO_GUEST: int = lib.GM_IO_INTO_GUEST
IO_FROM_GUEST: int = lib.GM_IO_FROM_GUEST
IO_MAX_IOV: int = lib.GM_IO_MAX_IOV

# The fast path's entries, bound once: (hot, route, gpa, len, buf or byte) -> status.
hot_read: Callable[[Any, int, int, int, Any], int] = lib.gm_hot_read
hot_write: Callable[[Any, int, int, int, Any], int] = lib.gm_hot_write
hot_fill: Callable[[Any, int, int, int, int], int] = lib.gm_hot_fill
run_access: Callable[[Any], int] = lib.gm_access
"""``gm_access(request)``: carry out a request from :func:`access_request`; a status."""
hot_move: Callable[[Any, int, int, int, int, Any, int, int, int], int] = lib.gm_hot_move
"""``gm_hot_move(hot, route, op, gpa, len, buf, fill, tag, vm_fd)``: one range of a
``gm_hot``'s region with every argument; a status (a write or fill marks its pages)."""


class SpanSource(Protocol):
    """Anything that can describe a range of itself as a native span (a GuestRegion)."""

    def fill_span(self, span: Any, offset: int, length: int) -> None:
        """Describe ``length`` bytes at ``offset`` in ``span``."""
        ...


def spans(
    pieces: Sequence[tuple[SpanSource, int, int]], entries: Mapping[Any, Any] | None = None
) -> Any:
    """A native ``struct gm_span[]`` for ``(region, offset, length)`` pieces.

    With each region's ``entries`` in a native space (see
    :func:`~guestmem._native.space.region_entries`), each span names its
    region's (a write or fill through the space then marks its pages).
    """
    out = ffi.new("struct gm_span[]", len(pieces))
    for span, (region, offset, n) in zip(out, pieces, strict=True):
        region.fill_span(span, offset, n)
        entry = None if entries is None else entries.get(region)
        if entry is not None:
            span.region = entry
    return out


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
    space: Any = None,
) -> Any:
    """A native ``struct gm_access``; keep ``span_array`` (and ``space``) alive while it is used.

    With the native ``space`` its spans name, a write or fill marks their
    pages dirty.
    """
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
    if space is not None:
        request.space = space
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
    mode: int, route: int, tag: int, pieces: Sequence[tuple[SpanSource, int, int]],
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
    mode: int, base: Any, table: Any, gpa: int, size: int, pool: Any, space: Any, index: int,
    owner: object,
) -> Any:  # fmt: skip
    """A native ``struct gm_hot`` for one region; it keeps ``owner`` alive as long as it lives.

    ``owner`` must hold what ``base``, ``table`` and ``pool`` point into, and
    ``space``: the region is its entry ``index``, whose dirty bits a write or
    fill through the gm_hot marks.
    """
    hot = ffi.new("struct gm_hot *")
    hot.space = space
    hot.region = space.regions + index
    hot.mode = mode
    hot.base = base
    hot.table = table
    hot.gpa = gpa
    hot.size = size
    hot.pool = pool
    return holding(hot, (owner, space))


def closed_hot() -> Any:
    """A ``struct gm_hot`` no access fits in (the fast path always misses it)."""
    return ffi.new("struct gm_hot *")


SCRATCH_SIZE = 4096


def scratch() -> tuple[Any, Any]:
    """A ``char[SCRATCH_SIZE]`` to read into, and its buffer: ``buffer[:n]`` is its bytes."""
    buf = ffi.new("char[]", SCRATCH_SIZE)
    return buf, ffi.buffer(buf)


def space_tags_get(space: Any, gpa: int, out: npt.NDArray[np.uint8]) -> int:
    """The tags of ``out.size`` granules from ``gpa`` (inside one region of ``space``)."""
    dest = ffi.from_buffer("uint8_t[]", out, require_writable=True)
    return int(lib.gm_space_tags_get(space, gpa, out.size, dest))


def space_tags_set(space: Any, gpa: int, granules: int, tags: npt.NDArray[np.uint8] | int) -> int:
    """Set ``granules`` tags from ``gpa`` (one region of ``space``); mark their pages.

    ``tags``: one a granule, or one for all.
    """
    if isinstance(tags, int):
        return int(lib.gm_space_tags_set(space, gpa, granules, ffi.NULL, tags))
    return int(lib.gm_space_tags_set(space, gpa, granules, ffi.from_buffer("uint8_t[]", tags), 0))


def io_span(
    fd: int, way: int, space: Any, route: int, entry: Any, guest: Any, gpa: int,
    length: int, offset: int,
) -> int:  # fmt: skip
    """One readv/writev (preadv/pwritev at ``offset`` >= 0) over one range: bytes, or a status.

    The range lies in the region whose ``entry`` in the native ``space`` is
    given (None: nothing is marked); what the kernel wrote there is marked dirty.
    """
    region = ffi.NULL if entry is None else entry
    return int(lib.gm_io_span(fd, way, space, route, region, guest, gpa, length, offset))


def io_spans(
    fd: int, way: int, space: Any, route: int, span_array: Any, count: int, offset: int
) -> int:
    """Like :func:`io_span`, over ``count`` spans of a span array made with ``space``."""
    return int(lib.gm_io(fd, way, space, route, span_array, count, offset))
