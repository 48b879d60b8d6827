"""A PL011 UART (ARM PrimeCell r1p5, the guest's ``ttyAMA0``) on MMIO.

Transmit is instant: every byte the guest writes goes to ``output`` at once
(no line is held back), and the transmit interrupt is raised after each
write as QEMU's PL011 does, which is what Linux's driver waits for before it
writes more. Received bytes wait in a 16-byte FIFO; the receive interrupt is
up while it holds any. What the guest cannot see does not exist: no DMA, no
modem lines, no baud rate.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from guestmem.devices.interrupt import InterruptLine
from guestmem.saved_state import Reader, StateError, Writer

DR, RSR, FR, ILPR, IBRD, FBRD, LCR_H, CR, IFLS, IMSC, RIS, MIS, ICR, DMACR = (
    0x00, 0x04, 0x18, 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x38, 0x3C, 0x40, 0x44, 0x48,
)  # fmt: skip
FR_RXFE, FR_TXFF, FR_RXFF, FR_TXFE = 1 << 4, 1 << 5, 1 << 6, 1 << 7
INT_RX, INT_TX = 1 << 4, 1 << 5
FIFO_DEPTH = 16
# PrimeCell identification, read by the AMBA bus before the driver binds.
ID_REGISTERS = dict(
    zip(range(0xFE0, 0x1000, 4), (0x11, 0x10, 0x14, 0x00, 0x0D, 0xF0, 0x05, 0xB1), strict=True)
)
_STORED = (ILPR, IBRD, FBRD, LCR_H, CR, IFLS, DMACR)
STATE_VERSION = 1
BACKLOG_MAX = 1 << 20  # bytes typed and not read yet that a saved state may carry
_RAW_BITS = INT_RX | INT_TX  # the only RIS bits this model sets
_MASK_BITS = 0x7FF


class Pl011:
    """The UART's registers; the VMM's bus calls :meth:`read` and :meth:`write`.

    ``output`` receives what the guest transmits; the UART drives ``line``
    (only when its level changes). :meth:`receive`
    queues input; what does not fit in the FIFO waits in a backlog until the
    guest reads.
    """

    def __init__(self, output: Callable[[bytes], None], line: InterruptLine) -> None:
        """A UART at reset."""
        self._output = output
        self._line = line
        self._lock = threading.Lock()
        self._rx: deque[int] = deque()
        self._backlog: deque[int] = deque()
        self._stored = {ILPR: 0, IBRD: 0, FBRD: 0, LCR_H: 0, CR: 0x300, IFLS: 0x12, DMACR: 0}
        self._raw = 0  # RIS
        self._mask = 0  # IMSC
        self._level = False

    def read(self, offset: int, size: int) -> int:
        """The value of the register at ``offset`` (unknown offsets read 0)."""
        with self._lock:
            if offset == DR:
                value = self._rx.popleft() if self._rx else 0
                self._refill()
            elif offset == FR:
                value = FR_TXFE | (FR_RXFE if not self._rx else 0)
                value |= FR_RXFF if len(self._rx) >= FIFO_DEPTH else 0
            elif offset == RIS:
                value = self._raw
            elif offset == MIS:
                value = self._raw & self._mask
            elif offset == IMSC:
                value = self._mask
            else:
                value = self._stored.get(offset, ID_REGISTERS.get(offset, 0))
            self._update()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Write the register at ``offset`` (unknown offsets ignore the write)."""
        sent = b""
        with self._lock:
            if offset == DR:
                sent = bytes([value & 0xFF])
                self._raw |= INT_TX
            elif offset == IMSC:
                self._mask = value & 0x7FF
            elif offset == ICR:
                self._raw &= ~value
                self._refill()
            elif offset in _STORED:
                self._stored[offset] = value
            self._update()
        if sent:
            self._output(sent)

    def receive(self, data: bytes) -> None:
        """Queue bytes typed at the console for the guest to read."""
        with self._lock:
            self._backlog.extend(data)
            self._refill()
            self._update()

    def save_state(self) -> bytes:
        """The UART's state: FIFO, backlog, registers, RIS, IMSC and line level (versioned)."""
        with self._lock:
            stored = tuple(self._stored[offset] for offset in _STORED)
            state = Pl011State(
                bytes(self._rx), bytes(self._backlog), stored, self._raw, self._mask, self._level
            )
        return state.encode()

    def decode_state(self, reader: Reader) -> Pl011State:
        """Read and check a state :meth:`save_state` made (see :meth:`Pl011State.decode`)."""
        return Pl011State.decode(reader)

    def apply_state(self, state: Pl011State) -> None:
        """Take a decoded state in place of this one, then drive the line to its level."""
        with self._lock:
            self._rx = deque(state.rx)
            self._backlog = deque(state.backlog)
            self._stored = dict(zip(_STORED, state.stored, strict=True))
            self._raw = state.raw
            self._mask = state.mask
            self._level = state.level
            self._line(state.level)

    def load_state(self, data: bytes) -> None:
        """Decode ``data`` and apply it: a StateError, and nothing changed, if it is bad."""
        self.apply_state(self.decode_state(Reader(data)))

    def _refill(self) -> None:
        while self._backlog and len(self._rx) < FIFO_DEPTH:
            self._rx.append(self._backlog.popleft())
        if self._rx:
            self._raw |= INT_RX
        else:
            self._raw &= ~INT_RX

    def _update(self) -> None:
        level = bool(self._raw & self._mask)
        if level != self._level:
            self._level = level
            self._line(level)


