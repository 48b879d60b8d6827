"""Contract: validate before effects. No allocation sized by the request, no
system call and no consumption of a peer's data before the whole request is
known to be valid."""

from __future__ import annotations

import socket
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

import guestmem as gm
from conftest import BASE, HOLE, REGION

HUGE = [512 << 20, 2**62, 2**64, 2**70]


@pytest.fixture
def peer() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"the peer's bytes")
        yield a, b


def allocation_peak(call: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(gm.AddressError):
            call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("length", HUGE, ids=hex)
def test_read_of_a_huge_bad_range_allocates_nothing(mem: gm.GuestMemory, length: int) -> None:
    assert allocation_peak(lambda: mem.read(HOLE, length)) < 1 << 20
    assert allocation_peak(lambda: mem.read(BASE, length)) < 1 << 20
    assert allocation_peak(lambda: mem.readv([(BASE, 16), (HOLE, length)])) < 1 << 20


def test_huge_dma_scopes_allocate_nothing(mem: gm.GuestMemory) -> None:
    for route in (gm.Route.BOUNCE, gm.Route.TCO):
        scope = mem.dma.map(BASE, 2**40, gm.Direction.TO_DEVICE, route=route)
        assert allocation_peak(lambda s=scope: s.__enter__()) < 1 << 20  # type: ignore[misc]


BAD_RECEIVES: dict[str, tuple[type[BaseException], dict[str, object], int]] = {
    "range into the hole": (gm.AddressError, {}, HOLE - 8),
    "huge range": (gm.AddressError, {}, BASE),
    "a tag on BOUNCE": (gm.TagError, {"tag": 3}, BASE),
    "CHECKED without a tag": (gm.TagError, {"route": gm.Route.CHECKED}, BASE),
    "TCO": (gm.UnsupportedError, {"route": gm.Route.TCO}, BASE),
}


@pytest.mark.parametrize("case", list(BAD_RECEIVES), ids=str)
@pytest.mark.parametrize("route", [gm.Route.BOUNCE, gm.Route.MATCH_ALL, gm.Route.UNCHECKED_THREAD])
def test_a_rejected_receive_leaves_the_peers_bytes_unread(
    mem: gm.GuestMemory, peer: tuple[socket.socket, socket.socket], case: str, route: gm.Route
) -> None:
    ours, _theirs = peer
    error, extra, gpa = BAD_RECEIVES[case]
    length = 2**40 if case == "huge range" else 32
    kwargs: dict[str, object] = {"route": route, **extra}
    with pytest.raises(error):
        mem.dma.io.recv_into(ours, gpa, length, **kwargs)  # type: ignore[arg-type]
    ours.settimeout(5)
    assert ours.recv(64) == b"the peer's bytes"


def test_a_rejected_readv_from_reads_nothing(mem: gm.GuestMemory) -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"kept")
        for route in (gm.Route.BOUNCE, gm.Route.MATCH_ALL, gm.Route.UNCHECKED_THREAD):
            with pytest.raises(gm.AddressError):
                mem.dma.io.readv_from(a, [(BASE, 2), (HOLE, 2)], route=route)
        a.settimeout(5)
        assert a.recv(16) == b"kept"


def test_a_valid_bounce_receive_still_works(mem: gm.GuestMemory) -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"0123456789")
        assert mem.dma.io.recv_into(a, BASE + REGION - 4, 10, route=gm.Route.BOUNCE) == 10
        assert mem.read(BASE + REGION - 4, 10) == b"0123456789"
