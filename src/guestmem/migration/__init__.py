"""Migration of guest memory with its MTE tags: save/restore and live pre-copy."""

from __future__ import annotations

from guestmem.migration.header import StreamHeader
from guestmem.migration.live import Progress, receive, send_live
from guestmem.migration.save import inspect, restore, save
from guestmem.migration.stream import StreamReader, StreamWriter, Totals

__all__ = [
    "Progress",
    "StreamHeader",
    "StreamReader",
    "StreamWriter",
    "Totals",
    "inspect",
    "receive",
    "restore",
    "save",
    "send_live",
]
