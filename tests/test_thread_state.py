"""Contract: TCO and the thread's tag-check mode are restored on every exit
path of a scope: an exception in it, an exception while leaving it, and
close() called inside it."""

from __future__ import annotations

import contextlib

import pytest

import guestmem as gm
from conftest import BASE

SCOPE_ROUTES = [gm.Route.TCO, gm.Route.UNCHECKED_THREAD, gm.Route.BOUNCE, gm.Route.MATCH_ALL]


def thread_state() -> tuple[bool, gm.CheckMode]:
    return gm.thread_tco(), gm.thread_check_mode()


@pytest.fixture(autouse=True)
def checked_thread() -> None:
    """Each test starts with TCO clear: a leak from an earlier one fails here, not silently."""
    assert not gm.thread_tco(), "TCO was left set by an earlier test"


@pytest.mark.parametrize("dirty", [False, True], ids=["clean", "dirty-log-on"])
@pytest.mark.parametrize("direction", list(gm.Direction), ids=lambda d: d.name)
@pytest.mark.parametrize("route", SCOPE_ROUTES, ids=lambda r: r.name)
def test_close_inside_a_map_scope_restores_the_thread(
    mode: gm.TagMode, route: gm.Route, direction: gm.Direction, dirty: bool
) -> None:
    memory = gm.GuestMemory.anonymous(0x10000, gpa=BASE, tags=mode)
    if dirty:
        memory.dirty.start()
    before = thread_state()
    with (
        contextlib.suppress(gm.ClosedError),
        memory.dma.map(BASE, 64, direction, route=route) as buf,
    ):
        buf[:4] = b"abcd"
        memory.close()
    assert thread_state() == before


@pytest.mark.parametrize("route", SCOPE_ROUTES, ids=lambda r: r.name)
def test_an_exception_in_the_scope_restores_the_thread(
    mem: gm.GuestMemory, route: gm.Route
) -> None:
    before = thread_state()
    with pytest.raises(KeyError), mem.dma.map(BASE, 64, gm.Direction.FROM_DEVICE, route=route):
        raise KeyError("device failed")
    assert thread_state() == before


@pytest.mark.parametrize("route", SCOPE_ROUTES, ids=lambda r: r.name)
def test_an_exception_while_leaving_restores_the_thread(
    mem: gm.GuestMemory, route: gm.Route
) -> None:
    """The dirty log fails at exit (its memory closed under it): state comes back first."""
    before = thread_state()
    mem.dirty.start()
    mapping = mem.dma.map_segments(BASE, 64, gm.Direction.BIDIRECTIONAL, route=route)
    with contextlib.suppress(gm.ClosedError), mapping:
        mem.close()
    assert thread_state() == before


def test_a_failing_scope_entry_changes_nothing(tmem: gm.GuestMemory) -> None:
    tmem.set_tags(BASE, 64, 3)
    before = thread_state()
    with (
        pytest.raises(gm.TagCheckError),
        tmem.dma.map(BASE, 64, gm.Direction.TO_DEVICE, route=gm.Route.CHECKED, tag=4),
    ):
        pass
    assert thread_state() == before


def test_nested_scopes_unwind_in_order(mem: gm.GuestMemory) -> None:
    before = thread_state()
    with (
        contextlib.suppress(gm.ClosedError),
        mem.dma.map(BASE, 16, gm.Direction.FROM_DEVICE, route=gm.Route.TCO),
        gm.unchecked_thread(),
        mem.dma.map(BASE + 16, 16, gm.Direction.FROM_DEVICE, route=gm.Route.UNCHECKED_THREAD),
    ):
        mem.dirty.start()
        mem.close()
    assert thread_state() == before
