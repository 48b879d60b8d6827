"""GDB run control (guestmem.gdbstub.GuestDebugServer) against a simulated machine: packets,
breakpoints that never outlive a session, memory and tags by virtual address,
and Debian's gdb-multiarch driving it all for real."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import guestmem as gm
from conftest import LANE
from guestmem.errors import UnsupportedError, UsageError
from guestmem.gdbstub import (
    GuestDebugServer,
    RemoteAddressError,
    StopEvent,
    UnmappedAddressError,
    WatchKind,
    Watchpoint,
)
from guestmem.gdbstub.packets import Ack, Packet, PacketReader, escape, frame
from guestmem.gdbstub.run_control import BRK, PC
from guestmem.gdbstub.target import TARGET_XML
from guestmem.gdbstub.wire import BUSY_REPLY

BASE = 0x4000_0000  # guest RAM (IPA)
SIZE = 0x10000
VA = 0x1000_0000  # the stage 1 maps VA + n to BASE + n ...
PAGE = 0x1000
HOLE = VA + 3 * PAGE  # ... except this page
DATA = VA + PAGE  # bytes(range(256)) with tags 0..15
CPUS = 2
START = (VA, VA + 0x4000)  # each vCPU's first pc: code pages full of NOPs (zeros)
TICK = 0.001


class FakeCpus:
    """A tiny machine: every tick each running vCPU executes one NOP (pc += 4, x0 += 1).

    A vCPU stops before an instruction at a hardware breakpoint, at a BRK #0
    read from guest memory, at an exit address, or at an instruction listed
    in ``accesses`` whose data access a watchpoint covers.
    """

    def __init__(self, mem: gm.GuestMemory, slots: tuple[int, int] = (2, 2)) -> None:
        self.mem = mem
        self.slots = slots
        self.regs = [[0] * 34 for _ in range(CPUS)]
        for cpu, pc in enumerate(START):
            self.regs[cpu][PC] = pc
            self.regs[cpu][33] = 0x3C5
        self.hw_breakpoints: tuple[int, ...] = ()
        self.watchpoints: tuple[Watchpoint, ...] = ()
        self.accesses: dict[int, tuple[int, WatchKind]] = {}
        self.exit_at: int | None = None
        self.refused: int | None = None  # a register set_register refuses
        self.running = False
        self.resumes: list[frozenset[int]] = []
        self.detached = 0  # detach() calls
        self._active: tuple[int, ...] = ()
        self._stepping = False
        self._event: StopEvent | None = None
        self._cond = threading.Condition()
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._clock, daemon=True)
        self._thread.start()

    # ---- RunControl ----
    @property
    def cpu_count(self) -> int:
        return CPUS

    def stop(self) -> None:
        with self._cond:
            if self.running:
                self._finish(StopEvent(self._active[0], "interrupt"))

    def resume(self, step: frozenset[int]) -> None:
        with self._cond:
            assert not self.running, "resume() while running"
            self.resumes.append(step)
            self._event = None
            self._active = tuple(sorted(step)) if step else tuple(range(CPUS))
            self._stepping = bool(step)
            self.running = True

    def wait(self, timeout: float | None) -> StopEvent | None:
        with self._cond:
            self._cond.wait_for(lambda: self._event is not None or not self.running, timeout)
            event, self._event = self._event, None
            return event

    def registers(self, cpu: int) -> list[int]:
        with self._cond:
            return list(self.regs[cpu])

    def set_register(self, cpu: int, index: int, value: int) -> None:
        bits = 32 if index == 33 else 64
        if not 0 <= index < 34 or not 0 <= value < 1 << bits or index == self.refused:
            raise UsageError(f"register {index} = {value:#x}")
        with self._cond:
            self.regs[cpu][index] = value

    def set_hw_debug(self, breakpoints: Sequence[int], watchpoints: Sequence[Watchpoint]) -> None:
        if len(breakpoints) > self.slots[0] or len(watchpoints) > self.slots[1]:
            raise UsageError("more than the hardware has")
        if any(not 1 <= w.length <= 8 for w in watchpoints):
            raise UsageError("a watchpoint longer than 8 bytes")
        with self._cond:
            self.hw_breakpoints, self.watchpoints = tuple(breakpoints), tuple(watchpoints)

    def detach(self) -> None:
        self.detached += 1

    def hw_slots(self) -> tuple[int, int]:
        return self.slots

    def translate(self, cpu: int, va: int, length: int) -> list[tuple[int, int]]:
        pieces = []
        at, end = va, va + length
        while at < end:
            if not VA <= at < VA + SIZE:  # as vmm.stage1 does: not an AddressError
                raise UnsupportedError(f"VA {at:#x} is beyond the page tables")
            if HOLE <= at < HOLE + PAGE:
                raise UnmappedAddressError(f"VA {at:#x} is not mapped", va=va, length=length)
            n = min(end, (at // PAGE + 1) * PAGE) - at
            pieces.append((BASE + at - VA, n))
            at += n
        return pieces

    # ---- the machine ----
    def power_off(self) -> None:
        with self._cond:
            self._finish(StopEvent(0, "exited"))

    def close(self) -> None:
        self._quit.set()
        self._thread.join(timeout=10)

    def _finish(self, event: StopEvent) -> None:
        self.running = False
        self._event = event
        self._cond.notify_all()

    def _clock(self) -> None:
        while not self._quit.wait(TICK):
            with self._cond:
                if self.running:
                    self._tick()

    def _tick(self) -> None:
        for cpu in self._active:
            event = self._execute(cpu)
            if event is not None:
                self._finish(event)
                return
        if self._stepping:
            self._finish(StopEvent(self._active[0], "step"))

    def _execute(self, cpu: int) -> StopEvent | None:
        pc = self.regs[cpu][PC]
        if pc in self.hw_breakpoints:
            return StopEvent(cpu, "hw-breakpoint", pc)
        if self._fetch(pc) == BRK:
            return StopEvent(cpu, "breakpoint", pc)
        if pc == self.exit_at:
            return StopEvent(cpu, "exited")
        if pc in self.accesses:
            address, kind = self.accesses[pc]
            for w in self.watchpoints:
                if w.address <= address < w.address + w.length and w.kind in (kind, "access"):
                    return StopEvent(cpu, "watchpoint", address, w.kind)
        self.regs[cpu][PC] = pc + 4
        self.regs[cpu][0] += 1
        return None

    def _fetch(self, pc: int) -> bytes:
        try:
            (ipa, _), *_ = self.translate(0, pc, 4)
        except gm.GuestMemoryError:
            return b""
        return self.mem.read(ipa, 4, access=gm.Access.DEBUG)


class Client:
    """A minimal RSP client: packets out, acks checked, replies (also late ones) in."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = PacketReader(limit=1 << 22)
        self.pending: list[object] = []

    def event(self) -> object:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.pending += self.reader.feed(data)
        return self.pending.pop(0)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(frame(payload))
        assert self.event() == Ack()

    def reply(self) -> bytes:
        packet = self.event()
        assert isinstance(packet, Packet), packet
        # The server may close right after its last reply (D, k): the ack has nowhere to go.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(b"+")
        return packet.payload

    def ask(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.reply()

    def closed(self) -> bool:
        self.sock.settimeout(10)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def mem() -> Iterator[gm.GuestMemory]:
    with gm.GuestMemory.anonymous(SIZE, gpa=BASE, tags=gm.TagMode.SOFTWARE) as memory:
        ipa = BASE + DATA - VA
        memory.write(ipa, bytes(range(256)))
        memory.set_tags(ipa, 256, np.arange(16, dtype=np.uint8))
        memory.write(BASE + 2 * PAGE, b"\x5a" * PAGE)  # the page before the hole
        memory.write(BASE + 4 * PAGE, b"\xa5" * PAGE)  # the page after it
        yield memory


@pytest.fixture
def cpus(mem: gm.GuestMemory) -> Iterator[FakeCpus]:
    machine = FakeCpus(mem)
    yield machine
    machine.close()


@pytest.fixture
def server(mem: gm.GuestMemory, cpus: FakeCpus) -> Iterator[GuestDebugServer]:
    stub = GuestDebugServer(mem, cpus, pid=0x2A)
    thread = threading.Thread(target=stub.serve, daemon=True)
    thread.start()
    yield stub
    stub.close()
    thread.join(timeout=30)
    assert not thread.is_alive()


@pytest.fixture
def client(server: GuestDebugServer) -> Iterator[Client]:
    c = Client(server.address)
    assert b"swbreak+" in c.ask(b"qSupported:swbreak+;hwbreak+;xmlRegisters=i386")
    yield c
    c.close()


def image(mem: gm.GuestMemory) -> tuple[bytes, bytes]:
    return mem.read(BASE, SIZE, access=gm.Access.DEBUG), mem.get_tags(BASE, SIZE).tobytes()


def wait_running(cpus: FakeCpus) -> None:
    deadline = time.monotonic() + 10
    while not cpus.running and time.monotonic() < deadline:
        time.sleep(0.001)
    assert cpus.running


def pc(client: Client, tid: int) -> int:
    assert client.ask(b"Hg%x" % tid) == b"OK"
    return int.from_bytes(bytes.fromhex(client.ask(b"p20").decode()), "little")


# ---- the session's shape --------------------------------------------------------


def test_qsupported_and_the_target_description(client: Client) -> None:
    features = client.ask(b"qSupported").split(b";")
    for feature in (b"qXfer:features:read+", b"memory-tagging+", b"vContSupported+"):
        assert feature in features
    assert any(f.startswith(b"PacketSize=") for f in features)
    xml = client.ask(b"qXfer:features:read:target.xml:0,ffff")
    assert xml == b"l" + escape(TARGET_XML)
    assert client.ask(b"vCont?") == b"vCont;c;C;s;S"


def test_threads_are_vcpus(client: Client, cpus: FakeCpus) -> None:
    assert client.ask(b"?") == b"T05thread:1;"
    assert client.ask(b"qfThreadInfo") == b"m1,2"
    assert client.ask(b"qsThreadInfo") == b"l"
    assert client.ask(b"qC") == b"QC1"
    assert client.ask(b"T2") == b"OK"
    assert client.ask(b"T3") == b"E16"
    assert client.ask(b"Hg3") == b"E16"
    assert client.ask(b"qThreadExtraInfo,2") == b"vCPU 1".hex().encode()
    assert pc(client, 2) == START[1]
    assert client.ask(b"qC") == b"QC2"
    assert not cpus.running  # the session stopped the guest


def test_multiprocess_thread_ids(server: GuestDebugServer) -> None:
    c = Client(server.address)
    c.ask(b"qSupported:multiprocess+")
    assert c.ask(b"qfThreadInfo") == b"mp2a.1,p2a.2"
    assert c.ask(b"Hgp2a.2") == b"OK"
    assert c.ask(b"qC") == b"QCp2a.2"
    assert c.ask(b"Hgp2b.1") == b"E16"  # another process
    assert c.ask(b"Hgp2a.0") == b"OK"  # any thread: the current one stays
    assert c.ask(b"qAttached:2a") == b"1"
    assert c.ask(b"vKill;2a") == b"OK"
    c.close()


def test_registers(client: Client, cpus: FakeCpus) -> None:
    cpus.regs[0][5] = 0x1122334455667788
    g = client.ask(b"g")
    assert len(g) == 2 * (33 * 8 + 4 + 8)  # x0..x30, sp, pc; cpsr; tag_ctl
    assert g[10 * 8 : 11 * 8 * 2 - 10 * 8] == b"8877665544332211"
    assert client.ask(b"p21") == b"c5030000"  # cpsr: 32 bits
    assert client.ask(b"p22") == b"00" * 8  # tag_ctl reads zero
    assert client.ask(b"p23") == b"E16"
    assert client.ask(b"P3=efbeadde00000000") == b"OK"
    assert cpus.regs[0][3] == 0xDEADBEEF
    assert client.ask(b"P22=0100000000000000") == b"E16"
    values = list(cpus.regs[0])
    values[7] = 0x77
    assert client.ask(b"G" + client.ask(b"g").replace(b"00" * 8, b"77" + b"00" * 7, 1)) == b"OK"
    assert cpus.regs[0][0] == 0x77  # x0 was zero: the first run of zeros
    assert client.ask(b"G00") == b"E01"
    before = list(cpus.regs[0])
    cpus.refused = 31  # sp: G sets x0 first, then meets the refusal and undoes x0
    assert client.ask(b"G" + b"99" * (33 * 8) + b"00" * 4) == b"E16"
    assert cpus.regs[0] == before


# ---- memory and tags by virtual address ---------------------------------------------


def test_memory_by_virtual_address(client: Client, mem: gm.GuestMemory) -> None:
    assert client.ask(b"m%x,10" % DATA) == bytes(range(16)).hex().encode()
    assert client.ask(b"m%x,4" % (0x0B << 56 | DATA + 4)) == b"04050607"  # a tagged pointer
    assert client.ask(b"m%x,8" % (DATA - 4)) == b"00000000" + b"00010203"  # two pieces
    assert client.ask(b"m%x,20" % (HOLE - 8)) == b"5a" * 8  # up to the hole only
    assert client.ask(b"m%x,4" % HOLE) == b"E0e"
    assert client.ask(b"m%x,4" % (VA + SIZE)) == b"E0e"
    assert client.ask(b"M%x,3:aabbcc" % (DATA + 0x21)) == b"OK"
    assert client.ask(b"X%x,2:" % (DATA + PAGE - 1) + escape(b"}#")) == b"OK"  # two pages
    assert mem.read(BASE + DATA - VA + 0x20, 4) == bytes([0x20, 0xAA, 0xBB, 0xCC])
    assert mem.read(BASE + DATA - VA + PAGE - 1, 2) == b"}#"


def test_a_write_over_the_hole_changes_nothing(client: Client, mem: gm.GuestMemory) -> None:
    before = image(mem)
    assert client.ask(b"M%x,8:%s" % (HOLE - 4, b"11" * 8)) == b"E0e"
    assert client.ask(b"X%x,0:" % HOLE) == b"OK"  # nothing to write: gdb's probe
    assert image(mem) == before


def test_tags_by_virtual_address(client: Client, mem: gm.GuestMemory) -> None:
    assert client.ask(b"qMemTags:%x,1:1" % (DATA + 0x35)) == b"m03"
    assert client.ask(b"qMemTags:%x,30:1" % (0x03 << 56 | DATA)) == b"m000102"
    assert client.ask(b"qMemTags:%x,20:1" % (DATA + PAGE - 0x10)) == b"m0000"  # two pieces
    assert client.ask(b"QMemTags:%x,40:1:0a0b" % (DATA + 0x100)) == b"OK"
    assert mem.get_tags(BASE + DATA - VA + 0x100, 0x50).tolist() == [10, 11, 10, 11, 0]
    assert client.ask(b"qMemTags:%x,10:1" % HOLE) == b"E0e"
    before = image(mem)
    assert client.ask(b"QMemTags:%x,20:1:05" % (HOLE - 0x10)) == b"E0e"
    assert client.ask(b"QMemTags:%x,20:1:10" % DATA) == b"E16"  # a tag above 15
    assert client.ask(b"QMemTags:%x,20:1:" % DATA) == b"E16"
    assert client.ask(b"qMemTags:%x,10:2" % DATA) == b"E16"
    assert image(mem) == before
    assert client.ask(b"qIsAddressTagged:%x" % DATA) == b"01"
    assert client.ask(b"qIsAddressTagged:%x" % HOLE) == b"00"


def test_gdb_13_finds_every_address_tagged_in_smaps(client: Client) -> None:
    path = b"/proc/42/smaps".hex().encode()  # GDB names the pid in decimal
    assert client.ask(b"vFile:setfs:0") == b"F0"
    assert client.ask(b"vFile:open:" + b"/etc/passwd".hex().encode() + b",0,0") == b"F-1,2"
    fd = client.ask(b"vFile:open:" + path + b",0,1c0")
    assert fd.startswith(b"F")
    text = client.ask(b"vFile:pread:%s,1000,0" % fd[1:])
    assert b"0000000000000000-ffffffffffffffff" in text and b" mt " in text
    assert client.ask(b"vFile:close:%s" % fd[1:]) == b"F0"
    assert client.ask(b"vFile:close:%s" % fd[1:]) == b"F-1,9"


# ---- run control ----------------------------------------------------------------------


def test_hardware_breakpoint_and_step(client: Client, cpus: FakeCpus) -> None:
    target = START[0] + 0x40
    assert client.ask(b"Z1,%x,4" % target) == b"OK"
    assert cpus.hw_breakpoints == (target,)
    assert client.ask(b"vCont;c") == b"T05thread:1;hwbreak:;"
    assert pc(client, 1) == target
    other = pc(client, 2)
    assert client.ask(b"vCont;s:1;c") == b"T05thread:1;"  # steps over the breakpoint
    assert pc(client, 1) == target + 4
    assert pc(client, 2) == other  # the others stay stopped
    assert cpus.hw_breakpoints == (target,)
    assert client.ask(b"z1,%x,4" % target) == b"OK"
    assert not cpus.hw_breakpoints


def test_legacy_step_and_continue(client: Client, cpus: FakeCpus) -> None:
    assert client.ask(b"Hc2") == b"OK"
    assert client.ask(b"s") == b"T05thread:2;"
    assert cpus.regs[1][PC] == START[1] + 4
    assert client.ask(b"s%x" % (START[1] + 0x100)) == b"T05thread:2;"  # s ADDR: step from ADDR
    assert cpus.regs[1][PC] == START[1] + 0x104
    assert client.ask(b"Z1,%x,4" % (START[0] + 8)) == b"OK"
    assert client.ask(b"c") == b"T05thread:1;hwbreak:;"


def test_software_breakpoint(client: Client, cpus: FakeCpus, mem: gm.GuestMemory) -> None:
    before = image(mem)
    target = START[0] + 0x80
    ipa = BASE + target - VA
    assert client.ask(b"Z0,%x,4" % target) == b"OK"
    assert mem.read(ipa, 4) == BRK
    assert client.ask(b"m%x,8" % (target - 2)) == b"00" * 8  # the client sees the original
    assert client.ask(b"vCont;c") == b"T05thread:1;swbreak:;"
    assert pc(client, 1) == target
    assert client.ask(b"vCont;s:1") == b"T05thread:1;"  # out, step, back in
    assert pc(client, 1) == target + 4
    assert mem.read(ipa, 4) == BRK
    assert client.ask(b"M%x,4:11223344" % target) == b"OK"  # writes go under the breakpoint
    assert mem.read(ipa, 4) == BRK
    assert client.ask(b"m%x,4" % target) == b"11223344"
    assert client.ask(b"M%x,4:00000000" % target) == b"OK"
    assert client.ask(b"z0,%x,4" % target) == b"OK"
    assert image(mem) == before


def test_continue_from_a_software_breakpoint(client: Client, cpus: FakeCpus) -> None:
    target = START[0] + 0x20
    assert client.ask(b"Z0,%x,4" % target) == b"OK"
    assert client.ask(b"Z1,%x,4" % (target + 0x20)) == b"OK"
    assert client.ask(b"c") == b"T05thread:1;swbreak:;"
    assert client.ask(b"c") == b"T05thread:1;hwbreak:;"  # not stuck on the BRK
    assert pc(client, 1) == target + 0x20


def test_bad_breakpoints(client: Client) -> None:
    assert client.ask(b"Z0,%x,2" % START[0]) == b"E16"  # only kind 4
    assert client.ask(b"Z0,%x,4" % (START[0] + 2)) == b"E16"  # misaligned
    assert client.ask(b"Z0,%x,4" % HOLE) == b"E0e"
    assert client.ask(b"Z1,%x,4" % VA) == b"OK"
    assert client.ask(b"Z1,%x,4" % (VA + 4)) == b"OK"
    assert client.ask(b"Z1,%x,4" % (VA + 8)) == b"E1c"  # two slots
    assert client.ask(b"Z2,%x,10" % DATA) == b"E16"  # the hardware watches 8 bytes at most
    assert client.ask(b"Z2,%x,0" % DATA) == b"E16"
    assert client.ask(b"Z5,%x,4" % VA) == b""
    assert client.ask(b"z1,%x,4" % (VA + 0x40)) == b"OK"  # not there: nothing to do
    assert client.ask(b"Z1,%x" % VA) == b"E01"


@pytest.mark.parametrize(
    ("ztype", "access", "reply"),
    [(2, "write", b"watch"), (3, "read", b"rwatch"), (4, "write", b"awatch")],
)
def test_watchpoints(
    client: Client, cpus: FakeCpus, ztype: int, access: WatchKind, reply: bytes
) -> None:
    cpus.accesses[START[0] + 0x10] = (DATA + 0x44, "read" if access == "write" else "write")
    cpus.accesses[START[0] + 0x30] = (DATA + 0x44, access)
    assert client.ask(b"Z%d,%x,8" % (ztype, DATA + 0x40)) == b"OK"
    assert client.ask(b"c") == b"T05thread:1;%s:%x;" % (reply, DATA + 0x44)
    expected = START[0] + (0x10 if ztype == 4 else 0x30)
    assert pc(client, 1) == expected
    assert client.ask(b"z%d,%x,8" % (ztype, DATA + 0x40)) == b"OK"
    assert cpus.watchpoints == ()


def test_ctrl_c_stops_a_running_guest(client: Client, cpus: FakeCpus) -> None:
    client.send(b"vCont;c")
    wait_running(cpus)
    assert client.ask(b"m%x,4" % DATA) == b"E10"  # all-stop: nothing but 0x03 while running
    client.sock.sendall(b"\x03")
    assert client.reply() == b"T02thread:1;"
    assert not cpus.running
    assert pc(client, 1) > START[0]


def test_the_guest_exits(server: GuestDebugServer, client: Client, cpus: FakeCpus) -> None:
    client.send(b"c")
    wait_running(cpus)  # the ack comes before the server resumes the guest
    cpus.power_off()
    assert client.reply() == b"W00"
    assert client.closed()
    assert server.exited


def test_the_guest_exits_while_stepping_over_a_breakpoint(
    server: GuestDebugServer, client: Client, cpus: FakeCpus
) -> None:
    cpus.exit_at = START[0] + 4
    assert client.ask(b"Z0,%x,4" % START[0]) == b"OK"
    assert client.ask(b"c") == b"W00"
    assert client.closed()


# ---- every ending leaves guest memory as it was ------------------------------------------


def insert_everything(client: Client) -> None:
    """Breakpoints of each kind, far enough ahead that the guest keeps running a while."""
    for address in (START[0] + 0xC00, START[1] + 0xC00, DATA + 0xF0):
        assert client.ask(b"Z0,%x,4" % address) == b"OK"
    assert client.ask(b"Z1,%x,4" % (START[1] + 0x800)) == b"OK"
    assert client.ask(b"Z2,%x,4" % DATA) == b"OK"


Ending = Callable[[Client, GuestDebugServer], None]


def end_with_packet(payload: bytes) -> Ending:
    def end(client: Client, server: GuestDebugServer) -> None:
        if payload == b"k":
            client.send(payload)
        else:
            assert client.ask(payload) == b"OK"
        assert client.closed()

    return end


def end_by_disconnect(client: Client, server: GuestDebugServer) -> None:
    client.close()


def end_by_close(client: Client, server: GuestDebugServer) -> None:
    server.close()
    assert client.closed()


def end_while_running(client: Client, server: GuestDebugServer) -> None:
    client.send(b"vCont;c")
    assert isinstance(server.run, FakeCpus)
    wait_running(server.run)
    client.close()


def close_while_running(client: Client, server: GuestDebugServer) -> None:
    client.send(b"vCont;c")
    assert isinstance(server.run, FakeCpus)
    wait_running(server.run)
    server.close()
    assert client.closed()


def detach_while_running(client: Client, server: GuestDebugServer) -> None:
    client.send(b"vCont;c")
    assert isinstance(server.run, FakeCpus)
    wait_running(server.run)
    assert client.ask(b"D") == b"OK"
    assert client.closed()


@pytest.mark.parametrize(
    "ending",
    [
        end_with_packet(b"D"),
        end_with_packet(b"k"),
        end_with_packet(b"vKill;2a"),
        end_by_disconnect,
        end_by_close,
        end_while_running,
        close_while_running,
        detach_while_running,
    ],
    ids=[
        "detach",
        "kill",
        "vKill",
        "disconnect",
        "close",
        "disconnect-running",
        "close-running",
        "detach-running",
    ],
)
def test_every_ending_takes_the_breakpoints_out(
    mem: gm.GuestMemory, cpus: FakeCpus, server: GuestDebugServer, ending: Ending
) -> None:
    before = image(mem)
    client = Client(server.address)
    client.ask(b"qSupported")
    insert_everything(client)
    assert image(mem) != before
    ending(client, server)
    deadline = time.monotonic() + 10
    while (image(mem) != before or not cpus.running) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert image(mem) == before
    assert cpus.hw_breakpoints == () and cpus.watchpoints == ()
    assert cpus.running  # the guest runs on
    assert cpus.detached == 1  # the VMM was told before the last resume
    client.close()


def test_signals_are_ignored(client: Client, cpus: FakeCpus) -> None:
    assert client.ask(b"S0b") == b"T05thread:1;"  # the guest has no signals: a plain step
    assert cpus.regs[0][PC] == START[0] + 4
    assert client.ask(b"Z1,%x,4" % (START[0] + 0x10)) == b"OK"
    assert client.ask(b"vCont;C0b:1") == b"T05thread:1;hwbreak:;"


def test_idle_sessions_end(mem: gm.GuestMemory, cpus: FakeCpus) -> None:
    with GuestDebugServer(mem, cpus, idle_timeout=0.5) as stub:
        thread = threading.Thread(target=stub.serve, kwargs={"sessions": 1}, daemon=True)
        thread.start()
        c = Client(stub.address)
        assert c.ask(b"Z0,%x,4" % VA) == b"OK"
        assert c.closed()
        thread.join(timeout=30)
        assert mem.read(BASE, 4) == bytes(4)
        c.close()


def test_a_failing_run_control_still_leaves_memory_as_it_was(
    mem: gm.GuestMemory, cpus: FakeCpus, server: GuestDebugServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = image(mem)
    client = Client(server.address)
    insert_everything(client)
    client.send(b"c")

    def broken(timeout: float | None) -> StopEvent | None:
        raise RuntimeError("the vCPU thread died")

    monkeypatch.setattr(cpus, "wait", broken)
    assert client.closed()
    assert settled(mem, before)
    client.close()
    monkeypatch.undo()
    cpus.stop()
    cpus.wait(0)
    again = Client(server.address)  # the server serves on
    assert again.ask(b"qC") == b"QC1"
    again.close()


def test_sessions_follow_one_another(server: GuestDebugServer, cpus: FakeCpus) -> None:
    for _ in range(2):
        c = Client(server.address)
        assert c.ask(b"qSupported").startswith(b"PacketSize=")
        assert c.ask(b"?") == b"T05thread:1;"
        assert c.ask(b"D") == b"OK"
        assert c.closed()
        c.close()


def test_a_second_client_is_refused(server: GuestDebugServer, client: Client) -> None:
    other = Client(server.address)
    assert other.ask(b"qSupported") == BUSY_REPLY
    assert other.closed()
    assert client.ask(b"qC") == b"QC1"


def test_remote_addresses_need_allow_remote(mem: gm.GuestMemory, cpus: FakeCpus) -> None:
    with pytest.raises(RemoteAddressError):
        GuestDebugServer(mem, cpus, host="0.0.0.0")


# ---- bad input --------------------------------------------------------------------------

BAD = [
    (b"mzz,4", b"E01"),
    (b"m%x" % DATA, b"E01"),
    (b"m%x,4,4" % DATA, b"E01"),
    (b"m12345678901234567,4", b"E01"),
    (b"M%x,4:1122" % DATA, b"E01"),
    (b"M%x,2:zz11" % DATA, b"E01"),
    (b"X%x,1:}" % DATA, b"E01"),
    (b"Hx1", b"E01"),
    (b"Hgzz", b"E01"),
    (b"Tp2a", b"E16"),
    (b"pzz", b"E01"),
    (b"P0", b"E01"),
    (b"P0=11", b"E01"),
    (b"P21=ffffffff00", b"E01"),
    (b"gg", b"E01"),
    (b"vCont;x", b"E01"),
    (b"vCont;s:9", b"E16"),
    (b"vCont;C:1", b"E01"),
    (b"Czz", b"E01"),
    (b"S;%x" % VA, b"E01"),
    (b"czz", b"E01"),
    (b"Z0,zz,4", b"E01"),
    (b"qMemTags:%x,10" % DATA, b"E01"),
    (b"qMemTags:%x,%x:1" % (DATA, 1 << 32), b"E16"),
    (b"QMemTags:%x,10:1:zz" % DATA, b"E01"),
    (b"qXfer:features:read:other.xml:0,10", b"E16"),
    (b"qXfer:features:read:target.xml:0", b"E01"),
    (b"vFile:pread:64,10", b"E01"),
    (b"vFile:pread:1,10,0", b"F-1,9"),
    (b"vFile:open:zz,0,0", b"E01"),
    (b"qIsAddressTagged:", b"E01"),
    (b"m%x,1" % ((1 << 64) - 1), b"E0e"),
    (b"qThreadExtraInfo,-1", b"E16"),
    (b"vMustReplyEmpty", b""),
    (b"qTStatus", b""),
    (b"QStartNoAckMode:x", b""),
]


@pytest.mark.parametrize(("payload", "expected"), BAD, ids=[p[:24].decode() for p, _ in BAD])
def test_malformed_packets_get_their_error(
    client: Client, mem: gm.GuestMemory, payload: bytes, expected: bytes
) -> None:
    before = image(mem)
    assert client.ask(payload) == expected
    assert image(mem) == before
    assert client.ask(b"qC") == b"QC1"  # the session goes on


def test_damaged_packets_are_nakked(client: Client) -> None:
    client.sock.sendall(b"$qC#00")
    assert client.event() != Ack()
    assert client.ask(b"qC") == b"QC1"


def test_no_ack_mode(client: Client) -> None:
    assert client.ask(b"QStartNoAckMode") == b"OK"
    client.sock.sendall(frame(b"qC"))
    assert client.event() == Packet(b"QC1")


@pytest.fixture(scope="module")
def fuzz_target() -> Iterator[tuple[Client, gm.GuestMemory]]:
    with gm.GuestMemory.anonymous(SIZE, gpa=BASE, tags=gm.TagMode.SOFTWARE) as memory:
        machine = FakeCpus(memory)
        stub = GuestDebugServer(memory, machine)
        thread = threading.Thread(target=stub.serve, daemon=True)
        thread.start()
        c = Client(stub.address)
        yield c, memory
        c.close()
        stub.close()
        thread.join(timeout=30)
        machine.close()


@given(
    prefix=st.sampled_from([b"m", b"M", b"X", b"p", b"P", b"H", b"T", b"z", b"qMemTags:", b"v"]),
    body=st.binary(max_size=40).filter(lambda b: not set(b) & set(b"$#}*")),
)
def test_fuzzed_payloads_never_break_the_session(
    fuzz_target: tuple[Client, gm.GuestMemory], prefix: bytes, body: bytes
) -> None:
    client, _ = fuzz_target
    payload = prefix + body
    if payload[:1] in (b"c", b"s") or payload.startswith((b"vCont;", b"vKill", b"D")):
        return
    client.ask(payload)
    assert client.ask(b"qsThreadInfo") == b"l"


# ---- a real GDB --------------------------------------------------------------------------

GDB = shutil.which("gdb-multiarch")
GDB_LANES = ("host",)  # as in test_gdb_client.py: CI must have GDB there
if GDB is None and os.environ.get("CI") == "true" and LANE in GDB_LANES:
    raise RuntimeError("CI: gdb-multiarch is missing; scripts/host-deps.sh installs it")
needs_gdb = pytest.mark.skipif(
    LANE not in GDB_LANES or GDB is None,
    reason=f"no gdb-multiarch here (lane {LANE}; scripts/host-deps.sh installs it on the host)",
)


def gdb_args(address: str, *commands: str) -> list[str]:
    args = [GDB or "gdb-multiarch", "-nx", "-batch", "-ex", "set architecture aarch64"]
    for command in (f"target remote {address}", *commands):
        args += ["-ex", command]
    return args


def gdb(address: str, *commands: str) -> str:
    result = subprocess.run(
        gdb_args(address, *commands), capture_output=True, text=True, timeout=120
    )
    return result.stdout + result.stderr


def settled(mem: gm.GuestMemory, before: tuple[bytes, bytes]) -> bool:
    """Whether memory gets back to ``before`` (the session ends on the server's thread)."""
    deadline = time.monotonic() + 10
    while image(mem) != before and time.monotonic() < deadline:
        time.sleep(0.01)
    return image(mem) == before


@needs_gdb
def test_gdb_drives_the_guest(server: GuestDebugServer, mem: gm.GuestMemory) -> None:
    before = image(mem)
    hard, soft = START[0] + 0x40, START[0] + 0x80
    out = gdb(
        server.address,
        "info threads",
        f"x/4xw {DATA:#x}",
        f"hbreak *{hard:#x}",
        "continue",
        "stepi",
        "print/x $pc",
        f"break *{soft:#x}",
        "continue",
        "print/x $pc",
        f"memory-tag print-allocation-tag {DATA + 0x30:#x}",
        "detach",
    )
    assert "Thread 42.1 (vCPU 0)" in out and "Thread 42.2 (vCPU 1)" in out, out
    assert f"{DATA:#x}:\t0x03020100\t0x07060504\t0x0b0a0908\t0x0f0e0d0c" in out, out
    assert f"Thread 1 hit Breakpoint 1, {hard:#018x} in ?? ()" in out, out
    assert f"$1 = {hard + 4:#x}" in out, out
    assert f"hit Breakpoint 2, {soft:#018x} in ?? ()" in out, out
    assert f"$2 = {soft:#x}" in out, out
    assert "$3 = 0x3" in out, out
    assert "[Inferior 1 (process 42) detached]" in out, out
    assert settled(mem, before)


@needs_gdb
def test_gdb_read_watchpoint(server: GuestDebugServer, cpus: FakeCpus) -> None:
    cpus.accesses[START[0] + 0x60] = (DATA + 8, "read")
    out = gdb(server.address, f"rwatch *(int *){DATA + 8:#x}", "continue", "print/x $pc")
    assert f"Thread 1 hit Hardware read watchpoint 1: *(int *){DATA + 8:#x}" in out, out
    assert f"$1 = {START[0] + 0x64:#x}" in out, out  # GDB stepped past the access itself


@needs_gdb
def test_gdb_ctrl_c_stops_a_running_guest(
    server: GuestDebugServer, cpus: FakeCpus, mem: gm.GuestMemory
) -> None:
    before = image(mem)
    commands = (f"break *{START[1] + 0x8000:#x}", "continue", "print/x $pc", "detach")
    gdb_process = subprocess.Popen(
        gdb_args(server.address, *commands),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not cpus.running and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # GDB is waiting for the stop reply by now
    gdb_process.send_signal(signal.SIGINT)  # GDB sends 0x03
    out = gdb_process.communicate(timeout=60)[0]
    assert "Thread 1 received signal SIGINT, Interrupt." in out, out
    assert "[Inferior 1 (process 42) detached]" in out, out
    assert settled(mem, before)
    assert cpus.running
