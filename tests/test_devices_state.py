"""Saving and loading the reference VMM's device state (snapshots, live migration).

A source device is driven as a guest would (tests/virtq_driver.py for the
rings), saved, and loaded into a freshly built device over the same guest
memory, as a new VMM process of the same configuration would: the target
must carry on where the source stopped, and bad state must be refused
with StateError and change nothing. Host lane, SOFTWARE memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import guestmem as gm
from guestmem.devices import pl011
from guestmem.devices import virtio_blk as blk
from guestmem.devices import virtio_console as hvc
from guestmem.devices import virtio_device as virtio
from guestmem.devices import virtio_mmio as mmio
from guestmem.saved_state import Reader, StateError, Writer
from test_devices_virtio_mmio import (
    BASE,
    DATA,
    RAM,
    SECTORS,
    SIZE,
    Line,
    kick,
    request,
    set_up,
    set_up_queues,
    status,
)
from virtq_driver import Driver


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


def fresh_block(
    mem: gm.GuestMemory, image: Path, *, read_only: bool = False
) -> tuple[mmio.MmioTransport, blk.VirtioBlock, Line]:
    """A transport and virtio-blk at reset, as a migration target builds them (unlocked)."""
    device = blk.VirtioBlock(mem, str(image), read_only=read_only, locked=False)
    line = Line()
    return mmio.MmioTransport(mem, device, line), device, line


def driven_block(
    mem: gm.GuestMemory, image: Path
) -> tuple[mmio.MmioTransport, blk.VirtioBlock, Driver]:
    """A virtio-blk that served three requests, its interrupt acked."""
    device = blk.VirtioBlock(mem, str(image))
    transport, driver, _ = set_up(mem, device)
    request(driver, blk.T_IN, 2, 512, writable=True)
    kick(transport)
    mem.write(DATA, b"\x5a" * 512, access=gm.Access.DEBUG)
    request(driver, blk.T_OUT, 7, 512, writable=False)
    request(driver, blk.T_FLUSH, 0, 0, writable=False, slot=1)
    kick(transport)
    assert driver.used_idx() == 3 and device.requests == 3
    transport.write(mmio.INTERRUPT_ACK, 4, mmio.INT_USED)
    return transport, device, driver


def test_a_restored_block_device_serves_the_drivers_next_request(
    mem: gm.GuestMemory, image: Path
) -> None:
    source, _, driver = driven_block(mem, image)
    saved = source.save_state()
    target, device, line = fresh_block(mem, image)
    target.load_state(saved)
    assert target.save_state() == saved
    assert target.read(mmio.STATUS, 4) == 0xF and device.requests == 3
    assert not line.changes  # nothing was pending: the line stays low
    driver.set_used_event(driver.used_idx())  # EVENT_IDX: interrupt me for the next one
    head = request(driver, blk.T_IN, 5, 1024, writable=True)
    kick(target)
    assert driver.used_idx() == 4 and driver.used_elem(3) == (head, 1025)
    assert status(mem) == blk.S_OK and device.requests == 4
    assert mem.read(DATA, 1024, access=gm.Access.DEBUG) == image.read_bytes()[2560:3584]
    assert line.level and target.read(mmio.INTERRUPT_STATUS, 4) == mmio.INT_USED


def test_a_restored_console_delivers_the_saved_backlog_and_keeps_transmitting(
    mem: gm.GuestMemory,
) -> None:
    out: list[bytes] = []
    source_console = hvc.VirtioConsole(mem, out.append)
    source, (receiveq, transmitq), _ = set_up_queues(mem, source_console)
    mem.write(DATA, b"before", access=gm.Access.DEBUG)
    transmitq.add([(DATA, 6, False)])
    source.write(mmio.QUEUE_NOTIFY, 4, hvc.TRANSMIT)
    source_console.receive(b"typed while no buffer was posted")
    saved = source.save_state()

    target_out: list[bytes] = []
    target_console = hvc.VirtioConsole(mem, target_out.append)
    target = mmio.MmioTransport(mem, target_console, Line())
    target.load_state(saved)
    assert target.save_state() == saved
    receiveq.add([(DATA + 0x100, 64, True)])
    target.write(mmio.QUEUE_NOTIFY, 4, hvc.RECEIVE)
    assert receiveq.used_idx() == 1 and receiveq.used_elem(0) == (0, 32)
    assert mem.read(DATA + 0x100, 32, access=gm.Access.DEBUG) == b"typed while no buffer was posted"
    mem.write(DATA, b"after", access=gm.Access.DEBUG)
    transmitq.add([(DATA, 5, False)])
    target.write(mmio.QUEUE_NOTIFY, 4, hvc.TRANSMIT)
    assert out == [b"before"] and target_out == [b"after"] and transmitq.used_idx() == 2


def test_a_transport_saved_before_driver_ok_is_restored_unactivated(
    mem: gm.GuestMemory, image: Path
) -> None:
    source, _, _ = fresh_block(mem, image)
    source.write(mmio.STATUS, 4, virtio.S_ACKNOWLEDGE | virtio.S_DRIVER)
    source.write(mmio.QUEUE_NUM, 4, 32)
    source.write(mmio.QUEUE_DESC_LOW, 4, 0x1234_5670)
    saved = source.save_state()
    target, _, line = fresh_block(mem, image)
    target.load_state(saved)
    assert target.save_state() == saved and target.queues == [] and not line.changes
    assert target.read(mmio.STATUS, 4) == virtio.S_ACKNOWLEDGE | virtio.S_DRIVER


def test_an_interrupt_the_guest_had_not_acked_is_raised_again(
    mem: gm.GuestMemory, image: Path
) -> None:
    device = blk.VirtioBlock(mem, str(image))
    source, driver, _ = set_up(mem, device)
    request(driver, blk.T_IN, 0, 512, writable=True)
    kick(source)
    assert source.read(mmio.INTERRUPT_STATUS, 4) == mmio.INT_USED  # not acked
    target, _, line = fresh_block(mem, image)
    target.load_state(source.save_state())
    assert line.changes == 1 and line.level
    assert target.read(mmio.INTERRUPT_STATUS, 4) == mmio.INT_USED
    target.write(mmio.INTERRUPT_ACK, 4, mmio.INT_USED)
    assert not line.level and line.changes == 2


def test_serve_queues_serves_a_request_made_available_but_never_kicked(
    mem: gm.GuestMemory, image: Path
) -> None:
    source, _, driver = driven_block(mem, image)
    driver.set_used_event(driver.used_idx())
    head = request(driver, blk.T_IN, 1, 512, writable=True)  # its kick was lost in an eventfd
    target, device, line = fresh_block(mem, image)
    target.load_state(source.save_state())
    assert driver.used_idx() == 3
    target.serve_queues()
    assert driver.used_idx() == 4 and driver.used_elem(3) == (head, 513)
    assert status(mem) == blk.S_OK and device.requests == 4 and line.level
    assert (target.kicks_by_exit, target.kicks_by_eventfd) == (0, 0)


def test_serve_queues_does_nothing_before_driver_ok(mem: gm.GuestMemory, image: Path) -> None:
    transport, device, line = fresh_block(mem, image)
    transport.serve_queues()
    assert device.requests == 0 and not line.changes


def test_loading_into_a_transport_not_at_reset_is_refused(mem: gm.GuestMemory, image: Path) -> None:
    source, _, _ = driven_block(mem, image)
    with pytest.raises(gm.UsageError, match="at reset"):
        source.load_state(source.save_state())


# ---- the PL011 ---------------------------------------------------------------------------


class Levels:
    """An interrupt line that records every level it is driven to."""

    def __init__(self) -> None:
        self.driven: list[bool] = []

    def __call__(self, level: bool) -> None:
        self.driven.append(level)


def busy_uart() -> pl011.Pl011:
    """A UART with a full FIFO, a backlog, the receive interrupt up and set registers."""
    uart = pl011.Pl011(lambda _data: None, lambda _level: None)
    uart.write(pl011.LCR_H, 4, 0x70)
    uart.write(pl011.IBRD, 4, 13)
    uart.write(pl011.IMSC, 4, pl011.INT_RX)
    uart.write(pl011.DR, 4, ord("x"))  # sets RIS.TX, masked
    uart.receive(bytes(range(20)))
    return uart


def test_a_restored_uart_has_the_fifo_backlog_registers_and_line_of_the_saved_one() -> None:
    saved = busy_uart().save_state()
    line = Levels()
    uart = pl011.Pl011(lambda _data: None, line)
    uart.load_state(saved)
    assert line.driven == [True]  # re-driven once: the new vGIC line starts low
    assert uart.save_state() == saved
    assert uart.read(pl011.LCR_H, 4) == 0x70 and uart.read(pl011.IBRD, 4) == 13
    assert uart.read(pl011.RIS, 4) == pl011.INT_RX | pl011.INT_TX
    assert uart.read(pl011.IMSC, 4) == pl011.INT_RX
    got = [uart.read(pl011.DR, 4) for _ in range(20)]
    assert got == list(range(20)) and uart.read(pl011.FR, 4) & pl011.FR_RXFE
    assert line.driven == [True, False]


def test_a_restored_quiet_uart_drives_its_line_low_once() -> None:
    line = Levels()
    uart = pl011.Pl011(lambda _data: None, line)
    uart.load_state(pl011.Pl011(lambda _data: None, lambda _level: None).save_state())
    assert line.driven == [False]


def uart_state(
    rx: bytes = bytes(16),
    backlog: bytes = b"",
    raw: int = pl011.INT_RX,
    mask: int = 0,
    level: int = 0,
    version: int = 1,
) -> bytes:
    """A UART state written field by field, as the format says."""
    out = Writer().u8(version).blob(rx).blob(backlog)
    for value in (0, 0, 0, 0, 0x300, 0x12, 0):  # ILPR IBRD FBRD LCR_H CR IFLS DMACR
        out.u64(value)
    return out.u16(raw).u16(mask).u8(level).bytes()


def test_the_uart_state_is_laid_out_as_documented() -> None:
    uart = pl011.Pl011(lambda _data: None, lambda _level: None)
    uart.receive(bytes(16))
    assert uart.save_state() == uart_state()


@pytest.mark.parametrize(
    ("state", "field"),
    [
        (uart_state(rx=bytes(17)), "receive FIFO"),
        (uart_state(backlog=b"x" * (pl011.BACKLOG_MAX + 1)), "backlog"),
        (uart_state(rx=bytes(3), backlog=b"x"), "FIFO not full"),
        (uart_state(raw=0), "RIS.RX"),
        (uart_state(raw=pl011.INT_RX | 1), "RIS"),
        (uart_state(mask=0x800), "IMSC"),
        (uart_state(mask=pl011.INT_RX), "line level"),
        (uart_state(level=2), "line's level"),
        (uart_state(version=2), "version"),
        (uart_state(version=0), "version"),
        (uart_state() + b"\0", "unexpected bytes"),
        (uart_state()[:-1], "truncated"),
    ],
    ids=[
        "fifo-too-long", "backlog-too-long", "backlog-behind-room", "rx-bit-without-data",
        "unknown-ris-bit", "unknown-imsc-bit", "level-not-ris-and-imsc", "level-not-a-flag",
        "newer-version", "version-0", "extended", "truncated",
    ],
)  # fmt: skip
def test_bad_uart_state_is_refused_and_changes_nothing(state: bytes, field: str) -> None:
    line = Levels()
    uart = busy_uart()
    uart._line = line
    before = uart.save_state()
    with pytest.raises(StateError, match=field):
        uart.load_state(state)
    assert uart.save_state() == before and line.driven == []


# ---- bad transport and device state ------------------------------------------------------

# The transport's fields for a one-queue device in order (and the indices
# of an active one), then the device's blob.
TRANSPORT_FIELDS = [
    ("version", "u8"), ("status", "u32"), ("device_sel", "u8"), ("driver_sel", "u8"),
    ("driver_features", "u64"), ("queue_sel", "u16"), ("queue_count", "u16"),
    ("size", "u32"), ("ready", "u8"), ("desc", "u64"), ("avail", "u64"), ("used", "u64"),
    ("interrupt", "u8"), ("generation", "u32"), ("last_avail", "u16"), ("used_idx", "u16"),
]  # fmt: skip
BLOCK_FIELDS = [("version", "u8"), ("capacity", "u64"), ("read_only", "u8"), ("requests", "u64")]
Fields = dict[str, int]


def decode_fields(reader: Reader, layout: list[tuple[str, str]]) -> Fields:
    return {name: getattr(reader, kind)() for name, kind in layout}


def encode_fields(out: Writer, layout: list[tuple[str, str]], fields: Fields) -> Writer:
    for name, kind in layout:
        getattr(out, kind)(fields[name])
    return out


def block_fields(state: bytes) -> tuple[Fields, Fields]:
    """The fields of an active one-queue transport's state and of its virtio-blk's."""
    reader = Reader(state)
    transport = decode_fields(reader, TRANSPORT_FIELDS)
    device = Reader(reader.blob())
    reader.end()
    fields = decode_fields(device, BLOCK_FIELDS)
    device.end()
    return transport, fields


def block_state(transport: Fields, device: Fields) -> bytes:
    blob = encode_fields(Writer(), BLOCK_FIELDS, device).bytes()
    return encode_fields(Writer(), TRANSPORT_FIELDS, transport).blob(blob).bytes()


def test_the_transport_state_is_laid_out_as_documented(mem: gm.GuestMemory, image: Path) -> None:
    source, _, driver = driven_block(mem, image)
    saved = source.save_state()
    transport, device = block_fields(saved)
    assert block_state(transport, device) == saved
    assert (transport["status"], transport["queue_count"], transport["size"]) == (0xF, 1, SIZE)
    assert (transport["desc"], transport["avail"], transport["used"]) == driver.rings()
    assert (transport["last_avail"], transport["used_idx"]) == (3, 3)
    assert device == {"version": 1, "capacity": SECTORS, "read_only": 0, "requests": 3}


def changed(**changes: int) -> Callable[[Fields, Fields], None]:
    def change(transport: Fields, device: Fields) -> None:
        for name, value in changes.items():
            where, _, field = name.partition("__")
            (transport if where == "t" else device)[field] = value

    return change


BAD_FIELDS = {
    "version-2": (changed(t__version=2), "transport state version 2"),
    "unknown-status-bit": (changed(t__status=0x1F), "Status"),
    "device-features-sel": (changed(t__device_sel=3), "DeviceFeaturesSel"),
    "driver-features-sel": (changed(t__driver_sel=3), "DriverFeaturesSel"),
    "feature-not-offered": (changed(t__driver_features=(1 << 32) | 1 << 40), "DriverFeatures"),
    "queue-sel": (changed(t__queue_sel=2), "QueueSel"),
    "queue-count": (changed(t__queue_count=2), "number of queues"),
    "queue-size-0": (changed(t__size=0), "QueueNum"),
    "queue-size-3": (changed(t__size=3), "QueueNum"),
    "queue-size-512": (changed(t__size=512), "QueueNum"),
    "queue-ready-2": (changed(t__ready=2), "QueueReady"),
    "ring-outside-ram": (changed(t__desc=BASE + RAM), "saved queues' rings"),
    "ring-misaligned": (changed(t__used=BASE + 0x2002), "saved queues' rings"),
    "interrupt-bit": (changed(t__interrupt=4), "InterruptStatus"),
    "too-many-in-flight": (changed(t__last_avail=3 + SIZE + 1), "in flight"),
    "used-ahead-of-avail": (changed(t__used_idx=4), "in flight"),
    "device-version": (changed(d__version=9), "virtio-blk state version"),
    "capacity": (changed(d__capacity=SECTORS * 2), "capacity"),
    "read-only": (changed(d__read_only=1), "read-only"),
    "read-only-not-a-flag": (changed(d__read_only=2), "read-only"),
}


@pytest.mark.parametrize("case", BAD_FIELDS, ids=list(BAD_FIELDS))
def test_an_out_of_range_field_is_refused_and_changes_nothing(
    mem: gm.GuestMemory, image: Path, case: str
) -> None:
    change, field = BAD_FIELDS[case]
    source, _, _ = driven_block(mem, image)
    transport, device = block_fields(source.save_state())
    change(transport, device)
    target, target_device, line = fresh_block(mem, image)
    before = target.save_state()
    with pytest.raises(StateError, match=field):
        target.load_state(block_state(transport, device))
    assert target.save_state() == before and target.queues == [] and not line.changes
    assert target_device._queue is None  # activated for the device's load, then reset


def test_every_truncation_and_an_extension_is_refused(mem: gm.GuestMemory, image: Path) -> None:
    source, _, _ = driven_block(mem, image)
    saved = source.save_state()
    target, _, _ = fresh_block(mem, image)
    before = target.save_state()
    for cut in range(len(saved)):
        with pytest.raises(StateError, match="truncated"):
            target.load_state(saved[:cut])
    with pytest.raises(StateError, match="unexpected bytes"):
        target.load_state(saved + b"\0")
    transport, device = block_fields(saved)
    blob = encode_fields(Writer(), BLOCK_FIELDS, device).u8(0).bytes()
    with pytest.raises(StateError, match="unexpected bytes"):
        target.load_state(encode_fields(Writer(), TRANSPORT_FIELDS, transport).blob(blob).bytes())
    assert target.save_state() == before


def test_errors_are_at_their_offset_in_the_whole_state_the_device_blobs_too(
    mem: gm.GuestMemory, image: Path
) -> None:
    source, _, _ = driven_block(mem, image)
    transport, device = block_fields(source.save_state())
    fields_end = len(encode_fields(Writer(), TRANSPORT_FIELDS, transport).bytes())
    target, target_device, _ = fresh_block(mem, image)
    at = 1000  # where the section would start in a machine's state
    bad_capacity = changed(d__capacity=SECTORS * 2)
    bad_capacity(transport, device)
    with pytest.raises(StateError, match="capacity") as caught:
        target.decode_state(Reader(block_state(transport, device), base=at))
    # Past the transport's fields, the blob's length, the version and the capacity.
    assert caught.value.offset == at + fields_end + 4 + 1 + 8
    transport, device = block_fields(source.save_state())
    transport["used"] = BASE + RAM
    with pytest.raises(StateError, match="saved queues' rings") as caught:
        target.decode_state(Reader(block_state(transport, device), base=at))
    assert caught.value.offset == at + 19  # queue 0's QueueNum, where its record starts
    with pytest.raises(StateError, match="line level") as caught:
        target_uart = pl011.Pl011(lambda _data: None, Levels())
        target_uart.decode_state(Reader(uart_state(mask=pl011.INT_RX), base=at))
    assert caught.value.offset == len(uart_state()) - 1 + at
    assert target.status == 0 and target_device._queue is None


@pytest.mark.parametrize(
    ("sectors", "read_only", "field"),
    [(SECTORS - 1, False, "capacity in sectors"), (SECTORS, True, "read-only")],
    ids=["smaller-disk", "read-only-disk"],
)
def test_a_disk_of_another_shape_is_refused(
    mem: gm.GuestMemory, image: Path, tmp_path: Path, sectors: int, read_only: bool, field: str
) -> None:
    source, _, _ = driven_block(mem, image)
    other = tmp_path / "other.img"
    other.write_bytes(image.read_bytes()[: sectors * blk.SECTOR])
    target, _, _ = fresh_block(mem, other, read_only=read_only)
    before = target.save_state()
    with pytest.raises(StateError, match=field):
        target.load_state(source.save_state())
    assert target.save_state() == before


def test_a_console_backlog_over_the_limit_is_refused(mem: gm.GuestMemory) -> None:
    console = hvc.VirtioConsole(mem, lambda _data: None)
    console.receive(b"kept")
    before = console.save_state()
    too_long = Writer().u8(1).blob(b"x" * (hvc.BACKLOG_MAX + 1)).bytes()
    with pytest.raises(StateError, match="input backlog"):
        console.decode_state(Reader(too_long))
    with pytest.raises(StateError, match="virtio-console state version"):
        console.decode_state(Reader(Writer().u8(2).blob(b"").bytes()))
    assert console.save_state() == before


# ---- fuzz: mutated and truncated states ------------------------------------------------

Mutation = tuple[list[tuple[int, int]], int | None, bytes]
mutations = st.tuples(
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4),
    st.none() | st.integers(0, 120),
    st.binary(max_size=4),
)


def mutate(state: bytes, mutation: Mutation) -> bytes:
    """``state`` with some bytes replaced, maybe cut short, maybe extended."""
    replacements, keep, tail = mutation
    data = bytearray(state)
    for at, value in replacements:
        data[at % len(data)] = value
    return bytes(data[:keep]) + tail


def load_or_refuse(target: mmio.MmioTransport | pl011.Pl011, data: bytes) -> None:
    """Load ``data``: refused with nothing changed, or taken whole (it saves back the same)."""
    before = target.save_state()
    try:
        target.load_state(data)
    except StateError:
        assert target.save_state() == before
    else:
        assert target.save_state() == data


@given(mutation=mutations)
def test_a_mutated_transport_state_is_taken_whole_or_refused_unchanged(
    mem: gm.GuestMemory, image: Path, mutation: Mutation
) -> None:
    source, source_device, _ = driven_block(mem, image)
    target, device, _ = fresh_block(mem, image)
    load_or_refuse(target, mutate(source.save_state(), mutation))
    source_device.close()
    device.close()


@given(mutation=mutations)
def test_a_mutated_uart_state_is_taken_whole_or_refused_unchanged(mutation: Mutation) -> None:
    saved = busy_uart().save_state()
    load_or_refuse(pl011.Pl011(lambda _data: None, Levels()), mutate(saved, mutation))
