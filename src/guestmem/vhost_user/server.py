"""The backend's server: one frontend at a time on a Unix socket, each with a fresh device.

:func:`serve_connection` runs one connection to its end: a selector loop
over the socket and the rings' kick eventfds, every message answered or
refused. A refused message (a :class:`VhostUserError` or any other
guestmem error it caused) is reported through ``on_error`` and closes the
connection; the device, guest memory, log and every fd the frontend sent
go with it. :class:`BackendServer` listens on an owner-only socket and
serves the next frontend after each one ends.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import sys
import threading
import traceback
from collections.abc import Callable

from guestmem.errors import GuestMemoryError
from guestmem.kinds import TagMode
from guestmem.owner_only import bind_unix
from guestmem.vhost_user.device import BackendDevice, DeviceFactory
from guestmem.vhost_user.errors import VhostUserError
from guestmem.vhost_user.protocol import U64
from guestmem.vhost_user.session import Session
from guestmem.vhost_user.wire import Disconnected, Message, receive, send_reply

MESSAGE_TIMEOUT = 10.0
"""Seconds the rest of a message may take once its first byte came."""

ErrorSink = Callable[[GuestMemoryError], None]


def _print_error(error: GuestMemoryError) -> None:
    print(f"guestmem vhost-user: connection closed: {error}", file=sys.stderr)


def serve_connection(
    conn: socket.socket,
    make_device: DeviceFactory,
    tags: TagMode,
    *,
    on_error: ErrorSink = _print_error,
    timeout: float = MESSAGE_TIMEOUT,
) -> GuestMemoryError | None:
    """Serve one frontend on ``conn`` until it disconnects or sends what must be refused.

    Returns the error that ended the connection (None for a disconnect);
    ``conn`` is closed either way.
    """
    device: BackendDevice | None = None
    session: Session | None = None
    # poll(2), not epoll: an epoll set keeps a closed fd's registration while the
    # frontend still holds the file, so a new kick fd with the same number would clash.
    selector = selectors.PollSelector()
    try:
        device = make_device()
        session = Session(device, tags)
        selector.register(conn, selectors.EVENT_READ, None)
        watched: dict[int, int] = {}
        generation = -1
        while True:
            if generation != session.fd_generation:
                _rewatch(selector, watched, session.kick_fds())
                generation = session.fd_generation
            for key, _events in selector.select():
                if key.data is None:
                    message = receive(conn, timeout)
                    _answer(conn, session, message)
                else:
                    session.kicked(key.data)
    except Disconnected:
        return None
    except GuestMemoryError as error:
        _drop_frames(error)
        on_error(error)
        return error
    except OSError as error:  # the socket broke under a reply
        wrapped = VhostUserError(f"the connection failed: {error}")
        on_error(wrapped)
        return wrapped
    finally:
        selector.close()
        if session is not None:
            session.close()
        if device is not None:
            device.close()
        conn.close()


def _drop_frames(error: BaseException) -> None:
    """Forget the frames of ``error`` and its causes: their locals would keep guest memory mapped.

    A refused table or queue is referenced from the frames that refused it;
    the mappings (and the frontend's fds they hold) must go with the
    connection, not with the report of its error.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += [current.__cause__, current.__context__]


def _rewatch(
    selector: selectors.BaseSelector, watched: dict[int, int], now: dict[int, int]
) -> None:
    for fd in list(watched):
        with contextlib.suppress(KeyError, ValueError, OSError):
            selector.unregister(fd)
    watched.clear()
    for fd, index in now.items():
        try:
            selector.register(fd, selectors.EVENT_READ, index)
        except (OSError, ValueError) as err:
            raise VhostUserError(f"vring {index}: its kick fd cannot be watched ({err})") from err
        watched[fd] = index


def _answer(conn: socket.socket, session: Session, message: Message) -> None:
    try:
        try:
            reply = session.handle(message)
        except GuestMemoryError:
            if message.need_reply and session.reply_ack:
                send_reply(conn, message.request, U64.pack(1))
            raise
    finally:
        message.close_fds()
    if reply is not None:
        send_reply(conn, message.request, reply)
    elif message.need_reply and session.reply_ack:
        send_reply(conn, message.request, U64.pack(0))


class BackendServer:
    """Listens on ``path`` (mode 0600) and serves one frontend at a time, each a fresh device."""

    def __init__(
        self,
        path: str,
        make_device: DeviceFactory,
        tags: TagMode,
        *,
        on_error: ErrorSink = _print_error,
    ) -> None:
        """Bind the socket (UsageError if a live server holds ``path``)."""
        self.path = path
        self._make_device = make_device
        self._tags = tags
        self._on_error = on_error
        self._listener = bind_unix(path, backlog=1)
        self._wake_r, self._wake_w = os.pipe()
        self._closed = threading.Event()
        self.connections = 0

    def serve_forever(self) -> None:
        """Accept and serve frontends until :meth:`close`."""
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._closed.is_set():
                ready = [key.fileobj for key, _ in selector.select()]
                if self._closed.is_set() or self._wake_r in ready:
                    break
                try:
                    conn, _ = self._listener.accept()
                except OSError:
                    continue
                self.connections += 1
                try:
                    serve_connection(conn, self._make_device, self._tags, on_error=self._on_error)
                except Exception as bug:  # not a refusal: report it, serve the next frontend
                    traceback.print_exc()
                    self._on_error(
                        VhostUserError(f"the connection failed inside the backend: {bug!r}")
                    )
        finally:
            selector.close()

    def close(self) -> None:
        """Stop accepting (a connection being served ends first) and remove the socket."""
        if self._closed.is_set():
            return
        self._closed.set()
        os.write(self._wake_w, b"x")
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> BackendServer:
        """The server itself."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close it."""
        self.close()


__all__ = ["BackendServer", "serve_connection"]
