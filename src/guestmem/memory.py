"""GuestMemory: guest RAM as regions at guest physical addresses.

Every access to it is classified and carried out by a native route.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from guestmem._closing import ClosesOnExit
from guestmem._native import check, ffi, lib
from guestmem.dirty import DirtyLog
from guestmem.dma import Dma
from guestmem.errors import (
    AddressError,
    AlignmentError,
    BufferTypeError,
    ClosedError,
    LengthError,
    TagCheckError,
    TagError,
    UnsupportedError,
)
from guestmem.kinds import Access, Policy, Route, TagMode
from guestmem.kvm import KvmVm, kvm_mte_available
from guestmem.platform import has_mte
from guestmem.region import Backing, GuestRegion, SharedRegion
from guestmem.units import GRANULE

TagsLike = int | Sequence[int] | npt.NDArray[np.integer[Any]]
Piece = tuple[GuestRegion, int, int]

_OP_READ, _OP_WRITE, _OP_FILL = 0, 1, 2
BOUNCE_BUFFER_SIZE = 64 << 10
BOUNCE_BUFFERS = 8


def resolve_tag_mode(tags: str | TagMode) -> TagMode:
    """Turn ``"auto"``, a mode's name or a TagMode into a TagMode available here.

    ``"auto"`` is HARDWARE where the CPU has MTE, else SOFTWARE; asking for
    HARDWARE without MTE raises UnsupportedError rather than pretend.
    """
    if isinstance(tags, TagMode):
        mode = tags
    elif tags == "auto":
        mode = TagMode.HARDWARE if has_mte() else TagMode.SOFTWARE
    else:
        try:
            mode = TagMode[str(tags).upper()]
        except KeyError:
            raise ValueError(
                f"tags must be 'auto', 'hardware', 'software' or 'none', not {tags!r}"
            ) from None
    if mode is TagMode.KVM and not kvm_mte_available():
        raise UnsupportedError("tags='kvm' needs /dev/kvm with KVM_CAP_ARM_MTE")
    if mode is TagMode.HARDWARE:
        if not has_mte():
            raise UnsupportedError("tags='hardware' needs a CPU and kernel with MTE (HWCAP2_MTE)")
        check(lib.gm_thread_enable_mte(), "enabling the tagged-address ABI")
    return mode


class GuestMemory(ClosesOnExit):
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
        ordered = sorted(regions, key=lambda r: r.gpa)
        if not ordered:
            raise LengthError("a GuestMemory needs at least one region")
        modes = {r.tag_mode for r in ordered}
        if len(modes) != 1:
            raise ValueError(f"all regions must share one tag mode, not {sorted(modes)}")
        for before, after in itertools.pairwise(ordered):
            if after.gpa < before.end:
                raise AddressError(
                    f"regions overlap at {after.gpa:#x}",
                    gpa=after.gpa,
                    length=before.end - after.gpa,
                )
        self._regions: tuple[GuestRegion, ...] = tuple(ordered)
        self._starts = [r.gpa for r in ordered]
        self.tag_mode: TagMode = ordered[0].tag_mode
        self.policy = policy or Policy()
        pool = lib.gm_pool_new(bounce_buffer_size, bounce_buffers)
        if pool == ffi.NULL:
            raise LengthError("bounce pool: buffer size and count must be positive")
        self._pool = ffi.gc(pool, lib.gm_pool_free)
        self._kvm: KvmVm | None = None
        if self.tag_mode is TagMode.KVM:
            self._kvm = kvm or KvmVm.create()
            try:
                for region in ordered:
                    self._kvm.add_region(region)
            except BaseException:
                if kvm is None:
                    self._kvm.close()
                raise
        self._vm_fd = self._kvm.fd if self._kvm is not None else -1
        self._last_region = ordered[0]
        self.dirty = DirtyLog(self)
        self._closed = False

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
        regions = [GuestRegion(gpa, size, mode, backing) for gpa, size in layout]
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
        self._require_open()
        return self._regions

    @property
    def policy(self) -> Policy:
        """The default route of each access class."""
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self._policy = policy
        self._defaults = {access: (policy.route_for(access), 0) for access in Access}

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Stop serving accesses; each mapping goes when its last view goes."""
        self._closed = True
        self._regions = ()
        self._starts = []
        if self._kvm is not None:
            self._kvm.close()

    def find_region(self, gpa: int) -> GuestRegion:
        """The region holding ``gpa``; AddressError if none does."""
        self._require_open()
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and self._regions[i].contains(gpa):
            return self._regions[i]
        raise AddressError(f"GPA {gpa:#x} is not in guest memory", gpa=gpa, length=1)

    @property
    def dma(self) -> Dma:
        """Buffers for device models: ``with mem.dma.map(gpa, n, direction) as buf``."""
        return Dma(self)

    # ---- addresses -------------------------------------------------------------

    def translate(self, gpa: int, length: int) -> list[Piece]:
        """Split ``[gpa, gpa + length)`` into (region, offset, length) pieces.

        Raises AddressError if any byte of it is not mapped.
        """
        self._require_open()
        if not isinstance(gpa, int) or not isinstance(length, int):
            raise TypeError("gpa and length must be integers")
        if length < 0:
            raise LengthError(f"negative length {length}")
        if gpa < 0:
            raise AddressError(f"negative GPA {gpa:#x}", gpa=gpa, length=length)
        pieces: list[Piece] = []
        at, end = gpa, gpa + length
        while at < end:
            try:
                region = self.find_region(at)
            except AddressError:
                raise AddressError(
                    f"[{gpa:#x}, {end:#x}) touches unmapped GPA {at:#x}", gpa=gpa, length=length
                ) from None
            n = min(end, region.end) - at
            pieces.append((region, at - region.gpa, n))
            at += n
        return pieces

    def view(self, gpa: int, length: int) -> npt.NDArray[np.uint8]:
        """A zero-copy numpy view of guest memory (through an untagged pointer).

        Accessing it is a plain access: under HARDWARE it is checked against
        the granules' tags unless the thread is in :func:`guestmem.unchecked`.
        """
        pieces = self.translate(gpa, length)
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
        pieces = self._granule_pieces(gpa, length)
        out = np.empty(length // GRANULE, dtype=np.uint8)
        at = 0
        for region, offset, n in pieces:
            part = out[at : at + n // GRANULE]
            if self._kvm is not None:
                self._kvm.get_tags_into(region.gpa + offset, part)
            else:
                span = ffi.new("struct gm_span *")
                region.fill_span(span, offset, n)
                dest = ffi.from_buffer("uint8_t[]", part)
                status = lib.gm_tags_get(self.tag_mode, span.guest, span.table, part.size, dest)
                check(status, "get_tags")
            at += part.size
        return out

    def set_tags(self, gpa: int, length: int, tags: TagsLike) -> None:
        """Set the allocation tags of ``[gpa, gpa + length)``.

        ``tags`` is one tag for every granule, or one per granule; data is
        left as it is.
        """
        pieces = self._granule_pieces(gpa, length)
        if self.tag_mode is TagMode.NONE:
            raise UnsupportedError("TagMode.NONE has no tag storage")
        per_granule = _tag_array(tags, length // GRANULE)
        at = 0
        for region, offset, n in pieces:
            count = n // GRANULE
            part = int(tags) if per_granule is None else per_granule[at : at + count]  # type: ignore[arg-type]
            if self._kvm is not None:
                self._kvm.set_tags(region.gpa + offset, count, part)
            else:
                span = ffi.new("struct gm_span *")
                region.fill_span(span, offset, n)
                uniform = part if isinstance(part, int) else 0
                source = ffi.NULL if isinstance(part, int) else ffi.from_buffer("uint8_t[]", part)
                status = lib.gm_tags_set(
                    self.tag_mode, span.guest, span.table, count, source, uniform
                )
                check(status, "set_tags")
            at += count
            if self.dirty.active:
                self.dirty.mark_region(region, offset, n)

    def _granule_pieces(self, gpa: int, length: int) -> list[Piece]:
        for name, value in (("gpa", gpa), ("length", length)):
            if isinstance(value, int) and value % GRANULE:
                raise AlignmentError(
                    f"tag {name} {value:#x} is not a multiple of {GRANULE}",
                    value=value,
                    alignment=GRANULE,
                )
        return self.translate(gpa, length)

    # ---- data ---------------------------------------------------------------------

    def read(
        self,
        gpa: int,
        length: int,
        *,
        access: Access = Access.DMA,
        route: Route | None = None,
        tag: int | None = None,
    ) -> bytes:
        """Read ``length`` bytes at ``gpa``, all or nothing."""
        out = bytearray(_require_length(length))
        self._move_range(access, route, tag, _OP_READ, gpa, length, ffi.from_buffer(out), 0)
        return bytes(out)

    def readinto(
        self,
        gpa: int,
        buffer: Any,
        *,
        access: Access = Access.DMA,
        route: Route | None = None,
        tag: int | None = None,
    ) -> int:
        """Fill ``buffer`` (any writable contiguous buffer) from ``gpa``; return its size."""
        target = _writable(buffer)
        buf = ffi.from_buffer(target, require_writable=True)
        self._move_range(access, route, tag, _OP_READ, gpa, target.nbytes, buf, 0)
        return target.nbytes

    def write(
        self,
        gpa: int,
        data: Any,
        *,
        access: Access = Access.DMA,
        route: Route | None = None,
        tag: int | None = None,
    ) -> None:
        """Write ``data`` (any contiguous buffer) at ``gpa``, all or nothing; tags stay."""
        source = _readable(data)
        buf = ffi.from_buffer(source)
        self._move_range(access, route, tag, _OP_WRITE, gpa, source.nbytes, buf, 0)

    def fill(
        self,
        gpa: int,
        length: int,
        byte: int,
        *,
        access: Access = Access.DMA,
        route: Route | None = None,
        tag: int | None = None,
    ) -> None:
        """Set ``length`` bytes at ``gpa`` to ``byte``, all or nothing; tags stay."""
        if not isinstance(byte, int) or not 0 <= byte <= 255:
            raise ValueError(f"fill byte must be 0..255, not {byte!r}")
        _require_length(length)
        self._move_range(access, route, tag, _OP_FILL, gpa, length, ffi.NULL, byte)

    def readv(
        self,
        ranges: Sequence[tuple[int, int]],
        *,
        access: Access = Access.DMA,
        route: Route | None = None,
        tag: int | None = None,
    ) -> bytes:
        """Gather the guest ranges ``[(gpa, length), ...]`` into one bytes object."""
        total = _total(ranges)
        out = bytearray(total)
        self.readv_into(ranges, out, access=access, route=route, tag=tag)
        return bytes(out)

    def readv_into(
        self,
        ranges: Sequence[tuple[int, int]],
        buffer: Any,
        *,
        access: Access = Access.DMA,
        route: Route | None = None,
        tag: int | None = None,
    ) -> int:
        """Gather the guest ranges into ``buffer``, whose size must be their total."""
        target = _writable(buffer)
        chosen, logical = self._route(access, route, tag)
        pieces = self._pieces(ranges, target.nbytes)
        self._move(
            chosen, _OP_READ, pieces, ffi.from_buffer(target, require_writable=True), 0, logical
        )
        return target.nbytes

    def writev(
        self,
        ranges: Sequence[tuple[int, int]],
        data: Any,
        *,
        access: Access = Access.DMA,
        route: Route | None = None,
        tag: int | None = None,
    ) -> None:
        """Scatter ``data`` over the guest ranges, whose total must be its size."""
        source = _readable(data)
        chosen, logical = self._route(access, route, tag)
        pieces = self._pieces(ranges, source.nbytes)
        self._move(chosen, _OP_WRITE, pieces, ffi.from_buffer(source), 0, logical)

    def _pieces(self, ranges: Sequence[tuple[int, int]], nbytes: int) -> list[Piece]:
        total = _total(ranges)
        if total != nbytes:
            raise LengthError(f"the ranges hold {total} bytes but the buffer has {nbytes}")
        pieces: list[Piece] = []
        for gpa, length in ranges:
            pieces.extend(self.translate(gpa, length))
        return pieces

    def _route(self, access: Access, route: Route | None, tag: int | None) -> tuple[Route, int]:
        if route is None and tag is None:
            try:
                return self._defaults[access]
            except KeyError:
                raise ValueError(f"access must be an Access, not {access!r}") from None
        chosen = self._defaults[Access(access)][0] if route is None else Route(route)
        if chosen is Route.CHECKED:
            if tag is None:
                raise TagError("Route.CHECKED needs the logical tag: tag=0..15")
            return chosen, check_tag(tag)
        if tag is not None:
            raise TagError(f"tag= is only for Route.CHECKED, not {chosen.name}")
        return chosen, 0

    def _move(
        self, route: Route, op: int, pieces: list[Piece], buf: Any, fill: int, tag: int
    ) -> None:
        if not pieces:
            return
        request, _spans = self._request(route, op, pieces, buf, fill, tag)
        status = lib.gm_access(request)
        if status != lib.GM_OK:
            _fail(status, route, pieces)
        if op != _OP_READ and self.dirty.active:
            for region, offset, n in pieces:
                self.dirty.mark_region(region, offset, n)

    def _request(
        self, route: Route, op: int, pieces: list[Piece], buf: Any, fill: int, tag: int
    ) -> tuple[Any, Any]:
        """A native ``struct gm_access`` for ``pieces``, and the spans it points to.

        Keep both alive while the request is in use (the benchmarks reuse it).
        """
        spans = ffi.new("struct gm_span[]", len(pieces))
        for span, (region, offset, n) in zip(spans, pieces, strict=True):
            region.fill_span(span, offset, n)
        request = ffi.new("struct gm_access *")
        request.mode = self.tag_mode
        request.route = route
        request.op = op
        request.spans = spans
        request.nspans = len(pieces)
        request.buf = buf
        request.fill_byte = fill
        request.logical_tag = tag
        request.pool = self._pool
        request.vm_fd = self._vm_fd
        return request, spans

    def _move_range(
        self,
        access: Access,
        route: Route | None,
        tag: int | None,
        op: int,
        gpa: int,
        length: int,
        buf: Any,
        fill: int,
    ) -> None:
        """Move one range: one native call with scalar arguments when it lies in one region."""
        chosen, logical = self._route(access, route, tag)
        self._require_open()
        region = self._last_region
        if not (isinstance(gpa, int) and region.gpa <= gpa and gpa + length <= region.end):
            pieces = self.translate(gpa, length)
            if len(pieces) != 1:
                self._move(chosen, op, pieces, buf, fill, logical)
                return
            region = self._last_region = pieces[0][0]
        offset = gpa - region.gpa
        status = lib.gm_move(
            self.tag_mode,
            chosen,
            op,
            region._base,
            region._table_base,
            region.gpa,
            offset,
            length,
            buf,
            fill,
            logical,
            self._pool,
            self._vm_fd,
        )
        if status != lib.GM_OK:
            _fail(status, chosen, [(region, offset, length)])
        if op != _OP_READ and self.dirty.active:
            self.dirty.mark_region(region, offset, length)

    def _require_open(self) -> None:
        if self._closed:
            raise ClosedError("this GuestMemory is closed")

    def __repr__(self) -> str:
        """Show the tag mode and the regions."""
        state = "closed" if self._closed else ", ".join(map(repr, self._regions))
        return f"GuestMemory({self.tag_mode.name}: {state})"


def _fail(status: int, route: Route, pieces: list[Piece]) -> None:
    """Raise the exception for a native status other than GM_OK."""
    if status == lib.GM_ERR_TAG_CHECK:
        fault = ffi.new("struct gm_fault *")
        lib.gm_last_fault(fault)
        gpa = None
        if fault.span < len(pieces):
            region, offset, _ = pieces[fault.span]
            gpa = region.gpa + offset + fault.offset
        raise TagCheckError(gpa, fault.logical_tag, fault.allocation_tag)
    check(status, f"{route.name} access")


def _require_length(length: object) -> int:
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"a length is an integer, not {type(length).__name__}")
    if length < 0:
        raise LengthError(f"negative length {length}")
    return length


def check_tag(tag: object) -> int:
    """Return ``tag`` if it is an int in 0..15; raise TagError otherwise."""
    if isinstance(tag, bool) or not isinstance(tag, (int, np.integer)) or not 0 <= tag <= 15:
        raise TagError(f"a tag is an integer 0..15, not {tag!r}")
    return int(tag)


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


def _total(ranges: Sequence[tuple[int, int]]) -> int:
    total = 0
    for _, length in ranges:
        if not isinstance(length, int) or length < 0:
            raise LengthError(f"a range length must be a non-negative integer, not {length!r}")
        total += length
    return total


def _readable(data: Any) -> memoryview:
    try:
        view = memoryview(data)
    except TypeError:
        raise BufferTypeError(f"expected a bytes-like object, not {type(data).__name__}") from None
    if not view.c_contiguous:
        raise BufferTypeError("the buffer must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _writable(buffer: Any) -> memoryview:
    view = _readable(buffer)
    if view.readonly:
        raise BufferTypeError(f"{type(buffer).__name__} is read-only: cannot receive data")
    return view
