"""Proof that the routes do the work: on real (emulated) MTE the same access
with no route dies of a tag-check fault, and nothing the library does leaves
the thread unchecked. Faults that kill run in child processes."""

from __future__ import annotations

import pytest

import guestmem as gm
from conftest import died_of_sigsegv, needs_mte, run_child

SETUP = """
import guestmem as gm
mem = gm.GuestMemory.anonymous(0x10000, gpa=0x40000000, tags="hardware")
mem.set_tags(0x40000000, 0x1000, 5)
"""


@pytest.mark.kernel  # the fault also arrives from a real kernel
@needs_mte
def test_plain_access_to_tagged_memory_faults() -> None:
    result = run_child(
        SETUP
        + """
with gm.unchecked():
    assert mem.view(0x40000000, 16)[3] == 0
print("routed ok", flush=True)
mem.view(0x40000000, 16)[3]
print("not reached", flush=True)
"""
    )
    assert "routed ok" in result.stdout, result.stderr
    assert "not reached" not in result.stdout
    assert died_of_sigsegv(result), (result.returncode, result.stderr)


@pytest.mark.kernel  # the fault also arrives from a real kernel
@needs_mte
def test_thread_checks_survive_every_route_and_every_error() -> None:
    result = run_child(
        SETUP
        + """
for route in gm.Route:
    kw = {"tag": 5} if route is gm.Route.CHECKED else {}
    mem.write(0x40000010, b"x" * 100, route=route, **kw)
    assert mem.read(0x40000010, 100, route=route, **kw) == b"x" * 100
    assert not gm.thread_tco() and gm.thread_check_mode() is gm.CheckMode.SYNC, route
for bad in (dict(route=gm.Route.CHECKED, tag=4), dict(route=gm.Route.TCO, tag=99)):
    try:
        mem.read(0x40000010, 100, **bad)
    except gm.GuestMemoryError as e:
        print("raised", type(e).__name__, flush=True)
try:
    mem.read(0x50000000, 1)
except gm.AddressError:
    print("raised AddressError", flush=True)
with mem.dma.map(0x40000000, 64, gm.Direction.FROM_DEVICE) as buf:
    buf[0] = 1
assert not gm.thread_tco() and gm.thread_check_mode() is gm.CheckMode.SYNC
print("state ok", flush=True)
mem.view(0x40000000, 16)[0]
print("not reached", flush=True)
"""
    )
    assert result.stdout.count("raised") == 3, result.stdout + result.stderr
    assert "raised TagCheckError" in result.stdout
    assert "state ok" in result.stdout, result.stderr
    assert "not reached" not in result.stdout
    assert died_of_sigsegv(result), (result.returncode, result.stderr)


@needs_mte
def test_other_segfaults_reach_the_handler_that_was_there_before() -> None:
    """A fault outside our armed sections goes on to Python's faulthandler."""
    result = run_child(
        """
import faulthandler, ctypes
faulthandler.enable()
import guestmem as gm
mem = gm.GuestMemory.anonymous(0x10000, tags="hardware")
mem.set_tags(0, 16, 3)
try:
    mem.read(0, 16, route=gm.Route.CHECKED, tag=2)
except gm.TagCheckError:
    print("caught tag fault", flush=True)
ctypes.string_at(8)
"""
    )
    assert "caught tag fault" in result.stdout, result.stderr
    assert "Fatal Python error: Segmentation fault" in result.stderr
    assert died_of_sigsegv(result)


@needs_mte
def test_unchecked_thread_really_turns_checks_off() -> None:
    result = run_child(
        SETUP
        + """
with gm.unchecked_thread():
    assert gm.thread_check_mode() is gm.CheckMode.NONE
    mem.view(0x40000000, 16)[0]
print("unchecked ok", flush=True)
mem.view(0x40000000, 16)[0]
"""
    )
    assert "unchecked ok" in result.stdout, result.stderr
    assert died_of_sigsegv(result)


def test_scopes_nest_and_restore(mode: gm.TagMode) -> None:
    with gm.GuestMemory.anonymous(0x10000, tags=mode):
        tco, checks = gm.thread_tco(), gm.thread_check_mode()
        with gm.unchecked():
            with gm.unchecked():
                assert gm.thread_tco()
            assert gm.thread_tco()
        assert gm.thread_tco() == tco
        with gm.unchecked_thread(), gm.unchecked_thread():
            assert gm.thread_check_mode() is gm.CheckMode.NONE
        assert gm.thread_check_mode() == checks


def test_hardware_without_mte_is_refused() -> None:
    if gm.has_mte():
        pytest.skip("this CPU has MTE: the refusal is for CPUs without it")
    with pytest.raises(gm.UnsupportedError, match="MTE"):
        gm.GuestMemory.anonymous(0x10000, tags="hardware")
    assert gm.resolve_tag_mode("auto") is gm.TagMode.SOFTWARE
