"""Checked bytes for a part's saved state: :class:`Writer`, :class:`Reader`, :class:`StateError`.

Every stateful part (a device, a transport, a vCPU, the vGIC) has the same
shape: a plain, frozen state value; ``save_state`` (the versioned payload
bytes, :class:`Writer`-built); ``decode_state`` (read it back whole with a
:class:`Reader` and check everything against the part it will go into,
changing nothing); ``apply_state`` (take a decoded value, refusing nothing);
and ``load_state`` (the two in turn: a StateError, and nothing changed, for
bad bytes). :class:`Stateful` names that shape. Integers are little-endian.
Every read is checked: a payload that is short, long or out of range is a
StateError with its offset in the whole state, never an exception of
another kind. How a machine frames its parts' payloads is the VMM's
business (``guestmem.vmm.state_codec``).
"""

from __future__ import annotations

import struct
from typing import Protocol, TypeVar

from guestmem.errors import GuestMemoryError

MAX_STATE = 64 << 20  # far above any machine's (a vCPU is ~8 KiB)
State = TypeVar("State")


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

    def raw(self, n: int, what: str) -> bytes:
        """The next ``n`` bytes as they are."""
        return bytes(self._take(n, what))

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


class Stateful(Protocol[State]):
    """A part whose state can be saved and loaded all or nothing (see the module's docstring)."""

    def save_state(self) -> bytes:
        """The part's state as a versioned payload."""

    def decode_state(self, reader: Reader) -> State:
        """Read and check a payload :meth:`save_state` made, whole; changes nothing."""

    def apply_state(self, state: State) -> None:
        """Take a state :meth:`decode_state` returned (it refuses nothing)."""

    def load_state(self, data: bytes) -> None:
        """Decode ``data`` and apply it: a StateError, and nothing changed, if it is bad."""
