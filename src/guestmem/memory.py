"""GuestMemory: guest RAM as regions at guest physical addresses.

Every access to it is classified and carried out by a native route.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt

from guestmem._args import as_int, check_byte, require_gpa_range, require_length
from guestmem._args import check_tag as check_tag
from guestmem._closing import ClosesOnExit
from guestmem._native import (
    SCRATCH_SIZE,
    access_request,
    check,
    closed_hot,
    ffi,
    hot_region,
    lib,
    raise_for,
    scratch,
    spans,
)
from guestmem.dirty import DirtyLog
from guestmem.dma import Dma
from guestmem.errors import (
    AddressError,
    AlignmentError,
    ArgumentTypeError,
    BufferTypeError,
    ClosedError,
    LengthError,
    TagError,
    UnsupportedError,
    UsageError,
)
from guestmem.kinds import Access, Policy, Route, TagMode
from guestmem.kvm import KvmVm, kvm_mte_available
from guestmem.plan import Plan, defaults, resolve
from guestmem.platform import has_mte
from guestmem.region import Backing, GuestRegion, SharedRegion
from guestmem.units import GRANULE

TagsLike = int | Sequence[int] | npt.NDArray[np.integer[Any]]
Piece = tuple[GuestRegion, int, int]

_OP_READ, _OP_WRITE, _OP_FILL = lib.GM_OP_READ, lib.GM_OP_WRITE, lib.GM_OP_FILL
_OP_CHANGES = _OP_WRITE | _OP_FILL  # an op that writes guest memory
_OP_STAGE: int = lib.GM_OP_STAGE  # flag: the caller's buffer is tagged guest memory
_ADDRESS_MASK = (1 << 56) - 1  # a host address without its tag byte
BOUNCE_BUFFER_SIZE = 64 << 10
BOUNCE_BUFFERS = 8
_MODE_NAMES = "'auto', 'hardware', 'software', 'kvm' or 'none'"
_OK, _MISS = lib.GM_OK, lib.GM_MISS
_hot_read, _hot_write, _hot_fill = lib.gm_hot_read, lib.gm_hot_write, lib.gm_hot_fill
# The fast path's view of the region used last: (first GPA, end GPA, base
# pointer, tag table pointer, the region, its native struct gm_hot). One
# attribute, swapped whole, so a thread never sees half of it; empty (first >
# end, a gm_hot nothing fits in) once closed.
_Hot = tuple[int, int, Any, Any, "GuestRegion | None", Any]


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
        listed = list(regions)
        if not all(isinstance(r, GuestRegion) for r in listed):
            raise ArgumentTypeError("a GuestMemory is made of GuestRegion objects")
        ordered = sorted(listed, key=lambda r: r.gpa)
        if not ordered:
            raise LengthError("a GuestMemory needs at least one region")
        modes = {r.tag_mode for r in ordered}
        if len(modes) != 1:
            raise UsageError(f"all regions must share one tag mode, not {sorted(modes)}")
        for before, after in itertools.pairwise(ordered):
            if after.gpa < before.end:
                raise AddressError(
                    f"regions overlap at {after.gpa:#x}",
                    gpa=after.gpa,
                    length=before.end - after.gpa,
                )
        # Regions and their starts: one attribute, swapped whole by close().
        self._table: tuple[tuple[GuestRegion, ...], list[int]] = (
            tuple(ordered),
            [r.gpa for r in ordered],
        )
        self._host_ranges = [(r.host_address, r.host_address + r.size) for r in ordered]
        self.tag_mode: TagMode = ordered[0].tag_mode
        # Under HARDWARE a caller's buffer in guest memory is tagged: see _stage_flag.
        self._buffers_may_be_tagged = self.tag_mode is TagMode.HARDWARE
        self.policy = Policy() if policy is None else policy
        size = require_length(bounce_buffer_size)
        count = require_length(bounce_buffers)
        pool = lib.gm_pool_new(size, count) if 0 < size < 1 << 40 and 0 < count < 1 << 20 else None
        if pool is None or pool == ffi.NULL:
            raise LengthError("bounce pool: buffer size and count must be positive and sane")
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
        self._hots: dict[GuestRegion, _Hot] = {
            r: _hot(r, hot_region(r.tag_mode, r._base, r._table_base, r.gpa, r.size, self._pool, r))
            for r in ordered
        }
        self._hot: _Hot = self._hots[ordered[0]]
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
        regions = [GuestRegion(gpa, size, mode, backing) for gpa, size in _pairs(layout)]
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
        regions = self._table[0]
        if not regions:
            raise ClosedError("this GuestMemory is closed")
        return regions

    @property
    def policy(self) -> Policy:
        """The default route of each access class."""
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        if not isinstance(policy, Policy):
            raise ArgumentTypeError(f"policy must be a Policy, not {type(policy).__name__}")
        self._policy = policy
        self._defaults = defaults(policy)
        self._io_default = Plan(policy.io)
        # The fast path's default route per access class (never CHECKED).
        self._fast_routes = {access: plan.route for access, plan in self._defaults.items()}

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Stop serving accesses; each mapping goes when its last view goes.

        Safe while other threads use the memory: a call that already found
        its region finishes on it (the mapping lives while the call holds
        it), later calls raise ClosedError. Under TagMode.KVM the VM fd is
        closed when the last in-flight ioctl on it has returned.
        """
        self._closed = True
        self._hot = _CLOSED
        self._hots = {}
        self._table = ((), [])
        if self._kvm is not None:
            self._kvm.close()

    def find_region(self, gpa: int) -> GuestRegion:
        """The region holding ``gpa``; AddressError if none does."""
        self._require_open()
        at = as_int(gpa, "a GPA")
        regions, starts = self._table
        i = bisect.bisect_right(starts, at) - 1
        if i >= 0 and regions[i].contains(at):
            return regions[i]
        self._require_open()
        raise AddressError(f"GPA {at:#x} is not in guest memory", gpa=at, length=1)

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
        return self._split(*require_gpa_range(gpa, length))

    def _split(self, gpa: int, length: int) -> list[Piece]:
        """:meth:`translate` of a range already checked to be ints inside the GPA space."""
        regions, starts = self._table  # one snapshot, whatever close() does meanwhile
        pieces: list[Piece] = []
        at, end = gpa, gpa + length
        while at < end:
            i = bisect.bisect_right(starts, at) - 1
            if i < 0 or not regions[i].contains(at):
                self._require_open()
                raise AddressError(
                    f"[{gpa:#x}, {end:#x}) touches unmapped GPA {at:#x}", gpa=gpa, length=length
                )
            region = regions[i]
            n = min(end, region.end) - at
            pieces.append((region, at - region.gpa, n))
            at += n
        return pieces

    def view(self, gpa: int, length: int) -> npt.NDArray[np.uint8]:
        """A zero-copy numpy view of guest memory (through an untagged pointer).

        Accessing it is a plain access: under HARDWARE it is checked against
        the granules' tags unless the thread is in :func:`guestmem.unchecked`.
        """
        self._require_open()
        gpa, length = require_gpa_range(gpa, length)
        pieces = self._split(gpa, length)
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
        gpa, length, pieces = self._granule_pieces(gpa, length)
        out = np.empty(length // GRANULE, dtype=np.uint8)
        at = 0
        for region, offset, n in pieces:
            part = out[at : at + n // GRANULE]
            if self._kvm is not None:
                self._kvm.get_tags_into(region.gpa + offset, part)
            else:
                owner = spans([(region, offset, n)])  # keeps the span alive
                span = owner[0]
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
        gpa, length, pieces = self._granule_pieces(gpa, length)
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
                owner = spans([(region, offset, n)])  # keeps the span alive
                span = owner[0]
                uniform = part if isinstance(part, int) else 0
                source = ffi.NULL if isinstance(part, int) else ffi.from_buffer("uint8_t[]", part)
                status = lib.gm_tags_set(
                    self.tag_mode, span.guest, span.table, count, source, uniform
                )
                check(status, "set_tags")
            at += count
            if self.dirty.active:
                self.dirty.mark_region(region, offset, n)

    def _granule_pieces(self, gpa: int, length: int) -> tuple[int, int, list[Piece]]:
        """``gpa`` and ``length`` as ints, granule-aligned, and their pieces."""
        self._require_open()
        gpa, length = require_gpa_range(gpa, length)
        for name, value in (("gpa", gpa), ("length", length)):
            if value % GRANULE:
                raise AlignmentError(
                    f"tag {name} {value:#x} is not a multiple of {GRANULE}",
                    value=value,
                    alignment=GRANULE,
                )
        return gpa, length, self._split(gpa, length)

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
        """Read ``length`` bytes at ``gpa``, all or nothing.

        The range is checked before anything is allocated: a bad request
        costs nothing whatever its length.
        """
        if tag is None and type(gpa) is int and type(length) is int and 0 <= length <= SCRATCH_SIZE:
            # The fast path: a small read inside the region used last, by a
            # route known without resolving. Anything else, a miss included,
            # takes the general path, which validates and says what is wrong.
            # _fast_route() inlined: the call would cost ~50 ns of ~600.
            try:
                fast = self._fast_routes[access]
            except (KeyError, TypeError):
                fast = None
            if route is not None and fast is not None:
                fast = route if type(route) is Route else None
            if fast is not None:
                try:
                    pair = _SCRATCH.pop()
                except IndexError:
                    pair = scratch()
                try:
                    status = _hot_read(self._hot[5], fast, gpa, length, pair[0])
                except OverflowError:  # gpa past 2**64
                    status = _MISS
                if status == _OK:
                    data: bytes = pair[1][:length]
                    _SCRATCH.append(pair)
                    return data
                _SCRATCH.append(pair)
                if status != _MISS:
                    raise_for(status, f"{fast.name} access", [gpa])
        plan = self._plan(access, route, tag)
        gpa, length, where = self._where(gpa, length)
        out = bytearray(length)
        self._run(plan, _OP_READ, gpa, length, where, ffi.from_buffer(out))
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
        """Fill ``buffer`` (any writable contiguous buffer) from ``gpa``; return its size.

        ``buffer`` may overlap the range read (memmove semantics), and may be
        guest memory itself.
        """
        if type(buffer) is bytearray and tag is None and type(gpa) is int:
            fast = self._fast_route(access, route)  # see read()
            if fast is not None:
                n = len(buffer)
                try:
                    status = _hot_read(self._hot[5], fast, gpa, n, ffi.from_buffer(buffer))
                except OverflowError:
                    status = _MISS
                if status == _OK:
                    return n
                if status != _MISS:
                    raise_for(status, f"{fast.name} access", [gpa])
        target = _writable(buffer)
        plan = self._plan(access, route, tag)
        gpa, n, where = self._where(gpa, target.nbytes)
        buf = ffi.from_buffer(target, require_writable=True)
        op = _OP_READ | (self._stage_flag(buf, n) if self._buffers_may_be_tagged else 0)
        self._run(plan, op, gpa, n, where, buf)
        return n

    def write(
        self,
        gpa: int,
        data: Any,
        *,
        access: Access = Access.DMA,
        route: Route | None = None,
        tag: int | None = None,
    ) -> None:
        """Write ``data`` (any contiguous buffer) at ``gpa``, all or nothing; tags stay.

        ``data`` may overlap the range written (memmove semantics), and may be
        guest memory itself.
        """
        kind = type(data)
        if (kind is bytes or kind is bytearray) and tag is None and type(gpa) is int:
            # The fast path (see read()). A bytes object goes to the core as it
            # is; neither kind is ever guest memory, so nothing needs staging.
            fast = self._fast_route(access, route)
            if fast is not None:
                hot = self._hot
                n = len(data)
                try:
                    status = _hot_write(
                        hot[5], fast, gpa, n, data if kind is bytes else ffi.from_buffer(data)
                    )
                except OverflowError:
                    status = _MISS
                if status == _OK:
                    region = hot[4]
                    if region is not None and self.dirty.active:
                        self.dirty.mark_region(region, gpa - hot[0], n)
                    return
                if status != _MISS:
                    raise_for(status, f"{fast.name} access", [gpa])
        source = _readable(data)
        plan = self._plan(access, route, tag)
        gpa, n, where = self._where(gpa, source.nbytes)
        buf = ffi.from_buffer(source)
        op = _OP_WRITE | (self._stage_flag(buf, n) if self._buffers_may_be_tagged else 0)
        self._run(plan, op, gpa, n, where, buf)

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
        if tag is None and type(gpa) is int and type(length) is int and type(byte) is int:
            fast = self._fast_route(access, route)  # the fast path: see read()
            if fast is not None and length >= 0 and 0 <= byte <= 255:
                hot = self._hot
                try:
                    status = _hot_fill(hot[5], fast, gpa, length, byte)
                except OverflowError:
                    status = _MISS
                if status == _OK:
                    region = hot[4]
                    if region is not None and self.dirty.active:
                        self.dirty.mark_region(region, gpa - hot[0], length)
                    return
                if status != _MISS:
                    raise_for(status, f"{fast.name} access", [gpa])
        value = check_byte(byte)
        plan = self._plan(access, route, tag)
        gpa, n, where = self._where(gpa, length)
        self._run(plan, _OP_FILL, gpa, n, where, ffi.NULL, value)

    def readv(
        self,
        ranges: Sequence[tuple[int, int]],
        *,
        access: Access = Access.DMA,
        route: Route | None = None,
        tag: int | None = None,
    ) -> bytes:
        """Gather the guest ranges ``[(gpa, length), ...]`` into one bytes object."""
        plan = self._plan(access, route, tag)
        pieces = self._pieces(ranges, None)
        out = bytearray(sum(n for _, _, n in pieces))
        self._move(plan, _OP_READ, pieces, ffi.from_buffer(out))
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
        plan = self._plan(access, route, tag)
        pieces = self._pieces(ranges, target.nbytes)
        buf = ffi.from_buffer(target, require_writable=True)
        op = _OP_READ | self._stage_flag(buf, target.nbytes)
        self._move(plan, op, pieces, buf)
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
        plan = self._plan(access, route, tag)
        pieces = self._pieces(ranges, source.nbytes)
        buf = ffi.from_buffer(source)
        self._move(plan, _OP_WRITE | self._stage_flag(buf, source.nbytes), pieces, buf)

    def _pieces(self, ranges: Sequence[tuple[int, int]], nbytes: int | None) -> list[Piece]:
        """Translate every range (all of them, before anything moves)."""
        hot = self._hot_piece(ranges, nbytes)
        if hot is not None:
            return hot
        self._require_open()
        pieces: list[Piece] = []
        for gpa, length in _range_pairs(ranges):
            pieces.extend(self._split(gpa, length))
        total = sum(n for _, _, n in pieces)
        if nbytes is not None and total != nbytes:
            raise LengthError(f"the ranges hold {total} bytes but the buffer has {nbytes}")
        return pieces

    def _hot_piece(self, ranges: object, nbytes: int | None) -> list[Piece] | None:
        """The piece of one plain range inside the region used last (nothing more to check)."""
        if type(ranges) is not list or len(ranges) != 1:
            return None
        pair = ranges[0]
        if type(pair) is not tuple or len(pair) != 2:
            return None
        gpa, length = pair
        if type(gpa) is not int or type(length) is not int or length < 0:
            return None
        lo, end, _, _, region, _ = self._hot
        if region is None or not lo <= gpa <= end - length or nbytes not in (None, length):
            return None
        return [(region, gpa - lo, length)]

    def _fast_route(self, access: Access, route: Route | None) -> Route | None:
        """The route of a tagless access for the fast path, if it needs no resolving.

        None sends the call down the general path (which validates it). The
        core itself refuses CHECKED to the fast path.
        """
        try:
            fast = self._fast_routes[access]
        except (KeyError, TypeError):
            return None
        if route is None:
            return fast
        return route if type(route) is Route else None

    def _plan(self, access: Access, route: Route | None, tag: int | None) -> Plan:
        """The access resolved (see guestmem.plan); the common plans are kept ready."""
        if tag is None:
            try:
                if route is None:
                    return self._defaults[access]
                if type(route) is Route and access in self._defaults:
                    return _ROUTE_PLANS[route]
            except (KeyError, TypeError):
                pass  # resolve() says what is wrong
        return resolve(self._policy, access, route, tag)

    def _io_plan(self, route: Route | None, tag: int | None) -> Plan:
        """A system call's access resolved (``resolve(..., io=True)``), common plans kept ready."""
        if tag is None:
            if route is None:
                return self._io_default
            if type(route) is Route and route.syscall_safe and route in _ROUTE_PLANS:
                return _ROUTE_PLANS[route]
        return resolve(self._policy, Access.DMA, route, tag, io=True)

    def _where(self, gpa: int, length: int) -> tuple[int, int, _Hot | list[Piece]]:
        """``gpa`` and ``length`` as ints, checked in full, and the hot region or the pieces."""
        hot = self._hot
        fits = type(gpa) is int and type(length) is int and length >= 0
        if fits and hot[0] <= gpa and gpa + length <= hot[1]:
            return gpa, length, hot
        self._require_open()
        gpa, length = require_gpa_range(gpa, length)
        pieces = self._split(gpa, length)
        if len(pieces) != 1:
            return gpa, length, pieces
        hot = self._hot = self._hots.get(pieces[0][0], _CLOSED)
        if self._closed:  # close() ran meanwhile: do not bring the region back
            self._hot = _CLOSED
        return gpa, length, hot

    def _stage_flag(self, buf: Any, nbytes: int) -> int:
        """_OP_STAGE when the caller's buffer lies in a tagged region of this memory.

        The core then copies it through a temporary made under TCO instead of
        touching it with the route's own checks (it finds overlap with the
        range being accessed by itself, in every mode).
        """
        if not self._buffers_may_be_tagged or nbytes == 0:
            return 0
        at = int(ffi.cast("uintptr_t", buf)) & _ADDRESS_MASK
        for lo, hi in self._host_ranges:
            if at < hi and lo < at + nbytes:
                return _OP_STAGE
        return 0

    def _run(
        self,
        plan: Plan,
        op: int,
        gpa: int,
        length: int,
        where: _Hot | list[Piece],
        buf: Any,
        fill: int = 0,
    ) -> None:
        """Move one checked range: one native call with scalar arguments when it is hot."""
        if isinstance(where, list):
            self._move(plan, op, where, buf, fill)
            return
        lo, _, base, table, region, hot = where
        route, tag = plan.route, plan.tag
        if route is _CHECKED and self._kvm is not None:
            with self._kvm.in_use() as vm_fd:
                status = lib.gm_move(
                    self.tag_mode, route, op, base, table, lo, gpa - lo, length, buf, fill, tag,
                    self._pool, vm_fd,
                )  # fmt: skip
        elif route is not _CHECKED and op in (_OP_READ, _OP_WRITE):
            # No tag, no fill byte, no staging: the region's gm_hot says the rest
            # (five arguments instead of thirteen; the range fits, so no miss).
            status = (_hot_read if op == _OP_READ else _hot_write)(hot, route, gpa, length, buf)
        else:
            status = lib.gm_move(
                self.tag_mode, route, op, base, table, lo, gpa - lo, length, buf, fill, tag,
                self._pool, -1,
            )  # fmt: skip
        if status != lib.GM_OK:
            raise_for(status, f"{route.name} access", [gpa])
        if op & _OP_CHANGES and self.dirty.active and region is not None:
            self.dirty.mark_region(region, gpa - lo, length)

    def _move(self, plan: Plan, op: int, pieces: list[Piece], buf: Any, fill: int = 0) -> None:
        if not pieces:
            return
        request, _spans = self._request(plan, op, pieces, buf, fill)
        if plan.route is Route.CHECKED and self._kvm is not None:
            with self._kvm.in_use() as vm_fd:
                request.vm_fd = vm_fd
                status = lib.gm_access(request)
        else:
            status = lib.gm_access(request)
        if status != lib.GM_OK:
            raise_for(
                status,
                f"{plan.route.name} access",
                [region.gpa + offset for region, offset, _ in pieces],
            )
        if op & _OP_CHANGES and self.dirty.active:
            for region, offset, n in pieces:
                self.dirty.mark_region(region, offset, n)

    def _request(
        self, plan: Plan, op: int, pieces: list[Piece], buf: Any, fill: int = 0
    ) -> tuple[Any, Any]:
        """A native ``struct gm_access`` for ``pieces``, and the spans it points to.

        Keep both alive while the request is in use (the benchmarks reuse it).
        """
        span_array = spans(pieces)
        request = access_request(
            self.tag_mode, plan.route, plan.tag, op, span_array, len(pieces), buf, fill, self._pool
        )
        return request, span_array

    @contextmanager
    def _vm_fd_in_use(self) -> Iterator[int]:
        """The KVM VM's fd, kept open for the scope (-1 without KVM)."""
        if self._kvm is None:
            yield -1
            return
        with self._kvm.in_use() as fd:
            yield fd

    def _require_open(self) -> None:
        if self._closed:
            raise ClosedError("this GuestMemory is closed")

    def __repr__(self) -> str:
        """Show the tag mode and the regions."""
        regions = self._table[0]
        state = ", ".join(map(repr, regions)) if regions else "closed"
        return f"GuestMemory({self.tag_mode.name}: {state})"


def _hot(region: GuestRegion, native: Any) -> _Hot:
    return (region.gpa, region.end, region._base, region._table_base, region, native)


_CLOSED: _Hot = (1, 0, None, None, None, closed_hot())


# read()'s fast path copies into a scratch buffer taken from this pool and
# gives it back once its bytes are out: list.pop and list.append are atomic,
# so no two calls hold one buffer, whether on two threads or on one thread
# re-entered between the native call and the copy out (by a signal handler
# or a finalizer). The pool grows to the most reads in flight at once.
_SCRATCH: list[tuple[Any, Any]] = []  # (char[] cdata, its ffi.buffer)
_CHECKED = Route.CHECKED
# A route named without a tag resolves to the same plan every time (CHECKED,
# which needs a tag, is absent: resolve() refuses it); so does CHECKED with
# each of the 16 tags.
_CHECKED_PLANS = {tag: Plan(Route.CHECKED, tag) for tag in range(16)}
_ROUTE_PLANS: dict[Route, Plan] = {
    route: Plan(route) for route in Route if route is not Route.CHECKED
}


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


def _pairs(items: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``items`` as a list of 2-tuples (ArgumentTypeError if they are not pairs)."""
    try:
        return [(a, b) for a, b in items]
    except (TypeError, ValueError):
        raise ArgumentTypeError("expected (gpa, length) pairs") from None


def _range_pairs(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` as a list of ``(gpa, length)`` int pairs inside the GPA space."""
    return [require_gpa_range(gpa, length) for gpa, length in _pairs(ranges)]


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
