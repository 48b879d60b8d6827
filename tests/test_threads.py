"""Threads: routes run side by side, and TCO and check mode stay per thread."""

from __future__ import annotations

import threading

import numpy as np

import guestmem as gm
from conftest import BASE, died_of_sigsegv, needs_mte, run_child

ROUTES = [gm.Route.TCO, gm.Route.MATCH_ALL, gm.Route.BOUNCE, gm.Route.UNCHECKED_THREAD]


def test_four_threads_doing_dma_through_different_routes(mem: gm.GuestMemory) -> None:
    if mem.tag_mode is not gm.TagMode.NONE:
        rng = np.random.default_rng(1)
        mem.set_tags(BASE, 0x20000, rng.integers(0, 16, 0x2000).astype(np.uint8))
    tags_before = mem.get_tags(BASE, 0x20000)
    errors: list[BaseException] = []
    start = threading.Barrier(len(ROUTES))

    def device(index: int, route: gm.Route) -> None:
        try:
            gpa = BASE + index * 0x8000 + 3
            rng = np.random.default_rng(index)
            start.wait()
            for _ in range(30):
                data = rng.integers(0, 256, 0x7000, dtype=np.uint8).tobytes()
                mem.write(gpa, data, route=route)
                assert mem.read(gpa, len(data), route=route) == data
                direction = gm.Direction.FROM_DEVICE
                with mem.dma.map_segments(gpa, 0x100, direction, route=route) as bufs:
                    for buf in bufs:
                        buf[:] = bytes(len(buf))
                assert mem.read(gpa, 0x100) == bytes(0x100)
                assert not gm.thread_tco()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=device, args=(i, r)) for i, r in enumerate(ROUTES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    np.testing.assert_array_equal(mem.get_tags(BASE, 0x20000), tags_before)


def test_unchecked_in_one_thread_leaves_the_others_checked(tmem: gm.GuestMemory) -> None:
    tmem.set_tags(BASE, 64, 7)
    inside, done = threading.Event(), threading.Event()
    seen: list[bool] = []

    def holder() -> None:
        with gm.unchecked():
            seen.append(gm.thread_tco())
            inside.set()
            done.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(30)
    try:
        assert seen == [True]
        assert gm.thread_tco() is False
        try:
            tmem.read(BASE, 64, route=gm.Route.CHECKED, tag=3)
            raised = False
        except gm.TagCheckError:
            raised = True
        assert raised
    finally:
        done.set()
        t.join()


@needs_mte
def test_a_plain_access_faults_while_another_thread_is_unchecked() -> None:
    result = run_child(
        """
import threading
import guestmem as gm
mem = gm.GuestMemory.anonymous(0x10000, tags="hardware")
mem.set_tags(0, 64, 7)
inside, done = threading.Event(), threading.Event()
def holder():
    with gm.unchecked():
        mem.view(0, 16)[0]
        print("holder reads under TCO", flush=True)
        inside.set()
        done.wait(60)
threading.Thread(target=holder, daemon=True).start()
inside.wait(60)
mem.view(16, 16)[0]
print("not reached", flush=True)
"""
    )
    assert "holder reads under TCO" in result.stdout, result.stderr
    assert "not reached" not in result.stdout
    assert died_of_sigsegv(result), (result.returncode, result.stderr)
