"""A GDB remote stub over guest memory, MTE tags included (the DEBUG access class).

One protocol engine (framing in ``packets``, the wire loop in ``server`` and
``wire``, the shared commands in ``commands`` and ``memory_commands``) serves
two targets:

- guest physical memory: ``GdbStub(mem).serve()`` lets ``gdb-multiarch``
  (``target remote HOST:PORT``) read and write guest memory without tripping
  a tag check or disturbing a tag, and read and set allocation tags
  (``memory-tag ...``) in every tag mode (docs/gdbstub.md);
- a running guest: ``GuestDebugServer(mem, run).serve()`` stops, steps and
  resumes vCPUs through a VMM's :class:`RunControl` and reads memory by
  virtual address (docs/vmm-debug.md).
"""

from __future__ import annotations

from guestmem.gdbstub.commands import InvalidRequest
from guestmem.gdbstub.debug_server import GuestDebugServer
from guestmem.gdbstub.run_control import (
    RunControl,
    StopEvent,
    StopReason,
    UnmappedAddressError,
    WatchKind,
    Watchpoint,
    canonical,
)
from guestmem.gdbstub.server import GdbStub, RemoteAddressError
from guestmem.gdbstub.target import RegisterProvider

__all__ = [
    "GdbStub",
    "GuestDebugServer",
    "InvalidRequest",
    "RegisterProvider",
    "RemoteAddressError",
    "RunControl",
    "StopEvent",
    "StopReason",
    "UnmappedAddressError",
    "WatchKind",
    "Watchpoint",
    "canonical",
]
