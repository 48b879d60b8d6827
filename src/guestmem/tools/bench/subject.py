"""The memory a run copies from: guest memory in one tag mode, and its untagged twin.

Guest memory and the baseline's source are both page-aligned mappings of
the same size, written before use (untouched pages would all read the
shared zero page); the destination is one device buffer, as in DMA.
"""

from __future__ import annotations

import mmap

import numpy as np
import numpy.typing as npt

import guestmem as gm

GPA = 0x4000_0000
CHECKED_TAG = 5
RUN_GRANULES = 16  # tags change every 256 bytes: slab-sized objects


class Subject:
    """Guest memory of ``window`` bytes in ``mode``, its untagged twin, a device buffer."""

    def __init__(self, mode: gm.TagMode, window: int, device_size: int) -> None:
        """Map and write both; the device buffer holds the largest access."""
        self.mode = mode
        self.window = window
        self.memory = gm.GuestMemory.anonymous(window, gpa=GPA, tags=mode)
        self.region = self.memory.regions[0]
        self._source_map = mmap.mmap(-1, window)
        self.source: npt.NDArray[np.uint8] = np.frombuffer(self._source_map, dtype=np.uint8)
        self.source[:] = 1
        self.memory.fill(GPA, window, 1, route=gm.Route.TCO)
        self.device: npt.NDArray[np.uint8] = np.ones(device_size, dtype=np.uint8)
        self._uniform: bool | None = None

    def tags_for(self, uniform: bool) -> None:
        """One tag everywhere (for CHECKED), or a new tag every RUN_GRANULES granules."""
        if self.mode is gm.TagMode.NONE or self._uniform is uniform:
            return
        if uniform:
            self.memory.set_tags(GPA, self.window, CHECKED_TAG)
        else:
            granules = self.window // gm.GRANULE
            layout = (np.arange(granules) // RUN_GRANULES % 15 + 1).astype(np.uint8)
            self.memory.set_tags(GPA, self.window, layout)
        self._uniform = uniform

    def guest_address(self, offset: int) -> int:
        """The untagged host address of guest byte ``offset``."""
        return self.region.host_address + offset

    def close(self) -> None:
        """Unmap guest memory (the twin goes with its last view)."""
        self.memory.close()

    def __enter__(self) -> Subject:
        """Use the subject as a context manager that closes it at exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the subject."""
        self.close()
