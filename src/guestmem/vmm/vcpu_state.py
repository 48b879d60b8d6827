"""A stopped vCPU's whole state: every register KVM lists, its power state, pending events.

What KVM_GET_REG_LIST names is what a save carries: the core registers,
the FP/SIMD registers, the firmware pseudo-registers (PSCI version), every
system register KVM keeps (the MTE ones among them: GCR_EL1, RGSR_EL1,
TFSR_EL1, TFSRE0_EL1) and the timers (CNTV_CTL, CNTV_CVAL and CNTVCT, the
counter). Restoring CNTVCT sets the VM's counter offset, so the guest's
clock continues from where it stopped: the time the machine was saved for
does not exist for the guest. The target's vCPU must list the same
registers (same kernel features): a different list is refused before any
register is written.

Payload (version 1): mp_state u32 | events blob (struct kvm_vcpu_events) |
count u32 | count x (id u64 | value blob of the size the id declares).
"""

from __future__ import annotations

from dataclasses import dataclass

from guestmem.vmm import kvm_api as k
from guestmem.vmm.state_codec import Reader, StateError, Writer
from guestmem.vmm.vcpu import Vcpu

VERSION = 1
MAX_REGISTERS = 4096
_MP_STATES = frozenset({0, 5, 9})  # RUNNABLE, STOPPED, SUSPENDED


@dataclass(frozen=True)
class VcpuState:
    """One vCPU's registers (id to bytes, in KVM's order), power state and pending events."""

    mp_state: int
    events: bytes
    registers: tuple[tuple[int, bytes], ...]

    def encode(self) -> bytes:
        """The section payload."""
        out = Writer().u8(VERSION).u32(self.mp_state).blob(self.events)
        out.u32(len(self.registers))
        for reg, value in self.registers:
            out.u64(reg).blob(value)
        return out.bytes()

    @classmethod
    def decode(cls, reader: Reader) -> VcpuState:
        """Read a payload :meth:`encode` made; StateError if it is not one."""
        reader.version("a vCPU", VERSION)
        mp_state = reader.u32("mp_state")
        if mp_state not in _MP_STATES:
            raise reader.error(f"mp_state {mp_state} is none of {sorted(_MP_STATES)}")
        events = reader.blob("vCPU events", k.VCPU_EVENTS_SIZE)
        if len(events) not in (0, k.VCPU_EVENTS_SIZE):
            raise reader.error(f"vCPU events are {len(events)} bytes, not {k.VCPU_EVENTS_SIZE}")
        count = reader.u32("the register count")
        if count > MAX_REGISTERS:
            raise reader.error(f"{count} registers, more than {MAX_REGISTERS}")
        registers = []
        for _ in range(count):
            reg = reader.u64("a register id")
            value = reader.blob(f"register {reg:#x}", 256)
            if len(value) != k.reg_size(reg):
                raise reader.error(f"register {reg:#x} has {len(value)} bytes, its id says "
                                   f"{k.reg_size(reg)}")  # fmt: skip
            registers.append((reg, value))
        reader.end()
        return cls(mp_state, events, tuple(registers))


def save(vcpu: Vcpu, *, events: bool) -> VcpuState:
    """Read the state of ``vcpu``, which must be out of KVM_RUN with nothing pending."""
    registers = tuple((reg, k.get_reg(vcpu.fd, reg)) for reg in k.reg_list(vcpu.fd))
    mp = bytearray(k.MP_STATE.size)
    k.ioctl(vcpu.fd, k.KVM_GET_MP_STATE, mp, f"KVM_GET_MP_STATE vCPU {vcpu.index}")
    pending = b""
    if events:
        buffer = bytearray(k.VCPU_EVENTS_SIZE)
        k.ioctl(vcpu.fd, k.KVM_GET_VCPU_EVENTS, buffer, f"KVM_GET_VCPU_EVENTS vCPU {vcpu.index}")
        pending = bytes(buffer)
    return VcpuState(k.MP_STATE.unpack(mp)[0], pending, registers)


def check_fits(vcpu: Vcpu, state: VcpuState) -> None:
    """Refuse ``state`` if ``vcpu`` does not have exactly its registers (nothing is written)."""
    here = k.reg_list(vcpu.fd)
    saved = [reg for reg, _ in state.registers]
    if saved != here:
        missing = sorted(set(here) - set(saved))[:4]
        extra = sorted(set(saved) - set(here))[:4]
        raise StateError(
            0,
            f"vCPU {vcpu.index}: the saved registers are not this KVM's "
            f"({len(saved)} saved, {len(here)} here; missing {[hex(r) for r in missing]}, "
            f"unknown {[hex(r) for r in extra]})",
        )


def load(vcpu: Vcpu, state: VcpuState) -> None:
    """Write ``state`` into ``vcpu`` (checked with :func:`check_fits` first)."""
    for reg, value in state.registers:
        k.set_reg(vcpu.fd, reg, value)
    if state.events:
        k.ioctl(vcpu.fd, k.KVM_SET_VCPU_EVENTS, bytearray(state.events), "KVM_SET_VCPU_EVENTS")
    mp = bytearray(k.MP_STATE.pack(state.mp_state))
    k.ioctl(vcpu.fd, k.KVM_SET_MP_STATE, mp, f"KVM_SET_MP_STATE vCPU {vcpu.index}")
