"""GDB run control for the reference VMM: a remote stub that stops, steps and resumes vCPUs.

:class:`GuestDebugServer` speaks the GDB Remote Serial Protocol to one client
at a time (loopback TCP by default, newcomers refused as in
:mod:`guestmem.gdbstub`) and drives the guest through a :class:`RunControl`,
the VMM's side of the bargain (KVM vCPUs in the reference VMM, a simulation
in the tests). Memory and allocation tags are read and written by guest
*virtual* address: each range is translated through the selected vCPU's
stage 1 (:meth:`RunControl.translate`) and then accessed through the DEBUG
access class, which never faults and never changes a tag. Software
breakpoints are BRK #0 words the stub writes into guest memory and always
takes out again when the session ends, however it ends. docs/vmm-debug.md
lists the packets and error replies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import numpy as np

from guestmem.errors import AddressError, GuestMemoryError, ProtocolError, TagsBusyError
from guestmem.gdbstub import target
from guestmem.gdbstub.packets import (
    PACKET_SIZE,
    BadPacket,
    Interrupt,
    Nak,
    Packet,
    PacketReader,
    escape,
    frame,
    unescape,
)
from guestmem.gdbstub.server import (
    DEFAULT_IDLE_TIMEOUT,
    SEND_TIMEOUT,
    GdbStub,
    _Refusal,
    _Refusals,
    accept,
    hang_up,
)
from guestmem.gdbstub.session import _xfer, parse_hex, split_fields
from guestmem.kinds import Access, TagMode
from guestmem.memory import GuestMemory
from guestmem.units import GRANULE

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "GuestDebugServer",
    "RunControl",
    "StopEvent",
    "StopReason",
    "UnmappedAddressError",
    "WatchKind",
    "Watchpoint",
    "canonical",
]

StopReason = Literal["interrupt", "step", "breakpoint", "hw-breakpoint", "watchpoint", "exited"]
WatchKind = Literal["write", "read", "access"]

REGISTER_COUNT = 34  # x0..x30, sp, pc, cpsr: what RunControl.registers returns
PC = 32  # pc's register number
BRK = (0xD4200000).to_bytes(4, "little")  # BRK #0, the software breakpoint
POLL_INTERVAL = 0.01  # seconds between looks at the client while the guest runs
STOP_WAIT = 10.0  # how long a stop() or a one-instruction step may take to be reported
MAX_READ = (PACKET_SIZE - 8) // 2
MAX_TAGS = 1 << 20
ALLOCATION_TAG = 1

E_MALFORMED, E_FAULT, E_INVALID = b"E01", b"E0e", b"E16"  # -, EFAULT, EINVAL
E_BUSY, E_NO_SLOT = b"E10", b"E1c"  # EBUSY (guest running), ENOSPC (hardware slots)
ENOENT, EBADF, EACCES, EMFILE = 2, 9, 13, 24
MAX_OPEN_FILES = 16
SUPPORTED = (
    f"PacketSize={PACKET_SIZE:x};QStartNoAckMode+;qXfer:features:read+;multiprocess+;"
    "memory-tagging+;vContSupported+;swbreak+;hwbreak+"
).encode()
VCONT_ACTIONS = b"vCont;c;C;s;S"
_WATCH_KINDS: dict[int, WatchKind] = {2: "write", 3: "read", 4: "access"}
_WATCH_REPLY = {"write": "watch", "read": "rwatch", "access": "awatch"}


class UnmappedAddressError(AddressError):
    """A guest virtual address the vCPU's stage 1 does not map (for RunControl.translate)."""

    def __init__(self, message: str, *, va: int, length: int) -> None:
        """``va``/``length``: the range that failed to translate."""
        super().__init__(message, gpa=va, length=length)
        self.va = va


class Unavailable(GuestMemoryError, ValueError):
    """A request the target cannot serve now: no slot free, unknown thread (E16/E1c)."""

    def __init__(self, message: str, reply: bytes = E_INVALID) -> None:
        """``reply`` is the error reply the client gets."""
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class Watchpoint:
    """A hardware watchpoint on ``[address, address + length)``: ``kind`` of access traps."""

    address: int
    length: int
    kind: WatchKind


@dataclass(frozen=True)
class StopEvent:
    """Why the guest stopped: ``cpu`` (0-based) is the vCPU it stopped for.

    ``address`` is the pc for breakpoints and the data address for
    watchpoints; ``kind`` is the watchpoint's kind. ``exited`` means the
    guest powered off: it never runs again.
    """

    cpu: int
    reason: StopReason
    address: int | None = None
    kind: WatchKind | None = None


