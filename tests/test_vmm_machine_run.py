"""A whole :class:`~guestmem.vmm.machine.Machine` built and run on a fake KVM, on the host.

Every KVM ioctl the VMM makes goes through ``kvm_api.ioctl``; :class:`FakeKvm`
answers it there, records what was asked (in order), hands out memfds as
vCPU and vGIC fds (so ``kvm_run`` maps), and plays each vCPU's exits from a
script. The VM (``KvmVm.create``) and guest RAM (SOFTWARE, in place of
HARDWARE) are stand-ins too; the devices, boot loader, gate, run loop and
MMIO bus are the real ones. What this pins: the KVM calls of building and
closing a machine, in their order (the kernel lanes run the same sequence
on real KVM), how MMIO exits reach the devices, and how a run ends.
Host lane.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import guestmem as gm
from guestmem.devices import pl011
from guestmem.errors import NativeOSError
from guestmem.kvm import KvmVm
from guestmem.vmm import boot, kvm_binding, layout
from guestmem.vmm import kvm_api as k
from guestmem.vmm.machine import Disk, EndReason, Machine, MachineConfig

pytest.importorskip("libfdt", reason="the VMM's device tree needs pylibfdt")

RUN_SIZE = 4096
MIB = 1 << 20
UNMAPPED = 0x0  # below every device window and RAM
MAGIC = 0x7472_6976  # virtio-mmio's MagicValue, "virt"


def kernel_image() -> bytes:
    header = struct.pack("<II QQQ QQQ 4s I", 0, 0, 0, 2 * MIB, 0, 0, 0, 0, boot.IMAGE_MAGIC, 0)
    return header + b"kernel"


def mmio(address: int, size: int = 4, write: int | None = None) -> tuple[str, Any]:
    return ("mmio", (address, size, write))


def event(kind: int) -> tuple[str, Any]:
    return ("event", kind)


class FakeVm:
    """What the machine uses of a KvmVm: its fd, memslots and close."""

    def __init__(self, kvm: FakeKvm) -> None:
        self.fd = kvm.name_fd(os.memfd_create("vm"), "vm")
        self._kvm = kvm

    def add_region(self, region: gm.GuestRegion) -> int:
        self._kvm.calls.append(f"vm: memslot {region.gpa:#x}+{region.size:#x}")
        return 0

    def close(self) -> None:
        self._kvm.calls.append("vm: close")
        os.close(self.fd)


class FakeKvm:
    """KVM at ``kvm_api.ioctl``: records each call, creates memfd vCPUs, plays exits."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.runs: dict[str, int] = {}
        self.read_values: list[int] = []
        self.script: dict[str, list[tuple[str, Any]]] = {}
        self._names: dict[int, str] = {}
        self._pages: dict[str, mmap.mmap] = {}
        self._pending_read: dict[str, int] = {}
        self._lock = threading.Lock()

    def name_fd(self, fd: int, name: str) -> int:
        self._names[fd] = name
        return fd

    def ioctl(self, fd: int, request: int, arg: bytearray | int, what: str) -> int:
        name = self._names.get(fd, "?")
        if request == k.KVM_RUN:
            return self._run(name)
        with self._lock:
            self.calls.append(f"{name}: {what}")
        if request == k.KVM_GET_VCPU_MMAP_SIZE:
            return RUN_SIZE
        if request == k.KVM_CHECK_EXTENSION:
            return 1
        if request == k.KVM_CREATE_VCPU:
            assert isinstance(arg, int)
            vcpu = os.memfd_create(f"vcpu{arg}")
            os.ftruncate(vcpu, RUN_SIZE)
            self._pages[f"vcpu{arg}"] = mmap.mmap(vcpu, RUN_SIZE)
            return self.name_fd(vcpu, f"vcpu{arg}")
        if request == k.KVM_CREATE_DEVICE:
            assert isinstance(arg, bytearray)
            kind, _, flags = k.CREATE_DEVICE.unpack(arg)
            gic = self.name_fd(os.memfd_create("vgic"), "vgic")
            arg[:] = k.CREATE_DEVICE.pack(kind, gic, flags)
        return 0

    def _run(self, name: str) -> int:
        """One KVM_RUN: the next scripted exit, else in the guest until kicked."""
        page = self._pages[name]
        with self._lock:
            self.runs[name] = self.runs.get(name, 0) + 1
            if name in self._pending_read:
                size = self._pending_read.pop(name)
                start = k.RUN_EXIT_DATA + 8
                self.read_values.append(int.from_bytes(page[start : start + size], "little"))
        while True:
            if page[k.RUN_IMMEDIATE_EXIT]:
                raise NativeOSError(errno.EINTR, f"KVM_RUN {name}")
            script = self.script.get(name)
            if script:
                kind, detail = script.pop(0)
                self._exit(name, page, kind, detail)
                return 0
            time.sleep(0.001)

    def _exit(self, name: str, page: mmap.mmap, kind: str, detail: Any) -> None:
        if kind == "mmio":
            address, size, value = detail
            data = (value or 0).to_bytes(8, "little")
            k.MMIO_EXIT.pack_into(page, k.RUN_EXIT_DATA, address, data, size, value is not None)
            reason = k.EXIT_MMIO
            if value is None:
                self._pending_read[name] = size
        elif kind == "event":
            k.SYSTEM_EVENT.pack_into(page, k.RUN_EXIT_DATA, detail)
            reason = k.EXIT_SYSTEM_EVENT
        else:
            reason = detail
        page[k.RUN_EXIT_REASON : k.RUN_EXIT_REASON + 4] = reason.to_bytes(4, "little")


