"""KVM's dirty log of the guest's own writes, fed into guestmem's dirty log.

guestmem's :class:`~guestmem.dirty.DirtyLog` sees the VMM's writes (device
DMA, the debugger) but not the guest's: those are stage-2 faults KVM
records once a memslot has KVM_MEM_LOG_DIRTY_PAGES. A tag store (STG) is a
store, so a page whose tags alone changed is in it too. Each
:meth:`KvmDirtyLog.harvest` takes KVM's bitmap of every memslot
(KVM_GET_DIRTY_LOG, which clears it and write-protects the pages again) and
marks its pages in ``memory.dirty``; a pre-copy round then sends both.
"""

from __future__ import annotations

import numpy as np

import guestmem as gm
from guestmem.units import HOST_PAGE, Frames
from guestmem.vmm import kvm_api as k


class KvmDirtyLog:
    """Dirty logging on every memslot of a machine's RAM (slot N is region N)."""

    def __init__(self, vm_fd: int, memory: gm.GuestMemory) -> None:
        """Not logging yet: :meth:`start` turns it on."""
        self._vm_fd = vm_fd
        self._memory = memory
        self._bitmaps = [bytearray((r.size // HOST_PAGE + 63) // 64 * 8) for r in memory.regions]
        self.active = False
        self.pages = 0  # host pages KVM reported dirty, over every harvest

    def start(self) -> None:
        """Log the guest's writes from now on (KVM write-protects every page)."""
        self._set_flags(k.KVM_MEM_LOG_DIRTY_PAGES)
        self.active = True

    def harvest(self) -> None:
        """Mark in ``memory.dirty`` the pages the guest wrote since the last harvest."""
        for slot, (region, bitmap) in enumerate(zip(self._memory.regions, self._bitmaps,
                                                    strict=True)):  # fmt: skip
            k.get_dirty_log(self._vm_fd, slot, bitmap)
            bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
            pages = np.flatnonzero(bits[: region.size // HOST_PAGE]).astype(np.uint64)
            self.pages += int(pages.size)
            first = region.gpa // HOST_PAGE
            self._memory.dirty.mark_frames(Frames(pages + np.uint64(first), HOST_PAGE))

    def stop(self) -> None:
        """Stop logging (the memslots are as they were before :meth:`start`)."""
        if self.active:
            self._set_flags(0)
            self.active = False

    def _set_flags(self, flags: int) -> None:
        for slot, region in enumerate(self._memory.regions):
            k.set_memory_flags(
                self._vm_fd, slot, region.gpa, region.size, region.host_address, flags
            )
