"""Access classes, routes, tag modes and the policy between them.

Why an access happens (Access), how it is carried out (Route), and the
Policy that maps the one to the other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from guestmem.errors import ArgumentTypeError, UsageError


class Access(enum.Enum):
    """The reason for an access, which decides its default route."""

    DEBUG = "debug"
    MIGRATION = "migration"
    DMA = "dma"


class Route(enum.IntEnum):
    """How the native core reaches tagged memory (values match ``enum gm_route``)."""

    TCO = 0
    MATCH_ALL = 1
    BOUNCE = 2
    UNCHECKED_THREAD = 3
    CHECKED = 4


class TagMode(enum.IntEnum):
    """Where allocation tags live (values match ``enum gm_mode``)."""

    NONE = 0
    SOFTWARE = 1
    HARDWARE = 2
    KVM = 3


class Direction(enum.Enum):
    """Which way data moves through a DMA mapping, seen from the device."""

    TO_DEVICE = "to_device"
    FROM_DEVICE = "from_device"
    BIDIRECTIONAL = "bidirectional"

    @property
    def copies_in(self) -> bool:
        """Whether the device reads guest memory (data is copied in at map time)."""
        return self is not Direction.FROM_DEVICE

    @property
    def copies_out(self) -> bool:
        """Whether the device writes guest memory (data is copied out at unmap time)."""
        return self is not Direction.TO_DEVICE


@dataclass(frozen=True)
class Policy:
    """The default route of each access class; a call may still name its own.

    ``io`` is the route of DMA system-call I/O (``mem.dma.io``), which must
    be safe for the kernel's own tag checks: never TCO.
    """

    dma: Route = Route.TCO
    debug: Route = Route.TCO
    migration: Route = Route.MATCH_ALL
    io: Route = Route.MATCH_ALL

    def __post_init__(self) -> None:
        for name in ("dma", "debug", "migration", "io"):
            route = getattr(self, name)
            if not isinstance(route, Route):
                raise ArgumentTypeError(f"{name}: a Route, not {route!r}")
            if route is Route.CHECKED:
                raise UsageError(f"{name}: CHECKED needs a tag per call and cannot be a default")
        if self.io is Route.TCO:
            raise UsageError("io: TCO is not safe for system calls (the kernel checks with TCO=0)")

    def route_for(self, access: Access) -> Route:
        """Return the route this policy gives ``access``."""
        route: Route = getattr(self, access.value)
        return route
