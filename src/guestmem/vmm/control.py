"""The VMM's control socket (``guestmem vmm run --control PATH``): snapshot, migrate, decide.

A Unix socket only its owner can reach (mode 0600 whatever the umask, made
by :func:`guestmem.owner_only.bind_unix`): whoever can connect can copy all
guest RAM anywhere the VMM can write, so a root VMM's socket is root's
alone, as QEMU's QMP and Firecracker's API socket rely on file permissions.
Each connection carries one request, a JSON object on one line (at most
:data:`MAX_REQUEST` bytes, the whole line within :data:`REQUEST_TIMEOUT`
seconds)::

    {"command": "snapshot", "to": "/ABSOLUTE/FILE"}
    {"command": "migrate", "to": "unix:/ABSOLUTE/PATH" | "tcp:HOST:PORT",
     "max_rounds": N, "max_downtime_ms": N, "timeout": SECONDS,
     "tls": {"cert": PATH, "key": PATH, "ca": PATH}, "allow_insecure": BOOL,
     "auto_converge": BOOL}
    {"command": "cancel"}   end the migration in progress (before its go-ahead)
    {"command": "resume"}   after an unknown outcome: run the guest here
    {"command": "quit"}     end this VMM (after an unknown outcome: give the guest up here)
    {"command": "status"}

(every migrate field but ``to`` optional; paths absolute: the client
resolves them). Each is answered with JSON lines: ``{"progress": {...}}``
while a migration goes on, then exactly one ``{"ok": true, "report":
{...}}`` or ``{"ok": false, "kind": KIND, "error": "..."}``, KIND one of
``refused`` (not a request this VMM takes; nothing changed), ``busy``
(another snapshot, migration or decision holds the machine), ``failed``
(the guest runs on here), ``held`` (the outcome is unknown: the guest stays
paused here until ``resume`` or ``quit``) and ``internal`` (a fault in the
VMM; the server serves on). Up to :data:`MAX_CLIENTS` connections are
served at once; more are answered ``busy`` at once.

Inside the server a request is typed as soon as it is read
(:func:`parse_request`: :class:`Snapshot`, :class:`Migrate` or
:class:`Decision`, as crosvm's ``VmRequest``) and each answer is an
:class:`Answer` of an :class:`AnswerKind`; JSON is only the wire.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import guestmem as gm
from guestmem import owner_only
from guestmem.gdbstub.wire import hang_up
from guestmem.migration import channel
from guestmem.migration.live import Progress
from guestmem.vmm import handover, transfer
from guestmem.vmm.outcome import EndReason

if TYPE_CHECKING:
    from guestmem.vmm.machine import Machine

MAX_REQUEST = 4096
REQUEST_TIMEOUT = 10.0  # seconds for a whole request line, however it dribbles in
ANSWER_TIMEOUT = 10.0  # seconds a client may leave an answer unread
MAX_CLIENTS = 16
TURN_AWAY_TIMEOUT = 1.0  # seconds a client over the limit has to send its request
BACKLOG = 128
MAX_ROUNDS_LIMIT = 64
MAX_DOWNTIME_MS = 60_000
MAX_TIMEOUT = 600.0

Say = Callable[[dict[str, Any]], None]


class Command(enum.Enum):
    """What a request asks for: its ``command`` field."""

    SNAPSHOT = "snapshot"
    MIGRATE = "migrate"
    CANCEL = "cancel"
    RESUME = "resume"
    QUIT = "quit"
    STATUS = "status"


@dataclass(frozen=True)
class Snapshot:
    """Write the machine's state to the file ``to`` (absolute: the client resolves it)."""

    to: str


@dataclass(frozen=True)
class Migrate:
    """Live-migrate the machine to ``where``, with its options, TLS files and opt-in."""

    where: channel.Endpoint
    options: transfer.Options
    tls: channel.TlsConfig | None
    allow_insecure: bool


@dataclass(frozen=True)
class Decision:
    """A request with no fields: cancel, resume, quit or status."""

    command: Command


Request = Snapshot | Migrate | Decision


class AnswerKind(enum.Enum):
    """How a request ended: ``ok``, or the ``kind`` of the error answered."""

    OK = "ok"
    REFUSED = "refused"  # not a request this VMM takes; nothing changed
    BUSY = "busy"  # another snapshot, migration or decision holds the machine
    FAILED = "failed"  # the guest runs on here
    HELD = "held"  # the outcome is unknown: the guest stays paused until resume or quit
    INTERNAL = "internal"  # a fault in the VMM; the server serves on


