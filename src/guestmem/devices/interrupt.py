"""The interrupts a device raises, as the device sees them: no controller, no transport.

Two shapes, because the two kinds of device need two: a model of a
register-level device (the PL011, a virtio-mmio window) drives a *line* to
a level, which the VMM wires to its interrupt controller (KVM_IRQ_LINE, an
irqfd); a virtio device only says it *used buffers*, and its transport
decides how the driver hears it (virtio-mmio: InterruptStatus and the
window's line; vhost-user: the queue's call eventfd).
"""

from __future__ import annotations

from typing import Protocol


class InterruptLine(Protocol):
    """A level-sensitive interrupt line: called with True to raise it, False to lower it.

    A device calls it only when the level changes. Any ``Callable[[bool],
    None]`` is one (the VMM's ``EdgeInterrupt.set``, a test's recorder).
    """

    def __call__(self, level: bool, /) -> None:
        """Drive the line to ``level``."""


class UsedBuffers(Protocol):
    """A virtio device's notification that it returned buffers to the driver (any thread).

    For what the device used outside a kick (console input arriving): a
    kick's own buffers are reported by ``VirtioDevice.notify``'s result.
    """

    def __call__(self) -> None:
        """Tell the driver that buffers were used."""
