"""The listening side: one GDB session at a time, others refused at once.

:class:`GdbServer` is the wire loop both targets share. TCP binds 127.0.0.1
unless another host is named (a non-loopback address needs
``allow_remote=True``: the protocol has no authentication and writes
memory); a Unix socket path works too. Each session's packets go through an
:class:`~guestmem.gdbstub.wire.Exchange`; ``k``, ``vKill``, ``D``, a closed
connection, an idle timeout or :meth:`GdbServer.close` ends it, and the
server then takes the next client. A client that connects while a session
runs is refused (:class:`~guestmem.gdbstub.wire.Refusal`).

:class:`GdbStub` serves guest physical memory
(:class:`~guestmem.gdbstub.session.Session`); the run-control server is
:class:`~guestmem.gdbstub.debug_server.GuestDebugServer`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import struct
import threading
import time
from typing import Generic, TypeVar

from guestmem._closing import ClosesOnExit
from guestmem.errors import GuestMemoryError
from guestmem.gdbstub.session import Session
from guestmem.gdbstub.target import RegisterProvider, no_registers
from guestmem.gdbstub.wire import (
    MAX_REFUSING,
    Exchange,
    Refusal,
    Refusals,
    RemoteSession,
    accept,
    hang_up,
    is_loopback,
)
from guestmem.memory import GuestMemory

log = logging.getLogger(__name__)
S = TypeVar("S", bound=RemoteSession)

DEFAULT_IDLE_TIMEOUT = 600.0  # seconds without a packet before a session is dropped
SEND_TIMEOUT = 30  # a peer that stops reading its replies for this long is dropped
CLOSE_WAIT = 30.0  # how long close() waits for serve() to wind down
POLL_INTERVAL = 0.01  # seconds between looks at the client while the guest runs


class RemoteAddressError(GuestMemoryError, ValueError):
    """A non-loopback address to bind without ``allow_remote=True``."""


class GdbServer(ClosesOnExit, Generic[S]):
    """Listen, and serve the sessions :meth:`new_session` makes one after another."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        unix_path: str | None = None,
        allow_remote: bool = False,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        """Listen on ``host:port`` (0: any free port) or, if given, on ``unix_path``.

        ``host`` must be a loopback address unless ``allow_remote``
        (:class:`RemoteAddressError`). ``idle_timeout`` (None: never) ends a
        session that sends no packet for that many seconds while nothing runs.
        """
        if unix_path is None and not allow_remote and not is_loopback(host):
            raise RemoteAddressError(
                f"{host!r} is not a loopback address: the GDB protocol has no "
                "authentication and writes guest memory; pass allow_remote=True to bind it"
            )
        self.idle_timeout = idle_timeout
        self._closed = threading.Event()
        self._serving = threading.RLock()
        self._active: socket.socket | None = None
        self._unix_path = unix_path
        self._listener = self._listen(host, port, unix_path)
        self._wake_reader, self._wake_writer = socket.socketpair()

    # ---- what a target's server provides ---------------------------------------------

    def new_session(self) -> S | None:
        """A session for the next client; None if there is nothing left to serve."""
        raise NotImplementedError

    def begin(self, session: S) -> bool:
        """Prepare the target for ``session``; False ends it before its first packet."""
        return True

    def finish(self, session: S) -> None:
        """``session`` is over, however it ended (also when :meth:`begin` failed)."""

    # ---- serving ------------------------------------------------------------------------

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
        """The next client to serve, or None once the server is closed."""
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
        with contextlib.suppress(OSError):  # a Unix socket has no Nagle to turn off
            # "+" and the reply go out as two writes: with Nagle, the reply
            # waits for the client's delayed ACK (40 ms a packet, a slow stepi).
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._active = conn
        try:
            session = None if self._closed.is_set() else self.new_session()
            if session is not None:
                try:
                    if self.begin(session):
                        self._run(session, conn)
                finally:
                    self.finish(session)
        except OSError as error:
            log.info("session ended: %s", error)
        except Exception:
            log.exception("session ended by a failure")  # the target's, or a bug: serve on
        finally:
            self._active = None
            hang_up(conn)

    def _run(self, session: S, conn: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(conn, selectors.EVENT_READ, "client")
            selector.register(self._listener, selectors.EVENT_READ, "newcomer")
            selector.register(self._wake_reader, selectors.EVENT_READ, "wake")
            refusals = Refusals(selector)
            try:
                self._loop(Exchange(session, conn), selector, refusals)
            finally:
                refusals.close()

    def _loop(
        self, exchange: Exchange, selector: selectors.BaseSelector, refusals: Refusals
    ) -> None:
        session = exchange.session
        last_packet = time.monotonic()
        while not session.ended and not self._closed.is_set():
            if session.running:
                reply = session.poll(POLL_INTERVAL)
                if reply is not None:
                    exchange.send(reply)
                    continue
                wait: float | None = 0.0
            else:
                idle = None if self.idle_timeout is None else last_packet + self.idle_timeout
                if idle is not None and time.monotonic() >= idle:
                    log.info("session idle for %.0f s: ended", self.idle_timeout)
                    return
                deadlines = [d for d in (idle, refusals.next_deadline()) if d is not None]
                wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready = selector.select(wait)
            # The client first: one that left just before a newcomer came makes way for it.
            for key, _ in sorted(ready, key=lambda event: event[0].data != "client"):
                if key.data == "client":
                    if not exchange.receive() or session.ended:
                        return
                    last_packet = time.monotonic() if exchange.progressed else last_packet
                elif key.data == "newcomer":
                    newcomer = accept(self._listener)
                    if newcomer is not None:
                        refusals.admit(newcomer)
                elif isinstance(key.data, Refusal):
                    refusals.on_readable(key.data)
            refusals.expire()

    def stop_serving(self) -> None:
        """Make :meth:`serve` return once the session in progress ends."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"x")

    def close(self) -> None:
        """End the session in progress, make :meth:`serve` return and stop listening."""
        self.stop_serving()
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


class GdbStub(GdbServer[Session]):
    """A GDB remote stub serving guest physical ``memory`` (see :mod:`guestmem.gdbstub`)."""

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
        """Listen as :class:`GdbServer` does; ``read_only`` refuses every write.

        ``registers`` gives the values ``g`` and ``p`` report (default: zeros).
        """
        super().__init__(
            host=host,
            port=port,
            unix_path=unix_path,
            allow_remote=allow_remote,
            idle_timeout=idle_timeout,
        )
        self.memory = memory
        self.registers = registers
        self.read_only = read_only

    def new_session(self) -> Session:
        """A session over :attr:`memory`, as this process."""
        return Session(self.memory, self.registers, os.getpid(), read_only=self.read_only)