@dataclass(frozen=True)
class Pl011State:
    """A UART's state, checked: one this model could have been in.

    ``stored`` holds ILPR, IBRD, FBRD, LCR_H, CR, IFLS and DMACR, in that order.
    """

    rx: bytes
    backlog: bytes
    stored: tuple[int, ...]
    raw: int
    mask: int
    level: bool

    def encode(self) -> bytes:
        """The payload (version 1)."""
        out = Writer().u8(STATE_VERSION).blob(self.rx).blob(self.backlog)
        for value in self.stored:
            out.u64(value)
        return out.u16(self.raw).u16(self.mask).u8(self.level).bytes()

    @classmethod
    def decode(cls, reader: Reader) -> Pl011State:
        """Read a payload :meth:`encode` made, whole; StateError if the UART could not be so."""
        reader.version("the PL011", STATE_VERSION)
        rx = reader.blob("the receive FIFO", FIFO_DEPTH)
        backlog = reader.blob("the receive backlog", BACKLOG_MAX)
        stored = tuple(reader.u64(f"register {offset:#x}") for offset in _STORED)
        raw = _bits(reader, "RIS", _RAW_BITS)
        mask = _bits(reader, "IMSC", _MASK_BITS)
        at = reader.offset
        level = reader.flag("the interrupt line's level")
        _check_consistent(at, rx, backlog, raw, mask, level)
        reader.end()
        return cls(rx, backlog, stored, raw, mask, level)


def _bits(reader: Reader, name: str, allowed: int) -> int:
    value = reader.u16(name)
    if value & ~allowed:
        raise reader.error(f"{name} is {value:#x}: bits outside {allowed:#x}")
    return value


def _check_consistent(at: int, rx: bytes, backlog: bytes, raw: int, mask: int, level: bool) -> None:
    """Refuse what the UART could not have been in: it keeps these true after every access.

    ``at`` is where the last field (the level) starts, as the error's offset.
    """
    if backlog and len(rx) < FIFO_DEPTH:
        raise StateError(at, f"a backlog behind a FIFO not full ({len(rx)} bytes)")
    if bool(raw & INT_RX) != bool(rx):
        raise StateError(at, f"RIS.RX is {bool(raw & INT_RX)} with {len(rx)} bytes in the FIFO")
    if level != bool(raw & mask):
        raise StateError(at, f"the line level is {level}, RIS & IMSC is {raw & mask:#x}")
