"""Save and restore a whole GuestMemory, data and tags, through the MIGRATION class."""

from __future__ import annotations

import os
import socket
import stat

from guestmem.migration.header import StreamHeader, check_claims
from guestmem.migration.stream import (
    IDLE_TIMEOUT,
    Sink,
    Source,
    StreamReader,
    StreamWriter,
    Totals,
)
from guestmem.mover import Mover


def save(memory: Mover, sink: Sink) -> Totals:
    """Write every page of ``memory`` (data and tags) to a binary file or socket."""
    writer = StreamWriter(memory, sink)
    writer.header()
    writer.all_pages()
    writer.end()
    return writer.totals


def restore(source: Source, memory: Mover, *, idle_timeout: float | None = IDLE_TIMEOUT) -> Totals:
    """Read a stream into ``memory``, whose regions must be the stream's.

    Raises StreamError (offset and reason) for anything truncated, corrupt or
    not fitting; it never writes outside the declared regions. On a socket, a
    sender quiet for ``idle_timeout`` seconds is a StreamError too.
    """
    reader = StreamReader(memory, source, idle_timeout=idle_timeout)
    reader.header()
    return reader.records()


def inspect(
    source: Source, *, max_memory: int | None = None, idle_timeout: float | None = IDLE_TIMEOUT
) -> tuple[StreamHeader, Totals]:
    """Check a whole stream as a restore would, applying nothing; its header and totals.

    The header's claims are checked first: against ``max_memory`` if given,
    and against the stream's real size where it is a file.
    """
    size = _size_of(source)
    reader = StreamReader(None, source, idle_timeout=idle_timeout)
    header = reader.header()
    if max_memory is not None:
        check_claims(header, size, max_memory)
    return header, reader.records()


def _size_of(source: Source) -> int | None:
    """How many bytes a stream that is a regular file holds from where it is read; else None."""
    if isinstance(source, socket.socket):
        return None
    try:
        info = os.fstat(source.fileno())
        position = source.tell()
    except (OSError, AttributeError, ValueError):
        return None
    return info.st_size - position if stat.S_ISREG(info.st_mode) else None
