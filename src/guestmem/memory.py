"""GuestMemory: guest RAM as regions at guest physical addresses.

A façade: an :class:`~guestmem.address_space.AddressSpace` says where an
access lands, and :class:`~guestmem.mover.Mover` (which GuestMemory is, for
its data API at no extra call) carries it out by a native route and marks
what it wrote dirty. Here: construction, lifetime, views and tags.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from guestmem._args import check_tag as check_tag
from guestmem._args import require_gpa_range
from guestmem._closing import ClosesOnExit
from guestmem._native import enable_mte
from guestmem.address_space import AddressSpace, Piece, pairs
from guestmem.dma import Dma
from guestmem.errors import AddressError, ArgumentTypeError, UnsupportedError, UsageError
from guestmem.kinds import Policy, TagMode
from guestmem.kvm import KvmVm, kvm_mte_available
from guestmem.mover import Mover
from guestmem.platform import has_mte
from guestmem.region import Backing, GuestRegion, SharedRegion
from guestmem.tags import TagsLike, read_tags, write_tags

__all__ = ["BOUNCE_BUFFERS", "BOUNCE_BUFFER_SIZE", "GuestMemory", "Piece", "resolve_tag_mode"]

BOUNCE_BUFFER_SIZE = 64 << 10
BOUNCE_BUFFERS = 8
_MODE_NAMES = "'auto', 'hardware', 'software', 'kvm' or 'none'"


def resolve_tag_mode(tags: str | TagMode) -> TagMode:
    """Turn ``"auto"``, a mode's name or a TagMode into a TagMode available here.

    ``"auto"`` is HARDWARE where the CPU has MTE, else SOFTWARE; asking for
    HARDWARE without MTE raises UnsupportedError rather than pretend.
    """
    if isinstance(tags, TagMode):
        mode = tags
    elif not isinstance(tags, str):
        raise ArgumentTypeError(
            f"tags must be a TagMode or one of {_MODE_NAMES}, not {type(tags).__name__}"
        )
    elif tags == "auto":
        mode = TagMode.HARDWARE if has_mte() else TagMode.SOFTWARE
    else:
        try:
            mode = TagMode[tags.upper()]
        except KeyError:
            raise UsageError(f"tags must be one of {_MODE_NAMES}, not {tags!r}") from None
    if mode is TagMode.KVM and not kvm_mte_available():
        raise UnsupportedError("tags='kvm' needs /dev/kvm with KVM_CAP_ARM_MTE")
    if mode is TagMode.HARDWARE:
        if not has_mte():
            raise UnsupportedError("tags='hardware' needs a CPU and kernel with MTE (HWCAP2_MTE)")
        enable_mte()
    return mode


class GuestMemory(Mover, ClosesOnExit):
    """Guest RAM: non-overlapping regions at guest physical addresses (GPAs).

    Every data access names why it happens (:class:`Access`) or how it must
    be done (:class:`Route`); the policy maps the one to the other.
    """

    def __init__(
        self,
        regions: Iterable[GuestRegion],
        *,
        policy: Policy | None = None,
        bounce_buffer_size: int = BOUNCE_BUFFER_SIZE,
        bounce_buffers: int = BOUNCE_BUFFERS,
        kvm: KvmVm | None = None,
    ) -> None:
        """Serve ``regions`` (all of one tag mode) as one guest address space.

        Under TagMode.KVM the regions become memslots of ``kvm``, or of a new
        VM with MTE enabled.
        """
        super().__init__(
            AddressSpace(regions),
            policy=policy,
            bounce_buffer_size=bounce_buffer_size,
            bounce_buffers=bounce_buffers,
            kvm=kvm,
        )

    # ---- construction and lifetime -----------------------------------------

    @classmethod
    def anonymous(
        cls, size: int, gpa: int = 0, tags: str | TagMode = "auto", policy: Policy | None = None
    ) -> GuestMemory:
        """One region of anonymous memory of ``size`` bytes at ``gpa``."""
        return cls.from_layout([(gpa, size)], tags=tags, policy=policy)

    @classmethod
    def memfd(
        cls, size: int, gpa: int = 0, tags: str | TagMode = "auto", policy: Policy | None = None
    ) -> GuestMemory:
        """One region of memfd memory (shareable by fd) of ``size`` bytes at ``gpa``."""
        return cls.from_layout([(gpa, size)], tags=tags, policy=policy, backing=Backing.MEMFD)

    @classmethod
    def from_layout(
        cls,
        layout: Iterable[tuple[int, int]],
        *,
        tags: str | TagMode = "auto",
        policy: Policy | None = None,
        backing: Backing = Backing.ANONYMOUS,
        kvm: KvmVm | None = None,
    ) -> GuestMemory:
        """Regions from ``(gpa, size)`` pairs, all with the same backing and tag mode."""
        mode = resolve_tag_mode(tags)
        regions = [GuestRegion(gpa, size, mode, backing) for gpa, size in pairs(layout)]
        return cls(regions, policy=policy, kvm=kvm)

    @classmethod
    def attach(
        cls,
        shared: Iterable[SharedRegion],
        *,
        tags: str | TagMode = "auto",
        policy: Policy | None = None,
    ) -> GuestMemory:
        """Map guest memory another process shared with :meth:`share`.

        A device-model process (as with vhost-user) sees and sets the same
        bytes and tags; the tag mode must be the one the sharer used.
        """
        mode = resolve_tag_mode(tags)
        return cls([GuestRegion.attach(s, mode) for s in shared], policy=policy)

    def share(self) -> list[SharedRegion]:
        """The region table and fds another process needs to :meth:`attach` this memory."""
        return [region.share() for region in self.regions]

    @property
    def regions(self) -> tuple[GuestRegion, ...]:
        """The regions, in GPA order."""
        return self.address_space.regions

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self.address_space.closed

    def close(self) -> None:
        """Stop serving accesses; each mapping goes when its last view goes.

        Safe while other threads use the memory: a call that already found
        its region finishes on it (the mapping lives while the call holds
        it), later calls raise ClosedError. Under TagMode.KVM the VM fd is
        closed when the last in-flight ioctl on it has returned.
        """
        self.address_space.close()
        self.stop()

    def find_region(self, gpa: int) -> GuestRegion:
        """The region holding ``gpa``; AddressError if none does."""
        return self.address_space.find_region(gpa)

    @property
    def dma(self) -> Dma:
        """Buffers for device models: ``with mem.dma.map(gpa, n, direction) as buf``."""
        return Dma(self)

    # ---- addresses -------------------------------------------------------------

    def translate(self, gpa: int, length: int) -> list[Piece]:
        """Split ``[gpa, gpa + length)`` into (region, offset, length) pieces.

        Raises AddressError if any byte of it is not mapped.
        """
        return self.address_space.translate(gpa, length)

    def view(self, gpa: int, length: int) -> npt.NDArray[np.uint8]:
        """A zero-copy numpy view of guest memory (through an untagged pointer).

        Accessing it is a plain access: under HARDWARE it is checked against
        the granules' tags unless the thread is in :func:`guestmem.unchecked`.
        """
        self.address_space.require_open()
        gpa, length = require_gpa_range(gpa, length)
        pieces = self.address_space.split(gpa, length)
        if len(pieces) > 1:
            raise AddressError(
                f"[{gpa:#x}, {gpa + length:#x}) spans regions: no single view",
                gpa=gpa,
                length=length,
            )
        if not pieces:
            return np.zeros(0, dtype=np.uint8)
        region, offset, n = pieces[0]
        return np.frombuffer(region.bytes_at(offset, n), dtype=np.uint8)

    # ---- tags (what the guest kernel does) ---------------------------------------

    def get_tags(self, gpa: int, length: int) -> npt.NDArray[np.uint8]:
        """The allocation tag of each 16-byte granule of ``[gpa, gpa + length)``."""
        return read_tags(self, gpa, length)

    def set_tags(self, gpa: int, length: int, tags: TagsLike) -> None:
        """Set the allocation tags of ``[gpa, gpa + length)``.

        ``tags`` is one tag for every granule, or one per granule; data is
        left as it is.
        """
        write_tags(self, gpa, length, tags)

    def __repr__(self) -> str:
        """Show the tag mode and the regions."""
        return f"GuestMemory({self.tag_mode.name}: {self.address_space!r})"
