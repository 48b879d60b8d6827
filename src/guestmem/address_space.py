"""The guest physical address space: regions at GPAs, and where an access lands.

An :class:`AddressSpace` holds non-overlapping :class:`GuestRegion` objects of
one tag mode, in GPA order. It answers which region holds a GPA and splits a
range into ``(region, offset, length)`` pieces; it moves no data (that is
:mod:`guestmem.mover`'s job) and knows nothing of routes.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence

from guestmem._args import as_int, require_gpa_range
from guestmem.errors import (
    AddressError,
    AlignmentError,
    ArgumentTypeError,
    ClosedError,
    LengthError,
    UsageError,
)
from guestmem.kinds import TagMode
from guestmem.region import GuestRegion
from guestmem.units import GRANULE

Piece = tuple[GuestRegion, int, int]
"""A part of an access inside one region: (region, offset in it, length)."""


class AddressSpace:
    """Non-overlapping regions of one tag mode at guest physical addresses."""

    def __init__(self, regions: Iterable[GuestRegion]) -> None:
        """Check ``regions`` (GuestRegion objects, one tag mode, no overlap) and order them."""
        listed = list(regions)
        if not all(isinstance(r, GuestRegion) for r in listed):
            raise ArgumentTypeError("a GuestMemory is made of GuestRegion objects")
        ordered = sorted(listed, key=lambda r: r.gpa)
        if not ordered:
            raise LengthError("a GuestMemory needs at least one region")
        modes = {r.tag_mode for r in ordered}
        if len(modes) != 1:
            raise UsageError(f"all regions must share one tag mode, not {sorted(modes)}")
        for before, after in itertools.pairwise(ordered):
            if after.gpa < before.end:
                raise AddressError(
                    f"regions overlap at {after.gpa:#x}",
                    gpa=after.gpa,
                    length=before.end - after.gpa,
                )
        # Regions and their starts: one attribute, swapped whole by close().
        self._table: tuple[tuple[GuestRegion, ...], list[int]] = (
            tuple(ordered),
            [r.gpa for r in ordered],
        )
        self._host_ranges = [(r.host_address, r.host_address + r.size) for r in ordered]
        self.tag_mode: TagMode = ordered[0].tag_mode
        self.closed = False
        """Whether :meth:`close` was called (a plain attribute: every virtqueue call reads it)."""

    @property
    def regions(self) -> tuple[GuestRegion, ...]:
        """The regions, in GPA order (ClosedError once closed)."""
        regions = self._table[0]
        if not regions:
            raise ClosedError("this GuestMemory is closed")
        return regions

    def close(self) -> None:
        """Forget the regions: later lookups raise ClosedError."""
        self.closed = True
        self._table = ((), [])

    def require_open(self) -> None:
        """Raise ClosedError once closed."""
        if self.closed:
            raise ClosedError("this GuestMemory is closed")

    def find_region(self, gpa: int) -> GuestRegion:
        """The region holding ``gpa``; AddressError if none does."""
        self.require_open()
        at = as_int(gpa, "a GPA")
        regions, starts = self._table
        i = bisect.bisect_right(starts, at) - 1
        if i >= 0 and regions[i].contains(at):
            return regions[i]
        self.require_open()
        raise AddressError(f"GPA {at:#x} is not in guest memory", gpa=at, length=1)

    def translate(self, gpa: int, length: int) -> list[Piece]:
        """Split ``[gpa, gpa + length)`` into pieces (AddressError if any byte is unmapped)."""
        self.require_open()
        return self.split(*require_gpa_range(gpa, length))

    def split(self, gpa: int, length: int) -> list[Piece]:
        """:meth:`translate` of a range already checked to be ints inside the GPA space."""
        regions, starts = self._table  # one snapshot, whatever close() does meanwhile
        pieces: list[Piece] = []
        at, end = gpa, gpa + length
        while at < end:
            i = bisect.bisect_right(starts, at) - 1
            if i < 0 or not regions[i].contains(at):
                self.require_open()
                raise AddressError(
                    f"[{gpa:#x}, {end:#x}) touches unmapped GPA {at:#x}", gpa=gpa, length=length
                )
            region = regions[i]
            n = min(end, region.end) - at
            pieces.append((region, at - region.gpa, n))
            at += n
        return pieces

    def pieces(self, ranges: Sequence[tuple[int, int]], nbytes: int | None) -> list[Piece]:
        """Translate every range, all of them before anything moves.

        ``nbytes``, when given, must be their total (LengthError otherwise).
        """
        self.require_open()
        pieces: list[Piece] = []
        for gpa, length in range_pairs(ranges):
            pieces.extend(self.split(gpa, length))
        total = sum(n for _, _, n in pieces)
        if nbytes is not None and total != nbytes:
            raise LengthError(f"the ranges hold {total} bytes but the buffer has {nbytes}")
        return pieces

    def granule_pieces(self, gpa: int, length: int) -> tuple[int, int, list[Piece]]:
        """``gpa`` and ``length`` as ints, granule-aligned, and their pieces."""
        self.require_open()
        gpa, length = require_gpa_range(gpa, length)
        for name, value in (("gpa", gpa), ("length", length)):
            if value % GRANULE:
                raise AlignmentError(
                    f"tag {name} {value:#x} is not a multiple of {GRANULE}",
                    value=value,
                    alignment=GRANULE,
                )
        return gpa, length, self.split(gpa, length)

    def holds_host_range(self, address: int, nbytes: int) -> bool:
        """Whether host ``[address, address + nbytes)`` overlaps a region's mapping."""
        return any(address < hi and lo < address + nbytes for lo, hi in self._host_ranges)

    def __repr__(self) -> str:
        """Show the regions."""
        regions = self._table[0]
        return ", ".join(map(repr, regions)) if regions else "closed"


def pairs(items: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``items`` as a list of 2-tuples (ArgumentTypeError if they are not pairs)."""
    try:
        return [(a, b) for a, b in items]
    except (TypeError, ValueError):
        raise ArgumentTypeError("expected (gpa, length) pairs") from None


def range_pairs(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` as a list of ``(gpa, length)`` int pairs inside the GPA space."""
    return [require_gpa_range(gpa, length) for gpa, length in pairs(ranges)]
