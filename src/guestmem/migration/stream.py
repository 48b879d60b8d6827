"""Writing and reading migration streams over files and sockets.

The page records are encoded and decoded by the native core
(``gm_stream_encode``/``gm_stream_decode``), many pages per call; Python only
moves buffers. Layout: docs/stream-format.md.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from guestmem._native import (
    NEED_MORE,
    NULL,
    Decoder,
    RecordKind,
    StreamStatus,
    check,
    from_buffer,
    native_space,
    stream_encode,
    word_pointer,
)
from guestmem.errors import StreamError
from guestmem.kinds import TagMode
from guestmem.migration.header import StreamHeader, checksum, read_header
from guestmem.mover import Mover
from guestmem.units import STREAM_PAGE, Frames

Sink = BinaryIO | socket.socket
Source = BinaryIO | socket.socket
RECORD_MAX = 8 + STREAM_PAGE + 128 + 8
BATCH_PAGES = 64
IDLE_TIMEOUT = 60.0  # seconds a receiving socket waits for the next byte by default
_REASONS: dict[int, str] = {
    StreamStatus.BAD_TYPE: "unknown record type",
    StreamStatus.BAD_FLAGS: "unknown record flags",
    StreamStatus.BAD_CHECKSUM: "record checksum mismatch",
    StreamStatus.OUT_OF_REGION: "page outside the declared regions",
    StreamStatus.TAGS_UNSUPPORTED: "tagged page, but the target has no tag storage",
    StreamStatus.TAGS_FROM_UNTAGGED: "tagged page in a stream whose source had no tags",
}


@dataclass
class Totals:
    """What a stream carried so far."""

    pages: int = 0
    bytes: int = 0
    rounds: int = 0


@contextmanager
def _vm_held(memory: Mover | None) -> Iterator[None]:
    """Hold ``memory``'s KVM VM open for the scope: close() never closes it under the codec."""
    if memory is None:
        yield
        return
    with memory.vm_fd_in_use():
        yield


