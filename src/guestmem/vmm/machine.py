"""The machine: guest RAM on guestmem, a KVM VM with MTE, its vCPUs, vGIC and UART.

Building one (:class:`Machine`) creates the VM with KVM_CAP_ARM_MTE before
any vCPU, makes guest RAM a :class:`~guestmem.GuestMemory` whose regions
become memslots, creates and initialises the vCPUs, then the vGIC, and loads
the kernel, initrd and device tree. :meth:`Machine.run` gives each vCPU a
thread and returns when the guest powers off or resets, or the VMM fails.

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

import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
from guestmem.vmm.gate import Gate
from guestmem.vmm.gic import EdgeInterrupt, Gic
from guestmem.vmm.io_loop import IoLoop
from guestmem.vmm.vcpu import (
    DebugExit,
    Interrupted,
    MmioExit,
    SystemEvent,
    Vcpu,
    install_kick_handler,
)

TAG_MODES = (gm.TagMode.HARDWARE, gm.TagMode.KVM)
PAUSE_TIMEOUT = 30.0  # a kicked vCPU parks in microseconds; this is for a wedged host


@dataclass(frozen=True)
class Disk:
    """A disk image file, served as virtio-blk (read-only with ``read_only``)."""

    path: str
    read_only: bool = False


@dataclass(frozen=True)
class MachineConfig:
    """What to run: kernel and initrd (bytes), command line, RAM, vCPUs, tag mode, disks.

    ``kernel`` None builds the machine empty, for a saved state to be loaded
    into (:mod:`machine_state`): a snapshot's, or a live migration's.
    """

    kernel: bytes | None
    command_line: str = "console=ttyAMA0"
    initrd: bytes | None = None
    memory: int = 256 << 20
    cpus: int = 1
    tags: gm.TagMode = gm.TagMode.HARDWARE
    disks: tuple[Disk, ...] = ()
    virtio_console: bool = False  # a virtio-console (hvc0) beside the UART
    eventfds: bool = True  # ioeventfd kicks and irqfd interrupts, where KVM offers them


@dataclass(frozen=True)
class Outcome:
    """How a run ended: ``power-off``, ``reset``, ``crash``, ``quit`` or ``error`` (``detail``)."""

    reason: str
    detail: str = ""
    mmio_exits: int = 0
    seconds: float = 0.0


@dataclass
class _Device:
    base: int
    size: int
    read: Callable[[int, int], int]
    write: Callable[[int, int, int], None]


@dataclass
class _Counters:
    mmio_exits: int = 0


_EVENTS = {
    k.SYSTEM_EVENT_SHUTDOWN: "power-off",
    k.SYSTEM_EVENT_RESET: "reset",
    k.SYSTEM_EVENT_CRASH: "crash",
}


class Machine:
    """A guest ready to run; ``console`` receives what it writes on its UART (and hvc0)."""

    def __init__(
        self, config: MachineConfig, console: Callable[[bytes], None], *, lock_disks: bool = True
    ) -> None:
        """Build the VM, its RAM and devices, and load the guest (see the module's docstring).

        Each disk image is locked (DiskLockedError if another VMM has it)
        unless ``lock_disks`` is False: a migration target, which calls
        :meth:`lock_disks` before it runs.
        """
        if config.tags not in TAG_MODES:
            raise gm.UsageError(f"the VMM's guest RAM is HARDWARE or KVM tagged, not {config.tags}")
        if not 1 <= config.cpus <= layout.MAX_CPUS:
            raise gm.UsageError(f"--cpus must be 1 to {layout.MAX_CPUS}, not {config.cpus}")
        if config.memory <= 0 or config.memory % gm.HOST_PAGE:
            raise gm.UsageError(
                f"guest memory must be a positive multiple of the host page "
                f"({gm.HOST_PAGE} bytes), not {config.memory}"
            )
        kernel = None if config.kernel is None else boot.KernelImage.parse(config.kernel)
        self.config = config
        if len(config.disks) + config.virtio_console > layout.MAX_VIRTIO:
            raise gm.UsageError(f"at most {layout.MAX_VIRTIO} virtio devices")
        self._vcpus: list[Vcpu] = []
        self._gic: Gic | None = None
        self.disks: list[VirtioBlock] = []
        self.hvc: VirtioConsole | None = None
        self.transports: list[MmioTransport] = []
        self.interrupts: list[EdgeInterrupt] = []
        self.io = IoLoop(lambda err: self._finish(Outcome("error", f"I/O thread: {err}")))
        self.vm = KvmVm.create()
        self.memory: gm.GuestMemory | None = None
        try:
            self.memory = self._make_memory(config)
            run_size = _vcpu_mmap_size()
            for index in range(config.cpus):
                self._vcpus.append(Vcpu(self.vm.fd, index, run_size))
                self._vcpus[-1].init(self.vm.fd, powered_on=index == 0)
            self._gic = Gic(self.vm.fd, config.cpus)
            self._gic.finish()
            gic = self._gic
            self.eventfds = config.eventfds and all(
                k.check_extension(self.vm.fd, cap) > 0
                for cap in (k.KVM_CAP_IRQFD, k.KVM_CAP_IOEVENTFD)
            )
            self.uart = Pl011(console, lambda level: gic.set_spi(layout.UART_SPI, level))
            uart = _Device(layout.UART, layout.UART_SIZE, self.uart.read, self.uart.write)
            self._devices = [uart, *self._add_virtio(config, console, gic, lock_disks)]
            self.has_vcpu_events = k.check_extension(self.vm.fd, k.KVM_CAP_VCPU_EVENTS) > 0
            if kernel is not None:
                self._boot(config, kernel)
        except BaseException:
            self.close()
            raise
        self.gate = Gate(self._vcpus)
        self._counters = _Counters()
        self._outcome: Outcome | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()

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

    def _make_memory(self, config: MachineConfig) -> gm.GuestMemory:
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

    def _add_virtio(
        self, config: MachineConfig, console: Callable[[bytes], None], gic: Gic, lock_disks: bool
    ) -> list[_Device]:
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
        windows = []
        for index, device in enumerate(devices):
            line = EdgeInterrupt(gic, layout.VIRTIO_SPI + index, irqfd=self.eventfds)
            self.interrupts.append(line)
            transport = MmioTransport(self.memory, device, line.set)
            self.transports.append(transport)
            base = layout.VIRTIO + index * layout.VIRTIO_SIZE
            if self.eventfds:
                for queue in range(device.queue_count):
                    kick = self.io.eventfd(functools.partial(transport.notify_queue, queue))
                    k.assign_ioeventfd(self.vm.fd, kick, base + QUEUE_NOTIFY, 4, queue)
            windows.append(_Device(base, layout.VIRTIO_SIZE, transport.read, transport.write))
        return windows

    @property
    def gic(self) -> Gic:
        """The vGIC."""
        assert self._gic is not None
        return self._gic

    @property
    def vcpus(self) -> tuple[Vcpu, ...]:
        """The vCPUs, by index."""
        return tuple(self._vcpus)

    def console_input(self, data: bytes) -> None:
        """Bytes typed at the guest's console: hvc0 if there is one, else the UART.

        Dropped once the run has ended.
        """
        if self._done.is_set():
            return
        if self.hvc is not None:
            self.hvc.receive(data)
        else:
            self.uart.receive(data)

    def run(self) -> Outcome:
        """Run every vCPU until the guest powers off or resets, or the VMM fails."""
        install_kick_handler()
        started = time.monotonic()
        threads = [
            threading.Thread(target=self._vcpu_loop, args=(v,), name=f"vcpu{v.index}", daemon=True)
            for v in self._vcpus
        ]
        self.io.start()
        for thread in threads:
            thread.start()
        self._done.wait()
        for thread in threads:
            thread.join()
        self.io.stop()
        assert self._outcome is not None
        return Outcome(
            self._outcome.reason,
            self._outcome.detail,
            self._counters.mmio_exits,
            time.monotonic() - started,
        )

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A block during which no vCPU runs and no device serves (while :meth:`run` runs).

        Every vCPU is kicked out of the guest and parked, and what KVM held
        for its next entry (an MMIO read's value) is completed; the I/O
        thread is held off. The vCPUs run again when the block ends, unless
        the run ended meanwhile (a migrated machine's does).
        """
        self.gate.close()
        try:
            if self.gate.wait_stopped(PAUSE_TIMEOUT) is None:
                raise gm.GuestMemoryError(f"the vCPUs did not stop within {PAUSE_TIMEOUT:.0f} s")
            if self.gate.ended:
                raise gm.UsageError("the machine's run has ended: there is nothing to pause")
            for vcpu in self._vcpus:
                vcpu.complete_pending()
            with self.io.quiesced():
                yield
        finally:
            if not self.gate.ended:
                self.gate.open()

    def stop(self, reason: str = "quit", detail: str = "") -> None:
        """End the run from any thread, with this outcome (unless it already ended)."""
        self._finish(Outcome(reason, detail))

    def _finish(self, outcome: Outcome) -> None:
        with self._lock:
            if self._outcome is None:
                self._outcome = outcome
        self.gate.end()
        self._done.set()

    def _vcpu_loop(self, vcpu: Vcpu) -> None:
        vcpu.thread_id = threading.get_ident()
        try:
            while self.gate.enter(vcpu):
                exit_ = vcpu.run()
                if isinstance(exit_, MmioExit):
                    self._mmio(vcpu, exit_)
                elif isinstance(exit_, SystemEvent):
                    self._finish(Outcome(_EVENTS.get(exit_.kind, f"system event {exit_.kind}")))
                elif isinstance(exit_, Interrupted):
                    continue
                elif isinstance(exit_, DebugExit):
                    self.gate.debug_exit(vcpu.index, exit_)
                else:
                    self._finish(Outcome("error", f"vCPU {vcpu.index}: unhandled exit {exit_}"))
        except Exception as err:  # the run ends with the reason instead of a dead thread
            self._finish(Outcome("error", f"vCPU {vcpu.index}: {err}"))

    def _mmio(self, vcpu: Vcpu, exit_: MmioExit) -> None:
        self._counters.mmio_exits += 1
        for device in self._devices:
            if device.base <= exit_.address < device.base + device.size:
                offset = exit_.address - device.base
                if exit_.is_write:
                    device.write(offset, exit_.size, exit_.data)
                else:
                    vcpu.complete_read(exit_, device.read(offset, exit_.size))
                return
        # Nothing there: reads give 0 and writes vanish, as on an empty bus.
        if not exit_.is_write:
            vcpu.complete_read(exit_, 0)

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
        """Release the vCPUs, the vGIC, guest RAM and the VM (after :meth:`run` returned)."""
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

    def __enter__(self) -> Machine:
        """The machine, closed when the block ends."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the machine."""
        self.close()


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
