"""The backend side of vhost-user: guestmem's device models served to QEMU and other VMMs.

One module a concern:

``protocol``
    the numbers: requests, flags, feature bits, payload layouts.
``wire``
    one message off the socket (header, payload, SCM_RIGHTS fds) and replies.
``payloads``
    each request's payload decoded with its size checked.
``memory_table``
    SET_MEM_TABLE's regions checked, mapped through :class:`guestmem.GuestMemory`
    (fds at their mmap offsets, the backend's tag mode), user addresses -> GPAs.
``dirty_log``
    the frontend's shared dirty log (LOG_SHMFD).
``vring``
    one ring's state: size, addresses, base, eventfds, enable, its SplitQueue.
``device``
    what a device model must be to be served (:class:`BackendDevice`).
``session``
    one connection's state; every request checked, then applied.
``server``
    one frontend at a time on an owner-only socket, kicks served in its loop.
``errors``
    :class:`VhostUserError` and its kinds: each closes the connection.
"""

from guestmem.vhost_user.device import BackendDevice, DeviceFactory
from guestmem.vhost_user.errors import (
    FeatureError,
    LogError,
    MemoryTableError,
    MessageError,
    VhostUserError,
    VringError,
)
from guestmem.vhost_user.protocol import OFFERED_PROTOCOL_FEATURES, ProtocolFeature, Request
from guestmem.vhost_user.server import BackendServer, serve_connection
from guestmem.vhost_user.session import Session

__all__ = [
    "OFFERED_PROTOCOL_FEATURES",
    "BackendDevice",
    "BackendServer",
    "DeviceFactory",
    "FeatureError",
    "LogError",
    "MemoryTableError",
    "MessageError",
    "ProtocolFeature",
    "Request",
    "Session",
    "VhostUserError",
    "VringError",
    "serve_connection",
]
