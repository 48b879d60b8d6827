"""Buffers that device models fill or read in place: the DMA access class."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

from guestmem._native import check, lib
from guestmem.errors import GuestMemoryError, TagCheckError, UnsupportedError
from guestmem.kinds import Access, Direction, Route, TagMode
from guestmem.region import GRANULE

if TYPE_CHECKING:
    from guestmem.dma_io import DmaIO
    from guestmem.memory import GuestMemory, Piece


class Dma:
    """The DMA face of a GuestMemory (``mem.dma``)."""

    def __init__(self, memory: GuestMemory) -> None:
        """Serve DMA buffers over ``memory``."""
        self._memory = memory

    @property
    def io(self) -> DmaIO:
        """System-call I/O into and out of guest memory, on routes safe for it."""
        from guestmem.dma_io import DmaIO

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


class DmaMapping:
    """A scope that lends device code guest memory as a list of buffers."""

    def __init__(
        self,
        memory: GuestMemory,
        ranges: Sequence[tuple[int, int]],
        direction: Direction,
        route: Route | None,
        tag: int | None,
    ) -> None:
        """Prepare the mapping of ``[(gpa, length), ...]``; nothing is touched yet."""
        self._memory = memory
        self._direction = Direction(direction)
        self.route, self._tag = memory._route(Access.DMA, route, tag)
        self._pieces: list[Piece] = [p for gpa, n in ranges for p in memory.translate(gpa, n)]
        self._segments: list[memoryview] = []
        self._staging: bytearray | None = None
        self._thread: int | None = None

    def __enter__(self) -> list[memoryview]:
        """Open the scope and return its buffers."""
        if self._thread is not None:
            raise GuestMemoryError("a DmaMapping is entered once")
        route = self.route
        if route is Route.BOUNCE:
            self._segments = [self._stage_in()]
        elif route is Route.MATCH_ALL:
            self._segments = self._tag_runs()
        elif route is Route.CHECKED:
            self._segments = self._checked_segments()
        else:
            enter = lib.gm_unchecked_enter if route is Route.TCO else lib.gm_unchecked_thread_enter
            check(enter(), f"{route.name} scope")
            self._segments = [region.bytes_at(offset, n) for region, offset, n in self._pieces]
        self._thread = threading.get_ident()
        return self._segments

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Write back (BOUNCE, device-written), release the buffers, restore the thread."""
        if self._thread != threading.get_ident():
            raise GuestMemoryError("a DMA scope must end on the thread that opened it")
        for segment in self._segments:
            segment.release()
        try:
            if self._direction.copies_out and self.route is not Route.BOUNCE:
                self._mark_dirty()
            if self.route is Route.BOUNCE and self._staging is not None:
                if self._direction.copies_out and exc_type is None:
                    self._memory.writev(self._ranges(), self._staging, route=Route.TCO)
                self._staging = None
            elif self.route in (Route.TCO, Route.UNCHECKED_THREAD):
                leave = (
                    lib.gm_unchecked_exit
                    if self.route is Route.TCO
                    else lib.gm_unchecked_thread_exit
                )
                check(leave(), f"{self.route.name} scope exit")
        finally:
            self._segments = []

    def _mark_dirty(self) -> None:
        if self._memory.dirty.active:
            for gpa, n in self._ranges():
                self._memory.dirty.mark(gpa, n)

    def _ranges(self) -> list[tuple[int, int]]:
        return [(region.gpa + offset, n) for region, offset, n in self._pieces]

    def _stage_in(self) -> memoryview:
        total = sum(n for _, _, n in self._pieces)
        self._staging = bytearray(total)
        if self._direction.copies_in:
            self._memory.readv_into(self._ranges(), self._staging, route=Route.TCO)
        return memoryview(self._staging)

    def _tag_runs(self) -> list[memoryview]:
        if self._memory.tag_mode is TagMode.HARDWARE:
            check(lib.gm_thread_enable_mte(), "enabling the tagged-address ABI")
        segments = []
        for region, offset, n in self._pieces:
            first = offset - offset % GRANULE
            last = -(-(offset + n) // GRANULE) * GRANULE
            tags = self._memory.get_tags(region.gpa + first, last - first)
            starts = np.flatnonzero(np.diff(tags)) + 1
            for run_start, run_end in zip(
                [0, *starts.tolist()], [*starts.tolist(), len(tags)], strict=True
            ):
                lo = max(offset, first + run_start * GRANULE)
                hi = min(offset + n, first + run_end * GRANULE)
                segments.append(region.tagged_bytes_at(lo, hi - lo, int(tags[run_start])))
        return segments

    def _checked_segments(self) -> list[memoryview]:
        if self._memory.tag_mode is TagMode.NONE:
            raise UnsupportedError("TagMode.NONE has no tags to check against")
        if self._memory.tag_mode is TagMode.HARDWARE:
            check(lib.gm_thread_enable_mte(), "enabling the tagged-address ABI")
        segments = []
        for region, offset, n in self._pieces:
            first = offset - offset % GRANULE
            last = -(-(offset + n) // GRANULE) * GRANULE
            tags = self._memory.get_tags(region.gpa + first, last - first)
            wrong = np.flatnonzero(tags != self._tag)
            if wrong.size:
                granule = first + int(wrong[0]) * GRANULE
                raise TagCheckError(
                    region.gpa + max(offset, granule), self._tag, int(tags[wrong[0]])
                )
            segments.append(region.tagged_bytes_at(offset, n, self._tag))
        return segments


__all__ = ["Direction", "Dma", "DmaMapping"]
