"""The gate every vCPU thread passes before KVM_RUN (all-stop for the debugger).

Fake vCPUs stand in for KVM's: each thread "runs" by counting while the gate
lets it, and a kick is recorded. Host lane; the arm64-kernel lanes drive the
same gate through real vCPUs (test_vmm_debug_guest.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import cast

import pytest

from guestmem.vmm.gate import Gate
from guestmem.vmm.vcpu import DebugExit, Vcpu


class FakeVcpu:
    def __init__(self, index: int) -> None:
        self.index = index
        self.kicks = 0
        self.entries = 0
        self.steps = 0

    def kick(self) -> None:
        self.kicks += 1

    def allow_entry(self) -> None:
        self.entries += 1


class Machine:
    """Threads that pass the gate and 'run' (count) between passes."""

    def __init__(self, count: int) -> None:
        self.vcpus = [FakeVcpu(i) for i in range(count)]
        self.gate = Gate(cast(list[Vcpu], self.vcpus))
        self.threads = [threading.Thread(target=self._loop, args=(v,)) for v in self.vcpus]
        for thread in self.threads:
            thread.start()

    def _loop(self, vcpu: FakeVcpu) -> None:
        while self.gate.enter(cast(Vcpu, vcpu)):
            vcpu.steps += 1
            time.sleep(0.001)

    def stop(self) -> None:
        self.gate.end()
        for thread in self.threads:
            thread.join(timeout=10)
            assert not thread.is_alive()


@pytest.fixture
def machine() -> Iterator[Machine]:
    m = Machine(3)
    yield m
    m.stop()


def steps(m: Machine) -> list[int]:
    return [v.steps for v in m.vcpus]


def test_a_closed_gate_stops_every_vcpu_and_says_why(machine: Machine) -> None:
    time.sleep(0.05)
    machine.gate.close()
    event = machine.gate.wait_stopped(10)
    assert event is not None and event.exit is None and not event.ended
    assert all(v.kicks == 1 for v in machine.vcpus)
    frozen = steps(machine)
    time.sleep(0.05)
    assert steps(machine) == frozen  # nobody runs while the gate is shut


def test_opening_for_one_vcpu_runs_that_one_alone(machine: Machine) -> None:
    machine.gate.close()
    assert machine.gate.wait_stopped(10) is not None
    before = steps(machine)
    machine.gate.open(frozenset({1}))
    time.sleep(0.05)
    after = steps(machine)
    assert after[1] > before[1] and after[0] == before[0] and after[2] == before[2]
    machine.gate.close()
    assert machine.gate.wait_stopped(10) is not None


def test_a_debug_exit_stops_all_and_the_first_one_is_the_event(machine: Machine) -> None:
    first, second = DebugExit(hsr=0x3C << 26, far=0), DebugExit(hsr=0x30 << 26, far=0)
    machine.gate.debug_exit(2, first)
    machine.gate.debug_exit(0, second)  # lost the race: the run has already ended
    event = machine.gate.wait_stopped(10)
    assert event is not None and event.cpu == 2 and event.exit == first
    machine.gate.open()
    time.sleep(0.02)
    assert machine.gate.wait_stopped(0.01) is None  # running again, the old event forgotten


def test_wait_stopped_times_out_while_running(machine: Machine) -> None:
    started = time.monotonic()
    assert machine.gate.wait_stopped(0.05) is None
    assert time.monotonic() - started >= 0.05


def test_the_end_releases_parked_threads_for_good() -> None:
    m = Machine(2)
    m.gate.close()
    assert m.gate.wait_stopped(10) is not None
    m.gate.end()
    for thread in m.threads:
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert m.gate.ended


def test_the_end_of_a_running_machine_is_its_stop_event() -> None:
    m = Machine(2)
    time.sleep(0.02)
    m.gate.end()
    event = m.gate.wait_stopped(0)
    assert event is not None and event.ended
    for thread in m.threads:
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_a_hold_keeps_every_vcpu_out_until_released_and_leaves_the_debuggers_gate() -> None:
    machine = Machine(2)
    try:
        time.sleep(0.05)
        machine.gate.hold(True)
        assert all(v.kicks >= 1 for v in machine.vcpus)
        time.sleep(0.05)  # a vCPU between passes finishes its step, then parks
        held = [v.steps for v in machine.vcpus]
        time.sleep(0.1)
        assert [v.steps for v in machine.vcpus] == held
        machine.gate.close()  # the debugger stops them too; the hold's end must not run them
        machine.gate.hold(False)
        time.sleep(0.1)
        assert [v.steps for v in machine.vcpus] == held
        machine.gate.open()
        time.sleep(0.1)
        assert all(v.steps > h for v, h in zip(machine.vcpus, held, strict=True))
    finally:
        machine.stop()


def test_the_throttle_takes_a_growing_share_and_stops() -> None:
    from guestmem.vmm.throttle import FIRST, MOST, STEP, Throttle

    machine = Machine(1)
    throttle = Throttle(machine.gate)
    try:
        time.sleep(0.05)
        free = machine.vcpus[0].steps
        time.sleep(0.2)
        free = machine.vcpus[0].steps - free
        for round_ in range(1, 12):
            throttle.slow_down(round_)
        assert throttle.share == pytest.approx(min(FIRST + 10 * STEP, MOST))
        before = machine.vcpus[0].steps
        time.sleep(0.2)
        throttled = machine.vcpus[0].steps - before
        assert throttled < free / 2, (throttled, free)  # held ~99% of each period
        throttle.stop()
        before = machine.vcpus[0].steps
        time.sleep(0.2)
        assert machine.vcpus[0].steps - before > free / 2
    finally:
        throttle.stop()
        machine.stop()