@pytest.fixture
def kvm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKvm]:
    fake = FakeKvm()
    make_memory = gm.GuestMemory.from_layout

    def from_layout(
        layout_: list[tuple[int, int]], *, tags: gm.TagMode, kvm: object = None
    ) -> gm.GuestMemory:
        ((gpa, size),) = layout_
        fake.calls.append(f"guest RAM {gpa:#x}+{size:#x} {tags.name}")
        return make_memory([(gpa, size)], tags=gm.TagMode.SOFTWARE)

    def open_kvm() -> int:
        fake.calls.append("open /dev/kvm")
        return fake.name_fd(os.memfd_create("kvm"), "kvm")

    monkeypatch.setattr(k, "ioctl", fake.ioctl)
    monkeypatch.setattr(kvm_binding, "open_kvm", open_kvm)
    monkeypatch.setattr(KvmVm, "create", classmethod(lambda cls: FakeVm(fake)))
    monkeypatch.setattr(gm.GuestMemory, "from_layout", from_layout)
    yield fake


class Console:
    def __init__(self) -> None:
        self.data = b""

    def __call__(self, data: bytes) -> None:
        self.data += data


def config(tmp_path: Path, **changes: Any) -> MachineConfig:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MIB))
    fields: dict[str, Any] = dict(
        kernel=kernel_image(),
        memory=64 * MIB,
        cpus=2,
        disks=(Disk(str(disk)),),
        virtio_console=True,
    )
    fields.update(changes)
    return MachineConfig(**fields)


def vcpu_setup(index: int) -> list[str]:
    return [
        f"vm: KVM_CREATE_VCPU {index}",
        "vm: KVM_ARM_PREFERRED_TARGET",
        f"vcpu{index}: KVM_ARM_VCPU_INIT vCPU {index}",
    ]


def virtio_setup(index: int, queues: int) -> list[str]:
    spi = layout.VIRTIO_SPI + index
    notify = layout.VIRTIO + index * layout.VIRTIO_SIZE + 0x50
    return [f"vm: KVM_IRQFD SPI {spi}"] + [
        f"vm: KVM_IOEVENTFD {notify:#x}={queue}" for queue in range(queues)
    ]


BUILT = [
    "guest RAM 0x40000000+0x4000000 HARDWARE",
    "vm: memslot 0x40000000+0x4000000",
    "open /dev/kvm",
    "kvm: KVM_GET_VCPU_MMAP_SIZE",
    *vcpu_setup(0),
    *vcpu_setup(1),
    "vm: KVM_CREATE_DEVICE(vGICv3)",
    f"vgic: KVM_SET_DEVICE_ATTR {k.VGIC_GRP_ADDR}/{k.VGIC_V3_ADDR_DIST}",
    f"vgic: KVM_SET_DEVICE_ATTR {k.VGIC_GRP_ADDR}/{k.VGIC_V3_ADDR_REDIST}",
    f"vgic: KVM_SET_DEVICE_ATTR {k.VGIC_GRP_NR_IRQS}/0",
    f"vgic: KVM_SET_DEVICE_ATTR {k.VGIC_GRP_CTRL}/{k.VGIC_CTRL_INIT}",
    f"vm: KVM_CHECK_EXTENSION {k.KVM_CAP_IRQFD}",
    f"vm: KVM_CHECK_EXTENSION {k.KVM_CAP_IOEVENTFD}",
    *virtio_setup(0, 1),  # virtio-blk: one queue
    *virtio_setup(1, 2),  # virtio-console: receive and transmit
    f"vm: KVM_CHECK_EXTENSION {k.KVM_CAP_VCPU_EVENTS}",
    f"vcpu0: KVM_SET_ONE_REG {k.REG_PC:#x}",
    f"vcpu0: KVM_SET_ONE_REG {k.x_reg(0):#x}",
]


def run_in_thread(machine: Machine) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(machine.run()), daemon=True)
    runner.start()
    return runner, outcome


