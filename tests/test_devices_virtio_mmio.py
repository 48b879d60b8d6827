"""The reference VMM's virtio-mmio transport and virtio-blk device, driven as a guest would.

A synthetic driver (tests/virtq_driver.py) negotiates through the MMIO
registers, lays out the rings in guest memory, posts block requests and
kicks; the device serves them from an image file through guestmem's DMA
routes. Host lane, SOFTWARE memory (tags checked by the software model);
the arm64-kernel lane runs the same device under a real guest
(test_vmm_virtio.py).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import guestmem as gm
from guestmem.devices import virtio_blk as blk
from guestmem.devices import virtio_console as hvc
from guestmem.devices import virtio_device as virtio
from guestmem.devices import virtio_mmio as mmio
from virtq_driver import Driver

BASE = 0x4000_0000
RAM = 1 << 20
RINGS, HEADER, DATA, STATUS = BASE, BASE + 0x10000, BASE + 0x20000, BASE + 0x30000
SIZE = 64
SECTORS = 64


class Line:
    def __init__(self) -> None:
        self.level = False
        self.changes = 0

    def __call__(self, level: bool) -> None:
        self.level = level
        self.changes += 1


@pytest.fixture
def mem() -> Iterator[gm.GuestMemory]:
    with gm.GuestMemory.anonymous(RAM, gpa=BASE, tags=gm.TagMode.SOFTWARE) as memory:
        memory.set_tags(BASE, RAM, 0)
        memory.set_tags(DATA, 0x10000, 9)  # the data buffers are tagged, as a guest's may be
        yield memory


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SECTORS * blk.SECTOR // 256))
    return path


def set_up(
    mem: gm.GuestMemory, device: virtio.VirtioDevice
) -> tuple[mmio.MmioTransport, Driver, Line]:
    """What a guest's virtio_mmio driver does before DRIVER_OK; the first queue's driver."""
    transport, drivers, line = set_up_queues(mem, device)
    return transport, drivers[0], line


def set_up_queues(
    mem: gm.GuestMemory, device: virtio.VirtioDevice, rings: int = RINGS
) -> tuple[mmio.MmioTransport, list[Driver], Line]:
    """The same for every queue of ``device``, each with its own rings (from ``rings`` up)."""
    line = Line()
    transport = mmio.MmioTransport(mem, device, line)
    assert transport.read(mmio.MAGIC_VALUE, 4) == mmio.MAGIC
    assert transport.read(mmio.VERSION_REG, 4) == 2
    assert transport.read(mmio.DEVICE_ID, 4) == device.device_id
    transport.write(mmio.STATUS, 4, virtio.S_ACKNOWLEDGE | virtio.S_DRIVER)
    transport.write(mmio.DEVICE_FEATURES_SEL, 4, 1)
    assert transport.read(mmio.DEVICE_FEATURES, 4) & 1  # VERSION_1
    transport.write(mmio.DRIVER_FEATURES_SEL, 4, 0)
    transport.write(mmio.DRIVER_FEATURES, 4, device.features | virtio.F_EVENT_IDX)
    transport.write(mmio.DRIVER_FEATURES_SEL, 4, 1)
    transport.write(mmio.DRIVER_FEATURES, 4, 1)
    transport.write(mmio.STATUS, 4, virtio.S_ACKNOWLEDGE | virtio.S_DRIVER | virtio.S_FEATURES_OK)
    assert transport.read(mmio.STATUS, 4) & virtio.S_FEATURES_OK
    drivers = []
    for queue in range(device.queue_count):
        driver = Driver(mem, SIZE, rings + 0x4000 * queue)
        drivers.append(driver)
        transport.write(mmio.QUEUE_SEL, 4, queue)
        assert transport.read(mmio.QUEUE_NUM_MAX, 4) >= SIZE
        transport.write(mmio.QUEUE_NUM, 4, SIZE)
        for (low, high), gpa in zip(
            [(mmio.QUEUE_DESC_LOW, mmio.QUEUE_DESC_HIGH),
             (mmio.QUEUE_DRIVER_LOW, mmio.QUEUE_DRIVER_HIGH),
             (mmio.QUEUE_DEVICE_LOW, mmio.QUEUE_DEVICE_HIGH)],
            driver.rings(),
            strict=True,
        ):  # fmt: skip
            transport.write(low, 4, gpa & 0xFFFF_FFFF)
            transport.write(high, 4, gpa >> 32)
        transport.write(mmio.QUEUE_READY, 4, 1)
    transport.write(mmio.STATUS, 4, 0xF)
    return transport, drivers, line


def request(
    driver: Driver, kind: int, sector: int, data_len: int, *, writable: bool, slot: int = 0
) -> int:
    """Post one request; requests in flight together need their own ``slot``."""
    header = HEADER + 16 * slot
    driver.mem.write(header, struct.pack("<IIQ", kind, 0, sector), access=gm.Access.DEBUG)
    buffers = [(header, 16, False)]
    if data_len:
        buffers.append((DATA, data_len, writable))
    buffers.append((STATUS + slot, 1, True))
    return driver.add(buffers)


def kick(transport: mmio.MmioTransport) -> None:
    transport.write(mmio.QUEUE_NOTIFY, 4, 0)


def status(mem: gm.GuestMemory, slot: int = 0) -> int:
    return mem.read(STATUS + slot, 1, access=gm.Access.DEBUG)[0]


def test_read_write_flush_and_get_id(mem: gm.GuestMemory, image: Path) -> None:
    device = blk.VirtioBlock(mem, str(image))
    transport, driver, line = set_up(mem, device)
    config = transport.read(mmio.CONFIG, 4) | transport.read(mmio.CONFIG + 4, 4) << 32
    assert config == SECTORS
    tags = mem.get_tags(BASE, RAM)

    request(driver, blk.T_IN, 3, 1024, writable=True)
    kick(transport)
    assert status(mem) == blk.S_OK
    assert mem.read(DATA, 1024, access=gm.Access.DEBUG) == image.read_bytes()[1536:2560]
    assert driver.used_elem(0) == (0, 1025)
    assert line.level and transport.read(mmio.INTERRUPT_STATUS, 4) == mmio.INT_USED
    transport.write(mmio.INTERRUPT_ACK, 4, mmio.INT_USED)
    assert not line.level

    mem.write(DATA, b"\xab" * 512, access=gm.Access.DEBUG)
    request(driver, blk.T_OUT, 10, 512, writable=False)
    request(driver, blk.T_FLUSH, 0, 0, writable=False, slot=1)
    kick(transport)
    assert image.read_bytes()[5120:5632] == b"\xab" * 512
    assert driver.used_idx() == 3 and status(mem) == status(mem, 1) == blk.S_OK

    request(driver, blk.T_GET_ID, 0, 20, writable=True)
    kick(transport)
    assert mem.read(DATA, 20, access=gm.Access.DEBUG) == b"disk.img".ljust(20, b"\0")
    np.testing.assert_array_equal(mem.get_tags(BASE, RAM), tags)  # DMA never retags
    device.close()


@pytest.mark.parametrize(
    ("kind", "sector", "length", "writable", "expected"),
    [
        (blk.T_IN, SECTORS, 512, True, blk.S_IOERR),  # past the end
        (blk.T_IN, SECTORS - 1, 1024, True, blk.S_IOERR),  # runs past the end
        (blk.T_IN, 0, 100, True, blk.S_IOERR),  # not whole sectors
        (blk.T_OUT, 0, 512, False, blk.S_IOERR),  # read-only disk
        (99, 0, 0, False, blk.S_UNSUPP),
    ],
    ids=["past-end", "runs-past-end", "partial-sector", "read-only", "unknown-type"],
)
def test_bad_requests_get_an_error_status_and_change_nothing(
    mem: gm.GuestMemory,
    image: Path,
    kind: int,
    sector: int,
    length: int,
    writable: bool,
    expected: int,
) -> None:
    before = image.read_bytes()
    device = blk.VirtioBlock(mem, str(image), read_only=True)
    transport, driver, _ = set_up(mem, device)
    mem.write(DATA, b"\x55" * 1024, access=gm.Access.DEBUG)
    request(driver, kind, sector, length, writable=writable)
    kick(transport)
    assert status(mem) == expected
    assert image.read_bytes() == before
    assert mem.read(DATA, 1024, access=gm.Access.DEBUG) == b"\x55" * 1024
    device.close()


def test_a_malformed_ring_sets_needs_reset_and_a_reset_recovers(
    mem: gm.GuestMemory, image: Path
) -> None:
    device = blk.VirtioBlock(mem, str(image))
    transport, driver, line = set_up(mem, device)
    driver.set_desc(0, BASE + RAM + 0x1000, 512, 0)  # a buffer outside guest RAM
    driver.publish(0)
    kick(transport)
    assert transport.read(mmio.STATUS, 4) & virtio.S_NEEDS_RESET
    assert transport.read(mmio.INTERRUPT_STATUS, 4) & mmio.INT_CONFIG and line.level
    kick(transport)  # ignored until the reset
    transport.write(mmio.STATUS, 4, 0)
    assert transport.read(mmio.STATUS, 4) == 0 and not line.level
    transport, driver, _ = set_up(mem, device)
    request(driver, blk.T_IN, 0, 512, writable=True)
    kick(transport)
    assert status(mem) == blk.S_OK
    device.close()


def test_a_legacy_driver_is_refused_features_ok(mem: gm.GuestMemory, image: Path) -> None:
    device = blk.VirtioBlock(mem, str(image))
    transport = mmio.MmioTransport(mem, device, Line())
    transport.write(mmio.STATUS, 4, virtio.S_ACKNOWLEDGE | virtio.S_DRIVER)
    transport.write(mmio.DRIVER_FEATURES, 4, 0)  # no VERSION_1
    transport.write(mmio.STATUS, 4, virtio.S_ACKNOWLEDGE | virtio.S_DRIVER | virtio.S_FEATURES_OK)
    assert not transport.read(mmio.STATUS, 4) & virtio.S_FEATURES_OK
    device.close()


def test_unknown_registers_read_zero_and_ignore_writes(mem: gm.GuestMemory, image: Path) -> None:
    device = blk.VirtioBlock(mem, str(image))
    transport = mmio.MmioTransport(mem, device, Line())
    transport.write(0x0C0, 4, 0xFFFF_FFFF)
    assert transport.read(0x0C0, 4) == 0
    transport.write(mmio.QUEUE_SEL, 4, 7)  # no such queue
    assert transport.read(mmio.QUEUE_NUM_MAX, 4) == 0
    device.close()


def test_the_console_sends_what_the_guest_writes_and_delivers_what_is_typed(
    mem: gm.GuestMemory,
) -> None:
    out: list[bytes] = []
    device = hvc.VirtioConsole(mem, out.append)
    transport, (receiveq, transmitq), line = set_up_queues(mem, device)
    mem.write(DATA, b"hello, hvc0\n", access=gm.Access.DEBUG)
    transmitq.add([(DATA, 12, False)])
    transport.write(mmio.QUEUE_NOTIFY, 4, hvc.TRANSMIT)
    assert out == [b"hello, hvc0\n"] and transmitq.used_idx() == 1

    device.receive(b"typed before any buffer")  # waits in the backlog
    assert receiveq.used_idx() == 0
    receiveq.add([(DATA + 0x100, 8, True)])
    transport.write(mmio.QUEUE_NOTIFY, 4, hvc.RECEIVE)
    assert receiveq.used_elem(0) == (0, 8)
    assert mem.read(DATA + 0x100, 8, access=gm.Access.DEBUG) == b"typed be"
    transport.write(mmio.INTERRUPT_ACK, 4, mmio.INT_USED)
    assert not line.level
    receiveq.add([(DATA + 0x200, 64, True)])
    transport.write(mmio.QUEUE_NOTIFY, 4, hvc.RECEIVE)
    assert mem.read(DATA + 0x200, 15, access=gm.Access.DEBUG) == b"fore any buffer"
    receiveq.add([(DATA + 0x300, 64, True)])
    transport.write(mmio.QUEUE_NOTIFY, 4, hvc.RECEIVE)  # nothing typed: the buffer waits
    assert receiveq.used_idx() == 2
    transport.write(mmio.INTERRUPT_ACK, 4, mmio.INT_USED)
    receiveq.set_used_event(receiveq.used_idx())  # EVENT_IDX: the driver asks for the next one
    device.receive(b"late")  # arrives outside a kick: the device raises the interrupt
    assert receiveq.used_idx() == 3 and line.level
    assert mem.read(DATA + 0x300, 4, access=gm.Access.DEBUG) == b"late"


def test_a_kick_through_an_eventfd_is_served_like_a_queue_notify_write(
    mem: gm.GuestMemory, image: Path
) -> None:
    device = blk.VirtioBlock(mem, str(image))
    transport, driver, line = set_up(mem, device)
    request(driver, blk.T_IN, 1, 512, writable=True)
    transport.notify_queue(0)
    assert status(mem) == blk.S_OK and driver.used_idx() == 1
    assert line.level and transport.read(mmio.INTERRUPT_STATUS, 4) == mmio.INT_USED
    assert (transport.kicks_by_eventfd, transport.kicks_by_exit) == (1, 0)
    transport.notify_queue(7)  # no such queue: ignored, as the register write is
    kick(transport)
    assert (transport.kicks_by_eventfd, transport.kicks_by_exit) == (2, 1)
    device.close()
