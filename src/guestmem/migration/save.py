"""Save and restore a whole GuestMemory, data and tags, through the MIGRATION class."""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO

from guestmem.errors import StreamError
from guestmem.migration.header import StreamHeader, checksum, read_header
from guestmem.migration.stream import Sink, Source, StreamReader, StreamWriter, Totals
from guestmem.units import STREAM_PAGE

PAGE_RECORD, ROUND_RECORD, END_RECORD = 1, 2, 3

if TYPE_CHECKING:
    from guestmem.memory import GuestMemory


def save(memory: GuestMemory, sink: Sink) -> Totals:
    """Write every page of ``memory`` (data and tags) to a binary file or socket."""
    writer = StreamWriter(memory, sink)
    writer.header()
    writer.all_pages()
    writer.end()
    return writer.totals


def restore(source: Source, memory: GuestMemory) -> Totals:
    """Read a stream into ``memory``, whose regions must be the stream's.

    Raises StreamError (offset and reason) for anything truncated, corrupt or
    not fitting; it never writes outside the declared regions.
    """
    reader = StreamReader(memory, source)
    reader.header()
    return reader.records()


def inspect(source: BinaryIO) -> tuple[StreamHeader, Totals]:
    """Read a stream's header and walk its records (checksums checked), with no target."""
    offset = 0

    def exactly(n: int) -> bytes:
        nonlocal offset
        data = source.read(n)
        if len(data) != n:
            raise StreamError(offset + len(data), "truncated")
        offset += n
        return data

    header = read_header(exactly)
    totals = Totals()
    while True:
        at = offset
        head = exactly(8)
        kind, flags, value = head[0], head[1], int.from_bytes(head[2:], "little")
        if kind == PAGE_RECORD and not flags & ~3:
            body = exactly((0 if flags & 1 else STREAM_PAGE) + (0 if flags & 2 else 128))
        elif kind in (ROUND_RECORD, END_RECORD) and flags == 0:
            body = b""
        else:
            raise StreamError(at, f"unknown record type {kind} or flags {flags:#x}")
        if int.from_bytes(exactly(8), "little") != checksum(head + body):
            raise StreamError(at, "record checksum mismatch")
        if kind == PAGE_RECORD:
            totals.pages += 1
        elif kind == ROUND_RECORD:
            totals.rounds += 1
        else:
            if value != totals.pages:
                raise StreamError(
                    at, f"end record counts {value} pages, the stream had {totals.pages}"
                )
            totals.bytes = offset
            return header, totals
