"""Regions, translation, views and their lifetime, memfd sharing, tag modes."""

from __future__ import annotations

import gc
import mmap

import numpy as np
import pytest

import guestmem as gm
from conftest import BASE, QEMU_USER, REGION


def mapped(address: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False


def test_lookup_and_spanning_access(mem: gm.GuestMemory) -> None:
    assert [r.gpa for r in mem.regions] == [BASE, BASE + REGION, BASE + 3 * REGION]
    assert mem.find_region(BASE + REGION + 5).gpa == BASE + REGION
    pieces = mem.translate(BASE + REGION - 3, 10)
    assert [(r.gpa, off, n) for r, off, n in pieces] == [
        (BASE, REGION - 3, 3),
        (BASE + REGION, 0, 7),
    ]
    mem.write(BASE + REGION - 3, b"0123456789")
    assert mem.read(BASE + REGION - 3, 10) == b"0123456789"


def test_view_is_zero_copy(mem: gm.GuestMemory) -> None:
    view = mem.view(BASE + 100, 32)
    with gm.unchecked():
        view[:] = np.arange(32, dtype=np.uint8)
    assert mem.read(BASE + 100, 32) == bytes(range(32))
    mem.write(BASE + 100, b"\xff")
    with gm.unchecked():
        assert view[0] == 0xFF
    with pytest.raises(gm.AddressError, match="spans"):
        mem.view(BASE + REGION - 1, 2)


def test_memory_is_unmapped_only_after_the_last_view(mode: gm.TagMode) -> None:
    memory = gm.GuestMemory.anonymous(0x10000, tags=mode)
    memory.write(0x20, b"still here")
    address = memory.regions[0].host_address
    view = memory.view(0x20, 10)
    memory.close()
    del memory
    gc.collect()
    assert mapped(address)
    with gm.unchecked():
        assert view.tobytes() == b"still here"
    del view
    gc.collect()
    assert not mapped(address)


def test_memfd_region_is_shared_by_fd(mode: gm.TagMode) -> None:
    if mode is gm.TagMode.HARDWARE and QEMU_USER:
        with pytest.raises(gm.UnsupportedError, match="shared mappings"):
            gm.GuestMemory.memfd(0x10000, tags=mode)
        return
    with gm.GuestMemory.memfd(0x10000, gpa=BASE, tags=mode) as memory:
        region = memory.regions[0]
        assert region.backing is gm.Backing.MEMFD and region.fd is not None
        memory.write(BASE + 0x123, b"shared bytes")
        with mmap.mmap(region.fd, 0x10000) as other:
            assert other[0x123 : 0x123 + 12] == b"shared bytes"
            other[0:4] = b"back"
        assert memory.read(BASE, 4) == b"back"


def test_tags_round_trip_and_leave_data(tagged_mode: gm.TagMode) -> None:
    with gm.GuestMemory.from_layout(
        [(BASE, REGION), (BASE + REGION, REGION)], tags=tagged_mode
    ) as m:
        m.write(BASE, b"\x5a" * 2 * REGION)
        tags = (np.arange(2 * REGION // 16) % 16).astype(np.uint8)
        m.set_tags(BASE, 2 * REGION, tags)
        np.testing.assert_array_equal(m.get_tags(BASE, 2 * REGION), tags)
        assert m.get_tags(BASE + 16 * 5, 16 * 3).tolist() == [5, 6, 7]
        assert m.read(BASE, 2 * REGION) == b"\x5a" * 2 * REGION


def test_new_memory_has_tag_zero_and_none_mode_has_no_tags(mode: gm.TagMode) -> None:
    with gm.GuestMemory.anonymous(0x10000, tags=mode) as memory:
        assert not memory.get_tags(0, 0x10000).any()
        if mode is gm.TagMode.NONE:
            with pytest.raises(gm.UnsupportedError):
                memory.set_tags(0, 16, 1)


def test_auto_never_claims_hardware_it_lacks() -> None:
    expected = gm.TagMode.HARDWARE if gm.has_mte() else gm.TagMode.SOFTWARE
    with gm.GuestMemory.anonymous(0x10000) as memory:
        assert memory.tag_mode is expected
