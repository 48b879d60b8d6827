"""The split virtqueue of virtio 1.x over guest memory: the device's half.

The ring walk is native (csrc/gm_virtq.c): :meth:`SplitQueue.pop` is one
call that follows a whole descriptor chain, :meth:`SplitQueue.push` one call
that publishes a used element and says whether to notify the driver. Ring
memory is read and written so that it never faults, whatever tags the guest
put on it. A popped chain's buffers are guest ranges (GPAs); move their data
with :func:`chain_read` and :func:`chain_write`, or with ``mem.dma`` (maps and
system-call I/O) on any route.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from guestmem._args import GPA_LIMIT, as_int
from guestmem._native import (
    ERR_VIRTQ,
    OK,
    VIRTQ_HEADER,
    VIRTQ_MAX_SIZE,
    VirtqError,
    virtq_init,
    virtq_pop,
    virtq_push,
    virtq_reset,
    virtqueue,
    words,
)
from guestmem.errors import (
    BufferTypeError,
    ClosedError,
    LengthError,
    UsageError,
    VirtqueueError,
)
from guestmem.kinds import Access
from guestmem.mover import Mover

__all__ = ["MAX_QUEUE_SIZE", "DescriptorChain", "SplitQueue", "chain_read", "chain_write"]

MAX_QUEUE_SIZE: int = VIRTQ_MAX_SIZE
Ranges = tuple[tuple[int, int], ...]

_OK: int = OK
_HEADER: int = VIRTQ_HEADER
_RING_NAMES = ("descriptor table", "available ring", "used ring")
# What each native gm_virtq_error means: (reason, message with {index} and {gpa}).
_REASONS: dict[int, tuple[str, str]] = {
    VirtqError.NEEDS_RESET: ("needs_reset", "the queue needs a reset"),
    VirtqError.AVAIL_AHEAD: (
        "avail_ahead",
        "avail idx {index} runs more than the queue size ahead of the last one seen",
    ),
    VirtqError.HEAD_RANGE: ("head_range", "avail ring entry {index} at {gpa} is not < the size"),
    VirtqError.DESC_RANGE: (
        "desc_range",
        "descriptor index {index} is outside its table (at {gpa})",
    ),
    VirtqError.CHAIN_LONG: (
        "chain_too_long",
        "the chain runs past the queue size at descriptor {index} ({gpa}): a loop?",
    ),
    VirtqError.BUFFER_RANGE: (
        "buffer_range",
        "descriptor {index}: its buffer at {gpa} is not inside guest RAM",
    ),
    VirtqError.INDIRECT_LEN: (
        "indirect_length",
        "descriptor {index}: an indirect table at {gpa} must be a non-zero multiple of 16 bytes",
    ),
    VirtqError.INDIRECT_RANGE: (
        "indirect_range",
        "descriptor {index}: its indirect table at {gpa} is not inside one region of guest RAM",
    ),
    VirtqError.INDIRECT_NESTED: (
        "indirect_nested",
        "descriptor {index} at {gpa}: INDIRECT inside an indirect table",
    ),
    VirtqError.INDIRECT_NEXT: (
        "indirect_next",
        "descriptor {index} at {gpa}: INDIRECT together with NEXT",
    ),
    VirtqError.READ_AFTER_WRITE: (
        "read_after_write",
        "descriptor {index} at {gpa}: a device-readable buffer after a writable one",
    ),
    VirtqError.RING_RANGE: (
        "ring_range",
        "the {ring} at {gpa} is misaligned or not inside one region of guest RAM",
    ),
    VirtqError.SIZE: ("size", "queue size {index} is not a power of two in 1..32768"),
}


@dataclass(frozen=True)
class DescriptorChain:
    """One request popped from the available ring.

    ``readable`` are the buffers the device reads (driver to device),
    ``writable`` those it writes, each ``(gpa, length)`` in chain order.
    """

    head: int
    readable: Ranges
    writable: Ranges
    readable_len: int
    writable_len: int


# A frozen dataclass's __init__ sets each field through object.__setattr__;
# pop() fills the instance's __dict__ in one go (half the cost per chain).
_new_chain = object.__new__
_set_fields = object.__setattr__


class SplitQueue:
    """The device side of one split virtqueue whose rings live in ``mem``.

    ``desc_gpa``, ``avail_gpa`` and ``used_gpa`` are where the driver put
    the descriptor table (16-byte aligned), the available ring (2) and the
    used ring (4); each must lie inside one region. ``event_idx`` is
    VIRTIO_F_EVENT_IDX as negotiated. A malformed ring raises
    :class:`VirtqueueError` and leaves the queue in :attr:`needs_reset`.
    One thread at a time serves a queue, as one device does.
    """

    def __init__(
        self,
        mem: Mover,
        size: int,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        *,
        event_idx: bool = False,
    ) -> None:
        """Check the queue's size and rings and start from index 0."""
        if not isinstance(mem, Mover):
            raise UsageError(f"expected a GuestMemory, not {type(mem).__name__}")
        n = as_int(size, "a queue size")
        rings = (
            as_int(desc_gpa, "a GPA"),
            as_int(avail_gpa, "a GPA"),
            as_int(used_gpa, "a GPA"),
        )
        if not 0 < n <= MAX_QUEUE_SIZE or n & (n - 1):
            raise _error(VirtqError.SIZE, n, None)
        for i, gpa in enumerate(rings):
            if not 0 <= gpa < GPA_LIMIT:
                raise _error(VirtqError.RING_RANGE, i, gpa)
        self._space = mem.address_space
        # The native space keeps the regions' mappings alive while the queue lives.
        self._q, self._out = virtqueue(mem.native_space, n, bool(event_idx), rings)
        self.size = n
        self.event_idx = bool(event_idx)
        self._failure: VirtqueueError | None = None
        if virtq_init(self._q) != _OK:
            raise self._fail()
        self._pop = virtq_pop
        self._push = virtq_push
        self._words = words(self._out)
        self._formats: dict[int, Any] = {}

    @property
    def needs_reset(self) -> bool:
        """Whether a malformed ring stopped the queue (until :meth:`reset`)."""
        return self._failure is not None

    @property
    def last_avail_idx(self) -> int:
        """The free-running index of the next available entry to pop."""
        return int(self._q.last_avail)

    @property
    def used_idx(self) -> int:
        """The free-running index of the next used entry to publish."""
        return int(self._q.used_idx)

    def set_indices(self, last_avail_idx: int, used_idx: int) -> None:
        """Continue from these free-running 16-bit indices (a restored or migrated device)."""
        values = (as_int(last_avail_idx, "an index"), as_int(used_idx, "an index"))
        if not all(0 <= v <= 0xFFFF for v in values):
            raise UsageError(f"virtqueue indices are 16-bit, not {values}")
        self._q.last_avail, self._q.used_idx = values

    def reset(self) -> None:
        """Forget the indices and any error, as a device reset does."""
        virtq_reset(self._q)
        self._failure = None

    def pop(self) -> DescriptorChain | None:
        """The next available descriptor chain, or None if the ring is empty."""
        if self._space.closed:
            raise ClosedError("this GuestMemory is closed")
        count = self._pop(self._q)  # with EVENT_IDX it marks the used ring dirty itself
        if count <= 0:
            if count == 0:
                return None
            raise self._fail()
        unpack = self._formats.get(count)
        if unpack is None:
            unpack = self._formats[count] = struct.Struct(f"={_HEADER + 2 * count}Q").unpack_from
        words = unpack(self._words)
        flat = iter(words[_HEADER:])
        pairs = tuple(zip(flat, flat))  # noqa: B905 (one iterator twice: (gpa, len) pairs)
        nread = words[1]
        readable, writable = pairs[:nread], pairs[nread:]
        chain = _new_chain(DescriptorChain)
        _set_fields(
            chain,
            "__dict__",
            {
                "head": words[0],
                "readable": readable,
                "writable": writable,
                "readable_len": words[2],
                "writable_len": words[3],
            },
        )
        return chain

    def push(self, head: int, written: int) -> bool:
        """Return chain ``head`` with ``written`` bytes written; whether to notify the driver."""
        if self._space.closed:
            raise ClosedError("this GuestMemory is closed")
        if type(head) is not int or type(written) is not int:
            head, written = as_int(head, "a descriptor index"), as_int(written, "a length")
        if not 0 <= written < 1 << 32 or head < 0:
            raise LengthError(f"used element ({head}, {written}) does not fit the used ring")
        status = self._push(self._q, head, written) if head < 1 << 32 else ERR_VIRTQ
        if status >= 0:  # the core marked the used ring dirty
            notify: bool = status == 1
            return notify
        if self._failure is None and self._q.error == VirtqError.OK:
            raise UsageError(f"head {head} is not a descriptor index of a {self.size}-entry queue")
        raise self._fail()

    def _fail(self) -> VirtqueueError:
        """The error the queue just reported, or, once it needs a reset, that it does."""
        if self._failure is not None:
            return VirtqueueError(
                f"virtqueue needs a reset (after: {self._failure})",
                reason="needs_reset",
                index=self._failure.index,
                gpa=self._failure.gpa,
            )
        q = self._q
        error = _error(q.error, q.error_index, q.error_gpa)
        self._failure = error
        return error

    def __repr__(self) -> str:
        """Show the size, the indices and the state."""
        state = "needs reset" if self.needs_reset else "running"
        return (
            f"SplitQueue(size={self.size}, last_avail={self.last_avail_idx}, "
            f"used={self.used_idx}, {state})"
        )


