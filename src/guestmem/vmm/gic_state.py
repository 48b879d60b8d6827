"""The vGICv3's state while no vCPU runs: distributor, redistributors, CPU interfaces.

Read and written through KVM's device attributes (Documentation/virt/kvm/
devices/arm-vgic-v3.rst), 32-bit distributor and redistributor registers by
offset, 64-bit CPU interface registers by their system register encoding.
What is carried, for the SPIs (distributor) and each vCPU's SGIs and PPIs
(redistributor, SGI frame): group, enable, pending latch, active, priority,
configuration, group modifier, and each SPI's route (IROUTER). The pending
latch is what the uaccess interface shows (not a guest read's OR with the
line level); the line levels are the devices': the UART drives its line
again after a restore. KVM's vGIC has no ITS here, so there are no LPIs.

CPU interface registers go SRE first and CTLR before the active priority
registers (their count follows CTLR.PRIbits); an active priority register
this vGIC does not implement is saved as absent, not as 0.
:class:`GicPart` is the vGIC's stateful part: save, decode, apply.

Payload (version 1): irqs u32 | count u32 | count x (offset u32 | value u32)
(distributor), then per vCPU: mpidr u64 | count u32 | (offset u32 | value
u32)... (redistributor) | count u32 | (encoding u16 | present u8 | value u64)...
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass

from guestmem.errors import NativeOSError
from guestmem.saved_state import Reader, Writer
from guestmem.vmm import kvm_api as k
from guestmem.vmm import layout
from guestmem.vmm.gic import Gic
from guestmem.vmm.vcpu import Vcpu
from guestmem.vmm.vcpu_state import VcpuState

VERSION = 1
IRQS = 32 + layout.SPI_COUNT
MPIDR_EL1 = k.sys_reg(3, 0, 0, 0, 5)

GICD_CTLR, GICD_IIDR = 0x0000, 0x0008
_BITS_1 = (0x0080, 0x0100, 0x0200, 0x0300, 0x0D00)  # IGROUPR ISENABLER ISPENDR ISACTIVER IGRPMODR
_IPRIORITYR, _ICFGR, _IROUTER = 0x0400, 0x0C00, 0x6000
SGI_FRAME = 0x1_0000


def _dist_offsets() -> list[int]:
    """Every distributor register word a save carries, IIDR first and CTLR last."""
    spis = range(32, IRQS)
    offsets = [GICD_IIDR]
    for base in _BITS_1:
        offsets += [base + 4 * (irq // 32) for irq in spis[::32]]
    offsets += [_IPRIORITYR + irq for irq in spis[::4]]
    offsets += [_ICFGR + 4 * (irq // 16) for irq in spis[::16]]
    for irq in spis:
        offsets += [_IROUTER + 8 * irq, _IROUTER + 8 * irq + 4]
    return [*offsets, GICD_CTLR]


def _redist_offsets() -> list[int]:
    """Every redistributor register word (SGI frame) a save carries: SGIs and PPIs."""
    offsets = [SGI_FRAME + base for base in _BITS_1]
    offsets += [SGI_FRAME + _IPRIORITYR + 4 * n for n in range(8)]
    return [*offsets, SGI_FRAME + _ICFGR, SGI_FRAME + _ICFGR + 4]


def _icc(op1: int, crn: int, crm: int, op2: int) -> int:
    return 3 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2


# SRE first, CTLR before the active priority registers.
CPU_SYSREG_NAMES = {
    _icc(0, 12, 12, 5): "ICC_SRE_EL1",
    _icc(0, 12, 12, 4): "ICC_CTLR_EL1",
    _icc(0, 4, 6, 0): "ICC_PMR_EL1",
    _icc(0, 12, 8, 3): "ICC_BPR0_EL1",
    _icc(0, 12, 12, 3): "ICC_BPR1_EL1",
    **{_icc(0, 12, 8, 4 + n): f"ICC_AP0R{n}_EL1" for n in range(4)},
    **{_icc(0, 12, 9, n): f"ICC_AP1R{n}_EL1" for n in range(4)},
    _icc(0, 12, 12, 6): "ICC_IGRPEN0_EL1",
    _icc(0, 12, 12, 7): "ICC_IGRPEN1_EL1",
}
CPU_SYSREGS = tuple(CPU_SYSREG_NAMES)
ICC_CTLR_EL1 = CPU_SYSREGS[1]
# The active priority registers, by encoding: their index n in ICC_AP<g>R<n>_EL1.
_APR_INDEX = {encoding: int(name[8]) for encoding, name in CPU_SYSREG_NAMES.items() if "AP" in name}
DIST_OFFSETS = tuple(_dist_offsets())
REDIST_OFFSETS = tuple(_redist_offsets())


@dataclass(frozen=True)
class CpuInterface:
    """One vCPU's redistributor words and CPU interface registers (None: not implemented)."""

    mpidr: int
    redist: tuple[int, ...]
    sysregs: tuple[int | None, ...]


