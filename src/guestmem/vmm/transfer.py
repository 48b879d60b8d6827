"""Moving a running machine: snapshots to a file and live migration over a socket.

Both write the same bytes (docs/design.md, "Moving a machine"), version 1::

    preamble: magic "GMVMMOVE" | version u32 | length u32 | the ``machine`` section
    RAM: a guestmem migration stream (docs/stream-format.md), header to end record
    state: length u64 | the machine's state (machine_state, framed by state_codec)

A snapshot pauses the machine, writes all three and lets it run on. A live
migration writes the preamble, then pre-copy rounds of RAM while the guest
runs (its writes and tag changes from KVM's dirty log, the VMM's own from
guestmem's), pauses it, sends the last dirty pages and the state, and waits
for the target's answer: ``OK`` | u32 0, or ``NO`` | u32 length | reason.
On ``OK`` the source's run ends (outcome ``migrated``); on anything else it
runs on, as if nothing had happened.

The target reads the preamble and refuses a machine unlike its own before
any page, then the RAM, then the state, and answers.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

import guestmem as gm
from guestmem.migration import live
from guestmem.migration.stream import IDLE_TIMEOUT, StreamReader, StreamWriter
from guestmem.units import GRANULE, STREAM_PAGE
from guestmem.vmm import machine_state
from guestmem.vmm.dirty_log import KvmDirtyLog
from guestmem.vmm.state_codec import MAX_STATE, Reader, StateError

if TYPE_CHECKING:
    from guestmem.vmm.machine import Machine

MAGIC = b"GMVMMOVE"
VERSION = 1
PREAMBLE = struct.Struct("<8sII")
STATE_LENGTH = struct.Struct("<Q")
ANSWER = struct.Struct("<2sI")
MAX_DESCRIPTION = 4096
MAX_REASON = 4096
ANSWER_TIMEOUT = 120.0  # seconds the source waits for the target to load the state
Channel = BinaryIO | socket.socket


class MigrationFailed(gm.GuestMemoryError):
    """A live migration did not complete; the source machine runs on."""


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
    downtime: float = 0.0  # paused: from stopping the vCPUs to the target's answer
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
    *,
    max_rounds: int = 8,
    converged_pages: int = 64,
    progress: live.ProgressCallback | None = None,
) -> Report:
    """Migrate ``machine`` live to the target on ``target``; its run ends when the target has it.

    Raises :class:`MigrationFailed` (the machine runs on) if the target
    refuses, fails or goes away.
    """
    assert machine.memory is not None
    memory = machine.memory
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
    pause = contextlib.ExitStack()
    paused_at = [0.0]

    def stop_the_guest() -> None:
        paused_at[0] = time.monotonic()
        pause.enter_context(machine.paused())

    with pause:
        try:
            memory.dirty.start()
            log.start()
            target.sendall(_preamble(machine))
            totals = live.send_live(
                memory,
                target,
                pause=stop_the_guest,
                max_rounds=max_rounds,
                converged_pages=converged_pages,
                progress=on_progress,
                harvest=log.harvest,
            )
            state = machine_state.save(machine)
            target.sendall(STATE_LENGTH.pack(len(state)) + state)
            _await_answer(target)
        except (OSError, gm.GuestMemoryError) as err:
            raise MigrationFailed(f"migration failed, the machine runs on: {err}") from err
        finally:
            log.stop()
            memory.dirty.stop()
        machine.stop("migrated")
    report = _report(machine, totals.pages, totals.bytes, len(state))
    report.rounds = [r for r in rounds if r.pages or r.bytes]
    report.dirty_pages_from_kvm = log.pages
    report.total = time.monotonic() - started
    report.downtime = time.monotonic() - paused_at[0]
    return report


def receive(
    machine: Machine, source: Channel, *, answer: bool, idle_timeout: float | None = IDLE_TIMEOUT
) -> Report:
    """Load a snapshot or a migration from ``source`` into ``machine`` (built without a kernel).

    With ``answer`` (a live migration), tell the source whether it worked.
    Raises StreamError or StateError for anything corrupt, truncated or not
    this machine's.
    """
    assert machine.memory is not None
    started = time.monotonic()
    if isinstance(source, socket.socket):
        source.settimeout(idle_timeout)
    try:
        description = _read_preamble(source)
        machine_state.check_description(machine, Reader(description, PREAMBLE.size))
        reader = StreamReader(machine.memory, source, idle_timeout=idle_timeout, trailing=True)
        reader.header()
        totals = reader.records()
        rest = _Rest(reader.leftover(), source)
        (length,) = STATE_LENGTH.unpack(rest.exactly(STATE_LENGTH.size))
        if length > MAX_STATE:
            raise StateError(0, f"a state of {length} bytes, more than {MAX_STATE}")
        state = rest.exactly(length)
        machine_state.load(machine, state)
    except (OSError, gm.GuestMemoryError) as err:
        if answer and isinstance(source, socket.socket):
            with contextlib.suppress(OSError):
                reason = str(err).encode()[:MAX_REASON]
                source.sendall(ANSWER.pack(b"NO", len(reason)) + reason)
        raise
    if answer and isinstance(source, socket.socket):
        source.sendall(ANSWER.pack(b"OK", 0))
    report = _report(machine, totals.pages, totals.bytes, len(state))
    report.total = time.monotonic() - started
    return report


def _preamble(machine: Machine) -> bytes:
    description = machine_state.describe(machine)
    return PREAMBLE.pack(MAGIC, VERSION, len(description)) + description


def _read_preamble(source: Channel) -> bytes:
    head = _Rest(b"", source).exactly(PREAMBLE.size)
    magic, version, length = PREAMBLE.unpack(head)
    if magic != MAGIC:
        raise StateError(0, f"not a guestmem machine snapshot or migration (magic {magic!r})")
    if version != VERSION:
        raise StateError(8, f"version {version}; this VMM reads {VERSION}")
    if length > MAX_DESCRIPTION:
        raise StateError(12, f"a machine description of {length} bytes")
    return _Rest(b"", source).exactly(length)


def _await_answer(target: socket.socket) -> None:
    target.settimeout(ANSWER_TIMEOUT)
    rest = _Rest(b"", target)
    verdict, length = ANSWER.unpack(rest.exactly(ANSWER.size))
    if verdict == b"OK" and length == 0:
        return
    if verdict != b"NO" or length > MAX_REASON:
        raise MigrationFailed(f"the target answered {verdict!r}, not OK or NO")
    raise MigrationFailed(f"the target refused: {rest.exactly(length).decode(errors='replace')}")


def _report(machine: Machine, pages: int, sent: int, state: int) -> Report:
    assert machine.memory is not None
    tagged = machine.memory.tag_mode is not gm.TagMode.NONE
    tag_bytes = pages * (STREAM_PAGE // GRANULE // 2) if tagged else 0
    return Report(pages=pages, bytes=sent, tag_bytes=tag_bytes, state_bytes=state)


def _sender(sink: Channel) -> Callable[[bytes], object]:
    return sink.sendall if isinstance(sink, socket.socket) else sink.write


class _Rest:
    """Reads exactly so many bytes: first those already read, then from the source."""

    def __init__(self, already: bytes, source: Channel) -> None:
        self._buffer = bytearray(already)
        self._source = source

    def exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if isinstance(self._source, socket.socket):
                chunk = self._source.recv(n - len(self._buffer))
            else:
                chunk = self._source.read(n - len(self._buffer))
            if not chunk:
                raise StateError(len(self._buffer), f"truncated: {n} bytes wanted")
            self._buffer += chunk
        data, self._buffer = bytes(self._buffer[:n]), self._buffer[n:]
        return data
