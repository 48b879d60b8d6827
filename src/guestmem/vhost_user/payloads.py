"""The payloads of the requests this backend serves, decoded with their sizes checked.

Each decoder takes a :class:`~guestmem.vhost_user.wire.Message` and raises
MessageError when the payload is not exactly the request's shape.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from guestmem.vhost_user.errors import MemoryTableError, MessageError
from guestmem.vhost_user.protocol import (
    CONFIG_HEADER,
    LOG,
    MAX_CONFIG,
    MAX_REGIONS,
    MEMORY_HEADER,
    REGION,
    U64,
    VRING_ADDR,
    VRING_STATE,
)
from guestmem.vhost_user.wire import Message


@dataclass(frozen=True)
class RegionDescription:
    """One memory region as the frontend describes it."""

    gpa: int
    size: int
    user_address: int
    mmap_offset: int


@dataclass(frozen=True)
class VringAddresses:
    """SET_VRING_ADDR: a ring's three parts as frontend user addresses, its flags, its log GPA."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True)
class ConfigAccess:
    """GET_CONFIG / SET_CONFIG: a range of the device's configuration space."""

    offset: int
    size: int
    flags: int
    data: bytes


def _exact(message: Message, shape: struct.Struct) -> tuple[int, ...]:
    if len(message.payload) != shape.size:
        raise MessageError(
            f"{message.name}: a payload of {len(message.payload)} bytes, not {shape.size}",
            request=message.request,
        )
    return shape.unpack(message.payload)


def empty(message: Message) -> None:
    """A request without a payload; MessageError if one came."""
    if message.payload:
        raise MessageError(
            f"{message.name}: takes no payload, got {len(message.payload)} bytes",
            request=message.request,
        )


def u64(message: Message) -> int:
    """A single 64-bit integer."""
    return _exact(message, U64)[0]


def vring_state(message: Message) -> tuple[int, int]:
    """``(index, num)``."""
    index, num = _exact(message, VRING_STATE)
    return index, num


def vring_addresses(message: Message) -> VringAddresses:
    """SET_VRING_ADDR's payload."""
    return VringAddresses(*_exact(message, VRING_ADDR))


def log(message: Message) -> tuple[int, int]:
    """SET_LOG_BASE's ``(size, offset)``."""
    size, offset = _exact(message, LOG)
    return size, offset


def memory_table(message: Message) -> list[RegionDescription]:
    """SET_MEM_TABLE's regions: 1 to 8 of them, and exactly that many region entries."""
    payload = message.payload
    if len(payload) < MEMORY_HEADER.size:
        raise MessageError(
            f"{message.name}: a payload of {len(payload)} bytes has no region count",
            request=message.request,
        )
    count, _padding = MEMORY_HEADER.unpack_from(payload)
    if not 1 <= count <= MAX_REGIONS:
        raise MemoryTableError(
            f"{message.name}: {count} regions (1 to {MAX_REGIONS})", request=message.request
        )
    expected = MEMORY_HEADER.size + count * REGION.size
    if len(payload) != expected:
        raise MessageError(
            f"{message.name}: {count} regions take {expected} bytes, not {len(payload)}",
            request=message.request,
        )
    return [
        RegionDescription(*REGION.unpack_from(payload, MEMORY_HEADER.size + i * REGION.size))
        for i in range(count)
    ]


def config(message: Message, *, with_data: bool) -> ConfigAccess:
    """GET_CONFIG / SET_CONFIG: a header and ``size`` bytes (GET_CONFIG: the frontend's buffer)."""
    payload = message.payload
    if len(payload) < CONFIG_HEADER.size:
        raise MessageError(
            f"{message.name}: a payload of {len(payload)} bytes has no config header",
            request=message.request,
        )
    offset, size, flags = CONFIG_HEADER.unpack_from(payload)
    if offset > MAX_CONFIG or size > MAX_CONFIG - offset:
        raise MessageError(
            f"{message.name}: [{offset}, {offset + size}) is outside the config space "
            f"(at most {MAX_CONFIG} bytes)",
            request=message.request,
        )
    if len(payload) != CONFIG_HEADER.size + size:
        raise MessageError(
            f"{message.name}: {size} config bytes take {CONFIG_HEADER.size + size} bytes, "
            f"not {len(payload)}",
            request=message.request,
        )
    data = payload[CONFIG_HEADER.size :] if with_data else b""
    return ConfigAccess(offset, size, flags, data)


def single_region(message: Message) -> RegionDescription:
    """ADD_MEM_REG / REM_MEM_REG: 8 bytes of padding and one region."""
    if len(message.payload) != 8 + REGION.size:
        raise MessageError(
            f"{message.name}: a payload of {len(message.payload)} bytes, not {8 + REGION.size}",
            request=message.request,
        )
    return RegionDescription(*REGION.unpack_from(message.payload, 8))
