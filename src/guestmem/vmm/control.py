"""The VMM's control socket (``guestmem vmm run --control PATH``): snapshot and migrate.

A Unix socket; each connection carries one request, a JSON object on one
line (at most :data:`MAX_REQUEST` bytes, within :data:`REQUEST_TIMEOUT`
seconds)::

    {"command": "snapshot", "to": "FILE"}
    {"command": "migrate", "to": "unix:PATH" | "tcp:HOST:PORT"[, "max_rounds": N]}

and is answered with JSON lines: ``{"progress": {...}}`` while a migration
goes on, then one ``{"ok": true, "report": {...}}`` or ``{"ok": false,
"error": "..."}``. A request that is not one of these (bad JSON, unknown
command, missing or ill-typed field, too long, too slow) is answered
``ok: false`` and changes nothing. One request is served at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import stat
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import guestmem as gm
from guestmem.gdbstub.server import hang_up
from guestmem.migration.live import Progress
from guestmem.tools.migrate import connect, endpoint
from guestmem.vmm import transfer

if TYPE_CHECKING:
    from guestmem.vmm.machine import Machine

MAX_REQUEST = 4096
REQUEST_TIMEOUT = 10.0
MAX_ROUNDS_LIMIT = 64


class ControlServer:
    """Serves the control socket at ``path`` for ``machine`` until :meth:`close`."""

    def __init__(self, machine: Machine, path: str) -> None:
        """Bind the socket (a stale socket file at ``path`` is replaced; any other file is not)."""
        self._machine = machine
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise gm.UsageError(f"{path} exists and is not a socket: not replacing it")
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX)
        try:
            self._listener.bind(path)
            self._listener.listen(4)
        except BaseException:
            self._listener.close()
            raise
        self._closed = threading.Event()

    def serve(self) -> None:
        """Answer requests, one connection at a time, until :meth:`close`."""
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                self._answer(client)
            except OSError:
                pass  # the client went away; the machine is as the request left it
            finally:
                hang_up(client)

    def _answer(self, client: socket.socket) -> None:
        def say(message: dict[str, Any]) -> None:
            client.sendall(json.dumps(message).encode() + b"\n")

        try:
            command = _command(_read_request(client))
            report = command(self._machine, say)
        except (gm.GuestMemoryError, ValueError, OSError) as err:
            say({"ok": False, "error": str(err)})
            return
        say({"ok": True, "report": report})

    def close(self) -> None:
        """Stop serving and remove the socket file."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


Say = Callable[[dict[str, Any]], None]


def _read_request(client: socket.socket) -> dict[str, Any]:
    client.settimeout(REQUEST_TIMEOUT)
    data = b""
    try:
        while b"\n" not in data:
            chunk = client.recv(MAX_REQUEST + 1 - len(data))
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REQUEST:
                raise gm.UsageError(f"a request is one line of at most {MAX_REQUEST} bytes")
    except TimeoutError:
        raise gm.UsageError(f"no whole request within {REQUEST_TIMEOUT:g} s") from None
    line, newline, _ = data.partition(b"\n")
    if not newline:
        raise gm.UsageError("a request ends with a newline")
    try:
        request = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise gm.UsageError(f"a request is a JSON object: {err}") from None
    if not isinstance(request, dict):
        raise gm.UsageError("a request is a JSON object")
    return request


def _command(request: dict[str, Any]) -> Callable[[Machine, Say], dict[str, Any]]:
    name = request.get("command")
    to = request.get("to")
    if not isinstance(to, str) or not to:
        raise gm.UsageError('a request names where to go: "to" (a string)')
    if name == "snapshot" and set(request) <= {"command", "to"}:
        return lambda machine, say: _snapshot(machine, to)
    if name == "migrate" and set(request) <= {"command", "to", "max_rounds"}:
        rounds = request.get("max_rounds", 8)
        if type(rounds) is not int or not 0 <= rounds <= MAX_ROUNDS_LIMIT:
            raise gm.UsageError(f"max_rounds is a whole number from 0 to {MAX_ROUNDS_LIMIT}")
        try:
            where = endpoint(to)
        except Exception as err:  # argparse's ArgumentTypeError: a bad endpoint
            raise gm.UsageError(str(err)) from None
        return lambda machine, say: _migrate(machine, where, rounds, say)
    raise gm.UsageError(f"not a request this VMM knows: {request}")


def _snapshot(machine: Machine, path: str) -> dict[str, Any]:
    partial = path + ".partial"
    try:
        with open(partial, "wb") as out:
            report = transfer.snapshot(machine, out)
        os.replace(partial, path)  # a snapshot that failed never looks like one
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    return dataclasses.asdict(report)


def _migrate(
    machine: Machine, where: tuple[str, str | tuple[str, int]], rounds: int, say: Say
) -> dict[str, Any]:
    def progress(p: Progress) -> None:
        with contextlib.suppress(OSError):  # the operator may stop watching
            say({"progress": dataclasses.asdict(p)})

    try:
        target = connect(where)
    except OSError as err:
        raise transfer.MigrationFailed(f"cannot reach the target: {err}") from err
    with target:
        report = transfer.migrate(machine, target, max_rounds=rounds, progress=progress)
    return dataclasses.asdict(report)
