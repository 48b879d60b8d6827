"""The virtio-mmio transport, version 2 (virtio 1.x, section 4.2), for one device.

The guest finds the device through the device tree (``virtio,mmio``), reads
its identity and features, negotiates, places each queue's rings anywhere
in guest RAM and kicks the device through QueueNotify (an MMIO exit, or an
ioeventfd the VMM's I/O thread serves: :meth:`MmioTransport.notify_queue`);
the device raises the transport's interrupt, which ``set_irq`` follows as a
condition (up when InterruptStatus becomes non-zero, down when it clears).
The rings themselves are :class:`guestmem.virtio.SplitQueue` objects over
guest memory; what the device does with a queue's requests is the
:class:`VirtioDevice`'s business. A device the guest misuses (a ring
outside RAM, a malformed chain) goes to DEVICE_NEEDS_RESET and raises the
config-change interrupt, as the specification asks; it never takes the VMM
down.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import guestmem as gm
from guestmem.virtio import SplitQueue

MAGIC = 0x7472_6976  # "virt"
VERSION = 2
VENDOR = 0x4D47_5547  # "GUGM"
QUEUE_SIZE_MAX = 256

F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32

S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK = 1, 2, 4, 8
S_NEEDS_RESET, S_FAILED = 64, 128
INT_USED, INT_CONFIG = 1, 2

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


class VirtioDevice(Protocol):
    """A virtio device behind the transport: its identity, features, config and queues."""

    device_id: int
    features: int  # device-specific feature bits (the transport adds its own)
    queue_count: int

    def config(self) -> bytes:
        """The device configuration space, as the guest reads it."""

    def activate(self, queues: Sequence[SplitQueue], features: int) -> None:
        """The driver is ready (DRIVER_OK): serve ``queues`` with the negotiated ``features``."""

    def notify(self, queue: int) -> bool:
        """The driver kicked ``queue``: serve what it made available; True to interrupt."""

    def reset(self) -> None:
        """The driver reset the device: drop the queues and any request in flight."""


class _QueueRegisters:
    """What the driver set up for one queue before QueueReady."""

    def __init__(self) -> None:
        self.size = QUEUE_SIZE_MAX
        self.ready = False
        self.address = {"desc": 0, "avail": 0, "used": 0}


class MmioTransport:
    """One virtio-mmio window: ``read``/``write`` from the VMM's MMIO dispatch."""

    def __init__(
        self, memory: gm.GuestMemory, device: VirtioDevice, set_irq: Callable[[bool], None]
    ) -> None:
        """The transport of ``device`` at reset; ``set_irq`` drives its interrupt line."""
        self._memory = memory
        self.device = device
        self._set_irq = set_irq
        self._lock = threading.RLock()
        self._offered = device.features | F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX
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
        """A register write from the guest (config space writes are ignored)."""
        interrupt = False
        with self._lock:
            if offset == DEVICE_FEATURES_SEL:
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
            event_idx = bool(self.driver_features & F_EVENT_IDX)
            self.queues = [
                SplitQueue(
                    self._memory,
                    q.size,
                    q.address["desc"],
                    q.address["avail"],
                    q.address["used"],
                    event_idx=event_idx,
                )
                for q in self._queues_set_up
            ]
            self.device.activate(self.queues, self.driver_features)
        except gm.GuestMemoryError:
            self._needs_reset()

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
            self._set_irq(level)
