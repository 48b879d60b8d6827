"""The KVM ioctls the VMM makes beyond the library's own (Documentation/virt/kvm/api.rst).

Structures are packed with :mod:`struct` in the kernel's layout for arm64;
every call goes through :mod:`guestmem.vmm.kvm_binding` (the core's
``gm_kvm_ioctl``, which drops the GIL), so
a vCPU thread sits in KVM_RUN while the others go on. A failed ioctl raises
:class:`~guestmem.errors.NativeOSError` naming the request, errno EINTR
included (a kicked KVM_RUN).
"""

from __future__ import annotations

import errno
import struct

from guestmem.errors import NativeOSError
from guestmem.vmm.kvm_binding import Pointee
from guestmem.vmm.kvm_binding import ioctl as ioctl

_KVMIO = 0xAE
_WRITE, _READ = 1, 2


def _io(nr: int, direction: int = 0, size: int = 0) -> int:
    return (direction << 30) | (size << 16) | (_KVMIO << 8) | nr


VCPU_INIT = struct.Struct("<I7I")
ONE_REG = struct.Struct("<QQ")
CREATE_DEVICE = struct.Struct("<III")
DEVICE_ATTR = struct.Struct("<IIQQ")
IRQ_LEVEL = struct.Struct("<II")
GUEST_DEBUG = struct.Struct("<II64Q")
IRQFD = struct.Struct("<IIII16x")  # fd, gsi, flags, resamplefd
IOEVENTFD = struct.Struct("<QQIiI36x")  # datamatch, addr, len, fd, flags
MP_STATE = struct.Struct("<I")
VCPU_EVENTS_SIZE = 64  # struct kvm_vcpu_events on arm64, saved whole
REG_LIST_HEAD = struct.Struct("<Q")  # n, then n u64 ids
MEMORY_REGION = struct.Struct("<IIQQQ")  # slot, flags, guest_phys_addr, memory_size, userspace
DIRTY_LOG = struct.Struct("<IIQ")  # slot, padding, dirty_bitmap pointer

KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _io(0x42, _WRITE, DIRTY_LOG.size)
KVM_SET_USER_MEMORY_REGION = _io(0x46, _WRITE, MEMORY_REGION.size)
KVM_IRQ_LINE = _io(0x61, _WRITE, IRQ_LEVEL.size)
KVM_IRQFD = _io(0x76, _WRITE, IRQFD.size)
KVM_IOEVENTFD = _io(0x79, _WRITE, IOEVENTFD.size)
KVM_RUN = _io(0x80)
KVM_GET_MP_STATE = _io(0x98, _READ, MP_STATE.size)
KVM_SET_MP_STATE = _io(0x99, _WRITE, MP_STATE.size)
KVM_GET_VCPU_EVENTS = _io(0x9F, _READ, VCPU_EVENTS_SIZE)
KVM_SET_VCPU_EVENTS = _io(0xA0, _WRITE, VCPU_EVENTS_SIZE)
KVM_SET_GUEST_DEBUG = _io(0x9B, _WRITE, GUEST_DEBUG.size)
KVM_GET_ONE_REG = _io(0xAB, _WRITE, ONE_REG.size)
KVM_SET_ONE_REG = _io(0xAC, _WRITE, ONE_REG.size)
KVM_ARM_VCPU_INIT = _io(0xAE, _WRITE, VCPU_INIT.size)
KVM_ARM_PREFERRED_TARGET = _io(0xAF, _READ, VCPU_INIT.size)
KVM_GET_REG_LIST = _io(0xB0, _READ | _WRITE, REG_LIST_HEAD.size)
KVM_CREATE_DEVICE = _io(0xE0, _READ | _WRITE, CREATE_DEVICE.size)
KVM_SET_DEVICE_ATTR = _io(0xE1, _WRITE, DEVICE_ATTR.size)
KVM_GET_DEVICE_ATTR = _io(0xE2, _WRITE, DEVICE_ATTR.size)

# Capabilities.
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_GUEST_DEBUG_HW_BPS = 119
KVM_CAP_GUEST_DEBUG_HW_WPS = 120
KVM_CAP_VCPU_EVENTS = 41

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0

IOEVENTFD_FLAG_DATAMATCH = 1 << 0

