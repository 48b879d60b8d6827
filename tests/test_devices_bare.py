"""The devices of guestmem.devices with no transport: a queue, guest memory, an interrupt.

What a vhost-user backend will do (the next issue): hand a device the rings
the driver set up, kick it, and hear from it through its return value and
its UsedBuffers, with no virtio-mmio window anywhere. Also the package's
shape: no device module knows the VMM, the front ends or a transport. Host
lane, SOFTWARE memory.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import guestmem as gm
from guestmem import devices
from guestmem.devices import pl011
from guestmem.devices import virtio_blk as blk
from guestmem.devices import virtio_console as hvc
from guestmem.devices import virtio_device as virtio
from guestmem.devices import virtio_mmio as mmio
from guestmem.saved_state import StateError, Stateful
from test_devices_virtio_mmio import BASE, DATA, RAM, RINGS, SECTORS, SIZE, request, status
from virtq_driver import Driver

PACKAGE = Path(devices.__file__).parent
TRANSPORTS = {"virtio_mmio", "virtio_mmio_state"}


class Used:
    """A UsedBuffers that counts what it was told."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


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


def imports(path: Path) -> set[str]:
    """Every module a file names in an import, wherever the import stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_device_module_imports_the_vmm_the_front_ends_or_a_transport() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        names = imports(path)
        assert not {n for n in names if n.startswith(("guestmem.vmm", "guestmem.tools"))}, path
        if path.stem not in TRANSPORTS:
            assert not {n for n in names if n.startswith("guestmem.devices.virtio_mmio")}, path


def test_virtio_blk_serves_a_queue_it_was_handed(mem: gm.GuestMemory, image: Path) -> None:
    device = blk.VirtioBlock(mem, str(image))
    driver = Driver(mem, SIZE, RINGS)
    used = Used()
    device.activate([driver.queue(event_idx=False)], device.features, used)
    request(driver, blk.T_IN, 1, blk.SECTOR, writable=True)
    assert device.notify(0) is True  # the kick's own buffers: the result says so
    assert driver.used_elem(0) == (0, blk.SECTOR + 1) and status(mem) == blk.S_OK
    assert mem.read(DATA, blk.SECTOR, access=gm.Access.DEBUG) == bytes(range(256)) * 2
    assert used.count == 0 and device.requests == 1
    device.reset()
    assert device.notify(0) is False
    device.close()


def test_virtio_console_tells_its_used_buffers_of_input(mem: gm.GuestMemory) -> None:
    out: list[bytes] = []
    device = hvc.VirtioConsole(mem, out.append)
    receiveq, transmitq = Driver(mem, SIZE, RINGS), Driver(mem, SIZE, RINGS + 0x4000)
    used = Used()
    device.activate([receiveq.queue(), transmitq.queue()], 0, used)
    mem.write(DATA, b"bare\n", access=gm.Access.DEBUG)
    transmitq.add([(DATA, 5, False)])
    assert device.notify(hvc.TRANSMIT) is True and out == [b"bare\n"]
    receiveq.add([(DATA + 0x100, 8, True)])
    assert device.notify(hvc.RECEIVE) is False  # nothing typed yet: the buffer waits
    device.receive(b"typed")
    assert used.count == 1 and receiveq.used_elem(0) == (0, 5)
    assert mem.read(DATA + 0x100, 5, access=gm.Access.DEBUG) == b"typed"
    device.reset()
    device.receive(b"after the reset")  # no driver to tell: it waits in the backlog
    assert used.count == 1


def test_config_space_writes_reach_the_device_which_ignores_them(
    mem: gm.GuestMemory, image: Path
) -> None:
    device = blk.VirtioBlock(mem, str(image))
    transport = mmio.MmioTransport(mem, device, lambda _level: None)
    before = transport.read(mmio.CONFIG, 8)
    transport.write(mmio.CONFIG, 8, 0xFFFF_FFFF_FFFF_FFFF)
    assert transport.read(mmio.CONFIG, 8) == before == device.size // blk.SECTOR
    device.close()


def test_every_part_saves_and_loads_in_one_shape(mem: gm.GuestMemory, image: Path) -> None:
    disk = blk.VirtioBlock(mem, str(image), locked=False)
    parts: list[Stateful[Any]] = [
        pl011.Pl011(lambda _data: None, lambda _level: None),
        disk,
        hvc.VirtioConsole(mem, lambda _data: None),
        mmio.MmioTransport(mem, hvc.VirtioConsole(mem, lambda _data: None), lambda _level: None),
    ]
    for part in parts:
        saved = part.save_state()
        part.load_state(saved)
        assert part.save_state() == saved
        with pytest.raises(StateError):
            part.load_state(saved + b"\0")
        assert part.save_state() == saved
    disk.close()


def test_the_ring_features_are_offered_by_the_transport_not_the_device(
    mem: gm.GuestMemory,
) -> None:
    device = hvc.VirtioConsole(mem, lambda _data: None)
    assert device.features & virtio.RING_FEATURES == 0
    transport = mmio.MmioTransport(mem, device, lambda _level: None)
    transport.write(mmio.DEVICE_FEATURES_SEL, 4, 1)
    assert transport.read(mmio.DEVICE_FEATURES, 4) == virtio.F_VERSION_1 >> 32
