"""GDB run control: a remote stub that stops, steps and resumes a running guest's vCPUs.

:class:`GuestDebugServer` listens and refuses newcomers as
:class:`~guestmem.gdbstub.server.GdbServer` does and serves each client a
:class:`~guestmem.gdbstub.debug_session.DebugSession` over the VMM's
:class:`~guestmem.gdbstub.run_control.RunControl`. Software breakpoints are
always taken out again when a session ends, however it ends.
docs/vmm-debug.md lists the packets and error replies.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

from guestmem.gdbstub.debug_session import STOP_WAIT, DebugSession
from guestmem.gdbstub.run_control import RunControl, StopEvent
from guestmem.gdbstub.server import DEFAULT_IDLE_TIMEOUT, GdbServer
from guestmem.memory import GuestMemory

log = logging.getLogger(__name__)
T = TypeVar("T")


class GuestDebugServer(GdbServer[DebugSession]):
    """Serve a running guest to GDB: ``GuestDebugServer(mem, run, port=1234).serve()``.

    Listening, refusing a second client and closing work as in
    :class:`~guestmem.gdbstub.GdbStub`. Each session stops the guest when
    it begins; when it ends (``D``, ``k``, ``vKill``, a closed connection,
    the idle timeout or :meth:`close`) every breakpoint and watchpoint is
    taken out and the guest resumes. Once the guest has exited (``W00``),
    :meth:`serve` returns.
    """

    def __init__(
        self,
        memory: GuestMemory,
        run: RunControl,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        unix_path: str | None = None,
        allow_remote: bool = False,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        pid: int | None = None,
    ) -> None:
        """Listen as :class:`~guestmem.gdbstub.GdbStub` does; ``pid`` (default: ours) is GDB's."""
        super().__init__(
            host=host,
            port=port,
            unix_path=unix_path,
            allow_remote=allow_remote,
            idle_timeout=idle_timeout,
        )
        self.memory = memory
        self.run = run
        self.pid = os.getpid() if pid is None else pid
        self.exited = False

    def new_session(self) -> DebugSession | None:
        """A session for the next client; None once the guest has exited."""
        return None if self.exited else DebugSession(self.memory, self.run, self.pid)

    def begin(self, session: DebugSession) -> bool:
        """Stop the guest for the client; False if it powered off before the client came."""
        self.run.stop()
        first = self.run.wait(0)
        if first is not None and first.reason == "exited":
            session.exited = True
            return False
        return True

    def finish(self, session: DebugSession) -> None:
        """Whatever ended the session: breakpoints out, then the guest runs on.

        Each step is tried even if the one before failed: a RunControl that
        raises must not leave a BRK in guest memory.
        """
        if session.running:
            event = _attempt(self._stop_running)
            session.exited = session.exited or (event is not None and event.reason == "exited")
        _attempt(session.remove_all)
        if session.exited:
            self.exited = True
            self.stop_serving()  # serve() returns: there is no guest left to debug
        else:
            _attempt(self.run.detach)
            _attempt(lambda: self.run.resume(frozenset()))

    def _stop_running(self) -> StopEvent | None:
        self.run.stop()
        return self.run.wait(STOP_WAIT)


def _attempt(step: Callable[[], T]) -> T | None:
    """``step()``, or None if it raised (logged)."""
    try:
        return step()
    except Exception:
        log.exception("ending the session: %s failed", getattr(step, "__name__", step))
        return None
