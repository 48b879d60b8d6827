"""The debugger's hold on a running machine: KVM's side of GDB run control.

:class:`KvmRunControl` implements :class:`~guestmem.gdbstub.RunControl`
(the protocol engine is :mod:`guestmem.gdbstub`; this is all the VMM keeps).
Stops go through the machine's :class:`~guestmem.vmm.gate.Gate` (a kick
takes each vCPU out of KVM_RUN, then it parks); registers through
KVM_GET/SET_ONE_REG; breakpoints, watchpoints and single steps through
KVM_SET_GUEST_DEBUG, which makes the vCPU exit with the exception's
syndrome (ESR) instead of taking it. Software breakpoints are BRK #0 words
the debug server writes with the DEBUG access class; with
KVM_GUESTDBG_USE_SW_BP a BRK exits to the VMM, so it is on only while a
debugger is attached (a guest's own BRK, as in a WARN, reaches the
debugger then; KVM cannot hand it back). Virtual addresses are translated
with the vCPU's own SCTLR/TCR/TTBR (:mod:`~guestmem.vmm.stage1`).
"""

from __future__ import annotations

from collections.abc import Sequence

from guestmem.errors import GuestMemoryError
from guestmem.gdbstub.commands import InvalidRequest
from guestmem.gdbstub.run_control import StopEvent, Watchpoint
from guestmem.vmm import kvm_api as k
from guestmem.vmm import stage1
from guestmem.vmm.gate import GateEvent
from guestmem.vmm.machine import Machine

STOP_TIMEOUT = 30.0  # a kicked vCPU parks in microseconds; this is for a wedged host
_ENABLE, _SINGLESTEP, _USE_SW_BP, _USE_HW = 1, 2, 1 << 16, 1 << 17
_HW_SLOTS = 16  # struct kvm_guest_debug_arch holds 16 of each
# DBGBCR: enabled, at EL1 and EL0 (PMC 0b11), all four bytes (BAS 0b1111).
_BCR = 1 | 0b11 << 1 | 0b1111 << 5
_LSC = {"read": 0b01, "write": 0b10, "access": 0b11}  # DBGWCR load/store control
_EC_STEP, _EC_HW_BREAK, _EC_WATCH, _EC_BRK = (0x32, 0x33), (0x30, 0x31), (0x34, 0x35), (0x3C,)
_ESR_WNR = 1 << 6
_REGISTERS = [k.x_reg(n) for n in range(31)] + [k.REG_SP, k.REG_PC, k.REG_PSTATE]


class DebugTimeout(GuestMemoryError, TimeoutError):
    """The vCPUs did not stop in time."""


