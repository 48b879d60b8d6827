"""One GDB session's commands: packet payload in, reply payload out.

Memory goes through the DEBUG access class (never faults, tags kept);
allocation tags through ``get_tags``/``set_tags``. GDB sends tagged pointers,
so the top byte of every address is dropped. Replies follow gdbserver:
``E01`` for a malformed packet, ``E0e`` (EFAULT) for addresses outside guest
memory, ``E16`` (EINVAL) for bad tags, tag types and lengths, ``E0d``
(EACCES) for a write in read-only mode, ``E26`` (ENOSYS) for breakpoints and
watchpoints (there is no run control), and the empty reply for anything not
supported. Nothing is changed by a packet that fails.

Nothing runs and nothing dies: ``k``, ``vKill`` and ``D`` all detach and
leave the guest exactly as it is.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable

import numpy as np

from guestmem.errors import AddressError, GuestMemoryError, ProtocolError, TagsBusyError
from guestmem.gdbstub import target
from guestmem.gdbstub.packets import PACKET_SIZE, escape, unescape
from guestmem.gdbstub.smaps import maps_text, memory_map_xml, region_info, smaps_text
from guestmem.gdbstub.target import RegisterProvider
from guestmem.kinds import Access, TagMode
from guestmem.memory import GuestMemory
from guestmem.units import GRANULE

log = logging.getLogger(__name__)

ADDRESS_MASK = (1 << 56) - 1  # bits 63:56 carry the logical tag, not the address
MAX_READ = (PACKET_SIZE - 8) // 2  # bytes in one m reply; GDB asks again for the rest
MAX_TAGS = 1 << 20  # granules in one qMemTags reply (16 MiB of memory)
ALLOCATION_TAG = 1
FIRST_FD = 100
MAX_OPEN_FILES = 16  # vFile handles one session may hold; more get EMFILE
E_MALFORMED, E_FAULT, E_INVALID = b"E01", b"E0e", b"E16"
E_READ_ONLY, E_NO_RUN_CONTROL = b"E0d", b"E26"  # EACCES, ENOSYS
E_BUSY = b"E10"  # EBUSY: KVM writes no tags during a live migration
ENOENT, EBADF, EACCES, EMFILE = 2, 9, 13, 24
SUPPORTED = (
    f"PacketSize={PACKET_SIZE:x};QStartNoAckMode+;qXfer:features:read+;"
    "qXfer:memory-map:read+;multiprocess+;memory-tagging+;vContSupported-"
).encode()
_WRITES = (b"M", b"X", b"QMemTags:")
_BREAKPOINTS = (b"Z", b"z")


class InvalidRequest(GuestMemoryError, ValueError):
    """A well-formed packet asking for something invalid (answered ``E16``)."""


def parse_hex(text: bytes, what: str) -> int:
    """A hex number of at most 16 digits."""
    if not 0 < len(text) <= 16 or not all(chr(c) in "0123456789abcdefABCDEF" for c in text):
        raise ProtocolError(f"{what} {text[:20]!r} is not a hex number")
    return int(text, 16)


def split_fields(text: bytes, separator: bytes, count: int, what: str) -> list[bytes]:
    """Exactly ``count`` fields of ``text``."""
    fields = text.split(separator, count - 1)
    if len(fields) != count:
        raise ProtocolError(f"{what}: expected {count} fields, got {len(fields)}")
    return fields


class Session:
    """The state of one connection: ack mode, open files, whether it has ended."""

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
        self.memory = memory
        self.registers = registers
        self.pid = pid
        self.read_only = read_only
        self.no_ack = False
        self.ended = False
        self._files: dict[int, bytes] = {}
        thread = f"p{pid:x}.1".encode()
        self._stop_reply = b"T05thread:" + thread + b";"
        self._fixed: dict[bytes, bytes] = {
            b"?": self._stop_reply,
            b"qC": b"QC" + thread,
            b"qfThreadInfo": b"m" + thread,
            b"qsThreadInfo": b"l",
            b"qAttached": b"1",
        }
        self._prefixed: list[tuple[bytes, Callable[[bytes], bytes]]] = [
            (b"qSupported", lambda _: SUPPORTED),
            (b"QStartNoAckMode", self._start_no_ack),
            (b"qAttached:", self._attached),
            (b"qXfer:features:read:", self._features),
            (b"qXfer:memory-map:read:", self._memory_map),
            (b"qMemoryRegionInfo:", self._region_info),
            (b"qMemTags:", self._read_tags),
            (b"QMemTags:", self._write_tags),
            (b"qIsAddressTagged:", self._is_tagged),
            (b"vFile:", self._vfile),
            (b"m", self._read_memory),
            (b"M", self._write_memory_hex),
            (b"X", self._write_memory_binary),
            (b"p", self._read_register),
            (b"H", lambda _: b"OK"),
            (b"T", lambda _: b"OK"),
            (b"c", lambda _: self._stop_reply),
            (b"s", lambda _: self._stop_reply),
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
        if payload == b"g":
            return target.all_registers_hex(self.registers()).encode()
        if payload in self._fixed:
            return self._fixed[payload]
        for prefix, command in self._prefixed:
            if payload.startswith(prefix):
                return self._answer(command, payload[len(prefix) :])
        return b""

    def _answer(self, command: Callable[[bytes], bytes], args: bytes) -> bytes:
        try:
            return command(args)
        except ProtocolError as error:
            log.info("malformed packet: %s", error)
            return E_MALFORMED
        except AddressError as error:
            log.info("outside guest memory: %s", error)
            return E_FAULT
        except TagsBusyError as error:
            log.info("busy: %s", error)
            return E_BUSY
        except GuestMemoryError as error:
            log.info("refused: %s", error)
            return E_INVALID

    # ---- memory ----------------------------------------------------------------

    def _address_length(self, text: bytes) -> tuple[int, int]:
        address, length = split_fields(text, b",", 2, "address,length")
        return parse_hex(address, "address") & ADDRESS_MASK, parse_hex(length, "length")

    def _read_memory(self, args: bytes) -> bytes:
        gpa, length = self._address_length(args)
        if length == 0:
            return b""
        region = self.memory.find_region(gpa)
        length = min(length, MAX_READ, region.end - gpa)
        return self.memory.read(gpa, length, access=Access.DEBUG).hex().encode()

    def _write(self, gpa: int, length: int, data: bytes) -> bytes:
        if len(data) != length:
            raise ProtocolError(f"{length} bytes announced, {len(data)} sent")
        self.memory.write(gpa, data, access=Access.DEBUG)
        return b"OK"

    def _write_memory_hex(self, args: bytes) -> bytes:
        where, data = split_fields(args, b":", 2, "M packet")
        gpa, length = self._address_length(where)
        try:
            raw = bytes.fromhex(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError("M data is not hex") from None
        return self._write(gpa, length, raw)

    def _write_memory_binary(self, args: bytes) -> bytes:
        where, data = split_fields(args, b":", 2, "X packet")
        gpa, length = self._address_length(where)
        return self._write(gpa, length, unescape(data))

    # ---- registers -------------------------------------------------------------

    def _read_register(self, args: bytes) -> bytes:
        number = parse_hex(args, "register number")
        if number >= len(target.REGISTERS):
            raise InvalidRequest(f"no register {number}")
        return target.register_hex(self.registers(), number).encode()

    # ---- tags ------------------------------------------------------------------

    def _granules(self, args: bytes) -> tuple[int, int, bytes]:
        """(first granule's GPA, granule count, the rest) of ``ADDR,LEN:TYPE[:...]``."""
        where, rest = split_fields(args, b":", 2, "tag packet")
        gpa, length = self._address_length(where)
        kind, _, tail = rest.partition(b":")
        if parse_hex(kind, "tag type") != ALLOCATION_TAG:
            raise InvalidRequest("only allocation tags (type 1) exist")
        first = gpa - gpa % GRANULE
        count = max(1, -(-(gpa + length - first) // GRANULE))
        if count > MAX_TAGS:
            raise InvalidRequest(f"{count} granules exceed {MAX_TAGS} in one packet")
        return first, count, tail

    def _read_tags(self, args: bytes) -> bytes:
        first, count, _ = self._granules(args)
        return b"m" + self.memory.get_tags(first, count * GRANULE).tobytes().hex().encode()

    def _write_tags(self, args: bytes) -> bytes:
        first, count, tail = self._granules(args)
        try:
            pattern = np.frombuffer(bytes.fromhex(tail.decode("ascii")), dtype=np.uint8)
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError("QMemTags tags are not hex") from None
        if pattern.size == 0:
            raise InvalidRequest("QMemTags without tags")
        tags = np.resize(pattern, count)  # GDB repeats a short pattern over the range
        self.memory.set_tags(first, count * GRANULE, tags)
        return b"OK"

    def _is_tagged(self, args: bytes) -> bytes:
        gpa = parse_hex(args, "address") & ADDRESS_MASK
        if self.memory.tag_mode is TagMode.NONE:
            return b"00"
        try:
            self.memory.find_region(gpa)
        except AddressError:
            return b"00"
        return b"01"

    # ---- target description and files ------------------------------------------

    def _features(self, args: bytes) -> bytes:
        return _xfer(args, {b"target.xml": target.TARGET_XML})

    def _memory_map(self, args: bytes) -> bytes:
        return _xfer(args, {b"": memory_map_xml(self.memory)})

    def _region_info(self, args: bytes) -> bytes:
        return region_info(self.memory, parse_hex(args, "address"))

    def _attached(self, args: bytes) -> bytes:
        if parse_hex(args, "pid") != self.pid:
            raise InvalidRequest(f"no process {args[:20]!r} here")
        return b"1"

    def _proc_files(self) -> dict[bytes, Callable[[], bytes]]:
        files: dict[bytes, Callable[[], bytes]] = {}
        for owner in (str(self.pid), "self"):
            files[f"/proc/{owner}/smaps".encode()] = lambda: smaps_text(self.memory)
            files[f"/proc/{owner}/maps".encode()] = lambda: maps_text(self.memory)
        return files

    def _vfile(self, args: bytes) -> bytes:
        op, _, rest = args.partition(b":")
        if op == b"setfs":
            return b"F0"
        if op == b"open":
            return self._vfile_open(rest)
        if op == b"pread":
            return self._vfile_pread(rest)
        if op == b"close":
            closed = self._files.pop(parse_hex(rest, "fd"), None) is not None
            return b"F0" if closed else b"F-1,%x" % EBADF
        return b""

    def _vfile_open(self, args: bytes) -> bytes:
        path_hex, flags, _mode = split_fields(args, b",", 3, "vFile:open")
        try:
            path = bytes.fromhex(path_hex.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError("vFile:open path is not hex") from None
        contents = self._proc_files().get(path)
        if contents is None:
            return b"F-1,%x" % ENOENT
        if parse_hex(flags, "open flags") & os.O_ACCMODE != os.O_RDONLY:
            return b"F-1,%x" % EACCES
        if len(self._files) >= MAX_OPEN_FILES:
            return b"F-1,%x" % EMFILE
        fd = next(n for n in itertools.count(FIRST_FD) if n not in self._files)
        self._files[fd] = contents()
        return b"F%x" % fd

    def _vfile_pread(self, args: bytes) -> bytes:
        fields = split_fields(args, b",", 3, "vFile:pread")
        fd, count, offset = (parse_hex(f, "vFile:pread") for f in fields)
        if fd not in self._files:
            return b"F-1,%x" % EBADF
        data = self._files[fd][offset : offset + min(count, MAX_READ)]
        return b"F%x;" % len(data) + escape(data)

    def _start_no_ack(self, args: bytes) -> bytes:
        if args:
            return b""
        self.no_ack = True  # the server applies it after sending this reply
        return b"OK"


def _xfer(args: bytes, annexes: dict[bytes, bytes]) -> bytes:
    """A ``qXfer:...:read:ANNEX:OFFSET,LENGTH`` reply from one of ``annexes``."""
    annex, where = split_fields(args, b":", 2, "qXfer annex")
    if annex not in annexes:
        raise InvalidRequest(f"no annex {annex!r}")
    document = annexes[annex]
    offset, length = (parse_hex(f, "qXfer") for f in split_fields(where, b",", 2, "qXfer"))
    chunk = document[offset : offset + min(length, MAX_READ)]
    last = offset + len(chunk) >= len(document)
    return (b"l" if last else b"m") + escape(chunk)