@dataclass(frozen=True)
class GicState:
    """The distributor's words (in :data:`DIST_OFFSETS` order) and each vCPU's interface."""

    dist: tuple[int, ...]
    cpus: tuple[CpuInterface, ...]

    def encode(self) -> bytes:
        """The section payload."""
        out = Writer().u8(VERSION).u32(IRQS).u32(len(self.dist))
        for offset, value in zip(DIST_OFFSETS, self.dist, strict=True):
            out.u32(offset).u32(value)
        out.u32(len(self.cpus))
        for cpu in self.cpus:
            out.u64(cpu.mpidr).u32(len(cpu.redist))
            for offset, value in zip(REDIST_OFFSETS, cpu.redist, strict=True):
                out.u32(offset).u32(value)
            out.u32(len(cpu.sysregs))
            for encoding, reg in zip(CPU_SYSREGS, cpu.sysregs, strict=True):
                out.u16(encoding).u8(reg is not None).u64(reg or 0)
        return out.bytes()

    @classmethod
    def decode(cls, reader: Reader, affinities: Sequence[int]) -> GicState:
        """Read a payload for vCPUs of these ``affinities`` (:func:`affinity`), in order.

        The affinities are the ones the vCPUs will have once their own state
        is loaded. StateError if the payload is not one for them.
        """
        reader.version("the vGIC", VERSION)
        reader.expect("the vGIC's interrupt count", reader.u32("the interrupt count"), IRQS)
        dist = _words(reader, DIST_OFFSETS, "distributor")
        reader.expect("the vCPU count", reader.u32("the vCPU count"), len(affinities))
        interfaces = []
        for index, wanted in enumerate(affinities):
            mpidr = reader.u64("an MPIDR")
            if mpidr != wanted:
                raise reader.error(
                    f"vCPU {index}'s affinity is {mpidr:#x} in the saved vGIC, "
                    f"{wanted:#x} in the saved vCPU"
                )
            redist = _words(reader, REDIST_OFFSETS, "redistributor")
            reader.expect("the CPU interface register count", reader.u32(), len(CPU_SYSREGS))
            sysregs: list[int | None] = []
            for encoding in CPU_SYSREGS:
                reader.expect("a CPU interface register", reader.u16(), encoding)
                present = reader.flag("a register's presence")
                ctlr = sysregs[1] if len(sysregs) > 1 else None
                _check_presence(reader, encoding, present, ctlr)
                value = reader.u64("a CPU interface register")
                if not present and value:
                    name = CPU_SYSREG_NAMES[encoding]
                    raise reader.error(f"{name} is absent, yet saved with a value ({value:#x})")
                sysregs.append(value if present else None)
            interfaces.append(CpuInterface(mpidr, redist, tuple(sysregs)))
        reader.end()
        return cls(dist, tuple(interfaces))


def _check_presence(reader: Reader, encoding: int, present: bool, ctlr: int | None) -> None:
    """Refuse a saved presence KVM could not have shown.

    Every register is there but the active priority registers, of which KVM
    has those the CPU interface's priority bits (ICC_CTLR_EL1.PRIbits) need.
    """
    name = CPU_SYSREG_NAMES[encoding]
    if encoding not in _APR_INDEX:
        if not present:
            raise reader.error(f"{name} is saved as absent; every vGICv3 has it")
        return
    assert ctlr is not None  # CTLR comes before the active priority registers
    bits = (ctlr >> 8 & 7) + 1
    implemented = _APR_INDEX[encoding] <= max_apr_index(bits)
    if present != implemented:
        raise reader.error(
            f"{name} is saved as {'present' if present else 'absent'}, but the saved "
            f"ICC_CTLR_EL1's {bits} priority bits make it {'absent' if present else 'present'}"
        )


def max_apr_index(priority_bits: int) -> int:
    """The last n of the ICC_AP<g>R<n>_EL1 a CPU interface of these priority bits has."""
    return {7: 3, 6: 1}.get(priority_bits, 0)


def _words(reader: Reader, offsets: tuple[int, ...], what: str) -> tuple[int, ...]:
    reader.expect(f"the {what} register count", reader.u32(), len(offsets))
    values = []
    for offset in offsets:
        reader.expect(f"a {what} register offset", reader.u32(), offset)
        values.append(reader.u32(f"{what} register {offset:#x}"))
    return tuple(values)


