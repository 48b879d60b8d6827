"""The migration stream's native codec (gm_stream.c): encode and decode over a native space."""

from __future__ import annotations

import enum
from typing import Any

from guestmem._gm import ffi, lib

NEED_MORE: int = lib.GM_STREAM_NEED_MORE  # not an error: the record is not all here yet


class RecordKind(enum.IntEnum):
    """A record's type."""

    PAGE = lib.GM_REC_PAGE
    ROUND = lib.GM_REC_ROUND
    END = lib.GM_REC_END


class StreamStatus(enum.IntEnum):
    """Why the decoder refused a stream."""

    BAD_TYPE = lib.GM_STREAM_BAD_TYPE
    BAD_FLAGS = lib.GM_STREAM_BAD_FLAGS
    BAD_CHECKSUM = lib.GM_STREAM_BAD_CHECKSUM
    OUT_OF_REGION = lib.GM_STREAM_OUT_OF_REGION
    TAGS_UNSUPPORTED = lib.GM_STREAM_TAGS_UNSUPPORTED
    TAGS_FROM_UNTAGGED = lib.GM_STREAM_TAGS_FROM_UNTAGGED


def checksum(data: bytes) -> int:
    """The stream's 64-bit checksum of ``data``."""
    return int(lib.gm_checksum(data, len(data)))


def stream_encode(
    space: Any, index: int, pages: Any, count: int, out: Any, room: int
) -> tuple[int, int, int]:
    """Encode up to ``count`` page frames of the space's region ``index`` into ``out``.

    ``out`` has ``room`` bytes.

    ``(status, pages done, bytes written)``.
    """
    done = ffi.new("size_t *")
    written = ffi.new("size_t *")
    status = int(lib.gm_stream_encode(space, index, pages, count, out, room, done, written))
    return status, int(done[0]), int(written[0])


class Decoder:
    """Applies records to a native space; its output cells are made once."""

    def __init__(self, space: Any, tagged: bool) -> None:
        """Decode into ``space`` (NULL bases: validate only); ``tagged``: the source had tags."""
        self._space = space
        self._tagged = int(tagged)
        self._pages = ffi.new("uint64_t *")
        self._kind = ffi.new("int *")
        self._value = ffi.new("uint64_t *")
        self._consumed = ffi.new("size_t *")

    def decode(self, buffer: bytearray, have: int) -> tuple[int, int]:
        """Apply whole records from the first ``have`` bytes of ``buffer``: (status, consumed).

        The status is GM_OK at a control record (see :attr:`kind`, :attr:`value`),
        NEED_MORE, or a negative StreamStatus.
        """
        status = lib.gm_stream_decode(
            self._space,
            self._tagged,
            ffi.from_buffer(buffer),
            have,
            self._consumed,
            self._pages,
            self._kind,
            self._value,
        )
        return int(status), int(self._consumed[0])

    @property
    def pages(self) -> int:
        """Pages applied so far."""
        return int(self._pages[0])

    @property
    def kind(self) -> int:
        """The control record's type at the last GM_OK."""
        return int(self._kind[0])

    @property
    def value(self) -> int:
        """The control record's counter at the last GM_OK."""
        return int(self._value[0])
