"""One vring's state as the frontend sets it up: size, addresses, base, eventfds, enable.

A ring is *stopped* until its kick fd arrives (SET_VRING_KICK) and again
after GET_VRING_BASE; *enabled* by SET_VRING_ENABLE (at start when
VHOST_USER_F_PROTOCOL_FEATURES was not negotiated). Its queue
(:class:`guestmem.virtio.SplitQueue`) exists while it is started.
"""

from __future__ import annotations

import contextlib
import os
import select

from guestmem.virtio import SplitQueue

_ONE = (1).to_bytes(8, "little")


class Vring:
    """What the frontend told the backend about one ring, and its queue while started."""

    def __init__(self, index: int) -> None:
        """A stopped, disabled ring with nothing set."""
        self.index = index
        self.num = 0
        self.base = 0  # last_avail_idx to start from (SET_VRING_BASE)
        self.desc_gpa: int | None = None
        self.avail_gpa: int | None = None
        self.used_gpa: int | None = None
        self.log_used = False
        self.kick: int | None = None
        self.call: int | None = None
        self.err: int | None = None
        self.enabled = False
        self.queue: SplitQueue | None = None

    @property
    def started(self) -> bool:
        """Whether the ring is being processed (it has a queue)."""
        return self.queue is not None

    def replace_fd(self, kind: str, fd: int | None) -> None:
        """Keep ``fd`` as the ring's ``kick``, ``call`` or ``err`` eventfd, closing the old one."""
        old = getattr(self, kind)
        setattr(self, kind, fd)
        if old is not None:
            os.close(old)

    def signal(self) -> None:
        """Tell the frontend that buffers were used (its call eventfd), if it gave one.

        Never blocks: an eventfd that cannot take another count is already
        signalled.
        """
        _bump(self.call)

    def signal_error(self) -> None:
        """Tell the frontend the ring broke (its err eventfd), if it gave one; never blocks."""
        _bump(self.err)

    def drain_kick(self) -> None:
        """Consume the kick eventfd's count (it was seen readable)."""
        fd = self.kick
        if fd is not None:
            with contextlib.suppress(BlockingIOError):
                os.read(fd, 8)

    def stop(self) -> int:
        """Stop the ring; its next available index (GET_VRING_BASE's answer)."""
        queue, self.queue = self.queue, None
        if queue is not None:
            self.base = queue.last_avail_idx
        return self.base

    def close(self) -> None:
        """Stop the ring and close its eventfds."""
        self.stop()
        for kind in ("kick", "call", "err"):
            self.replace_fd(kind, None)


def _bump(fd: int | None) -> None:
    """Add one to an eventfd unless it is full (then it is signalled already)."""
    if fd is None:
        return
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if poller.poll(0):
        with contextlib.suppress(BlockingIOError):
            os.write(fd, _ONE)
