"""What only a real kernel shows: system calls check the tags of the user
memory they touch, with an effective TCO of 0. A naive ``readv`` or
``recv_into`` into tagged guest memory fails even inside ``unchecked()``,
while every syscall route of ``mem.dma.io`` moves every byte and keeps every
tag; MATCH_ALL does it with the thread's checks still on."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import guestmem as gm
from conftest import LANE, assert_unchanged, snapshot

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.hardware,
    pytest.mark.skipif(
        LANE != "arm64-kernel",
        reason="only a real kernel checks tags in system calls (QEMU user emulation does not, "
        "see PLATFORM.md): the arm64-kernel lane runs these",
    ),
]

BASE = 0x4000_0000
SIZE = 4096
PAYLOAD = bytes(range(256)) * (SIZE // 256)
SYSCALL_ROUTES = [gm.Route.MATCH_ALL, gm.Route.BOUNCE, gm.Route.UNCHECKED_THREAD]

# A source of PAYLOAD: (naive read into a buffer, library read into guest memory).
Source = tuple[Callable[[memoryview], int], Callable[[gm.GuestMemory, gm.Route], int]]


@pytest.fixture
def mem() -> Iterator[gm.GuestMemory]:
    with gm.GuestMemory.anonymous(0x10000, gpa=BASE, tags=gm.TagMode.HARDWARE) as memory:
        memory.set_tags(BASE, SIZE, 5)
        yield memory


@pytest.fixture(params=["pipe-readv", "socket-recv_into"])
def source(request: pytest.FixtureRequest) -> Iterator[Source]:
    if request.param == "pipe-readv":
        r, w = os.pipe()
        os.write(w, PAYLOAD)
        yield (
            lambda buf: os.readv(r, [buf]),
            lambda memory, route: memory.dma.io.readv_from(r, [(BASE, SIZE)], route=route),
        )
        os.close(r)
        os.close(w)
    else:
        a, b = socket.socketpair()
        b.sendall(PAYLOAD)
        yield (
            lambda buf: a.recv_into(buf),
            lambda memory, route: memory.dma.io.recv_into(a, BASE, SIZE, route=route),
        )
        a.close()
        b.close()


def naive_count(read: Callable[[memoryview], int], memory: gm.GuestMemory) -> int:
    """What a device model gets reading straight into guest memory under TCO."""
    with gm.unchecked():
        assert gm.thread_tco()
        buffer = memory.view(BASE, SIZE).data
        try:
            return read(buffer)
        except OSError as err:
            assert err.errno == errno.EFAULT, err
            return 0


def test_the_kernel_offers_mte_checks_and_kvm_with_mte(mem: gm.GuestMemory) -> None:
    assert gm.has_mte()
    assert gm.thread_check_mode() is gm.CheckMode.SYNC
    assert gm.kvm_mte_available()
    assert gm.TagMode.KVM in gm.available_tag_modes()


@pytest.mark.parametrize("route", SYSCALL_ROUTES, ids=lambda r: r.name)
def test_a_naive_read_under_tco_fails_and_every_route_moves_every_byte(
    mem: gm.GuestMemory, source: Source, route: gm.Route
) -> None:
    naive_read, library_read = source
    before = snapshot(mem)
    assert naive_count(naive_read, mem) < SIZE, "the kernel let a mismatching access through"
    assert_unchanged(mem, before)  # the first granule already mismatches: nothing moved

    assert library_read(mem, route) == SIZE
    assert mem.read(BASE, SIZE, route=gm.Route.TCO) == PAYLOAD
    np.testing.assert_array_equal(mem.get_tags(BASE, SIZE), 5)
    assert not gm.thread_tco()
    assert gm.thread_check_mode() is gm.CheckMode.SYNC


def test_match_all_io_over_many_tag_runs_keeps_checks_on(mem: gm.GuestMemory) -> None:
    granules = SIZE // 16
    tags = (np.arange(granules) % 16).astype(np.uint8)
    mem.set_tags(BASE, SIZE, tags)
    r, w = os.pipe()
    try:
        os.write(w, PAYLOAD)
        assert mem.dma.io.readv_from(r, [(BASE, SIZE)], route=gm.Route.MATCH_ALL) == SIZE
        assert gm.thread_check_mode() is gm.CheckMode.SYNC
        assert not gm.thread_tco()
        assert mem.read(BASE, SIZE, route=gm.Route.TCO) == PAYLOAD
        np.testing.assert_array_equal(mem.get_tags(BASE, SIZE), tags)

        # The same pointers, after the guest retags the buffer under the device,
        # are refused: the kernel checked every run's tag, with checks on.
        os.write(w, PAYLOAD)
        with mem.dma.map_segments(
            BASE, SIZE, gm.Direction.FROM_DEVICE, route=gm.Route.MATCH_ALL
        ) as segments:
            assert len(segments) == granules
            mem.set_tags(BASE, SIZE, (tags + 1) % 16)
            with pytest.raises(OSError) as refused:
                os.readv(r, segments)
            assert refused.value.errno == errno.EFAULT
    finally:
        os.close(r)
        os.close(w)


def test_writes_to_a_device_under_tco_fail_and_routes_send_every_byte(
    mem: gm.GuestMemory,
) -> None:
    mem.write(BASE, PAYLOAD, route=gm.Route.TCO)
    a, b = socket.socketpair()
    with a, b:
        with gm.unchecked():
            with pytest.raises(OSError) as refused:
                a.send(mem.view(BASE, SIZE).data)
            assert refused.value.errno == errno.EFAULT
        for route in SYSCALL_ROUTES:
            sent = mem.dma.io.send(a, BASE, SIZE, route=route)
            assert sent == SIZE
            received = bytearray()
            while len(received) < SIZE:
                received += b.recv(SIZE - len(received))
            assert bytes(received) == PAYLOAD
    np.testing.assert_array_equal(mem.get_tags(BASE, SIZE), 5)
