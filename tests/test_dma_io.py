"""System-call DMA I/O: every safe route moves the bytes, partial transfers
behave like the os module's, TCO is refused, and tags never change.
(That the kernel's own checks make TCO unsafe is shown in the kernel lane.)"""

from __future__ import annotations

import errno
import os
import socket

import numpy as np
import pytest

import guestmem as gm
from conftest import BASE, REGION, assert_unchanged, needs_mte, snapshot
from guestmem._native import IO_MAX_IOV

SAFE = [gm.Route.MATCH_ALL, gm.Route.BOUNCE, gm.Route.UNCHECKED_THREAD]


def striped(memory: gm.GuestMemory) -> None:
    if memory.tag_mode is not gm.TagMode.NONE:
        memory.set_tags(BASE, 2 * REGION, (np.arange(2 * REGION // 16) % 16).astype(np.uint8))


@pytest.mark.parametrize("route", SAFE, ids=lambda r: r.name)
def test_pipe_round_trip_across_regions_and_tag_runs(mem: gm.GuestMemory, route: gm.Route) -> None:
    striped(mem)
    tags = mem.get_tags(BASE, 2 * REGION)
    payload = np.random.default_rng(3).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    gpa = BASE + REGION - 1001
    r, w = os.pipe()
    try:
        os.write(w, payload)
        assert mem.dma.io.read_from(r, gpa, len(payload), route=route) == len(payload)
        assert mem.read(gpa, len(payload)) == payload
        assert mem.dma.io.write_to(w, gpa, len(payload), route=route) == len(payload)
        assert os.read(r, 4096) == payload
    finally:
        os.close(r)
        os.close(w)
    np.testing.assert_array_equal(mem.get_tags(BASE, 2 * REGION), tags)


@pytest.mark.parametrize("timeout", [None, 30.0], ids=["blocking", "timeout"])
@pytest.mark.parametrize("route", SAFE, ids=lambda r: r.name)
def test_socket_scatter_gather(mem: gm.GuestMemory, route: gm.Route, timeout: float | None) -> None:
    striped(mem)
    a, b = socket.socketpair()
    a.settimeout(timeout)  # with a timeout, the socket module's own path waits
    with a, b:
        ranges = [(BASE + 8, 100), (BASE + REGION + 40, 60)]
        b.sendall(bytes(range(160)))
        assert mem.dma.io.readv_from(a, ranges, route=route) == 160
        assert mem.readv(ranges) == bytes(range(160))
        assert mem.dma.io.writev_to(a, ranges, route=route) == 160
        assert b.recv(1000) == bytes(range(160))
        b.sendall(b"hello")
        assert mem.dma.io.recv_into(a, BASE, 5, route=route) == 5
        assert mem.dma.io.send(a, BASE, 5, route=route) == 5
        assert b.recv(10) == b"hello"


@pytest.mark.parametrize("route", SAFE, ids=lambda r: r.name)
def test_short_read_writes_only_what_arrived(mem: gm.GuestMemory, route: gm.Route) -> None:
    mem.fill(BASE, 64, 0xEE)
    r, w = os.pipe()
    try:
        os.write(w, b"abc")
        assert mem.dma.io.read_from(r, BASE, 64, route=route) == 3
    finally:
        os.close(r)
        os.close(w)
    assert mem.read(BASE, 64) == b"abc" + b"\xee" * 61


@pytest.mark.parametrize("route", SAFE, ids=lambda r: r.name)
def test_eagain_raises_and_changes_nothing(mem: gm.GuestMemory, route: gm.Route) -> None:
    striped(mem)
    before = snapshot(mem)
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        with pytest.raises(BlockingIOError):
            mem.dma.io.read_from(r, BASE, 64, route=route)
    finally:
        os.close(r)
        os.close(w)
    assert_unchanged(mem, before)
    assert not gm.thread_tco()


@pytest.mark.parametrize("route", SAFE, ids=lambda r: r.name)
def test_a_failing_call_leaves_the_thread_checked(mem: gm.GuestMemory, route: gm.Route) -> None:
    mode_before = gm.thread_check_mode()
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as failed:
        mem.dma.io.read_from(r, BASE, 64, route=route)
    assert failed.value.errno == errno.EBADF
    assert gm.thread_check_mode() is mode_before
    assert not gm.thread_tco()


@needs_mte
def test_more_tag_runs_than_iov_max_is_a_short_transfer() -> None:
    runs = 2 * IO_MAX_IOV
    with gm.GuestMemory.anonymous(runs * 16, gpa=BASE, tags="hardware") as memory:
        memory.set_tags(BASE, runs * 16, (np.arange(runs) % 2).astype(np.uint8))
        r, w = os.pipe()
        try:
            os.write(w, b"z" * (runs * 16))
            got = memory.dma.io.read_from(r, BASE, runs * 16, route=gm.Route.MATCH_ALL)
        finally:
            os.close(r)
            os.close(w)
        assert got == IO_MAX_IOV * 16  # one buffer per run, at most 1024 per call
        assert memory.read(BASE, runs * 16) == b"z" * got + b"\0" * (runs * 16 - got)


def test_tco_is_refused_for_system_calls(mem: gm.GuestMemory) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(gm.UnsupportedError, match="not safe for system calls"):
            mem.dma.io.read_from(r, BASE, 4, route=gm.Route.TCO)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(ValueError, match="TCO"):
        gm.Policy(io=gm.Route.TCO)


def test_match_all_sends_one_iovec_per_tag_run(tmem: gm.GuestMemory) -> None:
    tmem.set_tags(BASE, 4096, (np.arange(256) % 2).astype(np.uint8))
    a, b = socket.socketpair()
    with a, b:
        b.sendall(bytes(range(256)) * 16)
        with tmem.dma.map_segments(
            BASE, 4096, gm.Direction.FROM_DEVICE, route=gm.Route.MATCH_ALL
        ) as segments:
            assert len(segments) == 256
        received = 0
        while received < 4096:
            got = tmem.dma.io.recv_into(
                a, BASE + received, 4096 - received, route=gm.Route.MATCH_ALL
            )
            assert got > 0
            received += got
        assert tmem.read(BASE, 4096) == bytes(range(256)) * 16


def test_checked_io_with_the_right_and_the_wrong_tag(tmem: gm.GuestMemory) -> None:
    tmem.set_tags(BASE, 256, 3)
    r, w = os.pipe()
    try:
        os.write(w, b"x" * 256)
        assert tmem.dma.io.read_from(r, BASE, 256, route=gm.Route.CHECKED, tag=3) == 256
        with pytest.raises(gm.TagCheckError):
            tmem.dma.io.read_from(r, BASE, 256, route=gm.Route.CHECKED, tag=4)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("route", SAFE, ids=lambda r: r.name)
def test_positioned_file_io_leaves_the_file_position_alone(
    mem: gm.GuestMemory, route: gm.Route, tmp_path: object
) -> None:
    striped(mem)
    tags = mem.get_tags(BASE, 2 * REGION)
    image = bytes(range(256)) * 64  # a 16 KiB "disk"
    path = os.path.join(str(tmp_path), "disk.img")
    with open(path, "wb") as f:
        f.write(image)
    fd = os.open(path, os.O_RDWR)
    try:
        os.lseek(fd, 7, os.SEEK_SET)
        ranges = [(BASE + REGION - 600, 1000), (BASE + 16, 24)]  # across regions and tag runs
        assert mem.dma.io.preadv_from(fd, ranges, 4096, route=route) == 1024
        assert mem.readv(ranges) == image[4096:5120]
        mem.write(BASE + 16, b"W" * 24)
        assert mem.dma.io.pwritev_to(fd, ranges, 8192, route=route) == 1024
        assert os.pread(fd, 1024, 8192) == image[4096:5096] + b"W" * 24
        assert mem.dma.io.preadv_from(fd, [(BASE, 64)], len(image) - 10, route=route) == 10
        assert os.lseek(fd, 0, os.SEEK_CUR) == 7  # never moved
    finally:
        os.close(fd)
    np.testing.assert_array_equal(mem.get_tags(BASE, 2 * REGION), tags)


@pytest.mark.parametrize("offset", [-1, 1 << 63, "0"])
def test_a_bad_file_offset_is_refused_before_any_io(mem: gm.GuestMemory, offset: object) -> None:
    r, w = os.pipe()
    try:
        before = snapshot(mem)
        with pytest.raises((gm.LengthError, gm.ArgumentTypeError)):
            mem.dma.io.preadv_from(r, [(BASE, 16)], offset)  # type: ignore[arg-type]
        assert_unchanged(mem, before)
    finally:
        os.close(r)
        os.close(w)
