"""The dirty log: which host pages of guest memory changed since it was last taken."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import numpy as np
import numpy.typing as npt

from guestmem._native import dirty_mark, dirty_mark_pages, dirty_take, set_dirty_bits, set_gpa_log
from guestmem.address_space import AddressSpace
from guestmem.errors import LengthError, UsageError
from guestmem.region import GuestRegion
from guestmem.units import HOST_PAGE, Frames

GPA_BITMAP_PAGE = 4096
"""The page of a shared GPA bitmap (:meth:`DirtyLog.share_bitmap`): vhost-user's VHOST_LOG_PAGE."""


class DirtyLog:
    """Per-host-page dirty bits over an address space (``mem.dirty``).

    Off until :meth:`start`. While on, the mover marks the pages of every
    write the library makes (writes, fills, tag changes, device-written DMA
    scopes, system-call I/O, the used ring); a VMM feeds the
    rest (e.g. KVM's dirty log, which counts host pages too) through
    :meth:`mark` or :meth:`mark_frames`. :meth:`take` returns the dirty pages
    and clears them in one step. The unit is the host page (:data:`HOST_PAGE`):
    the granularity at which the kernel tracks writes. The bits live in the
    memory's native space (one bitmap a region, a bit a page, set atomically),
    where native code can mark them too.
    """

    page = HOST_PAGE

    def __init__(self, space: AddressSpace, native: Any) -> None:
        """Track the pages of ``space``'s regions, described natively by ``native``.

        Off until :meth:`start`.
        """
        self._space = space
        self._native: Any = native
        self._lock = threading.Lock()
        self._index = {region: i for i, region in enumerate(space.regions)}
        self._first_pages = [region.gpa // HOST_PAGE for region in space.regions]
        self._pages = [region.size // HOST_PAGE for region in space.regions]
        # One uint64 word per 64 pages a region; made at the first start and
        # kept (a native writer may hold a pointer to them), cleared at each start.
        self._bits: list[npt.NDArray[np.uint64]] = []
        self._on = False
        self._shared: Any = None  # the native GPA bitmap's description, while one is shared
        # Whether pages are being tracked: a plain attribute, as every write
        # of the mover's fast path asks it.
        self.active = False
        _LOGS.add(self)

    def start(self) -> None:
        """Start tracking, with no page dirty."""
        with self._lock:
            if not self._bits:
                self._bits = [np.zeros(-(-n // 64), dtype=np.uint64) for n in self._pages]
            for index, bits in enumerate(self._bits):
                bits[:] = 0  # off until now: no writer has the pointer
                if self._native is not None:
                    set_dirty_bits(self._native, index, bits)
            self._on = True
            self.active = True

    def stop(self) -> None:
        """Stop tracking and forget what was dirty."""
        with self._lock:
            self._switch_off()

    def detach(self) -> None:
        """Forget the regions (their memory is closed): marks are ignored from now on."""
        with self._lock:
            native, self._native = self._native, None
            if native is not None:
                for index in range(len(self._bits)):
                    set_dirty_bits(native, index, None)
                set_gpa_log(native, None, 0)
            self._shared = None
            self._index = {}

    def _switch_off(self) -> None:
        if self._native is not None:
            for index in range(len(self._bits)):
                set_dirty_bits(self._native, index, None)
        self._on = False
        self.active = self._shared is not None

    def share_bitmap(self, bits: Any) -> None:
        """Also mark every page the library writes in ``bits``, another process's bitmap.

        ``bits`` is a writable buffer laid out as vhost-user's dirty log: bit
        ``i % 8`` of byte ``i // 8`` is the 4 KiB page at GPA ``i * 4096``
        (:data:`GPA_BITMAP_PAGE`, whatever the host page), set with atomic
        ORs, never cleared here. It must cover every region (LengthError
        otherwise). Independent of :meth:`start`: the host-page log stays as
        it is. Replaces a bitmap shared before; the caller keeps ``bits``
        alive until no write that began before the change can still mark it.
        """
        pages = len(memoryview(bits).cast("B")) * 8
        end = max((region.end for region in self._space.regions), default=0)
        if pages * GPA_BITMAP_PAGE < end:
            raise LengthError(
                f"a GPA bitmap of {pages} pages covers [0, {pages * GPA_BITMAP_PAGE:#x}), "
                f"not the regions up to {end:#x}"
            )
        with self._lock:
            if self._native is None:
                raise UsageError("the memory is closed: no bitmap can be shared")
            self._shared = set_gpa_log(self._native, bits, pages)
            self.active = True

    def unshare_bitmap(self) -> None:
        """Stop marking the bitmap :meth:`share_bitmap` gave (none shared: nothing happens)."""
        with self._lock:
            if self._native is not None:
                set_gpa_log(self._native, None, 0)
            self._shared = None
            self.active = self._on

    def mark(self, gpa: int, length: int) -> None:
        """Mark the pages of ``[gpa, gpa + length)`` dirty (AddressError if unmapped)."""
        for region, offset, n in self._space.translate(gpa, length):
            self.mark_region(region, offset, n)

    def mark_region(self, region: GuestRegion, offset: int, length: int) -> None:
        """Mark ``length`` bytes at ``offset`` in ``region`` dirty (the hot path: no lookup)."""
        index = self._index.get(region)
        native = self._native
        if index is not None and native is not None and length > 0:
            dirty_mark(native, index, offset, length)

    def mark_frames(self, frames: Frames) -> None:
        """Mark whole pages dirty, in any unit (e.g. host frames from KVM's dirty log)."""
        host = frames.to(HOST_PAGE)
        native = self._native
        if native is None:
            return
        for index, (first, count) in enumerate(zip(self._first_pages, self._pages, strict=True)):
            mine = host.numbers[(host.numbers >= first) & (host.numbers < first + count)]
            if mine.size:
                pages = np.ascontiguousarray(mine - np.uint64(first), dtype=np.uint64)
                dirty_mark_pages(native, index, pages)

    def take(self) -> Frames:
        """The host pages dirty now, in GPA order; they become clean."""
        with self._lock:
            if not self._on:
                raise UsageError("the dirty log is not started")
            numbers = []
            for index, bits in enumerate(self._bits):
                words = np.empty_like(bits)
                if self._native is not None:
                    dirty_take(self._native, index, words)
                else:  # detached: no writer marks any more
                    words[:] = bits
                    bits[:] = 0
                flags = np.unpackbits(words.view(np.uint8), bitorder="little")
                pages = np.flatnonzero(flags[: self._pages[index]]).astype(np.uint64)
                numbers.append(pages + np.uint64(self._first_pages[index]))
        joined = np.concatenate(numbers) if numbers else np.zeros(0, np.uint64)
        return Frames(np.sort(joined), HOST_PAGE)


# A child forked while another thread held a log's lock must not wait for it.
_LOGS: weakref.WeakSet[DirtyLog] = weakref.WeakSet()


def _new_locks_in_child() -> None:
    for log in _LOGS:
        log._lock = threading.Lock()


os.register_at_fork(after_in_child=_new_locks_in_child)
