"""The dirty log: the library's writes mark host pages, a VMM can mark more,
and taking the log clears it in one step; frames carry their unit."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import guestmem as gm
from conftest import BASE, REGION

PAGE = gm.HOST_PAGE


def frames(*gpas: int) -> list[int]:
    return sorted({g // PAGE for g in gpas})


def test_off_until_started(mem: gm.GuestMemory) -> None:
    mem.write(BASE, b"x")
    assert not mem.dirty.active
    with pytest.raises(gm.UsageError):
        mem.dirty.take()


def test_writes_fills_tags_dma_and_external_marks(mem: gm.GuestMemory) -> None:
    mem.dirty.start()
    mem.write(BASE + PAGE - 1, b"ab")  # two pages
    mem.fill(BASE + REGION - 8, 16, 1)  # across regions
    mem.read(BASE + 9 * PAGE, 10)  # reads do not dirty
    if mem.tag_mode is not gm.TagMode.NONE:
        mem.set_tags(BASE + 5 * PAGE, 16, 3)
    with mem.dma.map(BASE + 7 * PAGE, 8, gm.Direction.FROM_DEVICE, route=gm.Route.TCO) as buf:
        buf[:] = b"device!!"
    with mem.dma.map(BASE + 8 * PAGE, 8, gm.Direction.TO_DEVICE, route=gm.Route.TCO):
        pass  # the device only read
    mem.dirty.mark(BASE + 3 * REGION + 2 * PAGE, 1)  # e.g. from KVM's dirty log
    expected = frames(BASE, BASE + PAGE, BASE + REGION - 8, BASE + REGION, BASE + 7 * PAGE)
    expected += frames(BASE + 3 * REGION + 2 * PAGE)
    if mem.tag_mode is not gm.TagMode.NONE:
        expected += frames(BASE + 5 * PAGE)
    taken = mem.dirty.take()
    assert taken.page == gm.HOST_PAGE
    assert taken.numbers.tolist() == sorted(expected)
    assert len(mem.dirty.take()) == 0


def test_checked_and_staged_moves_in_one_region_mark(tmem: gm.GuestMemory) -> None:
    # The one-range native call with every argument (gm_hot_move) marks in the core.
    tmem.set_tags(BASE, 8 * PAGE, 5)
    tmem.dirty.start()
    tmem.write(BASE + 2 * PAGE, b"x", route=gm.Route.CHECKED, tag=5)
    tmem.fill(BASE + 4 * PAGE - 8, 16, 7, route=gm.Route.CHECKED, tag=5)  # two pages
    tmem.read(BASE + 6 * PAGE, 16, route=gm.Route.CHECKED, tag=5)  # reads do not dirty
    expected = frames(BASE + 2 * PAGE, BASE + 4 * PAGE - 8, BASE + 4 * PAGE)
    assert tmem.dirty.take().numbers.tolist() == expected


def test_take_loses_no_concurrent_mark(mem: gm.GuestMemory) -> None:
    mem.dirty.start()
    seen: set[int] = set()

    def writer() -> None:
        for page in range(16 * 50):
            mem.write(BASE + (page % 16) * PAGE, b"w")

    thread = threading.Thread(target=writer)
    thread.start()
    while thread.is_alive():
        seen.update(mem.dirty.take().numbers.tolist())
    thread.join()
    seen.update(mem.dirty.take().numbers.tolist())
    assert seen == {int(f) for f in np.arange(16) + BASE // PAGE}


def test_frames_from_another_unit_mark_every_page_they_touch(mem: gm.GuestMemory) -> None:
    mem.dirty.start()
    stream_frame = (BASE + REGION + 3 * gm.STREAM_PAGE) // gm.STREAM_PAGE
    mem.dirty.mark_frames(gm.Frames.of([stream_frame], gm.STREAM_PAGE))
    host = (BASE + REGION + 3 * gm.STREAM_PAGE) // gm.HOST_PAGE
    assert mem.dirty.take().numbers.tolist() == [host]


@pytest.mark.parametrize("host_page", [4096, 16384, 65536])
def test_frames_convert_between_host_and_stream_pages(host_page: int) -> None:
    host = gm.Frames.of([3, 1, 3], host_page)
    assert host.numbers.tolist() == [1, 3]
    stream = host.to(gm.STREAM_PAGE)
    ratio = host_page // gm.STREAM_PAGE
    assert stream.numbers.tolist() == [*range(ratio, 2 * ratio), *range(3 * ratio, 4 * ratio)]
    assert stream.bytes == host.bytes
    assert stream.to(host_page).numbers.tolist() == [1, 3]
    # A coarser unit covers every frame that touches it: nothing dirty is dropped.
    one = gm.Frames.of([ratio * 5 + ratio - 1], gm.STREAM_PAGE)
    assert one.to(host_page).numbers.tolist() == [5]
    assert stream.union(one).numbers.tolist() == sorted({*stream.numbers.tolist(), ratio * 6 - 1})


def test_a_page_size_is_a_power_of_two() -> None:
    with pytest.raises(gm.LengthError):
        gm.Frames.of([1], 3000)
