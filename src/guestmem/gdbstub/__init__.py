"""A GDB remote stub over guest memory, MTE tags included (the DEBUG access class).

``GdbStub(mem).serve()`` lets ``gdb-multiarch`` (``target remote HOST:PORT``)
read and write guest memory without tripping a tag check or disturbing a tag,
and read and set allocation tags (``memory-tag ...``) in every tag mode.
docs/gdbstub.md lists the packets.
"""

from __future__ import annotations

from guestmem.gdbstub.server import GdbStub, RemoteAddressError
from guestmem.gdbstub.target import RegisterProvider

__all__ = ["GdbStub", "RegisterProvider", "RemoteAddressError"]
