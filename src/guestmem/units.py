"""The three units of guest memory, named once, and page frames that carry theirs.

- the **host page** (4, 16 or 64 KiB, this kernel's): what mappings, region
  alignment, KVM's dirty log and KVM_ARM_MTE_COPY_TAGS count in;
- the **stream page** (4 KiB on every host): what a migration stream's page
  records count in, so a stream means the same on every host;
- the **granule** (16 bytes): what one allocation tag covers.

A page frame number means nothing without its page size, so frames travel
as :class:`Frames`, which knows its unit and converts between them.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from guestmem.errors import LengthError

HOST_PAGE: int = mmap.PAGESIZE
STREAM_PAGE = 4096
GRANULE = 16


@dataclass(frozen=True)
class Frames:
    """Page frame numbers in one unit: frame ``f`` covers ``[f * page, (f + 1) * page)``.

    ``numbers`` is sorted, without repeats (uint64).
    """

    numbers: npt.NDArray[np.uint64]
    page: int

    @classmethod
    def of(cls, numbers: npt.ArrayLike, page: int) -> Frames:
        """Frames from any integers, sorted and without repeats."""
        if page <= 0 or page & (page - 1):
            raise LengthError(f"a page size is a power of two, not {page}")
        array = np.unique(np.asarray(numbers, dtype=np.uint64))
        return cls(array, page)

    def to(self, page: int) -> Frames:
        """The same memory in frames of ``page`` bytes.

        Finer pages split each frame; coarser pages cover every frame that
        touches them (so nothing dirty is ever dropped).
        """
        if page == self.page:
            return self
        if page < self.page:
            ratio = self.page // page
            split = self.numbers[:, None] * np.uint64(ratio) + np.arange(ratio, dtype=np.uint64)
            return Frames(split.reshape(-1), page)
        return Frames.of(self.numbers // np.uint64(page // self.page), page)

    def union(self, other: Frames) -> Frames:
        """The frames in either, in this one's unit."""
        theirs = other.to(self.page)
        return Frames(np.union1d(self.numbers, theirs.numbers).astype(np.uint64), self.page)

    @property
    def bytes(self) -> int:
        """How many bytes the frames cover."""
        return len(self) * self.page

    def __len__(self) -> int:
        """How many frames."""
        return int(self.numbers.size)
