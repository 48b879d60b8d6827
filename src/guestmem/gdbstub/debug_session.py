"""A session with a running guest: threads are vCPUs, and GDB stops, steps and resumes them.

:class:`DebugSession` drives a :class:`~guestmem.gdbstub.run_control.RunControl`
(all-stop) and reads and writes memory and tags by guest virtual address
(:class:`~guestmem.gdbstub.virtual_memory.VirtualMemory`). Beyond the
replies of :mod:`~guestmem.gdbstub.commands` it answers ``E10`` (EBUSY) to
anything but 0x03 and a detach while the guest runs, and ``E1c`` (ENOSPC)
when the hardware has no breakpoint or watchpoint slot left.
docs/vmm-debug.md lists the packets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from guestmem.errors import GuestMemoryError, ProtocolError
from guestmem.gdbstub import target
from guestmem.gdbstub.commands import (
    E_BUSY,
    E_NO_SLOT,
    CommandSession,
    InvalidRequest,
    drop_signal,
    parse_hex,
    parse_hex_bytes,
    proc_files,
    split_fields,
    xfer,
)
from guestmem.gdbstub.memory_commands import MemoryCommands
from guestmem.gdbstub.packets import PACKET_SIZE
from guestmem.gdbstub.run_control import (
    BRK,
    PC,
    REGISTER_COUNT,
    RunControl,
    StopEvent,
    WatchKind,
    Watchpoint,
    canonical,
)
from guestmem.gdbstub.virtual_memory import VirtualMemory
from guestmem.memory import GuestMemory

log = logging.getLogger(__name__)

STOP_WAIT = 10.0  # how long a stop() or a one-instruction step may take to be reported
SUPPORTED = (
    f"PacketSize={PACKET_SIZE:x};QStartNoAckMode+;qXfer:features:read+;multiprocess+;"
    "memory-tagging+;vContSupported+;swbreak+;hwbreak+"
).encode()
VCONT_ACTIONS = b"vCont;c;C;s;S"
_WATCH_KINDS: dict[int, WatchKind] = {2: "write", 3: "read", 4: "access"}
_WATCH_REPLY = {"write": "watch", "read": "rwatch", "access": "awatch"}


@dataclass
class ClientFeatures:
    """What the client said it understands (its qSupported)."""

    multiprocess: bool = False
    swbreak: bool = False
    hwbreak: bool = False


def register_hex(number: int, value: int) -> bytes:
    """Register ``number``'s ``value`` in target byte order, as hex."""
    bits = target.REGISTERS[number][1]
    return (value & ((1 << bits) - 1)).to_bytes(bits // 8, "little").hex().encode()


class DebugSession(CommandSession):
    """One client's session: packet payload in, reply payload (or None) out.

    ``running`` says whether the guest runs for this client: a resuming
    packet gets no reply until :meth:`on_stop` builds the stop reply.
    """

    def __init__(self, memory: GuestMemory, run: RunControl, pid: int) -> None:
        """Debug ``run``'s guest over ``memory``; ``pid`` names the process GDB sees."""
        super().__init__(pid)
        self.memory = memory
        self.run = run
        self.exited = False
        self.client = ClientFeatures()
        self.cpu = 0  # the Hg thread: registers, memory translation
        self.resume_cpu: int | None = None  # the Hc thread (None: all)
        self.last_stop: StopEvent | None = None  # None: as the session found the guest
        self.view = VirtualMemory(memory, run, lambda: self.cpu)
        self.hard: list[int] = []
        self.watch: list[Watchpoint] = []
        self.fixed = {
            b"?": lambda: self.stop_reply(self.last_stop),
            b"qfThreadInfo": lambda: b"m" + b",".join(map(self.tid, range(self.count))),
            b"qsThreadInfo": lambda: b"l",
            b"qC": lambda: b"QC" + self.tid(self.cpu),
            b"vCont?": lambda: VCONT_ACTIONS,
        }
        self.commands = [
            (b"qSupported", self._supported),
            (b"QStartNoAckMode", self.start_no_ack),
            (b"qXfer:features:read:", lambda a: xfer(a, {b"target.xml": target.TARGET_XML})),
            (b"qThreadExtraInfo,", self._extra_info),
            (b"qAttached", lambda _: b"1"),
            (b"vFile:", lambda a: self.vfile(a, proc_files(self.pid, {"smaps": self.view.smaps}))),
            (b"vCont;", self._vcont),
            (b"H", self._select_thread),
            (b"T", self._thread_alive),
            (b"g", self._read_all_registers),
            (b"G", self._write_all_registers),
            (b"p", self._read_register),
            (b"P", self._write_register),
            *MemoryCommands(self.view).table(),
            (b"Z", self._insert),
            (b"z", self._remove),
            (b"c", lambda a: self._continue(a, step=False)),
            (b"C", lambda a: self._continue(drop_signal(a), step=False)),
            (b"s", lambda a: self._continue(a, step=True)),
            (b"S", lambda a: self._continue(drop_signal(a), step=True)),
        ]

    @property
    def count(self) -> int:
        """The number of vCPUs (threads)."""
        return self.run.cpu_count

    def handle(self, payload: bytes) -> bytes | None:
        """The reply to one packet; None for none now (``k``, or the guest resumed)."""
        if payload == b"k":
            self.ended = True
            return None
        if payload[:1] == b"D" or payload.startswith(b"vKill"):
            self.ended = True  # also while running: the server stops the guest, then detaches
            return b"OK"
        if self.running:
            return E_BUSY  # all-stop: only 0x03 makes sense while the guest runs
        return self.dispatch(payload)

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
                raise InvalidRequest(f"no process {pid[:20]!r} here")
        if text in (b"-1", b"0"):
            return None
        thread = parse_hex(text, "thread id")
        if not 1 <= thread <= self.count:
            raise InvalidRequest(f"no thread {thread}")
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
            raise InvalidRequest("T needs one thread")
        return b"OK"

    def _extra_info(self, args: bytes) -> bytes:
        cpu = self._parse_tid(args)
        if cpu is None:
            raise InvalidRequest("qThreadExtraInfo needs one thread")
        return f"vCPU {cpu}".encode().hex().encode()

    # ---- registers --------------------------------------------------------------

    def _values(self) -> list[int]:
        values = list(self.run.registers(self.cpu))
        if len(values) != REGISTER_COUNT:
            raise InvalidRequest(f"RunControl gave {len(values)} registers, not {REGISTER_COUNT}")
        return [*values, 0]  # tag_ctl: not part of RunControl, reads zero

    def _read_all_registers(self, args: bytes) -> bytes:
        if args:
            raise ProtocolError("g takes no arguments")
        return b"".join(register_hex(n, v) for n, v in enumerate(self._values()))

    def _write_all_registers(self, args: bytes) -> bytes:
        raw = parse_hex_bytes(args, "G")
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
            raise InvalidRequest(f"no register {number}")
        return register_hex(number, self._values()[number])

    def _write_register(self, args: bytes) -> bytes:
        number_text, value_text = split_fields(args, b"=", 2, "P packet")
        number = parse_hex(number_text, "register number")
        if number >= REGISTER_COUNT:
            raise InvalidRequest(f"register {number} cannot be written")
        raw = parse_hex_bytes(value_text, "P")
        if len(raw) != target.REGISTERS[number][1] // 8:
            raise ProtocolError(f"P {number}: {len(raw)} bytes")
        self.run.set_register(self.cpu, number, int.from_bytes(raw, "little"))
        return b"OK"

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
            self.view.insert_breakpoint(address, kind)
        elif ztype == 1:
            self._set_hw([*self.hard, address], self.watch, slot=0)
        elif ztype in _WATCH_KINDS:
            if kind == 0:
                raise InvalidRequest("a watchpoint of length 0")
            watch = Watchpoint(address, kind, _WATCH_KINDS[ztype])
            self._set_hw(self.hard, [*self.watch, watch], slot=1)
        else:
            return b""
        return b"OK"

    def _remove(self, args: bytes) -> bytes:
        ztype, address, kind = self._z_fields(args)
        if ztype == 0:
            self.view.remove_breakpoint(address)
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
            raise InvalidRequest("no hardware slot free", E_NO_SLOT)
        self.run.set_hw_debug(tuple(hard), tuple(watch))
        self.hard, self.watch = hard, watch

    def remove_all(self) -> None:
        """Take every breakpoint and watchpoint out: guest memory as it was, hardware clear."""
        for address in list(self.view.soft):
            try:
                self.view.remove_breakpoint(address)
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
        soft, hard = pc in self.view.soft, pc in self.hard
        if not soft and not hard:
            return None
        if soft:
            self.view.remove_breakpoint(pc)
        if hard:
            self.run.set_hw_debug(tuple(a for a in self.hard if a != pc), tuple(self.watch))
        try:
            return self._step_alone(cpu)
        finally:
            if soft:
                self.view.insert_breakpoint(pc, len(BRK))
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

    def poll(self, timeout: float) -> bytes | None:
        """The stop reply once the running guest has stopped (waiting up to ``timeout`` s)."""
        event = self.run.wait(timeout)
        return None if event is None else self.on_stop(event)

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

    def _supported(self, args: bytes) -> bytes:
        features = set(args.lstrip(b":").split(b";"))
        self.client = ClientFeatures(
            multiprocess=b"multiprocess+" in features,
            swbreak=b"swbreak+" in features,
            hwbreak=b"hwbreak+" in features,
        )
        return SUPPORTED
