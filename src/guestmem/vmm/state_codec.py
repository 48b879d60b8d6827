"""The byte encoding of the VMM's saved state: machine sections and each part's fields.

A machine's state (docs/design.md, "Machine state") is a sequence of named
sections, each one part's bytes (a vCPU, the vGIC, a device), framed as::

    magic "GMVMSTAT" | version u16 | reserved u16 | section count u32
    section: name length u8 | name (ASCII) | payload length u32 | payload
    crc32 u32 of everything before it

Integers are little-endian. A part encodes its own payload with
:class:`guestmem.saved_state.Writer` and reads it back with its
:class:`~guestmem.saved_state.Reader`, whose every read is checked: a payload
that is short, long or out of range is a :class:`StateError` with the
offset, never an exception of another kind.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

from guestmem.errors import UsageError
from guestmem.saved_state import MAX_STATE, Reader, StateError

MAGIC = b"GMVMSTAT"
VERSION = 1
MAX_SECTIONS = 1024
_HEAD = struct.Struct("<8sHHI")
_CRC = struct.Struct("<I")


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
    frame.raw(_HEAD.size, "the header")
    sections: dict[str, Reader] = {}
    for _ in range(count):
        at = frame.offset
        length = frame.u8("a section name's length")
        name_bytes = frame.raw(length, "a section name")
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
