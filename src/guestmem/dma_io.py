"""System-call I/O between guest memory and file descriptors or sockets.

A real kernel checks the tags of user memory that a system call touches, with
an effective TCO of 0, so TCO (which works for the library's own copies) is
never used here: a request for it raises UnsupportedError. The routes that
are safe: MATCH_ALL (pointers carrying each run's tag: zero-copy, and still
checked by the kernel), BOUNCE (an untagged staging copy) and
UNCHECKED_THREAD (checks off for the thread around the call); CHECKED passes
pointers carrying the caller's tag. Partial transfers, EINTR and EAGAIN
behave as in ``os.readv``/``os.writev``/``socket.recvmsg_into``/``sendmsg``:
one system call, its count returned, ``BlockingIOError`` raised. For file
descriptors and blocking sockets without flags, MATCH_ALL and
UNCHECKED_THREAD build the iovec and make the call in the core (gm_io.c).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from guestmem._args import as_int
from guestmem._native import (
    ERR_ERRNO,
    IO_FROM_GUEST,
    IO_INTO_GUEST,
    OP_READ,
    OP_WRITE,
    check,
    from_buffer,
    io_span,
    io_spans,
    last_errno,
    spans,
)
from guestmem.address_space import Piece
from guestmem.dma_mapping import STAGE_PLAN, DmaMapping
from guestmem.errors import ArgumentTypeError, LengthError, WouldBlockError, from_os_error
from guestmem.kinds import Direction, Lending, Route
from guestmem.mover import Mover

Ranges = Sequence[tuple[int, int]]
Transfer = Callable[[list[memoryview]], int]
# One system call takes at most IOV_MAX buffers; the rest is a short transfer.
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class HasFileno(Protocol):
    """Anything with a file descriptor (a file, a pipe end, a socket)."""

    def fileno(self) -> int:
        """Return the descriptor."""
        ...


def _fd(target: int | HasFileno) -> int:
    if type(target) is int:
        return target
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        return as_int(target, "a file descriptor")
    fileno = getattr(target, "fileno", None)
    if fileno is None:
        raise ArgumentTypeError(f"expected a file descriptor, not {type(target).__name__}")
    try:
        return as_int(fileno(), "a file descriptor")
    except OSError as err:  # a closed socket or file
        raise from_os_error(err, "fileno()") from err


class DmaIO:
    """System-call I/O into and out of guest memory (``mem.dma.io``)."""

    def __init__(self, memory: Mover) -> None:
        """Serve I/O over ``memory``."""
        self._memory = memory

    def read_from(
        self,
        fd: int | HasFileno,
        gpa: int,
        length: int,
        *,
        route: Route | None = None,
        tag: int | None = None,
    ) -> int:
        """Read up to ``length`` bytes from ``fd`` into guest memory at ``gpa``."""
        return self.readv_from(fd, [(gpa, length)], route=route, tag=tag)

    def write_to(
        self,
        fd: int | HasFileno,
        gpa: int,
        length: int,
        *,
        route: Route | None = None,
        tag: int | None = None,
    ) -> int:
        """Write up to ``length`` bytes of guest memory at ``gpa`` to ``fd``."""
        return self.writev_to(fd, [(gpa, length)], route=route, tag=tag)

    def readv_from(
        self,
        fd: int | HasFileno,
        ranges: Ranges,
        *,
        route: Route | None = None,
        tag: int | None = None,
    ) -> int:
        """Scatter one ``readv`` from ``fd`` over the guest ranges; return its count."""
        n = _fd(fd)
        return self._transfer(
            ranges, Direction.FROM_DEVICE, route, tag, lambda b: os.readv(n, b), native_fd=n
        )

    def writev_to(
        self,
        fd: int | HasFileno,
        ranges: Ranges,
        *,
        route: Route | None = None,
        tag: int | None = None,
    ) -> int:
        """Gather the guest ranges into one ``writev`` to ``fd``; return its count."""
        n = _fd(fd)
        return self._transfer(
            ranges, Direction.TO_DEVICE, route, tag, lambda b: os.writev(n, b), native_fd=n
        )

    def preadv_from(
        self,
        fd: int | HasFileno,
        ranges: Ranges,
        offset: int,
        *,
        route: Route | None = None,
        tag: int | None = None,
    ) -> int:
        """Scatter one ``preadv`` from ``fd`` at ``offset`` over the guest ranges.

        The file's position is neither used nor moved: what a disk image
        behind a device model needs. Returns the count (short at end of file).
        """
        n, at = _fd(fd), _offset(offset)
        return self._transfer(
            ranges,
            Direction.FROM_DEVICE,
            route,
            tag,
            lambda b: os.preadv(n, b, at),
            native_fd=n,
            offset=at,
        )

    def pwritev_to(
        self,
        fd: int | HasFileno,
        ranges: Ranges,
        offset: int,
        *,
        route: Route | None = None,
        tag: int | None = None,
    ) -> int:
        """Gather the guest ranges into one ``pwritev`` to ``fd`` at ``offset``."""
        n, at = _fd(fd), _offset(offset)
        return self._transfer(
            ranges,
            Direction.TO_DEVICE,
            route,
            tag,
            lambda b: os.pwritev(n, b, at),
            native_fd=n,
            offset=at,
        )

    def recv_into(
        self,
        sock: socket.socket,
        gpa: int,
        length: int,
        flags: int = 0,
        *,
        route: Route | None = None,
        tag: int | None = None,
    ) -> int:
        """Receive up to ``length`` bytes from ``sock`` into guest memory at ``gpa``."""
        _require_socket(sock, flags)
        return self._transfer(
            [(gpa, length)],
            Direction.FROM_DEVICE,
            route,
            tag,
            lambda b: sock.recvmsg_into(b, 0, flags)[0],
            native_fd=_plain_socket_fd(sock, flags),
        )

    def send(
        self,
        sock: socket.socket,
        gpa: int,
        length: int,
        flags: int = 0,
        *,
        route: Route | None = None,
        tag: int | None = None,
    ) -> int:
        """Send up to ``length`` bytes of guest memory at ``gpa`` on ``sock``."""
        _require_socket(sock, flags)
        return self._transfer(
            [(gpa, length)],
            Direction.TO_DEVICE,
            route,
            tag,
            lambda b: sock.sendmsg(b, [], flags),
            native_fd=_plain_socket_fd(sock, flags),
        )

    def _transfer(
        self,
        ranges: Ranges,
        direction: Direction,
        route: Route | None,
        tag: int | None,
        call: Transfer,
        native_fd: int | None = None,
        offset: int = -1,
    ) -> int:
        memory = self._memory
        chosen = memory.io_plan_for(route, tag).route
        pieces = memory.pieces_of(ranges, None)  # every range valid before any system call
        try:
            if native_fd is not None and chosen.native_iovec:
                return self._native(native_fd, pieces, direction, chosen, offset)
            if chosen.lending is Lending.STAGING:
                return self._bounce(pieces, direction, call)
            checked = [(region.gpa + offset, n) for region, offset, n in pieces]
            with DmaMapping(memory, checked, direction, chosen, tag) as buffers:
                return call(buffers[:IOV_MAX])
        except OSError as err:
            raise from_os_error(err, f"{chosen.name} system-call I/O") from err

    def _native(
        self, fd: int, pieces: list[Piece], direction: Direction, route: Route, offset: int
    ) -> int:
        """One readv/writev (preadv/pwritev at ``offset`` >= 0) whose iovec the core builds."""
        space, entries = self._memory.native_entries
        into_guest = direction is Direction.FROM_DEVICE
        way = IO_INTO_GUEST if into_guest else IO_FROM_GUEST
        one = len(pieces) == 1  # a block request's data buffer: no span array to allocate
        if one:
            region, start, length = pieces[0]
            guest, gpa, at = region.base_pointer + start, region.gpa + start, entries.get(region)
        else:
            span_array = spans(pieces, entries)
        # The core marks what the kernel wrote into guest memory dirty.
        while True:
            if one:
                count = io_span(fd, way, space, route, at, guest, gpa, length, offset)
            else:
                count = io_spans(fd, way, space, route, span_array, len(pieces), offset)
            if count >= 0:
                break
            code = last_errno()
            if count == ERR_ERRNO and code == errno.EINTR:
                continue  # as os.readv does (PEP 475); signal handlers have run
            if count == ERR_ERRNO:
                error = WouldBlockError if code in (errno.EAGAIN, errno.EWOULDBLOCK) else OSError
                raise error(code, os.strerror(code))
            check(count, f"{route.name} system-call I/O")
        return count

    def _bounce(self, pieces: list[Piece], direction: Direction, call: Transfer) -> int:
        """Stage through an untagged copy; the pieces are already checked and translated."""
        memory = self._memory
        staging = bytearray(sum(n for _, _, n in pieces))
        buf = from_buffer(staging)
        if direction.copies_in:
            memory.move(STAGE_PLAN, OP_READ, pieces, buf)
            return call([memoryview(staging)])
        count = call([memoryview(staging)])
        memory.move(STAGE_PLAN, OP_WRITE, _prefix_pieces(pieces, count), buf)
        return count


def _offset(offset: object) -> int:
    """A file offset: an int in [0, 2**63)."""
    value = offset if type(offset) is int else as_int(offset, "offset")
    if not 0 <= value < 1 << 63:
        raise LengthError(f"file offset {value} is outside [0, 2**63)")
    return value


def _require_socket(sock: object, flags: object) -> None:
    if not isinstance(sock, socket.socket):
        raise ArgumentTypeError(f"expected a socket.socket, not {type(sock).__name__}")
    as_int(flags, "flags")


def _plain_socket_fd(sock: socket.socket, flags: int) -> int | None:
    """The socket's fd when readv/writev on it is what recv/send would do, else None.

    A socket with a timeout is non-blocking underneath and waits in Python;
    flags need recvmsg/sendmsg. Both keep the socket module's path.
    """
    return sock.fileno() if flags == 0 and sock.gettimeout() is None else None


def _prefix_pieces(pieces: list[Piece], count: int) -> list[Piece]:
    """The first ``count`` bytes of ``pieces``, as pieces."""
    out = []
    for region, offset, length in pieces:
        if count <= 0:
            break
        out.append((region, offset, min(length, count)))
        count -= length
    return out
