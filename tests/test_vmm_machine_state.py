"""Loading a whole machine's state (guestmem.vmm.machine_state): all or nothing, every byte checked.

The machine's KVM parts are replaced at the narrowest seam: the kvm_api
calls vcpu_state and gic_state make (KVM_GET_REG_LIST, KVM_GET/SET_ONE_REG,
the MP state and vCPU events ioctls, the vGIC's device attributes) are
answered by :class:`FakeKvm`, which keeps each vCPU's registers and the
vGIC's words and records every write. The UART and the virtio devices are
the real ones over SOFTWARE guest memory, driven as a guest would. A refused
load must be a StateError at an offset inside the state and leave the
target exactly as it was built; an accepted one must hold what was saved.
Host lane.
"""

from __future__ import annotations

import errno
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

import guestmem as gm
from conftest import EMULATED, FIGURES
from guestmem.devices import pl011
from guestmem.devices import virtio_blk as blk
from guestmem.devices import virtio_console as hvc
from guestmem.devices import virtio_mmio as mmio
from guestmem.errors import NativeOSError
from guestmem.saved_state import StateError
from guestmem.vmm import gic_state, layout, machine_state, state_codec, vcpu_state
from guestmem.vmm import kvm_api as k
from guestmem.vmm.gic import Gic
from guestmem.vmm.machine import Disk, Machine, MachineConfig
from guestmem.vmm.vcpu import Vcpu
from test_devices_state import Levels
from test_devices_virtio_mmio import BASE, DATA, RAM, SECTORS, Line, kick, request, set_up_queues

assert BASE == layout.RAM  # the devices' rings are in the machine's RAM

CPUS = 2
ID_AA64PFR1_EL1 = k.sys_reg(3, 0, 0, 4, 1)
ID_AA64PFR2_EL1 = k.sys_reg(3, 0, 0, 4, 2)
UNNAMED_ID_REGISTER = k.sys_reg(3, 0, 0, 4, 3)  # not allocated: reads as zero
_U128 = 0x0040_0000_0000_0000
_U32 = 0x0020_0000_0000_0000
_CORE_U64 = k.core_reg(0)


def _core(offset: int, size: int) -> int:
    return _CORE_U64 & ~(0xF << 52) | size | offset


def _sys(*encoding: int) -> int:
    return k.sys_reg(*encoding)


# What KVM_GET_REG_LIST names on arm64, cut down: the core registers, some
# FP/SIMD ones (128 and 32 bits), PSCI's firmware register and system
# registers: the ID registers (with MTE in ID_AA64PFR1_EL1), MPIDR, the MTE
# ones, translation and the timer's.
ID_REGISTERS = {
    _sys(3, 0, 0, 4, 0): 0x1100_0000_1001_1111,  # ID_AA64PFR0_EL1
    ID_AA64PFR1_EL1: 0x0000_0000_0000_0221,  # MTE = 2, SSBS, BT
    ID_AA64PFR2_EL1: 0x0000_0000_0000_0011,  # MTE_STORE_ONLY, MTE_FAR
    UNNAMED_ID_REGISTER: 0,
    _sys(3, 0, 0, 6, 0): 0x0221_1000_1021_1120,  # ID_AA64ISAR0_EL1
    _sys(3, 0, 0, 6, 1): 0x0000_0000_0121_1001,  # ID_AA64ISAR1_EL1
    _sys(3, 0, 0, 7, 0): 0x0000_0000_0010_1125,  # ID_AA64MMFR0_EL1
    _sys(3, 0, 0, 7, 2): 0x0000_0000_0000_1011,  # ID_AA64MMFR2_EL1
}
OTHER_SYSREGS = [
    _sys(3, 0, 0, 0, 0),  # MIDR_EL1
    gic_state.MPIDR_EL1,
    k.SCTLR_EL1, k.TTBR0_EL1, k.TTBR1_EL1, k.TCR_EL1,
    _sys(3, 0, 1, 0, 5), _sys(3, 0, 1, 0, 6),  # RGSR_EL1, GCR_EL1
    _sys(3, 0, 5, 6, 0), _sys(3, 0, 5, 6, 1),  # TFSR_EL1, TFSRE0_EL1
    _sys(3, 3, 14, 3, 1), _sys(3, 3, 14, 0, 2), _sys(3, 3, 14, 3, 2),  # CNTV_CTL, CVAL, CNT
]  # fmt: skip
REGISTERS = [
    *(k.x_reg(n) for n in range(31)),
    k.REG_SP,
    k.REG_PC,
    k.REG_PSTATE,
    *(_core(82 + 4 * n, _U128) for n in range(4)),  # V0..V3
    _core(210, _U32),  # FPSR
    _core(211, _U32),  # FPCR
    0x6030_0000_0014_0000,  # KVM_REG_ARM_PSCI_VERSION
    *ID_REGISTERS,
    *OTHER_SYSREGS,
]
ICC_APR = {  # encoding: n of ICC_AP<g>R<n>_EL1
    **{gic_state.CPU_SYSREGS[5 + n]: n for n in range(4)},
    **{gic_state.CPU_SYSREGS[9 + n]: n for n in range(4)},
}