@dataclass(frozen=True)
class Answer:
    """The one final answer to a request: its kind, and a report or an error."""

    kind: AnswerKind
    report: dict[str, Any] | None = None
    error: str = ""
    paused_ms: int | None = None  # how long a failed migration kept the guest paused

    def wire(self) -> dict[str, Any]:
        """The answer as the JSON object sent."""
        if self.kind is AnswerKind.OK:
            return {"ok": True, "report": self.report}
        message: dict[str, Any] = {"ok": False, "kind": self.kind.value, "error": self.error}
        if self.paused_ms is not None:
            message["paused_ms"] = self.paused_ms
        return message


class State(enum.Enum):
    """The machine as ``status`` reports it."""

    RUNNING = "running"
    BUSY = "busy"
    HELD = "held"


class Refused(gm.UsageError):
    """A request this VMM does not take as sent; nothing changed."""

    kind: ClassVar[AnswerKind] = AnswerKind.REFUSED


class Busy(gm.UsageError):
    """Another operation holds the machine."""

    kind: ClassVar[AnswerKind] = AnswerKind.BUSY


class ControlServer:
    """Serves the control socket at ``path`` for ``machine`` until :meth:`close`."""

    def __init__(self, machine: Machine, path: str) -> None:
        """Bind the socket: owner only; a live socket at ``path`` refused, a stale one replaced."""
        self._machine = machine
        self.path = path
        self._listener = owner_only.bind_unix(path, backlog=BACKLOG)
        self._closed = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._turning_away = threading.BoundedSemaphore(BACKLOG)
        self._lock = threading.Lock()
        self._operation: str | None = None
        self._canceller: Callable[[], bool] | None = None
        self._hold: handover.Hold | None = None

    # -- what the VMM's own code tells the server ------------------------------------------

    @contextlib.contextmanager
    def occupied(self, what: str, cancel: Callable[[], bool] | None = None) -> Iterator[None]:
        """The machine is busy with ``what`` for the block (``cancel`` ends it early)."""
        with self._lock:
            if self._operation is not None:
                raise Busy(f"busy: {self._operation} is in progress")
            if self._hold is not None:
                raise Busy(f"held: {self._hold.reason}; resume or quit first")
            self._operation, self._canceller = what, cancel
        try:
            yield
        finally:
            with self._lock:
                self._operation, self._canceller = None, None

    def hold(self, hold: handover.Hold) -> None:
        """The guest is held paused here until ``resume`` or ``quit`` decide."""
        with self._lock:
            self._hold = hold

    # -- serving ----------------------------------------------------------------------------

    def serve(self) -> None:
        """Answer requests until :meth:`close`, each connection on a thread of its own."""
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                if self._turning_away.acquire(blocking=False):
                    threading.Thread(target=self._turn_away, args=(client,), daemon=True).start()
                else:
                    hang_up(client)
                continue
            threading.Thread(target=self._serve_one, args=(client,), daemon=True).start()

    def _turn_away(self, client: socket.socket) -> None:
        """Answer busy, once the request is in (or a moment passed): a client reads it whole."""
        try:
            client.settimeout(TURN_AWAY_TIMEOUT)
            with contextlib.suppress(OSError):
                while (chunk := client.recv(MAX_REQUEST)) and b"\n" not in chunk:
                    pass
            with contextlib.suppress(OSError):
                client.settimeout(ANSWER_TIMEOUT)
                busy = f"busy: {MAX_CLIENTS} control connections are open"
                _say(client, Answer(AnswerKind.BUSY, error=busy).wire())
        finally:
            hang_up(client)
            self._turning_away.release()

    def _serve_one(self, client: socket.socket) -> None:
        try:
            self._answer(client)
        except OSError:
            pass  # the client went away; the machine is as the request left it
        finally:
            hang_up(client)
            self._slots.release()

    def _answer(self, client: socket.socket) -> None:
        def say(message: dict[str, Any]) -> None:
            client.settimeout(ANSWER_TIMEOUT)
            _say(client, message)

        say(self._outcome(client, say).wire())

    def _outcome(self, client: socket.socket, say: Say) -> Answer:
        """Read, parse and carry out one request: its answer, whatever happened."""
        try:
            report = self._carry_out(parse_request(read_request(client)), say)
        except handover.OutcomeUnknown as err:
            self.hold(err.hold)
            return Answer(AnswerKind.HELD, error=str(err))
        except handover.MigrationFailed as err:
            paused = round(err.paused * 1000)
            return Answer(AnswerKind.FAILED, error=str(err), paused_ms=paused)
        except (Refused, Busy) as err:
            return Answer(err.kind, error=str(err))
        except (gm.GuestMemoryError, ValueError, OSError) as err:
            return Answer(AnswerKind.FAILED, error=_why(err))
        except Exception as err:  # a fault in the VMM: answered, and the server serves on
            internal = f"internal error: {type(err).__name__}: {err}"
            return Answer(AnswerKind.INTERNAL, error=internal)
        return Answer(AnswerKind.OK, report=report)

    def _carry_out(self, request: Request, say: Say) -> dict[str, Any]:
        if isinstance(request, Snapshot):
            with self.occupied(f"a snapshot to {request.to}"):
                return _snapshot(self._machine, request.to)
        if isinstance(request, Migrate):
            cancellation = handover.Cancellation()
            with self.occupied(f"a migration to {request.where}", cancellation.cancel):
                return _migrate(self._machine, request, cancellation, say)
        decisions = {Command.CANCEL: self._do_cancel, Command.RESUME: self._do_resume,
                     Command.QUIT: self._do_quit, Command.STATUS: self._do_status}  # fmt: skip
        return decisions[request.command]()

    def _do_cancel(self) -> dict[str, Any]:
        with self._lock:
            cancel, operation = self._canceller, self._operation
        if cancel is None:
            raise Refused("nothing to cancel: no migration is in progress")
        if not cancel():
            raise Busy(f"too late to cancel {operation}: the go-ahead was sent")
        return {"cancelled": operation}

    def _do_status(self) -> dict[str, Any]:
        with self._lock:
            if self._hold is not None:
                return {"state": State.HELD.value, "reason": self._hold.reason}
            if self._operation is not None:
                return {"state": State.BUSY.value, "operation": self._operation}
        return {"state": State.RUNNING.value}

    def _do_resume(self) -> dict[str, Any]:
        hold = self._take_hold("resume")
        try:
            hold.resume()
        except BaseException:
            with self._lock:
                self._hold = hold  # still held: the error says why
            raise
        return {"resumed": True}

    def _do_quit(self) -> dict[str, Any]:
        with self._lock:
            hold, self._hold = self._hold, None
            cancel = self._canceller
        if hold is not None:
            hold.quit()
        elif cancel is not None:
            cancel()
        self._machine.stop(EndReason.QUIT)
        return {"quit": True}

    def _take_hold(self, decision: str) -> handover.Hold:
        with self._lock:
            if self._hold is None:
                raise Refused(f"nothing to {decision}: no migration's outcome is waiting here")
            hold, self._hold = self._hold, None
            return hold

    def close(self) -> None:
        """Stop serving and remove the socket file."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def read_request(client: socket.socket) -> dict[str, Any]:
    """One request line as a JSON object, all of it within :data:`REQUEST_TIMEOUT` seconds."""
    deadline = time.monotonic() + REQUEST_TIMEOUT
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Refused(f"no whole request within {REQUEST_TIMEOUT:g} s")
        client.settimeout(left)
        try:
            chunk = client.recv(MAX_REQUEST + 1 - len(data))
        except TimeoutError:
            raise Refused(f"no whole request within {REQUEST_TIMEOUT:g} s") from None
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise Refused(f"a request is one line of at most {MAX_REQUEST} bytes")
    line, newline, _ = data.partition(b"\n")
    if not newline:
        raise Refused("a request ends with a newline")
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, nesting too deep
        raise Refused(f"a request is a JSON object: {type(err).__name__}") from None
    if not isinstance(request, dict):
        raise Refused("a request is a JSON object")
    return request


def parse_request(fields: dict[str, Any]) -> Request:
    """A request object's typed form; :class:`Refused` for anything this VMM does not take."""
    try:
        command = Command(fields.get("command"))
    except ValueError:
        raise Refused(f"not a command this VMM knows: {fields.get('command')!r} "
                      "(snapshot, migrate, cancel, resume, quit, status)") from None  # fmt: skip
    if command is Command.SNAPSHOT:
        return Snapshot(_only(fields, "to")["to"])
    if command is Command.MIGRATE:
        return Migrate(*migrate_options(fields))
    _only(fields)
    return Decision(command)


