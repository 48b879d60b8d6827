"""The guest's layout as debuggers ask for it: LLDB's qMemoryRegionInfo, GDB's
memory map, and /proc/PID/maps and smaps over vFile."""

from __future__ import annotations

import re

import pytest

import guestmem as gm
from conftest import BASE, HOLE, LAYOUT, REGION
from guestmem.gdbstub.packets import unescape
from guestmem.gdbstub.session import Session
from guestmem.gdbstub.smaps import maps_text, memory_map_xml, region_info

PID = 0x2A


def fields(reply: bytes) -> dict[str, str]:
    """``key:value;`` pairs of a qMemoryRegionInfo reply."""
    assert reply.endswith(b";"), reply
    return dict(item.split(":", 1) for item in reply.decode().rstrip(";").split(";"))


def test_a_region_is_described_with_its_tags(mem: gm.GuestMemory) -> None:
    info = fields(region_info(mem, BASE + 0x123))
    assert (info["start"], info["size"], info["permissions"]) == (f"{BASE:x}", "10000", "rw")
    assert ("flags" in info) is (mem.tag_mode is not gm.TagMode.NONE)
    if "flags" in info:
        assert info["flags"] == "mt"


def test_gaps_are_described_up_to_the_end_of_the_address_space(mem: gm.GuestMemory) -> None:
    below = fields(region_info(mem, 0))
    assert below == {"start": "0", "size": f"{BASE:x}"}
    hole = fields(region_info(mem, HOLE + 5))
    assert hole == {"start": f"{HOLE:x}", "size": f"{REGION:x}"}
    end = LAYOUT[-1][0] + LAYOUT[-1][1]
    for address in (end, 1 << 63, (1 << 64) - 1):
        last = fields(region_info(mem, address))
        assert last == {"start": f"{end:x}", "size": f"{(1 << 64) - 1 - end:x}"}
        # start + size fits in 64 bits: LLDB 14's walk wrapped to 0 and looped forever
        assert int(last["start"], 16) + int(last["size"], 16) == (1 << 64) - 1


def test_walking_the_regions_covers_the_address_space_once(mem: gm.GuestMemory) -> None:
    address, steps = 0, []
    while address < (1 << 64) - 1:
        info = fields(region_info(mem, address))
        assert int(info["start"], 16) == address
        steps.append(info.get("permissions", "-"))
        address += int(info["size"], 16)
    assert address == (1 << 64) - 1
    assert steps == ["-", "rw", "rw", "-", "rw", "-"]


def test_qmemoryregioninfo_keeps_the_top_byte(mem: gm.GuestMemory) -> None:
    reply = Session(mem, dict, PID).handle(b"qMemoryRegionInfo:%x" % (0x03 << 56 | BASE))
    assert reply is not None
    assert fields(reply)["start"] != f"{BASE:x}"  # 0x03000000_40000000 lies in the last gap


def test_the_memory_map_lists_every_region_as_ram(mem: gm.GuestMemory) -> None:
    session = Session(mem, dict, PID)
    xml = b""
    while True:
        chunk = session.handle(b"qXfer:memory-map:read::%x,40" % len(xml))
        assert chunk is not None and chunk[:1] in (b"m", b"l"), chunk
        xml += unescape(chunk[1:])
        if chunk[:1] == b"l":
            break
    assert xml == memory_map_xml(mem)
    found = re.findall(rb'<memory type="ram" start="(\w+)" length="(\w+)"/>', xml)
    assert [(int(s, 16), int(n, 16)) for s, n in found] == LAYOUT
    assert b"memory-map" in (session.handle(b"qSupported") or b"")


@pytest.mark.parametrize("path", ["/proc/42/maps", "/proc/self/maps"])
def test_proc_maps_over_vfile(mem: gm.GuestMemory, path: str) -> None:
    session = Session(mem, dict, 42)
    fd = session.handle(b"vFile:open:%s,0,0" % path.encode().hex().encode())
    assert fd is not None and fd.startswith(b"F") and b"-" not in fd, fd
    data = session.handle(b"vFile:pread:%s,1000,0" % fd[1:])
    assert data is not None
    text = unescape(data.split(b";", 1)[1])
    assert text == maps_text(mem)
    lines = text.decode().splitlines()
    assert [line.split()[0] for line in lines] == [f"{g:08x}-{g + n:08x}" for g, n in LAYOUT]
    assert all(line.split()[1] == "rw-p" for line in lines)