class FakeKvm:
    """The vCPUs' registers, MP states and events and the vGICs' words, by fd; writes recorded."""

    def __init__(self) -> None:
        self.regs: dict[int, dict[int, bytes]] = {}
        self.mp_state: dict[int, bytes] = {}
        self.events: dict[int, bytes] = {}
        self.vgic: dict[int, dict[tuple[int, int], int]] = {}  # fd: {(group, attr): value}
        self.vgic_vcpus: dict[int, list[int]] = {}  # fd: its vCPUs' fds
        self.writes: list[str] = []

    def add_vcpu(self, fd: int, index: int, *, salt: int) -> None:
        """A vCPU as KVM_ARM_VCPU_INIT leaves it; ``salt`` makes one machine's values its own."""
        regs = {}
        for reg in REGISTERS:
            size = k.reg_size(reg)
            value = ID_REGISTERS.get(reg, (reg * 0x9E37_79B9 + salt * 0x1234_5677) % (1 << 64))
            if reg == gic_state.MPIDR_EL1:
                value = 0x8000_0000 | index
            regs[reg] = (value % (1 << 8 * size)).to_bytes(size, "little")
        self.regs[fd] = regs
        self.mp_state[fd] = k.MP_STATE.pack(0 if index == 0 else 5)
        self.events[fd] = bytes((n * 7 + salt) & 0xFF for n in range(k.VCPU_EVENTS_SIZE))

    def add_vgic(self, fd: int, vcpus: list[int], *, salt: int) -> None:
        """A vGIC of these vCPUs, five priority bits (ICC_AP<g>R0 only), some state set."""
        words = {}
        for n, offset in enumerate(gic_state.DIST_OFFSETS):
            words[(k.VGIC_GRP_DIST_REGS, offset)] = (n * 0x0101 + salt) & 0xFFFF_FFFF
        for mpidr in self._affinities(vcpus):
            for n, offset in enumerate(gic_state.REDIST_OFFSETS):
                value = (n + salt + (mpidr >> 32)) & 0xFFFF_FFFF
                words[(k.VGIC_GRP_REDIST_REGS, mpidr | offset)] = value
            for n, encoding in enumerate(gic_state.CPU_SYSREGS):
                value = 4 << 8 if encoding == gic_state.ICC_CTLR_EL1 else n + salt
                words[(k.VGIC_GRP_CPU_SYSREGS, mpidr | encoding)] = value
        self.vgic[fd] = words
        self.vgic_vcpus[fd] = vcpus

    def remove(self, fds: list[int]) -> None:
        """Forget a closed machine's vCPUs and vGIC."""
        for fd in fds:
            for store in (self.regs, self.mp_state, self.events, self.vgic, self.vgic_vcpus):
                store.pop(fd, None)

    def _affinities(self, vcpus: list[int]) -> set[int]:
        mpidrs = (self.regs[fd][gic_state.MPIDR_EL1] for fd in vcpus)
        return {gic_state.affinity(int.from_bytes(mpidr, "little")) for mpidr in mpidrs}

    # ---- the kvm_api calls, as monkeypatched in ----

    def reg_list(self, fd: int) -> list[int]:
        return list(self.regs[fd])

    def get_reg(self, fd: int, reg: int) -> bytes:
        if reg not in self.regs[fd]:
            raise NativeOSError(errno.ENOENT, f"KVM_GET_ONE_REG {reg:#x}")
        return self.regs[fd][reg]

    def set_reg(self, fd: int, reg: int, value: bytes) -> None:
        self.writes.append(f"vCPU fd {fd} register {reg:#x}")
        if reg not in self.regs[fd] or len(value) != k.reg_size(reg):
            raise NativeOSError(errno.ENOENT, f"KVM_SET_ONE_REG {reg:#x}")
        self.regs[fd][reg] = bytes(value)

    def get_one_reg(self, fd: int, reg: int) -> int:
        return int.from_bytes(self.get_reg(fd, reg), "little")

    def ioctl(self, fd: int, request: int, arg: bytearray | int, what: str) -> int:
        assert isinstance(arg, bytearray), what
        if request in (k.KVM_SET_MP_STATE, k.KVM_SET_VCPU_EVENTS):
            self.writes.append(what)
            store = self.mp_state if request == k.KVM_SET_MP_STATE else self.events
            store[fd] = bytes(arg)
        elif request in (k.KVM_GET_MP_STATE, k.KVM_GET_VCPU_EVENTS):
            store = self.mp_state if request == k.KVM_GET_MP_STATE else self.events
            arg[:] = store[fd]
        else:
            raise AssertionError(f"an ioctl the fake does not know: {what}")
        return 0

    def get_device_attr(self, fd: int, group: int, attr: int, size: int = 8) -> int:
        if not self._exists(fd, group, attr):
            raise NativeOSError(errno.EINVAL, f"KVM_GET_DEVICE_ATTR {group} {attr:#x}")
        return self.vgic[fd][(group, attr)]

    def set_device_attr(self, fd: int, group: int, attr: int, value: int, size: int = 8) -> None:
        self.writes.append(f"vGIC group {group} attr {attr:#x}")
        if not self._exists(fd, group, attr):
            raise NativeOSError(errno.EINVAL, f"KVM_SET_DEVICE_ATTR {group} {attr:#x}")
        self.vgic[fd][(group, attr)] = value

    def _exists(self, fd: int, group: int, attr: int) -> bool:
        """What KVM answers: a redistributor or CPU interface only of a vCPU's affinity,
        an active priority register only within ICC_CTLR_EL1's priority bits."""
        words = self.vgic[fd]
        if (group, attr) not in words:
            return False
        if group == k.VGIC_GRP_DIST_REGS:
            return True
        mpidr = attr & ~0xFFFF_FFFF
        if mpidr not in self._affinities(self.vgic_vcpus[fd]):
            return False
        encoding = attr & 0xFFFF
        if group == k.VGIC_GRP_CPU_SYSREGS and encoding in ICC_APR:
            ctlr = words[(k.VGIC_GRP_CPU_SYSREGS, mpidr | gic_state.ICC_CTLR_EL1)]
            return ICC_APR[encoding] <= gic_state.max_apr_index((ctlr >> 8 & 7) + 1)
        return True