def migrate_options(
    request: dict[str, Any],
) -> tuple[channel.Endpoint, transfer.Options, channel.TlsConfig | None, bool]:
    """The target, options, TLS files and insecure opt-in of a ``migrate`` request."""
    fields = _only(request, "to", "max_rounds", "max_downtime_ms", "timeout", "tls",
                   "allow_insecure", "auto_converge", required=("to",))  # fmt: skip
    try:
        where = channel.parse_endpoint(fields["to"])
    except gm.UsageError as err:
        raise Refused(str(err)) from None
    if where.family == "unix" and not os.path.isabs(where.path or ""):
        raise Refused(f"{fields['to']}: the path must be absolute (the client resolves it)")
    rounds = _whole(fields, "max_rounds", 8, 0, MAX_ROUNDS_LIMIT)
    downtime = _whole(fields, "max_downtime_ms", round(transfer.MAX_DOWNTIME * 1000), 1,
                      MAX_DOWNTIME_MS)  # fmt: skip
    timeout = fields.get("timeout", transfer.TIMEOUT)
    if type(timeout) not in (int, float) or not 0.1 <= timeout <= MAX_TIMEOUT:
        raise Refused(f"timeout is a number of seconds from 0.1 to {MAX_TIMEOUT:g}")
    insecure, converge = fields.get("allow_insecure", False), fields.get("auto_converge", False)
    if type(insecure) is not bool or type(converge) is not bool:
        raise Refused("allow_insecure and auto_converge are true or false")
    tls = None
    if "tls" in fields:
        files = fields["tls"]
        if not isinstance(files, dict) or set(files) != {"cert", "key", "ca"}:
            raise Refused('tls is {"cert": PATH, "key": PATH, "ca": PATH}')
        for name, path in files.items():
            if not isinstance(path, str) or not os.path.isabs(path):
                raise Refused(f"tls {name} is an absolute path (the client resolves it)")
        try:
            tls = channel.TlsConfig(files["cert"], files["key"], files["ca"])
        except gm.UsageError as err:  # a missing or unreadable file, named
            raise Refused(str(err)) from None
    options = transfer.Options(
        max_rounds=rounds, max_downtime=downtime / 1000, timeout=timeout, auto_converge=converge
    )
    return where, options, tls, insecure


