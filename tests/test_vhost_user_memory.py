"""What the vhost-user backend needs of guest memory: regions at fd offsets, a shared GPA bitmap.

``SharedRegion.offset`` maps a region from the middle of a memfd (QEMU's x86
machines share RAM below 640 KiB and from 1 MiB out of one memfd);
``DirtyLog.share_bitmap`` makes every write the library makes also set the
frontend's log bits, one per 4 KiB of GPA.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import pytest

import guestmem as gm
from guestmem.region import SharedRegion
from guestmem.units import HOST_PAGE
from virtq_driver import Driver

SIZE = 1 << 20


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("offsets", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    yield fd
    os.close(fd)


def test_a_region_maps_from_its_offset_in_the_fd(memfd: int) -> None:
    os.pwrite(memfd, b"first", 0)
    os.pwrite(memfd, b"second", 0x40000)
    shared = [
        SharedRegion(0x1000_0000, 0x10000, memfd),
        SharedRegion(0x2000_0000, 0x10000, memfd, offset=0x40000),
    ]
    with gm.GuestMemory.attach(shared, tags="none") as mem:
        assert mem.read(0x1000_0000, 5) == b"first"
        assert mem.read(0x2000_0000, 6) == b"second"
        mem.write(0x2000_0010, b"through")
        assert os.pread(memfd, 7, 0x40010) == b"through"


def test_an_unaligned_offset_is_an_alignment_error(memfd: int) -> None:
    with pytest.raises(gm.AlignmentError) as caught:
        gm.GuestMemory.attach(
            [SharedRegion(0, HOST_PAGE, memfd, offset=HOST_PAGE // 2)], tags="none"
        )
    assert caught.value.alignment == HOST_PAGE


@pytest.mark.parametrize("offset", [SIZE, SIZE - HOST_PAGE, -HOST_PAGE])
def test_an_offset_the_fd_cannot_back_is_refused(memfd: int, offset: int) -> None:
    with pytest.raises(gm.SharedTableError):
        gm.GuestMemory.attach([SharedRegion(0, 2 * HOST_PAGE, memfd, offset=offset)], tags="none")


def test_an_offset_of_zero_is_what_attach_did_before(memfd: int) -> None:
    with gm.GuestMemory.memfd(SIZE, tags="none") as mine:
        mine.write(0x100, b"shared")
        (shared,) = mine.share()
        assert shared.offset == 0
        with gm.GuestMemory.attach([shared], tags="none") as theirs:
            assert theirs.read(0x100, 6) == b"shared"


def _pages(bits: bytes | bytearray | mmap.mmap) -> set[int]:
    return {i * 8 + b for i, byte in enumerate(bytes(bits)) for b in range(8) if byte >> b & 1}


def test_a_shared_bitmap_gets_every_4k_page_written(tmp_path: object) -> None:
    gpa = 0x4000_0000
    with gm.GuestMemory.memfd(SIZE, gpa=gpa, tags="none") as mem:
        bits = bytearray((gpa + SIZE) // 4096 // 8)
        mem.dirty.share_bitmap(bits)
        mem.write(gpa + 0x1FFF, b"ab")  # straddles pages 1 and 2
        mem.fill(gpa + 0x5000, 1, 7)
        mem.write(gpa + 0x8000, b"x" * 5000)  # the general path: pages 8 and 9
        mem.writev([(gpa + 0xC000, 4), (gpa + 0xE000, 4)], b"12345678")
        assert mem.read(gpa + 0x20000, 4096) == bytes(4096)  # a read marks nothing
        base = gpa // 4096
        assert _pages(bits) == {base + p for p in (1, 2, 5, 8, 9, 0xC, 0xE)}
        path = os.path.join(str(tmp_path), "image")
        with open(path, "wb") as f:
            f.write(b"d" * 8192)
        fd = os.open(path, os.O_RDONLY)
        try:
            bits[:] = bytes(len(bits))
            assert mem.dma.io.preadv_from(fd, [(gpa + 0x30800, 8192)], 0) == 8192
        finally:
            os.close(fd)
        assert _pages(bits) == {base + 0x30, base + 0x31, base + 0x32}
        mem.dirty.unshare_bitmap()
        bits[:] = bytes(len(bits))
        mem.write(gpa, b"after")
        assert _pages(bits) == set()


def test_the_used_ring_is_marked_in_a_shared_bitmap() -> None:
    with gm.GuestMemory.memfd(SIZE, tags="none") as mem:
        driver = Driver(mem, 16, 0x10000)
        queue = driver.queue()
        bits = bytearray(SIZE // 4096 // 8)
        mem.dirty.share_bitmap(bits)
        driver.add([(0x40000, 16, False)])
        chain = queue.pop()
        assert chain is not None
        queue.push(chain.head, 0)
        assert _pages(bits) == {driver.used // 4096}


def test_a_bitmap_too_small_for_the_regions_is_a_length_error() -> None:
    with gm.GuestMemory.memfd(SIZE, gpa=0x10_0000, tags="none") as mem:
        with pytest.raises(gm.LengthError):
            mem.dirty.share_bitmap(bytearray((0x10_0000 + SIZE) // 4096 // 8 - 1))
        assert not mem.dirty.active


def test_the_host_page_log_and_a_shared_bitmap_are_independent() -> None:
    with gm.GuestMemory.memfd(SIZE, tags="none") as mem:
        bits = bytearray(SIZE // 4096 // 8)
        mem.dirty.share_bitmap(bits)
        mem.dirty.start()
        mem.write(0x3000, b"z")
        assert list(mem.dirty.take().numbers) == [0x3000 // HOST_PAGE]
        mem.dirty.stop()
        assert mem.dirty.active, "the shared bitmap is still marked"
        mem.write(0x7000, b"z")
        assert _pages(bits) == {3, 7}
