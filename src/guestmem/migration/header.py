"""The stream header: magic, version, geometry, tag mode and region table."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from guestmem._native import lib
from guestmem.errors import StreamError
from guestmem.kinds import TagMode
from guestmem.units import GRANULE, STREAM_PAGE

MAGIC = b"GMSTREAM"
VERSION = 1
MAX_REGIONS = 1024
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
    return int(lib.gm_checksum(data, len(data)))


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
    return StreamHeader(tag_mode, regions, page, granule, version)
