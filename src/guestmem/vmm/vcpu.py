"""A vCPU: its fd, its shared ``kvm_run`` page, its registers and its exits.

Each vCPU runs on a thread of its own (:class:`~guestmem.vmm.runner.Runner`
starts them). To take one out of the guest from another thread,
:meth:`Vcpu.kick` sets ``immediate_exit`` in ``kvm_run`` and sends the
thread :data:`KICK_SIGNAL`: a vCPU in the guest leaves KVM_RUN with EINTR,
one about to enter it returns at once, and a pending MMIO completes first.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import threading
from dataclasses import dataclass

from guestmem.errors import NativeOSError, UsageError
from guestmem.vmm import kvm_api as k

KICK_SIGNAL = signal.SIGRTMIN


def install_kick_handler() -> None:
    """Give :data:`KICK_SIGNAL` a handler that does nothing, so it interrupts KVM_RUN.

    Python installs handlers without SA_RESTART: the signal ends the ioctl
    with EINTR instead of killing the process. Only the main thread may
    install one.
    """
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None):
        return
    if threading.current_thread() is not threading.main_thread():
        raise UsageError("the VMM must start from the main thread (it installs a signal handler)")
    signal.signal(KICK_SIGNAL, lambda _signum, _frame: None)


@dataclass(frozen=True)
class MmioExit:
    """The guest touched ``address`` outside RAM: ``size`` bytes, read or written."""

    address: int
    size: int
    is_write: bool
    data: int  # the value written (0 for a read)


@dataclass(frozen=True)
class SystemEvent:
    """PSCI SYSTEM_OFF (``kind`` 1), SYSTEM_RESET (2) or a crash (3)."""

    kind: int


@dataclass(frozen=True)
class DebugExit:
    """A debug exception KVM passed to the VMM: the ESR (``hsr``) and fault address."""

    hsr: int
    far: int


@dataclass(frozen=True)
class Interrupted:
    """KVM_RUN ended with EINTR: a kick, or a signal for another purpose."""


@dataclass(frozen=True)
class OtherExit:
    """An exit this VMM does not handle, with its number."""

    reason: int


Exit = MmioExit | SystemEvent | DebugExit | Interrupted | OtherExit


class Vcpu:
    """One KVM vCPU of a VM (KVM_CREATE_VCPU), initialised for PSCI 0.2."""

    def __init__(self, vm_fd: int, index: int, run_size: int) -> None:
        """Create vCPU ``index`` and map its ``kvm_run`` page (``run_size`` bytes)."""
        self.index = index
        self.fd = k.ioctl(vm_fd, k.KVM_CREATE_VCPU, index, f"KVM_CREATE_VCPU {index}")
        os.set_inheritable(self.fd, False)
        self._run = mmap.mmap(self.fd, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.thread_id: int | None = None

    def init(self, vm_fd: int, *, powered_on: bool) -> None:
        """KVM_ARM_VCPU_INIT: the preferred target, PSCI 0.2, off unless ``powered_on``."""
        preferred = bytearray(k.VCPU_INIT.size)
        k.ioctl(vm_fd, k.KVM_ARM_PREFERRED_TARGET, preferred, "KVM_ARM_PREFERRED_TARGET")
        target = k.VCPU_INIT.unpack(preferred)[0]
        features = 1 << k.VCPU_PSCI_0_2 | (0 if powered_on else 1 << k.VCPU_POWER_OFF)
        request = bytearray(k.VCPU_INIT.pack(target, features, 0, 0, 0, 0, 0, 0))
        k.ioctl(self.fd, k.KVM_ARM_VCPU_INIT, request, f"KVM_ARM_VCPU_INIT vCPU {self.index}")

    def get(self, reg: int) -> int:
        """A register by its KVM id (see :mod:`~guestmem.vmm.kvm_api`)."""
        return k.get_one_reg(self.fd, reg)

    def set(self, reg: int, value: int) -> None:
        """Set a register by its KVM id."""
        k.set_one_reg(self.fd, reg, value)

    def run(self) -> Exit:
        """Enter the guest until the next exit the VMM must see."""
        try:
            k.ioctl(self.fd, k.KVM_RUN, 0, f"KVM_RUN vCPU {self.index}")
        except NativeOSError as err:
            if err.errno == errno.EINTR:
                return Interrupted()
            raise
        reason = int.from_bytes(self._run[k.RUN_EXIT_REASON : k.RUN_EXIT_REASON + 4], "little")
        if reason == k.EXIT_MMIO:
            address, data, size, is_write = k.MMIO_EXIT.unpack_from(self._run, k.RUN_EXIT_DATA)
            value = int.from_bytes(data[:size], "little") if is_write else 0
            return MmioExit(address, size, bool(is_write), value)
        if reason == k.EXIT_SYSTEM_EVENT:
            return SystemEvent(k.SYSTEM_EVENT.unpack_from(self._run, k.RUN_EXIT_DATA)[0])
        if reason == k.EXIT_DEBUG:
            hsr, _high, far = k.DEBUG_EXIT.unpack_from(self._run, k.RUN_EXIT_DATA)
            return DebugExit(hsr, far)
        if reason == k.EXIT_INTR:
            return Interrupted()
        return OtherExit(reason)

    def complete_read(self, exit_: MmioExit, value: int) -> None:
        """Give an MMIO read its value; the guest sees it on the next :meth:`run`."""
        start = k.RUN_EXIT_DATA + 8
        self._run[start : start + exit_.size] = (value & ((1 << 8 * exit_.size) - 1)).to_bytes(
            exit_.size, "little"
        )

    def complete_pending(self) -> None:
        """Finish what KVM holds for the next KVM_RUN (an MMIO read's value), not entering.

        The vCPU's thread must be parked (a kicked vCPU has ``immediate_exit``
        set). Its registers are then whole, as a save needs them.
        """
        self._run[k.RUN_IMMEDIATE_EXIT] = 1
        exit_ = self.run()
        if not isinstance(exit_, Interrupted):  # pragma: no cover - KVM returns EINTR at once
            raise UsageError(f"vCPU {self.index} ran instead of stopping: {exit_}")

    def allow_entry(self) -> None:
        """Clear ``immediate_exit``, so the next :meth:`run` enters the guest."""
        self._run[k.RUN_IMMEDIATE_EXIT] = 0

    def kick(self) -> None:
        """Make the vCPU's thread leave (or not enter) KVM_RUN soon; any thread may call it."""
        self._run[k.RUN_IMMEDIATE_EXIT] = 1
        if self.thread_id is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(self.thread_id, KICK_SIGNAL)

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the fd."""
        if self.fd >= 0:
            self._run.close()
            os.close(self.fd)
            self.fd = -1
