"""A stopped vCPU's whole state: every register KVM lists, its power state, pending events.

What KVM_GET_REG_LIST names is what a save carries: the core registers,
the FP/SIMD registers, the firmware pseudo-registers (PSCI version), every
system register KVM keeps (the MTE ones among them: GCR_EL1, RGSR_EL1,
TFSR_EL1, TFSRE0_EL1) and the timers (CNTV_CTL, CNTV_CVAL and CNTVCT, the
counter). Restoring CNTVCT sets the VM's counter offset, so the guest's
clock continues from where it stopped: the time the machine was saved for
does not exist for the guest. The target's vCPU must list the same
registers (same kernel features) and show the same ID registers (the CPU
features the guest saw at boot, :mod:`id_registers`): anything else is
refused before any register is written. :class:`VcpuPart` is a vCPU's
stateful part: save, decode (checked against the vCPU), apply.

Payload (version 1): mp_state u32 | events blob (struct kvm_vcpu_events) |
count u32 | count x (id u64 | value blob of the size the id declares).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from guestmem.saved_state import Reader, StateError, Writer
from guestmem.vmm import id_registers
from guestmem.vmm import kvm_api as k
from guestmem.vmm.vcpu import Vcpu

VERSION = 1
MAX_REGISTERS = 4096
_MP_STATES = frozenset({0, 5, 9})  # RUNNABLE, STOPPED, SUSPENDED


@dataclass(frozen=True)
class VcpuState:
    """One vCPU's registers (id to bytes, in KVM's order), power state and pending events.

    A decoded state knows where each register's record starts in the whole
    state (``offsets``), for the errors of :meth:`VcpuPart.decode_state`.
    """

    mp_state: int
    events: bytes
    registers: tuple[tuple[int, bytes], ...]
    offsets: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def encode(self) -> bytes:
        """The section payload."""
        out = Writer().u8(VERSION).u32(self.mp_state).blob(self.events)
        out.u32(len(self.registers))
        for reg, value in self.registers:
            out.u64(reg).blob(value)
        return out.bytes()

    @classmethod
    def decode(cls, reader: Reader, *, events: bool) -> VcpuState:
        """Read a payload :meth:`encode` made for a KVM with (``events``) or without events.

        StateError if it is not one: pending events (KVM_CAP_VCPU_EVENTS)
        are saved whole by a KVM that has them and not at all by one that
        has not, and a target takes only what its own KVM would have saved.
        """
        reader.version("a vCPU", VERSION)
        mp_state = reader.u32("mp_state")
        if mp_state not in _MP_STATES:
            raise reader.error(f"mp_state {mp_state} is none of {sorted(_MP_STATES)}")
        saved_events = reader.blob("vCPU events", k.VCPU_EVENTS_SIZE)
        wanted = k.VCPU_EVENTS_SIZE if events else 0
        if len(saved_events) != wanted:
            raise reader.error(
                f"vCPU events are {len(saved_events)} bytes, {wanted} here "
                f"(pending events saved by one KVM, not both)"
            )
        count = reader.u32("the register count")
        if count > MAX_REGISTERS:
            raise reader.error(f"{count} registers, more than {MAX_REGISTERS}")
        registers, offsets = [], []
        for _ in range(count):
            offsets.append(reader.offset)
            reg = reader.u64("a register id")
            value = reader.blob(f"register {reg:#x}", 256)
            if len(value) != k.reg_size(reg):
                raise reader.error(f"register {reg:#x} has {len(value)} bytes, its id says "
                                   f"{k.reg_size(reg)}")  # fmt: skip
            registers.append((reg, value))
        reader.end()
        return cls(mp_state, saved_events, tuple(registers), tuple(offsets))


class VcpuPart:
    """A vCPU as a stateful part (:class:`~guestmem.saved_state.Stateful` of :class:`VcpuState`).

    ``events``: whether this KVM has KVM_CAP_VCPU_EVENTS, whose pending
    events a save then carries and a load then takes. Its section in a
    machine's state is :attr:`section`.
    """

    def __init__(self, vcpu: Vcpu, *, events: bool) -> None:
        """The part of ``vcpu``, on a KVM with (``events``) or without pending events."""
        self.vcpu = vcpu
        self.events = events

    @property
    def section(self) -> str:
        """The name of its section in a machine's state: ``cpu<N>``."""
        return f"cpu{self.vcpu.index}"

    def read(self) -> VcpuState:
        """The vCPU's state; it must be out of KVM_RUN with nothing pending."""
        vcpu = self.vcpu
        registers = tuple((reg, k.get_reg(vcpu.fd, reg)) for reg in k.reg_list(vcpu.fd))
        mp = bytearray(k.MP_STATE.size)
        k.ioctl(vcpu.fd, k.KVM_GET_MP_STATE, mp, f"KVM_GET_MP_STATE vCPU {vcpu.index}")
        pending = b""
        if self.events:
            buffer = bytearray(k.VCPU_EVENTS_SIZE)
            k.ioctl(
                vcpu.fd, k.KVM_GET_VCPU_EVENTS, buffer, f"KVM_GET_VCPU_EVENTS vCPU {vcpu.index}"
            )
            pending = bytes(buffer)
        return VcpuState(k.MP_STATE.unpack(mp)[0], pending, registers)

    def save_state(self) -> bytes:
        """The vCPU's state as its section's payload (see :meth:`read`)."""
        return self.read().encode()

    def decode_state(self, reader: Reader) -> VcpuState:
        """Read a payload :meth:`save_state` made and check it fits this vCPU; writes nothing.

        Its bytes (:meth:`VcpuState.decode`), then the register list, which
        must be this vCPU's (the same KVM features), and every ID register's
        value: the guest saw those CPU features and runs on them.
        """
        state = VcpuState.decode(reader, events=self.events)
        self._check_fits(state)
        return state

    def _check_fits(self, state: VcpuState) -> None:
        vcpu = self.vcpu
        here = k.reg_list(vcpu.fd)
        saved = [reg for reg, _ in state.registers]
        if saved != here:
            missing = sorted(set(here) - set(saved))[:4]
            extra = sorted(set(saved) - set(here))[:4]
            pairs = enumerate(zip(saved, here, strict=False))
            first = next((i for i, (a, b) in pairs if a != b), min(len(saved), len(here)))
            raise StateError(
                _offset(state, first),
                f"vCPU {vcpu.index}: the saved registers are not this KVM's "
                f"({len(saved)} saved, {len(here)} here; missing {[hex(r) for r in missing]}, "
                f"unknown {[hex(r) for r in extra]})",
            )
        for index, (reg, value) in enumerate(state.registers):
            if not id_registers.is_id_register(reg):
                continue
            current = k.get_reg(vcpu.fd, reg)
            if current != value:
                raise StateError(
                    _offset(state, index),
                    f"vCPU {vcpu.index}: {id_registers.name(reg)} is {_hex(value)} in the saved "
                    f"state, {_hex(current)} here: this host's KVM shows the guest other CPU "
                    f"features",
                )

    def apply_state(self, state: VcpuState) -> None:
        """Write a state :meth:`decode_state` checked: registers, pending events, MP state."""
        vcpu = self.vcpu
        for reg, value in state.registers:
            k.set_reg(vcpu.fd, reg, value)
        if state.events:
            k.ioctl(vcpu.fd, k.KVM_SET_VCPU_EVENTS, bytearray(state.events), "KVM_SET_VCPU_EVENTS")
        mp = bytearray(k.MP_STATE.pack(state.mp_state))
        k.ioctl(vcpu.fd, k.KVM_SET_MP_STATE, mp, f"KVM_SET_MP_STATE vCPU {vcpu.index}")

    def load_state(self, data: bytes) -> None:
        """Decode ``data`` and apply it: a StateError, and nothing written, if it is bad."""
        self.apply_state(self.decode_state(Reader(data)))


def _offset(state: VcpuState, index: int) -> int:
    """Where register record ``index`` starts (or the last one, or 0 if not decoded)."""
    if not state.offsets:
        return 0
    return state.offsets[min(index, len(state.offsets) - 1)]


def _hex(value: bytes) -> str:
    return f"{int.from_bytes(value, 'little'):#x}"
