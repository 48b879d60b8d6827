"""Sockets and files that only their owner can reach, whatever the umask.

A VMM usually runs as root, its control socket drives the guest and a
snapshot holds all guest RAM: neither may be open to other users for even a
moment, so neither is ever created at its final path with the process umask.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

from guestmem.errors import UsageError, from_os_error

# How long a connect may take to show that a socket is served, and how long a
# bind waits for another bind_unix in the same directory to finish.
PROBE_TIMEOUT = 1.0
DIRECTORY_LOCK_TIMEOUT = 5.0

T = TypeVar("T")

# sun_path holds 108 bytes with its terminating NUL.
_SUN_PATH_MAX = 107


def bind_unix(path: str, backlog: int = 4) -> socket.socket:
    """A listening AF_UNIX stream socket at ``path``, mode 0600 from the moment it is there.

    The socket is bound inside a fresh 0700 directory next to ``path``,
    made 0600, and only then renamed (or linked) onto ``path``. What is at
    ``path`` already decides: nothing, or a socket nobody serves (connection
    refused), is replaced atomically; a socket that accepts a connection, or
    that cannot be probed, raises :class:`UsageError` and is left alone; so is
    anything else (a file, FIFO, symlink or directory: never followed).
    Concurrent calls on one path (threads or processes) are serialised by a
    lock on the directory, so exactly one wins. ``getsockname()`` of the
    result reports the temporary name; use ``path``.
    """
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise UsageError(f"{path}: too long for a unix socket (at most {_SUN_PATH_MAX} bytes)")
    parent = os.path.dirname(os.path.abspath(path))
    with _directory_lock(parent, path):
        _check_replaceable(path)
        try:
            workdir = tempfile.mkdtemp(prefix=".", dir=parent)
        except OSError as err:
            raise from_os_error(err, path) from err
        try:
            os.chmod(workdir, 0o700)  # a umask such as 0277 would leave no room to bind
            temp = os.path.join(workdir, "s")
            if len(os.fsencode(temp)) > _SUN_PATH_MAX:
                raise UsageError(
                    f"{path}: too long for a unix socket "
                    f"(its temporary name {temp!r} exceeds {_SUN_PATH_MAX} bytes)"
                )
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(temp)
                os.chmod(temp, 0o600)
                sock.listen(backlog)
                _install(temp, path)
            except OSError as err:
                sock.close()
                raise from_os_error(err, path) from err
            except BaseException:
                sock.close()
                raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return sock


def write_file(path: str, fill: Callable[[BinaryIO], T]) -> T:
    """Write ``path`` whole or not at all, readable by its owner only; return ``fill``'s result.

    ``fill`` writes into a fresh temporary file in ``path``'s directory
    (created exclusively, never through a symlink, mode 0600), which is then
    flushed, fsynced and renamed onto ``path``, and the directory fsynced: a
    host crash leaves the old file or the new one. If anything fails,
    ``fill`` raising included, the temporary file is removed and ``path`` is
    as it was. A symlink or FIFO at ``path`` is replaced, never followed or
    opened; a directory there raises :class:`UsageError` before any writing.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise UsageError(f"{path}: is a directory: not replacing it")
    except FileNotFoundError:
        pass
    except OSError as err:
        raise from_os_error(err, path) from err
    temp, fd = _create_temporary(directory, path)
    try:
        with os.fdopen(fd, "wb") as file:
            result = fill(file)
            try:
                file.flush()
                os.fsync(file.fileno())
            except OSError as err:
                raise from_os_error(err, path) from err
        try:
            os.rename(temp, path)
        except OSError as err:
            raise from_os_error(err, path) from err
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_directory(directory, path)
    return result


def _create_temporary(directory: str, path: str) -> tuple[str, int]:
    """A new file of mode 0600 in ``directory``, whatever the umask: its path and fd."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    name = os.path.basename(path)[:200]  # room for the suffix within NAME_MAX (255)
    for _ in range(100):
        temp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(temp, flags, 0o600)
        except FileExistsError:
            continue
        except OSError as err:
            raise from_os_error(err, path) from err
        try:
            os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        return temp, fd
    raise UsageError(f"{path}: no free temporary name in its directory after 100 tries")


def _fsync_directory(directory: str, path: str) -> None:
    """Make the rename into ``directory`` durable (where the filesystem can)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise from_os_error(err, path) from err


def _install(temp: str, path: str) -> None:
    """Put ``temp`` at ``path``: linked if ``path`` is free, renamed over a stale socket.

    A link never replaces, so a process that bound ``path`` itself since it
    was checked keeps its socket; that case is checked again.
    """
    while True:
        try:
            os.link(temp, path)
            return
        except FileExistsError:
            pass
        if _check_replaceable(path):
            os.rename(temp, path)
            return


def _check_replaceable(path: str) -> bool:
    """Whether ``path`` holds a stale socket (True) or nothing (False); else UsageError."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as err:
        raise from_os_error(err, path) from err
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"{path}: exists and is not a socket ({_kind(mode)}): not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except FileNotFoundError:
        return False
    except (BlockingIOError, TimeoutError):
        pass  # listening, with a full backlog: served
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UsageError(
            f"{path}: cannot tell whether another process serves this socket ({reason})"
        ) from err
    finally:
        probe.close()
    raise UsageError(f"{path}: another process is serving this socket")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "a special file"


@contextlib.contextmanager
def _directory_lock(directory: str, path: str) -> Iterator[None]:
    """Hold an exclusive flock on ``directory`` (one per open, so threads exclude each other too).

    Whoever else can read the directory could hold the flock forever, so it
    is waited for only :data:`DIRECTORY_LOCK_TIMEOUT` seconds. A filesystem
    without flock on directories goes unlocked: the link or rename still
    never leaves a moment in which ``path`` is free for a stranger.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise from_os_error(err, path) from err
    try:
        deadline = time.monotonic() + DIRECTORY_LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise UsageError(
                        f"{path}: another process holds a lock on {directory}"
                    ) from None
                time.sleep(0.01)
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EINVAL, errno.EBADF):
                    raise from_os_error(err, path) from err
                break
        yield
    finally:
        os.close(fd)
