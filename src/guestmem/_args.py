"""Checks shared by every public call: integers, lengths, tags, the GPA space, buffers.

Each raises a GuestMemoryError subclass, so a bad argument never escapes as a
bare TypeError, OverflowError or MemoryError.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from guestmem.errors import (
    AddressError,
    ArgumentTypeError,
    BufferTypeError,
    LengthError,
    TagError,
    UsageError,
)

GPA_LIMIT = 1 << 64  # guest physical addresses are [0, 2**64)


def as_int(value: object, what: str) -> int:
    """``value`` as an int: a Python or numpy integer, never a bool."""
    if type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{what} must be an integer, not {type(value).__name__}")
    return int(value)


def require_length(length: object) -> int:
    """``length`` as a non-negative int (LengthError if negative)."""
    n = as_int(length, "a length")
    if n < 0:
        raise LengthError(f"negative length {n}")
    return n


def require_gpa_range(gpa: object, length: object) -> tuple[int, int]:
    """``(gpa, length)`` as ints inside the GPA space (AddressError if outside)."""
    start, n = as_int(gpa, "a GPA"), require_length(length)
    if start < 0 or start + n > GPA_LIMIT:
        raise AddressError(
            f"[{start:#x}, {start + n:#x}) is outside the GPA space [0, 2**64)",
            gpa=start,
            length=n,
        )
    return start, n


def check_tag(tag: object) -> int:
    """Return ``tag`` as an int if it is an integer 0..15; raise TagError otherwise."""
    if isinstance(tag, bool) or not isinstance(tag, (int, np.integer)) or not 0 <= tag <= 15:
        raise TagError(f"a tag is an integer 0..15, not {tag!r}")
    return int(tag)


def check_byte(byte: object) -> int:
    """Return ``byte`` as an int if it is an integer 0..255; UsageError otherwise."""
    value = as_int(byte, "a fill byte")
    if not 0 <= value <= 255:
        raise UsageError(f"a fill byte is 0..255, not {value}")
    return value


def readable_buffer(data: Any) -> memoryview:
    """``data`` as a flat byte memoryview (BufferTypeError if it is no contiguous buffer)."""
    try:
        view = memoryview(data)
    except TypeError:
        raise BufferTypeError(f"expected a bytes-like object, not {type(data).__name__}") from None
    if not view.c_contiguous:
        raise BufferTypeError("the buffer must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def writable_buffer(buffer: Any) -> memoryview:
    """``buffer`` as a flat, writable byte memoryview (BufferTypeError otherwise)."""
    view = readable_buffer(buffer)
    if view.readonly:
        raise BufferTypeError(f"{type(buffer).__name__} is read-only: cannot receive data")
    return view
