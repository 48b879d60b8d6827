"""GDB Remote Serial Protocol framing.

A packet is ``$payload#cc`` where ``cc`` is the modulo-256 sum of the payload
in two hex digits. Between packets the peer sends ``+`` (acknowledged), ``-``
(resend) and 0x03 (interrupt). Binary data (``X``, ``vFile:pread`` replies,
``qXfer``) escapes ``#``, ``$``, ``}`` and ``*`` as ``}`` followed by the byte
XOR 0x20. :class:`PacketReader` turns a byte stream into these events and
never grows beyond its limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from guestmem.errors import ProtocolError

PACKET_SIZE = 0x4000  # the largest packet the stub accepts (qSupported PacketSize)
_ESCAPE = 0x7D
_SPECIAL = frozenset(b"#$}*")


@dataclass(frozen=True)
class Packet:
    """A well-formed packet's payload (still escaped where binary)."""

    payload: bytes


@dataclass(frozen=True)
class BadPacket:
    """Something between ``$`` and the checksum that must be answered with ``-``."""

    reason: str


@dataclass(frozen=True)
class Ack:
    """``+``: the peer received our last reply."""


@dataclass(frozen=True)
class Nak:
    """``-``: the peer wants our last reply again."""


@dataclass(frozen=True)
class Interrupt:
    """0x03: the peer asks the target to stop."""


Event = Packet | BadPacket | Ack | Nak | Interrupt
_SIMPLE: dict[int, Event] = {ord("+"): Ack(), ord("-"): Nak(), 0x03: Interrupt()}


def checksum(payload: bytes) -> int:
    """The modulo-256 sum of ``payload``."""
    return sum(payload) & 0xFF


def frame(payload: bytes) -> bytes:
    """``payload`` as a packet on the wire."""
    return b"$" + payload + b"#" + b"%02x" % checksum(payload)


def escape(data: bytes) -> bytes:
    """Binary data with the protocol's special bytes escaped."""
    out = bytearray()
    for byte in data:
        if byte in _SPECIAL:
            out += bytes((_ESCAPE, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """The binary data behind an escaped payload; a dangling ``}`` is an error."""
    out = bytearray()
    pending = False
    for byte in data:
        if pending:
            out.append(byte ^ 0x20)
            pending = False
        elif byte == _ESCAPE:
            pending = True
        else:
            out.append(byte)
    if pending:
        raise ProtocolError("binary data ends inside an escape")
    return bytes(out)


class PacketReader:
    """Split a byte stream into :data:`Event` s, holding at most one partial packet."""

    def __init__(self, limit: int = PACKET_SIZE) -> None:
        """Accept payloads of up to ``limit`` bytes; longer ones become BadPacket."""
        self._limit = limit
        self._buffer = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[Event]:
        """Take more bytes from the peer; return the events they complete."""
        self._buffer += data
        events: list[Event] = []
        while self._buffer:
            if self._discarding:
                if not self._skip_oversized():
                    break
                events.append(BadPacket(f"packet longer than {self._limit} bytes"))
                continue
            first = self._buffer[0]
            if first != ord("$"):
                del self._buffer[0]
                simple = _SIMPLE.get(first)
                if simple is not None:
                    events.append(simple)
                continue  # noise between packets is dropped, as gdbserver does
            end = self._buffer.find(b"#", 1, self._limit + 2)
            restart = self._buffer.find(b"$", 1, end if end >= 0 else self._limit + 2)
            if restart > 0:
                del self._buffer[:restart]
                events.append(BadPacket("a new packet began before this one ended"))
                continue
            if end < 0:
                if len(self._buffer) > self._limit + 1:
                    self._discarding = True
                    continue
                break
            if len(self._buffer) < end + 3:
                break
            events.append(self._complete(end))
        return events

    def _complete(self, end: int) -> Packet | BadPacket:
        payload = bytes(self._buffer[1:end])
        digits = bytes(self._buffer[end + 1 : end + 3])
        del self._buffer[: end + 3]
        if not all(chr(d) in "0123456789abcdefABCDEF" for d in digits):
            return BadPacket(f"checksum {digits!r} is not two hex digits")
        expected = int(digits, 16)
        if expected != checksum(payload):
            return BadPacket(f"checksum {expected:02x}, payload sums to {checksum(payload):02x}")
        return Packet(payload)

    def _skip_oversized(self) -> bool:
        """Drop bytes up to the end of an oversized packet; True once it is gone."""
        end = self._buffer.find(b"#")
        if end < 0:
            self._buffer.clear()
            return False
        if len(self._buffer) < end + 3:
            del self._buffer[:end]
            return False
        del self._buffer[: end + 3]
        self._discarding = False
        return True
