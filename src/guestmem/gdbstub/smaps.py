"""A /proc/PID/smaps for guest memory, served to GDB through ``vFile``.

GDB 13 (Debian 12's gdb-multiarch) decides whether an address is tagged
from the inferior's smaps: a mapping whose ``VmFlags`` has ``mt`` was mapped
with PROT_MTE. The stub shows each guest region as one mapping at its GPA,
flagged ``mt`` when the memory has tags.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guestmem.kinds import TagMode

if TYPE_CHECKING:
    from guestmem.memory import GuestMemory


def smaps_text(memory: GuestMemory) -> bytes:
    """One smaps entry per guest region, in the kernel's format."""
    flags = "rd wr mr mw me ac" + (" mt" if memory.tag_mode is not TagMode.NONE else "")
    lines = []
    for region in memory.regions:
        kib = region.size // 1024
        lines += [
            f"{region.gpa:08x}-{region.end:08x} rw-p 00000000 00:00 0"
            f"{'':<10}[guest {region.gpa:#x}]",
            f"Size:           {kib:>8} kB",
            f"Rss:            {kib:>8} kB",
            f"Anonymous:      {kib:>8} kB",
            "AnonHugePages:         0 kB",
            "Swap:                  0 kB",
            f"VmFlags: {flags} ",
        ]
    return ("\n".join(lines) + "\n").encode()
