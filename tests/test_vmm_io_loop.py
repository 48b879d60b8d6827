"""The VMM's I/O thread and its edge-triggered interrupt lines, on their own (host lane).

The machine wires them to KVM (ioeventfd kicks, irqfd interrupts); the
arm64-kernel lane proves that wiring under a real guest (test_vmm_virtio.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest

from guestmem.vmm.gic import EdgeInterrupt, Gic
from guestmem.vmm.io_loop import IoLoop

WAIT = 10.0


def wait_until(condition: Callable[[], object]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "the I/O thread did not get there in time"
        time.sleep(0.001)


def test_a_signalled_eventfd_runs_its_handler_on_the_loop_thread() -> None:
    ran: list[str] = []
    loop = IoLoop(lambda err: pytest.fail(f"unexpected failure: {err}"))
    fd = loop.eventfd(lambda: ran.append(threading.current_thread().name))
    loop.start()
    try:
        os.eventfd_write(fd, 1)
        wait_until(lambda: ran)
        os.eventfd_write(fd, 1)
        wait_until(lambda: len(ran) == 2)
    finally:
        loop.stop()
        loop.close()
    assert ran == ["vmm-io", "vmm-io"] and loop.wakeups == 2


def test_kicks_while_quiesced_wait_and_are_served_after() -> None:
    ran: list[int] = []
    loop = IoLoop(lambda err: pytest.fail(f"unexpected failure: {err}"))
    fd = loop.eventfd(lambda: ran.append(1))
    loop.start()
    try:
        with loop.quiesced():
            os.eventfd_write(fd, 1)
            time.sleep(0.2)
            assert ran == [], "a handler ran while the devices were to be still"
        wait_until(lambda: ran)
    finally:
        loop.stop()
        loop.close()
    assert ran == [1]


def test_a_handler_that_raises_ends_the_loop_and_is_reported() -> None:
    failures: list[BaseException] = []
    loop = IoLoop(failures.append)

    def broken() -> None:
        raise RuntimeError("device bug")

    fd = loop.eventfd(broken)
    loop.start()
    os.eventfd_write(fd, 1)
    wait_until(lambda: failures)
    loop.stop()  # the thread has ended already: stop returns
    loop.close()
    loop.close()  # once is enough; again does nothing
    assert [str(f) for f in failures] == ["device bug"]


class FakeGic(Gic):
    """What EdgeInterrupt asks of a Gic without an irqfd: set_spi, recorded."""

    def __init__(self) -> None:
        self.vm_fd = -1
        self.calls: list[tuple[int, bool]] = []

    def set_spi(self, spi: int, level: bool) -> None:
        self.calls.append((spi, level))


def test_without_an_irqfd_each_rise_is_a_pulse_and_a_fall_nothing() -> None:
    gic = FakeGic()
    line = EdgeInterrupt(gic, 17, irqfd=False)
    line.set(True)
    line.set(False)
    line.set(True)
    assert gic.calls == [(17, True), (17, False)] * 2
    assert line.edges == 2 and line.fd == -1
    line.close()
