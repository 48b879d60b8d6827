"""What every session shares: argument parsing, error replies, dispatch, qXfer and vFile.

A session (guest physical memory in :mod:`~guestmem.gdbstub.session`, a
running guest in :mod:`~guestmem.gdbstub.debug_session`) is a
:class:`CommandSession`: it maps packet prefixes to commands, and
:meth:`CommandSession.dispatch` runs the one a packet names and turns what
it raises into the reply gdbserver would give: ``E01`` for a malformed
packet, ``E0e`` (EFAULT) for an address that is not mapped, ``E10`` (EBUSY)
for tags KVM will not write now, ``E16`` (EINVAL) for anything else refused,
and the empty reply for a packet nobody knows.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Mapping

from guestmem.errors import AddressError, GuestMemoryError, ProtocolError, TagsBusyError
from guestmem.gdbstub.packets import PACKET_SIZE, escape

log = logging.getLogger(__name__)

MAX_READ = (PACKET_SIZE - 8) // 2  # bytes in one m (or pread, qXfer) reply; GDB asks again
E_MALFORMED, E_FAULT, E_INVALID = b"E01", b"E0e", b"E16"  # -, EFAULT, EINVAL
E_READ_ONLY, E_NO_RUN_CONTROL = b"E0d", b"E26"  # EACCES, ENOSYS
E_BUSY, E_NO_SLOT = b"E10", b"E1c"  # EBUSY (tags during migration, guest running), ENOSPC
ENOENT, EBADF, EACCES, EMFILE = 2, 9, 13, 24
FIRST_FD = 100
MAX_OPEN_FILES = 16  # vFile handles one session may hold; more get EMFILE

Command = Callable[[bytes], bytes | None]
FileContents = Callable[[], bytes]


class InvalidRequest(GuestMemoryError, ValueError):
    """A well-formed packet asking for what the target cannot do (``E16`` unless told)."""

    def __init__(self, message: str, reply: bytes = E_INVALID) -> None:
        """``reply`` is the error reply the client gets."""
        super().__init__(message)
        self.reply = reply


def parse_hex(text: bytes, what: str) -> int:
    """A hex number of at most 16 digits."""
    if not 0 < len(text) <= 16 or not all(chr(c) in "0123456789abcdefABCDEF" for c in text):
        raise ProtocolError(f"{what} {text[:20]!r} is not a hex number")
    return int(text, 16)


def parse_hex_bytes(text: bytes, what: str) -> bytes:
    """The bytes a hex string spells."""
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"{what} is not hex") from None


def split_fields(text: bytes, separator: bytes, count: int, what: str) -> list[bytes]:
    """Exactly ``count`` fields of ``text``."""
    fields = text.split(separator, count - 1)
    if len(fields) != count:
        raise ProtocolError(f"{what}: expected {count} fields, got {len(fields)}")
    return fields


def xfer(args: bytes, annexes: Mapping[bytes, bytes]) -> bytes:
    """A ``qXfer:...:read:ANNEX:OFFSET,LENGTH`` reply from one of ``annexes``."""
    annex, where = split_fields(args, b":", 2, "qXfer annex")
    if annex not in annexes:
        raise InvalidRequest(f"no annex {annex!r}")
    document = annexes[annex]
    offset, length = (parse_hex(f, "qXfer") for f in split_fields(where, b",", 2, "qXfer"))
    chunk = document[offset : offset + min(length, MAX_READ)]
    last = offset + len(chunk) >= len(document)
    return (b"l" if last else b"m") + escape(chunk)


def error_reply(error: GuestMemoryError) -> bytes:
    """The error reply for what a command raised."""
    if isinstance(error, ProtocolError):
        log.info("malformed packet: %s", error)
        return E_MALFORMED
    if isinstance(error, AddressError):
        log.info("not mapped: %s", error)
        return E_FAULT
    if isinstance(error, InvalidRequest):
        log.info("refused: %s", error)
        return error.reply
    if isinstance(error, TagsBusyError):
        log.info("busy: %s", error)
        return E_BUSY
    log.info("refused: %s", error)
    return E_INVALID


class CommandSession:
    """One client's session: ack mode, open files, whether it (or a run) goes on.

    Subclasses answer packets in :meth:`handle`, usually through
    :meth:`dispatch`. ``running`` is True while the guest runs for the
    client: the server then asks :meth:`poll` for the stop reply.
    """

    def __init__(self, pid: int) -> None:
        """``pid`` names the process GDB believes it debugs."""
        self.pid = pid
        self.no_ack = False
        self.ended = False
        self.running = False
        self.files: dict[int, bytes] = {}  # open vFile handles: fd -> contents
        self.fixed: dict[bytes, Callable[[], bytes]] = {}  # whole payloads
        self.commands: list[tuple[bytes, Command]] = []  # payload prefixes

    def handle(self, payload: bytes) -> bytes | None:
        """The reply to one packet, or None for none (now)."""
        return self.dispatch(payload)

    def interrupt(self) -> bytes | None:
        """0x03 from the client: the stop reply, or None (nothing runs)."""
        return None

    def poll(self, timeout: float) -> bytes | None:
        """While ``running``: the stop reply once the guest stopped (within ``timeout`` s)."""
        return None

    def dispatch(self, payload: bytes) -> bytes | None:
        """The reply of the command ``payload`` names; empty if none does."""
        fixed = self.fixed.get(payload)
        if fixed is not None:
            return fixed()
        for prefix, command in self.commands:
            if payload.startswith(prefix):
                try:
                    return command(payload[len(prefix) :])
                except GuestMemoryError as error:
                    return error_reply(error)
        return b""

    def start_no_ack(self, args: bytes) -> bytes:
        """``QStartNoAckMode``: the server stops acknowledging after this reply."""
        if args:
            return b""
        self.no_ack = True
        return b"OK"

    def vfile(self, args: bytes, files: Mapping[bytes, FileContents]) -> bytes:
        """``vFile:``: read-only access to ``files`` (path -> contents)."""
        op, _, rest = args.partition(b":")
        if op == b"setfs":
            return b"F0"
        if op == b"open":
            return self._vfile_open(rest, files)
        if op == b"pread":
            return self._vfile_pread(rest)
        if op == b"close":
            closed = self.files.pop(parse_hex(rest, "fd"), None) is not None
            return b"F0" if closed else b"F-1,%x" % EBADF
        return b""

    def _vfile_open(self, args: bytes, files: Mapping[bytes, FileContents]) -> bytes:
        path_hex, flags, _mode = split_fields(args, b",", 3, "vFile:open")
        contents = files.get(parse_hex_bytes(path_hex, "vFile:open path"))
        if contents is None:
            return b"F-1,%x" % ENOENT
        if parse_hex(flags, "open flags") & os.O_ACCMODE != os.O_RDONLY:
            return b"F-1,%x" % EACCES
        if len(self.files) >= MAX_OPEN_FILES:
            return b"F-1,%x" % EMFILE
        fd = next(n for n in itertools.count(FIRST_FD) if n not in self.files)
        self.files[fd] = contents()
        return b"F%x" % fd

    def _vfile_pread(self, args: bytes) -> bytes:
        fields = split_fields(args, b",", 3, "vFile:pread")
        fd, count, offset = (parse_hex(f, "vFile:pread") for f in fields)
        if fd not in self.files:
            return b"F-1,%x" % EBADF
        data = self.files[fd][offset : offset + min(count, MAX_READ)]
        return b"F%x;" % len(data) + escape(data)


def proc_files(pid: int, files: Mapping[str, FileContents]) -> dict[bytes, FileContents]:
    """``files`` (``"smaps"`` -> contents) as ``/proc/PID/...`` and ``/proc/self/...``."""
    return {
        f"/proc/{owner}/{name}".encode(): contents
        for owner in (str(pid), "self")
        for name, contents in files.items()
    }


def drop_signal(args: bytes) -> bytes:
    """The address of ``C``/``S`` (``SIG[;ADDR]``): the guest has no signals to deliver."""
    signal, _, address = args.partition(b";")
    parse_hex(signal, "signal")
    return address
