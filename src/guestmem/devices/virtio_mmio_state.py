"""The saved state of a virtio-mmio transport: its registers, its rings' indices, its device's.

Payload (version 1)::

    version u8 | Status u32 | DeviceFeaturesSel u8 | DriverFeaturesSel u8
    DriverFeatures u64 | QueueSel u16 | queue count u16
    per queue: QueueNum u32 | QueueReady u8 | desc, avail, used addresses u64
    InterruptStatus u8 | ConfigGeneration u32
    per queue, when the device is active: last avail index u16 | used index u16
    the device's own payload (blob)

:func:`decode_state` checks all of it, the rings against guest memory and
the device's payload too, and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import guestmem as gm
from guestmem.devices.virtio_device import F_EVENT_IDX, STATUS_BITS, VirtioDevice, is_active
from guestmem.saved_state import Reader, StateError
from guestmem.virtio import SplitQueue

STATE_VERSION = 1
QUEUE_SIZE_MAX = 256
INT_USED, INT_CONFIG = 1, 2
# A feature selector past the 64 feature bits reads 0 and takes no write,
# whatever its value: the saved state keeps them all as this one.
FEATURES_SEL_PAST = 2
RINGS = ("desc", "avail", "used")


@dataclass(frozen=True)
class QueueState:
    """One queue's registers as the driver set them: QueueNum, QueueReady, ring addresses."""

    size: int
    ready: bool
    desc: int
    avail: int
    used: int


@dataclass(frozen=True)
class TransportState:
    """A transport's checked state and its device's (what the device's decode returned)."""

    status: int
    device_features_sel: int
    driver_features_sel: int
    driver_features: int
    queue_sel: int
    queues: tuple[QueueState, ...]
    interrupt: int
    generation: int
    indices: tuple[tuple[int, int], ...]  # (last_avail_idx, used_idx) of an active device's rings
    device: object

    @property
    def active(self) -> bool:
        """Whether the saved device was running (DRIVER_OK, not NEEDS_RESET)."""
        return is_active(self.status)


def decode_state(
    reader: Reader, queue_count: int, offered: int, memory: gm.GuestMemory, device: VirtioDevice
) -> TransportState:
    """Read and check a transport's payload for ``queue_count`` queues offering ``offered``.

    StateError at its offset in the whole state for anything the transport
    (and ``device``, whose ``decode_state`` reads its own payload) could not have been.
    """
    reader.version("the virtio-mmio transport", STATE_VERSION)
    status = _read_bits(reader, reader.u32, "Status", STATUS_BITS)
    device_sel = _read_at_most(reader, reader.u8, "DeviceFeaturesSel", FEATURES_SEL_PAST)
    driver_sel = _read_at_most(reader, reader.u8, "DriverFeaturesSel", FEATURES_SEL_PAST)
    driver_features = _read_bits(reader, reader.u64, "DriverFeatures", offered)
    queue_sel = _read_at_most(reader, reader.u16, "QueueSel", queue_count)
    reader.expect("the number of queues", reader.u16("the number of queues"), queue_count)
    active = is_active(status)
    event_idx = bool(driver_features & F_EVENT_IDX)
    queues = []
    for index in range(queue_count):
        at = reader.offset
        queue = _parse_queue(reader, index)
        if active:
            _check_rings(memory, queue, event_idx, at)
        queues.append(queue)
    interrupt = _read_bits(reader, reader.u8, "InterruptStatus", INT_USED | INT_CONFIG)
    generation = reader.u32("ConfigGeneration")
    indices = tuple(_parse_indices(reader, i, q.size) for i, q in enumerate(queues) if active)
    device_state = device.decode_state(reader.nested("the device's state"))
    reader.end()
    return TransportState(
        status, device_sel, driver_sel, driver_features, queue_sel, tuple(queues),
        interrupt, generation, indices, device_state,
    )  # fmt: skip


def _parse_queue(reader: Reader, index: int) -> QueueState:
    size = reader.u32(f"queue {index}'s QueueNum")
    if not 0 < size <= QUEUE_SIZE_MAX or size & (size - 1):
        raise reader.error(
            f"queue {index}'s QueueNum {size} is not a power of two in 1..{QUEUE_SIZE_MAX}"
        )
    ready = reader.flag(f"queue {index}'s QueueReady")
    desc, avail, used = (reader.u64(f"queue {index}'s {ring} ring address") for ring in RINGS)
    return QueueState(size, ready, desc, avail, used)


def _check_rings(memory: gm.GuestMemory, queue: QueueState, event_idx: bool, at: int) -> None:
    """Refuse rings an active device could not have had: the queue DRIVER_OK would build."""
    try:
        SplitQueue(memory, queue.size, queue.desc, queue.avail, queue.used, event_idx=event_idx)
    except gm.GuestMemoryError as error:
        raise StateError(at, f"the saved queues' rings: {error}") from error


def _parse_indices(reader: Reader, index: int, size: int) -> tuple[int, int]:
    last_avail = reader.u16(f"queue {index}'s last avail index")
    used = reader.u16(f"queue {index}'s used index")
    in_flight = (last_avail - used) & 0xFFFF
    if in_flight > size:
        raise reader.error(f"queue {index} has {in_flight} chains in flight, more than its {size}")
    return last_avail, used


def _read_bits(reader: Reader, read: Callable[[str], int], name: str, allowed: int) -> int:
    value = read(name)
    if value & ~allowed:
        raise reader.error(f"{name} is {value:#x}: bits outside {allowed:#x}")
    return value


def _read_at_most(reader: Reader, read: Callable[[str], int], name: str, limit: int) -> int:
    value = read(name)
    if value > limit:
        raise reader.error(f"{name} is {value}, more than {limit}")
    return value
