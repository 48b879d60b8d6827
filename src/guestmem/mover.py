"""The mover: how bytes go between guest memory and a caller's buffer.

Every data access takes the same steps: a :class:`~guestmem.plan.Plan`
(the route, and CHECKED's tag), the pieces of the address space it lands on,
one native call, and the dirty marks of what it wrote. :class:`Mover` does
them once for every caller: the data API of :class:`~guestmem.GuestMemory`
(which is a Mover), the DMA scopes, system-call I/O and the virtqueue. Its
fast path (a tagless access inside the region used last, on a route known
without resolving) is one method, ``_fast``, that readinto, write and fill
call; read, the most used, has its steps written out to save the call.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from guestmem._args import (
    check_byte,
    readable_buffer,
    require_gpa_range,
    require_length,
    writable_buffer,
)
from guestmem._native import (
    MISS,
    NULL,
    OK,
    OP_FILL,
    OP_READ,
    OP_STAGE,
    OP_WRITE,
    SCRATCH_SIZE,
    access_request,
    address_of,
    bounce_pool,
    from_buffer,
    hot_fill,
    hot_move,
    hot_read,
    hot_write,
    raise_for,
    run_access,
    scratch,
    spans,
)
from guestmem.address_space import AddressSpace, Piece
from guestmem.dirty import DirtyLog
from guestmem.errors import ArgumentTypeError
from guestmem.kinds import Access, Policy, Route, TagMode
from guestmem.kvm import KvmVm, memslots_vm
from guestmem.native_regions import CLOSED_HOT, Hot, NativeRegions
from guestmem.plan import Plan, defaults, resolve
from guestmem.region import GuestRegion

_OP_CHANGES = OP_WRITE | OP_FILL  # an op that writes guest memory
_OP_STAGE = OP_STAGE  # flag: the caller's buffer is tagged guest memory
_ADDRESS_MASK = (1 << 56) - 1  # a host address without its tag byte
_OK, _MISS = OK, MISS
_hot_read, _hot_write, _hot_fill, _hot_move = hot_read, hot_write, hot_fill, hot_move
_from_buffer = from_buffer  # one lookup less on the fast path
_CHECKED = Route.CHECKED
# The fast path's view of the region used last (a native_regions.Hot) is one
# attribute, swapped whole, so a thread never sees half of it; CLOSED_HOT once closed.
_Hot = Hot
_CLOSED = CLOSED_HOT
# A route named without a tag resolves to the same plan every time (CHECKED,
# which needs a tag, is absent: resolve() refuses it).
_ROUTE_PLANS: dict[Route, Plan] = {
    route: Plan(route) for route in Route if route is not Route.CHECKED
}
# read()'s fast path copies into a scratch buffer taken from this pool and
# gives it back once its bytes are out: list.pop and list.append are atomic,
# so no two calls hold one buffer, whether on two threads or on one thread
# re-entered between the native call and the copy out (by a signal handler
# or a finalizer). The pool grows to the most reads in flight at once.
_SCRATCH: list[tuple[Any, Any]] = []  # (char[] cdata, its ffi.buffer)
_take_scratch, _give_scratch = _SCRATCH.pop, _SCRATCH.append


class Mover:
    """Moves data between an :class:`AddressSpace` and callers' buffers, marking what it wrote.

    It holds what a move needs besides the regions: the policy and its
    ready plans, the bounce pool, the KVM VM (TagMode.KVM's CHECKED asks it
    for tags) and the dirty log (:attr:`dirty`).
    """

    def __init__(
        self,
        space: AddressSpace,
        *,
        policy: Policy | None,
        bounce_buffer_size: int,
        bounce_buffers: int,
        kvm: KvmVm | None,
    ) -> None:
        """Move data over ``space``; under TagMode.KVM its regions become memslots of ``kvm``.

        Without ``kvm`` a new VM with MTE enabled is made; :meth:`stop` closes the VM.
        """
        self.address_space = space
        self.tag_mode: TagMode = space.tag_mode
        # Under HARDWARE a caller's buffer in guest memory is tagged: see _stage_flag.
        self._buffers_may_be_tagged = self.tag_mode is TagMode.HARDWARE
        self.policy = Policy() if policy is None else policy
        size = require_length(bounce_buffer_size)
        count = require_length(bounce_buffers)
        self._pool = bounce_pool(size, count)
        regions = space.regions
        self._kvm = memslots_vm(regions, kvm) if self.tag_mode is TagMode.KVM else None
        vm_fd = -1 if self._kvm is None else self._kvm.fd
        native = NativeRegions.of(self.tag_mode, regions, vm_fd, self._pool)
        self.native_space: Any = native.space
        """The regions as native code walks them (``struct gm_space``): every native
        entry over guest addresses takes it (and marks its dirty bits)."""
        self.dirty = DirtyLog(space, self.native_space)
        self.native_entries: tuple[Any, dict[GuestRegion, Any]] = (native.space, native.entries)
        """The native space and each region's entry in it (a ``struct gm_space_region *``),
        as one value swapped whole at :meth:`stop`: native calls over regions read both
        at once, so a span never names an entry of a space the caller does not hold."""
        self._hots = native.hots
        self._hot: _Hot = self._hots[regions[0]]

    @property
    def kvm(self) -> KvmVm | None:
        """The KVM VM whose memslots the regions are (TagMode.KVM), else None."""
        return self._kvm

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

    def stop(self) -> None:
        """Serve no more moves (close the address space first) and close the KVM VM.

        A call that already found its region finishes on it; the VM fd is
        closed when the last in-flight ioctl on it has returned.
        """
        self._hot = _CLOSED
        empty = NativeRegions.empty(self.tag_mode)
        self._hots = empty.hots
        self.native_space = empty.space
        self.native_entries = (empty.space, empty.entries)
        self.dirty.detach()
        if self._kvm is not None:
            self._kvm.close()

    # ---- the data API ---------------------------------------------------------------

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
            # _fast() written out: the call would cost ~40 ns of ~550, the
            # most used call's whole share of issue 13's gain (docs/benchmarks.md).
            try:
                fast = self._fast_routes[access]
            except (KeyError, TypeError):
                fast = None
            if route is not None and fast is not None:
                fast = route if type(route) is Route else None
            if fast is not None:
                try:
                    pair = _take_scratch()
                except IndexError:
                    pair = scratch()
                try:
                    status = _hot_read(self._hot[3], fast, gpa, length, pair[0])
                except OverflowError:  # gpa past 2**64
                    status = _MISS
                if status == _OK:
                    data: bytes = pair[1][:length]
                    _give_scratch(pair)
                    return data
                _give_scratch(pair)
                if status != _MISS:
                    raise_for(status, f"{fast.name} access", [gpa])
        plan = self.plan_for(access, route, tag)
        gpa, length, where = self._where(gpa, length)
        out = bytearray(length)
        self._run(plan, OP_READ, gpa, length, where, _from_buffer(out))
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
            n = len(buffer)
            if self._fast(_hot_read, access, route, gpa, n, _from_buffer(buffer)):
                return n
        target = writable_buffer(buffer)
        plan = self.plan_for(access, route, tag)
        gpa, n, where = self._where(gpa, target.nbytes)
        buf = _from_buffer(target, require_writable=True)
        op = OP_READ | (self._stage_flag(buf, n) if self._buffers_may_be_tagged else 0)
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
            # A bytes object goes to the core as it is; neither kind is ever
            # guest memory, so nothing needs staging.
            buf = data if kind is bytes else _from_buffer(data)
            if self._fast(_hot_write, access, route, gpa, len(data), buf):
                return
        source = readable_buffer(data)
        plan = self.plan_for(access, route, tag)
        gpa, n, where = self._where(gpa, source.nbytes)
        buf = _from_buffer(source)
        op = OP_WRITE | (self._stage_flag(buf, n) if self._buffers_may_be_tagged else 0)
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
        fast = tag is None and type(gpa) is int and type(length) is int and type(byte) is int
        fast = fast and length >= 0 and 0 <= byte <= 255
        if fast and self._fast(_hot_fill, access, route, gpa, length, byte):
            return
        value = check_byte(byte)
        plan = self.plan_for(access, route, tag)
        gpa, n, where = self._where(gpa, length)
        self._run(plan, OP_FILL, gpa, n, where, NULL, value)

    def readv(
        self,
        ranges: Sequence[tuple[int, int]],
        *,
        access: Access = Access.DMA,
        route: Route | None = None,
        tag: int | None = None,
    ) -> bytes:
        """Gather the guest ranges ``[(gpa, length), ...]`` into one bytes object."""
        plan = self.plan_for(access, route, tag)
        pieces = self.pieces_of(ranges, None)
        out = bytearray(sum(n for _, _, n in pieces))
        self.move(plan, OP_READ, pieces, _from_buffer(out))
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
        target = writable_buffer(buffer)
        plan = self.plan_for(access, route, tag)
        pieces = self.pieces_of(ranges, target.nbytes)
        buf = _from_buffer(target, require_writable=True)
        op = OP_READ | self._stage_flag(buf, target.nbytes)
        self.move(plan, op, pieces, buf)
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
        source = readable_buffer(data)
        plan = self.plan_for(access, route, tag)
        pieces = self.pieces_of(ranges, source.nbytes)
        buf = _from_buffer(source)
        self.move(plan, OP_WRITE | self._stage_flag(buf, source.nbytes), pieces, buf)

    # ---- the steps, for the library's own layers (DMA, virtio, migration) ------------

    def plan_for(self, access: Access, route: Route | None, tag: int | None) -> Plan:
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

    def io_plan_for(self, route: Route | None, tag: int | None) -> Plan:
        """A system call's access resolved (``resolve(..., io=True)``), common plans kept ready."""
        if tag is None:
            if route is None:
                return self._io_default
            if type(route) is Route and route.syscall_safe and route in _ROUTE_PLANS:
                return _ROUTE_PLANS[route]
        return resolve(self._policy, Access.DMA, route, tag, io=True)

    def pieces_of(self, ranges: Sequence[tuple[int, int]], nbytes: int | None) -> list[Piece]:
        """Translate every range before anything moves (see AddressSpace.pieces).

        One plain range inside the region used last needs no more checking.
        """
        pair = ranges[0] if type(ranges) is list and len(ranges) == 1 else None
        if type(pair) is tuple and len(pair) == 2:
            gpa, length = pair
            lo, end, region, _ = self._hot
            fits = type(gpa) is int and type(length) is int and nbytes in (None, length)
            if fits and region is not None and length >= 0 and lo <= gpa <= end - length:
                return [(region, gpa - lo, length)]
        return self.address_space.pieces(ranges, nbytes)

    def move(self, plan: Plan, op: int, pieces: list[Piece], buf: Any, fill: int = 0) -> None:
        """Carry out ``op`` over ``pieces`` (already translated) in one native call; mark writes."""
        if not pieces:
            return
        request, _spans = self.access_request(plan, op, pieces, buf, fill)
        if plan.route is _CHECKED and self._kvm is not None:
            with self._kvm.in_use() as vm_fd:
                request.vm_fd = vm_fd
                status = run_access(request)
        else:
            status = run_access(request)
        if status != _OK:
            raise_for(
                status,
                f"{plan.route.name} access",
                [region.gpa + offset for region, offset, _ in pieces],
            )
        # A write or fill marked its pages dirty in the core (the spans name their regions).

    def mark_written(self, pieces: list[Piece]) -> None:
        """Mark ``pieces`` dirty (while the dirty log is on).

        Only the writes the core cannot see come here: by device code in a
        DMA scope. The core marks the rest itself: gm_access's writes and
        fills, the gm_hot entries', tag changes, system-call I/O into guest
        memory, the virtqueue's used ring and a decoded stream's pages.
        """
        if self.dirty.active:
            for region, offset, n in pieces:
                self.dirty.mark_region(region, offset, n)

    def access_request(
        self, plan: Plan, op: int, pieces: list[Piece], buf: Any, fill: int = 0
    ) -> tuple[Any, Any]:
        """A native ``struct gm_access`` for ``pieces``, and what it points to.

        Keep both alive while the request is in use (the benchmarks reuse it).
        A write or fill through it marks its pages dirty.
        """
        space, entries = self.native_entries
        span_array = spans(pieces, entries)
        request = access_request(
            self.tag_mode, plan.route, plan.tag, op, span_array, len(pieces), buf, fill,
            self._pool, space,
        )  # fmt: skip
        return request, (span_array, space)

    @contextmanager
    def vm_fd_in_use(self) -> Iterator[int]:
        """The KVM VM's fd, kept open for the scope (-1 without KVM)."""
        if self._kvm is None:
            yield -1
            return
        with self._kvm.in_use() as fd:
            yield fd

    # ---- inside the mover -----------------------------------------------------------

    def _fast(
        self, call: Any, access: Access, route: Route | None, gpa: int, n: int, arg: Any
    ) -> bool:
        """The fast path: ``call`` (a gm_hot_* entry) on the region used last, if it can.

        True: done (a write or fill marked dirty by the core). False: the general path must
        take the call (it validates it and says what is wrong). Only the
        route is looked up here, never resolved; the core refuses CHECKED.
        readinto, write and fill call it; read has the same steps written
        out (test_fastpath.py holds every one of the four to the general path).
        """
        try:
            fast = self._fast_routes[access]
        except (KeyError, TypeError):
            return False
        if route is not None:
            if type(route) is not Route:
                return False
            fast = route
        hot = self._hot
        try:
            status = call(hot[3], fast, gpa, n, arg)
        except OverflowError:  # gpa past 2**64
            return False
        if status == _OK:
            return True
        if status != _MISS:
            raise_for(status, f"{fast.name} access", [gpa])
        return False

    def _where(self, gpa: int, length: int) -> tuple[int, int, _Hot | list[Piece]]:
        """``gpa`` and ``length`` as ints, checked in full, and the hot region or the pieces."""
        hot = self._hot
        fits = type(gpa) is int and type(length) is int and length >= 0
        if fits and hot[0] <= gpa and gpa + length <= hot[1]:
            return gpa, length, hot
        space = self.address_space
        space.require_open()
        gpa, length = require_gpa_range(gpa, length)
        pieces = space.split(gpa, length)
        if len(pieces) != 1:
            return gpa, length, pieces
        hot = self._hot = self._hots.get(pieces[0][0], _CLOSED)
        if space.closed:  # close() ran meanwhile: do not bring the region back
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
        at = address_of(buf) & _ADDRESS_MASK
        return _OP_STAGE if self.address_space.holds_host_range(at, nbytes) else 0

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
            self.move(plan, op, where, buf, fill)
            return
        hot = where[3]
        route, tag = plan.route, plan.tag
        if route is not _CHECKED and op in (OP_READ, OP_WRITE):
            # No tag, no fill byte, no staging: the region's gm_hot says the rest
            # (five arguments instead of nine; the range fits, so no miss).
            status = (_hot_read if op == OP_READ else _hot_write)(hot, route, gpa, length, buf)
        elif route is _CHECKED and self._kvm is not None:
            with self._kvm.in_use() as vm_fd:
                status = _hot_move(hot, route, op, gpa, length, buf, fill, tag, vm_fd)
        else:
            status = _hot_move(hot, route, op, gpa, length, buf, fill, tag, -1)
        if status != _OK:
            raise_for(status, f"{route.name} access", [gpa])
        # A write or fill marked its pages dirty in the core.
