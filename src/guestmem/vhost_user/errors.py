"""The typed errors of the vhost-user backend: each closes the connection that caused it.

Every one is a :class:`guestmem.errors.ProtocolError` (a malformed message
from a peer, a ValueError) carrying ``request``, the code of the message
that was refused (0 when no whole header arrived).
"""

from __future__ import annotations

from guestmem.errors import ProtocolError


class VhostUserError(ProtocolError):
    """A frontend's message the backend refused; the connection is then closed."""

    def __init__(self, message: str, *, request: int = 0) -> None:
        super().__init__(message)
        self.request = request


class MessageError(VhostUserError):
    """A malformed message: header flags or version, payload size, fds where none belong."""


class FeatureError(VhostUserError):
    """A request or feature bit that was not offered, or not negotiated before its use."""


class MemoryTableError(VhostUserError):
    """A memory table (or region) that cannot be mapped as given: counts, sizes, overlaps."""


class VringError(VhostUserError):
    """A vring message that does not fit: index, size, addresses outside the table, order."""


class LogError(VhostUserError):
    """A dirty log (SET_LOG_BASE) that cannot be mapped or does not cover guest memory."""