def test_building_and_closing_make_the_kvm_calls_in_order(kvm: FakeKvm, tmp_path: Path) -> None:
    with Machine(config(tmp_path), Console()) as machine:
        assert kvm.calls == BUILT
        assert machine.eventfds and machine.has_vcpu_events
        assert [line.spi for line in machine.interrupts] == [16, 17]
        assert len(machine.vcpus) == 2 and len(machine.transports) == 2
        del kvm.calls[:]
    assert kvm.calls == ["vm: close"]


def test_a_machine_built_empty_loads_no_guest(kvm: FakeKvm, tmp_path: Path) -> None:
    with Machine(config(tmp_path, kernel=None), Console(), lock_disks=False) as machine:
        assert kvm.calls == BUILT[:-2]
        assert not machine.disks[0].locked


def test_a_refused_config_makes_no_kvm_call(kvm: FakeKvm, tmp_path: Path) -> None:
    with pytest.raises(gm.UsageError, match="--cpus must be 1 to"):
        Machine(config(tmp_path, cpus=layout.MAX_CPUS + 1), Console())
    with pytest.raises(gm.UsageError, match="positive multiple of the host page"):
        Machine(config(tmp_path, memory=MIB + 1), Console())
    assert kvm.calls == []


def test_mmio_exits_reach_the_devices_and_a_power_off_ends_the_run(
    kvm: FakeKvm, tmp_path: Path
) -> None:
    console = Console()
    kvm.script["vcpu0"] = [
        mmio(layout.UART + pl011.DR, write=ord("h")),
        mmio(UNMAPPED),  # nothing there: reads 0
        mmio(UNMAPPED, write=1),  # and a write vanishes
        mmio(layout.VIRTIO),  # the first transport's MagicValue
        mmio(layout.VIRTIO + layout.VIRTIO_SIZE),  # the second's
        event(k.SYSTEM_EVENT_SHUTDOWN),
    ]
    with Machine(config(tmp_path), console) as machine:
        built = len(kvm.calls)
        outcome = machine.run()
        assert kvm.calls[built:] == []  # the run loop itself makes no other ioctl
    assert outcome.reason == "power-off" and outcome.detail == ""
    assert outcome.mmio_exits == 5 and outcome.seconds > 0
    assert console.data == b"h"
    assert kvm.read_values == [0, MAGIC, MAGIC]


@pytest.mark.parametrize(
    ("exit_", "says"),
    [
        (event(k.SYSTEM_EVENT_RESET), "reset"),
        (event(k.SYSTEM_EVENT_CRASH), "crash"),
        (event(7), "system event 7"),
        (("other", 99), "error vCPU 0: unhandled exit OtherExit(reason=99)"),
    ],
)
def test_how_a_run_ends_is_its_outcome(
    kvm: FakeKvm, tmp_path: Path, exit_: tuple[str, Any], says: str
) -> None:
    kvm.script["vcpu0"] = [exit_]
    with Machine(config(tmp_path, disks=(), virtio_console=False), Console()) as machine:
        outcome = machine.run()
    assert f"{outcome.reason} {outcome.detail}".strip() == says


def test_paused_stops_every_vcpu_and_a_stop_ends_the_run(kvm: FakeKvm, tmp_path: Path) -> None:
    console = Console()
    kvm.script["vcpu0"] = [mmio(layout.UART + pl011.DR, write=ord("h"))]
    with Machine(config(tmp_path), console) as machine:
        runner, outcome = run_in_thread(machine)
        deadline = time.monotonic() + 30
        while console.data != b"h" and time.monotonic() < deadline:
            time.sleep(0.01)
        with machine.paused():
            runs = dict(kvm.runs)
            time.sleep(0.05)
            assert kvm.runs == runs, "a vCPU entered the guest while paused"
        machine.console_input(b"x")
        machine.stop("quit")
        runner.join(30)
        assert not runner.is_alive()
        machine.console_input(b"dropped once the run has ended")
        with pytest.raises(gm.UsageError, match="nothing to pause"), machine.paused():
            pass
    assert [(o.reason, o.detail, o.mmio_exits) for o in outcome] == [("quit", "", 1)]
    assert machine.hvc is not None


def test_the_first_ending_wins(kvm: FakeKvm, tmp_path: Path) -> None:
    with Machine(config(tmp_path, disks=(), virtio_console=False), Console()) as machine:
        machine.stop("migrated")
        machine.stop("error", "too late")
        outcome = machine.run()
    assert (outcome.reason, outcome.detail) == ("migrated", "")


def test_a_reason_no_run_ends_for_is_refused(kvm: FakeKvm, tmp_path: Path) -> None:
    with Machine(config(tmp_path, disks=(), virtio_console=False), Console()) as machine:
        with pytest.raises(gm.UsageError, match="not a reason a run ends for: 'bored'"):
            machine.stop("bored")
        machine.stop(EndReason.QUIT, "enough")
        outcome = machine.run()
    assert (outcome.reason, outcome.detail) == (EndReason.QUIT, "enough")
