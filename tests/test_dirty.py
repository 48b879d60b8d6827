"""The dirty log: the library's writes mark pages, a VMM can mark more, and
taking the log clears it in one step."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import guestmem as gm
from conftest import BASE, REGION

PAGE = 4096


def frames(*gpas: int) -> list[int]:
    return sorted({g // PAGE for g in gpas})


def test_off_until_started(mem: gm.GuestMemory) -> None:
    mem.write(BASE, b"x")
    assert not mem.dirty.active
    with pytest.raises(RuntimeError):
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
    assert mem.dirty.take().tolist() == sorted(expected)
    assert mem.dirty.take().size == 0


def test_take_loses_no_concurrent_mark(mem: gm.GuestMemory) -> None:
    mem.dirty.start()
    seen: set[int] = set()

    def writer() -> None:
        for page in range(16 * 50):
            mem.write(BASE + (page % 16) * PAGE, b"w")

    thread = threading.Thread(target=writer)
    thread.start()
    while thread.is_alive():
        seen.update(mem.dirty.take().tolist())
    thread.join()
    seen.update(mem.dirty.take().tolist())
    assert seen == {int(f) for f in np.arange(16) + BASE // PAGE}
