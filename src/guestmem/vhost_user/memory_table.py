"""The frontend's memory table: its regions checked, mapped through guestmem, and translated.

The regions arrive as (guest address, size, user address, mmap offset) with
one fd each. Everything is checked before anything is mapped: sizes, page
alignment, overflow of each address range, overlaps in guest and in user
addresses, and each fd's size (fstat) against offset + size. The mapping is
a :class:`~guestmem.GuestMemory` attached from the fds at their offsets with
the backend's tag mode. Ring addresses come as user addresses and are
translated here (user address -> GPA), a whole ring inside one region.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import guestmem as gm
from guestmem.errors import GuestMemoryError
from guestmem.kinds import TagMode
from guestmem.region import SharedRegion
from guestmem.units import HOST_PAGE
from guestmem.vhost_user.errors import MemoryTableError
from guestmem.vhost_user.payloads import RegionDescription
from guestmem.vhost_user.protocol import MAX_REGIONS

_LIMIT = 1 << 64


@dataclass(frozen=True)
class MemoryTable:
    """The regions of a memory table, their fds (this table's own) and the memory mapped."""

    regions: tuple[RegionDescription, ...]
    fds: tuple[int, ...]
    memory: gm.GuestMemory

    @property
    def end(self) -> int:
        """The first GPA past every region (what a dirty log must cover)."""
        return max(r.gpa + r.size for r in self.regions)

    def user_to_gpa(self, address: int, length: int) -> int | None:
        """The GPA of user range ``[address, address + length)``, None unless one region has it."""
        for r in self.regions:
            if r.user_address <= address and address - r.user_address + length <= r.size:
                return r.gpa + (address - r.user_address)
        return None

    def close(self) -> None:
        """Unmap the regions (once no view of them is left) and close the fds."""
        self.memory.close()
        for fd in self.fds:
            os.close(fd)


def map_table(
    regions: Sequence[RegionDescription],
    fds: Sequence[int],
    tags: TagMode,
    request: int,
    *,
    max_regions: int = MAX_REGIONS,
) -> MemoryTable:
    """Check ``regions`` against ``fds`` (one each) and map them; the fds stay the caller's.

    The table keeps a duplicate of each fd (ADD_MEM_REG maps them again).
    MemoryTableError, with nothing mapped, if any check fails.
    """
    if not 1 <= len(regions) <= max_regions:
        raise MemoryTableError(f"{len(regions)} regions (1 to {max_regions})", request=request)
    if len(fds) != len(regions):
        raise MemoryTableError(f"{len(regions)} regions came with {len(fds)} fds", request=request)
    for i, r in enumerate(regions):
        _check_region(i, r, fds[i], request)
    _check_apart(regions, "guest", lambda r: r.gpa, request)
    _check_apart(regions, "user", lambda r: r.user_address, request)
    shared = [
        SharedRegion(r.gpa, r.size, fd, offset=r.mmap_offset)
        for r, fd in zip(regions, fds, strict=True)
    ]
    try:
        memory = gm.GuestMemory.attach(shared, tags=tags)
    except GuestMemoryError as err:
        raise MemoryTableError(
            f"the memory table cannot be mapped: {err}", request=request
        ) from err
    owned: list[int] = []
    try:
        for fd in fds:
            owned.append(os.dup(fd))
    except OSError as err:
        for fd in owned:
            os.close(fd)
        memory.close()
        raise MemoryTableError(f"the table's fds cannot be kept ({err})", request=request) from err
    return MemoryTable(tuple(regions), tuple(owned), memory)


def _check_region(i: int, r: RegionDescription, fd: int, request: int) -> None:
    where = f"region {i} (guest {r.gpa:#x}, size {r.size:#x})"
    if r.size == 0:
        raise MemoryTableError(f"{where}: empty", request=request)
    for name, base in (("guest", r.gpa), ("user", r.user_address), ("mmap offset", r.mmap_offset)):
        if base + r.size > _LIMIT:
            raise MemoryTableError(
                f"{where}: its {name} range {base:#x} + {r.size:#x} passes 2**64", request=request
            )
    for name, value in (("guest address", r.gpa), ("size", r.size), ("mmap offset", r.mmap_offset)):
        if value % HOST_PAGE:
            raise MemoryTableError(
                f"{where}: its {name} {value:#x} is not a multiple of the host page {HOST_PAGE:#x}",
                request=request,
            )
    try:
        held = os.fstat(fd).st_size
    except OSError as err:
        raise MemoryTableError(
            f"{where}: its fd cannot be examined ({err})", request=request
        ) from err
    if r.mmap_offset + r.size > held:
        raise MemoryTableError(
            f"{where}: offset {r.mmap_offset:#x} + size passes its fd's {held:#x} bytes",
            request=request,
        )


def _check_apart(
    regions: Sequence[RegionDescription],
    space: str,
    base: Callable[[RegionDescription], int],
    request: int,
) -> None:
    ordered = sorted(regions, key=base)
    for a, b in itertools.pairwise(ordered):
        if base(a) + a.size > base(b):
            raise MemoryTableError(
                f"regions overlap in {space} addresses: {base(a):#x} + {a.size:#x} "
                f"runs into {base(b):#x}",
                request=request,
            )
