"""Contract: close() while other threads use the memory gives them ClosedError
(or lets their call finish), never another exception, never a crash; a VM fd
is never closed under an in-flight ioctl."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest

import guestmem as gm
from conftest import BASE, LAYOUT, REGION

Use = Callable[[gm.GuestMemory], object]

USES: dict[str, Use] = {
    "read hot": lambda m: m.read(BASE + 64, 64),
    "read across regions": lambda m: m.read(BASE + REGION - 32, 64),
    "write": lambda m: m.write(BASE + 128, b"x" * 256),
    "bounce read": lambda m: m.read(BASE, 8192, route=gm.Route.BOUNCE),
    "match-all write": lambda m: m.write(BASE, b"y" * 4096, route=gm.Route.MATCH_ALL),
    "readv": lambda m: m.readv([(BASE, 16), (BASE + REGION, 16)]),
    "fill": lambda m: m.fill(BASE, 4096, 7),
    "get_tags": lambda m: m.get_tags(BASE, 4096),
    "translate": lambda m: m.translate(BASE, 2 * REGION),
    "find_region": lambda m: m.find_region(BASE + REGION),
    "regions": lambda m: m.regions,
    "dma.map": lambda m: m.dma.map(BASE, 64, gm.Direction.FROM_DEVICE).__enter__(),
    "map_segments": lambda m: m.dma.map_segments(BASE, 64, gm.Direction.TO_DEVICE).__enter__(),
}


def hammer(
    memory: gm.GuestMemory, use: Use, failures: list[BaseException], go: threading.Event
) -> None:
    go.wait()
    while True:
        try:
            use(memory)
        except gm.ClosedError:
            return
        except BaseException as exc:  # the contract: nothing else
            failures.append(exc)
            return


@pytest.mark.parametrize("rounds", [6])
def test_close_under_busy_threads_gives_only_closed_error(mode: gm.TagMode, rounds: int) -> None:
    for _ in range(rounds):
        memory = gm.GuestMemory.from_layout(LAYOUT, tags=mode)
        memory.dirty.start()
        failures: list[BaseException] = []
        go = threading.Event()
        threads = [
            threading.Thread(target=hammer, args=(memory, use, failures, go))
            for use in USES.values()
        ]
        for t in threads:
            t.start()
        go.set()
        memory.close()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a thread never saw the close"
        assert failures == []
        assert not gm.thread_tco()


def test_every_use_after_close_is_closed_error(mode: gm.TagMode) -> None:
    memory = gm.GuestMemory.from_layout(LAYOUT, tags=mode)
    memory.close()
    for name, use in USES.items():
        with pytest.raises(gm.ClosedError):
            use(memory)
            pytest.fail(f"{name} worked on closed memory")


def test_a_vm_fd_outlives_the_calls_using_it() -> None:
    """KvmVm defers closing its fd until the last in-flight call returns."""
    fd = os.open(os.devnull, os.O_RDONLY)
    vm = gm.KvmVm(fd, owned=True)
    with vm.in_use() as used:
        assert used == fd
        closer = threading.Thread(target=vm.close)
        closer.start()
        closer.join(10)
        assert not closer.is_alive(), "close() must not wait for in-flight calls"
        os.fstat(fd)  # still open: an ioctl on it cannot hit a reused number
        with pytest.raises(gm.ClosedError):
            vm.in_use().__enter__()
    with pytest.raises(OSError):
        os.fstat(fd)
    assert vm.fd == -1


def test_an_adopted_vm_fd_is_never_closed() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        vm = gm.KvmVm.adopt(fd)
        vm.close()
        os.fstat(fd)
        with pytest.raises(gm.ClosedError):
            vm.in_use().__enter__()
    finally:
        os.close(fd)