def affinity(mpidr: int) -> int:
    """An MPIDR_EL1 value's affinity as the vGIC's attributes want it (Aff3..Aff0, 63..32)."""
    return ((mpidr >> 32 & 0xFF) << 24 | (mpidr & 0xFF_FFFF)) << 32


def mpidr_of(vcpu: Vcpu) -> int:
    """The vCPU's affinity, as the vGIC's attributes want it (see :func:`affinity`)."""
    return affinity(vcpu.get(MPIDR_EL1))


class GicPart:
    """The vGIC as a stateful part (:class:`~guestmem.saved_state.Stateful` of :class:`GicState`).

    Its section in a machine's state is ``gic``, after the vCPUs'.
    """

    section = "gic"

    def __init__(self, gic: Gic, vcpus: Sequence[Vcpu]) -> None:
        """The part of ``gic``, whose CPU interfaces are those of ``vcpus`` (by index)."""
        self.gic = gic
        self.vcpus = tuple(vcpus)

    def read(self) -> GicState:
        """The vGIC's state (no vCPU may be in KVM_RUN)."""
        gic = self.gic
        dist = tuple(k.get_device_attr(gic.fd, k.VGIC_GRP_DIST_REGS, o, 4) for o in DIST_OFFSETS)
        cpus = []
        for vcpu in self.vcpus:
            mpidr = mpidr_of(vcpu)
            redist = tuple(
                k.get_device_attr(gic.fd, k.VGIC_GRP_REDIST_REGS, mpidr | o, 4)
                for o in REDIST_OFFSETS
            )
            sysregs = tuple(_get_sysreg(gic, mpidr | encoding) for encoding in CPU_SYSREGS)
            cpus.append(CpuInterface(mpidr, redist, sysregs))
        return GicState(dist, tuple(cpus))

    def save_state(self) -> bytes:
        """The vGIC's state as its section's payload (see :meth:`read`)."""
        return self.read().encode()

    def decode_state(self, reader: Reader, cpus: Sequence[VcpuState] | None = None) -> GicState:
        """Read and check a payload :meth:`save_state` made; writes nothing.

        Each CPU interface's affinity must be its vCPU's once ``cpus`` (the
        vCPU states loaded with this one, by index) are loaded; without
        ``cpus``, the vCPUs' affinities now (see :meth:`GicState.decode`).
        """
        if cpus is None:
            affinities = [mpidr_of(vcpu) for vcpu in self.vcpus]
        else:
            affinities = [_affinity(v, c) for v, c in zip(self.vcpus, cpus, strict=True)]
        return GicState.decode(reader, affinities)

    def apply_state(self, state: GicState) -> None:
        """Write a decoded state into a freshly initialised vGIC whose vCPUs have its affinities.

        The distributor, then each vCPU's redistributor and CPU interface
        registers (SRE first, CTLR before the active priority registers).
        """
        gic = self.gic
        for offset, value in zip(DIST_OFFSETS, state.dist, strict=True):
            k.set_device_attr(gic.fd, k.VGIC_GRP_DIST_REGS, offset, value, size=4)
        for cpu in state.cpus:
            for offset, value in zip(REDIST_OFFSETS, cpu.redist, strict=True):
                k.set_device_attr(gic.fd, k.VGIC_GRP_REDIST_REGS, cpu.mpidr | offset, value, size=4)
            for encoding, reg in zip(CPU_SYSREGS, cpu.sysregs, strict=True):
                if reg is not None:
                    k.set_device_attr(gic.fd, k.VGIC_GRP_CPU_SYSREGS, cpu.mpidr | encoding, reg)

    def load_state(self, data: bytes) -> None:
        """Decode ``data`` (for the vCPUs as they are) and apply it: nothing written if bad."""
        self.apply_state(self.decode_state(Reader(data)))


def _affinity(vcpu: Vcpu, state: VcpuState) -> int:
    """The vCPU's affinity once ``state`` is loaded: the saved MPIDR_EL1's, or its own."""
    saved = dict(state.registers).get(MPIDR_EL1)
    if saved is None:
        return mpidr_of(vcpu)
    return affinity(int.from_bytes(saved, "little"))


def _get_sysreg(gic: Gic, attr: int) -> int | None:
    try:
        return k.get_device_attr(gic.fd, k.VGIC_GRP_CPU_SYSREGS, attr)
    except NativeOSError as err:
        if err.errno in (errno.EINVAL, errno.ENXIO):
            return None  # an active priority register beyond this vGIC's priority bits
        raise
