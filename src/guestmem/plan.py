"""An access resolved once: the route that carries it and, for CHECKED, its logical tag.

Every entry point — the memory calls, ``dma.map``, ``dma.io`` and the
benchmarks — turns its ``(access, route, tag)`` into a :class:`Plan` here and
acts on the plan alone, so the rules (a default from the policy, CHECKED
needs a tag and nothing else takes one, system calls refuse routes that are
not safe for them) are written once.
"""

from __future__ import annotations

from dataclasses import dataclass

from guestmem._args import check_tag
from guestmem.errors import ArgumentTypeError, TagError, UnsupportedError, UsageError
from guestmem.kinds import Access, Policy, Route


@dataclass(frozen=True)
class Plan:
    """How one access is carried out."""

    route: Route
    tag: int = 0  # the logical tag CHECKED compares; 0 for the other routes


def defaults(policy: Policy) -> dict[Access, Plan]:
    """The plan of each access class that names no route of its own."""
    return {access: Plan(policy.route_for(access)) for access in Access}


def resolve(
    policy: Policy, access: Access, route: Route | None, tag: int | None, *, io: bool = False
) -> Plan:
    """The plan for an access of class ``access``, or of the explicit ``route``.

    ``io``: the access is a system call on guest memory (``mem.dma.io``): its
    default is ``policy.io``, and a route that is not syscall-safe is refused.
    """
    if not isinstance(access, Access):
        raise ArgumentTypeError(f"access must be an Access, not {access!r}")
    chosen = _default(policy, access, io) if route is None else _route(route)
    if io and not chosen.syscall_safe:
        raise UnsupportedError(
            f"Route.{chosen.name} is not safe for system calls: the kernel checks user memory "
            "with TCO=0; use MATCH_ALL, BOUNCE or UNCHECKED_THREAD"
        )
    if chosen is Route.CHECKED:
        if tag is None:
            raise TagError("Route.CHECKED needs the logical tag: tag=0..15")
        return Plan(chosen, check_tag(tag))
    if tag is not None:
        raise TagError(f"tag= is only for Route.CHECKED, not {chosen.name}")
    return Plan(chosen)


def _default(policy: Policy, access: Access, io: bool) -> Route:
    return policy.io if io else policy.route_for(access)


def _route(route: object) -> Route:
    if isinstance(route, bool) or not isinstance(route, (Route, int)):
        raise ArgumentTypeError(f"route must be a Route, not {route!r}")
    try:
        return Route(route)
    except ValueError:
        raise UsageError(f"no such route: {route!r}") from None
