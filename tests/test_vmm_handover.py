"""The handover at the end of a live migration: exactly one side runs the guest.

Source and target commit steps run on two threads over a socket pair, or
through a relay that loses one message, as a network would. What each
side decides (run on, run, hold) is checked against what the other did.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

import guestmem as gm
from guestmem.vmm import handover as h

QUICK = 0.5  # seconds: the tests' patience with a peer that lost a message


@dataclass
class Side:
    """What one side did: its disk lock, and its outcome."""

    locked: bool
    events: list[str] = field(default_factory=list)
    outcome: BaseException | None = None
    holds: list[h.Hold] = field(default_factory=list)

    def hold(self, reason: str) -> h.Hold:
        hold = h.Hold(reason, lambda: self.events.append("resumed"), lambda: None)
        self.holds.append(hold)
        return hold

    def release(self) -> None:
        self.events.append("released")
        self.locked = False

    def acquire(self) -> None:
        self.events.append("acquired")
        self.locked = True


def _run(
    source_end: socket.socket,
    target_end: socket.socket,
    *,
    cancellation: h.Cancellation | None = None,
    acquire: Callable[[Side], None] = Side.acquire,
) -> tuple[Side, Side]:
    source, target = Side(locked=True), Side(locked=False)

    def run_source() -> None:
        try:
            h.source_commit(
                source_end,
                timeout=QUICK,
                cancellation=cancellation or h.Cancellation(),
                release=source.release,
                hold=source.hold,
            )
        except BaseException as err:
            source.outcome = err

    def run_target() -> None:
        try:
            h.target_commit(
                target_end, timeout=QUICK, acquire=lambda: acquire(target), hold=target.hold
            )
        except BaseException as err:
            target.outcome = err

    threads = [threading.Thread(target=run_source), threading.Thread(target=run_target)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return source, target


def _source_alone(channel: socket.socket, source: Side) -> None:
    h.source_commit(
        channel,
        timeout=QUICK,
        cancellation=h.Cancellation(),
        release=source.release,
        hold=source.hold,
    )


class Relay:
    """Carries bytes between two socket pairs, swallowing messages that start with ``drop``."""

    def __init__(self, drop: bytes) -> None:
        self.source, source_side = socket.socketpair()
        self.target, target_side = socket.socketpair()
        self._drop = drop
        for a, b in ((source_side, target_side), (target_side, source_side)):
            threading.Thread(target=self._carry, args=(a, b), daemon=True).start()
        self._ends = (source_side, target_side)

    def _carry(self, a: socket.socket, b: socket.socket) -> None:
        while data := a.recv(65536):
            if not data.startswith(self._drop):
                b.sendall(data)

    def close(self) -> None:
        for end in (self.source, self.target, *self._ends):
            end.close()


def test_the_target_runs_and_the_source_ends_after_go_and_taken() -> None:
    a, b = socket.socketpair()
    with a, b:
        source, target = _run(a, b)
    assert source.outcome is None and target.outcome is None
    assert source.events == ["released"] and target.events == ["acquired"]
    assert not source.locked and target.locked


def test_a_target_that_refuses_leaves_the_source_its_disks() -> None:
    a, b = socket.socketpair()
    with a, b:
        h.send(b, h.NO, "this machine has 2 vCPUs, not 4")
        source = Side(locked=True)
        with pytest.raises(h.MigrationFailed, match="2 vCPUs"):
            _source_alone(a, source)
    assert source.locked and not source.events


def test_a_cancel_before_the_go_ahead_aborts_and_the_target_never_runs() -> None:
    cancellation = h.Cancellation()
    assert cancellation.cancel()
    a, b = socket.socketpair()
    with a, b:
        source, target = _run(a, b, cancellation=cancellation)
    assert isinstance(source.outcome, h.MigrationFailed)
    assert isinstance(target.outcome, h.MigrationFailed), target.outcome
    assert source.locked and not target.locked
    assert "acquired" not in target.events


def test_a_cancel_after_the_go_ahead_is_refused() -> None:
    cancellation = h.Cancellation()
    assert cancellation.commit()
    assert not cancellation.cancel()


def test_a_lost_go_ahead_holds_both_sides_and_the_operator_runs_one() -> None:
    relay = Relay(drop=h.GO)
    try:
        source, target = _run(relay.source, relay.target)
    finally:
        relay.close()
    assert isinstance(source.outcome, h.OutcomeUnknown), source.outcome
    assert isinstance(target.outcome, h.OutcomeUnknown), target.outcome
    assert not source.locked and not target.locked  # nobody runs: both wait, paused
    assert source.outcome.hold is source.holds[0] and target.outcome.hold is target.holds[0]
    source.outcome.hold.resume()
    target.outcome.hold.quit()
    assert source.events == ["released", "resumed"]
    assert source.holds[0].wait(0) == "resume" and target.holds[0].wait(0) == "quit"


def test_a_lost_answer_to_the_go_ahead_holds_the_source_and_the_target_runs() -> None:
    relay = Relay(drop=h.TAKEN)
    try:
        source, target = _run(relay.source, relay.target)
    finally:
        relay.close()
    assert isinstance(source.outcome, h.OutcomeUnknown), source.outcome
    assert "may be running" in str(source.outcome)
    assert target.outcome is None and target.locked


def test_a_target_whose_disks_are_taken_refuses_after_go_and_both_hold() -> None:
    def locked_elsewhere(side: Side) -> None:
        raise gm.UsageError("disk.img is locked by another VMM")

    a, b = socket.socketpair()
    with a, b:
        source, target = _run(a, b, acquire=locked_elsewhere)
    assert isinstance(source.outcome, h.OutcomeUnknown)
    assert "resuming here is safe" in str(source.outcome)
    assert isinstance(target.outcome, h.OutcomeUnknown)
    assert "locked by another VMM" in str(target.outcome)


def test_a_source_that_hangs_up_before_go_keeps_the_guest() -> None:
    a, b = socket.socketpair()
    target = Side(locked=False)
    with b:
        a.close()
        with pytest.raises(h.MigrationFailed):
            h.target_commit(b, timeout=QUICK, acquire=target.acquire, hold=target.hold)
    assert not target.locked and not target.holds


@pytest.mark.parametrize(
    "answer", [b"OK\x00\x00\x00\x00", b"NO\xff\xff\xff\xff", b"R"], ids=["v1-ok", "huge", "short"]
)
def test_an_answer_that_is_not_ready_or_no_fails_before_the_go_ahead(answer: bytes) -> None:
    a, b = socket.socketpair()
    source = Side(locked=True)
    with a, b:
        b.sendall(answer)
        with pytest.raises(h.MigrationFailed):
            _source_alone(a, source)
    assert source.locked and not source.events


def test_a_hold_is_decided_once_and_a_failed_resume_stays_held() -> None:
    attempts: list[int] = []

    def resume() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise gm.UsageError("disk.img is locked by another VMM")

    hold = h.Hold("lost", resume, lambda: None)
    with pytest.raises(gm.UsageError):
        hold.resume()
    assert hold.wait(0) is None
    hold.resume()
    assert hold.wait(0) == "resume"
    with pytest.raises(gm.UsageError, match="decided already"):
        hold.quit()
