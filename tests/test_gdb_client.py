"""Real GDB (Debian's gdb-multiarch, GDB 13) against the stub, asserting on
GDB's own output. The guest runs in its own process (tests/gdb_target.py):
in host Python on the host lane, and under qemu-aarch64 with HARDWARE tags
when scripts/test-arm64-user.sh (lane arm64-user-gdb) or
scripts/test-arm64-trixie.sh (lane arm64-trixie-gdb) runs this module from the
host with GUESTMEM_GDB_TARGET pointing into that arm64 userland."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import guestmem as gm
from conftest import LANE
from guestmem import migration

GDB = shutil.which("gdb-multiarch")
TARGET = os.environ.get("GUESTMEM_GDB_TARGET")
MODES = os.environ.get("GUESTMEM_GDB_MODES", "SOFTWARE,NONE").upper().split(",")
BASE = 0x4000_0000
SIZE = 0x10000  # the guest's one region (tests/gdb_target.py)

# Where this module runs: on the host, beside GDB.
GDB_LANES = ("host", "arm64-user-gdb", "arm64-trixie-gdb")
if GDB is None and os.environ.get("CI") == "true" and LANE in GDB_LANES:
    raise RuntimeError("CI: gdb-multiarch is missing; scripts/host-deps.sh installs it")
pytestmark = [
    pytest.mark.skipif(
        LANE not in GDB_LANES,
        reason=f"no GDB in the {LANE} lane: the arm64 lane scripts run these from the host "
        "against a stub under emulation (lanes arm64-user-gdb, arm64-trixie-gdb)",
    ),
    pytest.mark.skipif(GDB is None, reason="gdb-multiarch is not installed (scripts/host-deps.sh)"),
]


class Guest:
    """The guest process: its stub's address and a way to ask it for tags and bytes."""

    def __init__(self, mode: str) -> None:
        self.tagged = mode != "NONE"
        command = shlex.split(TARGET) if TARGET else [sys.executable]
        script = [] if TARGET else [str(Path(__file__).with_name("gdb_target.py"))]
        self.process = subprocess.Popen(
            [*command, *script, mode.lower()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        words = self.process.stdout.readline().split()
        assert words[:1] == ["listening"], f"the guest did not start: {words}"
        self.address = words[1]

    def ask(self, verb: str, gpa: int, length: int) -> bytes:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{verb} {gpa:#x} {length:#x}\n")
        self.process.stdin.flush()
        return bytes.fromhex(self.process.stdout.readline().strip())

    def image(self) -> tuple[bytes, bytes]:
        """Every byte and every tag of guest memory."""
        return self.ask("read", BASE, SIZE), self.ask("tags", BASE, SIZE)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(params=MODES)
def guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    g = Guest(request.param)
    yield g
    g.close()


def gdb_args(address: str, *commands: str) -> list[str]:
    """GDB in batch mode, connected to the stub at ``address``, running ``commands``."""
    args = [GDB or "gdb-multiarch", "-nx", "-batch", "-ex", "set architecture aarch64"]
    args += ["-ex", f"target remote {address}"]
    for command in commands:
        args += ["-ex", command]
    return args


def gdb(address: str, *commands: str) -> str:
    """GDB's output for ``commands`` run in batch mode against the stub at ``address``."""
    result = subprocess.run(
        gdb_args(address, *commands), capture_output=True, text=True, timeout=300
    )
    return result.stdout + result.stderr


def test_gdb_reads_memory(guest: Guest) -> None:
    out = gdb(guest.address, f"x/16xb {BASE:#x}")
    assert f"{BASE:#x}:\t0x00\t0x01\t0x02\t0x03\t0x04\t0x05\t0x06\t0x07" in out, out
    assert f"{BASE + 8:#x}:\t0x08\t0x09\t0x0a\t0x0b\t0x0c\t0x0d\t0x0e\t0x0f" in out, out


def test_gdb_writes_memory_and_tags_stay(guest: Guest) -> None:
    tags_before = guest.ask("tags", BASE, 256)
    write = f"set {{unsigned char}} {BASE + 0x23:#x} = 0xa5"
    out = gdb(guest.address, write, f"x/1xb {BASE + 0x23:#x}")
    assert f"{BASE + 0x23:#x}:\t0xa5" in out, out
    assert guest.ask("read", BASE + 0x20, 4) == bytes([0x20, 0x21, 0x22, 0xA5])
    assert guest.ask("tags", BASE, 256) == tags_before


def test_gdb_prints_allocation_tags(guest: Guest) -> None:
    out = gdb(guest.address, f"memory-tag print-allocation-tag {BASE + 0x30:#x}")
    if not guest.tagged:
        assert "not in a region mapped with a memory tagging flag" in out, out
    else:
        assert "= 0x3" in out, out


def test_gdb_sets_allocation_tags(guest: Guest) -> None:
    if not guest.tagged:
        pytest.skip("TagMode.NONE has no tags to set: GDB refuses, as the print test shows")
    out = gdb(guest.address, f"memory-tag set-allocation-tag {BASE + 0x1000:#x} 64 0a0b")
    assert "Allocation tag(s) updated successfully." in out, out
    assert guest.ask("tags", BASE + 0x1000, 64) == bytes([0xA, 0xB, 0xA, 0xB])
    assert guest.ask("tags", BASE + 0x1040, 16) == b"\x00"


def test_gdb_checks_logical_tags(guest: Guest) -> None:
    if not guest.tagged:
        pytest.skip("TagMode.NONE has no tags to check against")
    out = gdb(
        guest.address,
        f"memory-tag check {0x03 << 56 | BASE + 0x30:#x}",
        f"memory-tag check {0x04 << 56 | BASE + 0x30:#x}",
    )
    assert "Memory tags for address 0x300000040000030 match (0x3)." in out, out
    assert (
        "Logical tag (0x4) does not match the allocation tag (0x3) "
        "for address 0x400000040000030." in out
    ), out


def test_gdb_sessions_follow_one_another(guest: Guest) -> None:
    for value in (0x11, 0x22):
        out = gdb(guest.address, f"set {{unsigned char}} {BASE + 0x40:#x} = {value:#x}")
        assert "Remote connection closed" not in out, out
        assert guest.ask("read", BASE + 0x40, 1) == bytes([value])


BREAKPOINTS = [
    f"break *{BASE + 0x100:#x}",
    "set breakpoint always-inserted on",
    f"break *{BASE + 0x204:#x}",
]


@pytest.mark.parametrize(
    ("ending", "expected"),
    [
        (["kill"], "killed]"),  # GDB's words after vKill: the stub merely detached
        (["quit"], "detached]"),  # qAttached:<pid> says 1: GDB detaches, never kills
        (["continue"], "Command aborted."),  # the continue GDB aborts for want of breakpoints
    ],
    ids=["kill", "quit", "aborted-continue"],
)
def test_gdb_breakpoints_never_change_guest_memory(
    guest: Guest, ending: list[str], expected: str
) -> None:
    before = guest.image()
    out = gdb(guest.address, *BREAKPOINTS, *ending)
    assert guest.image() == before, out  # byte-identical, tags included
    assert "Cannot insert breakpoint 1." in out, out  # Z0 refused: no BRK #0 written
    assert expected in out, out


def test_gdb_info_proc_mappings_lists_guest_memory(guest: Guest) -> None:
    out = gdb(guest.address, "info proc mappings", "info mem")
    assert f"{BASE:#x}         {BASE + SIZE:#x}    {SIZE:#x}        0x0  rw-p" in out, out
    assert f"0   y  \t{BASE:#018x} {BASE + SIZE:#018x} rw nocache" in out, out


def first_gdb_session(guest: Guest) -> subprocess.Popen[str]:
    """A GDB that holds the stub's session for about 4 s; it reads BASE + 2 at its end."""
    first = subprocess.Popen(
        gdb_args(guest.address, f"x/1xb {BASE + 1:#x}", "shell sleep 4", f"x/1xb {BASE + 2:#x}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert first.stdout is not None
    while f"{BASE + 1:#x}:" not in first.stdout.readline():  # the first session is up
        assert first.poll() is None, "the first GDB ended early"
    return first


def test_a_second_gdb_is_refused_while_the_first_goes_on(guest: Guest) -> None:
    first = first_gdb_session(guest)
    second = gdb(guest.address, f"x/1xb {BASE + 3:#x}")
    assert "Remote failure reply: E.busy: another debugger session is active" in second, second
    assert f"{BASE + 3:#x}:\t0x03" not in second, second
    rest = first.communicate(timeout=120)[0]
    assert f"{BASE + 2:#x}:\t0x02" in rest, rest
    third = gdb(guest.address, f"x/1xb {BASE + 3:#x}")  # served once the first has gone
    assert f"{BASE + 3:#x}:\t0x03" in third, third


@pytest.mark.skipif(TARGET is not None, reason="the CLI runs in host Python: the host lane runs it")
def test_gdbserve_serves_a_restored_migration_stream(tmp_path: Path) -> None:
    stream = tmp_path / "guest.gms"
    with gm.GuestMemory.anonymous(0x10000, gpa=BASE, tags="software") as mem:
        mem.write(BASE + 0x100, b"restored by gdbserve")
        mem.set_tags(BASE + 0x100, 32, [6, 9])
        with stream.open("wb") as f:
            migration.save(mem, f)
    serve = ["gdbserve", "--restore", str(stream), "--tags", "software", "--port", "0", "--once"]
    server = subprocess.Popen(
        [sys.executable, "-m", "guestmem", *serve],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    banner = server.stdout.readline()
    assert banner.startswith("guestmem gdbserve: listening on 127.0.0.1:"), banner
    address = banner.split()[4]
    tag = f"memory-tag print-allocation-tag {BASE + 0x110:#x}"
    out = gdb(address, f"x/s {BASE + 0x100:#x}", tag)
    assert server.wait(timeout=60) == 0
    assert f'{BASE + 0x100:#x}:\t"restored by gdbserve"' in out, out
    assert "= 0x9" in out, out