class KvmRunControl:
    """Run control over a :class:`~guestmem.vmm.machine.Machine`'s vCPUs (see the module)."""

    def __init__(self, machine: Machine) -> None:
        """Take hold of ``machine``, which may already be running."""
        if machine.memory is None:
            raise GuestMemoryError("the machine has no memory")
        self._machine = machine
        self._memory = machine.memory
        self._vcpus = machine.vcpus
        self._gate = machine.gate
        self._running = True
        self._pending: StopEvent | None = None
        self._breakpoints: tuple[int, ...] = ()
        self._watchpoints: tuple[Watchpoint, ...] = ()
        self._attached = False
        with machine.vm.in_use() as vm_fd:
            breakpoints = k.check_extension(vm_fd, k.KVM_CAP_GUEST_DEBUG_HW_BPS)
            watchpoints = k.check_extension(vm_fd, k.KVM_CAP_GUEST_DEBUG_HW_WPS)
        self._slots = (min(breakpoints, _HW_SLOTS), min(watchpoints, _HW_SLOTS))

    @property
    def cpu_count(self) -> int:
        """How many vCPUs the machine has."""
        return len(self._vcpus)

    def stop(self) -> None:
        """Stop every vCPU (all-stop); the debugger is attached from now on."""
        self._attached = True
        if not self._running:
            return
        self._gate.close()
        event = self._gate.wait_stopped(STOP_TIMEOUT)
        if event is None:
            raise DebugTimeout(f"the vCPUs did not stop within {STOP_TIMEOUT:.0f} s")
        self._running = False
        self._pending = self._stop_event(event)

    def resume(self, step: frozenset[int]) -> None:
        """Run every vCPU, or only ``step``'s, one instruction each."""
        if self._gate.ended:
            self._pending = StopEvent(0, "exited")
            return
        self._program(step)
        self._pending = None
        self._running = True
        self._gate.open(step or None)

    def wait(self, timeout: float | None) -> StopEvent | None:
        """The event that ended the current run (None if it runs on, or was reported)."""
        if self._pending is not None:
            event, self._pending = self._pending, None
            return event
        if not self._running:
            return None
        ended = self._gate.wait_stopped(timeout)
        if ended is None:
            return None
        self._running = False
        return self._stop_event(ended)

    def detach(self) -> None:
        """The debugger is gone: no breakpoint, watchpoint or BRK exits any more."""
        self._attached = False
        self._breakpoints, self._watchpoints = (), ()
        if not self._gate.ended:
            self._program(frozenset())

    def registers(self, cpu: int) -> list[int]:
        """x0..x30, sp, pc and cpsr (the low 32 bits of PSTATE) of ``cpu``."""
        vcpu = self._vcpus[cpu]
        values = [vcpu.get(reg) for reg in _REGISTERS]
        values[33] &= 0xFFFF_FFFF
        return values

    def set_register(self, cpu: int, index: int, value: int) -> None:
        """Set register ``index`` (0..33) of ``cpu``."""
        if not 0 <= index < len(_REGISTERS) or not 0 <= value < 1 << 64:
            raise InvalidRequest(f"no register {index}, or {value:#x} does not fit it")
        self._vcpus[cpu].set(_REGISTERS[index], value)

    def set_hw_debug(self, breakpoints: Sequence[int], watchpoints: Sequence[Watchpoint]) -> None:
        """Keep these breakpoints and watchpoints (virtual addresses) for every vCPU's next run."""
        if len(breakpoints) > self._slots[0] or len(watchpoints) > self._slots[1]:
            raise InvalidRequest(f"the vCPUs have {self._slots} breakpoint and watchpoint slots")
        for watch in watchpoints:
            _watch_registers(watch)  # refuses what DBGWCR cannot express, before any change
        self._breakpoints, self._watchpoints = tuple(breakpoints), tuple(watchpoints)

    def hw_slots(self) -> tuple[int, int]:
        """(breakpoints, watchpoints) KVM offers per vCPU."""
        return self._slots

    def translate(self, cpu: int, va: int, length: int) -> list[tuple[int, int]]:
        """``[va, va + length)`` through ``cpu``'s stage 1, as (IPA, length) pieces."""
        vcpu = self._vcpus[cpu]
        regs = stage1.TranslationRegs(
            sctlr=vcpu.get(k.SCTLR_EL1),
            tcr=vcpu.get(k.TCR_EL1),
            ttbr0=vcpu.get(k.TTBR0_EL1),
            ttbr1=vcpu.get(k.TTBR1_EL1),
        )
        return stage1.ranges(self._memory, regs, va, length)

    def _program(self, step: frozenset[int]) -> None:
        control = (_ENABLE | _USE_SW_BP) if self._attached else 0
        bcr, bvr, wcr, wvr = [0] * _HW_SLOTS, [0] * _HW_SLOTS, [0] * _HW_SLOTS, [0] * _HW_SLOTS
        for slot, address in enumerate(self._breakpoints):
            bcr[slot], bvr[slot] = _BCR, address & ~3
        for slot, watch in enumerate(self._watchpoints):
            wcr[slot], wvr[slot] = _watch_registers(watch)
        if self._breakpoints or self._watchpoints:
            control |= _ENABLE | _USE_HW
        for vcpu in self._vcpus:
            flags = control | (_ENABLE | _SINGLESTEP if vcpu.index in step else 0)
            request = bytearray(k.GUEST_DEBUG.pack(flags, 0, *bcr, *bvr, *wcr, *wvr))
            k.ioctl(vcpu.fd, k.KVM_SET_GUEST_DEBUG, request, "KVM_SET_GUEST_DEBUG")

    def _stop_event(self, event: GateEvent) -> StopEvent:
        if event.ended:
            return StopEvent(0, "exited")
        if event.exit is None:
            return StopEvent(event.cpu, "interrupt")
        ec = event.exit.hsr >> 26 & 0x3F
        pc = self._vcpus[event.cpu].get(k.REG_PC)
        if ec in _EC_STEP:
            return StopEvent(event.cpu, "step", pc)
        if ec in _EC_HW_BREAK:
            return StopEvent(event.cpu, "hw-breakpoint", pc)
        if ec in _EC_WATCH:
            far = event.exit.far
            hit = next((w for w in self._watchpoints if w.address <= far < w.address + w.length),
                       None)  # fmt: skip
            kind = hit.kind if hit else ("write" if event.exit.hsr & _ESR_WNR else "read")
            return StopEvent(event.cpu, "watchpoint", far, kind)
        return StopEvent(event.cpu, "breakpoint", pc)


def _watch_registers(watch: Watchpoint) -> tuple[int, int]:
    """DBGWCR and DBGWVR for ``watch``: 1 to 8 bytes inside one aligned doubleword."""
    offset = watch.address & 7
    if not 1 <= watch.length <= 8 - offset:
        raise InvalidRequest(
            f"a hardware watchpoint covers 1 to 8 bytes within an aligned doubleword, not "
            f"{watch.length} at {watch.address:#x}"
        )
    byte_mask = ((1 << watch.length) - 1) << offset
    return 1 | 0b11 << 1 | _LSC[watch.kind] << 3 | byte_mask << 5, watch.address & ~7