class RunControl(Protocol):
    """The VMM's vCPUs, as the debug server drives them (all-stop: all run or none).

    Every call comes from the thread running :meth:`GuestDebugServer.serve`.
    The guest is either *running* (after :meth:`resume`, until its stop has
    been reported) or *stopped*; once stopped it stays stopped, every vCPU,
    until the next :meth:`resume`. Registers, debug registers and memory are
    only touched while it is stopped. The VMM may start its guest running
    before serving; a session begins with :meth:`stop` and a detach ends
    with :meth:`resume` (nothing stepping).
    """

    @property
    def cpu_count(self) -> int:
        """How many vCPUs the guest has; the server names them threads 1..cpu_count."""

    def stop(self) -> None:
        """Stop every vCPU; return once all are stopped (at once if none runs).

        If the guest was running, the stop that ends the run is what the
        next :meth:`wait` returns, at once: ``interrupt`` for this call, or
        the event that beat it (a breakpoint, ``exited``, ...).
        """

    def resume(self, step: frozenset[int]) -> None:
        """Let the guest run from where it stopped.

        ``step`` empty: every vCPU runs until the next stop event. ``step``
        non-empty: only those vCPUs run, one instruction each, and the
        others stay stopped; the run then ends with a ``step`` event (or
        whatever stopped a stepping vCPU first). Exactly one StopEvent ends
        each run; when it happens every vCPU is stopped.
        """

    def wait(self, timeout: float | None) -> StopEvent | None:
        """The event that ended the current run, waiting up to ``timeout`` s (None: forever).

        Returns None if the guest is still running after ``timeout``, or if
        it is stopped and its event was already returned. Reason ``exited``
        when the guest powered off (its vCPUs are gone; nothing else will be
        called but :meth:`set_hw_debug` clearing the debug registers).
        """

    def registers(self, cpu: int) -> list[int]:
        """The 34 registers of ``cpu``: x0..x30, sp, pc, cpsr (cpsr 32-bit), as unsigned."""

    def set_register(self, cpu: int, index: int, value: int) -> None:
        """Set register ``index`` (0..33, order of :meth:`registers`) of ``cpu``.

        Raises a GuestMemoryError subclass for a bad index or value.
        """

    def set_hw_debug(self, breakpoints: Sequence[int], watchpoints: Sequence[Watchpoint]) -> None:
        """Program every vCPU's hardware breakpoints and watchpoints, replacing the last set.

        Addresses are guest virtual addresses as :func:`canonical` gives
        them. At most :meth:`hw_slots` of each. A watchpoint the hardware cannot
        express (length, alignment) raises a GuestMemoryError subclass and
        changes nothing.
        """

    def hw_slots(self) -> tuple[int, int]:
        """(hardware breakpoints, hardware watchpoints) the vCPUs have."""

    def translate(self, cpu: int, va: int, length: int) -> list[tuple[int, int]]:
        """``[va, va + length)`` through ``cpu``'s stage 1: (IPA, length) pieces in order.

        All or nothing: a range not wholly mapped raises a GuestMemoryError
        subclass (:class:`UnmappedAddressError` for choice); whichever it is,
        the client is told the address is not mapped (``E0e``).
        """

    def detach(self) -> None:
        """The session is over: stop trapping for the debugger before the guest runs on.

        Called with the guest stopped, after every software breakpoint is out
        and before the last :meth:`resume`; the guest's own BRKs, breakpoints
        and steps are its own business again.
        """


def canonical(va: int) -> int:
    """``va`` without its tag byte: bits 63:56 copied from bit 55 (TTBR0 or TTBR1 half)."""
    low = va & ((1 << 56) - 1)
    return low | (0xFF << 56) if low >> 55 & 1 else low


@dataclass
class _SoftBreak:
    """A BRK #0 in guest memory: where its 4 bytes went and what they replaced."""

    pieces: list[tuple[int, int]]
    original: bytearray

    def ipas(self) -> list[int]:
        """The IPA of each of the 4 bytes, in order."""
        return [ipa + k for ipa, n in self.pieces for k in range(n)]


@dataclass
class _Client:
    """What the client said it understands (its qSupported)."""

    multiprocess: bool = False
    swbreak: bool = False
    hwbreak: bool = False


