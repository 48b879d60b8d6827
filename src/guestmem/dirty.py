"""The dirty log: which host pages of guest memory changed since it was last taken."""

from __future__ import annotations

import os
import threading
import weakref

import numpy as np
import numpy.typing as npt

from guestmem.address_space import AddressSpace
from guestmem.errors import UsageError
from guestmem.region import GuestRegion
from guestmem.units import HOST_PAGE, Frames


class DirtyLog:
    """Per-host-page dirty bits over an address space (``mem.dirty``).

    Off until :meth:`start`. While on, the mover marks the pages of every
    write the library makes (writes, fills, tag changes, device-written DMA
    scopes, system-call I/O, the used ring); a VMM feeds the
    rest (e.g. KVM's dirty log, which counts host pages too) through
    :meth:`mark` or :meth:`mark_frames`. :meth:`take` returns the dirty pages
    and clears them in one step. The unit is the host page (:data:`HOST_PAGE`):
    the granularity at which the kernel tracks writes.
    """

    page = HOST_PAGE

    def __init__(self, space: AddressSpace) -> None:
        """Track the pages of ``space``'s regions (off until :meth:`start`)."""
        self._space = space
        self._lock = threading.Lock()
        self._bits: dict[GuestRegion, npt.NDArray[np.bool_]] | None = None
        # Whether pages are being tracked: a plain attribute, as every write
        # of the mover's fast path asks it.
        self.active = False
        _LOGS.add(self)

    def start(self) -> None:
        """Start tracking, with no page dirty."""
        with self._lock:
            self._bits = self._clean()
            self.active = True

    def stop(self) -> None:
        """Stop tracking and forget what was dirty."""
        with self._lock:
            self._bits = None
            self.active = False

    def mark(self, gpa: int, length: int) -> None:
        """Mark the pages of ``[gpa, gpa + length)`` dirty (AddressError if unmapped)."""
        for region, offset, n in self._space.translate(gpa, length):
            self.mark_region(region, offset, n)

    def mark_region(self, region: GuestRegion, offset: int, length: int) -> None:
        """Mark ``length`` bytes at ``offset`` in ``region`` dirty (the hot path: no lookup)."""
        if length <= 0:
            return
        first, last = offset // HOST_PAGE, (offset + length - 1) // HOST_PAGE
        with self._lock:
            if self._bits is not None:
                self._bits[region][first : last + 1] = True

    def mark_frames(self, frames: Frames) -> None:
        """Mark whole pages dirty, in any unit (e.g. host frames from KVM's dirty log)."""
        host = frames.to(HOST_PAGE)
        for region in self._space.regions:
            first = region.gpa // HOST_PAGE
            mine = host.numbers[
                (host.numbers >= first) & (host.numbers < first + region.size // HOST_PAGE)
            ]
            with self._lock:
                if self._bits is not None:
                    self._bits[region][(mine - np.uint64(first)).astype(np.intp)] = True

    def take(self) -> Frames:
        """The host pages dirty now, in GPA order; they become clean."""
        with self._lock:
            if self._bits is None:
                raise UsageError("the dirty log is not started")
            bits, self._bits = self._bits, self._clean()
        numbers = [
            np.flatnonzero(b).astype(np.uint64) + np.uint64(r.gpa // HOST_PAGE)
            for r, b in bits.items()
        ]
        joined = np.concatenate(numbers) if numbers else np.zeros(0, np.uint64)
        return Frames(np.sort(joined), HOST_PAGE)

    def _clean(self) -> dict[GuestRegion, npt.NDArray[np.bool_]]:
        return {r: np.zeros(r.size // HOST_PAGE, dtype=np.bool_) for r in self._space.regions}


# A child forked while another thread held a log's lock must not wait for it.
_LOGS: weakref.WeakSet[DirtyLog] = weakref.WeakSet()


def _new_locks_in_child() -> None:
    for log in _LOGS:
        log._lock = threading.Lock()


os.register_at_fork(after_in_child=_new_locks_in_child)
