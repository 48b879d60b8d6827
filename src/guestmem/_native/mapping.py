"""Host mappings of guest RAM, and native pointers into them that keep them alive."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from guestmem._gm import ffi, lib

NULL: Any = ffi.NULL
"""The native NULL pointer (a region without a tag table, a span that only validates)."""


def map_memory(
    size: int,
    mte: bool,
    *,
    fd: int | None = None,
    memfd_name: str | None = None,
    offset: int = 0,
) -> Any:
    """A ``struct gm_mapping *`` of ``size`` bytes, unmapped with its last reference.

    Of ``fd`` from ``offset`` (a multiple of the host page) when given,
    else of a new memfd named ``memfd_name`` when given, else private
    anonymous memory; PROT_MTE when ``mte``. None on failure
    (``last_errno()`` says why).
    """
    flag = 1 if mte else 0
    if fd is not None:
        raw = lib.gm_map_fd_at(fd, size, flag, offset) if offset else lib.gm_map_fd(fd, size, flag)
    elif memfd_name is not None:
        raw = lib.gm_map_memfd(memfd_name.encode(), size, flag)
    else:
        raw = lib.gm_map_anonymous(size, flag)
    if raw == ffi.NULL:
        return None
    return ffi.gc(raw, lib.gm_mapping_free)


def mapping_keeps_tags(mapping: Any) -> bool:
    """Whether MTE tags stored through ``mapping`` survive (retags granule 0 for a moment)."""
    return bool(lib.gm_mapping_keeps_tags(mapping))


def address_of(pointer: Any) -> int:
    """The address a native pointer holds, as an int."""
    return int(ffi.cast("uintptr_t", pointer))


def _holding(owner: object) -> Any:
    def release(_pointer: Any) -> None:
        del _pointer
        _ = owner

    return release


def holding(pointer: Any, owner: object) -> Any:
    """``pointer``, made to keep ``owner`` alive as long as it lives."""
    return ffi.gc(pointer, _holding(owner))


def pointer_keeping(address: int, owner: object) -> Any:
    """A ``uint8_t *`` at ``address`` that keeps ``owner`` alive as long as it lives.

    Buffers made from it (ffi.buffer, memoryview slices, numpy views) keep
    it, and so the mapping, alive: memory is never unmapped under a view.
    """
    return holding(ffi.cast("uint8_t *", address), owner)


def bytes_view(pointer: Any, length: int) -> memoryview:
    """A zero-copy memoryview of ``length`` bytes at a native pointer (it keeps the pointer)."""
    return memoryview(ffi.buffer(pointer, length))


def byte_pointer(array: npt.NDArray[np.uint8] | bytearray, *, writable: bool = False) -> Any:
    """A ``uint8_t[]`` over a Python buffer, valid while that buffer lives."""
    return ffi.from_buffer("uint8_t[]", array, require_writable=writable)


def word_pointer(array: npt.NDArray[np.uint64]) -> Any:
    """A ``uint64_t[]`` over a contiguous uint64 array, valid while the array lives."""
    return ffi.from_buffer("uint64_t[]", array)


from_buffer = ffi.from_buffer
"""A ``char[]`` over any Python buffer (``require_writable=True`` for a target)."""
