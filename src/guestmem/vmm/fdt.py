"""The guest's device tree, built at start with libfdt's sequential writer.

libfdt (pylibfdt; Debian's ``python3-libfdt``) is the device-tree library
of dtc, maintained beside the kernel's own dtc and used by QEMU, U-Boot and
crosvm's C predecessors: the blob it writes is the one Linux's early code
expects, and the project need not own an encoder. The tree describes what
the VMM serves: RAM, the vCPUs (PSCI 0.2 through HVC), the vGICv3, the arch
timer's PPIs, the PL011 and its clock, the virtio-mmio transports, and
``/chosen``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from guestmem.errors import UnsupportedError
from guestmem.vmm import layout

GIC_PHANDLE = 1
CLOCK_PHANDLE = 2
_SPI, _PPI = 0, 1
_EDGE_RISING, _LEVEL_HIGH = 1, 4
# Secure and non-secure physical, virtual, and hypervisor timer PPIs.
_TIMER_PPIS = (13, 14, 11, 10)


@dataclass(frozen=True)
class BootTree:
    """What the tree tells the guest: RAM, vCPUs, command line and initrd."""

    ram_base: int
    ram_size: int
    cpus: int
    command_line: str
    initrd: tuple[int, int] | None = None  # (start, end) guest physical
    virtio_devices: int = 0  # virtio-mmio transports at layout.VIRTIO onwards


def _cells(*values: int) -> bytes:
    return struct.pack(f">{len(values)}I", *values)


def _pairs(*values: int) -> bytes:
    """Addresses and sizes in two cells each (#address-cells = #size-cells = 2)."""
    return struct.pack(f">{len(values)}Q", *values)


def build(tree: BootTree) -> bytes:
    """The flattened device tree (DTB) for ``tree``."""
    try:
        import libfdt
    except ImportError as err:
        raise UnsupportedError(
            "the VMM builds its device tree with libfdt: pip install pylibfdt "
            "(or apt install python3-libfdt)"
        ) from err
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", "linux,dummy-virt")
    sw.property_u32("#address-cells", 2)
    sw.property_u32("#size-cells", 2)
    sw.property_u32("interrupt-parent", GIC_PHANDLE)
    _chosen(sw, tree)
    _memory(sw, tree)
    _cpus(sw, tree.cpus)
    _psci(sw)
    _gic(sw, tree.cpus)
    _timer(sw)
    _uart(sw)
    for index in range(tree.virtio_devices):
        _virtio_mmio(sw, index)
    sw.end_node()
    return bytes(sw.as_fdt().as_bytearray())


def _chosen(sw: Any, tree: BootTree) -> None:
    sw.begin_node("chosen")
    sw.property_string("bootargs", tree.command_line)
    sw.property_string("stdout-path", f"/pl011@{layout.UART:x}")
    if tree.initrd is not None:
        sw.property_u64("linux,initrd-start", tree.initrd[0])
        sw.property_u64("linux,initrd-end", tree.initrd[1])
    sw.end_node()


def _memory(sw: Any, tree: BootTree) -> None:
    sw.begin_node(f"memory@{tree.ram_base:x}")
    sw.property_string("device_type", "memory")
    sw.property("reg", _pairs(tree.ram_base, tree.ram_size))
    sw.end_node()


def _cpus(sw: Any, count: int) -> None:
    sw.begin_node("cpus")
    sw.property_u32("#address-cells", 1)
    sw.property_u32("#size-cells", 0)
    for cpu in range(count):
        sw.begin_node(f"cpu@{cpu}")
        sw.property_string("device_type", "cpu")
        sw.property_string("compatible", "arm,arm-v8")
        sw.property_string("enable-method", "psci")
        sw.property_u32("reg", cpu)
        sw.end_node()
    sw.end_node()


def _psci(sw: Any) -> None:
    sw.begin_node("psci")
    sw.property("compatible", b"arm,psci-0.2\0arm,psci\0")
    sw.property_string("method", "hvc")
    sw.end_node()


def _gic(sw: Any, cpus: int) -> None:
    sw.begin_node(f"intc@{layout.GIC_DIST:x}")
    sw.property_string("compatible", "arm,gic-v3")
    sw.property_u32("#interrupt-cells", 3)
    sw.property("interrupt-controller", b"")
    sw.property_u32("#redistributor-regions", 1)
    redist_size = cpus * layout.GIC_REDIST_SIZE_PER_CPU
    sw.property(
        "reg", _pairs(layout.GIC_DIST, layout.GIC_DIST_SIZE, layout.GIC_REDIST, redist_size)
    )
    sw.property_u32("phandle", GIC_PHANDLE)
    sw.end_node()


def _timer(sw: Any) -> None:
    sw.begin_node("timer")
    sw.property_string("compatible", "arm,armv8-timer")
    sw.property("interrupts", _cells(*(v for ppi in _TIMER_PPIS for v in (_PPI, ppi, _LEVEL_HIGH))))
    sw.property("always-on", b"")
    sw.end_node()


def _uart(sw: Any) -> None:
    sw.begin_node("apb-pclk")
    sw.property_string("compatible", "fixed-clock")
    sw.property_u32("#clock-cells", 0)
    sw.property_u32("clock-frequency", layout.UART_CLOCK_HZ)
    sw.property_string("clock-output-names", "clk24mhz")
    sw.property_u32("phandle", CLOCK_PHANDLE)
    sw.end_node()
    sw.begin_node(f"pl011@{layout.UART:x}")
    sw.property("compatible", b"arm,pl011\0arm,primecell\0")
    sw.property("reg", _pairs(layout.UART, layout.UART_SIZE))
    sw.property("interrupts", _cells(_SPI, layout.UART_SPI, _LEVEL_HIGH))
    sw.property("clocks", _cells(CLOCK_PHANDLE, CLOCK_PHANDLE))
    sw.property("clock-names", b"uartclk\0apb_pclk\0")
    sw.end_node()


def _virtio_mmio(sw: Any, index: int) -> None:
    base = layout.VIRTIO + index * layout.VIRTIO_SIZE
    sw.begin_node(f"virtio_mmio@{base:x}")
    sw.property_string("compatible", "virtio,mmio")
    sw.property("reg", _pairs(base, layout.VIRTIO_SIZE))
    # Edge: an irqfd pulses its line, which a level-triggered SPI would not hold.
    sw.property("interrupts", _cells(_SPI, layout.VIRTIO_SPI + index, _EDGE_RISING))
    sw.property("dma-coherent", b"")
    sw.end_node()
