"""What the backend needs of a device model: a virtio device whose guest memory can change.

A vhost-user frontend gives guest memory after the device is asked for its
features and config space, and may give a new table while it runs, so the
backend hands the device its memory before activating it (and again on
each new table) through :meth:`BackendDevice.use_memory`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import guestmem as gm
from guestmem.devices.virtio_device import VirtioDevice


class BackendDevice(VirtioDevice, Protocol):
    """A :class:`VirtioDevice` a vhost-user backend can serve."""

    def use_memory(self, memory: gm.GuestMemory) -> None:
        """Serve requests in ``memory`` from now on (the device is not active meanwhile)."""

    def close(self) -> None:
        """Release what the device holds (its image, ...): the connection is over."""


DeviceFactory = Callable[[], BackendDevice]
"""Makes a fresh device for each frontend that connects."""
