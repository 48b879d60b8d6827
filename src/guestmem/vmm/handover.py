"""Who runs the guest after a live migration: the commit steps between source and target.

A migration must never leave two running copies of one guest (both would
write its disks). Once the target has the whole state, the two VMMs
exchange short messages, as libvirt's Confirm phase does::

    target -> source  READY         loaded and checked; the target waits, paused
                      NO + reason   refused: the target never runs this guest
    source -> target  GO            the go-ahead: the source released its disks
                                    and never resumes this guest on its own
                      ABORT         the source keeps the guest (a cancel)
    target -> source  TAKEN         the target holds the disks and runs the guest
                      NO + reason   the target cannot run it (its disks are locked)

Each message is two ASCII bytes, a u32 length and that many bytes of
reason (at most :data:`MAX_REASON`). Until the source has sent GO, any
failure leaves the source running. Once it has, an answer that does not
come (lost, late, garbled) leaves the outcome unknown: both sides stay
paused and say so (:class:`OutcomeUnknown`, carrying a :class:`Hold`), and
the operator decides with ``resume`` on one side and ``quit`` on the other.
docs/design.md has the state diagram.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

import guestmem as gm

MESSAGE = struct.Struct("<2sI")
MAX_REASON = 4096
READY, NO, GO, ABORT, TAKEN = b"RD", b"NO", b"GO", b"AB", b"TK"
_NAMES = {READY: "READY", NO: "NO", GO: "GO", ABORT: "ABORT", TAKEN: "TAKEN"}


class MigrationFailed(gm.GuestMemoryError):
    """A live migration did not complete, and the guest runs on where it was.

    ``paused`` is how long the guest was paused before it ran on (seconds).
    """

    paused: float = 0.0


class OutcomeUnknown(gm.GuestMemoryError):
    """A migration whose go-ahead or its answer was lost: this side holds the guest paused.

    ``hold`` is how the operator ends it (``resume`` or ``quit``).
    """

    def __init__(self, message: str, hold: Hold) -> None:
        super().__init__(message)
        self.hold = hold


class PeerSilent(gm.GuestMemoryError, TimeoutError):
    """The other VMM sent nothing (or not all of a message) within the migration's timeout."""


class Hold:
    """A guest kept paused until the operator decides: :meth:`resume` here or :meth:`quit`.

    ``on_resume`` may raise (e.g. its disks are locked by the other side's
    running copy); the hold then stays, and the error says why.
    """

    def __init__(
        self, reason: str, on_resume: Callable[[], None], on_quit: Callable[[], None]
    ) -> None:
        """A hold for ``reason``; the callbacks carry out each decision."""
        self.reason = reason
        self._on_resume = on_resume
        self._on_quit = on_quit
        self._lock = threading.Lock()
        self._decided = threading.Event()
        self.decision: str | None = None

    def resume(self) -> None:
        """Run the guest on this side (raises, still held, if it cannot)."""
        self._decide("resume", self._on_resume)

    def quit(self) -> None:
        """Give the guest up on this side."""
        self._decide("quit", self._on_quit)

    def wait(self, timeout: float | None = None) -> str | None:
        """Block until decided: ``"resume"`` or ``"quit"`` (None on timeout)."""
        self._decided.wait(timeout)
        return self.decision

    def _decide(self, decision: str, act: Callable[[], None]) -> None:
        with self._lock:
            if self.decision is not None:
                raise gm.UsageError(
                    f"this migration's outcome was decided already: {self.decision}"
                )
            act()
            self.decision = decision
        self._decided.set()


class Cancellation:
    """Lets another thread end a migration before its go-ahead (``vmm migrate-cancel``)."""

    def __init__(self) -> None:
        """Nothing cancelled, no channel yet."""
        self._lock = threading.Lock()
        self._channel: socket.socket | None = None
        self.cancelled = False
        self.committed = False

    def attach(self, channel: socket.socket) -> None:
        """The channel to shut down on a cancel (unblocking any send or receive on it)."""
        with self._lock:
            self._channel = channel
            if self.cancelled:
                _shut(channel)

    def cancel(self) -> bool:
        """Cancel, unless the go-ahead was sent; whether it was cancelled."""
        with self._lock:
            if self.committed:
                return False
            self.cancelled = True
            if self._channel is not None:
                _shut(self._channel)
            return True

    def commit(self) -> bool:
        """Called just before the go-ahead: False if cancelled (then there is none)."""
        with self._lock:
            if self.cancelled:
                return False
            self.committed = True
            return True


def send(channel: socket.socket, code: bytes, reason: str = "") -> None:
    """Send one message."""
    text = reason.encode()[:MAX_REASON]
    channel.sendall(MESSAGE.pack(code, len(text)) + text)


