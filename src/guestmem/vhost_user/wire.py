"""Messages on the vhost-user socket: a 12-byte header, a payload, fds in SCM_RIGHTS.

:func:`receive` reads one whole message (its fds come with the header) and
checks the header; :func:`send_reply` answers one. Every fd that arrives is
either handed on in the :class:`Message` or closed here, whatever fails.
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass, field

from guestmem.vhost_user.errors import MessageError
from guestmem.vhost_user.protocol import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    KNOWN_FLAGS,
    MAX_FDS,
    MAX_PAYLOAD,
    VERSION,
    VERSION_MASK,
    request_name,
)

_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


@dataclass
class Message:
    """One frontend message: its request code, flags, payload and the fds it carried.

    The fds are the receiver's to keep or close: :meth:`close_fds` closes those
    not taken with :meth:`take_fds`.
    """

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The request's name, for messages."""
        return request_name(self.request)

    @property
    def need_reply(self) -> bool:
        """Whether the frontend asked for an acknowledgement (REPLY_ACK)."""
        return bool(self.flags & FLAG_NEED_REPLY)

    def take_fds(self) -> list[int]:
        """The fds, now the caller's (the message forgets them)."""
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        """Close every fd not taken."""
        for fd in self.take_fds():
            os.close(fd)


class Disconnected(Exception):
    """The frontend closed the connection between messages (not an error)."""


def receive(sock: socket.socket, timeout: float | None) -> Message:
    """Read one message from ``sock``; MessageError if it is malformed, Disconnected at EOF.

    The header and its fds come in one recvmsg; the rest of the message must
    follow within ``timeout`` seconds of its first byte.
    """
    fds: list[int] = []
    try:
        header, fds = _header(sock, timeout)
        request, flags, size = HEADER.unpack(header)
        _check_header(request, flags, size)
        payload = _exactly(sock, size, timeout, request)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Message(request, flags, payload, fds)


def send_reply(sock: socket.socket, request: int, payload: bytes) -> None:
    """Answer ``request`` with ``payload`` (version 1, the reply flag set)."""
    sock.sendall(HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload)


def _header(sock: socket.socket, timeout: float | None) -> tuple[bytes, list[int]]:
    sock.settimeout(None)  # between messages the frontend may take its time
    data, ancillary, msg_flags, _ = sock.recvmsg(HEADER.size, _FD_SPACE)
    fds = _fds(ancillary)
    if not data:
        for fd in fds:
            os.close(fd)
        raise Disconnected
    # More fds than the room given: the kernel drops the rest and says so
    # (MSG_CTRUNC; qemu-user drops them silently). Counted too, never trusted.
    if msg_flags & socket.MSG_CTRUNC or len(fds) > MAX_FDS:
        for fd in fds:
            os.close(fd)
        raise MessageError(f"a message carried more than {MAX_FDS} fds")
    try:
        rest = _exactly(sock, HEADER.size - len(data), timeout, 0)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return data + rest, fds


def _fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            numbers = array.array("i")
            numbers.frombytes(data[: len(data) - len(data) % numbers.itemsize])
            fds.extend(numbers)
    return fds


def _check_header(request: int, flags: int, size: int) -> None:
    name = request_name(request)
    if flags & VERSION_MASK != VERSION:
        raise MessageError(f"{name}: version {flags & VERSION_MASK}, not 1", request=request)
    if flags & ~KNOWN_FLAGS or flags & FLAG_REPLY:
        raise MessageError(f"{name}: flags {flags:#x} are not a request's", request=request)
    if size > MAX_PAYLOAD:
        raise MessageError(
            f"{name}: a payload of {size} bytes (at most {MAX_PAYLOAD})", request=request
        )


def _exactly(sock: socket.socket, n: int, timeout: float | None, request: int) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    try:
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise MessageError(
                    f"{request_name(request)}: the connection closed inside a message",
                    request=request,
                )
            out += chunk
    except TimeoutError:
        raise MessageError(
            f"{request_name(request)}: the rest of the message did not come in {timeout} s",
            request=request,
        ) from None
    finally:
        sock.settimeout(None)
    return bytes(out)
