"""Running a built machine: a thread per vCPU through the gate, the I/O thread, MMIO exits.

:meth:`Runner.run` gives each vCPU a thread that passes the
:class:`~guestmem.vmm.gate.Gate` before each KVM_RUN and serves its exits:
an MMIO exit goes to the :class:`~guestmem.vmm.mmio_bus.MmioBus`, a system
event (PSCI off, reset, a crash) ends the run, a debug exit stops every
vCPU for the debugger. The I/O thread (:mod:`io_loop`) serves ioeventfd
kicks meanwhile. The run ends with the first :class:`Outcome`: the guest's,
:meth:`Runner.finish`'s from any thread, or a failure's.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence

import guestmem as gm
from guestmem.vmm import kvm_api as k
from guestmem.vmm.gate import Gate
from guestmem.vmm.io_loop import IoLoop
from guestmem.vmm.mmio_bus import MmioBus
from guestmem.vmm.outcome import EndReason, Outcome
from guestmem.vmm.vcpu import (
    DebugExit,
    Interrupted,
    MmioExit,
    SystemEvent,
    Vcpu,
    install_kick_handler,
)

PAUSE_TIMEOUT = 30.0  # a kicked vCPU parks in microseconds; this is for a wedged host

_EVENTS = {
    k.SYSTEM_EVENT_SHUTDOWN: EndReason.POWER_OFF,
    k.SYSTEM_EVENT_RESET: EndReason.RESET,
    k.SYSTEM_EVENT_CRASH: EndReason.CRASH,
}


class Runner:
    """Runs ``vcpus`` (with ``io`` beside them, MMIO on ``bus``) once, until an outcome."""

    def __init__(self, vcpus: Sequence[Vcpu], bus: MmioBus, io: IoLoop) -> None:
        """Ready to run; every vCPU's gate open."""
        self._vcpus = tuple(vcpus)
        self._bus = bus
        self._io = io
        self.gate = Gate(self._vcpus)
        self.mmio_exits = 0
        self._outcome: Outcome | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()

    @property
    def ended(self) -> bool:
        """Whether the run has its outcome (the threads may still be winding down)."""
        return self._done.is_set()

    def run(self) -> Outcome:
        """Run every vCPU until the guest powers off or resets, or the VMM fails."""
        install_kick_handler()
        started = time.monotonic()
        threads = [
            threading.Thread(target=self._vcpu_loop, args=(v,), name=f"vcpu{v.index}", daemon=True)
            for v in self._vcpus
        ]
        self._io.start()
        for thread in threads:
            thread.start()
        self._done.wait()
        for thread in threads:
            thread.join()
        self._io.stop()
        assert self._outcome is not None
        return Outcome(
            self._outcome.reason,
            self._outcome.detail,
            self.mmio_exits,
            time.monotonic() - started,
        )

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A block during which no vCPU runs and no device serves (while :meth:`run` runs).

        Every vCPU is kicked out of the guest and parked, and what KVM held
        for its next entry (an MMIO read's value) is completed; the I/O
        thread is held off. The vCPUs run again when the block ends, unless
        the run ended meanwhile (a migrated machine's does).
        """
        self.gate.close()
        try:
            if self.gate.wait_stopped(PAUSE_TIMEOUT) is None:
                raise gm.GuestMemoryError(f"the vCPUs did not stop within {PAUSE_TIMEOUT:.0f} s")
            if self.gate.ended:
                raise gm.UsageError("the machine's run has ended: there is nothing to pause")
            for vcpu in self._vcpus:
                vcpu.complete_pending()
            with self._io.quiesced():
                yield
        finally:
            if not self.gate.ended:
                self.gate.open()

    def finish(self, outcome: Outcome) -> None:
        """End the run from any thread with ``outcome`` (unless it already has one)."""
        with self._lock:
            if self._outcome is None:
                self._outcome = outcome
        self.gate.end()
        self._done.set()

    def _vcpu_loop(self, vcpu: Vcpu) -> None:
        vcpu.thread_id = threading.get_ident()
        try:
            while self.gate.enter(vcpu):
                exit_ = vcpu.run()
                if isinstance(exit_, MmioExit):
                    self._mmio(vcpu, exit_)
                elif isinstance(exit_, SystemEvent):
                    self.finish(_system_event(exit_))
                elif isinstance(exit_, Interrupted):
                    continue
                elif isinstance(exit_, DebugExit):
                    self.gate.debug_exit(vcpu.index, exit_)
                else:
                    self.finish(
                        Outcome(EndReason.ERROR, f"vCPU {vcpu.index}: unhandled exit {exit_}")
                    )
        except Exception as err:  # the run ends with the reason instead of a dead thread
            self.finish(Outcome(EndReason.ERROR, f"vCPU {vcpu.index}: {err}"))

    def _mmio(self, vcpu: Vcpu, exit_: MmioExit) -> None:
        self.mmio_exits += 1
        if exit_.is_write:
            self._bus.write(exit_.address, exit_.size, exit_.data)
        else:
            vcpu.complete_read(exit_, self._bus.read(exit_.address, exit_.size))


def _system_event(event: SystemEvent) -> Outcome:
    reason = _EVENTS.get(event.kind)
    return Outcome(EndReason.SYSTEM_EVENT, str(event.kind)) if reason is None else Outcome(reason)