class DebugSession:
    """One client's session: packet payload in, reply payload (or None) out.

    ``running`` says whether the guest runs for this client: a resuming
    packet gets no reply until :meth:`on_stop` builds the stop reply.
    """

    def __init__(self, memory: GuestMemory, run: RunControl, pid: int) -> None:
        """Debug ``run``'s guest over ``memory``; ``pid`` names the process GDB sees."""
        self.memory = memory
        self.run = run
        self.pid = pid
        self.no_ack = False
        self.ended = False
        self.exited = False
        self.running = False
        self.client = _Client()
        self.cpu = 0  # the Hg thread: registers, memory translation
        self.resume_cpu: int | None = None  # the Hc thread (None: all)
        self.last_stop: StopEvent | None = None  # None: as the session found the guest
        self.soft: dict[int, _SoftBreak] = {}
        self.hard: list[int] = []
        self.watch: list[Watchpoint] = []
        self._files: dict[int, bytes] = {}  # open vFile handles: fd -> contents
        self._fixed: dict[bytes, Callable[[], bytes]] = {
            b"?": lambda: self.stop_reply(self.last_stop),
            b"qfThreadInfo": lambda: b"m" + b",".join(map(self.tid, range(self.count))),
            b"qsThreadInfo": lambda: b"l",
            b"qC": lambda: b"QC" + self.tid(self.cpu),
            b"vCont?": lambda: VCONT_ACTIONS,
        }
        self._commands: list[tuple[bytes, Callable[[bytes], bytes | None]]] = [
            (b"qSupported", self._supported),
            (b"QStartNoAckMode", self._start_no_ack),
            (b"qXfer:features:read:", lambda a: _xfer(a, {b"target.xml": target.TARGET_XML})),
            (b"qThreadExtraInfo,", self._extra_info),
            (b"qAttached", lambda _: b"1"),
            (b"qMemTags:", self._read_tags),
            (b"QMemTags:", self._write_tags),
            (b"qIsAddressTagged:", self._is_tagged),
            (b"vFile:", self._vfile),
            (b"vCont;", self._vcont),
            (b"H", self._select_thread),
            (b"T", self._thread_alive),
            (b"g", self._read_all_registers),
            (b"G", self._write_all_registers),
            (b"p", self._read_register),
            (b"P", self._write_register),
            (b"m", self._read_memory),
            (b"M", self._write_memory_hex),
            (b"X", self._write_memory_binary),
            (b"Z", self._insert),
            (b"z", self._remove),
            (b"c", lambda a: self._continue(a, step=False)),
            (b"C", lambda a: self._continue(_drop_signal(a), step=False)),
            (b"s", lambda a: self._continue(a, step=True)),
            (b"S", lambda a: self._continue(_drop_signal(a), step=True)),
        ]

    @property
    def count(self) -> int:
        """The number of vCPUs (threads)."""
        return self.run.cpu_count

    # ---- dispatch ----------------------------------------------------------------

    def handle(self, payload: bytes) -> bytes | None:
        """The reply to one packet; None for none now (``k``, or the guest resumed)."""
        if payload == b"k":
            self._detach(b"")
            return None
        if payload[:1] == b"D" or payload.startswith(b"vKill"):
            return self._detach(payload)  # also while running: the server stops the guest
        if self.running:
            return E_BUSY  # all-stop: only 0x03 makes sense while the guest runs
        fixed = self._fixed.get(payload)
        if fixed is not None:
            return fixed()
        for prefix, command in self._commands:
            if payload.startswith(prefix):
                return self._answer(command, payload[len(prefix) :])
        return b""

    def _answer(self, command: Callable[[bytes], bytes | None], args: bytes) -> bytes | None:
        try:
            return command(args)
        except ProtocolError as error:
            log.info("malformed packet: %s", error)
            return E_MALFORMED
        except AddressError as error:
            log.info("not mapped: %s", error)
            return E_FAULT
        except Unavailable as error:
            log.info("refused: %s", error)
            return error.reply
        except TagsBusyError as error:
            log.info("busy: %s", error)
            return E_BUSY
        except GuestMemoryError as error:
            log.info("refused: %s", error)
            return E_INVALID

    # ---- threads ----------------------------------------------------------------

    def tid(self, cpu: int) -> bytes:
        """The thread id of ``cpu`` as the client expects it."""
        if self.client.multiprocess:
            return b"p%x.%x" % (self.pid, cpu + 1)
        return b"%x" % (cpu + 1)

    def _parse_tid(self, text: bytes) -> int | None:
        """The vCPU a thread id names; None for ``-1``/``0`` (all, any)."""
        if text.startswith(b"p"):
            pid, dot, text = text[1:].partition(b".")
            if not dot or (pid not in (b"-1", b"0") and parse_hex(pid, "pid") != self.pid):
                raise Unavailable(f"no process {pid[:20]!r} here")
        if text in (b"-1", b"0"):
            return None
        thread = parse_hex(text, "thread id")
        if not 1 <= thread <= self.count:
            raise Unavailable(f"no thread {thread}")
        return thread - 1

    def _select_thread(self, args: bytes) -> bytes:
        which, thread = args[:1], self._parse_tid(args[1:])
        if which == b"g":
            self.cpu = self.cpu if thread is None else thread
        elif which == b"c":
            self.resume_cpu = thread
        else:
            raise ProtocolError(f"H{which!r}: not g or c")
        return b"OK"

    def _thread_alive(self, args: bytes) -> bytes:
        if self._parse_tid(args) is None:
            raise Unavailable("T needs one thread")
        return b"OK"

    def _extra_info(self, args: bytes) -> bytes:
        cpu = self._parse_tid(args)
        if cpu is None:
            raise Unavailable("qThreadExtraInfo needs one thread")
        return f"vCPU {cpu}".encode().hex().encode()

    # ---- registers --------------------------------------------------------------

    def _values(self) -> list[int]:
        values = list(self.run.registers(self.cpu))
        if len(values) != REGISTER_COUNT:
            raise Unavailable(f"RunControl gave {len(values)} registers, not {REGISTER_COUNT}")
        return [*values, 0]  # tag_ctl: not part of RunControl, reads zero

    def _read_all_registers(self, args: bytes) -> bytes:
        if args:
            raise ProtocolError("g takes no arguments")
        values = self._values()
        return b"".join(_register_hex(n, v) for n, v in enumerate(values))

    def _write_all_registers(self, args: bytes) -> bytes:
        raw = _hex_bytes(args, "G")
        sizes = [bits // 8 for _, bits, _ in target.REGISTERS]
        if len(raw) not in (sum(sizes), sum(sizes[:REGISTER_COUNT])):
            raise ProtocolError(f"G with {len(raw)} bytes of registers")
        values, at = [], 0
        for size in sizes[:REGISTER_COUNT]:
            values.append(int.from_bytes(raw[at : at + size], "little"))
            at += size
        self._set_registers(values)
        return b"OK"

    def _set_registers(self, values: list[int]) -> None:
        """Set every register, or (when RunControl refuses one) none."""
        before = self.run.registers(self.cpu)
        done = 0
        try:
            for index, value in enumerate(values):
                if value != before[index]:
                    self.run.set_register(self.cpu, index, value)
                done = index + 1
        except Exception:
            for index in range(done):
                if values[index] != before[index]:
                    self.run.set_register(self.cpu, index, before[index])
            raise

    def _read_register(self, args: bytes) -> bytes:
        number = parse_hex(args, "register number")
        if number >= len(target.REGISTERS):
            raise Unavailable(f"no register {number}")
        return _register_hex(number, self._values()[number])

    def _write_register(self, args: bytes) -> bytes:
        number_text, value_text = split_fields(args, b"=", 2, "P packet")
        number = parse_hex(number_text, "register number")
        if number >= REGISTER_COUNT:
            raise Unavailable(f"register {number} cannot be written")
        raw = _hex_bytes(value_text, "P")
        if len(raw) != target.REGISTERS[number][1] // 8:
            raise ProtocolError(f"P {number}: {len(raw)} bytes")
        self.run.set_register(self.cpu, number, int.from_bytes(raw, "little"))
        return b"OK"

    # ---- memory by virtual address ------------------------------------------------

    def _address_length(self, text: bytes) -> tuple[int, int]:
        address, length = split_fields(text, b",", 2, "address,length")
        return canonical(parse_hex(address, "address")), parse_hex(length, "length")

    def _translate(self, va: int, length: int) -> list[tuple[int, int]]:
        if va + length > 1 << 64:
            raise UnmappedAddressError("range wraps past 2**64", va=va, length=length)
        try:
            pieces = self.run.translate(self.cpu, va, length)
        except AddressError:
            raise
        except GuestMemoryError as error:  # e.g. vmm.stage1's TranslationError: still E0e
            raise UnmappedAddressError(str(error), va=va, length=length) from error
        if sum(n for _, n in pieces) != length:
            raise UnmappedAddressError("translation pieces do not add up", va=va, length=length)
        return pieces

    def _mapped_prefix(self, va: int, length: int) -> list[tuple[int, int]]:
        """The pieces of the longest mapped start of the range (a read may be partial)."""
        try:
            return self._translate(va, length)
        except GuestMemoryError:
            if length <= 1:
                raise
        good, bad = 0, length
        while bad - good > 1:
            middle = (good + bad) // 2
            try:
                self._translate(va, middle)
                good = middle
            except GuestMemoryError:
                bad = middle
        return self._translate(va, good) if good else self._translate(va, 1)

    def _read_pieces(self, pieces: list[tuple[int, int]]) -> bytes:
        """Guest memory at ``pieces``, breakpoints shown as the bytes they replaced."""
        out = bytearray()
        for ipa, n in pieces:
            data = bytearray(self.memory.read(ipa, n, access=Access.DEBUG))
            for brk in self.soft.values():
                for k, at in enumerate(brk.ipas()):
                    if ipa <= at < ipa + n:
                        data[at - ipa] = brk.original[k]
            out += data
        return bytes(out)

    def _write_pieces(self, pieces: list[tuple[int, int]], data: bytes) -> None:
        """Write ``data``; bytes under a breakpoint update its saved copy instead."""
        staged: list[tuple[int, bytearray]] = []
        at = 0
        for ipa, n in pieces:
            staged.append((ipa, bytearray(data[at : at + n])))
            at += n
        for brk in self.soft.values():
            for k, where in enumerate(brk.ipas()):
                for ipa, chunk in staged:
                    if ipa <= where < ipa + len(chunk):
                        brk.original[k] = chunk[where - ipa]
                        chunk[where - ipa] = BRK[k]
        for ipa, chunk in staged:
            self.memory.translate(ipa, len(chunk))  # all or nothing: every piece checked first
        for ipa, chunk in staged:
            self.memory.write(ipa, chunk, access=Access.DEBUG)

    def _read_memory(self, args: bytes) -> bytes:
        va, length = self._address_length(args)
        if length == 0:
            return b""
        pieces = self._mapped_prefix(va, min(length, MAX_READ))
        return self._read_pieces(pieces).hex().encode()

    def _write(self, where: bytes, data: bytes) -> bytes:
        va, length = self._address_length(where)
        if len(data) != length:
            raise ProtocolError(f"{length} bytes announced, {len(data)} sent")
        if length:
            self._write_pieces(self._translate(va, length), data)
        return b"OK"

    def _write_memory_hex(self, args: bytes) -> bytes:
        where, data = split_fields(args, b":", 2, "M packet")
        return self._write(where, _hex_bytes(data, "M data"))

    def _write_memory_binary(self, args: bytes) -> bytes:
        where, data = split_fields(args, b":", 2, "X packet")
        return self._write(where, unescape(data))

    # ---- tags by virtual address --------------------------------------------------

    def _granules(self, args: bytes) -> tuple[list[tuple[int, int]], int, bytes]:
        """(IPA pieces, granule count, the rest) of ``ADDR,LEN:TYPE[:...]``."""
        where, rest = split_fields(args, b":", 2, "tag packet")
        va, length = self._address_length(where)
        kind, _, tail = rest.partition(b":")
        if parse_hex(kind, "tag type") != ALLOCATION_TAG:
            raise Unavailable("only allocation tags (type 1) exist")
        first = va - va % GRANULE
        count = max(1, -(-(va + length - first) // GRANULE))
        if count > MAX_TAGS:
            raise Unavailable(f"{count} granules exceed {MAX_TAGS} in one packet")
        return self._translate(first, count * GRANULE), count, tail

    def _read_tags(self, args: bytes) -> bytes:
        pieces, _, _ = self._granules(args)
        tags = [self.memory.get_tags(ipa, n) for ipa, n in pieces]
        return b"m" + np.concatenate(tags).tobytes().hex().encode()

    def _write_tags(self, args: bytes) -> bytes:
        pieces, count, tail = self._granules(args)
        pattern = np.frombuffer(_hex_bytes(tail, "QMemTags tags"), dtype=np.uint8)
        if pattern.size == 0:
            raise Unavailable("QMemTags without tags")
        if int(pattern.max()) > 15:
            raise Unavailable("a tag above 15")
        tags = np.resize(pattern, count)
        for ipa, n in pieces:
            self.memory.translate(ipa, n)
            if ipa % GRANULE or n % GRANULE:
                raise Unavailable("a translated piece is not granule-aligned")
        at = 0
        for ipa, n in pieces:
            self.memory.set_tags(ipa, n, tags[at : at + n // GRANULE])
            at += n // GRANULE
        return b"OK"

    def _is_tagged(self, args: bytes) -> bytes:
        va = canonical(parse_hex(args, "address"))
        if self.memory.tag_mode is TagMode.NONE:
            return b"00"
        try:
            for ipa, n in self._translate(va, 1):
                self.memory.translate(ipa, n)
        except GuestMemoryError:
            return b"00"
        return b"01"

    # ---- /proc/PID/smaps for GDB 13's memory-tag commands ------------------------------

    def _smaps(self) -> bytes:
        """The whole address space as one mapping, tagged unless the memory has no tags.

        GDB 13 asks whether an address lies in an ``mt`` mapping before any
        tag packet; which addresses are mapped is the stage 1's business,
        answered by the tag packets themselves (E0e).
        """
        flags = "rd wr mr mw me ac" + ("" if self.memory.tag_mode is TagMode.NONE else " mt")
        return (
            "0000000000000000-ffffffffffffffff rw-p 00000000 00:00 0          [guest]\n"
            f"VmFlags: {flags} \n"
        ).encode()

    def _vfile(self, args: bytes) -> bytes:
        op, _, rest = args.partition(b":")
        if op == b"setfs":
            return b"F0"
        if op == b"open":
            return self._vfile_open(rest)
        if op == b"pread":
            fd, count, offset = (
                parse_hex(f, "pread") for f in split_fields(rest, b",", 3, "pread")
            )
            if fd not in self._files:
                return b"F-1,%x" % EBADF
            data = self._files[fd][offset : offset + min(count, MAX_READ)]
            return b"F%x;" % len(data) + escape(data)
        if op == b"close":
            closed = self._files.pop(parse_hex(rest, "fd"), None) is not None
            return b"F0" if closed else b"F-1,%x" % EBADF
        return b""

    def _vfile_open(self, args: bytes) -> bytes:
        path_hex, flags, _mode = split_fields(args, b",", 3, "vFile:open")
        path = _hex_bytes(path_hex, "vFile:open path")
        if path not in (f"/proc/{self.pid}/smaps".encode(), b"/proc/self/smaps"):
            return b"F-1,%x" % ENOENT
        if parse_hex(flags, "open flags") & os.O_ACCMODE != os.O_RDONLY:
            return b"F-1,%x" % EACCES
        if len(self._files) >= MAX_OPEN_FILES:
            return b"F-1,%x" % EMFILE
        fd = next(n for n in range(100, 100 + MAX_OPEN_FILES + 1) if n not in self._files)
        self._files[fd] = self._smaps()
        return b"F%x" % fd

    # ---- breakpoints and watchpoints ---------------------------------------------

    def _z_fields(self, args: bytes) -> tuple[int, int, int]:
        kind_text = args.split(b";", 1)[0]  # conditions and commands are not supported
        ztype, address, kind = split_fields(kind_text, b",", 3, "Z packet")
        return (
            parse_hex(ztype, "type"),
            canonical(parse_hex(address, "address")),
            parse_hex(kind, "kind"),
        )

    def _insert(self, args: bytes) -> bytes:
        ztype, address, kind = self._z_fields(args)
        if ztype == 0:
            self._insert_soft(address, kind)
        elif ztype == 1:
            self._set_hw([*self.hard, address], self.watch, slot=0)
        elif ztype in _WATCH_KINDS:
            if kind == 0:
                raise Unavailable("a watchpoint of length 0")
            watch = Watchpoint(address, kind, _WATCH_KINDS[ztype])
            self._set_hw(self.hard, [*self.watch, watch], slot=1)
        else:
            return b""
        return b"OK"

    def _remove(self, args: bytes) -> bytes:
        ztype, address, kind = self._z_fields(args)
        if ztype == 0:
            self._remove_soft(address)
        elif ztype == 1:
            if address in self.hard:
                hard = list(self.hard)
                hard.remove(address)
                self._set_hw(hard, self.watch, slot=None)
        elif ztype in _WATCH_KINDS:
            watch = Watchpoint(address, kind, _WATCH_KINDS[ztype])
            if watch in self.watch:
                watches = list(self.watch)
                watches.remove(watch)
                self._set_hw(self.hard, watches, slot=None)
        else:
            return b""
        return b"OK"

    def _set_hw(self, hard: list[int], watch: list[Watchpoint], slot: int | None) -> None:
        """Program the hardware; ``slot`` 0/1 checks breakpoint/watchpoint room first."""
        if slot is not None and len((hard, watch)[slot]) > self.run.hw_slots()[slot]:
            raise Unavailable("no hardware slot free", E_NO_SLOT)
        self.run.set_hw_debug(tuple(hard), tuple(watch))
        self.hard, self.watch = hard, watch

    def _insert_soft(self, address: int, kind: int) -> None:
        if kind != len(BRK) or address % len(BRK):
            raise Unavailable(f"software breakpoint of kind {kind} at {address:#x}")
        if address in self.soft:
            return
        pieces = self._translate(address, len(BRK))
        original = bytearray(self._read_pieces(pieces))
        self._write_pieces(pieces, BRK)
        self.soft[address] = _SoftBreak(pieces, original)

    def _remove_soft(self, address: int) -> None:
        brk = self.soft.pop(address, None)
        if brk is not None:
            self._write_pieces(brk.pieces, bytes(brk.original))

    def remove_all(self) -> None:
        """Take every breakpoint and watchpoint out: guest memory as it was, hardware clear."""
        for address in list(self.soft):
            try:
                self._remove_soft(address)
            except GuestMemoryError:
                log.exception("cannot restore the bytes under the breakpoint at %#x", address)
        if self.hard or self.watch:
            self.hard, self.watch = [], []
            self.run.set_hw_debug((), ())

    # ---- run control ---------------------------------------------------------------

    def _continue(self, args: bytes, *, step: bool) -> bytes | None:
        if args:
            self.run.set_register(self._resume_target(), PC, canonical(parse_hex(args, "pc")))
        return self._resume(self._resume_target() if step else None)

    def _resume_target(self) -> int:
        return self.cpu if self.resume_cpu is None else self.resume_cpu

    def _vcont(self, args: bytes) -> bytes | None:
        stepping: int | None = None
        for action in args.split(b";"):
            verb, _, thread = action.partition(b":")
            if verb[:1] in (b"C", b"S") and len(verb) == 3:
                parse_hex(verb[1:], "signal")  # the guest has no signals: ignored
                verb = verb[:1].lower()
            if verb not in (b"c", b"s"):
                raise ProtocolError(f"vCont action {action[:20]!r}")
            cpu = self._parse_tid(thread) if thread else None
            if verb == b"s" and stepping is None:
                stepping = self.cpu if cpu is None else cpu
        return self._resume(stepping)

    def _resume(self, stepping: int | None) -> bytes | None:
        """Step ``stepping`` alone, or run every vCPU; the stop reply comes later.

        A vCPU that sits on one of our breakpoints first steps over it alone,
        with the breakpoint out of the way, then the breakpoint goes back.
        """
        cpus = range(self.count) if stepping is None else (stepping,)
        for cpu in cpus:
            event = self._step_over(cpu)
            if event is None:
                continue
            if stepping is not None or event.reason != "step":
                return self.on_stop(event)
        if stepping is None:
            self.run.resume(frozenset())
        else:
            self.run.resume(frozenset((stepping,)))
        self.running = True
        return None

    def _step_over(self, cpu: int) -> StopEvent | None:
        """Step ``cpu`` past a breakpoint at its pc, if one is there; the step's event."""
        pc = self.run.registers(cpu)[PC]
        soft, hard = pc in self.soft, pc in self.hard
        if not soft and not hard:
            return None
        if soft:
            self._remove_soft(pc)
        if hard:
            self.run.set_hw_debug(tuple(a for a in self.hard if a != pc), tuple(self.watch))
        try:
            return self._step_alone(cpu)
        finally:
            if soft:
                self._insert_soft(pc, len(BRK))
            if hard:
                self.run.set_hw_debug(tuple(self.hard), tuple(self.watch))

    def _step_alone(self, cpu: int) -> StopEvent:
        """One instruction on ``cpu``, the others stopped; the event that ends it."""
        self.run.resume(frozenset((cpu,)))
        event = self.run.wait(STOP_WAIT)
        if event is None:
            self.run.stop()
            event = self.run.wait(STOP_WAIT)
        return event or StopEvent(cpu, "interrupt")

    def interrupt(self) -> bytes | None:
        """0x03 from the client: stop the running guest; its stop reply."""
        if not self.running:
            return None
        self.run.stop()
        event = self.run.wait(STOP_WAIT)
        return self.on_stop(event or StopEvent(self.cpu, "interrupt"))

    def on_stop(self, event: StopEvent) -> bytes:
        """The guest stopped: remember where, and the reply that tells the client."""
        self.running = False
        if event.reason == "exited":
            self.exited = self.ended = True
            return b"W00" + (b";process:%x" % self.pid if self.client.multiprocess else b"")
        if 0 <= event.cpu < self.count:
            self.cpu = event.cpu
        self.resume_cpu = None
        self.last_stop = event
        return self.stop_reply(event)

    def stop_reply(self, event: StopEvent | None) -> bytes:
        """``T05thread:<tid>;`` with why (``T02`` for an interrupt; None: ``T05``, attached)."""
        if event is None:
            return b"T05thread:" + self.tid(self.cpu) + b";"
        signal = b"02" if event.reason == "interrupt" else b"05"
        reply = b"T" + signal + b"thread:" + self.tid(self.cpu) + b";"
        if event.reason == "breakpoint" and self.client.swbreak:
            reply += b"swbreak:;"
        elif event.reason == "hw-breakpoint" and self.client.hwbreak:
            reply += b"hwbreak:;"
        elif event.reason == "watchpoint" and event.address is not None:
            reply += _WATCH_REPLY[event.kind or "write"].encode() + b":%x;" % event.address
        return reply

    # ---- session --------------------------------------------------------------------

    def _supported(self, args: bytes) -> bytes:
        features = set(args.lstrip(b":").split(b";"))
        self.client = _Client(
            multiprocess=b"multiprocess+" in features,
            swbreak=b"swbreak+" in features,
            hwbreak=b"hwbreak+" in features,
        )
        return SUPPORTED

    def _start_no_ack(self, args: bytes) -> bytes:
        if args:
            return b""
        self.no_ack = True
        return b"OK"

    def _detach(self, args: bytes) -> bytes:
        self.ended = True  # the server takes the breakpoints out and lets the guest run
        return b"OK"


def _drop_signal(args: bytes) -> bytes:
    """The address of ``C``/``S`` (``SIG[;ADDR]``): the guest has no signals to deliver."""
    signal, _, address = args.partition(b";")
    parse_hex(signal, "signal")
    return address


def _register_hex(number: int, value: int) -> bytes:
    bits = target.REGISTERS[number][1]
    return (value & ((1 << bits) - 1)).to_bytes(bits // 8, "little").hex().encode()


def _hex_bytes(text: bytes, what: str) -> bytes:
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"{what} is not hex") from None


class GuestDebugServer(GdbStub):
    """Serve a running guest to GDB: ``GuestDebugServer(mem, run, port=1234).serve()``.

    Listening, refusing a second client and closing work as in
    :class:`~guestmem.gdbstub.GdbStub`. Each session stops the guest when
    it begins; when it ends (``D``, ``k``, ``vKill``, a closed connection,
    the idle timeout or :meth:`close`) every breakpoint and watchpoint is
    taken out and the guest resumes. Once the guest has exited (``W00``),
    :meth:`serve` returns.
    """

    def __init__(
        self,
        memory: GuestMemory,
        run: RunControl,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        unix_path: str | None = None,
        allow_remote: bool = False,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        pid: int | None = None,
    ) -> None:
        """Listen as :class:`~guestmem.gdbstub.GdbStub` does; ``pid`` (default: ours) is GDB's."""
        super().__init__(
            memory,
            host=host,
            port=port,
            unix_path=unix_path,
            allow_remote=allow_remote,
            idle_timeout=idle_timeout,
        )
        self.run = run
        self.pid = os.getpid() if pid is None else pid
        self.exited = False

    def serve_connection(self, conn: socket.socket) -> None:
        """Run one session on a connected socket until it ends; then close the socket."""
        conn.setblocking(True)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT, 0))
        with contextlib.suppress(OSError):  # a Unix socket has no Nagle to turn off
            # "+" and the reply go out as two writes: with Nagle, the reply
            # waits for the client's delayed ACK (40 ms a packet, a slow stepi).
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._active = conn
        try:
            if not self._closed.is_set() and not self.exited:
                self._debug(conn)
        except OSError as error:
            log.info("session ended: %s", error)
        except Exception:
            log.exception("session ended by a failure")  # RunControl's, or a bug: serve on
        finally:
            self._active = None
            hang_up(conn)

    def _debug(self, conn: socket.socket) -> None:
        session = DebugSession(self.memory, self.run, self.pid)
        try:
            self.run.stop()
            first = self.run.wait(0)
            if first is not None and first.reason == "exited":
                session.exited = True  # powered off before this client came
                return
            with selectors.DefaultSelector() as selector:
                selector.register(conn, selectors.EVENT_READ, "client")
                selector.register(self._listener, selectors.EVENT_READ, "newcomer")
                selector.register(self._wake_reader, selectors.EVENT_READ, "wake")
                refusals = _Refusals(selector)
                try:
                    self._session_loop(_Wire(session, conn), selector, refusals)
                finally:
                    refusals.close()
        finally:
            self._end(session)

    def _end(self, session: DebugSession) -> None:
        """Whatever ended the session: breakpoints out, then the guest runs on.

        Each step is tried even if the one before failed: a RunControl that
        raises must not leave a BRK in guest memory.
        """
        if session.running:
            event = _attempt(self._stop_running)
            session.exited = session.exited or (event is not None and event.reason == "exited")
        _attempt(session.remove_all)
        if session.exited:
            self.exited = True
            self._closed.set()  # serve() returns: there is no guest left to debug
            with contextlib.suppress(OSError):
                self._wake_writer.send(b"x")
        else:
            _attempt(self.run.detach)
            _attempt(lambda: self.run.resume(frozenset()))

    def _stop_running(self) -> StopEvent | None:
        self.run.stop()
        return self.run.wait(STOP_WAIT)

    def _session_loop(
        self, wire: _Wire, selector: selectors.BaseSelector, refusals: _Refusals
    ) -> None:
        session = wire.session
        last_packet = time.monotonic()
        while not session.ended and not self._closed.is_set():
            if session.running:
                event = self.run.wait(POLL_INTERVAL)
                if event is not None:
                    wire.send(session.on_stop(event))
                    continue
                wait: float | None = 0.0
            else:
                wait = self._idle_wait(last_packet, refusals)
                if wait is not None and wait <= 0 and self._idle(last_packet):
                    log.info("session idle for %.0f s: ended", self.idle_timeout)
                    return
            for key, _ in selector.select(wait):
                if key.data == "client":
                    if not wire.receive():
                        return
                    last_packet = time.monotonic() if wire.progressed else last_packet
                elif key.data == "newcomer":
                    newcomer = accept(self._listener)
                    if newcomer is not None:
                        refusals.admit(newcomer)
                elif isinstance(key.data, _Refusal):
                    refusals.on_readable(key.data)
            refusals.expire()

    def _idle(self, last_packet: float) -> bool:
        return self.idle_timeout is not None and time.monotonic() >= last_packet + self.idle_timeout

    def _idle_wait(self, last_packet: float, refusals: _Refusals) -> float | None:
        idle = None if self.idle_timeout is None else last_packet + self.idle_timeout
        deadlines = [d for d in (idle, refusals.next_deadline()) if d is not None]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None


class _Wire:
    """Bytes in, replies out, for one session: acks, naks, resends and 0x03."""

    def __init__(self, session: DebugSession, conn: socket.socket) -> None:
        self.session = session
        self.conn = conn
        self.reader = PacketReader()
        self.last_reply: bytes | None = None
        self.progressed = False

    def send(self, reply: bytes) -> None:
        """Send one reply packet (kept for a resend on ``-``)."""
        self.last_reply = frame(reply)
        self.conn.sendall(self.last_reply)

    def receive(self) -> bool:
        """Handle what the peer sent; False once it has closed the connection."""
        data = self.conn.recv(65536)
        if not data:
            return False
        events = self.reader.feed(data)
        self.progressed = bool(events)
        for event in events:
            self._handle(event)
            if self.session.ended:
                break
        return True

    def _handle(self, event: object) -> None:
        session = self.session
        if isinstance(event, Packet):
            if not session.no_ack:
                self.conn.sendall(b"+")
            reply = _safely(session.handle, event.payload)
            if reply is not None:
                self.send(reply)
        elif isinstance(event, Interrupt):
            reply = _safely(lambda _: session.interrupt(), b"\x03")
            if reply is not None:
                self.send(reply)
        elif isinstance(event, BadPacket):
            log.info("bad packet: %s", event.reason)
            if not session.no_ack:
                self.conn.sendall(b"-")
        elif isinstance(event, Nak) and self.last_reply is not None and not session.no_ack:
            self.conn.sendall(self.last_reply)


def _attempt(step: Callable[[], T]) -> T | None:
    """``step()``, or None if it raised (logged)."""
    try:
        return step()
    except Exception:
        log.exception("ending the session: %s failed", getattr(step, "__name__", step))
        return None


def _safely(handler: Callable[[bytes], bytes | None], payload: bytes) -> bytes | None:
    """``handler(payload)``, or ``E01`` for a failure nobody foresaw (logged)."""
    try:
        return handler(payload)
    except Exception:
        log.exception("packet %r failed", payload[:64])
        return E_MALFORMED
