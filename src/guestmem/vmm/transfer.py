"""Moving a running machine: snapshots to a file and live migration over a socket.

Both carry the same bytes (docs/design.md, "Moving a machine"), version 2::

    preamble: magic "GMVMMOVE" | version u32 | length u32 | the ``machine`` section
    RAM: a guestmem migration stream (docs/stream-format.md), header to end record
    state: length u64 | the machine's state (machine_state, framed by state_codec)

and nothing after (a file ends there; a migration goes on with the
handover). A snapshot pauses the machine, writes all three and lets it run
on. A live migration writes the preamble, then pre-copy rounds of RAM while
the guest runs (its writes and tag changes from KVM's dirty log, the VMM's
own from guestmem's) until the last round would fit ``max_downtime``,
pauses it, sends the last dirty pages and the state, and hands the guest
over (:mod:`handover`): the source's run ends (outcome ``migrated``) only
once the target has taken the guest; before its go-ahead, any failure
leaves the source running as if nothing had happened.

The target reads the preamble and refuses a machine unlike its own before
any page, then the RAM, then the state, and checks all of it before it
loads any. Every error names its byte offset from the start of the
snapshot or migration.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

import guestmem as gm
from guestmem.migration import live
from guestmem.migration.stream import StreamReader, StreamWriter, more_arrived
from guestmem.saved_state import MAX_STATE, Reader, StateError
from guestmem.units import GRANULE, STREAM_PAGE
from guestmem.vmm import handover, machine_state
from guestmem.vmm.dirty_log import KvmDirtyLog
from guestmem.vmm.handover import Cancellation, Hold, MigrationFailed
from guestmem.vmm.outcome import EndReason
from guestmem.vmm.throttle import Throttle

if TYPE_CHECKING:
    from guestmem.vmm.machine import Machine

MAGIC = b"GMVMMOVE"
VERSION = 2  # 1: the same bytes, then an OK/NO answer instead of the handover
PREAMBLE = struct.Struct("<8sII")
STATE_LENGTH = struct.Struct("<Q")
MAX_DESCRIPTION = 4096
TIMEOUT = 10.0  # seconds a migration waits on a quiet peer, in any step
MAX_DOWNTIME = 0.3  # seconds the guest may stay paused, by the last round's estimate
Channel = BinaryIO | socket.socket

__all__ = ["Cancellation", "Hold", "MigrationFailed", "Options", "Report"]


@dataclass(frozen=True)
class Options:
    """How a live migration goes: rounds, allowed downtime, patience with the target."""

    max_rounds: int = 8  # pre-copy rounds after the first, at most
    max_downtime: float = MAX_DOWNTIME  # seconds; pre-copy goes on while the rest won't fit
    timeout: float = TIMEOUT  # seconds without progress on the channel before giving up
    auto_converge: bool = False  # throttle the vCPUs while rounds do not converge


@dataclass
class Round:
    """What one pre-copy round (or the paused one) sent."""

    pages: int
    bytes: int


@dataclass
class Report:
    """How a snapshot or a migration went; times in seconds."""

    pages: int = 0
    bytes: int = 0
    tag_bytes: int = 0
    state_bytes: int = 0
    rounds: list[Round] = field(default_factory=list)
    dirty_pages_from_kvm: int = 0  # host pages the guest wrote, from KVM's dirty log
    downtime: float = 0.0  # paused: from stopping the vCPUs to the target taking over
    total: float = 0.0


def snapshot(machine: Machine, sink: Channel) -> Report:
    """Pause ``machine``, write its preamble, RAM and state to ``sink``, let it run on."""
    started = time.monotonic()
    send = _sender(sink)
    assert machine.memory is not None
    with machine.paused():
        send(_preamble(machine))
        writer = StreamWriter(machine.memory, sink)
        writer.header()
        writer.all_pages()
        writer.end()
        state = machine_state.save(machine)
        send(STATE_LENGTH.pack(len(state)) + state)
    report = _report(machine, writer.totals.pages, writer.totals.bytes, len(state))
    report.rounds = [Round(writer.totals.pages, writer.totals.bytes)]
    report.downtime = report.total = time.monotonic() - started
    return report


def migrate(
    machine: Machine,
    target: socket.socket,
    options: Options = Options(),
    *,
    progress: live.ProgressCallback | None = None,
    cancellation: Cancellation | None = None,
) -> Report:
    """Migrate ``machine`` live to the target on ``target``; its run ends when the target has it.

    Raises MigrationFailed (the machine runs on, ``paused`` seconds later
    at most) if the target refuses, fails, stalls or goes away before the
    go-ahead, or the migration is cancelled or does not converge; and
    handover.OutcomeUnknown (the machine stays paused, its disks released,
    until the operator decides through its ``hold``) if the go-ahead's
    answer is lost.
    """
    assert machine.memory is not None
    memory = machine.memory
    cancellation = cancellation or Cancellation()
    started = time.monotonic()
    rounds: list[Round] = []
    sent = Round(0, 0)

    def on_progress(p: live.Progress) -> None:
        if p.pages != sent.pages or p.phase == "done":
            rounds.append(Round(p.pages - sent.pages, p.bytes - sent.bytes))
            sent.pages, sent.bytes = p.pages, p.bytes
        if progress is not None:
            progress(p)

    log = KvmDirtyLog(machine.vm.fd, memory)
    throttle = Throttle(machine.gate)
    pause = contextlib.ExitStack()
    paused_at: list[float] = []

    def stop_the_guest() -> None:
        paused_at.append(time.monotonic())
        pause.enter_context(machine.paused())

    def hold(reason: str) -> Hold:
        kept = pause.pop_all()  # the guest stays paused after this call returns

        def resume() -> None:
            machine.lock_disks()
            kept.close()

        def quit_() -> None:
            machine.stop(EndReason.QUIT)
            kept.close()

        return Hold(reason, resume, quit_)

    target.settimeout(options.timeout)
    cancellation.attach(target)
    with pause:
        try:
            memory.dirty.start()
            log.start()
            target.sendall(_preamble(machine))
            totals = live.send_live(
                memory,
                target,
                pause=stop_the_guest,
                max_rounds=options.max_rounds,
                max_downtime=options.max_downtime,
                progress=on_progress,
                harvest=log.harvest,
                slow_down=throttle.slow_down if options.auto_converge else None,
            )
            state = machine_state.save(machine)
            target.sendall(STATE_LENGTH.pack(len(state)) + state)
            handover.source_commit(
                target,
                timeout=options.timeout,
                cancellation=cancellation,
                release=machine.unlock_disks,
                hold=hold,
            )
        except handover.OutcomeUnknown:
            raise
        except (OSError, gm.GuestMemoryError) as err:
            paused = time.monotonic() - paused_at[0] if paused_at else 0.0
            why = "cancelled" if cancellation.cancelled else handover.why(err)
            failed = MigrationFailed(f"migration failed, the guest runs on here: {why}")
            failed.paused = paused
            raise failed from err
        finally:
            throttle.stop()
            log.stop()
            memory.dirty.stop()
        machine.stop(EndReason.MIGRATED)
    report = _report(machine, totals.pages, totals.bytes, len(state))
    report.rounds = [r for r in rounds if r.pages or r.bytes]
    report.dirty_pages_from_kvm = log.pages
    report.total = time.monotonic() - started
    report.downtime = time.monotonic() - paused_at[0]
    return report


def take_over(machine: Machine, source: socket.socket, *, timeout: float = TIMEOUT) -> Report:
    """Receive a live migration into ``machine`` and take the guest over (:mod:`handover`).

    Returns when the guest is this machine's to run (its disks locked).
    Raises StreamError or StateError (answered NO: the source runs on) for
    a migration that is corrupt, stalled or not this machine's,
    MigrationFailed if the source kept the guest, and
    handover.OutcomeUnknown if the go-ahead may have been sent but did not
    arrive.
    """
    try:
        report = receive(machine, source, idle_timeout=timeout)
    except (OSError, gm.GuestMemoryError) as err:
        with contextlib.suppress(OSError):
            handover.send(source, handover.NO, str(err))
        raise
    handover.target_commit(
        source,
        timeout=timeout,
        acquire=machine.lock_disks,
        hold=lambda reason: Hold(reason, machine.lock_disks, lambda: None),
    )
    return report


def receive(machine: Machine, source: Channel, *, idle_timeout: float | None = TIMEOUT) -> Report:
    """Load a snapshot or a migration from ``source`` into ``machine`` (built without a kernel).

    Raises StreamError or StateError, with the offset from the start of
    ``source``, for anything corrupt, truncated, stalled, followed by more
    bytes, or not this machine's; the machine's state is then unchanged
    (its RAM is not: a refused target never runs).
    """
    assert machine.memory is not None
    started = time.monotonic()
    incoming = _Input(source, idle_timeout)
    description = _read_preamble(incoming)
    with _offsets_from(PREAMBLE.size):
        machine_state.check_description(machine, Reader(description, 0))
    reader = StreamReader(machine.memory, source, idle_timeout=idle_timeout, trailing=True)
    with _offsets_from(incoming.offset):
        reader.header()
        totals = reader.records()
    incoming.follow(reader.leftover(), reader.offset)
    (length,) = STATE_LENGTH.unpack(incoming.exactly(STATE_LENGTH.size, "the state's length"))
    if length > MAX_STATE:
        raise StateError(incoming.offset - 8, f"a state of {length} bytes, more than {MAX_STATE}")
    state_at = incoming.offset
    state = incoming.exactly(length, "the state")
    incoming.nothing_more()
    with _offsets_from(state_at):
        machine_state.load(machine, state)
    report = _report(machine, totals.pages, totals.bytes, len(state))
    report.total = time.monotonic() - started
    return report


def _preamble(machine: Machine) -> bytes:
    description = machine_state.describe(machine)
    return PREAMBLE.pack(MAGIC, VERSION, len(description)) + description


def _read_preamble(incoming: _Input) -> bytes:
    head = incoming.exactly(PREAMBLE.size, "the preamble")
    magic, version, length = PREAMBLE.unpack(head)
    if magic != MAGIC:
        raise StateError(0, f"not a guestmem machine snapshot or migration (magic {magic!r})")
    if version != VERSION and not (version == 1 and not incoming.is_socket):
        raise StateError(8, f"version {version}; this VMM reads {VERSION} (and 1 from a file)")
    if length > MAX_DESCRIPTION:
        raise StateError(12, f"a machine description of {length} bytes")
    return incoming.exactly(length, "the machine description")


@contextlib.contextmanager
def _offsets_from(start: int) -> Iterator[None]:
    """Errors inside the block count their offsets from ``start`` of the whole."""
    try:
        yield
    except StateError as err:
        raise StateError(start + err.offset, err.reason) from None
    except gm.StreamError as err:
        raise gm.StreamError(start + err.offset, err.reason) from None


def _report(machine: Machine, pages: int, sent: int, state: int) -> Report:
    assert machine.memory is not None
    tagged = machine.memory.tag_mode is not gm.TagMode.NONE
    tag_bytes = pages * (STREAM_PAGE // GRANULE // 2) if tagged else 0
    return Report(pages=pages, bytes=sent, tag_bytes=tag_bytes, state_bytes=state)


def _sender(sink: Channel) -> Callable[[bytes], object]:
    return sink.sendall if isinstance(sink, socket.socket) else sink.write


class _Input:
    """Reads the parts around the RAM stream, counting offsets from the start of the source."""

    def __init__(self, source: Channel, idle_timeout: float | None) -> None:
        self._source = source
        self.is_socket = isinstance(source, socket.socket)
        if isinstance(source, socket.socket):
            source.settimeout(idle_timeout)
        self._timeout = idle_timeout
        self._buffer = bytearray()
        self.offset = 0  # of the first byte not yet taken

    def follow(self, leftover: bytes, stream_bytes: int) -> None:
        """Go on after the RAM stream: ``leftover`` was read past its ``stream_bytes``."""
        self.offset += stream_bytes
        self._buffer = bytearray(leftover)

    def exactly(self, n: int, what: str) -> bytes:
        while len(self._buffer) < n:
            chunk = self._read(n - len(self._buffer), what)
            if not chunk:
                raise gm.StreamError(
                    self.offset + len(self._buffer), f"truncated inside {what} ({n} bytes)"
                )
            self._buffer += chunk
        data, self._buffer = bytes(self._buffer[:n]), self._buffer[n:]
        self.offset += n
        return data

    def nothing_more(self) -> None:
        """Refuse bytes after the state (on a socket: any that have arrived before the answer)."""
        extra = bool(self._buffer) or more_arrived(self._source)
        if extra:
            raise gm.StreamError(self.offset, "bytes after the state: nothing may follow it")

    def _read(self, n: int, what: str) -> bytes:
        if not isinstance(self._source, socket.socket):
            return self._source.read(n)
        try:
            return self._source.recv(n)
        except TimeoutError:
            raise gm.StreamError(
                self.offset + len(self._buffer),
                f"the sender sent nothing for {self._timeout:g} s inside {what}",
            ) from None
