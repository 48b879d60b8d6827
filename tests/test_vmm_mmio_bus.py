"""The VMM's MMIO bus (guestmem.vmm.mmio_bus) and run outcomes (guestmem.vmm.outcome).

Host lane: no KVM; the handlers are recorders.
"""

from __future__ import annotations

import pytest

import guestmem as gm
from guestmem.vmm.mmio_bus import MmioBus
from guestmem.vmm.outcome import EndReason, Outcome


class Device:
    def __init__(self, answer: int) -> None:
        self.answer = answer
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return self.answer

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def bus_of(*windows: tuple[int, int, Device]) -> MmioBus:
    bus = MmioBus()
    for base, size, device in windows:
        bus.add(base, size, device.read, device.write)
    return bus


def test_an_access_reaches_its_window_at_its_offset() -> None:
    low, high = Device(1), Device(2)
    bus = bus_of((0x2000, 0x200, high), (0x1000, 0x1000, low))
    assert bus.read(0x1000, 4) == 1 and bus.read(0x1FFF, 1) == 1
    assert bus.read(0x2000, 4) == 2 and bus.read(0x21FF, 1) == 2
    bus.write(0x2050, 4, 7)
    assert low.reads == [(0, 4), (0xFFF, 1)]
    assert high.reads == [(0, 4), (0x1FF, 1)] and high.writes == [(0x50, 4, 7)]
    assert [w.base for w in bus.windows] == [0x1000, 0x2000]


@pytest.mark.parametrize("address", [0x0, 0xFFF, 0x2200, 0xFFFF_FFFF])
def test_an_address_in_no_window_reads_zero_and_swallows_writes(address: int) -> None:
    device = Device(0xFF)
    bus = bus_of((0x1000, 0x1000, device), (0x2000, 0x200, device))
    assert bus.read(address, 4) == 0
    bus.write(address, 4, 1)
    assert bus.find(address) is None
    assert device.reads == [] and device.writes == []


@pytest.mark.parametrize(
    ("base", "size"),
    [(0x1000, 0x1000), (0x0, 0x1001), (0x1FFF, 1), (0x1800, 0x10), (0x0, 0x10000), (0x21FF, 2)],
)
def test_a_window_that_overlaps_another_is_refused(base: int, size: int) -> None:
    bus = bus_of((0x1000, 0x1000, Device(1)), (0x2000, 0x200, Device(2)))
    with pytest.raises(gm.UsageError, match="overlaps"):
        bus.add(base, size, Device(3).read, Device(3).write)
    assert len(bus.windows) == 2


def test_adjacent_windows_and_empty_ones() -> None:
    bus = bus_of((0x1000, 0x1000, Device(1)))
    bus.add(0x0, 0x1000, Device(0).read, Device(0).write)  # ends where the next starts
    bus.add(0x2000, 0x10, Device(2).read, Device(2).write)
    assert [bus.read(a, 4) for a in (0xFFF, 0x1000, 0x1FFF, 0x2000)] == [0, 1, 1, 2]
    with pytest.raises(gm.UsageError, match="needs a size"):
        bus.add(0x3000, 0, Device(3).read, Device(3).write)


def test_a_reason_is_its_text() -> None:
    assert [EndReason.POWER_OFF] == ["power-off"] and str(EndReason.SYSTEM_EVENT) == "system event"
    assert f"{EndReason.QUIT}" == "quit" and EndReason("migrated") is EndReason.MIGRATED
    outcome = Outcome(EndReason.ERROR, "vCPU 0: it broke")
    assert f"{outcome.reason} {outcome.detail}" == "error vCPU 0: it broke"
