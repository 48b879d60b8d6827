"""The stream header: magic, version, geometry, tag mode and region table."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from guestmem._native import checksum as native_checksum
from guestmem.errors import StreamError
from guestmem.kinds import TagMode
from guestmem.units import GRANULE, STREAM_PAGE

MAGIC = b"GMSTREAM"
VERSION = 1
MAX_REGIONS = 1024
ZERO_PAGE_RECORD = 16  # head and checksum: the smallest page record
CONTROL_RECORD = 16  # a round or end record
_FIXED = struct.Struct("<8sHHIIB3sI")  # magic version flags page granule mode reserved count
_REGION = struct.Struct("<QQ")
_SUM = struct.Struct("<Q")


@dataclass(frozen=True)
class StreamHeader:
    """What a stream declares before its first page."""

    tag_mode: TagMode
    regions: tuple[tuple[int, int], ...]  # (gpa, size)
    page_size: int = STREAM_PAGE
    granule_size: int = GRANULE
    version: int = VERSION

    def encode(self) -> bytes:
        """The header's bytes, checksum included."""
        body = _FIXED.pack(
            MAGIC,
            self.version,
            0,
            self.page_size,
            self.granule_size,
            int(self.tag_mode),
            b"\0\0\0",
            len(self.regions),
        ) + b"".join(_REGION.pack(gpa, size) for gpa, size in self.regions)
        return body + _SUM.pack(checksum(body))

    @property
    def size(self) -> int:
        """How many bytes :meth:`encode` gives."""
        return _FIXED.size + _REGION.size * len(self.regions) + _SUM.size


def checksum(data: bytes) -> int:
    """The stream's 64-bit checksum of ``data`` (the native core's)."""
    return native_checksum(data)


ReadExactly = Callable[[int], bytes]


def read_header(read_exactly: ReadExactly) -> StreamHeader:
    """Read and verify a header; StreamError says what is wrong and where."""
    fixed = read_exactly(_FIXED.size)
    magic, version, flags, page, granule, mode, reserved, count = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise StreamError(0, f"bad magic {magic!r}: not a guestmem stream")
    if version != VERSION:
        raise StreamError(8, f"version {version} is not supported (only {VERSION})")
    if flags != 0 or reserved != b"\0\0\0":
        raise StreamError(10, "reserved header fields are not zero")
    if page != STREAM_PAGE:
        raise StreamError(12, f"stream page size {page} is not {STREAM_PAGE}")
    if granule != GRANULE:
        raise StreamError(16, f"granule size {granule} is not {GRANULE}")
    try:
        tag_mode = TagMode(mode)
    except ValueError:
        raise StreamError(20, f"unknown tag mode {mode}") from None
    if not 0 < count <= MAX_REGIONS:
        raise StreamError(24, f"absurd region count {count}")
    table = read_exactly(_REGION.size * count)
    regions = tuple(_REGION.iter_unpack(table))
    (stated,) = _SUM.unpack(read_exactly(_SUM.size))
    if stated != checksum(fixed + table):
        raise StreamError(_FIXED.size + len(table), "header checksum mismatch")
    _check_regions(regions)
    return StreamHeader(tag_mode, regions, page, granule, version)


def _check_regions(regions: tuple[tuple[int, int], ...]) -> None:
    """Each region whole stream pages, non-empty, below 2**64, in order, apart."""
    end = 0
    for index, (gpa, size) in enumerate(regions):
        at = _FIXED.size + _REGION.size * index
        if size == 0:
            raise StreamError(at, f"region {index} is empty")
        if gpa % STREAM_PAGE or size % STREAM_PAGE:
            raise StreamError(at, f"region {index} ({gpa:#x}+{size:#x}) is not whole pages")
        if gpa + size > 1 << 64:
            raise StreamError(at, f"region {index} ({gpa:#x}+{size:#x}) wraps past 2**64")
        if gpa < end:
            raise StreamError(
                at, f"region {index} at {gpa:#x} overlaps or precedes region {index - 1}"
            )
        end = gpa + size


def check_claims(header: StreamHeader, stream_bytes: int | None, max_memory: int) -> None:
    """Refuse a header whose regions a target should not map.

    ``stream_bytes`` is the whole stream's size where it is known (a file):
    a complete stream sends every page at least once, at least 16 bytes
    each, so a short stream cannot honestly claim more. ``max_memory`` is
    the most guest memory the caller agrees to map.
    """
    memory = sum(size for _, size in header.regions)
    if memory > max_memory:
        raise StreamError(
            28, f"the header claims {memory} bytes of guest memory, over the limit of {max_memory}"
        )
    least = header.size + ZERO_PAGE_RECORD * (memory // STREAM_PAGE) + CONTROL_RECORD
    if stream_bytes is not None and stream_bytes < least:
        raise StreamError(
            28,
            f"the header claims {memory} bytes of guest memory, which takes at least "
            f"{least} stream bytes; the stream has {stream_bytes}",
        )
