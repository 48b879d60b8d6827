"""Which vCPUs may enter the guest: how a debugger stops, steps and resumes them.

Every vCPU thread passes the gate before each KVM_RUN. Closing it for a
vCPU kicks that vCPU out of the guest; its thread then parks until the gate
opens again. A debug exit on one vCPU closes the gate for all (all-stop)
and is kept as the event that ended the run. Ending the machine opens no
gate again: parked threads return and the run is over.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from guestmem.vmm.vcpu import DebugExit, Vcpu


@dataclass(frozen=True)
class GateEvent:
    """What ended a run: a vCPU's debug exit, a stop request (``exit`` None), or the end."""

    cpu: int
    exit: DebugExit | None
    ended: bool = False


class Gate:
    """The entry condition of every vCPU of a machine (all open at start)."""

    def __init__(self, vcpus: Sequence[Vcpu]) -> None:
        """A gate for ``vcpus``, open for all of them."""
        self._vcpus = tuple(vcpus)
        self._all = frozenset(v.index for v in self._vcpus)
        self._changed = threading.Condition()
        self._open: frozenset[int] = self._all
        self._parked: set[int] = set()
        self._event: GateEvent | None = None
        self._ended = False
        self._held = False  # a throttle's pause: apart from what the debugger opened

    def enter(self, vcpu: Vcpu) -> bool:
        """Wait until ``vcpu`` may run; False once the machine's run has ended."""
        with self._changed:
            while not self._ended and (vcpu.index not in self._open or self._held):
                self._parked.add(vcpu.index)
                self._changed.notify_all()
                self._changed.wait()
            self._parked.discard(vcpu.index)
            if self._ended:
                return False
            vcpu.allow_entry()  # any kick since was for a close that an open undid
            return True

    def hold(self, held: bool) -> None:
        """Keep every vCPU out of the guest (``held``), or let them back.

        Apart from :meth:`open` and :meth:`close`: a throttle's hold never
        runs a vCPU the debugger stopped.
        """
        with self._changed:
            self._held = held
            if held:
                for vcpu in self._vcpus:
                    vcpu.kick()
            self._changed.notify_all()

    def close(self) -> None:
        """Stop every vCPU (returns at once; :meth:`wait_stopped` waits)."""
        with self._changed:
            self._close_all()

    def debug_exit(self, cpu: int, exit_: DebugExit) -> None:
        """Record ``cpu``'s debug exit as what ended the run, unless something did already."""
        with self._changed:
            if self._event is None and self._open:
                self._event = GateEvent(cpu, exit_)
            self._close_all()

    def end(self) -> None:
        """The machine's run is over: release every thread, for good."""
        with self._changed:
            self._ended = True
            self._event = self._event or GateEvent(0, None, ended=True)
            for vcpu in self._vcpus:
                vcpu.kick()
            self._changed.notify_all()

    def open(self, cpus: frozenset[int] | None = None) -> None:
        """Let ``cpus`` (default: all) run again, forgetting the last run's event."""
        with self._changed:
            self._event = None
            self._open = self._all if cpus is None else cpus & self._all
            self._changed.notify_all()

    def wait_stopped(self, timeout: float | None) -> GateEvent | None:
        """Once the run has ended and every vCPU is parked: its event (else None)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while not self._stopped():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._changed.wait(left)
            return self._event or GateEvent(0, None)

    @property
    def ended(self) -> bool:
        """Whether the machine's run is over."""
        return self._ended

    def _stopped(self) -> bool:
        if self._ended:
            return True
        return not self._open and self._parked == set(self._all)

    def _close_all(self) -> None:
        running = self._open
        self._open = frozenset()
        for vcpu in self._vcpus:
            if vcpu.index in running:
                vcpu.kick()
        self._changed.notify_all()