def _error(code: int, index: int, gpa: int | None) -> VirtqueueError:
    reason, text = _REASONS.get(code, ("unknown", "malformed virtqueue (error {index})"))
    ring = _RING_NAMES[index] if code == VirtqError.RING_RANGE and index < 3 else ""
    where = "?" if gpa is None else f"GPA {gpa:#x}"
    message = text.format(index=index, gpa=where, ring=ring)
    return VirtqueueError(f"virtqueue: {message}", reason=reason, index=index, gpa=gpa)


def chain_read(mem: Mover, chain: DescriptorChain, *, access: Access = Access.DMA) -> bytes:
    """The bytes of the chain's readable buffers, gathered in order (one native call)."""
    if not chain.readable:
        return b""
    return mem.readv(list(chain.readable), access=access)


def chain_write(
    mem: Mover, chain: DescriptorChain, data: Any, *, access: Access = Access.DMA
) -> int:
    """Scatter ``data`` over the chain's writable buffers from the first; return its size.

    ``data`` may be shorter than the buffers (the rest stays as it was), not
    longer (LengthError).
    """
    try:
        size = memoryview(data).nbytes
    except TypeError:
        raise BufferTypeError(f"expected a bytes-like object, not {type(data).__name__}") from None
    if size > chain.writable_len:
        raise LengthError(f"{size} bytes do not fit the chain's {chain.writable_len}")
    ranges = []
    left = size
    for gpa, n in chain.writable:
        if left == 0:
            break
        take = min(n, left)
        ranges.append((gpa, take))
        left -= take
    if ranges:
        mem.writev(ranges, data, access=access)
    return size
