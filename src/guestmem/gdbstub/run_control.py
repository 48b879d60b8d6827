"""The run-control target: what a VMM implements for GDB to stop, step and resume its guest.

:class:`RunControl` is the VMM's side of the bargain (KVM vCPUs in the
reference VMM's :mod:`guestmem.vmm.run_control`, a simulation in the
tests); :class:`~guestmem.gdbstub.debug_server.GuestDebugServer` drives it.
Threads are vCPUs; addresses are guest virtual addresses, translated by the
target's stage 1 (:meth:`RunControl.translate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from guestmem.errors import AddressError

StopReason = Literal["interrupt", "step", "breakpoint", "hw-breakpoint", "watchpoint", "exited"]
WatchKind = Literal["write", "read", "access"]

REGISTER_COUNT = 34  # x0..x30, sp, pc, cpsr: what RunControl.registers returns
PC = 32  # pc's register number
BRK = (0xD4200000).to_bytes(4, "little")  # BRK #0, the software breakpoint


class UnmappedAddressError(AddressError):
    """A guest virtual address the vCPU's stage 1 does not map (for RunControl.translate)."""

    def __init__(self, message: str, *, va: int, length: int) -> None:
        """``va``/``length``: the range that failed to translate."""
        super().__init__(message, gpa=va, length=length)
        self.va = va


@dataclass(frozen=True)
class Watchpoint:
    """A hardware watchpoint on ``[address, address + length)``: ``kind`` of access traps."""

    address: int
    length: int
    kind: WatchKind


@dataclass(frozen=True)
class StopEvent:
    """Why the guest stopped: ``cpu`` (0-based) is the vCPU it stopped for.

    ``address`` is the pc for breakpoints and the data address for
    watchpoints; ``kind`` is the watchpoint's kind. ``exited`` means the
    guest powered off: it never runs again.
    """

    cpu: int
    reason: StopReason
    address: int | None = None
    kind: WatchKind | None = None


class RunControl(Protocol):
    """The VMM's vCPUs, as the debug server drives them (all-stop: all run or none).

    Every call comes from the thread running
    :meth:`~guestmem.gdbstub.debug_server.GuestDebugServer.serve`. The guest
    is either *running* (after :meth:`resume`, until its stop has been
    reported) or *stopped*; once stopped it stays stopped, every vCPU, until
    the next :meth:`resume`. Registers, debug registers and memory are only
    touched while it is stopped. The VMM may start its guest running before
    serving; a session begins with :meth:`stop` and a detach ends with
    :meth:`resume` (nothing stepping).
    """

    @property
    def cpu_count(self) -> int:
        """How many vCPUs the guest has; the server names them threads 1..cpu_count."""

    def stop(self) -> None:
        """Stop every vCPU; return once all are stopped (at once if none runs).

        If the guest was running, the stop that ends the run is what the
        next :meth:`wait` returns, at once: ``interrupt`` for this call, or
        the event that beat it (a breakpoint, ``exited``, ...).
        """

    def resume(self, step: frozenset[int]) -> None:
        """Let the guest run from where it stopped.

        ``step`` empty: every vCPU runs until the next stop event. ``step``
        non-empty: only those vCPUs run, one instruction each, and the
        others stay stopped; the run then ends with a ``step`` event (or
        whatever stopped a stepping vCPU first). Exactly one StopEvent ends
        each run; when it happens every vCPU is stopped.
        """

    def wait(self, timeout: float | None) -> StopEvent | None:
        """The event that ended the current run, waiting up to ``timeout`` s (None: forever).

        Returns None if the guest is still running after ``timeout``, or if
        it is stopped and its event was already returned. Reason ``exited``
        when the guest powered off (its vCPUs are gone; nothing else will be
        called but :meth:`set_hw_debug` clearing the debug registers).
        """

    def registers(self, cpu: int) -> list[int]:
        """The 34 registers of ``cpu``: x0..x30, sp, pc, cpsr (cpsr 32-bit), as unsigned."""

    def set_register(self, cpu: int, index: int, value: int) -> None:
        """Set register ``index`` (0..33, order of :meth:`registers`) of ``cpu``.

        Raises a GuestMemoryError subclass for a bad index or value.
        """

    def set_hw_debug(self, breakpoints: Sequence[int], watchpoints: Sequence[Watchpoint]) -> None:
        """Program every vCPU's hardware breakpoints and watchpoints, replacing the last set.

        Addresses are guest virtual addresses as :func:`canonical` gives
        them. At most :meth:`hw_slots` of each. A watchpoint the hardware cannot
        express (length, alignment) raises a GuestMemoryError subclass and
        changes nothing.
        """

    def hw_slots(self) -> tuple[int, int]:
        """(hardware breakpoints, hardware watchpoints) the vCPUs have."""

    def translate(self, cpu: int, va: int, length: int) -> list[tuple[int, int]]:
        """``[va, va + length)`` through ``cpu``'s stage 1: (IPA, length) pieces in order.

        All or nothing: a range not wholly mapped raises a GuestMemoryError
        subclass (:class:`UnmappedAddressError` for choice); whichever it is,
        the client is told the address is not mapped (``E0e``).
        """

    def detach(self) -> None:
        """The session is over: stop trapping for the debugger before the guest runs on.

        Called with the guest stopped, after every software breakpoint is out
        and before the last :meth:`resume`; the guest's own BRKs, breakpoints
        and steps are its own business again.
        """


def canonical(va: int) -> int:
    """``va`` without its tag byte: bits 63:56 copied from bit 55 (TTBR0 or TTBR1 half)."""
    low = va & ((1 << 56) - 1)
    return low | (0xFF << 56) if low >> 55 & 1 else low