@pytest.fixture
def kvm(monkeypatch: pytest.MonkeyPatch) -> FakeKvm:
    fake = FakeKvm()
    for name in (
        "reg_list", "get_reg", "set_reg", "get_one_reg", "ioctl", "get_device_attr",
        "set_device_attr",
    ):  # fmt: skip
        monkeypatch.setattr(k, name, getattr(fake, name))
    return fake


class FakeVcpu(Vcpu):
    """A vCPU with an fd only FakeKvm knows (no KVM_CREATE_VCPU, no kvm_run)."""

    def __init__(self, fd: int, index: int) -> None:
        self.fd = fd
        self.index = index
        self.thread_id = None


class FakeGic(Gic):
    """A vGIC with an fd only FakeKvm knows."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.vm_fd = -1
        self.line_ioctls = {}


@dataclass
class FakeMachine:
    """What machine_state reads of a Machine: a real UART and virtio devices, fake KVM parts."""

    config: MachineConfig
    vcpus: tuple[Vcpu, ...]
    gic: Gic
    uart: pl011.Pl011
    transports: list[mmio.MmioTransport]
    has_vcpu_events: bool
    disks: list[blk.VirtioBlock]
    kvm: FakeKvm

    def close(self) -> None:
        for device in self.disks:
            device.close()
        self.kvm.remove([*(v.fd for v in self.vcpus), self.gic.fd])


_machines = 0


def build(kvm: FakeKvm, mem: gm.GuestMemory, image: Path, *, events: bool = True) -> FakeMachine:
    """A machine at reset, as a VMM builds one without a kernel (each with fds of its own)."""
    global _machines
    _machines += 1
    salt = _machines
    fd = 1000 * salt
    vcpus = tuple(FakeVcpu(fd + n, n) for n in range(CPUS))
    for vcpu in vcpus:
        kvm.add_vcpu(vcpu.fd, vcpu.index, salt=salt)
    kvm.add_vgic(fd + 999, [v.fd for v in vcpus], salt=salt)
    disk = blk.VirtioBlock(mem, str(image), locked=False)  # a source and a target share it
    transports = [
        mmio.MmioTransport(mem, disk, Line()),
        mmio.MmioTransport(mem, hvc.VirtioConsole(mem, lambda _data: None), Line()),
    ]
    config = MachineConfig(
        kernel=None, memory=RAM, cpus=CPUS, tags=gm.TagMode.HARDWARE,
        disks=(Disk(str(image)),), virtio_console=True,
    )  # fmt: skip
    uart = pl011.Pl011(lambda _data: None, Levels())
    return FakeMachine(config, vcpus, FakeGic(fd + 999), uart, transports, events, [disk], kvm)


def running(kvm: FakeKvm, mem: gm.GuestMemory, image: Path) -> FakeMachine:
    """A machine whose guest used everything: the UART, the disk and the console."""
    machine = build(kvm, mem, image)
    machine.uart.write(pl011.IMSC, 4, pl011.INT_RX)
    machine.uart.write(pl011.LCR_H, 4, 0x70)
    machine.uart.receive(b"typed at the serial console, more than its FIFO holds")
    disk = machine.transports[0].device
    transport, drivers, _ = set_up_queues(mem, disk)
    request(drivers[0], blk.T_IN, 2, 512, writable=True)
    kick(transport)
    mem.write(DATA, b"\x5a" * 512, access=gm.Access.DEBUG)
    request(drivers[0], blk.T_OUT, 7, 512, writable=False)
    kick(transport)
    console = machine.transports[1].device
    assert isinstance(console, hvc.VirtioConsole)
    hvc_transport, _, _ = set_up_queues(mem, console, rings=BASE + 0x8000)
    console.receive(b"typed at hvc0 before the guest posted a buffer")
    machine.transports = [transport, hvc_transport]
    for vcpu in machine.vcpus:  # the guest changed its registers (MPIDR and ID ones stay)
        for reg in REGISTERS[:40]:
            kvm.regs[vcpu.fd][reg] = bytes(b ^ 0xA5 for b in kvm.regs[vcpu.fd][reg])
    return machine


def as_machine(machine: FakeMachine) -> Machine:
    return cast(Machine, machine)


def save(machine: FakeMachine) -> bytes:
    return machine_state.save(as_machine(machine))


def load(machine: FakeMachine, data: bytes) -> None:
    machine_state.load(as_machine(machine), data)


@dataclass(frozen=True)
class Observed:
    """Everything of a target a load may change: fake KVM state and device states."""

    regs: dict[int, dict[int, bytes]]
    mp_state: dict[int, bytes]
    events: dict[int, bytes]
    vgic: dict[tuple[int, int], int]
    devices: tuple[bytes, ...]


def observe(kvm: FakeKvm, machine: FakeMachine) -> Observed:
    fds = [v.fd for v in machine.vcpus]
    return Observed(
        {fd: dict(kvm.regs[fd]) for fd in fds},
        {fd: kvm.mp_state[fd] for fd in fds},
        {fd: kvm.events[fd] for fd in fds},
        dict(kvm.vgic[machine.gic.fd]),
        (machine.uart.save_state(), *(t.save_state() for t in machine.transports)),
    )


@pytest.fixture
def mem() -> Iterator[gm.GuestMemory]:
    with gm.GuestMemory.anonymous(RAM, gpa=BASE, tags=gm.TagMode.SOFTWARE) as memory:
        memory.set_tags(BASE, RAM, 0)
        memory.set_tags(DATA, 0x10000, 9)
        yield memory


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SECTORS * blk.SECTOR // 256))
    return path


@pytest.fixture
def saved(kvm: FakeKvm, mem: gm.GuestMemory, image: Path) -> Iterator[bytes]:
    source = running(kvm, mem, image)
    yield save(source)
    source.close()


@pytest.fixture
def target(kvm: FakeKvm, mem: gm.GuestMemory, image: Path) -> Iterator[FakeMachine]:
    machine = build(kvm, mem, image)
    yield machine
    machine.close()


def reframed(state: bytes) -> bytes:
    """``state`` with its CRC-32 made right again, so the sections' decoders see a change."""
    body = state[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def section_start(state: bytes, name: str) -> int:
    """Where section ``name``'s payload starts in ``state``."""
    return state_codec.decode(state)[name].offset


def refused(kvm: FakeKvm, machine: FakeMachine, data: bytes, match: str = "") -> StateError:
    """Load ``data``: it must be refused at an offset inside it, with nothing changed."""
    before = observe(kvm, machine)
    writes = len(kvm.writes)
    with pytest.raises(StateError, match=match) as caught:
        load(machine, data)
    assert 0 <= caught.value.offset <= len(data), caught.value
    assert kvm.writes[writes:] == [], caught.value
    assert observe(kvm, machine) == before, caught.value
    return caught.value


# ---- a load that works ---------------------------------------------------------------------


def test_a_loaded_machine_holds_what_was_saved(
    kvm: FakeKvm, saved: bytes, target: FakeMachine
) -> None:
    fresh = observe(kvm, target)
    load(target, saved)
    assert save(target) == saved
    loaded = observe(kvm, target)
    assert loaded.regs != fresh.regs and loaded.vgic != fresh.vgic
    assert loaded.devices != fresh.devices


def test_a_hardware_source_loads_into_a_kvm_target(
    kvm: FakeKvm, mem: gm.GuestMemory, image: Path, saved: bytes
) -> None:
    target = build(kvm, mem, image)
    target.config = MachineConfig(kernel=None, memory=RAM, cpus=CPUS, tags=gm.TagMode.KVM,
                                  disks=target.config.disks, virtio_console=True)  # fmt: skip
    load(target, saved)
    target.close()


# ---- every section is checked before any is written ---------------------------------------


def test_a_bad_device_section_is_found_before_the_vcpus_vgic_and_uart_are_written(
    kvm: FakeKvm, saved: bytes, target: FakeMachine
) -> None:
    start = section_start(saved, "virtio1")  # the console's transport, the last section
    bad = bytearray(saved)
    bad[start] = 9  # its version
    error = refused(kvm, target, reframed(bytes(bad)), "transport state version 9")
    assert error.offset == start + 1


def test_a_bad_device_blob_inside_a_transport_is_refused_at_its_offset_in_the_state(
    kvm: FakeKvm, saved: bytes, target: FakeMachine
) -> None:
    start = section_start(saved, "virtio1")
    blob = saved.index(struct.pack("<IB", 1 + 4 + 46, hvc.STATE_VERSION), start) + 4
    bad = bytearray(saved)
    bad[blob] = 2  # virtio-console's version, inside the transport's section
    error = refused(kvm, target, reframed(bytes(bad)), "virtio-console state version 2")
    assert error.offset == blob + 1


@pytest.mark.parametrize("mode", [0, 1, 4, 255], ids=["none-0", "software-1", "4", "255"])
def test_the_tag_mode_byte_must_be_a_vmm_sources(
    kvm: FakeKvm, saved: bytes, target: FakeMachine, mode: int
) -> None:
    at = section_start(saved, "machine") + 1 + 8 + 8 + 4
    assert saved[at] == 2  # HARDWARE
    bad = saved[:at] + bytes([mode]) + saved[at + 1 :]
    error = refused(kvm, target, reframed(bad), f"the tag mode is {mode}, not one")
    assert error.offset == at + 1 and "HARDWARE (2), KVM (3)" in error.reason


def test_a_kvm_source_is_taken_by_a_hardware_target(
    kvm: FakeKvm, saved: bytes, target: FakeMachine
) -> None:
    at = section_start(saved, "machine") + 1 + 8 + 8 + 4
    load(target, reframed(saved[:at] + bytes([3]) + saved[at + 1 :]))


@pytest.mark.parametrize(
    ("reg", "name"),
    [(ID_AA64PFR2_EL1, "ID_AA64PFR2_EL1"), (ID_AA64PFR1_EL1, "ID_AA64PFR1_EL1"),
     (UNNAMED_ID_REGISTER, "S3_0_C0_C4_3")],
    ids=["PFR2", "PFR1", "unnamed"],
)  # fmt: skip
def test_a_target_showing_other_cpu_features_is_refused_naming_the_id_register(
    kvm: FakeKvm, saved: bytes, target: FakeMachine, reg: int, name: str
) -> None:
    vcpu = target.vcpus[1]
    value = int.from_bytes(kvm.regs[vcpu.fd][reg], "little")
    kvm.regs[vcpu.fd][reg] = (value ^ 0x10).to_bytes(8, "little")  # a feature gone or new
    why = f"vCPU 1: {name} is {value:#x} in the saved state, {value ^ 0x10:#x} here: this host's"
    error = refused(kvm, target, saved, why)
    record = saved.index(struct.pack("<QI", reg, 8), section_start(saved, "cpu1"))
    assert error.offset == record


def test_a_target_with_other_registers_is_refused(
    kvm: FakeKvm, saved: bytes, target: FakeMachine
) -> None:
    extra = k.sys_reg(3, 0, 13, 0, 7)
    kvm.regs[target.vcpus[0].fd][extra] = bytes(8)
    refused(kvm, target, saved, "vCPU 0: the saved registers are not this KVM's")


def test_pending_events_saved_by_a_kvm_without_them_are_refused(
    kvm: FakeKvm, mem: gm.GuestMemory, image: Path, saved: bytes
) -> None:
    target = build(kvm, mem, image, events=False)
    error = refused(kvm, target, saved, "vCPU events are 64 bytes, 0 here")
    assert error.offset == section_start(saved, "cpu0") + 1 + 4 + 4 + 64
    target.close()


def test_a_vgic_for_vcpus_of_other_affinities_is_refused_before_any_write(
    kvm: FakeKvm, saved: bytes, target: FakeMachine
) -> None:
    at = section_start(saved, "gic") + 1 + 4 + 4 + 8 * len(gic_state.DIST_OFFSETS) + 4
    bad = saved[:at] + struct.pack("<Q", 5 << 32) + saved[at + 8 :]
    error = refused(kvm, target, reframed(bad), "vCPU 0's affinity is 0x500000000")
    assert error.offset == at + 8


def test_an_active_priority_register_beyond_the_priority_bits_is_refused(
    kvm: FakeKvm, saved: bytes, target: FakeMachine
) -> None:
    cpu0 = section_start(saved, "gic") + 1 + 4 + 4 + 8 * len(gic_state.DIST_OFFSETS) + 4 + 8
    ap0r1 = saved.index(struct.pack("<HB", gic_state.CPU_SYSREGS[6], 0), cpu0)
    bad = saved[: ap0r1 + 2] + b"\x01" + saved[ap0r1 + 3 :]
    error = refused(kvm, target, reframed(bad), "ICC_AP0R1_EL1 is saved as present")
    assert error.offset == ap0r1 + 3


def test_a_section_not_this_machines_is_refused(
    kvm: FakeKvm, saved: bytes, target: FakeMachine
) -> None:
    sections = state_codec.decode(saved)
    extra = [(name, reader.whole()) for name, reader in sections.items()] + [("cpu7", b"")]
    refused(kvm, target, state_codec.encode(extra), "section 'cpu7' is not this machine's")


# ---- each KVM part alone has the devices' shape ------------------------------------------


def test_the_sections_come_from_the_machines_parts_in_the_states_order(saved: bytes) -> None:
    assert list(state_codec.decode(saved)) == [
        "machine", "cpu0", "cpu1", "gic", "uart", "virtio0", "virtio1",
    ]  # fmt: skip


def test_a_vcpu_part_loads_alone_and_refuses_bad_bytes_unwritten(
    kvm: FakeKvm, mem: gm.GuestMemory, image: Path, target: FakeMachine
) -> None:
    source = running(kvm, mem, image)
    data = vcpu_state.VcpuPart(source.vcpus[1], events=True).save_state()
    part = vcpu_state.VcpuPart(target.vcpus[1], events=True)
    writes = len(kvm.writes)
    with pytest.raises(StateError, match="vCPU state version 7"):
        part.load_state(b"\x07" + data[1:])
    assert kvm.writes[writes:] == []
    part.load_state(data)
    assert part.save_state() == data
    source.close()


def test_a_vgic_part_loads_alone_for_the_vcpus_as_they_are(
    kvm: FakeKvm, mem: gm.GuestMemory, image: Path, target: FakeMachine
) -> None:
    source = running(kvm, mem, image)
    data = gic_state.GicPart(source.gic, source.vcpus).save_state()
    part = gic_state.GicPart(target.gic, target.vcpus)
    assert part.save_state() != data
    part.load_state(data)
    assert part.save_state() == data
    source.close()


# ---- fuzz: every prefix, every bit flip --------------------------------------------------


TAG_MODE = 1 + 8 + 8 + 4  # the tag mode byte in the machine section


def load_or_refuse(kvm: FakeKvm, target: FakeMachine, fresh: Observed, data: bytes) -> bool:
    """Load ``data`` into ``target`` (as ``fresh`` observed it): refused with nothing
    changed, or taken whole (it saves back the same); True if taken."""
    writes = len(kvm.writes)
    try:
        load(target, data)
    except StateError as error:
        assert 0 <= error.offset <= len(data), error
        assert kvm.writes[writes:] == [] and observe(kvm, target) == fresh, error
        return False
    at = section_start(data, "machine") + TAG_MODE
    assert data[at] in (2, 3)  # HARDWARE or KVM; the target saves its own, HARDWARE
    assert save(target) == reframed(data[:at] + b"\x02" + data[at + 1 :])
    return True


@pytest.fixture
def fuzzing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serving the queues after a load is the guest's business, not the load's: a flipped
    ring address would have the device serve garbage the fuzz cannot compare."""
    monkeypatch.setattr(mmio.MmioTransport, "serve_queues", lambda self: None)


def flipped(state: bytes, bits: Iterable[int]) -> Iterator[bytes]:
    """``state`` with each of ``bits`` flipped in turn."""
    data = bytearray(state)
    for bit in bits:
        data[bit // 8] ^= 1 << bit % 8
        yield bytes(data)
        data[bit // 8] ^= 1 << bit % 8


@pytest.mark.usefixtures("fuzzing")
def test_every_prefix_and_every_bit_flip_is_refused_with_the_target_unchanged(
    kvm: FakeKvm, saved: bytes, target: FakeMachine
) -> None:
    started = time.perf_counter()
    fresh = observe(kvm, target)
    for cut in range(len(saved)):
        assert not load_or_refuse(kvm, target, fresh, saved[:cut])
    for cut in range(4, len(saved)):  # the framing sees these, not the checksum
        assert not load_or_refuse(kvm, target, fresh, reframed(saved[:cut]))
    for data in flipped(saved, range(8 * len(saved))):  # the CRC-32 sees every one
        assert not load_or_refuse(kvm, target, fresh, data)
    FIGURES["machine state: prefixes and flips of a state (bytes)"] = len(saved)
    FIGURES["machine state: prefixes and flips (s)"] = round(time.perf_counter() - started, 2)


# Under emulation (qemu-aarch64, the kernel lanes) the bit-flip sweep takes every 15th bit
# (odd, so the sample walks through every bit position of a byte).
EMULATED_STRIDE = 15


def decoders_bits(state: bytes) -> list[int]:
    """The bits to flip past the checksum: every bit of the framing and of the machine, UART
    and virtio sections, and one bit of every byte of the vCPUs' and vGIC's (mostly
    register values, each taken as it is: every bit of them would take minutes)."""
    sections = state_codec.decode(state)
    dense = set(range(len(state) - 4))
    bits = []
    for name, reader in sections.items():
        if name.startswith("cpu") or name == "gic":
            sparse = range(reader.offset, reader.offset + reader.left)
            dense -= set(sparse)
            bits += [8 * byte + byte % 8 for byte in sparse]
    bits += [8 * byte + bit for byte in sorted(dense) for bit in range(8)]
    return sorted(bits)


class Fuzz:
    """One target after another: a new one after each load it took."""

    def __init__(self, kvm: FakeKvm, mem: gm.GuestMemory, image: Path) -> None:
        self.kvm, self.mem, self.image = kvm, mem, image
        self.target = build(kvm, mem, image)
        self.fresh = observe(kvm, self.target)
        self.taken = 0

    def feed(self, data: bytes) -> None:
        if load_or_refuse(self.kvm, self.target, self.fresh, data):
            self.taken += 1
            self.target.close()
            self.target = build(self.kvm, self.mem, self.image)
            self.fresh = observe(self.kvm, self.target)

    def close(self) -> None:
        self.target.close()


@pytest.mark.usefixtures("fuzzing")
def test_bit_flips_past_the_checksum_are_refused_unchanged_or_taken_whole(
    kvm: FakeKvm, mem: gm.GuestMemory, image: Path, saved: bytes
) -> None:
    """The CRC-32 is recomputed after each flip, so that the sections' decoders see it."""
    started = time.perf_counter()
    fuzz = Fuzz(kvm, mem, image)
    bits = decoders_bits(saved)
    if EMULATED:  # the same pure-Python decoders on every lane: the host lane flips every bit
        bits = bits[::EMULATED_STRIDE]  # under emulation ~40x slower: every bit took 11 minutes
    for data in flipped(saved, bits):
        fuzz.feed(reframed(data))
    fuzz.close()
    assert 0 < fuzz.taken < len(bits)
    FIGURES["machine state: flips past the checksum"] = f"{fuzz.taken} of {len(bits)} taken"
    FIGURES["machine state: flips past the checksum (s)"] = round(time.perf_counter() - started, 2)


Mutation = tuple[list[tuple[int, int]], int]
mutations = st.tuples(
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), min_size=1, max_size=6),
    st.integers(0, 8),
)


@pytest.mark.usefixtures("fuzzing")
@given(mutation=mutations)
def test_bytes_changed_past_the_checksum_are_refused_unchanged_or_taken_whole(
    kvm: FakeKvm, mem: gm.GuestMemory, image: Path, saved: bytes, mutation: Mutation
) -> None:
    """Several bytes changed at once (XORed), and maybe a few cut off the end, CRC-32 redone."""
    changes, cut = mutation
    data = bytearray(saved[:-4])
    for at, xor in changes:
        data[at % len(data)] ^= xor
    fuzz = Fuzz(kvm, mem, image)
    fuzz.feed(reframed(bytes(data[: len(data) - cut]) + bytes(4)))
    fuzz.close()
