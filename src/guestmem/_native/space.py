"""The native space of regions (``struct gm_space``): made once per GuestMemory.

The virtqueue and the stream codec take it; it holds each region's GPA,
size, base and tag table, the tag mode and the KVM VM's fd, and the one GPA
lookup in C (gm_space.c) walks it. The dirty log's bitmaps hang from it
(one bit a page, set atomically), so native writers can mark them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from guestmem._gm import ffi, lib
from guestmem._native.mapping import holding

SpaceEntry = tuple[int, int, Any, Any]
"""One region: ``(gpa, size, base pointer or NULL, tag table pointer or NULL)``."""


def native_space(
    mode: int, regions: Sequence[SpaceEntry], vm_fd: int, page: int, owner: object
) -> Any:
    """A ``struct gm_space *`` over ``regions`` (sorted, apart); it keeps ``owner`` alive.

    ``owner`` must hold what the bases and tables point into. A NULL base
    only validates (decoding a stream applies nothing to it). ``vm_fd`` is
    the KVM VM's fd (-1 without one): use the space only while that VM is
    held open. ``page`` (a power of two) is the dirty log's unit.
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
    space.page_shift = page.bit_length() - 1
    return holding(space, (table, owner))


def region_entries(space: Any, regions: Sequence[Any]) -> dict[Any, Any]:
    """Each of ``regions`` (the space's, in order) -> its ``struct gm_space_region *``.

    Made once: spans and system calls name their region by it. The pointers
    are valid while ``space`` lives.
    """
    return {region: space.regions + index for index, region in enumerate(regions)}


def set_dirty_bits(space: Any, index: int, bits: npt.NDArray[np.uint64] | None) -> None:
    """Point region ``index``'s dirty bitmap at ``bits`` (None: the log is off).

    Keep ``bits`` alive as long as the space lives: a writer that read the
    pointer just before it changed may still mark it.
    """
    space.regions[index].dirty = ffi.NULL if bits is None else ffi.from_buffer("uint64_t[]", bits)


def dirty_mark(space: Any, index: int, offset: int, length: int) -> None:
    """Mark the pages of ``length`` bytes at ``offset`` in region ``index`` dirty."""
    lib.gm_space_mark(space, index, offset, length)


def dirty_mark_pages(space: Any, index: int, pages: npt.NDArray[np.uint64]) -> None:
    """Mark pages (numbered from the region's first) of region ``index`` dirty."""
    pointer = ffi.from_buffer("uint64_t[]", pages)
    lib.gm_space_mark_pages(space, index, pointer, pages.size)


def dirty_take(space: Any, index: int, out: npt.NDArray[np.uint64]) -> None:
    """Move region ``index``'s dirty words into ``out`` and clear them (atomically a word)."""
    pointer = ffi.from_buffer("uint64_t[]", out, require_writable=True)
    lib.gm_space_take(space, index, pointer, out.size)


def set_gpa_log(space: Any, bits: Any, pages: int) -> Any:
    """Have every dirty mark of ``space`` also set its 4 KiB pages' bits in ``bits``.

    ``bits`` is a writable buffer (bit ``i % 8`` of byte ``i // 8`` is the page
    at GPA ``i * 4096``) covering ``pages`` pages; None detaches the log. The
    result keeps the native description alive: hold it (and ``bits``) until no
    writer can still be marking through it.
    """
    if bits is None:
        lib.gm_space_set_gpa_log(space, ffi.NULL)
        return None
    pointer = ffi.from_buffer("uint8_t[]", bits, require_writable=True)
    log = ffi.new("struct gm_gpa_log *")
    log.bits = pointer
    log.pages = pages
    lib.gm_space_set_gpa_log(space, log)
    return (log, pointer)
