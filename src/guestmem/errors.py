"""The exception hierarchy.

One base class; each subclass also inherits the builtin it resembles and
carries its facts as attributes.
"""

from __future__ import annotations

import errno


class GuestMemoryError(Exception):
    """Base class of every error guestmem raises."""


class AddressError(GuestMemoryError, ValueError):
    """A guest physical address range that is not (wholly) mapped."""

    def __init__(self, message: str, *, gpa: int, length: int) -> None:
        super().__init__(message)
        self.gpa = gpa
        self.length = length


class AlignmentError(GuestMemoryError, ValueError):
    """A value that must be a multiple of ``alignment`` is not."""

    def __init__(self, message: str, *, value: int, alignment: int) -> None:
        super().__init__(message)
        self.value = value
        self.alignment = alignment


class TagError(GuestMemoryError, ValueError):
    """An allocation or logical tag outside 0..15, or of the wrong count."""


class LengthError(GuestMemoryError, ValueError):
    """A length that is negative, or that does not match its data."""


class BufferTypeError(GuestMemoryError, TypeError):
    """An object that is not a contiguous (and, to receive data, writable) buffer."""


class ArgumentTypeError(GuestMemoryError, TypeError):
    """An argument of the wrong type (e.g. a float or a bool where an integer goes)."""


class UsageError(GuestMemoryError, ValueError):
    """A call that is not valid as made: a bad option, value or order of calls."""


class TagCheckError(GuestMemoryError):
    """A checked access met a granule whose allocation tag differs from the logical tag.

    ``gpa`` is the first byte of the access inside the first mismatching
    granule; ``gpa`` is None when the caller's own buffer was the tagged
    memory that failed the check.
    """

    def __init__(self, gpa: int | None, logical_tag: int, allocation_tag: int) -> None:
        where = "the caller's buffer" if gpa is None else f"GPA {gpa:#x}"
        super().__init__(
            f"tag check failed at {where}: logical tag {logical_tag}, "
            f"allocation tag {allocation_tag}"
        )
        self.gpa = gpa
        self.logical_tag = logical_tag
        self.allocation_tag = allocation_tag


class TagRaceError(GuestMemoryError, RuntimeError):
    """Tags kept changing under a MATCH_ALL access until it gave up."""


class UnsupportedError(GuestMemoryError):
    """What was asked for does not exist here (no MTE, no tags in this mode, ...)."""


class ClosedError(GuestMemoryError, ValueError):
    """An operation on a GuestMemory that was closed."""


class SharedTableError(GuestMemoryError, ValueError):
    """A shared region table that its fds cannot back (a memfd or tag table too small)."""


class NativeOSError(GuestMemoryError, OSError):
    """A system call in the native core failed; ``errno`` and ``strerror`` say why."""


class TagsBusyError(NativeOSError):
    """KVM refused to write tags while it logs dirty pages (EBUSY); no tag was written.

    Linux 6.12 and later refuse KVM_ARM_MTE_COPY_TAGS to the guest while any
    memslot logs dirty pages, i.e. while a live migration runs (commit
    e0b7de4fd18c). Reading tags is not affected; write again once it ended.
    """


class WouldBlockError(NativeOSError, BlockingIOError):
    """System-call I/O on a non-blocking descriptor found nothing to do (EAGAIN)."""


class IOTimeoutError(NativeOSError, TimeoutError):
    """System-call I/O on a socket with a timeout timed out."""


def from_os_error(err: OSError, what: str) -> NativeOSError:
    """The NativeOSError (or its EAGAIN/timeout subclass) for ``err``, to raise from it."""
    if isinstance(err, NativeOSError):
        return err
    reason = err.strerror or str(err) or type(err).__name__
    if isinstance(err, TimeoutError):
        return IOTimeoutError(err.errno or errno.ETIMEDOUT, f"{what}: {reason}")
    if isinstance(err, BlockingIOError):
        return WouldBlockError(err.errno or errno.EAGAIN, f"{what}: {reason}")
    return NativeOSError(err.errno or errno.EIO, f"{what}: {reason}")


class ChannelError(GuestMemoryError, OSError):
    """A migration channel that could not be opened: connect, listen or TLS handshake.

    ``endpoint`` is where (its text), ``reason`` why; ``errno`` is the
    system's error number when there is one, else None.
    """

    def __init__(self, endpoint: str, reason: str, *, errno: int | None = None) -> None:
        super().__init__(f"{endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason
        self.errno = errno

    def __str__(self) -> str:
        return f"{self.endpoint}: {self.reason}"


class HandshakeError(ChannelError):
    """A client that failed a listener's TLS handshake (e.g. its certificate was refused).

    Only that client was dropped: the listener goes on accepting.
    """


class ChannelTimeoutError(ChannelError, TimeoutError):
    """No peer came, or the peer went quiet, within a channel's timeout."""


class InsecureChannelWarning(UserWarning):
    """Plain tcp to or from a non-loopback address, allowed by an explicit opt-in."""


class VirtqueueError(GuestMemoryError, ValueError):
    """A malformed virtqueue: the driver broke the ring's rules.

    ``reason`` names the rule, ``index`` is the offending descriptor, ring
    entry or index value, ``gpa`` where it was found (None if nowhere). The
    queue then needs a reset.
    """

    def __init__(self, message: str, *, reason: str, index: int, gpa: int | None) -> None:
        super().__init__(message)
        self.reason = reason
        self.index = index
        self.gpa = gpa


class ProtocolError(GuestMemoryError, ValueError):
    """A malformed message from a peer.

    A GDB remote protocol packet (bad framing, hex or arguments), or a
    migrating VMM's handover message.
    """


class StreamError(GuestMemoryError, ValueError):
    """A migration stream that is truncated, corrupt or does not fit the target.

    ``offset`` is where in the stream the problem was found; ``reason`` says
    what it is.
    """

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"migration stream at byte {offset}: {reason}")
        self.offset = offset
        self.reason = reason


class ConvergenceError(GuestMemoryError):
    """A live migration whose last (paused) round would not fit the downtime allowed.

    Raised before the guest is paused: the source runs on.
    """