class StreamWriter:
    """Writes a stream of ``memory``'s pages to a binary file or a socket."""

    def __init__(self, memory: Mover, sink: Sink) -> None:
        """Prepare to write; nothing is sent before :meth:`header`."""
        self._memory = memory
        self._send = sink.sendall if isinstance(sink, socket.socket) else sink.write
        self._space = memory.native_space
        self._out = bytearray(RECORD_MAX * BATCH_PAGES)
        self._out_ptr = from_buffer(self._out)
        self.totals = Totals()

    def header(self) -> None:
        """Send the header: geometry, tag mode and region table."""
        layout = tuple((r.gpa, r.size) for r in self._memory.address_space.regions)
        self._emit(StreamHeader(self._memory.tag_mode, layout).encode())

    def all_pages(self) -> None:
        """Send every page of every region."""
        for region in self._memory.address_space.regions:
            first = region.gpa // STREAM_PAGE
            every = np.arange(first, first + region.size // STREAM_PAGE, dtype=np.uint64)
            self.pages(Frames(every, STREAM_PAGE))

    def pages(self, frames: Frames) -> None:
        """Send the pages ``frames`` covers (in any unit: each record is one stream page)."""
        numbers = frames.to(STREAM_PAGE).numbers
        for index, region in enumerate(self._memory.address_space.regions):
            first = region.gpa // STREAM_PAGE
            last = first + region.size // STREAM_PAGE
            mine = numbers[(numbers >= first) & (numbers < last)]
            mine = np.ascontiguousarray(mine, dtype=np.uint64)
            pointer = word_pointer(mine)
            with _vm_held(self._memory):
                self._encode(index, pointer, mine.size)

    def _encode(self, index: int, pointer: Any, count: int) -> None:
        """Encode and send ``count`` pages of region ``index``, a batch at a time."""
        at = 0
        while at < count:
            status, done, written = stream_encode(
                self._space, index, pointer + at, count - at, self._out_ptr, len(self._out)
            )
            check(status, "encoding pages")
            self._emit(memoryview(self._out)[:written])
            self.totals.pages += done
            at += done

    def round(self) -> None:
        """Mark the end of a pre-copy round."""
        self._control(RecordKind.ROUND, self.totals.rounds)
        self.totals.rounds += 1

    def end(self) -> None:
        """Send the end record (the page count) and flush."""
        self._control(RecordKind.END, self.totals.pages)

    def _control(self, kind: int, value: int) -> None:
        head = (kind | (value << 16)).to_bytes(8, "little")
        self._emit(head + checksum(head).to_bytes(8, "little"))

    def _emit(self, data: bytes | memoryview) -> None:
        self._send(data)
        self.totals.bytes += len(data)


def more_arrived(source: Source) -> bool:
    """Whether anything more is in ``source`` (on a socket: has arrived already).

    Asked where any byte is an error, so it may consume one: TLS cannot
    peek. A peer that closed (with or without close_notify) sent nothing.
    """
    if not isinstance(source, socket.socket):
        return bool(source.read(1))
    before = source.gettimeout()
    source.settimeout(0.0)  # with a timeout set, Python would wait for a byte that never comes
    try:
        if isinstance(source, ssl.SSLSocket):
            return bool(source.recv(1))
        return bool(source.recv(1, socket.MSG_PEEK))
    except (ssl.SSLWantReadError, ssl.SSLEOFError, BlockingIOError, InterruptedError):
        return False
    finally:
        source.settimeout(before)


class StreamReader:
    """Reads a stream: header, pages, rounds, end — into ``memory``, or only checking it.

    With ``memory=None`` every record is checked against the header's own
    regions and nothing is applied: the same checks as a restore (one
    parser, in the core). On a socket, ``idle_timeout`` seconds without a
    byte is a StreamError, not a hang. With ``trailing``, what follows the
    end record is not the stream's business: it is left for the caller
    (:meth:`leftover` holds what was read of it already).
    """

    def __init__(
        self,
        memory: Mover | None,
        source: Source,
        *,
        idle_timeout: float | None = None,
        trailing: bool = False,
    ) -> None:
        """Prepare to read from a binary file or a socket."""
        self._memory = memory
        self._source = source
        self._idle_timeout = idle_timeout
        self._trailing = trailing
        if isinstance(source, socket.socket):
            self._read_into = source.recv_into
        else:
            self._read_into = source.readinto  # type: ignore[attr-defined]
        self._buffer = bytearray(RECORD_MAX * BATCH_PAGES)
        self._have = 0
        self.offset = 0  # of the first byte in the buffer
        self.totals = Totals()
        self._header: StreamHeader | None = None

    def header(self) -> StreamHeader:
        """Read and check the header (against the target's regions, if there is one)."""
        header = read_header(self._read_exactly)
        if self._memory is not None:
            target = tuple((r.gpa, r.size) for r in self._memory.address_space.regions)
            if header.regions != target:
                raise StreamError(
                    28, f"region table {header.regions} differs from the target's {target}"
                )
        self._header = header
        return header

    def records(self, on_round: Any = None) -> Totals:
        """Apply page records until the end record; call ``on_round(totals)`` at each round."""
        if self._header is None:
            raise StreamError(0, "records() before header()")
        space = self._native_space(self._header)
        with _vm_held(self._memory):
            return self._decode(space, on_round)

    def _decode(self, space: Any, on_round: Any) -> Totals:
        assert self._header is not None
        decoder = Decoder(space, self._header.tag_mode is not TagMode.NONE)
        while True:
            status, consumed = decoder.decode(self._buffer, self._have)
            self.totals.pages = decoder.pages
            self._drop(consumed)
            if status == NEED_MORE:
                self._fill()
                continue
            if status < 0:
                raise StreamError(self.offset, _REASONS.get(status, f"native status {status}"))
            if decoder.kind == RecordKind.ROUND:
                self.totals.rounds += 1
                if on_round is not None:
                    on_round(self.totals)
                continue
            if decoder.value != self.totals.pages:
                raise StreamError(
                    self.offset - 16,
                    f"end record counts {decoder.value} pages, the stream had {self.totals.pages}",
                )
            if not self._trailing and (self._have or more_arrived(self._source)):
                raise StreamError(self.offset, "data after the end record")
            self.totals.bytes = self.offset
            return self.totals

    def leftover(self) -> bytes:
        """Bytes read past the end record (with ``trailing``): the start of what follows."""
        return bytes(self._buffer[: self._have])

    def _native_space(self, header: StreamHeader) -> Any:
        if self._memory is not None:
            return self._memory.native_space
        check_only = [(gpa, size, NULL, NULL) for gpa, size in header.regions]
        return native_space(header.tag_mode, check_only, -1, STREAM_PAGE, None)

    def _fill(self) -> None:
        if self._have == len(self._buffer):  # pragma: no cover - a record always fits
            raise StreamError(self.offset, "record larger than any record can be")
        n = self._receive(memoryview(self._buffer)[self._have :])
        if not n:
            where = "inside a record" if self._have else "before the end record"
            raise StreamError(self.offset + self._have, f"truncated {where}")
        self._have += n

    def _receive(self, into: memoryview) -> int:
        if not isinstance(self._source, socket.socket) or self._idle_timeout is None:
            return int(self._read_into(into))
        before = self._source.gettimeout()
        self._source.settimeout(self._idle_timeout)
        try:
            return int(self._read_into(into))
        except TimeoutError:
            raise StreamError(
                self.offset + self._have,
                f"the sender sent nothing for {self._idle_timeout:g} s",
            ) from None
        finally:
            self._source.settimeout(before)

    def _drop(self, n: int) -> None:
        if n:
            self._buffer[: self._have - n] = self._buffer[n : self._have]
            self._have -= n
            self.offset += n

    def _read_exactly(self, n: int) -> bytes:
        while self._have < n:
            self._fill()
        data = bytes(self._buffer[:n])
        self._drop(n)
        return data
