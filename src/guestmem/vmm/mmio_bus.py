"""The MMIO bus: which device answers an address outside guest RAM.

Each device registers a window (base, size) with its read and write
handlers, which get the offset inside the window. Windows never overlap.
An address in no window behaves as on an empty bus: a read gives 0 and a
write vanishes.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

from guestmem.errors import UsageError

ReadHandler = Callable[[int, int], int]  # (offset, size) -> value
WriteHandler = Callable[[int, int, int], None]  # (offset, size, value)


@dataclass(frozen=True)
class MmioWindow:
    """A device's address range and the handlers that serve it."""

    base: int
    size: int
    read: ReadHandler
    write: WriteHandler

    @property
    def end(self) -> int:
        """The first address past the window."""
        return self.base + self.size


class MmioBus:
    """Windows of MMIO addresses, each served by one device."""

    def __init__(self) -> None:
        """An empty bus."""
        self._windows: list[MmioWindow] = []  # sorted by base
        self._bases: list[int] = []

    def add(self, base: int, size: int, read: ReadHandler, write: WriteHandler) -> None:
        """Serve ``size`` bytes from ``base`` with ``read`` and ``write``.

        Raises UsageError for an empty window or one that overlaps another.
        """
        if size <= 0 or base < 0:
            raise UsageError(f"an MMIO window needs a size and a place, not {base:#x}+{size:#x}")
        window = MmioWindow(base, size, read, write)
        at = bisect.bisect_left(self._bases, base)
        for neighbour in self._windows[max(at - 1, 0) : at + 1]:
            if neighbour.base < window.end and base < neighbour.end:
                raise UsageError(
                    f"the MMIO window {base:#x}+{size:#x} overlaps "
                    f"{neighbour.base:#x}+{neighbour.size:#x}"
                )
        self._windows.insert(at, window)
        self._bases.insert(at, base)

    @property
    def windows(self) -> tuple[MmioWindow, ...]:
        """The windows, by address."""
        return tuple(self._windows)

    def find(self, address: int) -> MmioWindow | None:
        """The window holding ``address``, or None."""
        at = bisect.bisect_right(self._bases, address) - 1
        if at >= 0 and address < self._windows[at].end:
            return self._windows[at]
        return None

    def read(self, address: int, size: int) -> int:
        """A ``size``-byte read at ``address``: the device's answer, or 0 where there is none."""
        window = self.find(address)
        return 0 if window is None else window.read(address - window.base, size)

    def write(self, address: int, size: int, value: int) -> None:
        """A ``size``-byte write at ``address``: to the device there, if any."""
        window = self.find(address)
        if window is not None:
            window.write(address - window.base, size, value)
