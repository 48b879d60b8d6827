"""DMA mappings: each route lends device code the right buffer, in both
directions, releases it at exit, and never changes a tag."""

from __future__ import annotations

import os

import numpy as np
import pytest

import guestmem as gm
from conftest import BASE, REGION, snapshot

DIRECT = [gm.Route.TCO, gm.Route.UNCHECKED_THREAD]


def mixed_tags(memory: gm.GuestMemory) -> None:
    if memory.tag_mode is not gm.TagMode.NONE:
        memory.set_tags(BASE, 0x1000, (np.arange(256) // 3 % 16).astype(np.uint8))


@pytest.mark.parametrize("route", [*DIRECT, gm.Route.BOUNCE], ids=lambda r: r.name)
def test_device_writes_and_reads(mem: gm.GuestMemory, route: gm.Route) -> None:
    mixed_tags(mem)
    tags = mem.get_tags(BASE, 0x1000)
    with mem.dma.map(BASE + 8, 0x800, gm.Direction.FROM_DEVICE, route=route) as buf:
        buf[:] = bytes(range(256)) * 8
    assert mem.read(BASE + 8, 0x800) == bytes(range(256)) * 8
    mem.write(BASE + 8, b"guest data")
    with mem.dma.map(BASE + 8, 10, gm.Direction.TO_DEVICE, route=route) as buf:
        assert bytes(buf) == b"guest data"
    np.testing.assert_array_equal(mem.get_tags(BASE, 0x1000), tags)


def test_tco_scope_holds_tco_for_this_thread_only(mem: gm.GuestMemory) -> None:
    with mem.dma.map(BASE, 16, gm.Direction.FROM_DEVICE, route=gm.Route.TCO):
        assert gm.thread_tco()
    assert not gm.thread_tco()
    with mem.dma.map(BASE, 16, gm.Direction.FROM_DEVICE, route=gm.Route.UNCHECKED_THREAD):
        assert gm.thread_check_mode() is gm.CheckMode.NONE
    assert gm.thread_check_mode() is not gm.CheckMode.NONE or mem.tag_mode is gm.TagMode.NONE


def test_bounce_is_a_copy(mem: gm.GuestMemory) -> None:
    mem.write(BASE, b"original")
    with mem.dma.map(BASE, 8, gm.Direction.TO_DEVICE, route=gm.Route.BOUNCE) as buf:
        buf[:] = b"scribble"
        assert mem.read(BASE, 8) == b"original"
    assert mem.read(BASE, 8) == b"original"  # TO_DEVICE writes nothing back
    with mem.dma.map(BASE, 8, gm.Direction.FROM_DEVICE, route=gm.Route.BOUNCE) as buf:
        assert bytes(buf) == bytes(8)  # not copied in: the device only writes
        buf[:] = b"from dev"
        assert mem.read(BASE, 8) == b"original"
    assert mem.read(BASE, 8) == b"from dev"


def test_match_all_segments_follow_tag_runs(mem: gm.GuestMemory) -> None:
    mixed_tags(mem)
    before = snapshot(mem)
    with mem.dma.map_segments(
        BASE + 5, 200, gm.Direction.FROM_DEVICE, route=gm.Route.MATCH_ALL
    ) as segs:
        assert sum(len(s) for s in segs) == 200
        if mem.tag_mode is not gm.TagMode.NONE:
            assert [len(s) for s in segs][:3] == [43, 48, 48]  # runs of 3 granules
        read_fd, write_fd = os.pipe()
        os.write(write_fd, bytes(range(200)))
        assert os.readv(read_fd, segs) == 200
        os.close(read_fd)
        os.close(write_fd)
    assert mem.read(BASE + 5, 200) == bytes(range(200))
    np.testing.assert_array_equal(mem.get_tags(BASE, 0x1000), before[1][0][:256])


def test_map_refuses_several_segments(mem: gm.GuestMemory) -> None:
    refused = pytest.raises(gm.UnsupportedError, match="map_segments")
    with refused, mem.dma.map(BASE + REGION - 8, 16, gm.Direction.TO_DEVICE, route=gm.Route.TCO):
        pass
    assert not gm.thread_tco()
    with mem.dma.map_segments(BASE + REGION - 8, 16, gm.Direction.FROM_DEVICE) as segs:
        assert [len(s) for s in segs] == [8, 8]
        segs[0][:] = b"A" * 8
        segs[1][:] = b"B" * 8
    assert mem.read(BASE + REGION - 8, 16) == b"A" * 8 + b"B" * 8


def test_checked_map(tmem: gm.GuestMemory) -> None:
    tmem.set_tags(BASE, 64, 11)
    with tmem.dma.map(BASE, 64, gm.Direction.FROM_DEVICE, route=gm.Route.CHECKED, tag=11) as buf:
        buf[:] = b"c" * 64
    assert tmem.read(BASE, 64) == b"c" * 64
    with pytest.raises(gm.TagCheckError) as caught:
        tmem.dma.map(
            BASE + 40, 64, gm.Direction.FROM_DEVICE, route=gm.Route.CHECKED, tag=11
        ).__enter__()
    assert caught.value.gpa == BASE + 64 and caught.value.allocation_tag == 0


def test_a_view_kept_past_a_bounce_scope_reaches_only_the_copy(mem: gm.GuestMemory) -> None:
    mem.write(BASE, b"guest!!!")
    with mem.dma.map(BASE, 8, gm.Direction.FROM_DEVICE, route=gm.Route.BOUNCE) as buf:
        kept = np.frombuffer(buf, dtype=np.uint8)
        buf[:] = b"device.."
    kept[:] = ord("z")
    assert mem.read(BASE, 8) == b"device.."
    assert not gm.thread_tco()
