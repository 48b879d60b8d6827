"""Routes resolved once: the rules of (access, route, tag) and what each route
means outside the native loops, in one place (guestmem.plan, Route)."""

from __future__ import annotations

import pytest

import guestmem as gm
from guestmem.plan import Plan, defaults, resolve

POLICY = gm.Policy(dma=gm.Route.BOUNCE, debug=gm.Route.TCO, io=gm.Route.UNCHECKED_THREAD)


def test_an_access_class_gets_its_policys_route() -> None:
    assert defaults(POLICY) == {
        gm.Access.DMA: Plan(gm.Route.BOUNCE),
        gm.Access.DEBUG: Plan(gm.Route.TCO),
        gm.Access.MIGRATION: Plan(gm.Route.MATCH_ALL),
    }
    assert resolve(POLICY, gm.Access.DMA, None, None) == Plan(gm.Route.BOUNCE)
    assert resolve(POLICY, gm.Access.DMA, None, None, io=True) == Plan(gm.Route.UNCHECKED_THREAD)
    assert resolve(POLICY, gm.Access.DEBUG, gm.Route.CHECKED, 7) == Plan(gm.Route.CHECKED, 7)


@pytest.mark.parametrize(
    ("access", "route", "tag", "io", "error"),
    [
        (gm.Access.DMA, gm.Route.CHECKED, None, False, gm.TagError),
        (gm.Access.DMA, gm.Route.TCO, 3, False, gm.TagError),
        (gm.Access.DMA, gm.Route.CHECKED, 16, False, gm.TagError),
        (gm.Access.DMA, gm.Route.TCO, None, True, gm.UnsupportedError),
        (gm.Access.DMA, 99, None, False, gm.UsageError),
        (gm.Access.DMA, "TCO", None, False, gm.ArgumentTypeError),
        (gm.Access.DMA, True, None, False, gm.ArgumentTypeError),
        ("dma", None, None, False, gm.ArgumentTypeError),
    ],
)
def test_what_cannot_be_resolved_is_refused(
    access: object, route: object, tag: object, io: bool, error: type[Exception]
) -> None:
    with pytest.raises(error):
        resolve(POLICY, access, route, tag, io=io)  # type: ignore[arg-type]


def test_every_route_has_one_meaning() -> None:
    lendings = {route.lending for route in gm.Route}
    assert len(lendings) == len(gm.Route)  # one way of lending per route
    assert [r for r in gm.Route if not r.syscall_safe] == [gm.Route.TCO]
    assert {r for r in gm.Route if r.native_iovec} == {
        gm.Route.MATCH_ALL,
        gm.Route.UNCHECKED_THREAD,
    }


def test_dma_map_and_dma_io_follow_the_plan(mem: gm.GuestMemory) -> None:
    mapping = mem.dma.map_segments(0x4000_0000, 64, gm.Direction.TO_DEVICE, route=gm.Route.BOUNCE)
    assert mapping.plan == Plan(gm.Route.BOUNCE)
    with pytest.raises(gm.UnsupportedError, match="not safe for system calls"):
        mem.dma.io.write_to(1, 0x4000_0000, 1, route=gm.Route.TCO)
    with pytest.raises(gm.UsageError, match="not safe for system calls"):
        gm.Policy(io=gm.Route.TCO)
