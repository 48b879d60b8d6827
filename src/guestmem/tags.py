"""Allocation tags of guest memory: read and set them, as the guest kernel does.

Each 16-byte granule has a 4-bit tag, kept where the tag mode says: by the
CPU under HARDWARE, in a table under SOFTWARE, behind KVM's ioctls under KVM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from guestmem._args import check_tag
from guestmem._native import check, space_tags_get, space_tags_set
from guestmem.errors import TagError, UnsupportedError
from guestmem.kinds import TagMode
from guestmem.kvm import check_tags_written
from guestmem.mover import Mover
from guestmem.units import GRANULE

TagsLike = int | Sequence[int] | npt.NDArray[np.integer[Any]]
"""One tag for every granule, or one per granule."""


def read_tags(mover: Mover, gpa: int, length: int) -> npt.NDArray[np.uint8]:
    """The allocation tag of each 16-byte granule of ``[gpa, gpa + length)``."""
    gpa, length, pieces = mover.address_space.granule_pieces(gpa, length)
    out = np.empty(length // GRANULE, dtype=np.uint8)
    at = 0
    what = "KVM_ARM_MTE_COPY_TAGS" if mover.tag_mode is TagMode.KVM else "get_tags"
    with mover.vm_fd_in_use():
        space = mover.native_space
        for region, offset, n in pieces:
            part = out[at : at + n // GRANULE]
            check(space_tags_get(space, region.gpa + offset, part), what)
            at += part.size
    return out


def write_tags(mover: Mover, gpa: int, length: int, tags: TagsLike) -> None:
    """Set the allocation tags of ``[gpa, gpa + length)``; data stays.

    The core marks the pages whose tags it set dirty.
    """
    gpa, length, pieces = mover.address_space.granule_pieces(gpa, length)
    if mover.tag_mode is TagMode.NONE:
        raise UnsupportedError("TagMode.NONE has no tag storage")
    per_granule = _tag_array(tags, length // GRANULE)
    at = 0
    with mover.vm_fd_in_use():
        space = mover.native_space
        for region, offset, n in pieces:
            count = n // GRANULE
            part = int(tags) if per_granule is None else per_granule[at : at + count]  # type: ignore[arg-type]
            status = space_tags_set(space, region.gpa + offset, count, part)
            if mover.tag_mode is TagMode.KVM:
                check_tags_written(status)
            else:
                check(status, "set_tags")
            at += count


def _tag_array(tags: TagsLike, count: int) -> npt.NDArray[np.uint8] | None:
    if isinstance(tags, (int, np.integer)) and not isinstance(tags, bool):
        check_tag(tags)
        return None
    array = np.asarray(tags)
    if array.ndim != 1 or array.size != count:
        raise TagError(f"expected {count} tags (one per granule), got shape {array.shape}")
    if array.size and (array.dtype.kind not in "iu" or array.min() < 0 or array.max() > 15):
        raise TagError("every tag must be an integer 0..15")
    return np.ascontiguousarray(array, dtype=np.uint8)
