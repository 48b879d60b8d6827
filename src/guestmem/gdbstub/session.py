"""A session over guest physical memory: the library stub's target.

Memory goes through the DEBUG access class (never faults, tags kept);
allocation tags through ``get_tags``/``set_tags``. GDB sends tagged pointers,
so the top byte of every address is dropped. Errors are answered as in
:mod:`~guestmem.gdbstub.commands`, plus ``E0d`` (EACCES) for a write in
read-only mode and ``E26`` (ENOSYS) for breakpoints and watchpoints (there
is no run control). Nothing is changed by a packet that fails.

Nothing runs and nothing dies: ``k``, ``vKill`` and ``D`` all detach and
leave the guest exactly as it is.
"""

from __future__ import annotations

import numpy as np

from guestmem.errors import AddressError
from guestmem.gdbstub import target
from guestmem.gdbstub.commands import (
    E_NO_RUN_CONTROL,
    E_READ_ONLY,
    CommandSession,
    InvalidRequest,
    parse_hex,
    proc_files,
    xfer,
)
from guestmem.gdbstub.memory_commands import MemoryCommands
from guestmem.gdbstub.packets import PACKET_SIZE
from guestmem.gdbstub.smaps import maps_text, memory_map_xml, region_info, smaps_text
from guestmem.gdbstub.target import RegisterProvider
from guestmem.kinds import Access, TagMode
from guestmem.memory import GuestMemory
from guestmem.units import GRANULE

ADDRESS_MASK = (1 << 56) - 1  # bits 63:56 carry the logical tag, not the address
SUPPORTED = (
    f"PacketSize={PACKET_SIZE:x};QStartNoAckMode+;qXfer:features:read+;"
    "qXfer:memory-map:read+;multiprocess+;memory-tagging+;vContSupported-"
).encode()
_WRITES = (b"M", b"X", b"QMemTags:")
_BREAKPOINTS = (b"Z", b"z")


class PhysicalTags:
    """The allocation tags of ``count`` granules from guest physical ``first``."""

    def __init__(self, memory: GuestMemory, first: int, count: int) -> None:
        """Name the range; nothing is checked until it is read or written."""
        self.memory, self.first, self.count = memory, first, count

    def read(self) -> bytes:
        """One tag per granule."""
        return self.memory.get_tags(self.first, self.count * GRANULE).tobytes()

    def write(self, pattern: np.ndarray) -> None:
        """``pattern`` repeated over the range."""
        self.memory.set_tags(self.first, self.count * GRANULE, np.resize(pattern, self.count))


class PhysicalMemory:
    """Guest physical memory as a :class:`~guestmem.gdbstub.memory_commands.MemoryTarget`."""

    def __init__(self, memory: GuestMemory) -> None:
        """Serve ``memory``."""
        self.memory = memory

    def strip(self, address: int) -> int:
        """The GPA: the top byte dropped."""
        return address & ADDRESS_MASK

    def read(self, address: int, length: int) -> bytes:
        """Up to the end of the region ``address`` lies in."""
        region = self.memory.find_region(address)
        length = min(length, region.end - address)
        return self.memory.read(address, length, access=Access.DEBUG)

    def write(self, address: int, data: bytes) -> None:
        """Through the DEBUG access class."""
        self.memory.write(address, data, access=Access.DEBUG)

    def tags(self, first: int, count: int) -> PhysicalTags:
        """The tags of ``count`` granules from ``first``."""
        return PhysicalTags(self.memory, first, count)

    def is_tagged(self, address: int) -> bool:
        """Whether ``address`` is guest memory with tags."""
        if self.memory.tag_mode is TagMode.NONE:
            return False
        try:
            self.memory.find_region(address)
        except AddressError:
            return False
        return True


class Session(CommandSession):
    """The state of one connection to the library stub."""

    def __init__(
        self,
        memory: GuestMemory,
        registers: RegisterProvider,
        pid: int,
        *,
        read_only: bool = False,
    ) -> None:
        """Serve ``memory``; ``pid`` names the process GDB believes it debugs.

        ``read_only`` refuses every write to memory or tags with ``E0d``.
        """
        super().__init__(pid)
        self.memory = memory
        self.registers = registers
        self.read_only = read_only
        thread = f"p{pid:x}.1".encode()
        stop_reply = b"T05thread:" + thread + b";"
        self.fixed = {
            b"?": lambda: stop_reply,
            b"g": lambda: target.all_registers_hex(self.registers()).encode(),
            b"qC": lambda: b"QC" + thread,
            b"qfThreadInfo": lambda: b"m" + thread,
            b"qsThreadInfo": lambda: b"l",
            b"qAttached": lambda: b"1",
        }
        self.commands = [
            (b"qSupported", lambda _: SUPPORTED),
            (b"QStartNoAckMode", self.start_no_ack),
            (b"qAttached:", self._attached),
            (b"qXfer:features:read:", lambda a: xfer(a, {b"target.xml": target.TARGET_XML})),
            (b"qXfer:memory-map:read:", lambda a: xfer(a, {b"": memory_map_xml(self.memory)})),
            (b"qMemoryRegionInfo:", self._region_info),
            (b"vFile:", self._vfile),
            *MemoryCommands(PhysicalMemory(memory)).table(),
            (b"p", self._read_register),
            (b"H", lambda _: b"OK"),
            (b"T", lambda _: b"OK"),
            (b"c", lambda _: stop_reply),
            (b"s", lambda _: stop_reply),
        ]

    def handle(self, payload: bytes) -> bytes | None:
        """The reply to one packet, or None when the session ends without one."""
        if payload == b"k":
            self.ended = True  # a detach: the guest goes on as it was
            return None
        if payload[:1] == b"D" or payload.startswith(b"vKill"):
            self.ended = True
            return b"OK"
        if payload[:1] in _BREAKPOINTS:
            return E_NO_RUN_CONTROL  # an empty reply would make GDB write BRKs itself
        if self.read_only and payload.startswith(_WRITES):
            return E_READ_ONLY
        return self.dispatch(payload)

    def _read_register(self, args: bytes) -> bytes:
        number = parse_hex(args, "register number")
        if number >= len(target.REGISTERS):
            raise InvalidRequest(f"no register {number}")
        return target.register_hex(self.registers(), number).encode()

    def _region_info(self, args: bytes) -> bytes:
        return region_info(self.memory, parse_hex(args, "address"))

    def _attached(self, args: bytes) -> bytes:
        if parse_hex(args, "pid") != self.pid:
            raise InvalidRequest(f"no process {args[:20]!r} here")
        return b"1"

    def _vfile(self, args: bytes) -> bytes:
        files = {"smaps": lambda: smaps_text(self.memory), "maps": lambda: maps_text(self.memory)}
        return self.vfile(args, proc_files(self.pid, files))
