"""Live pre-copy migration.

Send everything, then rounds of dirty pages while the guest runs, then pause
it and send the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from guestmem.errors import ConvergenceError
from guestmem.migration.stream import (
    IDLE_TIMEOUT,
    RECORD_MAX,
    Sink,
    Source,
    StreamReader,
    StreamWriter,
    Totals,
)
from guestmem.mover import Mover
from guestmem.units import STREAM_PAGE, Frames


@dataclass(frozen=True)
class Progress:
    """Where a migration stands: sent on the source side, applied on the target."""

    phase: str  # "precopy", "paused", "done"
    round: int
    pages: int
    bytes: int
    dirty_pages: int  # stream pages dirtied during the last round
    dirty_rate: float  # of those, per second


ProgressCallback = Callable[[Progress], None]


def send_live(
    memory: Mover,
    sink: Sink,
    *,
    pause: Callable[[], None],
    max_rounds: int = 8,
    converged_pages: int = 64,
    progress: ProgressCallback | None = None,
    harvest: Callable[[], None] | None = None,
    max_downtime: float | None = None,
    slow_down: Callable[[int], None] | None = None,
) -> Totals:
    """Migrate ``memory`` while its users keep writing to it.

    Round 0 sends every page; each later round sends the pages dirtied during
    the one before, until a round is small (``converged_pages`` stream pages) or
    ``max_rounds`` is reached. Then ``pause()`` stops the writers (the VMM
    stops its vCPUs and devices) and the last dirty pages are sent.

    The dirty log: if it is off, send_live starts it and stops it at the
    end. If the VMM already runs it (e.g. fed from KVM's dirty log),
    send_live uses it as it is: it takes from it each round, so the pages
    marked in it are sent, and leaves it running (clean as of the last
    round) for the VMM. ``harvest()``, if given, runs before each take:
    the VMM adds to the log what only it sees (KVM's dirty log: the
    guest's own writes and tag changes).

    With ``max_downtime`` (seconds), a round converges when the pages left
    would be sent within it at the rate the last round achieved (see
    :func:`final_round_estimate`), instead of when they are few; if
    ``max_rounds`` pass without that, :class:`ConvergenceError` is raised
    *before* ``pause()``: the writers never stopped. ``slow_down(round)``,
    if given, is called after each round that did not converge (a VMM
    throttles its vCPUs there).
    """
    take = memory.dirty.take if harvest is None else _harvested(memory, harvest)
    writer = StreamWriter(memory, sink)
    owned = not memory.dirty.active
    if owned:
        memory.dirty.start()
    try:
        writer.header()
        started, sent = time.monotonic(), writer.totals.bytes
        writer.all_pages()
        writer.round()
        dirty = take().to(STREAM_PAGE)
        for round_ in range(max_rounds + 1):
            elapsed = max(time.monotonic() - started, 1e-9)
            rate = (writer.totals.bytes - sent) / elapsed
            _report(progress, "precopy", writer.totals, len(dirty), len(dirty) / elapsed)
            if max_downtime is None:
                if len(dirty) <= converged_pages:
                    break
            elif final_round_estimate(len(dirty), rate) <= max_downtime:
                break
            if round_ == max_rounds:
                if max_downtime is None:
                    break
                raise ConvergenceError(
                    f"after {max_rounds} rounds, {len(dirty)} pages are still dirty: about "
                    f"{final_round_estimate(len(dirty), rate) * 1000:.0f} ms to send paused, "
                    f"more than the {max_downtime * 1000:.0f} ms allowed; the guest was never "
                    "paused"
                )
            if slow_down is not None:
                slow_down(round_ + 1)
            started, sent = time.monotonic(), writer.totals.bytes
            writer.pages(dirty)
            writer.round()
            dirty = take().to(STREAM_PAGE)
        pause()
        dirty = dirty.union(take())
        _report(progress, "paused", writer.totals, len(dirty), 0.0)
        writer.pages(dirty)
        writer.round()
        writer.end()
        _report(progress, "done", writer.totals, 0, 0.0)
        return writer.totals
    finally:
        if owned:
            memory.dirty.stop()


def final_round_estimate(pages: int, bytes_per_second: float) -> float:
    """Seconds to send ``pages`` stream pages (records with tags) at ``bytes_per_second``."""
    if pages == 0:
        return 0.0
    return pages * RECORD_MAX / max(bytes_per_second, 1.0)


def _harvested(memory: Mover, harvest: Callable[[], None]) -> Callable[[], Frames]:
    def take() -> Frames:
        harvest()
        return memory.dirty.take()

    return take


def receive(
    source: Source,
    memory: Mover,
    *,
    progress: ProgressCallback | None = None,
    idle_timeout: float | None = IDLE_TIMEOUT,
) -> Totals:
    """Apply a (live or saved) stream to ``memory`` round by round.

    A sender that goes quiet for ``idle_timeout`` seconds (on a socket) is a
    StreamError with the offset reached, not a hang; None waits for ever.
    """
    reader = StreamReader(memory, source, idle_timeout=idle_timeout)
    reader.header()

    def on_round(totals: Totals) -> None:
        _report(progress, "precopy", totals, 0, 0.0)

    totals = reader.records(on_round)
    _report(progress, "done", totals, 0, 0.0)
    return totals


def _report(
    callback: ProgressCallback | None, phase: str, totals: Totals, dirty: int, rate: float
) -> None:
    if callback is not None:
        callback(Progress(phase, totals.rounds, totals.pages, totals.bytes, dirty, rate))