def receive(
    channel: socket.socket, expected: tuple[bytes, ...], timeout: float
) -> tuple[bytes, str]:
    """One message whose code is one of ``expected``, within ``timeout`` seconds.

    Raises EOFError if the peer hung up before its first byte, PeerSilent
    if it was quiet too long, gm.ProtocolError for anything else it sent,
    OSError for a broken connection.
    """
    head = _exactly(channel, MESSAGE.size, timeout, first=True)
    code, length = MESSAGE.unpack(head)
    if code not in expected or length > MAX_REASON:
        wanted = " or ".join(_NAMES[c] for c in expected)
        raise gm.ProtocolError(f"the other VMM sent {head!r} where {wanted} belongs")
    reason = _exactly(channel, length, timeout, first=False) if length else b""
    return code, reason.decode(errors="replace")


def source_commit(
    channel: socket.socket,
    *,
    timeout: float,
    cancellation: Cancellation,
    release: Callable[[], None],
    hold: Callable[[str], Hold],
) -> None:
    """The source's side, once the state is sent: READY, then GO, then TAKEN.

    Raises MigrationFailed (the source may run on) until GO is sent, and
    OutcomeUnknown (with ``hold(reason)``) after. ``release`` gives up the
    disks just before GO.
    """
    try:
        code, reason = receive(channel, (READY, NO), timeout)
    except (OSError, EOFError, gm.GuestMemoryError) as err:
        raise MigrationFailed(f"the target did not say it was ready: {why(err)}") from err
    if code == NO:
        raise MigrationFailed(f"the target refused: {reason}")
    if not cancellation.commit():
        _quietly(lambda: send(channel, ABORT, "cancelled"))
        raise MigrationFailed("cancelled before the go-ahead")
    release()
    try:
        send(channel, GO)
        code, reason = receive(channel, (TAKEN, NO), timeout)
    except (OSError, EOFError, gm.GuestMemoryError) as err:
        lost = f"no answer to the go-ahead: {why(err)}"
        raise _unknown(f"{lost}; the target may be running the guest", hold) from err
    if code == NO:
        refused = f"the target took the go-ahead but cannot run: {reason}"
        raise _unknown(f"{refused}; it will not run the guest, so resuming here is safe", hold)


def target_commit(
    channel: socket.socket,
    *,
    timeout: float,
    acquire: Callable[[], None],
    hold: Callable[[str], Hold],
) -> None:
    """The target's side, once everything is loaded: READY, wait for GO, take the disks, TAKEN.

    Returns when the target may run the guest. Raises MigrationFailed when
    the source kept it (ABORT, or it hung up before a go-ahead), and
    OutcomeUnknown (with ``hold(reason)``) when the go-ahead may have been
    sent but did not arrive whole, or the disks cannot be taken.
    """
    try:
        send(channel, READY)
    except OSError as err:  # without READY the source sends no go-ahead
        raise MigrationFailed(f"the source is gone before the handover: {why(err)}") from err
    try:
        code, reason = receive(channel, (GO, ABORT), timeout)
    except EOFError as err:
        raise MigrationFailed("the source hung up before its go-ahead: it keeps the guest") from err
    except (OSError, gm.GuestMemoryError) as err:
        lost = f"no go-ahead: {why(err)}"
        raise _unknown(
            f"{lost}; the source may have sent one and given the guest up", hold
        ) from err
    if code == ABORT:
        raise MigrationFailed(f"the source kept the guest: {reason or 'aborted'}")
    try:
        acquire()
    except gm.GuestMemoryError as err:
        refusal = str(err)
        _quietly(lambda: send(channel, NO, refusal))
        raise _unknown(f"the go-ahead came, but {refusal}", hold) from err
    _quietly(lambda: send(channel, TAKEN))  # ours now, whether or not the source hears it


def _unknown(message: str, hold: Callable[[str], Hold]) -> OutcomeUnknown:
    return OutcomeUnknown(f"outcome unknown: {message}", hold(message))


def _exactly(channel: socket.socket, n: int, timeout: float, *, first: bool) -> bytes:
    channel.settimeout(timeout)
    data = bytearray()
    while len(data) < n:
        try:
            chunk = channel.recv(n - len(data))
        except TimeoutError:
            raise PeerSilent(f"nothing from the other VMM for {timeout:g} s") from None
        if not chunk:
            if first and not data:
                raise EOFError("the other VMM hung up")
            raise gm.ProtocolError(f"the other VMM hung up inside a message ({len(data)} of {n})")
        data += chunk
    return bytes(data)


def why(err: BaseException) -> str:
    """What went wrong, in words an operator reads (a bare timeout or OSError says little)."""
    if isinstance(err, TimeoutError) and not isinstance(err, gm.GuestMemoryError):
        return "the other VMM stopped taking or sending data (timed out)"
    if isinstance(err, OSError) and not isinstance(err, gm.GuestMemoryError):
        return err.strerror or type(err).__name__
    return str(err) or type(err).__name__


def _quietly(act: Callable[[], None]) -> None:
    with contextlib.suppress(OSError):
        act()


def _shut(channel: socket.socket) -> None:
    with contextlib.suppress(OSError):
        channel.shutdown(socket.SHUT_RDWR)
