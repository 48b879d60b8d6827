"""The machine: a :class:`~guestmem.vmm.builder.MachineParts` built, with a runner to run it.

Building (:mod:`builder`, from a :class:`~guestmem.vmm.config.MachineConfig`)
makes the VM with MTE, guest RAM on guestmem, the vCPUs, vGIC and devices
on the MMIO bus, and loads the guest. Running (:mod:`runner`) gives each
vCPU a thread and returns an :class:`~guestmem.vmm.outcome.Outcome` when
the guest powers off or resets, the run is stopped, or the VMM fails.
:class:`Machine` is both, as its users (the front end, snapshots and
migration, the debugger's run control) see it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import guestmem as gm
from guestmem.vmm.builder import MachineParts
from guestmem.vmm.config import TAG_MODES, Disk, MachineConfig
from guestmem.vmm.gate import Gate
from guestmem.vmm.outcome import EndReason, Outcome
from guestmem.vmm.runner import PAUSE_TIMEOUT, Runner

__all__ = [
    "PAUSE_TIMEOUT",
    "TAG_MODES",
    "Disk",
    "EndReason",
    "Machine",
    "MachineConfig",
    "Outcome",
]


class Machine(MachineParts):
    """A guest ready to run; ``console`` receives what it writes on its UART (and hvc0)."""

    def __init__(
        self, config: MachineConfig, console: Callable[[bytes], None], *, lock_disks: bool = True
    ) -> None:
        """Build the machine (see :mod:`builder`); it runs when :meth:`run` is called.

        Each disk image is locked (DiskLockedError if another VMM has it)
        unless ``lock_disks`` is False: a migration target, which calls
        :meth:`lock_disks` before it runs.
        """
        super().__init__(config, console, lock_disks=lock_disks, on_io_failure=self._io_failed)
        self._runner = Runner(self.vcpus, self.bus, self.io)

    @property
    def gate(self) -> Gate:
        """Which vCPUs may enter the guest (the debugger's and a throttle's handle)."""
        return self._runner.gate

    def console_input(self, data: bytes) -> None:
        """Bytes typed at the guest's console: hvc0 if there is one, else the UART.

        Dropped once the run has ended.
        """
        if self._runner.ended:
            return
        if self.hvc is not None:
            self.hvc.receive(data)
        else:
            self.uart.receive(data)

    def run(self) -> Outcome:
        """Run every vCPU until the guest powers off or resets, or the VMM fails."""
        return self._runner.run()

    def paused(self) -> AbstractContextManager[None]:
        """A block during which no vCPU runs and no device serves (see Runner.paused)."""
        return self._runner.paused()

    def stop(self, reason: EndReason | str = EndReason.QUIT, detail: str = "") -> None:
        """End the run from any thread, with this outcome (unless it already ended)."""
        try:
            ending = EndReason(reason)
        except ValueError:
            raise gm.UsageError(f"not a reason a run ends for: {reason!r}") from None
        self._runner.finish(Outcome(ending, detail))

    def _io_failed(self, err: BaseException) -> None:
        self._runner.finish(Outcome(EndReason.ERROR, f"I/O thread: {err}"))

    def __enter__(self) -> Machine:
        """The machine, closed when the block ends."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the machine."""
        self.close()