def _only(
    request: dict[str, Any], *names: str, required: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """The request's fields, which must be among ``names`` (all of them ``required``)."""
    command = request.get("command")
    extra = sorted(set(request) - {"command", *names})
    if extra:
        raise Refused(f"{command} takes no {', '.join(map(repr, extra))}")
    for name in names if required is None else required:
        if name not in request:
            raise Refused(f"{command} needs {name!r}")
    if "to" in names and (not isinstance(request.get("to"), str) or not request["to"]):
        raise Refused(f'{command}: "to" is a non-empty string')
    return request


def _whole(fields: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = fields.get(name, default)
    if type(value) is not int or not low <= value <= high:
        raise Refused(f"{name} is a whole number from {low} to {high}")
    return value


def _snapshot(machine: Machine, path: str) -> dict[str, Any]:
    if not os.path.isabs(path):
        raise Refused(f"{path}: the path must be absolute (the client resolves it)")
    report = owner_only.write_file(path, lambda out: transfer.snapshot(machine, out))
    return dataclasses.asdict(report)


def _migrate(
    machine: Machine, request: Migrate, cancellation: handover.Cancellation, say: Say
) -> dict[str, Any]:
    def progress(p: Progress) -> None:
        with contextlib.suppress(OSError):  # the operator may stop watching
            say({"progress": dataclasses.asdict(p)})

    where, options = request.where, request.options
    try:
        target = channel.connect(
            where, tls=request.tls, timeout=options.timeout, allow_insecure=request.allow_insecure
        )
    except OSError as err:
        raise handover.MigrationFailed(f"cannot reach the target {where}: {_why(err)}") from err
    with target:
        report = transfer.migrate(
            machine, target, options, progress=progress, cancellation=cancellation
        )
    return dataclasses.asdict(report)


def _say(client: socket.socket, message: dict[str, Any]) -> None:
    client.sendall(json.dumps(message, allow_nan=False).encode() + b"\n")


def _why(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, gm.GuestMemoryError):
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror or type(err).__name__}"
    return str(err)
