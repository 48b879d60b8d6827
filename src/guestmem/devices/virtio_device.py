"""What a virtio device is to any transport that drives it (virtio 1.x, sections 2 and 6).

A device knows its queues (:class:`guestmem.virtio.SplitQueue` over guest
memory), guest memory and how to say it used buffers
(:class:`~guestmem.devices.interrupt.UsedBuffers`); it never knows which
transport drives it. A transport (virtio-mmio here; vhost-user next) owns
the negotiation, the rings' addresses and the interrupt, and drives the
device through :class:`VirtioDevice`: identity and features, the
configuration space, activation with the rings the driver set up, a kick
per queue, reset, and the device's own saved state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from guestmem.devices.interrupt import UsedBuffers
from guestmem.saved_state import Stateful
from guestmem.virtio import SplitQueue

# Device status bits (section 2.1), whichever transport carries them.
S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK = 1, 2, 4, 8
S_NEEDS_RESET, S_FAILED = 64, 128
STATUS_BITS = S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK | S_FEATURES_OK | S_NEEDS_RESET | S_FAILED

# Reserved feature bits (section 6) of the rings and the specification's version.
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
RING_FEATURES = F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX


class VirtioDevice(Stateful[Any], Protocol):
    """A virtio device, as its transport drives it: identity, features, config and queues.

    Its saved state (:class:`~guestmem.saved_state.Stateful`) is the
    device's own, not its rings': the transport saves those. ``apply_state``
    is called after :meth:`activate` when the saved device was active.
    """

    device_id: int
    features: int  # device-specific feature bits (the transport adds RING_FEATURES)
    queue_count: int

    def config(self) -> bytes:
        """The device configuration space, as the driver reads it."""

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote ``data`` at ``offset`` of the configuration space."""

    def activate(self, queues: Sequence[SplitQueue], features: int, used: UsedBuffers) -> None:
        """The driver is ready (DRIVER_OK): serve ``queues`` with the negotiated ``features``.

        ``used`` tells the driver of buffers used outside a kick.
        """

    def notify(self, queue: int) -> bool:
        """The driver kicked ``queue``: serve what it made available; True to interrupt."""

    def reset(self) -> None:
        """The driver reset the device: drop the queues and any request in flight."""


def is_active(status: int) -> bool:
    """Whether a device with this status is running: DRIVER_OK and not NEEDS_RESET."""
    return bool(status & S_DRIVER_OK and not status & S_NEEDS_RESET)
