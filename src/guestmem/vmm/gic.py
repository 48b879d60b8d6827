"""The in-kernel vGICv3: its distributor and redistributors, and lines into it.

Level lines (the UART's) are driven with KVM_IRQ_LINE; the virtio devices'
lines are edge-triggered (:class:`EdgeInterrupt`), through an irqfd where
KVM offers one.
"""

from __future__ import annotations

import os

from guestmem.errors import UsageError
from guestmem.vmm import kvm_api as k
from guestmem.vmm import layout


class Gic:
    """A vGICv3 made by KVM (KVM_DEV_TYPE_ARM_VGIC_V3).

    Made after the vCPUs exist and initialised by :meth:`finish` (KVM wants
    every vCPU before KVM_DEV_ARM_VGIC_CTRL_INIT); the timer's PPIs and
    inter-processor SGIs then need nothing from the VMM.
    """

    def __init__(self, vm_fd: int, cpus: int) -> None:
        """Create the vGIC on ``vm_fd`` and place it for ``cpus`` redistributors."""
        if not 1 <= cpus <= layout.MAX_CPUS:
            raise UsageError(f"the vGIC layout holds 1 to {layout.MAX_CPUS} vCPUs, not {cpus}")
        self.vm_fd = vm_fd
        self.line_ioctls: dict[int, int] = {}  # KVM_IRQ_LINE calls, by SPI
        request = bytearray(k.CREATE_DEVICE.pack(k.DEV_VGIC_V3, 0, 0))
        k.ioctl(vm_fd, k.KVM_CREATE_DEVICE, request, "KVM_CREATE_DEVICE(vGICv3)")
        self.fd = k.CREATE_DEVICE.unpack(request)[1]
        try:
            k.set_device_attr(self.fd, k.VGIC_GRP_ADDR, k.VGIC_V3_ADDR_DIST, layout.GIC_DIST)
            k.set_device_attr(self.fd, k.VGIC_GRP_ADDR, k.VGIC_V3_ADDR_REDIST, layout.GIC_REDIST)
            k.set_device_attr(self.fd, k.VGIC_GRP_NR_IRQS, 0, 32 + layout.SPI_COUNT, size=4)
        except BaseException:
            os.close(self.fd)
            raise

    def finish(self) -> None:
        """Initialise the vGIC, once every vCPU exists."""
        k.set_device_attr(self.fd, k.VGIC_GRP_CTRL, k.VGIC_CTRL_INIT, 0)

    def set_spi(self, spi: int, level: bool) -> None:
        """Drive shared peripheral interrupt ``spi`` (INTID 32 + spi) to ``level``."""
        irq = k.IRQ_TYPE_SPI << 24 | (32 + spi)
        request = bytearray(k.IRQ_LEVEL.pack(irq, int(level)))
        self.line_ioctls[spi] = self.line_ioctls.get(spi, 0) + 1
        k.ioctl(self.vm_fd, k.KVM_IRQ_LINE, request, f"KVM_IRQ_LINE SPI {spi}")

    def close(self) -> None:
        """Close the device fd (the VM keeps the vGIC until it closes)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class EdgeInterrupt:
    """A device's edge-triggered shared interrupt, raised through an irqfd where KVM has one.

    The transport drives it like a level (up when InterruptStatus becomes
    non-zero, down when it clears); each rise is one edge for the guest,
    which the device tree declares edge-triggered. With an irqfd the edge is
    one eventfd write, which KVM turns into an interrupt without an ioctl;
    without one, two KVM_IRQ_LINE calls (up, then down).
    """

    def __init__(self, gic: Gic, spi: int, *, irqfd: bool) -> None:
        """The line of ``spi``; ``irqfd`` asks for an irqfd (KVM_IRQFD) on it."""
        self._gic = gic
        self.spi = spi
        self.edges = 0
        self.fd = -1
        if irqfd:
            fd = os.eventfd(0, os.EFD_CLOEXEC)
            try:
                k.assign_irqfd(gic.vm_fd, fd, spi)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd

    def set(self, level: bool) -> None:
        """Follow the device's interrupt condition: a rise is an edge, a fall nothing."""
        if not level:
            return
        self.edges += 1
        if self.fd >= 0:
            os.eventfd_write(self.fd, 1)
        else:
            self._gic.set_spi(self.spi, True)
            self._gic.set_spi(self.spi, False)

    def close(self) -> None:
        """Close the irqfd (KVM drops its side when the eventfd goes)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
