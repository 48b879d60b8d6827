"""One contiguous range of guest RAM, mapped at a guest physical address."""

from __future__ import annotations

import enum
import mmap
import os
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from guestmem._args import GPA_LIMIT, as_int
from guestmem._native import (
    NULL,
    address_of,
    byte_pointer,
    bytes_view,
    last_errno,
    map_memory,
    mapping_keeps_tags,
    pointer_keeping,
)
from guestmem.errors import (
    AddressError,
    AlignmentError,
    ArgumentTypeError,
    LengthError,
    NativeOSError,
    SharedTableError,
    UnsupportedError,
    from_os_error,
)
from guestmem.kinds import TagMode
from guestmem.units import GRANULE, HOST_PAGE

PAGE_SIZE = HOST_PAGE  # the name before the units had names


class Backing(enum.Enum):
    """What a region's host memory is."""

    ANONYMOUS = "anonymous"
    MEMFD = "memfd"


@dataclass(frozen=True)
class SharedRegion:
    """A memfd region as another process attaches it: its place and its fds.

    Pass the fds as a child's ``pass_fds`` or over a Unix socket (SCM_RIGHTS).
    ``table_fd`` is the SOFTWARE tag table; HARDWARE tags travel in the memfd.
    ``offset`` is where the region starts in ``fd`` (a multiple of the host
    page): a frontend such as QEMU shares several regions of one memfd.
    """

    gpa: int
    size: int
    fd: int
    table_fd: int | None = None
    offset: int = 0


class GuestRegion:
    """Guest RAM from ``gpa`` to ``gpa + size``, backed by host memory.

    Made by :meth:`anonymous` or :meth:`memfd`. Its mapping lives as long as
    the region or any view of it: never unmapped under a view.
    """

    def __init__(
        self,
        gpa: int,
        size: int,
        tag_mode: TagMode,
        backing: Backing,
        *,
        shared: SharedRegion | None = None,
    ) -> None:
        """Map a region; prefer :meth:`anonymous`, :meth:`memfd` and :meth:`attach`."""
        gpa, size = as_int(gpa, "a region's gpa"), as_int(size, "a region's size")
        if not isinstance(tag_mode, TagMode) or not isinstance(backing, Backing):
            raise ArgumentTypeError("tag_mode must be a TagMode and backing a Backing")
        _require_page_multiple("gpa", gpa)
        _require_page_multiple("size", size)
        if size <= 0:
            raise LengthError(f"region size must be positive, not {size}")
        if gpa < 0 or gpa + size > GPA_LIMIT:
            raise AddressError(
                f"region [{gpa:#x}, {gpa + size:#x}) is outside the GPA space [0, 2**64)",
                gpa=gpa,
                length=size,
            )
        if shared is not None:
            _check_shared(shared, size, tag_mode)
        self.gpa = gpa
        self.size = size
        self.tag_mode = tag_mode
        self.backing = backing
        self._mapping = _map(size, tag_mode, backing, f"guestmem@{gpa:#x}", shared)
        address = address_of(self._mapping.addr)
        self._base = pointer_keeping(address, self._mapping)
        self._bytes = bytes_view(self._base, size)
        self._table: npt.NDArray[np.uint8] | None = None
        self._table_base: Any = NULL
        self._table_fd: int | None = None
        if tag_mode is TagMode.SOFTWARE:
            self._table = self._software_table(shared)
            self._table_base = byte_pointer(self._table)

    @classmethod
    def anonymous(cls, gpa: int, size: int, tag_mode: TagMode) -> GuestRegion:
        """A region of private anonymous memory."""
        return cls(gpa, size, tag_mode, Backing.ANONYMOUS)

    @classmethod
    def memfd(cls, gpa: int, size: int, tag_mode: TagMode) -> GuestRegion:
        """A region of memfd memory, whose :attr:`fd` another process can map."""
        return cls(gpa, size, tag_mode, Backing.MEMFD)

    @classmethod
    def attach(cls, shared: SharedRegion, tag_mode: TagMode) -> GuestRegion:
        """Map a region another process shared (see :meth:`share`): same bytes, same tags."""
        if not isinstance(shared, SharedRegion):
            raise ArgumentTypeError(f"expected a SharedRegion, not {type(shared).__name__}")
        return cls(shared.gpa, shared.size, tag_mode, Backing.MEMFD, shared=shared)

    def share(self) -> SharedRegion:
        """What another process needs to :meth:`attach` this memfd region."""
        fd = self.fd
        if fd is None:
            raise UnsupportedError("only memfd regions can be shared")
        return SharedRegion(self.gpa, self.size, fd, self._table_fd)

    def _software_table(self, shared: SharedRegion | None) -> npt.NDArray[np.uint8]:
        count = self.size // GRANULE
        if self.backing is Backing.ANONYMOUS:
            return np.zeros(count, dtype=np.uint8)
        # A memfd region's tags must be shared with it: the table is a memfd too.
        if shared is not None:
            assert shared.table_fd is not None  # _check_shared made sure
            fd = _os_call("dup of the tag table fd", os.dup, shared.table_fd)
        else:
            fd = _new_table_fd(f"guestmem-tags@{self.gpa:#x}", count)
        self._table_fd = fd
        weakref.finalize(self, os.close, fd)
        self._table_map = mmap.mmap(fd, count)
        return np.frombuffer(self._table_map, dtype=np.uint8)

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
        return address_of(self._base)

    @property
    def base_pointer(self) -> Any:
        """The native ``uint8_t *`` to the mapping's first byte (it keeps the mapping alive)."""
        return self._base

    @property
    def tag_table_pointer(self) -> Any:
        """The native pointer to the SOFTWARE tag table (one byte a granule), else NULL."""
        return self._table_base

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
        return bytes_view(pointer, length)

    def fill_span(self, span: Any, offset: int, length: int) -> None:
        """Describe ``length`` bytes at ``offset`` in a native ``struct gm_span``."""
        span.gpa = self.gpa + offset
        span.guest = self._base + offset
        span.table = self._table_base + offset // GRANULE if self._table is not None else NULL
        span.len = length

    def __repr__(self) -> str:
        """Show where the region is and what backs it."""
        return (
            f"GuestRegion(gpa={self.gpa:#x}, size={self.size:#x}, "
            f"{self.tag_mode.name}, {self.backing.value})"
        )


