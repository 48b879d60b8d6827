"""The split virtqueue's native side (gm_virtq.c): the queue struct and its entries."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from guestmem._gm import ffi, lib
from guestmem._native.mapping import holding

VIRTQ_MAX_SIZE: int = lib.GM_VIRTQ_MAX_SIZE
VIRTQ_HEADER: int = lib.GM_VIRTQ_HEADER  # words before the (gpa, len) pairs in the output array


class VirtqError(enum.IntEnum):
    """Why the core stopped a queue (``struct gm_virtq``'s ``error``)."""

    OK = lib.GM_VQ_OK
    NEEDS_RESET = lib.GM_VQ_NEEDS_RESET
    AVAIL_AHEAD = lib.GM_VQ_AVAIL_AHEAD
    HEAD_RANGE = lib.GM_VQ_HEAD_RANGE
    DESC_RANGE = lib.GM_VQ_DESC_RANGE
    CHAIN_LONG = lib.GM_VQ_CHAIN_LONG
    BUFFER_RANGE = lib.GM_VQ_BUFFER_RANGE
    INDIRECT_LEN = lib.GM_VQ_INDIRECT_LEN
    INDIRECT_RANGE = lib.GM_VQ_INDIRECT_RANGE
    INDIRECT_NESTED = lib.GM_VQ_INDIRECT_NESTED
    INDIRECT_NEXT = lib.GM_VQ_INDIRECT_NEXT
    READ_AFTER_WRITE = lib.GM_VQ_READ_AFTER_WRITE
    USED_ID = lib.GM_VQ_USED_ID
    RING_RANGE = lib.GM_VQ_RING_RANGE
    SIZE = lib.GM_VQ_SIZE


# Bound once: the device loop calls them per request.
virtq_pop: Callable[[Any], int] = lib.gm_virtq_pop
"""``gm_virtq_pop(queue)``: descriptors of the next chain (0: none), or a negative status."""
virtq_push: Callable[[Any, int, int], int] = lib.gm_virtq_push
"""``gm_virtq_push(queue, head, written)``: 1 to notify, 0 not, or a negative status."""


def virtq_init(queue: Any) -> int:
    """Check the queue's rings and start it from index 0; a status."""
    return int(lib.gm_virtq_init(queue))


def virtq_reset(queue: Any) -> None:
    """Forget the queue's indices and error."""
    lib.gm_virtq_reset(queue)


def virtqueue(
    space: Any, size: int, event_idx: bool, rings: tuple[int, int, int]
) -> tuple[Any, Any]:
    """A native ``struct gm_virtq`` over a native space, and its output words.

    Keep both results alive while the queue is used (the queue keeps ``space``).
    """
    out = ffi.new("uint64_t[]", VIRTQ_HEADER + 2 * size)
    queue = ffi.new("struct gm_virtq *")
    queue.space = space
    queue.size = size
    queue.event_idx = 1 if event_idx else 0
    queue.desc_gpa, queue.avail_gpa, queue.used_gpa = rings
    queue.out = out
    return holding(queue, space), out


def words(out: Any) -> memoryview:
    """The queue's output words (``uint64_t[]``) as a memoryview of "Q"."""
    return memoryview(ffi.buffer(out)).cast("Q")
