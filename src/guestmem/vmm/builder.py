"""Building a machine: guest RAM, the KVM VM, its vCPUs, vGIC and devices, and the guest loaded.

:class:`MachineParts` does it in the order KVM needs: the VM with
KVM_CAP_ARM_MTE before any vCPU, guest RAM as a
:class:`~guestmem.GuestMemory` whose regions become memslots, the vCPUs
created and initialised, then the vGIC (after every vCPU), then the
devices: the PL011 and, for each disk and the virtio-console, a device of
:mod:`guestmem.devices` behind a virtio-mmio transport with its own window
on the :class:`~guestmem.vmm.mmio_bus.MmioBus` and its own GIC line. Last
the kernel, initrd and device tree are loaded and vCPU 0 points at the
kernel. Running it is :mod:`runner`'s.

Guest RAM in the two tag modes:
``HARDWARE``: the VMM maps RAM with PROT_MTE, so its own loads and stores
are checked against the guest's tags: every access the VMM makes goes
through guestmem (the loader and the devices with the DMA access class,
the debugger with DEBUG). ``KVM``: the VMM's mapping is untagged; tags are
reached with KVM_ARM_MTE_COPY_TAGS.

Where KVM offers them (and ``MachineConfig.eventfds``), each virtio queue's
QueueNotify is an ioeventfd served by the I/O thread (:mod:`io_loop`), and
each virtio interrupt an irqfd: a request then costs the guest no exit to
the VMM and the VMM no ioctl. Otherwise kicks are MMIO exits served on the
vCPU thread, and interrupts KVM_IRQ_LINE calls.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import guestmem as gm
from guestmem.devices.disk_lock import acquire_all
from guestmem.devices.pl011 import Pl011
from guestmem.devices.virtio_blk import VirtioBlock
from guestmem.devices.virtio_console import VirtioConsole
from guestmem.devices.virtio_device import VirtioDevice
from guestmem.devices.virtio_mmio import QUEUE_NOTIFY, MmioTransport
from guestmem.kvm import KvmVm
from guestmem.vmm import boot, fdt, kvm_binding, layout
from guestmem.vmm import kvm_api as k
from guestmem.vmm.config import MachineConfig, check
from guestmem.vmm.gic import EdgeInterrupt, Gic
from guestmem.vmm.io_loop import IoLoop
from guestmem.vmm.mmio_bus import MmioBus
from guestmem.vmm.vcpu import Vcpu

Console = Callable[[bytes], None]


class MachineParts:
    """A machine built and not running: VM, guest RAM, vCPUs, vGIC, devices on the MMIO bus.

    ``console`` receives what the guest writes on its UART (and hvc0).
    """

    def __init__(
        self,
        config: MachineConfig,
        console: Console,
        *,
        lock_disks: bool,
        on_io_failure: Callable[[BaseException], None],
    ) -> None:
        """Build the VM, its RAM and devices, and load the guest (see the module's docstring).

        Each disk image is locked (DiskLockedError if another VMM has it)
        unless ``lock_disks`` is False: a migration target, which calls
        :meth:`lock_disks` before it runs. A handler of the I/O thread that
        fails is reported to ``on_io_failure``. What was built is released
        again if a step fails.
        """
        check(config)
        kernel = None if config.kernel is None else boot.KernelImage.parse(config.kernel)
        self.config = config
        self._vcpus: list[Vcpu] = []
        self._gic: Gic | None = None
        self.disks: list[VirtioBlock] = []
        self.hvc: VirtioConsole | None = None
        self.transports: list[MmioTransport] = []
        self.interrupts: list[EdgeInterrupt] = []
        self.bus = MmioBus()
        self.io = IoLoop(on_io_failure)
        self.vm = KvmVm.create()
        self.memory: gm.GuestMemory | None = None
        try:
            self.memory = self._make_memory(config)
            self._make_vcpus(config.cpus)
            self._gic = Gic(self.vm.fd, config.cpus)
            self._gic.finish()
            self.eventfds = config.eventfds and all(
                k.check_extension(self.vm.fd, cap) > 0
                for cap in (k.KVM_CAP_IRQFD, k.KVM_CAP_IOEVENTFD)
            )
            gic = self._gic
            self.uart = Pl011(console, lambda level: gic.set_spi(layout.UART_SPI, level))
            self.bus.add(layout.UART, layout.UART_SIZE, self.uart.read, self.uart.write)
            self._add_virtio(config, console, lock_disks)
            self.has_vcpu_events = k.check_extension(self.vm.fd, k.KVM_CAP_VCPU_EVENTS) > 0
            if kernel is not None:
                self._boot(config, kernel)
        except BaseException:
            self.close()
            raise

    def _make_memory(self, config: MachineConfig) -> gm.GuestMemory:
        """Guest RAM: under KVM tags handed the VM; HARDWARE-tagged, each region a memslot."""
        layout_ = [(layout.RAM, config.memory)]
        if config.tags is gm.TagMode.KVM:
            return gm.GuestMemory.from_layout(layout_, tags=gm.TagMode.KVM, kvm=self.vm)
        memory = gm.GuestMemory.from_layout(layout_, tags=gm.TagMode.HARDWARE)
        try:
            for region in memory.regions:
                self.vm.add_region(region)
        except BaseException:
            memory.close()
            raise
        return memory

    def _make_vcpus(self, count: int) -> None:
        """Create and initialise ``count`` vCPUs, one after another; only vCPU 0 powered on."""
        run_size = _vcpu_mmap_size()
        for index in range(count):
            self._vcpus.append(Vcpu(self.vm.fd, index, run_size))
            self._vcpus[-1].init(self.vm.fd, powered_on=index == 0)

    def _add_virtio(self, config: MachineConfig, console: Console, lock_disks: bool) -> None:
        """virtio-blk for each disk, then the virtio-console: each behind its transport."""
        assert self.memory is not None
        devices: list[VirtioDevice] = []
        for disk in config.disks:
            self.disks.append(
                VirtioBlock(self.memory, disk.path, read_only=disk.read_only, locked=lock_disks)
            )
            devices.append(self.disks[-1])
        if config.virtio_console:
            self.hvc = VirtioConsole(self.memory, console)
            devices.append(self.hvc)
        for index, device in enumerate(devices):
            self._attach(index, device)

    def _attach(self, index: int, device: VirtioDevice) -> None:
        """Wire virtio device ``index``: its GIC line, transport, queue kicks and MMIO window."""
        assert self.memory is not None
        line = EdgeInterrupt(self.gic, layout.VIRTIO_SPI + index, irqfd=self.eventfds)
        self.interrupts.append(line)
        transport = MmioTransport(self.memory, device, line.set)
        self.transports.append(transport)
        base = layout.VIRTIO + index * layout.VIRTIO_SIZE
        if self.eventfds:
            for queue in range(device.queue_count):
                kick = self.io.eventfd(functools.partial(transport.notify_queue, queue))
                k.assign_ioeventfd(self.vm.fd, kick, base + QUEUE_NOTIFY, 4, queue)
        self.bus.add(base, layout.VIRTIO_SIZE, transport.read, transport.write)

    def _boot(self, config: MachineConfig, kernel: boot.KernelImage) -> None:
        """Load the kernel, initrd and device tree, and point vCPU 0 at the kernel."""
        assert self.memory is not None
        placed = boot.plan(layout.RAM, config.memory, kernel, _size(config.initrd))
        tree = fdt.BootTree(
            layout.RAM,
            config.memory,
            config.cpus,
            config.command_line,
            placed.initrd,
            virtio_devices=len(self.transports),
        )
        boot.load(self.memory, placed, kernel, config.initrd, fdt.build(tree))
        self._vcpus[0].set(k.REG_PC, placed.entry)
        self._vcpus[0].set(k.x_reg(0), placed.dtb)

    @property
    def gic(self) -> Gic:
        """The vGIC."""
        assert self._gic is not None
        return self._gic

    @property
    def vcpus(self) -> tuple[Vcpu, ...]:
        """The vCPUs, by index."""
        return tuple(self._vcpus)

    def lock_disks(self) -> None:
        """Lock every disk image not locked yet, or none.

        If one is refused (DiskLockedError names it), those this call locked
        are released again; those locked before stay locked.
        """
        acquire_all(disk.image_lock for disk in self.disks)

    def unlock_disks(self) -> None:
        """Release every disk image's lock (a migration source, at the go-ahead)."""
        for disk in self.disks:
            disk.unlock()

    def close(self) -> None:
        """Release the vCPUs, the vGIC, guest RAM and the VM (once no vCPU runs)."""
        for vcpu in self._vcpus:
            vcpu.close()
        self.io.close()
        for line in self.interrupts:
            line.close()
        for disk in self.disks:
            disk.close()
        if self._gic is not None:
            self._gic.close()
        if self.memory is not None:
            self.memory.close()  # under KVM this also closes the VM (it was handed over)
        self.vm.close()


def _size(data: bytes | None) -> int | None:
    return None if data is None else len(data)


def _vcpu_mmap_size() -> int:
    kvm = kvm_binding.open_kvm()
    if kvm < 0:
        raise gm.UnsupportedError("/dev/kvm cannot be opened")
    try:
        return k.ioctl(kvm, k.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
    finally:
        os.close(kvm)
