"""Contract: the GPA space is [0, 2**64); numpy integers work wherever ints
do; bool is not an integer there; tags=None is an error."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import guestmem as gm
from conftest import BASE, REGION

TOP = 2**64


@pytest.mark.parametrize(
    "layout",
    [
        [(-0x1000, 0x1000)],
        [(TOP - 0x1000, 0x2000)],
        [(TOP, 0x1000)],
        [(0, 0x1000), (-0x2000, 0x1000)],
    ],
    ids=["negative", "past 2**64", "at 2**64", "one of two negative"],
)
def test_regions_outside_the_gpa_space_are_refused(layout: list[tuple[int, int]]) -> None:
    with pytest.raises(gm.AddressError, match="GPA space"):
        gm.GuestMemory.from_layout(layout, tags="software")


def test_the_last_page_of_the_gpa_space_works(mode: gm.TagMode) -> None:
    top = TOP - gm.PAGE_SIZE
    with gm.GuestMemory.anonymous(gm.PAGE_SIZE, gpa=top, tags=mode) as memory:
        memory.write(TOP - 16, b"the very end....")
        assert memory.read(TOP - 16, 16) == b"the very end...."
        with pytest.raises(gm.AddressError):
            memory.read(TOP - 16, 17)
        with pytest.raises(gm.AddressError):
            memory.read(TOP, 1)
        if mode is not gm.TagMode.NONE:
            memory.set_tags(TOP - 16, 16, 3)
            assert memory.get_tags(TOP - 16, 16).tolist() == [3]


INT_TYPES = [np.int64, np.uint64, np.intp]
SMALL_TYPES = [np.uint8, np.int16, np.uint32, np.int64, np.uint64]


@given(
    big=st.sampled_from(INT_TYPES),
    small=st.sampled_from(SMALL_TYPES),
    offset=st.integers(0, REGION - 64),
    byte=st.integers(0, 255),
    tag=st.integers(0, 15),
)
def test_numpy_integers_work_wherever_ints_do(
    mem: gm.GuestMemory, big: type, small: type, offset: int, byte: int, tag: int
) -> None:
    gpa = big(BASE + offset)
    n = small(48)
    mem.fill(gpa, n, small(byte))
    assert mem.read(gpa, n) == bytes([byte]) * 48
    mem.write(gpa, b"abc")
    assert mem.readv([(gpa, small(3))]) == b"abc"
    assert mem.translate(gpa, n)[0][1] == offset
    assert mem.find_region(gpa).gpa == BASE
    assert len(mem.view(gpa, n)) == 48
    aligned = big(BASE + offset - offset % 16)
    if mem.tag_mode is not gm.TagMode.NONE:
        mem.set_tags(aligned, small(32), small(tag))
        assert mem.get_tags(aligned, small(32)).tolist() == [tag, tag]
        assert mem.read(aligned, 4, route=gm.Route.CHECKED, tag=small(tag)) is not None
    with mem.dma.map(gpa, n, gm.Direction.TO_DEVICE) as buf:
        assert len(buf) == 48


def test_numpy_sizes_make_memory() -> None:
    with gm.GuestMemory.anonymous(np.uint64(0x10000), gpa=np.int64(BASE), tags="software") as m:
        assert m.regions[0].size == 0x10000
    region = gm.GuestRegion.anonymous(np.uint64(BASE), np.int32(0x10000), gm.TagMode.NONE)
    with gm.GuestMemory([region], bounce_buffers=np.uint8(2)) as m:
        assert m.read(np.uint64(BASE), np.uint16(4), route=gm.Route.BOUNCE) == bytes(4)


BOOLS: dict[str, Callable[[gm.GuestMemory], object]] = {
    "gpa": lambda m: m.read(True, 1),
    "length": lambda m: m.read(BASE, True),
    "fill byte": lambda m: m.fill(BASE, 4, True),
    "fill length": lambda m: m.fill(BASE, np.bool_(True), 1),  # type: ignore[arg-type]
    "map length": lambda m: m.dma.map(BASE, True, gm.Direction.TO_DEVICE).__enter__(),
    "region size": lambda m: gm.GuestRegion.anonymous(0, True, gm.TagMode.NONE),
}


@pytest.mark.parametrize("case", list(BOOLS), ids=str)
def test_bool_is_not_an_integer(mem: gm.GuestMemory, case: str) -> None:
    with pytest.raises(gm.ArgumentTypeError):
        BOOLS[case](mem)


def test_bool_is_not_a_tag(tmem: gm.GuestMemory) -> None:
    with pytest.raises(gm.TagError):
        tmem.set_tags(BASE, 16, True)
    with pytest.raises(gm.TagError):
        tmem.read(BASE, 1, route=gm.Route.CHECKED, tag=np.bool_(False))  # type: ignore[arg-type]


@pytest.mark.parametrize("tags", [None, 0, 2.0, b"auto", gm.Route.TCO], ids=repr)
def test_tags_must_name_a_mode(tags: object) -> None:
    with pytest.raises(gm.ArgumentTypeError):
        gm.GuestMemory.anonymous(0x10000, tags=tags)  # type: ignore[arg-type]
    with pytest.raises(gm.ArgumentTypeError):
        gm.resolve_tag_mode(tags)  # type: ignore[arg-type]
