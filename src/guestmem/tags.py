"""Allocation tags of guest memory: read and set them, as the guest kernel does.

Each 16-byte granule has a 4-bit tag, kept where the tag mode says: by the
CPU under HARDWARE, in a table under SOFTWARE, behind KVM's ioctls under KVM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from guestmem._args import check_tag
from guestmem._native import NULL, byte_pointer, check, spans, tags_get, tags_set
from guestmem.address_space import AddressSpace, Piece
from guestmem.errors import TagError, UnsupportedError
from guestmem.kinds import TagMode
from guestmem.kvm import KvmVm
from guestmem.units import GRANULE

TagsLike = int | Sequence[int] | npt.NDArray[np.integer[Any]]
"""One tag for every granule, or one per granule."""


def read_tags(
    space: AddressSpace, kvm: KvmVm | None, gpa: int, length: int
) -> npt.NDArray[np.uint8]:
    """The allocation tag of each 16-byte granule of ``[gpa, gpa + length)`` in ``space``."""
    gpa, length, pieces = space.granule_pieces(gpa, length)
    out = np.empty(length // GRANULE, dtype=np.uint8)
    at = 0
    for region, offset, n in pieces:
        part = out[at : at + n // GRANULE]
        if kvm is not None:
            kvm.get_tags_into(region.gpa + offset, part)
        else:
            owner = spans([(region, offset, n)])  # keeps the span alive
            span = owner[0]
            dest = byte_pointer(part, writable=True)
            status = tags_get(space.tag_mode, span, dest, part.size)
            check(status, "get_tags")
        at += part.size
    return out


def write_tags(
    space: AddressSpace,
    kvm: KvmVm | None,
    gpa: int,
    length: int,
    tags: TagsLike,
    written: Callable[[list[Piece]], None],
) -> None:
    """Set the allocation tags of ``[gpa, gpa + length)`` in ``space``; data stays.

    ``written`` is told each piece once its tags are set.
    """
    gpa, length, pieces = space.granule_pieces(gpa, length)
    if space.tag_mode is TagMode.NONE:
        raise UnsupportedError("TagMode.NONE has no tag storage")
    per_granule = _tag_array(tags, length // GRANULE)
    at = 0
    for region, offset, n in pieces:
        count = n // GRANULE
        part = int(tags) if per_granule is None else per_granule[at : at + count]  # type: ignore[arg-type]
        if kvm is not None:
            kvm.set_tags(region.gpa + offset, count, part)
        else:
            owner = spans([(region, offset, n)])  # keeps the span alive
            span = owner[0]
            uniform = part if isinstance(part, int) else 0
            source = NULL if isinstance(part, int) else byte_pointer(part)
            status = tags_set(space.tag_mode, span, count, source, uniform)
            check(status, "set_tags")
        at += count
        written([(region, offset, n)])


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
