"""Migration endpoints: ``unix:PATH`` or ``tcp:HOST:PORT``, parsed, printed and resolved."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Literal

from guestmem.errors import UsageError


@dataclass(frozen=True)
class Endpoint:
    """Where a migration channel goes: a unix socket's path, or a tcp host and port.

    ``port`` 0 is allowed for ``channel.listen`` (any free port; the
    listener's ``endpoint`` has the real one), not for ``channel.connect``.
    """

    family: Literal["unix", "tcp"]
    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        """Refuse fields that do not describe one endpoint."""
        if self.family == "unix":
            ok = isinstance(self.path, str) and self.path != "" and "\0" not in self.path
            ok = ok and self.host is None and self.port is None
        elif self.family == "tcp":
            ok = isinstance(self.host, str) and self.host != "" and self.path is None
            ok = ok and type(self.port) is int and 0 <= self.port < 65536
        else:
            ok = False
        if not ok:
            raise UsageError(f"not an endpoint: {self!r}")

    def __str__(self) -> str:
        """The endpoint as text :func:`parse_endpoint` reads back: ``unix:PATH``, ``tcp:H:P``."""
        if self.family == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in str(self.host) else self.host
        return f"tcp:{host}:{self.port}"

    def resolved(self) -> Endpoint:
        """The same endpoint with a unix path made absolute against the working directory.

        A client resolves a path before it hands it to a process that may
        run in another directory.
        """
        if self.family == "unix" and self.path is not None:
            return Endpoint("unix", path=os.path.abspath(self.path))
        return self

    @property
    def loopback(self) -> bool:
        """Whether this is a tcp endpoint on a loopback address (127.0.0.0/8, ::1, localhost).

        Judged from the text alone: a name other than ``localhost`` counts as
        remote whatever it resolves to now, since it may resolve elsewhere later.
        """
        if self.family != "tcp" or self.host is None:
            return False
        if self.host.lower() == "localhost":
            return True
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address.is_loopback


def parse_endpoint(text: str) -> Endpoint:
    """``unix:PATH``, ``HOST:PORT`` or ``tcp:HOST:PORT`` (IPv6 as ``[::1]:PORT``).

    An empty host is 127.0.0.1. Raises :class:`UsageError` naming ``text``.
    """
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise UsageError(f"not an endpoint: {text!r}: unix: needs a path")
        if "\0" in path:
            raise UsageError(f"not an endpoint: {text!r}: a path has no NUL byte")
        return Endpoint("unix", path=path)
    host, sep, port = text.removeprefix("tcp:").rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise UsageError(f"not an endpoint: {text!r}: use unix:PATH or [tcp:]HOST:PORT")
    if host.startswith("["):
        if not host.endswith("]") or not _is_ipv6(host[1:-1]):
            raise UsageError(f"not an endpoint: {text!r}: [...] holds an IPv6 address")
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"not an endpoint: {text!r}: write an IPv6 address in brackets, [::1]")
    if re.search(r"[\s\x00-\x1f/\[\]]", host):
        raise UsageError(f"not an endpoint: {text!r}: not a host name or address")
    return Endpoint("tcp", host=host or "127.0.0.1", port=int(port))


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False
