"""The frontend's dirty log (SET_LOG_BASE with LOG_SHMFD): a shared bitmap of 4 KiB GPA pages.

Mapped from the fd at its offset; while the frontend asks for logging
(VHOST_F_LOG_ALL), the guest memory marks every page the device writes in it
(:meth:`guestmem.dirty.DirtyLog.share_bitmap`): the data a request wrote,
the status byte, the used ring.
"""

from __future__ import annotations

import contextlib
import mmap
import os

from guestmem.vhost_user.errors import LogError
from guestmem.vhost_user.protocol import LOG_PAGE


class SharedLog:
    """``size`` bytes of the frontend's log fd from ``offset``: bit i covers GPA i * 4 KiB."""

    def __init__(self, fd: int, size: int, offset: int, request: int) -> None:
        """Map the log (the fd stays the caller's); LogError if it cannot be."""
        if size == 0:
            raise LogError("an empty dirty log", request=request)
        if offset % mmap.ALLOCATIONGRANULARITY:
            raise LogError(
                f"the log's offset {offset:#x} is not a multiple of the page "
                f"{mmap.ALLOCATIONGRANULARITY:#x}",
                request=request,
            )
        try:
            held = os.fstat(fd).st_size
        except OSError as err:
            raise LogError(f"the log's fd cannot be examined ({err})", request=request) from err
        if offset > held or size > held - offset:
            raise LogError(
                f"the log [{offset:#x}, +{size:#x}) passes its fd's {held:#x} bytes",
                request=request,
            )
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, offset=offset)
        except (OSError, ValueError) as err:
            raise LogError(f"the log cannot be mapped ({err})", request=request) from err
        self.size = size

    @property
    def covers(self) -> int:
        """The first GPA the log has no bit for."""
        return self.size * 8 * LOG_PAGE

    @property
    def bits(self) -> mmap.mmap:
        """The bitmap, as a writable buffer."""
        return self._map

    def close(self) -> None:
        """Unmap the log; while a view of it is still held, it goes with the last one."""
        with contextlib.suppress(BufferError):
            self._map.close()
