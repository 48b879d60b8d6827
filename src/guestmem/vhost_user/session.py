"""The backend's side of one connection: every request checked, then applied.

:meth:`Session.handle` takes one :class:`~guestmem.vhost_user.wire.Message`
and returns the reply payload (None when the request has none); anything
malformed raises a :class:`~guestmem.vhost_user.errors.VhostUserError`
before it changes anything, and the server then closes the connection.
Kicks come to :meth:`Session.kicked`. One thread drives a session: the
server's loop, which also serves the kicks, so no request runs while a
message is applied.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from guestmem.devices.virtio_device import RING_FEATURES
from guestmem.errors import GuestMemoryError, LengthError, UsageError, VirtqueueError
from guestmem.kinds import TagMode
from guestmem.vhost_user import payloads
from guestmem.vhost_user.device import BackendDevice
from guestmem.vhost_user.dirty_log import SharedLog
from guestmem.vhost_user.errors import (
    FeatureError,
    LogError,
    MemoryTableError,
    MessageError,
    VringError,
)
from guestmem.vhost_user.memory_table import MemoryTable, map_table
from guestmem.vhost_user.protocol import (
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    MAX_MEM_SLOTS,
    MAX_QUEUE_SIZE,
    OFFERED_PROTOCOL_FEATURES,
    U64,
    VRING_F_LOG,
    VRING_INDEX_MASK,
    VRING_NOFD,
    VRING_STATE,
    ProtocolFeature,
    Request,
)
from guestmem.vhost_user.vring import Vring
from guestmem.vhost_user.wire import Message
from guestmem.virtio import SplitQueue

F_EVENT_IDX = 1 << 29
_RING_PARTS = ("descriptor table", "available ring", "used ring")
_ALIGN = (16, 2, 4)
_FD_REQUESTS = {
    Request.SET_LOG_BASE,
    Request.SET_LOG_FD,
    Request.SET_MEM_TABLE,
    Request.ADD_MEM_REG,
    Request.REM_MEM_REG,
}
_VRING_FD_REQUESTS = {Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR}


def _is_eventfd(fd: int) -> bool:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            return any(line.startswith("eventfd-count:") for line in info)
    except OSError:
        return False


class Session:
    """The state one frontend set up: features, memory table, dirty log, vrings, the device."""

    def __init__(self, device: BackendDevice, tags: TagMode) -> None:
        """Serve ``device`` (fresh, not active) mapping guest memory with ``tags``."""
        if tags is TagMode.SOFTWARE or tags is TagMode.KVM:
            raise UsageError(
                f"a vhost-user backend maps a foreign frontend's memory: tags must be NONE "
                f"or HARDWARE, not {tags.name}"
            )
        self.device = device
        self.tags = tags
        self.offered_features = device.features | RING_FEATURES | F_PROTOCOL_FEATURES | F_LOG_ALL
        self.features: int | None = None  # acked by SET_FEATURES
        self.protocol = 0  # acked by SET_PROTOCOL_FEATURES
        self.owner = False
        self.table: MemoryTable | None = None
        self.log: SharedLog | None = None
        self.log_fd: int | None = None
        self.vrings = [Vring(i) for i in range(device.queue_count)]
        self.active = False
        self.fd_generation = 0  # changes whenever a kick fd does (the server re-watches them)
        self._handlers: dict[int, Callable[[Message], bytes | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_LOG_BASE: self._set_log_base,
            Request.SET_LOG_FD: self._set_log_fd,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.RESET_DEVICE: self._reset_device,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
        }

    # ---- the entry points ------------------------------------------------------

    @property
    def reply_ack(self) -> bool:
        """Whether REPLY_ACK was negotiated (a NEED_REPLY request then gets a u64 status)."""
        return bool(self.protocol & ProtocolFeature.REPLY_ACK)

    def handle(self, message: Message) -> bytes | None:
        """Apply one request; its reply payload, or None. The fds it keeps are taken from it."""
        handler = self._handlers.get(message.request)
        if handler is None:
            raise FeatureError(
                f"{message.name} is not served by this backend", request=message.request
            )
        self._check_fd_count(message)
        return handler(message)

    def kick_fds(self) -> dict[int, int]:
        """Each ring's kick fd -> the ring's index (what the server watches)."""
        return {v.kick: v.index for v in self.vrings if v.kick is not None}

    def kicked(self, index: int) -> None:
        """Ring ``index``'s kick fd is readable: serve what the driver made available."""
        vring = self.vrings[index]
        vring.drain_kick()
        self._serve(vring)

    def close(self) -> None:
        """The connection is over: stop the rings, close every fd, unmap memory and the log."""
        self._deactivate()
        for vring in self.vrings:
            vring.close()
        self._share_log(False)
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.log_fd is not None:
            os.close(self.log_fd)
            self.log_fd = None
        if self.table is not None:
            self.table.close()
            self.table = None

    # ---- checks every request shares ----------------------------------------------

    def _check_fd_count(self, message: Message) -> None:
        count = len(message.fds)
        request = message.request
        if request in _FD_REQUESTS or request in _VRING_FD_REQUESTS:
            return  # their handlers count them against the payload
        if count:
            raise MessageError(
                f"{message.name} carried {count} fds where none belong", request=request
            )

    def _vring(self, message: Message, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise VringError(
                f"{message.name}: vring {index} does not exist (the device has {len(self.vrings)})",
                request=message.request,
            )
        return self.vrings[index]

    def _require_protocol(self, message: Message, feature: ProtocolFeature) -> None:
        if not self.protocol & feature:
            raise FeatureError(
                f"{message.name} needs protocol feature {feature.name}, not negotiated",
                request=message.request,
            )

    # ---- features and ownership ----------------------------------------------------

    def _get_features(self, message: Message) -> bytes:
        payloads.empty(message)
        return U64.pack(self.offered_features)

    def _set_features(self, message: Message) -> None:
        features = payloads.u64(message)
        extra = features & ~self.offered_features
        if extra:
            raise FeatureError(
                f"{message.name}: bits {extra:#x} were not offered", request=message.request
            )
        if self.features is not None and any(v.started for v in self.vrings):
            changed = (features ^ self.features) & ~F_LOG_ALL
            if changed:
                raise FeatureError(
                    f"{message.name}: bits {changed:#x} changed while rings run "
                    "(only VHOST_F_LOG_ALL may)",
                    request=message.request,
                )
        self.features = features
        self._update_logging(message)

    def _get_protocol_features(self, message: Message) -> bytes:
        payloads.empty(message)
        return U64.pack(int(OFFERED_PROTOCOL_FEATURES))

    def _set_protocol_features(self, message: Message) -> None:
        features = payloads.u64(message)
        extra = features & ~int(OFFERED_PROTOCOL_FEATURES)
        if extra:
            raise FeatureError(
                f"{message.name}: bits {extra:#x} were not offered", request=message.request
            )
        self.protocol = features

    def _set_owner(self, message: Message) -> None:
        payloads.empty(message)
        if self.owner:
            raise MessageError(
                f"{message.name}: the session has an owner already", request=message.request
            )
        self.owner = True

    def _reset_owner(self, message: Message) -> None:
        payloads.empty(message)
        self._deactivate()
        for vring in self.vrings:
            vring.stop()
            vring.enabled = False

    def _reset_device(self, message: Message) -> None:
        payloads.empty(message)
        self._require_protocol(message, ProtocolFeature.RESET_DEVICE)
        self._deactivate()
        for vring in self.vrings:
            vring.close()
        self.vrings = [Vring(i) for i in range(len(self.vrings))]
        self.fd_generation += 1
        self.features = None
        self._update_logging(message)

    def _get_queue_num(self, message: Message) -> bytes:
        payloads.empty(message)
        self._require_protocol(message, ProtocolFeature.MQ)
        return U64.pack(len(self.vrings))

    # ---- the config space -----------------------------------------------------------

    def _get_config(self, message: Message) -> bytes:
        self._require_protocol(message, ProtocolFeature.CONFIG)
        access = payloads.config(message, with_data=False)
        space = self.device.config()
        data = space[access.offset : access.offset + access.size]
        data = data.ljust(access.size, b"\0")
        return message.payload[: len(message.payload) - access.size] + data

    def _set_config(self, message: Message) -> None:
        self._require_protocol(message, ProtocolFeature.CONFIG)
        access = payloads.config(message, with_data=True)
        if access.flags not in (0, 1):
            raise MessageError(
                f"{message.name}: flags {access.flags:#x} (0 or 1)", request=message.request
            )
        self.device.write_config(access.offset, access.data)

    # ---- memory and the dirty log ------------------------------------------------

    def _set_mem_table(self, message: Message) -> None:
        regions = payloads.memory_table(message)
        self._install(map_table(regions, message.fds, self.tags, message.request), message)

    def _get_max_mem_slots(self, message: Message) -> bytes:
        payloads.empty(message)
        self._require_protocol(message, ProtocolFeature.CONFIGURE_MEM_SLOTS)
        return U64.pack(MAX_MEM_SLOTS)

    def _add_mem_reg(self, message: Message) -> None:
        self._require_protocol(message, ProtocolFeature.CONFIGURE_MEM_SLOTS)
        region = payloads.single_region(message)
        if len(message.fds) != 1:
            raise MessageError(
                f"{message.name}: needs exactly one fd, got {len(message.fds)}",
                request=message.request,
            )
        regions = list(self.table.regions) if self.table else []
        fds = list(self.table.fds) if self.table else []
        table = map_table(
            [*regions, region], [*fds, message.fds[0]], self.tags, message.request,
            max_regions=MAX_MEM_SLOTS,
        )  # fmt: skip
        self._install(table, message)

    def _rem_mem_reg(self, message: Message) -> None:
        self._require_protocol(message, ProtocolFeature.CONFIGURE_MEM_SLOTS)
        region = payloads.single_region(message)
        if len(message.fds) > 1:  # one fd is tolerated (the spec's MAY), and closed
            raise MessageError(
                f"{message.name}: carried {len(message.fds)} fds", request=message.request
            )
        table = self.table
        found = [
            i
            for i, r in enumerate(table.regions if table else ())
            if (r.gpa, r.size, r.user_address) == (region.gpa, region.size, region.user_address)
        ]
        if table is None or not found:
            raise MemoryTableError(
                f"{message.name}: no region at guest {region.gpa:#x} of size {region.size:#x} "
                f"and user address {region.user_address:#x}",
                request=message.request,
            )
        keep = [i for i in range(len(table.regions)) if i != found[0]]
        if not keep:
            if any(v.started for v in self.vrings):
                raise VringError(
                    f"{message.name}: the last region goes while rings run",
                    request=message.request,
                )
            self._share_log(False)
            self.table = None
            table.close()
            return
        regions = [table.regions[i] for i in keep]
        fds = [table.fds[i] for i in keep]
        self._install(map_table(regions, fds, self.tags, message.request), message)

    def _install(self, table: MemoryTable, message: Message) -> None:
        """Make ``table`` the session's, running rings rebuilt over it (or close it and raise)."""
        try:
            if self._logging() and self.log is not None and self.log.covers < table.end:
                raise LogError(
                    f"{message.name}: the dirty log covers GPAs below {self.log.covers:#x}, "
                    f"not the table up to {table.end:#x}",
                    request=message.request,
                )
            queues = self._queues_over(table, message)
        except BaseException:
            table.close()
            raise
        old, self.table = self.table, table
        was_active = self.active
        self._deactivate()
        for vring, queue in zip(self.vrings, queues, strict=True):
            vring.queue = queue
        try:
            self._update_logging(message)
        finally:
            if old is not None:
                old.close()
        if was_active:
            self._activate()

    def _queues_over(self, table: MemoryTable, message: Message) -> list[SplitQueue | None]:
        """The started rings' queues rebuilt over ``table`` with their indices kept."""
        out: list[SplitQueue | None] = []
        for vring in self.vrings:
            if vring.queue is None:
                out.append(None)
                continue
            old = vring.queue
            queue = self._new_queue(vring, table, message)
            queue.set_indices(old.last_avail_idx, old.used_idx)
            out.append(queue)
        return out

    def _set_log_base(self, message: Message) -> bytes:
        self._require_protocol(message, ProtocolFeature.LOG_SHMFD)
        size, offset = payloads.log(message)
        if len(message.fds) != 1:
            raise MessageError(
                f"{message.name}: needs exactly one fd, got {len(message.fds)}",
                request=message.request,
            )
        log = SharedLog(message.fds[0], size, offset, message.request)
        if self.table is not None and log.covers < self.table.end:
            log.close()
            raise LogError(
                f"{message.name}: a log of {size} bytes covers GPAs below {log.covers:#x}, "
                f"not the table up to {self.table.end:#x}",
                request=message.request,
            )
        self._share_log(False)
        old, self.log = self.log, log
        if old is not None:
            old.close()
        self._update_logging(message)
        return U64.pack(0)

    def _set_log_fd(self, message: Message) -> None:
        payloads.empty(message)
        if len(message.fds) != 1:
            raise MessageError(
                f"{message.name}: needs exactly one fd, got {len(message.fds)}",
                request=message.request,
            )
        old, self.log_fd = self.log_fd, message.take_fds()[0]
        if old is not None:
            os.close(old)

    def _logging(self) -> bool:
        return bool(self.features is not None and self.features & F_LOG_ALL and self.log)

    def _update_logging(self, message: Message) -> None:
        try:
            self._share_log(self._logging())
        except LengthError as err:
            raise LogError(f"{message.name}: {err}", request=message.request) from err

    def _share_log(self, on: bool) -> None:
        if self.table is None:
            return
        dirty = self.table.memory.dirty
        if on and self.log is not None:
            dirty.share_bitmap(self.log.bits)
        else:
            dirty.unshare_bitmap()

    # ---- vrings -----------------------------------------------------------------------

    def _set_vring_num(self, message: Message) -> None:
        index, num = payloads.vring_state(message)
        vring = self._vring(message, index)
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise VringError(
                f"{message.name}: size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}",
                request=message.request,
            )
        self._require_stopped(message, vring)
        vring.num = num

    def _set_vring_base(self, message: Message) -> None:
        index, num = payloads.vring_state(message)
        vring = self._vring(message, index)
        if num > 0xFFFF:
            raise VringError(
                f"{message.name}: base {num} is not a 16-bit split-ring index",
                request=message.request,
            )
        self._require_stopped(message, vring)
        vring.base = num

    def _require_stopped(self, message: Message, vring: Vring) -> None:
        if vring.started:
            raise VringError(
                f"{message.name}: vring {vring.index} is running (stop it with GET_VRING_BASE)",
                request=message.request,
            )

    def _set_vring_addr(self, message: Message) -> None:
        addresses = payloads.vring_addresses(message)
        vring = self._vring(message, addresses.index)
        if addresses.flags & ~VRING_F_LOG:
            raise VringError(
                f"{message.name}: flags {addresses.flags:#x} (only VHOST_VRING_F_LOG is known)",
                request=message.request,
            )
        table = self._require_table(message)
        if vring.num == 0:
            raise VringError(
                f"{message.name}: vring {vring.index} has no size yet (SET_VRING_NUM first)",
                request=message.request,
            )
        gpas = self._ring_gpas(
            message, table, vring.num, (addresses.desc, addresses.avail, addresses.used)
        )
        log_used = bool(addresses.flags & VRING_F_LOG)
        if log_used and addresses.log != gpas[2]:
            raise VringError(
                f"{message.name}: the used ring's log address {addresses.log:#x} is not its "
                f"guest address {gpas[2]:#x}",
                request=message.request,
            )
        previous = (vring.desc_gpa, vring.avail_gpa, vring.used_gpa)
        vring.desc_gpa, vring.avail_gpa, vring.used_gpa = gpas
        vring.log_used = log_used
        if vring.queue is not None and previous != gpas:
            old = vring.queue
            try:
                queue = self._new_queue(vring, table, message)
            except BaseException:
                vring.desc_gpa, vring.avail_gpa, vring.used_gpa = previous
                raise
            queue.set_indices(old.last_avail_idx, old.used_idx)
            self._deactivate()
            vring.queue = queue
            self._activate()

    def _require_table(self, message: Message) -> MemoryTable:
        if self.table is None:
            raise VringError(f"{message.name} before SET_MEM_TABLE", request=message.request)
        return self.table

    def _ring_gpas(
        self, message: Message, table: MemoryTable, num: int, addresses: tuple[int, int, int]
    ) -> tuple[int, int, int]:
        lengths = (16 * num, 6 + 2 * num, 6 + 8 * num)
        gpas = []
        for part, address, length, align in zip(
            _RING_PARTS, addresses, lengths, _ALIGN, strict=True
        ):
            if address % align:
                raise VringError(
                    f"{message.name}: the {part} at {address:#x} is not {align}-byte aligned",
                    request=message.request,
                )
            gpa = table.user_to_gpa(address, length)
            if gpa is None:
                raise VringError(
                    f"{message.name}: the {part} [{address:#x}, +{length:#x}) is not inside "
                    "one region of the memory table",
                    request=message.request,
                )
            gpas.append(gpa)
        return gpas[0], gpas[1], gpas[2]

    def _new_queue(self, vring: Vring, table: MemoryTable, message: Message) -> SplitQueue:
        assert vring.desc_gpa is not None and vring.avail_gpa is not None
        assert vring.used_gpa is not None
        event_idx = bool(self.features is not None and self.features & F_EVENT_IDX)
        try:
            return SplitQueue(
                table.memory, vring.num, vring.desc_gpa, vring.avail_gpa, vring.used_gpa,
                event_idx=event_idx,
            )  # fmt: skip
        except (VirtqueueError, GuestMemoryError) as err:
            raise VringError(
                f"{message.name}: vring {vring.index}: {err}", request=message.request
            ) from err

    def _vring_fd(self, message: Message) -> tuple[Vring, int | None]:
        value = payloads.u64(message)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise MessageError(
                f"{message.name}: bits {value & ~(VRING_INDEX_MASK | VRING_NOFD):#x} are reserved",
                request=message.request,
            )
        vring = self._vring(message, value & VRING_INDEX_MASK)
        wanted = 0 if value & VRING_NOFD else 1
        if len(message.fds) != wanted:
            raise MessageError(
                f"{message.name}: {'no fd' if not wanted else 'one fd'} expected "
                f"(the invalid-fd flag is {'set' if not wanted else 'clear'}), got "
                f"{len(message.fds)}",
                request=message.request,
            )
        if not wanted:
            return vring, None
        if not _is_eventfd(message.fds[0]):
            raise MessageError(f"{message.name}: the fd is not an eventfd", request=message.request)
        return vring, message.take_fds()[0]

    def _set_vring_kick(self, message: Message) -> None:
        vring, fd = self._vring_fd(message)
        if fd is None:
            raise VringError(
                f"{message.name}: polling (no kick fd) is not offered", request=message.request
            )
        try:
            table = self._require_table(message)
            if vring.num == 0 or vring.desc_gpa is None:
                raise VringError(
                    f"{message.name}: vring {vring.index} has no size or addresses yet",
                    request=message.request,
                )
            queue = self._new_queue(vring, table, message)
            used_gpa = vring.used_gpa
            assert used_gpa is not None  # desc_gpa is set: so are the others
            used_idx = int.from_bytes(table.memory.read(used_gpa + 2, 2), "little")
            queue.set_indices(vring.base, used_idx)
        except BaseException:
            os.close(fd)
            raise
        self._deactivate()
        vring.replace_fd("kick", fd)
        self.fd_generation += 1
        vring.queue = queue
        if self.features is None or not self.features & F_PROTOCOL_FEATURES:
            vring.enabled = True
        self._activate()
        self._serve(vring)

    def _set_vring_call(self, message: Message) -> None:
        vring, fd = self._vring_fd(message)
        vring.replace_fd("call", fd)

    def _set_vring_err(self, message: Message) -> None:
        vring, fd = self._vring_fd(message)
        vring.replace_fd("err", fd)

    def _get_vring_base(self, message: Message) -> bytes:
        index, _num = payloads.vring_state(message)
        vring = self._vring(message, index)
        self._deactivate()
        base = vring.stop()
        vring.replace_fd("kick", None)
        self.fd_generation += 1
        return VRING_STATE.pack(index, base)

    def _set_vring_enable(self, message: Message) -> None:
        index, num = payloads.vring_state(message)
        vring = self._vring(message, index)
        if num not in (0, 1):
            raise VringError(f"{message.name}: {num} is neither 0 nor 1", request=message.request)
        vring.enabled = bool(num)
        self._serve(vring)

    # ---- the device -------------------------------------------------------------------

    def _activate(self) -> None:
        if self.active or self.table is None or not all(v.started for v in self.vrings):
            return
        queues = [v.queue for v in self.vrings if v.queue is not None]
        self.device.use_memory(self.table.memory)
        features = (self.features or 0) & ~(F_PROTOCOL_FEATURES | F_LOG_ALL)
        self.device.activate(queues, features, self._used)
        self.active = True

    def _deactivate(self) -> None:
        if self.active:
            self.device.reset()
            self.active = False

    def _used(self) -> None:
        for vring in self.vrings:
            vring.signal()

    def _serve(self, vring: Vring) -> None:
        if not (self.active and vring.started and vring.enabled):
            return
        try:
            interrupt = self.device.notify(vring.index)
        except VirtqueueError as err:
            vring.signal_error()
            raise VringError(f"vring {vring.index}: {err}") from err
        if interrupt:
            vring.signal()


__all__ = ["Session"]
