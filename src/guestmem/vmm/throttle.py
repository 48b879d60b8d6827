"""Auto-converge: slowing the guest's vCPUs so a live migration's pre-copy can catch up.

A guest that dirties memory faster than the channel carries it never
converges. As QEMU's auto-converge does, each pre-copy round that did not
converge takes a larger share of every period from the vCPUs (20% first,
then 10% more a round, at most 99%): the guest runs slower and dirties
less. The vCPUs are held at the gate (:meth:`Gate.hold`), apart from a
debugger's stops.
"""

from __future__ import annotations

import threading

from guestmem.vmm.gate import Gate

PERIOD = 0.1  # seconds: held for ``share`` of each
FIRST, STEP, MOST = 0.2, 0.1, 0.99


class Throttle:
    """Holds the vCPUs for a growing share of each period once :meth:`slow_down` is called."""

    def __init__(self, gate: Gate) -> None:
        """Not throttling yet."""
        self._gate = gate
        self.share = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def slow_down(self, round_: int) -> None:
        """One more round did not converge: take a larger share (send_live's ``slow_down``)."""
        self.share = FIRST if self.share == 0 else min(self.share + STEP, MOST)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="throttle", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._gate.hold(True)
            self._stop.wait(PERIOD * self.share)
            self._gate.hold(False)
            self._stop.wait(PERIOD * (1 - self.share))

    def stop(self) -> None:
        """Let the vCPUs run at full speed again."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._gate.hold(False)