# vCPU features (KVM_ARM_VCPU_INIT).
VCPU_POWER_OFF = 0
VCPU_PSCI_0_2 = 2

# Exit reasons and system events (struct kvm_run).
EXIT_DEBUG = 4
EXIT_MMIO = 6
EXIT_INTR = 10
EXIT_SYSTEM_EVENT = 24
SYSTEM_EVENT_SHUTDOWN = 1
SYSTEM_EVENT_RESET = 2
SYSTEM_EVENT_CRASH = 3

# Offsets into struct kvm_run.
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_EXIT_DATA = 32  # the union: mmio, system_event, debug
MMIO_EXIT = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
SYSTEM_EVENT = struct.Struct("<I")  # type
DEBUG_EXIT = struct.Struct("<IIQ")  # hsr, hsr_high, far

# The vGICv3 (KVM_DEV_TYPE_ARM_VGIC_V3) and its attribute groups.
DEV_VGIC_V3 = 7
VGIC_GRP_ADDR = 0
VGIC_GRP_DIST_REGS = 1
VGIC_GRP_NR_IRQS = 3
VGIC_GRP_CTRL = 4
VGIC_GRP_REDIST_REGS = 5
VGIC_GRP_CPU_SYSREGS = 6
VGIC_V3_ADDR_DIST = 2
VGIC_V3_ADDR_REDIST = 3
VGIC_CTRL_INIT = 0
IRQ_TYPE_SPI = 1

# Register ids (KVM_GET_ONE_REG): core registers by their u32 offset in struct kvm_regs.
_REG_ARM64 = 0x6000_0000_0000_0000
_REG_U64 = 0x0030_0000_0000_0000
_REG_CORE = 0x0010 << 16
_REG_SYSREG = 0x0013 << 16


def core_reg(offset_u32: int) -> int:
    """The id of a 64-bit core register, at ``offset_u32`` 32-bit words into struct kvm_regs."""
    return _REG_ARM64 | _REG_U64 | _REG_CORE | offset_u32


def x_reg(n: int) -> int:
    """The id of general-purpose register ``xN`` (0..30)."""
    return core_reg(2 * n)


REG_SP = core_reg(62)
REG_PC = core_reg(64)
REG_PSTATE = core_reg(66)


def sys_reg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """The id of a system register by its encoding."""
    return _REG_ARM64 | _REG_U64 | _REG_SYSREG | op0 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2


SCTLR_EL1 = sys_reg(3, 0, 1, 0, 0)
TTBR0_EL1 = sys_reg(3, 0, 2, 0, 0)
TTBR1_EL1 = sys_reg(3, 0, 2, 0, 1)
TCR_EL1 = sys_reg(3, 0, 2, 0, 2)


def get_one_reg(vcpu_fd: int, reg: int) -> int:
    """Read one 64-bit vCPU register."""
    value = Pointee(8)
    request = bytearray(ONE_REG.pack(reg, value.address))
    ioctl(vcpu_fd, KVM_GET_ONE_REG, request, f"KVM_GET_ONE_REG {reg:#x}")
    return int.from_bytes(value.value(), "little")


def set_one_reg(vcpu_fd: int, reg: int, value: int) -> None:
    """Write one 64-bit vCPU register."""
    holder = Pointee(value.to_bytes(8, "little"))
    request = bytearray(ONE_REG.pack(reg, holder.address))
    ioctl(vcpu_fd, KVM_SET_ONE_REG, request, f"KVM_SET_ONE_REG {reg:#x}")


def get_reg(vcpu_fd: int, reg: int) -> bytes:
    """Read one vCPU register of any size (the size is in its id) as its bytes."""
    holder = Pointee(reg_size(reg))
    request = bytearray(ONE_REG.pack(reg, holder.address))
    ioctl(vcpu_fd, KVM_GET_ONE_REG, request, f"KVM_GET_ONE_REG {reg:#x}")
    return holder.value()


def set_reg(vcpu_fd: int, reg: int, value: bytes) -> None:
    """Write one vCPU register of any size from its bytes."""
    holder = Pointee(bytes(value))
    request = bytearray(ONE_REG.pack(reg, holder.address))
    ioctl(vcpu_fd, KVM_SET_ONE_REG, request, f"KVM_SET_ONE_REG {reg:#x}")


