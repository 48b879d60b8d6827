"""The listening side: one GDB session at a time, others refused at once.

TCP binds 127.0.0.1 unless another host is named (a non-loopback address
needs ``allow_remote=True``: the protocol has no authentication and writes
memory); a Unix socket path works too. Each session acknowledges packets
until GDB asks for no-ack mode, answers ``-`` to a damaged packet and resends
its last reply on ``-``. ``k``, ``vKill``, ``D``, a closed connection, an
idle timeout or :meth:`GdbStub.close` ends it; the server then takes the
next client. A client that connects while a session runs is disconnected
after its first packet, answered ``E.busy...`` if that is ``qSupported``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

from guestmem._closing import ClosesOnExit
from guestmem.errors import GuestMemoryError
from guestmem.gdbstub.packets import BadPacket, Nak, Packet, PacketReader, frame
from guestmem.gdbstub.session import Session
from guestmem.gdbstub.target import RegisterProvider, no_registers
from guestmem.memory import GuestMemory

log = logging.getLogger(__name__)

DEFAULT_IDLE_TIMEOUT = 600.0  # seconds without a packet before a session is dropped
SEND_TIMEOUT = 30  # a peer that stops reading its replies for this long is dropped
REFUSAL_WAIT = 5.0  # how long a refused client has to send its first packet
MAX_REFUSING = 8  # refused clients waiting for their reply; more are closed at once
BUSY_REPLY = b"E.busy: another debugger session is active on this stub"
CLOSE_WAIT = 30.0  # how long close() waits for serve() to wind down


class RemoteAddressError(GuestMemoryError, ValueError):
    """A non-loopback address to bind without ``allow_remote=True``."""


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


DRAIN_LIMIT = 1 << 20  # unread bytes hang_up discards before it closes anyway


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


class _Refusal:
    """A client that came while a session runs: it gets ``E.busy`` for its first packet."""

    def __init__(self, conn: socket.socket) -> None:
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


class _Refusals:
    """The clients being refused during one session, watched by its selector."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self._waiting: list[_Refusal] = []

    def admit(self, conn: socket.socket) -> None:
        """Refuse ``conn`` once it sends a packet (at once if too many wait)."""
        if len(self._waiting) >= MAX_REFUSING:
            hang_up(conn)
            return
        refusal = _Refusal(conn)
        self._waiting.append(refusal)
        self._selector.register(conn, selectors.EVENT_READ, refusal)

    def on_readable(self, refusal: _Refusal) -> None:
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

    def _drop(self, refusal: _Refusal) -> None:
        self._selector.unregister(refusal.conn)
        self._waiting.remove(refusal)
        hang_up(refusal.conn)


