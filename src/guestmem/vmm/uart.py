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


class Pl011:
    """The UART's registers; the VMM's bus calls :meth:`read` and :meth:`write`.

    ``output`` receives what the guest transmits; ``set_irq`` drives the
    interrupt line (called only when its level changes). :meth:`receive`
    queues input; what does not fit in the FIFO waits in a backlog until the
    guest reads.
    """

    def __init__(self, output: Callable[[bytes], None], set_irq: Callable[[bool], None]) -> None:
        """A UART at reset."""
        self._output = output
        self._set_irq = set_irq
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
            self._set_irq(level)
