"""Where things are in the guest's physical address space (after QEMU's ``virt`` board).

Devices sit below 1 GiB, RAM from 1 GiB up: a guest kernel built for
``virt`` finds nothing surprising, and every address is 64 KiB aligned, as
the vGIC and 16 and 64 KiB host pages want.
"""

from __future__ import annotations

GIC_DIST = 0x0800_0000
GIC_DIST_SIZE = 0x1_0000
GIC_REDIST = 0x080A_0000
GIC_REDIST_SIZE_PER_CPU = 0x2_0000  # RD_base and SGI_base frames
GIC_REDIST_END = 0x0900_0000
MAX_CPUS = (GIC_REDIST_END - GIC_REDIST) // GIC_REDIST_SIZE_PER_CPU

UART = 0x0900_0000
UART_SIZE = 0x1000
UART_SPI = 1  # SPI 1: INTID 33
UART_CLOCK_HZ = 24_000_000

VIRTIO = 0x0A00_0000  # virtio-mmio transports, one window each
VIRTIO_SIZE = 0x200
VIRTIO_SPI = 16  # the first transport's SPI; the next ones follow
MAX_VIRTIO = 32
# Nothing lives at 0x0C00_0000: the guest's MTE probe times MMIO exits there.

RAM = 0x4000_0000
SPI_COUNT = 64  # INTIDs 32..95 exist