class GdbStub(ClosesOnExit):
    """A GDB remote stub serving ``memory`` (see :mod:`guestmem.gdbstub`)."""

    def __init__(
        self,
        memory: GuestMemory,
        *,
        registers: RegisterProvider = no_registers,
        host: str = "127.0.0.1",
        port: int = 0,
        unix_path: str | None = None,
        allow_remote: bool = False,
        read_only: bool = False,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        """Listen on ``host:port`` (0: any free port) or, if given, on ``unix_path``.

        ``host`` must be a loopback address unless ``allow_remote``
        (:class:`RemoteAddressError`). ``read_only`` refuses every write;
        ``idle_timeout`` (None: never) ends a session that sends no packet
        for that many seconds.
        """
        if unix_path is None and not allow_remote and not is_loopback(host):
            raise RemoteAddressError(
                f"{host!r} is not a loopback address: the GDB protocol has no "
                "authentication and writes guest memory; pass allow_remote=True to bind it"
            )
        self.memory = memory
        self.registers = registers
        self.read_only = read_only
        self.idle_timeout = idle_timeout
        self._closed = threading.Event()
        self._serving = threading.RLock()
        self._active: socket.socket | None = None
        self._unix_path = unix_path
        self._listener = self._listen(host, port, unix_path)
        self._wake_reader, self._wake_writer = socket.socketpair()

    @staticmethod
    def _listen(host: str, port: int, unix_path: str | None) -> socket.socket:
        if unix_path is not None:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(unix_path)
            listener.listen(MAX_REFUSING)
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.create_server((host, port), family=family, backlog=MAX_REFUSING)
        listener.setblocking(False)
        return listener

    @property
    def address(self) -> str:
        """Where GDB connects: ``host:port`` or the socket path (``target remote ...``)."""
        if self._unix_path is not None:
            return self._unix_path
        host, port = self._listener.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def serve(self, sessions: int | None = None) -> None:
        """Serve sessions one after another: ``sessions`` of them, or until closed."""
        with self._serving:
            served = 0
            while not self._closed.is_set() and (sessions is None or served < sessions):
                conn = self._next_client()
                if conn is None:
                    return
                self.serve_connection(conn)
                served += 1

    def _next_client(self) -> socket.socket | None:
        """The next client to serve, or None once the stub is closed."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while not self._closed.is_set():
                selector.select()
                conn = None if self._closed.is_set() else accept(self._listener)
                if conn is not None:
                    return conn
        return None

    def serve_connection(self, conn: socket.socket) -> None:
        """Run one session on a connected socket until it ends; then close the socket."""
        conn.setblocking(True)  # reads follow select; a send waits SEND_TIMEOUT at most
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT, 0))
        self._active = conn
        try:
            if not self._closed.is_set():
                session = Session(
                    self.memory, self.registers, os.getpid(), read_only=self.read_only
                )
                self._run(session, conn)
        except OSError as error:
            log.info("session ended: %s", error)
        finally:
            self._active = None
            hang_up(conn)

    def _run(self, session: Session, conn: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(conn, selectors.EVENT_READ, "client")
            selector.register(self._listener, selectors.EVENT_READ, "newcomer")
            selector.register(self._wake_reader, selectors.EVENT_READ, "wake")
            refusals = _Refusals(selector)
            try:
                self._loop(_Exchange(session, conn, self._reply), selector, refusals)
            finally:
                refusals.close()

    def _loop(
        self, exchange: _Exchange, selector: selectors.BaseSelector, refusals: _Refusals
    ) -> None:
        last_packet = time.monotonic()
        while not exchange.session.ended and not self._closed.is_set():
            idle_deadline = None if self.idle_timeout is None else last_packet + self.idle_timeout
            if idle_deadline is not None and time.monotonic() >= idle_deadline:
                log.info("session idle for %.0f s: ended", self.idle_timeout)
                return
            deadlines = [d for d in (idle_deadline, refusals.next_deadline()) if d is not None]
            wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready = selector.select(wait)
            # The client first: one that left just before a newcomer came makes way for it.
            for key, _ in sorted(ready, key=lambda event: event[0].data != "client"):
                if key.data == "client":
                    if not exchange.receive() or exchange.session.ended:
                        return
                    last_packet = time.monotonic() if exchange.progressed else last_packet
                elif key.data == "newcomer":
                    newcomer = accept(self._listener)
                    if newcomer is not None:
                        refusals.admit(newcomer)
                elif isinstance(key.data, _Refusal):
                    refusals.on_readable(key.data)
            refusals.expire()

    @staticmethod
    def _reply(session: Session, payload: bytes) -> bytes | None:
        """The session's reply, or E01 for a failure it did not foresee.

        A register provider that raises, or a bug, is logged; serving goes on.
        """
        try:
            return session.handle(payload)
        except Exception:
            log.exception("packet %r failed", payload[:64])
            return b"E01"

    def close(self) -> None:
        """End the session in progress, make :meth:`serve` return and stop listening."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"x")
        active = self._active
        if active is not None:
            with contextlib.suppress(OSError):  # unblocks a send to a peer that stopped reading
                active.shutdown(socket.SHUT_RDWR)
        acquired = self._serving.acquire(timeout=CLOSE_WAIT)
        try:
            self._listener.close()
            self._wake_reader.close()
            self._wake_writer.close()
            if self._unix_path is not None and os.path.exists(self._unix_path):
                os.unlink(self._unix_path)
        finally:
            if acquired:
                self._serving.release()


class _Exchange:
    """Bytes in, replies out, for one session: acknowledgements, naks and resends."""

    def __init__(
        self,
        session: Session,
        conn: socket.socket,
        reply: Callable[[Session, bytes], bytes | None],
    ) -> None:
        self.session = session
        self.conn = conn
        self.reply = reply
        self.reader = PacketReader()
        self.last_reply: bytes | None = None
        self.progressed = False  # whether the last receive completed a packet

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
        session, conn = self.session, self.conn
        if isinstance(event, Packet):
            if not session.no_ack:
                conn.sendall(b"+")
            reply = self.reply(session, event.payload)
            if reply is not None:
                self.last_reply = frame(reply)
                conn.sendall(self.last_reply)
        elif isinstance(event, BadPacket):
            log.info("bad packet: %s", event.reason)
            if not session.no_ack:
                conn.sendall(b"-")
        elif isinstance(event, Nak) and self.last_reply is not None and not session.no_ack:
            conn.sendall(self.last_reply)
