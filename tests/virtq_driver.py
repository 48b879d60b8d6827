"""A synthetic virtio driver: lays out split rings in guest memory and adds chains.

What a guest kernel's virtio_ring does, in Python, through routes that never
fault (the rings may be tagged): for testing the device side.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import guestmem as gm
from guestmem.virtio import SplitQueue

NEXT, WRITE, INDIRECT = 1, 2, 4
NO_INTERRUPT = 1
Buffer = tuple[int, int, bool]  # (gpa, length, device-writable)


def ring_sizes(size: int) -> tuple[int, int, int]:
    """Bytes of the descriptor table, the available ring and the used ring."""
    return 16 * size, 6 + 2 * size, 6 + 8 * size


class Driver:
    """The driver side of one split queue whose rings start at ``base``."""

    def __init__(self, mem: gm.GuestMemory, size: int, base: int) -> None:
        self.mem = mem
        self.size = size
        desc_len, avail_len, _ = ring_sizes(size)
        self.desc = base
        self.avail = base + desc_len
        self.used = (self.avail + avail_len + 3) & ~3
        self.avail_idx = 0
        self.next_free = 0
        self.zero()

    def zero(self) -> None:
        """Clear all three rings (a fresh queue)."""
        _, _, used_len = ring_sizes(self.size)
        self.mem.fill(self.desc, self.used + used_len - self.desc, 0, access=gm.Access.DEBUG)
        self.avail_idx = 0
        self.next_free = 0

    def rings(self) -> tuple[int, int, int]:
        """The three ring GPAs, as a device is told them."""
        return self.desc, self.avail, self.used

    def _write(self, gpa: int, data: bytes) -> None:
        self.mem.write(gpa, data, access=gm.Access.DEBUG)

    def _read(self, gpa: int, n: int) -> bytes:
        return self.mem.read(gpa, n, access=gm.Access.DEBUG)

    def set_desc(
        self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int | None = None
    ) -> None:
        """Write descriptor ``i`` of the queue's table (or of the table at ``table``)."""
        at = (self.desc if table is None else table) + 16 * i
        self._write(at, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int, *, idx: int | None = None) -> None:
        """Put ``head`` in the next avail slot and advance avail idx (or set it to ``idx``)."""
        self._write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx if idx is None else idx)

    def set_avail_idx(self, idx: int) -> None:
        self._write(self.avail + 2, struct.pack("<H", idx & 0xFFFF))

    def set_avail_flags(self, flags: int) -> None:
        self._write(self.avail, struct.pack("<H", flags))

    def set_used_event(self, value: int) -> None:
        self._write(self.avail + 4 + 2 * self.size, struct.pack("<H", value & 0xFFFF))

    def add(self, buffers: Sequence[Buffer]) -> int:
        """A direct chain of ``buffers`` in free descriptors; returns and publishes its head."""
        ids = [(self.next_free + k) % self.size for k in range(len(buffers))]
        self.next_free = (self.next_free + len(buffers)) % self.size
        for k, (addr, length, writable) in enumerate(buffers):
            last = k == len(buffers) - 1
            flags = (0 if last else NEXT) | (WRITE if writable else 0)
            self.set_desc(ids[k], addr, length, flags, 0 if last else ids[k + 1])
        self.publish(ids[0])
        return ids[0]

    def add_indirect(self, buffers: Sequence[Buffer], table: int) -> int:
        """A chain of one descriptor pointing to an indirect table at ``table``."""
        for k, (addr, length, writable) in enumerate(buffers):
            last = k == len(buffers) - 1
            flags = (0 if last else NEXT) | (WRITE if writable else 0)
            self.set_desc(k, addr, length, flags, 0 if last else k + 1, table=table)
        head = self.next_free
        self.next_free = (self.next_free + 1) % self.size
        self.set_desc(head, table, 16 * len(buffers), INDIRECT)
        self.publish(head)
        return head

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self._read(self.used + 2, 2))[0])

    def used_elem(self, i: int) -> tuple[int, int]:
        at = self.used + 4 + 8 * (i % self.size)
        return struct.unpack("<II", self._read(at, 8))

    def avail_event(self) -> int:
        return int(struct.unpack("<H", self._read(self.used + 4 + 8 * self.size, 2))[0])

    def used_ring(self) -> bytes:
        return self._read(self.used, ring_sizes(self.size)[2])

    def queue(self, *, event_idx: bool = False) -> SplitQueue:
        """The device's queue over these rings."""
        return SplitQueue(self.mem, self.size, *self.rings(), event_idx=event_idx)
