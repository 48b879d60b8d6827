"""The dirty log: which guest pages changed since it was last taken."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from guestmem.region import PAGE_SIZE

if TYPE_CHECKING:
    from guestmem.memory import GuestMemory


class DirtyLog:
    """Per-page dirty bits over a GuestMemory (``mem.dirty``).

    Off until :meth:`start`. While on, the library's own writes, fills, tag
    changes and device-written DMA scopes mark their pages; a VMM feeds the
    rest (e.g. KVM's dirty log) through :meth:`mark`. :meth:`take` returns
    the dirty pages and clears them in one step.
    """

    def __init__(self, memory: GuestMemory) -> None:
        """Track ``memory``'s pages (off until :meth:`start`)."""
        self._memory = memory
        self._lock = threading.Lock()
        self._bits: list[npt.NDArray[np.bool_]] | None = None

    @property
    def active(self) -> bool:
        """Whether pages are being tracked."""
        return self._bits is not None

    def start(self) -> None:
        """Start tracking, with no page dirty."""
        with self._lock:
            self._bits = self._clean()

    def stop(self) -> None:
        """Stop tracking and forget what was dirty."""
        with self._lock:
            self._bits = None

    def mark(self, gpa: int, length: int) -> None:
        """Mark the pages of ``[gpa, gpa + length)`` dirty (AddressError if unmapped)."""
        pieces = self._memory.translate(gpa, length)
        with self._lock:
            if self._bits is None:
                return
            for region, offset, n in pieces:
                index = self._memory.regions.index(region)
                first, last = offset // PAGE_SIZE, (offset + n - 1) // PAGE_SIZE
                self._bits[index][first : last + 1] = True

    def take(self) -> npt.NDArray[np.uint64]:
        """The guest page frame numbers dirty now, in GPA order; they become clean."""
        with self._lock:
            if self._bits is None:
                raise RuntimeError("the dirty log is not started")
            bits, self._bits = self._bits, self._clean()
        frames = [
            np.flatnonzero(b).astype(np.uint64) + np.uint64(r.gpa // PAGE_SIZE)
            for r, b in zip(self._memory.regions, bits, strict=True)
        ]
        return np.concatenate(frames) if frames else np.zeros(0, np.uint64)

    def _clean(self) -> list[npt.NDArray[np.bool_]]:
        return [np.zeros(r.size // PAGE_SIZE, dtype=np.bool_) for r in self._memory.regions]
