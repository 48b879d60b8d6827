"""Real LLDB (Debian's lldb, LLDB 14) against the stub, asserting on LLDB's
own output: memory read/write and memory tag read/write. LLDB needs no
settings: the target description says aarch64, and qMemoryRegionInfo's
``flags:mt`` turns its tag commands on. In batch mode LLDB stops at the first
command that fails, so a refused command comes last."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import LANE
from test_gdb_client import BASE, GDB, SIZE, Guest, first_gdb_session, guest

LLDB = shutil.which("lldb")
LLDB_LANES = ("host", "arm64-user-gdb", "arm64-trixie-gdb")  # wherever host GDB runs
if LLDB is None and os.environ.get("CI") == "true" and LANE in LLDB_LANES:
    raise RuntimeError("CI: lldb is missing; scripts/host-deps.sh installs it")
pytestmark = [
    pytest.mark.skipif(
        LANE not in LLDB_LANES,
        reason=f"no LLDB in the {LANE} lane: the host lane runs these",
    ),
    pytest.mark.skipif(LLDB is None, reason="lldb is not installed (scripts/host-deps.sh)"),
]
__all__ = ["guest"]  # the fixture, shared with the GDB tests


def lldb(address: str, *commands: str) -> str:
    """LLDB's output for ``commands`` run in batch mode against the stub at ``address``."""
    args = [LLDB or "lldb", "--no-lldbinit", "--batch", "-o", f"gdb-remote {address}"]
    for command in commands:
        args += ["-o", command]
    # stdin closed: after a failed connect LLDB's batch mode falls back to its prompt
    result = subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )
    return result.stdout + result.stderr


def test_lldb_reads_memory(guest: Guest) -> None:
    out = lldb(guest.address, f"memory read -c 16 {BASE:#x}")
    row = " ".join(f"{n:02x}" for n in range(16))
    assert f"{BASE:#x}: {row}" in out, out


def test_lldb_writes_memory_and_tags_stay(guest: Guest) -> None:
    tags = guest.ask("tags", BASE, SIZE)
    out = lldb(guest.address, f"memory write {BASE + 4:#x} 0xaa 0xbb")
    assert "error" not in out.split("memory write", 1)[1], out
    assert guest.ask("read", BASE, 8) == bytes([0, 1, 2, 3, 0xAA, 0xBB, 6, 7])
    assert guest.ask("tags", BASE, SIZE) == tags


def test_lldb_reads_allocation_tags(guest: Guest) -> None:
    out = lldb(guest.address, f"memory tag read {BASE:#x} {BASE + 0x40:#x}")
    if not guest.tagged:
        assert "is not in a memory tagged region" in out, out
        return
    for granule in range(4):
        start, end = BASE + 16 * granule, BASE + 16 * granule + 16
        assert f"[{start:#x}, {end:#x}): {granule:#x}" in out, out


def test_lldb_reads_tags_through_a_tagged_pointer(guest: Guest) -> None:
    if not guest.tagged:
        pytest.skip("TagMode.NONE has no tags: the read test shows LLDB's refusal")
    out = lldb(guest.address, f"memory tag read {0x03 << 56 | BASE + 0x30:#x}")
    assert "Logical tag: 0x3" in out, out
    assert f"[{BASE + 0x30:#x}, {BASE + 0x40:#x}): 0x3\n" in out, out  # a match


def test_lldb_writes_allocation_tags(guest: Guest) -> None:
    if not guest.tagged:
        pytest.skip("TagMode.NONE has no tags to write")
    data, _ = guest.image()
    out = lldb(
        guest.address,
        f"memory tag write {BASE + 0x1000:#x} 9 10",
        f"memory tag write {BASE + 0x2000:#x} 3 -e {BASE + 0x2040:#x}",
        f"memory read --show-tags -c 32 {BASE + 0x1000:#x}",
    )
    assert guest.ask("tags", BASE + 0x1000, 0x30) == bytes([9, 10, 0])
    assert guest.ask("tags", BASE + 0x2000, 0x50) == bytes([3, 3, 3, 3, 0])
    assert f"{BASE + 0x1010:#x}: " in out and "(tag: 0xa)" in out, out
    assert guest.ask("read", BASE, SIZE) == data  # tags written, data untouched


def test_lldb_refuses_a_tag_above_15_itself(guest: Guest) -> None:
    if not guest.tagged:
        pytest.skip("TagMode.NONE has no tags to write")
    before = guest.image()
    out = lldb(guest.address, f"memory tag write {BASE + 0x1000:#x} 16")
    assert "Found tag 0x10 which is > max MTE tag value of 0xf." in out, out
    assert guest.image() == before


def test_lldb_memory_region_describes_guest_memory_and_gaps(guest: Guest) -> None:
    out = lldb(
        guest.address,
        f"memory region {BASE:#x}",
        f"memory region {BASE + SIZE:#x}",
        "memory region 0",
    )
    assert f"[{BASE:#018x}-{BASE + SIZE:#018x}) rw-" in out, out
    assert ("memory tagging: enabled" in out) is guest.tagged, out
    assert f"[{BASE + SIZE:#018x}-0xffffffffffffffff) ---" in out, out
    assert f"[0x0000000000000000-{BASE:#018x}) ---" in out, out


def test_an_lldb_session_leaves_guest_memory_byte_identical(guest: Guest) -> None:
    before = guest.image()
    out = lldb(guest.address, f"memory read -c 64 {BASE:#x}", "process kill")
    assert f"{BASE:#x}: 00 01 02 03" in out, out
    assert guest.image() == before
    again = lldb(guest.address, f"memory read -c 4 {BASE:#x}")  # the guest lives on
    assert f"{BASE:#x}: 00 01 02 03" in again, again


@pytest.mark.skipif(GDB is None, reason="gdb-multiarch holds the first session")
def test_lldb_is_refused_while_gdb_holds_the_session(guest: Guest) -> None:
    first = first_gdb_session(guest)
    out = lldb(guest.address, f"memory read -c 4 {BASE:#x}")
    # LLDB 14 prints no error text: the stub closes without replying to its first packet.
    assert (
        "Connection shut down by remote side while waiting for reply to initial handshake packet"
        in out
    ), out
    assert f"{BASE:#x}: 00 01 02 03" not in out, out
    rest = first.communicate(timeout=120)[0]
    assert f"{BASE + 2:#x}:\t0x02" in rest, rest
