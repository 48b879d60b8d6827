"""One contiguous range of guest RAM, mapped at a guest physical address."""

from __future__ import annotations

import enum
import mmap
from typing import Any

import numpy as np
import numpy.typing as npt

from guestmem._native import ffi, lib, pointer_keeping
from guestmem.errors import AlignmentError, LengthError, NativeOSError, UnsupportedError
from guestmem.kinds import TagMode

PAGE_SIZE = mmap.PAGESIZE
GRANULE = 16


class Backing(enum.Enum):
    """What a region's host memory is."""

    ANONYMOUS = "anonymous"
    MEMFD = "memfd"


class GuestRegion:
    """Guest RAM from ``gpa`` to ``gpa + size``, backed by host memory.

    Made by :meth:`anonymous` or :meth:`memfd`. Its mapping lives as long as
    the region or any view of it: never unmapped under a view.
    """

    def __init__(self, gpa: int, size: int, tag_mode: TagMode, backing: Backing) -> None:
        """Map a new region; prefer :meth:`anonymous` and :meth:`memfd`."""
        _require_page_multiple("gpa", gpa)
        _require_page_multiple("size", size)
        if size <= 0:
            raise LengthError(f"region size must be positive, not {size}")
        self.gpa = gpa
        self.size = size
        self.tag_mode = tag_mode
        self.backing = backing
        self._mapping = _map(size, tag_mode, backing, name=f"guestmem@{gpa:#x}")
        address = int(ffi.cast("uintptr_t", self._mapping.addr))
        self._base = pointer_keeping(address, self._mapping)
        self._bytes = memoryview(ffi.buffer(self._base, size))
        self._table: npt.NDArray[np.uint8] | None = None
        self._table_base: Any = ffi.NULL
        if tag_mode is TagMode.SOFTWARE:
            self._table = np.zeros(size // GRANULE, dtype=np.uint8)
            self._table_base = ffi.from_buffer("uint8_t[]", self._table)

    @classmethod
    def anonymous(cls, gpa: int, size: int, tag_mode: TagMode) -> GuestRegion:
        """A region of private anonymous memory."""
        return cls(gpa, size, tag_mode, Backing.ANONYMOUS)

    @classmethod
    def memfd(cls, gpa: int, size: int, tag_mode: TagMode) -> GuestRegion:
        """A region of memfd memory, whose :attr:`fd` another process can map."""
        return cls(gpa, size, tag_mode, Backing.MEMFD)

    @property
    def end(self) -> int:
        """The first guest physical address after the region."""
        return self.gpa + self.size

    @property
    def fd(self) -> int | None:
        """The memfd behind the region, or None for anonymous memory."""
        fd = int(self._mapping.fd)
        return None if fd < 0 else fd

    @property
    def host_address(self) -> int:
        """The VMM's (untagged) address of the region's first byte."""
        return int(ffi.cast("uintptr_t", self._base))

    def contains(self, gpa: int) -> bool:
        """Whether ``gpa`` lies inside the region."""
        return self.gpa <= gpa < self.end

    def bytes_at(self, offset: int, length: int) -> memoryview:
        """A zero-copy memoryview of ``length`` bytes at ``offset`` (untagged pointer)."""
        return self._bytes[offset : offset + length]

    def tagged_bytes_at(self, offset: int, length: int, tag: int) -> memoryview:
        """Like :meth:`bytes_at`, through a pointer whose bits 59:56 carry ``tag``."""
        address = self.host_address + offset
        if self.tag_mode is TagMode.HARDWARE:
            address |= tag << 56
        pointer = pointer_keeping(address, self._base)
        return memoryview(ffi.buffer(pointer, length))

    def fill_span(self, span: Any, offset: int, length: int) -> None:
        """Describe ``length`` bytes at ``offset`` in a native ``struct gm_span``."""
        span.guest = self._base + offset
        span.table = self._table_base + offset // GRANULE if self._table is not None else ffi.NULL
        span.len = length

    def __repr__(self) -> str:
        """Show where the region is and what backs it."""
        return (
            f"GuestRegion(gpa={self.gpa:#x}, size={self.size:#x}, "
            f"{self.tag_mode.name}, {self.backing.value})"
        )


def _require_page_multiple(name: str, value: int) -> None:
    if value % PAGE_SIZE:
        raise AlignmentError(
            f"{name} {value:#x} is not a multiple of the page size {PAGE_SIZE:#x}",
            value=value,
            alignment=PAGE_SIZE,
        )


def _map(size: int, tag_mode: TagMode, backing: Backing, name: str) -> Any:
    mte = 1 if tag_mode is TagMode.HARDWARE else 0
    if backing is Backing.MEMFD:
        raw = lib.gm_map_memfd(name.encode(), size, mte)
    else:
        raw = lib.gm_map_anonymous(size, mte)
    if raw == ffi.NULL:
        code = ffi.errno
        raise NativeOSError(code, f"mapping {size:#x} bytes of {backing.value} memory failed")
    mapping = ffi.gc(raw, lib.gm_mapping_free)
    if mte and not lib.gm_mapping_keeps_tags(mapping):
        raise UnsupportedError(
            f"{backing.value} mappings do not keep MTE tags on this platform "
            "(QEMU user emulation drops tags on shared mappings)"
        )
    return mapping
