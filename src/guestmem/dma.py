"""Buffers that device models fill or read in place: the DMA access class."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from guestmem.dma_io import DmaIO
from guestmem.dma_mapping import DmaMapping
from guestmem.errors import UnsupportedError
from guestmem.kinds import Direction, Route
from guestmem.mover import Mover

__all__ = ["Direction", "Dma", "DmaMapping"]


class Dma:
    """The DMA face of a GuestMemory (``mem.dma``)."""

    def __init__(self, memory: Mover) -> None:
        """Serve DMA buffers over ``memory`` (a GuestMemory, or any Mover)."""
        self._memory = memory

    @property
    def io(self) -> DmaIO:
        """System-call I/O into and out of guest memory, on routes safe for it."""
        return DmaIO(self._memory)

    @contextmanager
    def map(
        self,
        gpa: int,
        length: int,
        direction: Direction,
        *,
        route: Route | None = None,
        tag: int | None = None,
    ) -> Iterator[memoryview]:
        """Yield one buffer over ``[gpa, gpa + length)`` for device code.

        TCO and UNCHECKED_THREAD give guest memory itself, with checks off for
        this thread for the scope; BOUNCE gives an untagged staging copy
        (filled at entry if the device reads, written back at exit if it
        writes); CHECKED gives memory through a pointer carrying ``tag``.
        MATCH_ALL over several tag runs, or a range over several regions,
        needs :meth:`map_segments`. The buffer is released at exit; a view
        derived from it (a slice, a numpy array) outlives the scope at the
        caller's risk: under BOUNCE it reaches only the staging copy, under
        the direct routes it is a plain, checked access.
        """
        with DmaMapping(self._memory, [(gpa, length)], direction, route, tag) as segments:
            if len(segments) != 1:
                raise UnsupportedError(
                    f"this range is {len(segments)} segments (tag runs or regions): "
                    "use dma.map_segments()"
                )
            yield segments[0]

    def map_segments(
        self,
        gpa: int,
        length: int,
        direction: Direction,
        *,
        route: Route | None = None,
        tag: int | None = None,
    ) -> DmaMapping:
        """Like :meth:`map`, yielding a list of buffers (an iovec).

        Under MATCH_ALL each buffer is one run of equal tags, reached through
        a pointer carrying that tag: checks stay on, and the list can go to
        ``os.readv`` or ``socket.recvmsg_into`` as it is.
        """
        return DmaMapping(self._memory, [(gpa, length)], direction, route, tag)
