"""The virtio-mmio transport, version 2 (virtio 1.x, section 4.2), for one device.

One transport of the devices in this package (each a
:class:`~guestmem.devices.virtio_device.VirtioDevice`, which never knows
this module): the VMM maps one window per device on its MMIO bus.

The guest finds the device through the device tree (``virtio,mmio``), reads
its identity and features, negotiates, places each queue's rings anywhere
in guest RAM and kicks the device through QueueNotify (an MMIO exit, or an
ioeventfd the VMM's I/O thread serves: :meth:`MmioTransport.notify_queue`);
the device raises the transport's interrupt, which the window's
:class:`~guestmem.devices.interrupt.InterruptLine` follows as a condition
(up when InterruptStatus becomes non-zero, down when it clears).
The rings themselves are :class:`guestmem.virtio.SplitQueue` objects over
guest memory; what the device does with a queue's requests is the
:class:`VirtioDevice`'s business. A device the guest misuses (a ring
outside RAM, a malformed chain) goes to DEVICE_NEEDS_RESET and raises the
config-change interrupt, as the specification asks; it never takes the VMM
down.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import guestmem as gm
from guestmem.devices.interrupt import InterruptLine
from guestmem.devices.virtio_device import (
    F_EVENT_IDX,
    F_VERSION_1,
    RING_FEATURES,
    S_DRIVER_OK,
    S_FEATURES_OK,
    S_NEEDS_RESET,
    VirtioDevice,
    is_active,
)
from guestmem.devices.virtio_mmio_state import (
    FEATURES_SEL_PAST,
    STATE_VERSION,
    QueueState,
    TransportState,
    decode_state,
)

# InterruptStatus's bits and the largest QueueNum: the registers' meaning, which
# the saved state's checks share; they are this transport's names too.
from guestmem.devices.virtio_mmio_state import INT_CONFIG as INT_CONFIG
from guestmem.devices.virtio_mmio_state import INT_USED as INT_USED
from guestmem.devices.virtio_mmio_state import QUEUE_SIZE_MAX as QUEUE_SIZE_MAX
from guestmem.saved_state import Reader, Writer
from guestmem.virtio import SplitQueue

MAGIC = 0x7472_6976  # "virt"
VERSION = 2
VENDOR = 0x4D47_5547  # "GUGM"

(MAGIC_VALUE, VERSION_REG, DEVICE_ID, VENDOR_ID, DEVICE_FEATURES, DEVICE_FEATURES_SEL,
 DRIVER_FEATURES, DRIVER_FEATURES_SEL, QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY,
 QUEUE_NOTIFY, INTERRUPT_STATUS, INTERRUPT_ACK, STATUS, QUEUE_DESC_LOW, QUEUE_DESC_HIGH,
 QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH,
 CONFIG_GENERATION, CONFIG) = (
    0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044,
    0x050, 0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x0FC, 0x100,
)  # fmt: skip
_ADDRESS_REGISTERS = {
    QUEUE_DESC_LOW: ("desc", 0), QUEUE_DESC_HIGH: ("desc", 32),
    QUEUE_DRIVER_LOW: ("avail", 0), QUEUE_DRIVER_HIGH: ("avail", 32),
    QUEUE_DEVICE_LOW: ("used", 0), QUEUE_DEVICE_HIGH: ("used", 32),
}  # fmt: skip


class _QueueRegisters:
    """What the driver set up for one queue before QueueReady."""

    def __init__(self) -> None:
        self.size = QUEUE_SIZE_MAX
        self.ready = False
        self.address = {"desc": 0, "avail": 0, "used": 0}

    @classmethod
    def of(cls, state: QueueState) -> _QueueRegisters:
        queue = cls()
        queue.size, queue.ready = state.size, state.ready
        queue.address = {"desc": state.desc, "avail": state.avail, "used": state.used}
        return queue


class MmioTransport:
    """One virtio-mmio window: ``read``/``write`` from the VMM's MMIO dispatch."""

    def __init__(self, memory: gm.GuestMemory, device: VirtioDevice, line: InterruptLine) -> None:
        """The transport of ``device`` at reset; it drives ``line`` as InterruptStatus says."""
        self._memory = memory
        self.device = device
        self._line = line
        self._lock = threading.RLock()
        self._offered = device.features | RING_FEATURES
        self._level = False
        self.kicks_by_exit = 0  # QueueNotify writes that reached the VMM as MMIO exits
        self.kicks_by_eventfd = 0  # and those KVM signalled on an ioeventfd instead
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self.driver_features = 0
        self._queue_sel = 0
        self._queues_set_up = [_QueueRegisters() for _ in range(self.device.queue_count)]
        self.queues: list[SplitQueue] = []
        self._interrupt = 0
        self._generation = 0

    def read(self, offset: int, size: int) -> int:
        """A register, or bytes of the config space, as the guest reads them."""
        with self._lock:
            if offset >= CONFIG:
                config = self.device.config()
                start = offset - CONFIG
                return int.from_bytes(config[start : start + size].ljust(size, b"\0"), "little")
            if offset == MAGIC_VALUE:
                return MAGIC
            if offset == VERSION_REG:
                return VERSION
            if offset == DEVICE_ID:
                return self.device.device_id
            if offset == VENDOR_ID:
                return VENDOR
            if offset == DEVICE_FEATURES:
                return self._offered >> (32 * self._device_features_sel) & 0xFFFF_FFFF
            if offset == QUEUE_NUM_MAX:
                return QUEUE_SIZE_MAX if self._selected() is not None else 0
            if offset == QUEUE_READY:
                queue = self._selected()
                return int(queue is not None and queue.ready)
            if offset == INTERRUPT_STATUS:
                return self._interrupt
            if offset == STATUS:
                return self.status
            if offset == CONFIG_GENERATION:
                return self._generation
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        """A register write from the guest; config space writes go to the device."""
        interrupt = False
        with self._lock:
            if offset >= CONFIG:
                self.device.write_config(offset - CONFIG, _le(value, size))
            elif offset == DEVICE_FEATURES_SEL:
                self._device_features_sel = value
            elif offset == DRIVER_FEATURES_SEL:
                self._driver_features_sel = value
            elif offset == DRIVER_FEATURES and self._driver_features_sel in (0, 1):
                shift = 32 * self._driver_features_sel
                kept = self.driver_features & ~(0xFFFF_FFFF << shift)
                self.driver_features = (
                    kept | (value & self._offered >> shift & 0xFFFF_FFFF) << shift
                )
            elif offset == QUEUE_SEL:
                self._queue_sel = value
            elif offset == QUEUE_NUM:
                self._set_queue_size(value)
            elif offset in _ADDRESS_REGISTERS:
                self._set_queue_address(offset, value)
            elif offset == QUEUE_READY:
                queue = self._selected()
                if queue is not None:
                    queue.ready = bool(value & 1)
            elif offset == QUEUE_NOTIFY:
                self.kicks_by_exit += 1
                interrupt = self._notify(value)
            elif offset == INTERRUPT_ACK:
                self._interrupt &= ~value
                self._update_irq()
            elif offset == STATUS:
                self._set_status(value)
        if interrupt:
            self.raise_interrupt(INT_USED)

    def notify_queue(self, queue: int) -> None:
        """The driver kicked ``queue`` through an ioeventfd: serve it, as a QueueNotify write."""
        with self._lock:
            self.kicks_by_eventfd += 1
            interrupt = self._notify(queue)
        if interrupt:
            self.raise_interrupt(INT_USED)

    def raise_interrupt(self, cause: int) -> None:
        """Set ``cause`` in InterruptStatus (used buffers, config change); any thread."""
        with self._lock:
            self._interrupt |= cause
            self._update_irq()

    def _used_buffers(self) -> None:
        """The device used buffers outside a kick (its :class:`UsedBuffers`)."""
        self.raise_interrupt(INT_USED)

    def serve_queues(self) -> None:
        """Serve every queue of an active device once, as if each had been kicked.

        A kick still pending in an eventfd when the state was saved is not in
        the state: a restored machine calls this once so no request waits for
        a kick that will not come. Not counted as a kick.
        """
        interrupt = False
        with self._lock:
            for queue in range(len(self.queues)):
                interrupt |= self._notify(queue)
        if interrupt:
            self.raise_interrupt(INT_USED)

    def save_state(self) -> bytes:
        """The transport's registers, the rings' indices and the device's state, versioned."""
        with self._lock:
            out = Writer().u8(STATE_VERSION).u32(self.status)
            out.u8(min(self._device_features_sel, FEATURES_SEL_PAST))
            out.u8(min(self._driver_features_sel, FEATURES_SEL_PAST))
            out.u64(self.driver_features)
            out.u16(min(self._queue_sel, len(self._queues_set_up)))
            out.u16(len(self._queues_set_up))
            for q in self._queues_set_up:
                out.u32(q.size).u8(q.ready)
                out.u64(q.address["desc"]).u64(q.address["avail"]).u64(q.address["used"])
            out.u8(self._interrupt).u32(self._generation)
            if is_active(self.status):
                # All a ring's device-side state: csrc/gm_virtq.c keeps nothing
                # else (EVENT_IDX's avail_event and used_event live in the
                # rings, in guest memory, and push/pop read them there).
                for ring in self.queues:
                    out.u16(ring.last_avail_idx).u16(ring.used_idx)
            return out.blob(self.device.save_state()).bytes()

    def decode_state(self, reader: Reader) -> TransportState:
        """Read and check what :meth:`save_state` made; this transport must be at reset.

        Everything is checked, the rings against guest memory and the
        device's own payload too, and nothing is changed: bad state is a
        StateError at its offset in ``reader``'s whole state.
        """
        with self._lock:
            self._check_at_reset()
            count, offered = len(self._queues_set_up), self._offered
            return decode_state(reader, count, offered, self._memory, self.device)

    def apply_state(self, state: TransportState) -> None:
        """Take a decoded state into this transport, which must still be at reset.

        An active device gets its rings rebuilt (as DRIVER_OK does), is
        activated, takes its own state, then the rings' indices. An
        interrupt the saved guest had not acked is raised again.
        """
        with self._lock:
            self._check_at_reset()
            queues_set_up = [_QueueRegisters.of(q) for q in state.queues]
            queues: list[SplitQueue] = []
            if state.active:  # decode_state built these rings once: they are in guest RAM
                queues = self._build_queues(queues_set_up, state.driver_features)
                self.device.activate(queues, state.driver_features, self._used_buffers)
            self.device.apply_state(state.device)
            for ring, (last_avail, used) in zip(queues, state.indices, strict=True):
                ring.set_indices(last_avail, used)
            self.status = state.status
            self._device_features_sel = state.device_features_sel
            self._driver_features_sel = state.driver_features_sel
            self.driver_features = state.driver_features
            self._queue_sel = state.queue_sel
            self._queues_set_up = queues_set_up
            self.queues = queues
            self._interrupt = state.interrupt
            self._generation = state.generation
            if self._interrupt:
                self._level = True
                self._line(True)

    def load_state(self, data: bytes) -> None:
        """Decode ``data`` and apply it: a StateError, and nothing changed, if it is bad."""
        self.apply_state(self.decode_state(Reader(data)))

    def _check_at_reset(self) -> None:
        if self.status:
            raise gm.UsageError("load a device's state into a transport at reset")

    def _selected(self) -> _QueueRegisters | None:
        if 0 <= self._queue_sel < len(self._queues_set_up):
            return self._queues_set_up[self._queue_sel]
        return None

    def _set_queue_size(self, value: int) -> None:
        queue = self._selected()
        if queue is not None and not queue.ready:
            queue.size = value

    def _set_queue_address(self, offset: int, value: int) -> None:
        queue = self._selected()
        if queue is None or queue.ready:
            return
        ring, shift = _ADDRESS_REGISTERS[offset]
        kept = queue.address[ring] & ~(0xFFFF_FFFF << shift)
        queue.address[ring] = kept | (value & 0xFFFF_FFFF) << shift

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.device.reset()
            self._reset_state()
            self._update_irq()
            return
        newly_features_ok = value & S_FEATURES_OK and not self.status & S_FEATURES_OK
        if newly_features_ok and not self.driver_features & F_VERSION_1:
            value &= ~S_FEATURES_OK  # a legacy driver: refused, as version 2 must
        if value & S_DRIVER_OK and not self.status & S_DRIVER_OK:
            self.status = value
            self._activate()
            return
        self.status = value

    def _activate(self) -> None:
        try:
            self.queues = self._build_queues(self._queues_set_up, self.driver_features)
            self.device.activate(self.queues, self.driver_features, self._used_buffers)
        except gm.GuestMemoryError:
            self._needs_reset()

    def _build_queues(
        self, queues_set_up: Sequence[_QueueRegisters], features: int
    ) -> list[SplitQueue]:
        """The rings the driver set up; guestmem errors if one is not in guest RAM."""
        event_idx = bool(features & F_EVENT_IDX)
        return [
            SplitQueue(
                self._memory,
                q.size,
                q.address["desc"],
                q.address["avail"],
                q.address["used"],
                event_idx=event_idx,
            )
            for q in queues_set_up
        ]

    def _notify(self, queue: int) -> bool:
        if not self.status & S_DRIVER_OK or self.status & S_NEEDS_RESET:
            return False
        if not 0 <= queue < len(self.queues):
            return False
        try:
            return self.device.notify(queue)
        except gm.GuestMemoryError:
            self._needs_reset()
            return False

    def _needs_reset(self) -> None:
        self.status |= S_NEEDS_RESET
        self._interrupt |= INT_CONFIG
        self._update_irq()

    def _update_irq(self) -> None:
        level = self._interrupt != 0
        if level != self._level:
            self._level = level
            self._line(level)


def _le(value: int, size: int) -> bytes:
    """The ``size`` bytes of a register write, as the guest stored them."""
    return (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