def _os_call(what: str, call: Any, *args: Any) -> Any:
    """``call(*args)``, an OSError from it raised as NativeOSError."""
    try:
        return call(*args)
    except OSError as err:
        raise from_os_error(err, what) from err


def _new_table_fd(name: str, count: int) -> int:
    fd: int = _os_call("memfd_create for the tag table", os.memfd_create, name, os.MFD_CLOEXEC)
    try:
        _os_call("ftruncate of the tag table", os.ftruncate, fd, count)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fd_size(fd: object, what: str) -> int:
    info = _os_call(f"fstat of {what}", os.fstat, as_int(fd, what))
    return int(info.st_size)


def _check_shared(shared: SharedRegion, size: int, tag_mode: TagMode) -> None:
    """Refuse a shared table its fds cannot back: a smaller memfd would SIGBUS later."""
    offset = as_int(shared.offset, "a region's offset in its fd")
    if offset < 0:
        raise SharedTableError(f"region {shared.gpa:#x}: a negative offset {offset} in its fd")
    _require_page_multiple("offset", offset)
    data = _fd_size(shared.fd, "the region's memfd")
    if data < size or offset > data - size:
        where = f" from offset {offset:#x}" if offset else ""
        raise SharedTableError(
            f"region {shared.gpa:#x} claims {size:#x} bytes{where} but its memfd holds {data:#x}"
        )
    if tag_mode is not TagMode.SOFTWARE:
        return
    if shared.table_fd is None:
        raise SharedTableError("the shared region carries no SOFTWARE tag table")
    table = _fd_size(shared.table_fd, "the tag table fd")
    if table != size // GRANULE:
        raise SharedTableError(
            f"region {shared.gpa:#x}: its tag table holds {table} bytes, "
            f"not one per granule ({size // GRANULE})"
        )


def _require_page_multiple(name: str, value: int) -> None:
    if value % HOST_PAGE:
        raise AlignmentError(
            f"{name} {value:#x} is not a multiple of the host page size {HOST_PAGE:#x}",
            value=value,
            alignment=HOST_PAGE,
        )


def _map(
    size: int, tag_mode: TagMode, backing: Backing, name: str, shared: SharedRegion | None
) -> Any:
    mte = tag_mode is TagMode.HARDWARE
    if shared is not None:
        mapping = map_memory(size, mte, fd=shared.fd, offset=shared.offset)
    elif backing is Backing.MEMFD:
        mapping = map_memory(size, mte, memfd_name=name)
    else:
        mapping = map_memory(size, mte)
    if mapping is None:
        code = last_errno()
        raise NativeOSError(code, f"mapping {size:#x} bytes of {backing.value} memory failed")
    # Probing retags granule 0 for a moment: only on memory no one else uses yet.
    probe = mte and backing is Backing.MEMFD and shared is None
    if probe and not mapping_keeps_tags(mapping):
        raise UnsupportedError(
            f"{backing.value} mappings do not keep MTE tags on this platform "
            "(QEMU user emulation drops tags on shared mappings)"
        )
    return mapping
