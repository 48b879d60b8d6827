"""Contract: a child forked while other threads hold bounce buffers can use
guest memory and never deadlocks on the bounce pool."""

from __future__ import annotations

import os
import signal
import threading
import time

import guestmem as gm
from conftest import BASE

SIZE = 4 << 20  # long BOUNCE copies: the helper thread holds the buffer most of the time
CHILD_TIMEOUT = 30.0


def wait_child(pid: int, timeout: float) -> int | None:
    """The child's exit status, or None (after killing it) if it did not end in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def child_uses(memory: gm.GuestMemory) -> None:
    """In the child: every route, BOUNCE first; exit 0 only if all worked."""
    code = 1
    try:
        memory.write(BASE, b"child", route=gm.Route.BOUNCE)
        ok = memory.read(BASE, 5, route=gm.Route.BOUNCE) == b"child"
        for route in (gm.Route.TCO, gm.Route.MATCH_ALL, gm.Route.UNCHECKED_THREAD):
            ok = ok and memory.read(BASE, 5, route=route) == b"child"
        code = 0 if ok else 2
    finally:
        os._exit(code)


def test_a_child_forked_while_threads_hold_bounce_buffers(mode: gm.TagMode) -> None:
    regions = [gm.GuestRegion.anonymous(BASE, SIZE, mode)]
    memory = gm.GuestMemory(regions, bounce_buffers=1, bounce_buffer_size=64 << 10)
    stop = threading.Event()
    busy = threading.Event()

    def bouncer() -> None:
        while not stop.is_set():
            memory.read(BASE, SIZE, route=gm.Route.BOUNCE)
            busy.set()

    threads = [threading.Thread(target=bouncer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        busy.wait(30)
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                child_uses(memory)
            assert wait_child(pid, CHILD_TIMEOUT) == 0, "the child hung or failed"
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        memory.close()


def test_a_child_forked_while_a_thread_holds_the_dirty_log_can_write(mode: gm.TagMode) -> None:
    with gm.GuestMemory([gm.GuestRegion.anonymous(BASE, 1 << 16, mode)]) as memory:
        memory.dirty.start()
        held, release = threading.Event(), threading.Event()

        def holder() -> None:
            with memory.dirty._lock:  # as a thread does mid-mark
                held.set()
                release.wait(60)

        thread = threading.Thread(target=holder)
        thread.start()
        try:
            held.wait(30)
            pid = os.fork()
            if pid == 0:
                try:
                    memory.write(BASE, b"child")  # marks the dirty log
                    os._exit(0 if memory.dirty.take().numbers.size == 1 else 2)
                finally:
                    os._exit(1)
            assert wait_child(pid, CHILD_TIMEOUT) == 0, "the child hung on the dirty log"
        finally:
            release.set()
            thread.join(60)
