"""The listening side: one GDB session at a time, one after another.

TCP binds 127.0.0.1 unless another host is named; a Unix socket path works
too. Each session acknowledges packets until GDB asks for no-ack mode,
answers ``-`` to a damaged packet and resends its last reply on ``-``. ``k``,
``D`` or a closed connection ends the session; the server then takes the
next one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading

from guestmem._closing import ClosesOnExit
from guestmem.gdbstub.packets import BadPacket, Nak, Packet, PacketReader, frame
from guestmem.gdbstub.session import Session
from guestmem.gdbstub.target import RegisterProvider, no_registers
from guestmem.memory import GuestMemory

log = logging.getLogger(__name__)


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
    ) -> None:
        """Listen on ``host:port`` (0: any free port) or, if given, on ``unix_path``."""
        self.memory = memory
        self.registers = registers
        self._closed = threading.Event()
        if unix_path is not None:
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(unix_path)
        else:
            self._listener = socket.create_server((host, port))
        self._listener.listen(1)
        self._unix_path = unix_path

    @property
    def address(self) -> str:
        """Where GDB connects: ``host:port`` or the socket path (``target remote ...``)."""
        if self._unix_path is not None:
            return self._unix_path
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    def serve(self, sessions: int | None = None) -> None:
        """Serve sessions one after another: ``sessions`` of them, or until closed."""
        served = 0
        while sessions is None or served < sessions:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closed.is_set():
                    return
                raise
            with conn:
                self.serve_connection(conn)
            served += 1

    def serve_connection(self, conn: socket.socket) -> None:
        """Run one session on a connected socket until it ends or the peer goes away."""
        try:
            self._run(Session(self.memory, self.registers, os.getpid()), conn)
        except OSError as error:
            log.info("session ended: %s", error)

    def _run(self, session: Session, conn: socket.socket) -> None:
        reader = PacketReader()
        last_reply: bytes | None = None
        while not session.ended:
            data = conn.recv(65536)
            if not data:
                return
            for event in reader.feed(data):
                if isinstance(event, Packet):
                    if not session.no_ack:
                        conn.sendall(b"+")
                    reply = self._reply(session, event.payload)
                    if reply is not None:
                        last_reply = frame(reply)
                        conn.sendall(last_reply)
                    if session.ended:
                        return
                elif isinstance(event, BadPacket):
                    log.info("bad packet: %s", event.reason)
                    if not session.no_ack:
                        conn.sendall(b"-")
                elif isinstance(event, Nak) and last_reply is not None and not session.no_ack:
                    conn.sendall(last_reply)

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
        """Stop listening (a session in progress runs to its end)."""
        self._closed.set()
        with contextlib.suppress(OSError):  # not connected: nothing to shut down
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        if self._unix_path is not None and os.path.exists(self._unix_path):
            os.unlink(self._unix_path)
