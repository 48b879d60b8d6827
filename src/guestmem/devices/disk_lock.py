"""Locks on disk images, so that two VMMs never run on one image.

As QEMU does: an open file description (OFD) lock on the whole image,
exclusive for a read-write disk and shared for a read-only one. A second
VMM on the image (or a second open in this one: OFD locks belong to the
open, not the process) is refused with :class:`DiskLockedError` naming the
image. The lock goes with the open file: closing the image releases it, and
a process that dies releases it. A live migration hands it over: the source
releases at the go-ahead, the target takes it before it runs. These are
whole-file locks among guestmem VMMs, not QEMU's byte-range protocol.
"""

from __future__ import annotations

import errno
import fcntl
import struct
from collections.abc import Iterable

import guestmem as gm
from guestmem.errors import from_os_error

# struct flock on 64-bit Linux (x86_64 and aarch64 alike): short l_type,
# short l_whence, (pad), off_t l_start, off_t l_len, pid_t l_pid, (pad).
# l_pid must be 0 for an OFD lock; start 0 and length 0 is the whole file.
_FLOCK = struct.Struct("=hh4xqqi4x")


class DiskLockedError(gm.GuestMemoryError, OSError):
    """Another open of the image holds a lock that conflicts with the one asked for.

    ``path`` is the image; ``shared`` says whether the refused lock was the
    shared (read-only) one. ``errno`` is EAGAIN.
    """

    def __init__(self, path: str, *, shared: bool) -> None:
        kind = "read" if shared else "write"
        super().__init__(
            f"disk image {path} is in use: failed to get its {kind} lock "
            f"(is another VMM running on it?)"
        )
        self.errno = errno.EAGAIN
        self.path = path
        self.shared = shared


class DiskLock:
    """The lock on the image open on ``fd`` (not owned: its closer must call :meth:`forget`)."""

    def __init__(self, fd: int, path: str, *, shared: bool) -> None:
        """Describe the lock; nothing is locked until :meth:`acquire`."""
        self.fd = fd
        self.path = path
        self.shared = shared
        self.held = False

    def acquire(self) -> None:
        """Take the lock (again: no change); DiskLockedError if another open holds one."""
        if self.held:
            return
        if self.fd < 0:
            raise gm.UsageError(f"disk image {self.path}: closed, cannot be locked")
        try:
            self._set(fcntl.F_RDLCK if self.shared else fcntl.F_WRLCK)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise DiskLockedError(self.path, shared=self.shared) from None
            raise from_os_error(err, f"disk image {self.path}: lock") from err
        self.held = True

    def release(self) -> None:
        """Give the lock up; releasing a lock not held does nothing."""
        if not self.held:
            return
        try:
            self._set(fcntl.F_UNLCK)
        except OSError as err:
            raise from_os_error(err, f"disk image {self.path}: unlock") from err
        self.held = False

    def forget(self) -> None:
        """The image was closed, and the lock with it."""
        self.fd = -1
        self.held = False

    def _set(self, kind: int) -> None:
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, 0, 0, 0, 0))


def acquire_all(locks: Iterable[DiskLock]) -> None:
    """Acquire every lock, or none: on a refusal, release the ones this call took."""
    taken: list[DiskLock] = []
    try:
        for lock in locks:
            if not lock.held:
                lock.acquire()
                taken.append(lock)
    except BaseException:
        for lock in reversed(taken):
            lock.release()
        raise
