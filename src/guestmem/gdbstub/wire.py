"""The wire side of a session: sockets, acknowledgements, and clients turned away.

:class:`Exchange` moves one session's packets: it acknowledges each packet
until the session asks for no-ack mode, answers ``-`` to a damaged packet,
resends its last reply on ``-`` and hands 0x03 to the session. A client
that connects while a session runs is a :class:`Refusal`: it is
disconnected after its first packet, answered ``E.busy...`` if that is
``qSupported``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import selectors
import socket
import time
from collections.abc import Callable
from typing import Protocol

from guestmem.gdbstub.commands import E_MALFORMED
from guestmem.gdbstub.packets import BadPacket, Interrupt, Nak, Packet, PacketReader, frame

log = logging.getLogger(__name__)

REFUSAL_WAIT = 5.0  # how long a refused client has to send its first packet
MAX_REFUSING = 8  # refused clients waiting for their reply; more are closed at once
BUSY_REPLY = b"E.busy: another debugger session is active on this stub"
DRAIN_LIMIT = 1 << 20  # unread bytes hang_up discards before it closes anyway


class RemoteSession(Protocol):
    """What the wire needs of a session (:class:`~guestmem.gdbstub.commands.CommandSession`)."""

    no_ack: bool
    ended: bool
    running: bool

    def handle(self, payload: bytes) -> bytes | None:
        """The reply to one packet, or None for none (now)."""

    def interrupt(self) -> bytes | None:
        """0x03: the stop reply, or None."""

    def poll(self, timeout: float) -> bytes | None:
        """While running: the stop reply once the guest stopped."""


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address."""
    if not host:
        return False  # the empty host binds every interface
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
    except ValueError:
        return False


def accept(listener: socket.socket) -> socket.socket | None:
    """A waiting client, or None: none waits, it left already, or accept failed (logged)."""
    try:
        return listener.accept()[0]
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return None
    except OSError as error:  # e.g. out of file descriptors: wait, then try again
        log.warning("cannot accept a client: %s", error)
        time.sleep(0.1)
        return None


def hang_up(conn: socket.socket) -> None:
    """Close ``conn`` so the peer reads end-of-stream, not a reset.

    Linux answers a close with unread bytes in the receive queue (half a
    packet the session never read) with RST, which the peer may see as
    ECONNRESET instead of the orderly end of the session. So send FIN, read
    what is already queued (up to DRAIN_LIMIT, never waiting), then close.
    """
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_WR)
        conn.setblocking(False)
        drained = 0
        while drained < DRAIN_LIMIT:
            chunk = conn.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    conn.close()


class Refusal:
    """A client that came while a session runs: it gets ``E.busy`` for its first packet."""

    def __init__(self, conn: socket.socket) -> None:
        """Watch ``conn`` (non-blocking from now on) until it sends a packet or expires."""
        conn.setblocking(False)
        self.conn = conn
        self.deadline = time.monotonic() + REFUSAL_WAIT
        self._reader = PacketReader()

    def on_readable(self) -> bool:
        """Read what came; True once the client has been answered or has gone."""
        try:
            data = self.conn.recv(65536)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not data:
            return True
        for event in self._reader.feed(data):
            if isinstance(event, Packet | BadPacket):
                self._answer(event)
                return True
        return False

    def _answer(self, first: Packet | BadPacket) -> None:
        """``E.busy`` for GDB's first packet (qSupported); no reply to any other.

        LLDB starts with QStartNoAckMode and prints no error text; given a
        reply it goes on to set up a process on the dead connection (and
        LLDB 14 can hang there), given none it stops at once: "Connection
        shut down by remote side while waiting for reply to initial
        handshake packet".
        """
        with contextlib.suppress(OSError):
            if isinstance(first, Packet) and first.payload.startswith(b"qSupported"):
                self.conn.sendall(b"+" + frame(BUSY_REPLY))
            self.conn.shutdown(socket.SHUT_WR)


class Refusals:
    """The clients being refused during one session, watched by its selector."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        """Register refused clients with ``selector``."""
        self._selector = selector
        self._waiting: list[Refusal] = []

    def admit(self, conn: socket.socket) -> None:
        """Refuse ``conn`` once it sends a packet (at once if too many wait)."""
        if len(self._waiting) >= MAX_REFUSING:
            hang_up(conn)
            return
        refusal = Refusal(conn)
        self._waiting.append(refusal)
        self._selector.register(conn, selectors.EVENT_READ, refusal)

    def on_readable(self, refusal: Refusal) -> None:
        """Answer or drop ``refusal`` if it has sent enough."""
        if refusal.on_readable():
            self._drop(refusal)

    def expire(self) -> None:
        """Drop the clients that sent no packet in time."""
        now = time.monotonic()
        for refusal in [r for r in self._waiting if r.deadline <= now]:
            self._drop(refusal)

    def next_deadline(self) -> float | None:
        """When the first waiting client expires, if any waits."""
        return min((r.deadline for r in self._waiting), default=None)

    def close(self) -> None:
        """Disconnect every waiting client."""
        for refusal in list(self._waiting):
            self._drop(refusal)

    def _drop(self, refusal: Refusal) -> None:
        self._selector.unregister(refusal.conn)
        self._waiting.remove(refusal)
        hang_up(refusal.conn)


def safely(handler: Callable[[bytes], bytes | None], payload: bytes) -> bytes | None:
    """``handler(payload)``, or ``E01`` for a failure nobody foresaw (logged).

    A register provider or run control that raises, or a bug: serving goes on.
    """
    try:
        return handler(payload)
    except Exception:
        log.exception("packet %r failed", payload[:64])
        return E_MALFORMED


class Exchange:
    """Bytes in, replies out, for one session: acks, naks, resends and 0x03."""

    def __init__(self, session: RemoteSession, conn: socket.socket) -> None:
        """Carry ``session``'s packets over ``conn``."""
        self.session = session
        self.conn = conn
        self.reader = PacketReader()
        self.last_reply: bytes | None = None
        self.progressed = False  # whether the last receive completed a packet

    def send(self, reply: bytes) -> None:
        """Send one reply packet (kept for a resend on ``-``)."""
        self.last_reply = frame(reply)
        self.conn.sendall(self.last_reply)

    def receive(self) -> bool:
        """Handle what the peer sent; False once it has closed the connection."""
        data = self.conn.recv(65536)
        if not data:
            return False
        events = self.reader.feed(data)
        self.progressed = bool(events)
        for event in events:
            self._handle(event)
            if self.session.ended:
                break
        return not self._peer_closed()

    def _peer_closed(self) -> bool:
        """Whether the peer's end-of-stream already waits behind what was read.

        GDB acknowledges its last reply and hangs up at once: seeing that now
        lets a client that connects just after it be served, not refused.
        """
        try:
            return self.conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False

    def _handle(self, event: object) -> None:
        session = self.session
        if isinstance(event, Packet):
            if not session.no_ack:
                self.conn.sendall(b"+")
            reply = safely(session.handle, event.payload)
            if reply is not None:
                self.send(reply)
        elif isinstance(event, Interrupt):
            reply = safely(lambda _: session.interrupt(), b"\x03")
            if reply is not None:
                self.send(reply)
        elif isinstance(event, BadPacket):
            log.info("bad packet: %s", event.reason)
            if not session.no_ack:
                self.conn.sendall(b"-")
        elif isinstance(event, Nak) and self.last_reply is not None and not session.no_ack:
            self.conn.sendall(self.last_reply)
