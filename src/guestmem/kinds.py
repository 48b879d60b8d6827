"""Access classes, routes, tag modes and the policy between them.

Why an access happens (Access), how it is carried out (Route, and what
each route means on the Python side: :class:`Lending`), and the Policy that
maps the one to the other. Route and TagMode take their values from the
native core's enums.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from guestmem._native import MODE_VALUES, ROUTE_VALUES
from guestmem.errors import ArgumentTypeError, UsageError


class Access(enum.Enum):
    """The reason for an access, which decides its default route."""

    DEBUG = "debug"
    MIGRATION = "migration"
    DMA = "dma"

    # Members are singletons compared by identity, so identity hashing agrees
    # with equality; Enum's own __hash__ (of the name, in Python) costs the
    # hot path's plan lookup ~60 ns.
    __hash__ = object.__hash__


class Lending(enum.Enum):
    """How a DMA scope (``mem.dma.map``) lends guest memory to device code."""

    TCO_SCOPE = "guest memory itself, PSTATE.TCO set for the thread"
    TAG_RUNS = "guest memory, a buffer per run of equal tags, through pointers carrying them"
    STAGING = "an untagged copy, filled at entry and written back at exit"
    UNCHECKED_SCOPE = "guest memory itself, the thread's tag checks off"
    TAGGED = "guest memory through pointers carrying the caller's logical tag"


class Route(enum.IntEnum):
    """How the native core reaches tagged memory (``enum gm_route``).

    What a route means outside the native loops is here too, in one place:
    :attr:`syscall_safe`, :attr:`lending`, :attr:`native_iovec`.
    """

    TCO = ROUTE_VALUES["TCO"]
    MATCH_ALL = ROUTE_VALUES["MATCH_ALL"]
    BOUNCE = ROUTE_VALUES["BOUNCE"]
    UNCHECKED_THREAD = ROUTE_VALUES["UNCHECKED_THREAD"]
    CHECKED = ROUTE_VALUES["CHECKED"]

    @property
    def syscall_safe(self) -> bool:
        """Whether memory reached this way survives the kernel's own tag checks.

        TCO does not: the kernel checks user memory with an effective TCO of 0.
        """
        return self is not Route.TCO

    @property
    def lending(self) -> Lending:
        """How a DMA scope lends memory under this route."""
        return _LENDING[self]

    @property
    def native_iovec(self) -> bool:
        """Whether the core builds a system call's iovec itself (gm_io.c) for this route."""
        return self in (Route.MATCH_ALL, Route.UNCHECKED_THREAD)


_LENDING = {
    Route.TCO: Lending.TCO_SCOPE,
    Route.MATCH_ALL: Lending.TAG_RUNS,
    Route.BOUNCE: Lending.STAGING,
    Route.UNCHECKED_THREAD: Lending.UNCHECKED_SCOPE,
    Route.CHECKED: Lending.TAGGED,
}


class TagMode(enum.IntEnum):
    """Where allocation tags live (``enum gm_mode``)."""

    NONE = MODE_VALUES["NONE"]
    SOFTWARE = MODE_VALUES["SOFTWARE"]
    HARDWARE = MODE_VALUES["HARDWARE"]
    KVM = MODE_VALUES["KVM"]


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
        if not self.io.syscall_safe:
            raise UsageError(
                f"io: {self.io.name} is not safe for system calls (the kernel checks with TCO=0)"
            )

    def route_for(self, access: Access) -> Route:
        """Return the route this policy gives ``access``."""
        route: Route = getattr(self, access.value)
        return route
