"""The guest's layout as a debugger asks for it: /proc files and region queries.

GDB 13 (Debian 12's gdb-multiarch) decides whether an address is tagged
from the inferior's smaps: a mapping whose ``VmFlags`` has ``mt`` was mapped
with PROT_MTE. ``info proc mappings`` reads /proc/PID/maps; GDB's memory map
comes from ``qXfer:memory-map:read``; LLDB asks ``qMemoryRegionInfo`` (its
``flags:mt`` turns ``memory tag read/write`` on). Each guest region is one
mapping at its GPA, tagged unless the memory is ``TagMode.NONE``; every
address outside them lies in a gap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guestmem.kinds import TagMode

if TYPE_CHECKING:
    from guestmem.memory import GuestMemory

# The last gap ends at 2**64-1: start + size must fit in 64 bits, or LLDB's
# region walk wraps to 0 and never ends.
ADDRESS_SPACE_END = (1 << 64) - 1


def _tagged(memory: GuestMemory) -> bool:
    return memory.tag_mode is not TagMode.NONE


def _mapping_line(gpa: int, end: int) -> str:
    return f"{gpa:08x}-{end:08x} rw-p 00000000 00:00 0{'':<10}[guest {gpa:#x}]"


def maps_text(memory: GuestMemory) -> bytes:
    """One /proc/PID/maps line per guest region."""
    lines = [_mapping_line(r.gpa, r.end) for r in memory.regions]
    return ("\n".join(lines) + "\n").encode()


def smaps_text(memory: GuestMemory) -> bytes:
    """One smaps entry per guest region, in the kernel's format."""
    flags = "rd wr mr mw me ac" + (" mt" if _tagged(memory) else "")
    lines = []
    for region in memory.regions:
        kib = region.size // 1024
        lines += [
            _mapping_line(region.gpa, region.end),
            f"Size:           {kib:>8} kB",
            f"Rss:            {kib:>8} kB",
            f"Anonymous:      {kib:>8} kB",
            "AnonHugePages:         0 kB",
            "Swap:                  0 kB",
            f"VmFlags: {flags} ",
        ]
    return ("\n".join(lines) + "\n").encode()


def memory_map_xml(memory: GuestMemory) -> bytes:
    """GDB's memory map: each guest region as RAM."""
    entries = [
        f'<memory type="ram" start="{r.gpa:#x}" length="{r.size:#x}"/>' for r in memory.regions
    ]
    return "\n".join(
        [
            '<?xml version="1.0"?>',
            '<!DOCTYPE memory-map PUBLIC "+//IDN gnu.org//DTD GDB Memory Map V1.0//EN"'
            ' "http://sourceware.org/gdb/gdb-memory-map.dtd">',
            "<memory-map>",
            *entries,
            "</memory-map>",
        ]
    ).encode()


def region_info(memory: GuestMemory, address: int) -> bytes:
    """LLDB's ``qMemoryRegionInfo`` reply for ``address``: its region, or the gap around it.

    A gap has no permissions; it ends where the next region starts, the last
    one at 2**64-1 (so ``start + size`` never wraps to 0).
    """
    start = 0
    for region in sorted(memory.regions, key=lambda r: r.gpa):
        if address < region.gpa:
            return b"start:%x;size:%x;" % (start, region.gpa - start)
        if address < region.end:
            flags = b"flags:mt;" if _tagged(memory) else b""
            return b"start:%x;size:%x;permissions:rw;" % (region.gpa, region.size) + flags
        start = region.end
    return b"start:%x;size:%x;" % (start, ADDRESS_SPACE_END - start)
