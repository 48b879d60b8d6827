"""The byte encoding of the VMM's saved state: machine sections and each part's fields.

A machine's state (docs/design.md, "Machine state") is a sequence of named
sections, each one part's bytes (a vCPU, the vGIC, a device), framed as::

    magic "GMVMSTAT" | version u16 | reserved u16 | section count u32
    section: name length u8 | name (ASCII) | payload length u32 | payload
    crc32 u32 of everything before it

Integers are little-endian. A part encodes its own payload with
:class:`Writer` and reads it back with :class:`Reader`, whose every read is
checked: a payload that is short, long or out of range is a
:class:`StateError` with the offset, never an exception of another kind.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

from guestmem.errors import GuestMemoryError, UsageError

MAGIC = b"GMVMSTAT"
VERSION = 1
MAX_SECTIONS = 1024
MAX_STATE = 64 << 20  # far above any machine's (a vCPU is ~8 KiB)
_HEAD = struct.Struct("<8sHHI")
_CRC = struct.Struct("<I")


class StateError(GuestMemoryError, ValueError):
    """Saved machine or device state that is corrupt, truncated, or not this machine's.

    ``offset`` is where in the bytes being read the problem was found.
    """

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"machine state at byte {offset}: {reason}")
        self.offset = offset
        self.reason = reason


class Writer:
    """Builds one payload, field by field."""

    def __init__(self) -> None:
        """An empty payload."""
        self._parts: list[bytes] = []

    def u8(self, value: int) -> Writer:
        """Append an unsigned byte."""
        self._parts.append(struct.pack("<B", value))
        return self

    def u16(self, value: int) -> Writer:
        """Append an unsigned 16-bit integer."""
        self._parts.append(struct.pack("<H", value))
        return self

    def u32(self, value: int) -> Writer:
        """Append an unsigned 32-bit integer."""
        self._parts.append(struct.pack("<I", value))
        return self

    def u64(self, value: int) -> Writer:
        """Append an unsigned 64-bit integer."""
        self._parts.append(struct.pack("<Q", value))
        return self

    def blob(self, data: bytes) -> Writer:
        """Append bytes with their length (u32) in front."""
        self.u32(len(data))
        self._parts.append(bytes(data))
        return self

    def bytes(self) -> bytes:
        """The payload so far."""
        return b"".join(self._parts)


class Reader:
    """Reads a payload :class:`Writer` made; ``base`` is its offset in the whole state."""

    def __init__(self, data: bytes, base: int = 0) -> None:
        """Read ``data`` from its start."""
        self._data = memoryview(bytes(data))
        self._at = 0
        self._base = base

    def _take(self, n: int, what: str) -> memoryview:
        if self._at + n > len(self._data):
            raise self.error(f"truncated: {what} needs {n} bytes, {self.left} left")
        piece = self._data[self._at : self._at + n]
        self._at += n
        return piece

    def u8(self, what: str = "a byte") -> int:
        """The next unsigned byte."""
        return int(self._take(1, what)[0])

    def u16(self, what: str = "a u16") -> int:
        """The next unsigned 16-bit integer."""
        return int(struct.unpack("<H", self._take(2, what))[0])

    def u32(self, what: str = "a u32") -> int:
        """The next unsigned 32-bit integer."""
        return int(struct.unpack("<I", self._take(4, what))[0])

    def u64(self, what: str = "a u64") -> int:
        """The next unsigned 64-bit integer."""
        return int(struct.unpack("<Q", self._take(8, what))[0])

    def blob(self, what: str = "bytes", limit: int = MAX_STATE) -> bytes:
        """The next length-prefixed bytes, at most ``limit`` of them."""
        return self.nested(what, limit).whole()

    def nested(self, what: str = "bytes", limit: int = MAX_STATE) -> Reader:
        """The next length-prefixed bytes as a Reader whose offsets stay the whole state's."""
        n = self.u32(f"the length of {what}")
        if n > limit:
            raise self.error(f"{what}: {n} bytes, more than the {limit} allowed")
        start = self.offset
        return Reader(bytes(self._take(n, what)), start)

    def flag(self, what: str) -> bool:
        """The next byte as a boolean: 0 or 1, nothing else."""
        value = self.u8(what)
        if value > 1:
            raise self.error(f"{what} is {value}, not 0 or 1")
        return bool(value)

    def version(self, part: str, known: int) -> int:
        """The part's leading version byte, which must be 1..``known``."""
        value = self.u8(f"the version of {part}")
        if not 1 <= value <= known:
            raise self.error(f"{part} state version {value}; this VMM reads 1 to {known}")
        return value

    def expect(self, what: str, found: int, wanted: int) -> None:
        """Refuse state whose ``what`` (``found``) is not this machine's (``wanted``)."""
        if found != wanted:
            raise self.error(f"{what} is {found} in the saved state, {wanted} here")

    def whole(self) -> bytes:
        """All the payload's bytes, wherever reading stands."""
        return bytes(self._data)

    @property
    def offset(self) -> int:
        """Where reading stands, counted from the start of the whole state."""
        return self._base + self._at

    @property
    def left(self) -> int:
        """Bytes not read yet."""
        return len(self._data) - self._at

    def end(self) -> None:
        """Refuse bytes left over: a payload is read whole."""
        if self.left:
            raise self.error(f"{self.left} unexpected bytes after the last field")

    def error(self, reason: str) -> StateError:
        """A StateError at the current offset."""
        return StateError(self.offset, reason)


