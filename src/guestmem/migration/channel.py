"""Migration channels: where a migration goes, and the socket that carries it.

An endpoint is ``unix:PATH`` or ``tcp:HOST:PORT``. Who can connect:

- a unix socket is its owner's only: bound 0600 whatever the umask
  (:func:`guestmem.owner_only.bind_unix`), a live socket at the path refused,
  a stale one replaced, and removed again when the listener closes;
- tcp with a :class:`TlsConfig` is TLS 1.3 with mutual authentication: each
  side presents a certificate that must chain to the other's CA, and the
  client checks that the server's names the host it dialled;
- plain tcp is for loopback addresses; anything else needs
  ``allow_insecure=True`` and warns (:class:`InsecureChannelWarning`), as
  ``gdbserve --allow-remote`` does.

Every failure to open a channel is a :class:`ChannelError` naming the
endpoint (a :class:`ChannelTimeoutError` when a deadline passed); every
mistake of the caller's (a bad endpoint, a missing certificate, plain tcp to
a remote host) is a :class:`UsageError`, raised before any connection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import warnings

from guestmem.errors import (
    ChannelError,
    ChannelTimeoutError,
    GuestMemoryError,
    HandshakeError,
    InsecureChannelWarning,
    UsageError,
)
from guestmem.migration.endpoint import Endpoint, parse_endpoint
from guestmem.migration.tls import TlsConfig, reason
from guestmem.owner_only import bind_unix

__all__ = [
    "CONNECT_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "ChannelError",
    "ChannelTimeoutError",
    "Endpoint",
    "HandshakeError",
    "InsecureChannelWarning",
    "Listener",
    "TlsConfig",
    "connect",
    "listen",
    "parse_endpoint",
]

CONNECT_TIMEOUT = 30.0
"""Seconds a :func:`connect` (with its TLS handshake) may take by default."""

HANDSHAKE_TIMEOUT = 10.0
"""Seconds an accepted client has to complete its TLS handshake."""

# After a TLS handshake the server sends this byte once it has verified the
# client. In TLS 1.3 a client's handshake ends before the server has checked
# its certificate; waiting for the byte makes a refused certificate fail the
# client's connect() rather than its first send.
_ACCEPTED = b"\x06"


def _check_policy(endpoint: Endpoint, tls: TlsConfig | None, allow_insecure: bool) -> None:
    """Refuse TLS on unix and plain tcp off loopback (unless allowed, then warn)."""
    if endpoint.family == "unix":
        if tls is not None:
            raise UsageError(f"{endpoint}: TLS is for tcp endpoints; a unix socket is owner-only")
        return
    if tls is not None or endpoint.loopback:
        return
    if not allow_insecure:
        raise UsageError(
            f"{endpoint}: plain tcp off this host carries guest memory unauthenticated and "
            "in clear: use TLS (certificate, key and CA), or allow it explicitly "
            "(allow_insecure, --allow-insecure)"
        )
    warnings.warn(
        InsecureChannelWarning(
            f"{endpoint}: plain tcp to or from a non-loopback address: anyone on the "
            "network path can read the guest's memory, or send this side a guest"
        ),
        stacklevel=3,
    )


def connect(
    endpoint: Endpoint,
    *,
    tls: TlsConfig | None = None,
    timeout: float | None = CONNECT_TIMEOUT,
    allow_insecure: bool = False,
) -> socket.socket:
    """A socket connected to ``endpoint`` (an ``ssl.SSLSocket`` with ``tls``).

    ``timeout`` bounds the connect and the TLS handshake (None: no bound);
    the socket returned is blocking, with no timeout, for the caller to set.
    """
    where = str(endpoint)
    if endpoint.port == 0:
        raise UsageError(f"{where}: port 0 is for listening")
    _check_policy(endpoint, tls, allow_insecure)
    context = tls.client_context() if tls is not None else None
    try:
        if endpoint.family == "unix":
            assert endpoint.path is not None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(endpoint.path)
            except BaseException:
                sock.close()
                raise
        else:
            assert endpoint.host is not None and endpoint.port is not None
            sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except TimeoutError as err:
        raise ChannelTimeoutError(
            where, f"no answer within {timeout:g} s", errno=errno.ETIMEDOUT
        ) from err
    except OSError as err:
        if isinstance(err, GuestMemoryError):
            raise
        raise ChannelError(where, f"cannot connect: {reason(err)}", errno=err.errno) from err
    if context is None:
        sock.settimeout(None)
        return sock
    try:
        secure = context.wrap_socket(sock, server_hostname=endpoint.host)
    except OSError as err:
        sock.close()
        raise ChannelError(where, f"TLS handshake failed: {reason(err)}") from err
    try:
        answer = secure.recv(1)
    except OSError as err:
        secure.close()
        raise ChannelError(where, f"TLS handshake failed: {reason(err)}") from err
    if answer != _ACCEPTED:
        secure.close()
        raise ChannelError(
            where, "the peer closed the connection after the TLS handshake (was this side's "
            "certificate refused?)"
        )  # fmt: skip
    secure.settimeout(None)
    return secure


def listen(
    endpoint: Endpoint,
    *,
    tls: TlsConfig | None = None,
    allow_insecure: bool = False,
    backlog: int = 1,
) -> Listener:
    """A :class:`Listener` on ``endpoint``; with ``tls``, clients must pass mutual TLS."""
    _check_policy(endpoint, tls, allow_insecure)
    context = tls.server_context() if tls is not None else None
    where = str(endpoint)
    if endpoint.family == "unix":
        assert endpoint.path is not None
        sock = bind_unix(endpoint.path, backlog)
        try:
            identity = _identity(endpoint.path)
        except OSError as err:
            sock.close()
            raise ChannelError(where, f"cannot listen: {reason(err)}", errno=err.errno) from err
        return Listener(sock, endpoint, context, identity)
    assert endpoint.host is not None and endpoint.port is not None
    try:
        family = socket.getaddrinfo(
            endpoint.host, endpoint.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0][0]
        sock = socket.create_server((endpoint.host, endpoint.port), family=family, backlog=backlog)
    except OSError as err:
        raise ChannelError(where, f"cannot listen: {reason(err)}", errno=err.errno) from err
    bound = Endpoint("tcp", host=endpoint.host, port=sock.getsockname()[1])
    return Listener(sock, bound, context, None)


def _identity(path: str) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_dev, info.st_ino


class Listener:
    """A listening channel from :func:`listen`: accept clients, then close.

    :meth:`close` (or leaving a ``with`` block) removes the unix socket file
    it created, unless something else has been put at the path since.
    """

    def __init__(
        self,
        sock: socket.socket,
        endpoint: Endpoint,
        context: ssl.SSLContext | None,
        identity: tuple[int, int] | None,
    ) -> None:
        """Take over a listening socket; :func:`listen` makes these."""
        self._socket = sock
        self._context = context
        self._identity = identity
        self.endpoint = endpoint
        """Where it listens (with the real port when asked for port 0)."""

    @property
    def tls(self) -> bool:
        """Whether clients must pass a TLS handshake."""
        return self._context is not None

    def accept(self, timeout: float | None = None) -> socket.socket:
        """The next client, after its TLS handshake when there is TLS.

        Waits ``timeout`` seconds at most (None: forever) for a client
        (:class:`ChannelTimeoutError`), then :data:`HANDSHAKE_TIMEOUT` for its
        handshake. A client that fails the handshake is dropped and raises
        :class:`HandshakeError`; the listener goes on accepting. The socket
        returned is blocking, with no timeout.
        """
        where = str(self.endpoint)
        self._socket.settimeout(timeout)
        try:
            conn, peer = self._socket.accept()
        except TimeoutError as err:
            raise ChannelTimeoutError(
                where, f"no peer within {timeout:g} s", errno=errno.ETIMEDOUT
            ) from err
        except OSError as err:
            raise ChannelError(where, f"cannot accept: {reason(err)}", errno=err.errno) from err
        if self._context is None:
            conn.settimeout(None)
            return conn
        conn.settimeout(HANDSHAKE_TIMEOUT)
        try:
            secure = self._context.wrap_socket(conn, server_side=True)
            secure.sendall(_ACCEPTED)
        except OSError as err:
            conn.close()
            raise HandshakeError(
                where, f"TLS handshake with {_peer(peer)} failed: {reason(err)}"
            ) from err
        secure.settimeout(None)
        return secure

    def close(self) -> None:
        """Stop listening (waking an :meth:`accept` in another thread); remove the socket file."""
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        if self._identity is not None and self.endpoint.path is not None:
            with contextlib.suppress(OSError):
                if _identity(self.endpoint.path) == self._identity:
                    os.unlink(self.endpoint.path)
            self._identity = None

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else peer[0]
        return f"{host}:{peer[1]}"
    return "a client"
