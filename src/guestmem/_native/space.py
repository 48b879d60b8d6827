"""The native space of regions (``struct gm_space``): made once per GuestMemory.

The virtqueue and the stream codec take it; it holds each region's GPA,
size, base and tag table, the tag mode and the KVM VM's fd, and the one GPA
lookup in C (gm_space.c) walks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from guestmem._gm import ffi
from guestmem._native.mapping import holding

SpaceEntry = tuple[int, int, Any, Any]
"""One region: ``(gpa, size, base pointer or NULL, tag table pointer or NULL)``."""


def native_space(mode: int, regions: Sequence[SpaceEntry], vm_fd: int, owner: object) -> Any:
    """A ``struct gm_space *`` over ``regions`` (sorted, apart); it keeps ``owner`` alive.

    ``owner`` must hold what the bases and tables point into. A NULL base
    only validates (decoding a stream applies nothing to it). ``vm_fd`` is
    the KVM VM's fd (-1 without one): use the space only while that VM is
    held open.
    """
    table = ffi.new("struct gm_space_region[]", len(regions))
    for entry, (gpa, size, base, tags) in zip(table, regions, strict=True):
        entry.gpa = gpa
        entry.size = size
        entry.base = base
        entry.table = tags
    space = ffi.new("struct gm_space *")
    space.mode = mode
    space.vm_fd = vm_fd
    space.regions = table
    space.nregions = len(regions)
    return holding(space, (table, owner))
