"""Bad input gets a typed exception and changes nothing."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import guestmem as gm
from conftest import BASE, HOLE, REGION, assert_unchanged, snapshot

END = BASE + 4 * REGION

BAD_CALLS: dict[str, tuple[type[BaseException], Callable[[gm.GuestMemory], object]]] = {
    "write into the hole": (gm.AddressError, lambda m: m.write(HOLE - 8, b"x" * 16)),
    "write past the end": (gm.AddressError, lambda m: m.write(END - 4, b"x" * 8)),
    "write below guest memory": (gm.AddressError, lambda m: m.write(BASE - 1, b"xx")),
    "negative gpa": (gm.AddressError, lambda m: m.read(-16, 4)),
    "read into the hole": (gm.AddressError, lambda m: m.read(HOLE, 1)),
    "fill across the hole": (gm.AddressError, lambda m: m.fill(HOLE - 16, 64, 1)),
    "writev with one bad range": (
        gm.AddressError,
        lambda m: m.writev([(BASE, 4), (HOLE, 4)], b"abcdefgh"),
    ),
    "writev length mismatch": (gm.LengthError, lambda m: m.writev([(BASE, 4)], b"abc")),
    "negative length": (gm.LengthError, lambda m: m.read(BASE, -1)),
    "fill byte out of range": (ValueError, lambda m: m.fill(BASE, 4, 256)),
    "write a str": (gm.BufferTypeError, lambda m: m.write(BASE, "text")),
    "write an int": (gm.BufferTypeError, lambda m: m.write(BASE, 1234)),
    "readinto bytes": (gm.BufferTypeError, lambda m: m.readinto(BASE, b"immutable")),
    "write non-contiguous": (
        gm.BufferTypeError,
        lambda m: m.write(BASE, np.zeros((8, 8), np.uint8)[:, 1]),
    ),
    "tag 16": (gm.TagError, lambda m: m.set_tags(BASE, 16, 16)),
    "tag -1": (gm.TagError, lambda m: m.set_tags(BASE, 16, -1)),
    "tag array with 16": (gm.TagError, lambda m: m.set_tags(BASE, 32, [1, 16])),
    "tag array too short": (gm.TagError, lambda m: m.set_tags(BASE, 48, [1, 2])),
    "tag array of floats": (gm.TagError, lambda m: m.set_tags(BASE, 32, [1.0, 2.0])),  # type: ignore[list-item]
    "misaligned tag gpa": (gm.AlignmentError, lambda m: m.set_tags(BASE + 8, 16, 1)),
    "misaligned tag length": (gm.AlignmentError, lambda m: m.set_tags(BASE, 24, 1)),
    "tags into the hole": (gm.AddressError, lambda m: m.set_tags(HOLE - 16, 32, 1)),
    "checked without tag": (gm.TagError, lambda m: m.read(BASE, 4, route=gm.Route.CHECKED)),
    "checked with tag 17": (
        gm.TagError,
        lambda m: m.write(BASE, b"x", route=gm.Route.CHECKED, tag=17),
    ),
    "tag on a route that takes none": (
        gm.TagError,
        lambda m: m.write(BASE, b"x", route=gm.Route.BOUNCE, tag=1),
    ),
    "map into the hole": (
        gm.AddressError,
        lambda m: m.dma.map(HOLE, 16, gm.Direction.FROM_DEVICE).__enter__(),
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=str)
def test_bad_input_raises_and_changes_nothing(tmem: gm.GuestMemory, case: str) -> None:
    tmem.set_tags(BASE, 0x1000, 4)
    tmem.set_tags(END - 0x1000, 0x1000, 9)
    tmem.fill(BASE, 0x1000, 0x11)
    before = snapshot(tmem)
    error, call = BAD_CALLS[case]
    with pytest.raises(error):
        call(tmem)
    assert_unchanged(tmem, before)
    assert not gm.thread_tco()


def test_errors_share_one_base_and_their_builtin() -> None:
    assert issubclass(gm.AddressError, gm.GuestMemoryError)
    assert issubclass(gm.AddressError, ValueError)
    assert issubclass(gm.AlignmentError, ValueError)
    assert issubclass(gm.TagError, ValueError)
    assert issubclass(gm.TagCheckError, gm.GuestMemoryError)
    assert issubclass(gm.UnsupportedError, gm.GuestMemoryError)
    assert issubclass(gm.BufferTypeError, TypeError)


def test_address_error_carries_the_request(mem: gm.GuestMemory) -> None:
    with pytest.raises(gm.AddressError) as caught:
        mem.read(HOLE - 4, 8)
    assert (caught.value.gpa, caught.value.length) == (HOLE - 4, 8)


def test_released_map_buffer_raises_and_touches_nothing(mem: gm.GuestMemory) -> None:
    for route in (gm.Route.TCO, gm.Route.BOUNCE, gm.Route.UNCHECKED_THREAD, gm.Route.MATCH_ALL):
        with mem.dma.map(BASE, 64, gm.Direction.FROM_DEVICE, route=route) as buf:
            buf[:4] = b"abcd"
        before = snapshot(mem)
        with pytest.raises(ValueError, match="released"):
            buf[:4] = b"zzzz"
        with pytest.raises(ValueError, match="released"):
            bytes(buf)
        assert_unchanged(mem, before)
        assert mem.read(BASE, 4) == b"abcd"


def test_closed_memory_refuses_access(mode: gm.TagMode) -> None:
    memory = gm.GuestMemory.anonymous(0x10000, tags=mode)
    memory.close()
    with pytest.raises(gm.ClosedError):
        memory.read(0, 1)
    with pytest.raises(gm.ClosedError):
        memory.get_tags(0, 16)


def test_bad_layouts() -> None:
    with pytest.raises(gm.AlignmentError):
        gm.GuestMemory.from_layout([(0x1001, 0x1000)], tags="software")
    with pytest.raises(gm.AlignmentError):
        gm.GuestMemory.from_layout([(0, 0x1800)], tags="software")
    with pytest.raises(gm.AddressError, match="overlap"):
        gm.GuestMemory.from_layout([(0, 0x2000), (0x1000, 0x1000)], tags="software")
    with pytest.raises(ValueError):
        gm.GuestMemory.anonymous(0x1000, tags="quantum")
