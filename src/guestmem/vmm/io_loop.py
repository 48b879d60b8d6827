"""The VMM's I/O thread: it serves the eventfds KVM signals (ioeventfd kicks).

With KVM_IOEVENTFD, a guest's write to a virtio queue's QueueNotify
register is completed inside KVM: the vCPU goes straight back to the guest
and KVM signals an eventfd. This thread waits on those eventfds and runs
each one's handler (the transport serving that queue), so the requests are
served beside the vCPUs, not on them. :meth:`IoLoop.quiesced` holds the
handlers off, for whoever needs the devices still (a snapshot).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import threading
from collections.abc import Callable, Iterator

Handler = Callable[[], None]


class IoLoop:
    """Eventfds and their handlers, served by one thread between :meth:`start` and :meth:`stop`."""

    def __init__(self, on_failure: Callable[[BaseException], None]) -> None:
        """An empty loop; a handler that raises ends it and is reported to ``on_failure``."""
        self._on_failure = on_failure
        self._selector = selectors.DefaultSelector()
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._selector.register(self._stop, selectors.EVENT_READ, None)
        self._fds: list[int] = []
        self._serving = threading.Lock()
        self._thread: threading.Thread | None = None
        self.wakeups = 0  # handlers run: kicks that reached the VMM through an eventfd

    def eventfd(self, handler: Handler) -> int:
        """A new eventfd whose signals run ``handler`` on the loop's thread (the loop owns it)."""
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fds.append(fd)
        self._selector.register(fd, selectors.EVENT_READ, handler)
        return fd

    def start(self) -> None:
        """Start serving (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="vmm-io", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop serving and wait for the thread (a handler running finishes first)."""
        os.eventfd_write(self._stop, 1)
        if self._thread is not None:
            self._thread.join()

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """A block during which no handler runs (one running finishes first).

        A kick that comes meanwhile stays counted in its eventfd and is
        served once the block ends.
        """
        with self._serving:
            yield

    def _serve(self) -> None:
        try:
            while True:
                for key, _ in self._selector.select():
                    if key.data is None:
                        return
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(key.fd)
                    with self._serving:
                        self.wakeups += 1
                        key.data()
        except BaseException as err:  # the run ends with the reason instead of a dead thread
            self._on_failure(err)

    def close(self) -> None:
        """Close every eventfd (after :meth:`stop`, or if the loop never started); once."""
        if self._stop < 0:
            return
        self._selector.close()
        for fd in (*self._fds, self._stop):
            os.close(fd)
        self._fds.clear()
        self._stop = -1
