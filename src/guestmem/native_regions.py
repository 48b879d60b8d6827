"""The regions as native code walks them, made once per GuestMemory.

One ``struct gm_space`` (each region's GPA, size, base, tag table and dirty
bitmap, the tag mode and the KVM VM's fd), each region's entry in it (spans
name it, so a write through them marks its pages), and each region's
``struct gm_hot`` (the fast path's view of one region).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guestmem._native import closed_hot, hot_region, native_space, region_entries
from guestmem.kinds import TagMode
from guestmem.region import GuestRegion
from guestmem.units import HOST_PAGE

Hot = tuple[int, int, "GuestRegion | None", Any]
"""The fast path's view of one region: (first GPA, end GPA, the region, its ``gm_hot``)."""

CLOSED_HOT: Hot = (1, 0, None, closed_hot())
"""A view nothing fits in (first > end, a gm_hot that always misses): a closed memory's."""


@dataclass(frozen=True)
class NativeRegions:
    """A space of regions, each region's entry in it and each region's gm_hot."""

    space: Any
    entries: dict[GuestRegion, Any]
    hots: dict[GuestRegion, Hot]

    @classmethod
    def of(
        cls, mode: TagMode, regions: Sequence[GuestRegion], vm_fd: int, pool: Any
    ) -> NativeRegions:
        """The native view of ``regions`` (``vm_fd``: the KVM VM's, or -1; ``pool``: BOUNCE's)."""
        entries = [(r.gpa, r.size, r.base_pointer, r.tag_table_pointer) for r in regions]
        space = native_space(mode, entries, vm_fd, HOST_PAGE, regions)
        hots: dict[GuestRegion, Hot] = {}
        for index, r in enumerate(regions):
            hot = hot_region(
                mode, r.base_pointer, r.tag_table_pointer, r.gpa, r.size, pool, space, index, r
            )
            hots[r] = (r.gpa, r.end, r, hot)
        return cls(space, region_entries(space, regions), hots)

    @classmethod
    def empty(cls, mode: TagMode) -> NativeRegions:
        """No region: what a stopped memory holds, so nothing reaches a closed mapping."""
        return cls(native_space(mode, [], -1, HOST_PAGE, None), {}, {})
