"""The scope that lends device code guest memory as a list of buffers."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from types import TracebackType

import numpy as np
import numpy.typing as npt

from guestmem._native import (
    OP_READ,
    OP_WRITE,
    enable_mte,
    from_buffer,
    unchecked_enter,
    unchecked_exit,
    unchecked_thread_enter,
    unchecked_thread_exit,
)
from guestmem.address_space import Piece
from guestmem.errors import ArgumentTypeError, TagCheckError, UnsupportedError, UsageError
from guestmem.kinds import Access, Direction, Lending, Route, TagMode
from guestmem.mover import Mover
from guestmem.plan import Plan
from guestmem.region import GuestRegion
from guestmem.tags import read_tags
from guestmem.units import GRANULE

# Guest memory <-> a staging copy (BOUNCE scopes, dma.io's BOUNCE): the
# library's own copy of pieces already checked, never a system call.
STAGE_PLAN = Plan(Route.TCO)


class DmaMapping:
    """A scope that lends device code guest memory as a list of buffers."""

    def __init__(
        self,
        memory: Mover,
        ranges: Sequence[tuple[int, int]],
        direction: Direction,
        route: Route | None,
        tag: int | None,
    ) -> None:
        """Prepare the mapping of ``[(gpa, length), ...]``; nothing is touched yet."""
        self._memory = memory
        if not isinstance(direction, Direction):
            raise ArgumentTypeError(f"direction must be a Direction, not {direction!r}")
        self._direction = direction
        self.plan = memory.plan_for(Access.DMA, route, tag)
        self._pieces: list[Piece] = memory.pieces_of(ranges, None)
        self._segments: list[memoryview] = []
        self._staging: bytearray | None = None
        self._thread: int | None = None
        self._entered = False

    def __enter__(self) -> list[memoryview]:
        """Open the scope and return its buffers."""
        if self._entered:
            raise UsageError("a DmaMapping is entered once")
        self._entered = True
        lending = self.plan.route.lending
        if lending is Lending.STAGING:
            self._segments = [self._stage_in()]
        elif lending is Lending.TAG_RUNS:
            self._segments = self._tag_runs()
        elif lending is Lending.TAGGED:
            self._segments = self._checked_segments()
        else:
            enter = unchecked_enter if lending is Lending.TCO_SCOPE else unchecked_thread_enter
            enter(f"{self.plan.route.name} scope")
            self._segments = [region.bytes_at(offset, n) for region, offset, n in self._pieces]
        self._thread = threading.get_ident()
        return self._segments

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Restore the thread, release the buffers, write back (BOUNCE, device-written).

        The thread's TCO and check mode come back first, whatever happens
        after (a closed memory, a failing write-back): no exit path leaves
        the thread unchecked.
        """
        if self._thread is None:
            raise UsageError("this DmaMapping was not entered")
        if self._thread != threading.get_ident():
            raise UsageError("a DMA scope must end on the thread that opened it")
        self._thread = None
        try:
            self._restore_thread()
        finally:
            segments, self._segments = self._segments, []
            staging, self._staging = self._staging, None
            for segment in segments:
                with contextlib.suppress(BufferError):  # a derived view still exports it
                    segment.release()
        if self.plan.route.lending is Lending.STAGING:
            if staging is not None and self._direction.copies_out and exc_type is None:
                self._memory.move(STAGE_PLAN, OP_WRITE, self._pieces, from_buffer(staging))
        elif self._direction.copies_out:
            self._memory.mark_written(self._pieces)  # device code wrote guest memory itself

    def _restore_thread(self) -> None:
        lending = self.plan.route.lending
        if lending is Lending.TCO_SCOPE:
            unchecked_exit("TCO scope exit")
        elif lending is Lending.UNCHECKED_SCOPE:
            unchecked_thread_exit("UNCHECKED_THREAD scope exit")

    @property
    def route(self) -> Route:
        """The route this scope lends memory under."""
        return self.plan.route

    def _stage_in(self) -> memoryview:
        total = sum(n for _, _, n in self._pieces)
        self._staging = bytearray(total)
        if self._direction.copies_in:
            self._memory.move(STAGE_PLAN, OP_READ, self._pieces, from_buffer(self._staging))
        return memoryview(self._staging)

    def _piece_tags(self) -> Iterator[tuple[GuestRegion, int, int, int, npt.NDArray[np.uint8]]]:
        """Each piece with its first whole granule's offset and the tags of its granules."""
        memory = self._memory
        if memory.tag_mode is TagMode.HARDWARE:
            enable_mte()
        for region, offset, n in self._pieces:
            first = offset - offset % GRANULE
            last = -(-(offset + n) // GRANULE) * GRANULE
            tags = read_tags(memory, region.gpa + first, last - first)
            yield region, offset, n, first, tags

    def _tag_runs(self) -> list[memoryview]:
        segments = []
        for region, offset, n, first, tags in self._piece_tags():
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
        segments = []
        for region, offset, n, first, tags in self._piece_tags():
            wrong = np.flatnonzero(tags != self.plan.tag)
            if wrong.size:
                granule = first + int(wrong[0]) * GRANULE
                raise TagCheckError(
                    region.gpa + max(offset, granule), self.plan.tag, int(tags[wrong[0]])
                )
            segments.append(region.tagged_bytes_at(offset, n, self.plan.tag))
        return segments
