"""The memory and memory-tag commands (``m M X qMemTags QMemTags qIsAddressTagged``).

They parse the packet and leave the addresses to a :class:`MemoryTarget`:
guest physical memory for the library stub, guest virtual memory through a
vCPU's stage 1 for a running guest. GDB sends tagged pointers; the target
says what its address is without the tag byte (:meth:`MemoryTarget.strip`).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from guestmem.errors import ProtocolError
from guestmem.gdbstub.commands import (
    MAX_READ,
    Command,
    InvalidRequest,
    parse_hex,
    parse_hex_bytes,
    split_fields,
)
from guestmem.gdbstub.packets import unescape
from guestmem.units import GRANULE

MAX_TAGS = 1 << 20  # granules in one qMemTags reply (16 MiB of memory)
ALLOCATION_TAG = 1  # the only tag type GDB asks for


class TagAccess(Protocol):
    """The allocation tags of a granule-aligned range, found before they are touched."""

    def read(self) -> bytes:
        """One tag per granule, in order."""

    def write(self, pattern: np.ndarray) -> None:
        """Set the tags to ``pattern`` repeated over the range; all or nothing."""


class MemoryTarget(Protocol):
    """Memory as a session addresses it."""

    def strip(self, address: int) -> int:
        """``address`` as GDB sent it, without its tag byte."""

    def read(self, address: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``address``: fewer where the mapping ends, never none."""

    def write(self, address: int, data: bytes) -> None:
        """Write ``data`` at ``address``; all or nothing."""

    def tags(self, first: int, count: int) -> TagAccess:
        """The tags of ``count`` granules from ``first`` (granule-aligned)."""

    def is_tagged(self, address: int) -> bool:
        """Whether ``address`` is memory with allocation tags."""


class MemoryCommands:
    """The memory and tag commands of one session over ``target``."""

    def __init__(self, target: MemoryTarget) -> None:
        """Serve ``target``."""
        self.target = target

    def table(self) -> list[tuple[bytes, Command]]:
        """(prefix, command) for :attr:`~guestmem.gdbstub.commands.CommandSession.commands`."""
        return [
            (b"qMemTags:", self.read_tags),
            (b"QMemTags:", self.write_tags),
            (b"qIsAddressTagged:", self.is_tagged),
            (b"m", self.read),
            (b"M", self.write_hex),
            (b"X", self.write_binary),
        ]

    def address_length(self, text: bytes) -> tuple[int, int]:
        """``ADDR,LENGTH``: the address without its tag byte, and the length."""
        address, length = split_fields(text, b",", 2, "address,length")
        return self.target.strip(parse_hex(address, "address")), parse_hex(length, "length")

    def read(self, args: bytes) -> bytes:
        """``m ADDR,LENGTH``: the bytes as hex (fewer where the mapping ends)."""
        address, length = self.address_length(args)
        if length == 0:
            return b""
        return self.target.read(address, min(length, MAX_READ)).hex().encode()

    def _write(self, address: int, length: int, data: bytes) -> bytes:
        if len(data) != length:
            raise ProtocolError(f"{length} bytes announced, {len(data)} sent")
        self.target.write(address, data)
        return b"OK"

    def write_hex(self, args: bytes) -> bytes:
        """``M ADDR,LENGTH:HEX``."""
        where, data = split_fields(args, b":", 2, "M packet")
        address, length = self.address_length(where)
        return self._write(address, length, parse_hex_bytes(data, "M data"))

    def write_binary(self, args: bytes) -> bytes:
        """``X ADDR,LENGTH:BINARY``."""
        where, data = split_fields(args, b":", 2, "X packet")
        address, length = self.address_length(where)
        return self._write(address, length, unescape(data))

    def _granules(self, args: bytes) -> tuple[TagAccess, bytes]:
        """The tags ``ADDR,LEN:TYPE[:...]`` names, and the rest after the type."""
        where, rest = split_fields(args, b":", 2, "tag packet")
        address, length = self.address_length(where)
        kind, _, tail = rest.partition(b":")
        if parse_hex(kind, "tag type") != ALLOCATION_TAG:
            raise InvalidRequest("only allocation tags (type 1) exist")
        first = address - address % GRANULE
        count = max(1, -(-(address + length - first) // GRANULE))
        if count > MAX_TAGS:
            raise InvalidRequest(f"{count} granules exceed {MAX_TAGS} in one packet")
        return self.target.tags(first, count), tail

    def read_tags(self, args: bytes) -> bytes:
        """``qMemTags:ADDR,LEN:1``: ``m`` and one tag per granule as hex."""
        tags, _ = self._granules(args)
        return b"m" + tags.read().hex().encode()

    def write_tags(self, args: bytes) -> bytes:
        """``QMemTags:ADDR,LEN:1:TAGS``: a short pattern repeats over the range, as in GDB."""
        tags, tail = self._granules(args)
        pattern = np.frombuffer(parse_hex_bytes(tail, "QMemTags tags"), dtype=np.uint8)
        if pattern.size == 0:
            raise InvalidRequest("QMemTags without tags")
        tags.write(pattern)
        return b"OK"

    def is_tagged(self, args: bytes) -> bytes:
        """``qIsAddressTagged:ADDR``: ``01`` or ``00``."""
        address = self.target.strip(parse_hex(args, "address"))
        return b"01" if self.target.is_tagged(address) else b"00"
