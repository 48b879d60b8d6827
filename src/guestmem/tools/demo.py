"""The demo guest image the command line serves, saves and migrates."""

from __future__ import annotations

import hashlib

import numpy as np

import guestmem as gm
from guestmem.units import GRANULE, STREAM_PAGE

DEMO_GPA = 0x4000_0000


def demo_memory(size_mib: int, tags: str, seed: int = 7) -> gm.GuestMemory:
    """A guest whose every other stream page holds data and a tag pattern (same on any host)."""
    mem = gm.GuestMemory.anonymous(size_mib << 20, gpa=DEMO_GPA, tags=tags)
    rng = np.random.default_rng(seed)
    for page in range(0, (size_mib << 20) // STREAM_PAGE, 2):
        gpa = DEMO_GPA + page * STREAM_PAGE
        mem.write(gpa, rng.integers(0, 256, STREAM_PAGE, dtype=np.uint8).tobytes())
        if mem.tag_mode is not gm.TagMode.NONE:
            mem.set_tags(gpa, STREAM_PAGE, (np.arange(STREAM_PAGE // GRANULE) + page) % 16)
    return mem


def digest(mem: gm.GuestMemory) -> str:
    """SHA-256 of every region's data and tags, to compare two ends."""
    h = hashlib.sha256()
    for region in mem.regions:
        h.update(mem.read(region.gpa, region.size, route=gm.Route.TCO))
        h.update(mem.get_tags(region.gpa, region.size).tobytes())
    return h.hexdigest()