def reg_size(reg: int) -> int:
    """The size in bytes a register id declares (KVM_REG_SIZE)."""
    return 1 << (reg >> 52 & 0xF)


def reg_list(vcpu_fd: int) -> list[int]:
    """Every register id the vCPU has (KVM_GET_REG_LIST): what a save must carry."""
    probe = bytearray(REG_LIST_HEAD.pack(0))
    try:
        ioctl(vcpu_fd, KVM_GET_REG_LIST, probe, "KVM_GET_REG_LIST")
    except NativeOSError as err:
        if err.errno != errno.E2BIG:
            raise
    (count,) = REG_LIST_HEAD.unpack(probe)
    request = bytearray(REG_LIST_HEAD.pack(count) + bytes(8 * count))
    ioctl(vcpu_fd, KVM_GET_REG_LIST, request, "KVM_GET_REG_LIST")
    return list(struct.unpack_from(f"<{count}Q", request, REG_LIST_HEAD.size))


def get_device_attr(device_fd: int, group: int, attr: int, size: int = 8) -> int:
    """A device attribute's value (a u32 or u64) the kernel writes through a pointer."""
    holder = Pointee(8 if size == 8 else 4)
    request = bytearray(DEVICE_ATTR.pack(0, group, attr, holder.address))
    ioctl(device_fd, KVM_GET_DEVICE_ATTR, request, f"KVM_GET_DEVICE_ATTR {group}/{attr:#x}")
    return int.from_bytes(holder.value(), "little")


def set_memory_flags(vm_fd: int, slot: int, gpa: int, size: int, host: int, flags: int) -> None:
    """Re-register memslot ``slot`` as it is, with new ``flags`` (e.g. dirty logging)."""
    request = bytearray(MEMORY_REGION.pack(slot, flags, gpa, size, host))
    ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, request, f"KVM_SET_USER_MEMORY_REGION {slot}")


def get_dirty_log(vm_fd: int, slot: int, bitmap: bytearray) -> None:
    """Fill ``bitmap`` with the pages of ``slot`` written since the last call, and re-arm it."""
    holder = Pointee(bitmap)  # the kernel writes into the caller's bitmap
    request = bytearray(DIRTY_LOG.pack(slot, 0, holder.address))
    ioctl(vm_fd, KVM_GET_DIRTY_LOG, request, f"KVM_GET_DIRTY_LOG slot {slot}")


def set_device_attr(device_fd: int, group: int, attr: int, value: int, size: int = 8) -> None:
    """Set a device attribute whose value (a u32 or u64) the kernel reads through a pointer."""
    holder = Pointee(value.to_bytes(8 if size == 8 else 4, "little"))
    request = bytearray(DEVICE_ATTR.pack(0, group, attr, holder.address))
    ioctl(device_fd, KVM_SET_DEVICE_ATTR, request, f"KVM_SET_DEVICE_ATTR {group}/{attr}")


def assign_irqfd(vm_fd: int, event_fd: int, spi: int) -> None:
    """KVM_IRQFD: a write to ``event_fd`` raises an edge on shared interrupt ``spi``.

    On arm64 the default routing maps GSI N to SPI N (INTID 32 + N); KVM
    pulses the line (up, then down), so the guest must see it edge-triggered.
    """
    request = bytearray(IRQFD.pack(event_fd, spi, 0, 0))
    ioctl(vm_fd, KVM_IRQFD, request, f"KVM_IRQFD SPI {spi}")


def assign_ioeventfd(vm_fd: int, event_fd: int, address: int, size: int, value: int) -> None:
    """KVM_IOEVENTFD: the guest's write of ``value`` at MMIO ``address`` signals ``event_fd``.

    KVM completes the write itself (``size`` bytes, matching ``value``): the
    vCPU does not exit to the VMM.
    """
    request = bytearray(IOEVENTFD.pack(value, address, size, event_fd, IOEVENTFD_FLAG_DATAMATCH))
    ioctl(vm_fd, KVM_IOEVENTFD, request, f"KVM_IOEVENTFD {address:#x}={value}")


def check_extension(fd: int, capability: int) -> int:
    """KVM_CHECK_EXTENSION on the VM (or /dev/kvm): 0 when absent."""
    return ioctl(fd, KVM_CHECK_EXTENSION, capability, f"KVM_CHECK_EXTENSION {capability}")