def encode(sections: Sequence[tuple[str, bytes]]) -> bytes:
    """Frame named sections as one machine state (see the module's docstring)."""
    if len(sections) > MAX_SECTIONS:
        raise UsageError(f"{len(sections)} sections, more than {MAX_SECTIONS}")
    out = [_HEAD.pack(MAGIC, VERSION, 0, len(sections))]
    for name, payload in sections:
        label = name.encode("ascii")
        out.append(struct.pack("<B", len(label)) + label + struct.pack("<I", len(payload)))
        out.append(payload)
    body = b"".join(out)
    return body + _CRC.pack(zlib.crc32(body))


def decode(data: bytes) -> dict[str, Reader]:
    """The sections of a machine state, each as a :class:`Reader`; StateError if corrupt."""
    if len(data) > MAX_STATE:
        raise StateError(0, f"{len(data)} bytes, more than a machine state may be")
    if len(data) < _HEAD.size + _CRC.size:
        raise StateError(len(data), "truncated before the end of the header")
    magic, version, reserved, count = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise StateError(0, f"not a guestmem machine state (magic {magic!r})")
    if version != VERSION:
        raise StateError(8, f"format version {version}; this VMM reads {VERSION}")
    if reserved:
        raise StateError(10, f"reserved field is {reserved}, not 0")
    if count > MAX_SECTIONS:
        raise StateError(12, f"{count} sections, more than {MAX_SECTIONS}")
    body = data[: -_CRC.size]
    (crc,) = _CRC.unpack_from(data, len(body))
    if zlib.crc32(body) != crc:
        raise StateError(len(body), "checksum mismatch")
    frame = Reader(body)
    frame._at = _HEAD.size
    sections: dict[str, Reader] = {}
    for _ in range(count):
        at = frame.offset
        length = frame.u8("a section name's length")
        name_bytes = bytes(frame._take(length, "a section name"))
        if not name_bytes or not name_bytes.isascii() or not name_bytes.decode().isprintable():
            raise StateError(at, f"section name {name_bytes!r} is not printable ASCII")
        name = name_bytes.decode()
        if name in sections:
            raise StateError(at, f"section {name!r} appears twice")
        sections[name] = frame.nested(f"section {name!r}")
    frame.end()
    return sections


def section(sections: dict[str, Reader], name: str) -> Reader:
    """The section ``name``; StateError if the state has none."""
    if name not in sections:
        raise StateError(0, f"no section {name!r} (the state has {sorted(sections)})")
    return sections[name]
